"""suites.core.records: the JSON-lines store, corrupt lines, resume bookkeeping, export."""
import json
import math

import pytest

from suites.core import records as rec


def _rec(impl="a", n=1, status="ok", **metrics):
    return rec.make_record("s", impl, {"n_atoms": n, "mode": "fwd"}, status=status, metrics=metrics,
                           env={"gpu_name": None})


def test_roundtrip_keeps_every_schema_key(tmp_path):
    path = tmp_path / "r.jsonl"
    r = _rec(latency_ms=1.5, samples_ms=[1.0, 2.0])
    rec.append_record(path, r)
    [loaded] = rec.load_records(path)
    assert set(loaded) == set(rec.RECORD_KEYS)
    assert loaded == r
    assert loaded["schema"] == rec.SCHEMA_VERSION
    assert loaded["timestamp"].endswith("Z")


def test_point_id_ignores_key_order_and_separates_points():
    a = rec.point_id("s", "i", {"n_atoms": 1, "mode": "fwd"})
    assert a == rec.point_id("s", "i", {"mode": "fwd", "n_atoms": 1})
    assert a != rec.point_id("s", "i", {"n_atoms": 2, "mode": "fwd"})
    assert a != rec.point_id("s", "j", {"n_atoms": 1, "mode": "fwd"})
    assert a != rec.point_id("t", "i", {"n_atoms": 1, "mode": "fwd"})


def test_unknown_status_rejected():
    with pytest.raises(ValueError, match="valid"):
        rec.make_record("s", "i", {}, status="done")


def test_non_finite_metrics_become_null(tmp_path):
    path = tmp_path / "r.jsonl"
    rec.append_record(path, _rec(latency_ms=math.nan, tflops_core=math.inf))
    [loaded] = rec.load_records(path)
    assert loaded["metrics"] == {"latency_ms": None, "tflops_core": None}


def test_truncated_last_line_is_reported_and_skipped(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    for n in (1, 2, 3):
        rec.append_record(path, _rec(n=n))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])  # a crash in the middle of the third write
    with pytest.warns(rec.CorruptRecordWarning, match="truncated last line"):
        loaded = rec.load_records(path)
    assert [r["params"]["n_atoms"] for r in loaded] == [1, 2]
    assert "r.jsonl:3" in capsys.readouterr().err
    # The next append starts on a fresh line: the new record survives, the old ones too.
    rec.append_record(path, _rec(n=4))
    with pytest.warns(rec.CorruptRecordWarning):
        loaded = rec.load_records(path)
    assert [r["params"]["n_atoms"] for r in loaded] == [1, 2, 4]


def test_corrupt_middle_line_and_foreign_json_are_skipped(tmp_path):
    path = tmp_path / "r.jsonl"
    rec.append_record(path, _rec(n=1))
    with open(path, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"hello": 1}) + "\n")
    rec.append_record(path, _rec(n=2))
    with pytest.warns(rec.CorruptRecordWarning) as caught:
        loaded = rec.load_records(path)
    assert [r["params"]["n_atoms"] for r in loaded] == [1, 2]
    assert len(caught) == 2


def test_done_ids_retry_errors_and_take_the_latest(tmp_path):
    store = rec.ResultsStore(tmp_path / "r.jsonl")
    ok, oom, skipped = _rec(n=1), _rec(n=2, status="oom"), _rec(n=3, status="skipped")
    err = _rec(n=4, status="error")
    for r in (ok, oom, skipped, err):
        store.append(r)
    assert store.done_ids() == {ok["point_id"], oom["point_id"], skipped["point_id"]}
    store.append(_rec(n=4))  # the retried error point now succeeded
    assert err["point_id"] in store.done_ids()
    latest = rec.latest_by_point(store.load())
    assert [r["status"] for r in latest] == ["ok", "oom", "skipped", "ok"]


def test_load_directory_and_missing_paths(tmp_path):
    rec.append_record(tmp_path / "a.jsonl", _rec(n=1))
    rec.append_record(tmp_path / "sub" / "b.jsonl", _rec(n=2))
    (tmp_path / "a.jsonl.20260101T000000.old").write_text("junk\n")  # set aside by a fresh run
    assert len(rec.load_records(tmp_path)) == 2
    assert rec.load_records(tmp_path / "none.jsonl") == []
    with pytest.raises(FileNotFoundError):
        rec.load_all([tmp_path / "nowhere"])


def test_dataframe_and_csv(tmp_path):
    records = [_rec(n=1, latency_ms=2.0, samples_ms=[1.0, 3.0]), _rec(impl="b", n=2, status="oom")]
    df = rec.to_dataframe(records)
    assert list(df["impl"]) == ["a", "b"]
    assert {"params.n_atoms", "metrics.latency_ms", "env.gpu_name", "status"} <= set(df.columns)
    path = rec.export_csv(records, tmp_path / "out.csv")
    import pandas as pd

    back = pd.read_csv(path)
    assert json.loads(back["metrics.samples_ms"][0]) == [1.0, 3.0]
    assert back["status"].tolist() == ["ok", "oom"]
