"""run_bench.py: --list, clear errors on unknown names, an end-to-end smoke run and --resume."""
import subprocess
import sys
from pathlib import Path

import pytest

import run_bench
from suites.core import records as rec

REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "run_bench.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_list_shows_suites_implementations_and_metrics():
    out = _cli("--list")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Suites" in text and "smoke" in text
    assert "Implementations" in text and "matmul" in text and "core-materialized" in text
    assert "Metrics" in text and "latency_ms" in text and "saved_bytes" in text


def test_a_python_without_the_dependencies_is_told_how_to_install_them():
    # torch made unimportable in a fresh interpreter: a usage error naming it and the install
    # command, not a traceback
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['run_bench.py', '--list']; "
            "runpy.run_path('run_bench.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == run_bench.EXIT_USAGE
    assert "Traceback" not in out.stderr
    assert "cannot import 'torch'" in out.stderr and "pip install torch==2.13.0 -e ." in out.stderr


def test_unknown_suite_exits_nonzero_naming_the_valid_ones():
    out = _cli("--suite", "no-such-suite", "--out", "/nonexistent/never-written")
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1
    assert "no-such-suite" in errors[0] and "valid suites:" in errors[0] and "smoke" in errors[0]


@pytest.mark.parametrize("args,needle", [
    (["--suite", "smoke", "--impl", "nope"], "valid: "),
    (["--suite", "smoke", "--dtype", "int7"], "unknown dtype"),
    ([], "nothing to do"),
])
def test_other_usage_errors(args, needle, capsys):
    assert run_bench.main(args) == run_bench.EXIT_USAGE
    assert needle in capsys.readouterr().err


def test_int_lists():
    assert run_bench._int_list("100,1e3, 2000") == (100, 1000, 2000)
    assert run_bench._int_list("1-4") == (1, 2, 3, 4)
    assert run_bench._name_list(["a,b", "c"]) == ("a", "b", "c")


def test_smoke_end_to_end_then_resume(tmp_path, capsys):
    out = tmp_path / "smoke"
    args = ["--suite", "smoke", "--impl", "matmul,core-materialized", "--sizes", "16", "--device", "cpu",
            "--out", str(out), "--no-progress", "--no-report"]
    assert run_bench.main(args) == 0
    records = rec.load_records(out / "smoke.jsonl")
    assert len(records) == 4  # 2 implementations x 1 size x modes fwd, fwd+bwd
    assert {r["status"] for r in records} == {"ok"}
    assert {r["impl"] for r in records} == {"matmul", "core-materialized"}
    for r in records:
        assert r["metrics"]["latency_ms"] > 0 and r["metrics"]["saved_bytes"] >= 0
        assert r["env"]["device"] == "cpu" and r["env"]["command"]
    core = [r for r in records if r["impl"] == "core-materialized"]
    assert all(r["metrics"]["bytes_per_atom"] > 0 for r in core)
    assert (out / "smoke.csv").exists()
    assert "smoke: 4 ok" in capsys.readouterr().out

    assert run_bench.main([*args, "--resume"]) == 0
    assert rec.load_records(out / "smoke.jsonl") == records  # nothing measured again
    assert "4 point(s) already stored" in capsys.readouterr().err


def test_a_run_that_loses_gpu_memory_restarts_itself_resuming(tmp_path, monkeypatch, capsys):
    from suites.core import runner

    def lose(*_args, **_kwargs):
        raise runner.DeviceMemoryLost("smoke: matmul n_atoms=16", 3 * 2**30)

    execs = []
    monkeypatch.setattr(runner, "run_suites", lose)
    monkeypatch.setattr(run_bench.os, "execv", lambda exe, argv: execs.append(argv))
    monkeypatch.delenv(run_bench.RESTARTS_ENV, raising=False)
    args = ["--suite", "smoke", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    run_bench.main(args)
    assert execs and execs[0][2:] == [*args, "--resume"]
    assert run_bench.os.environ[run_bench.RESTARTS_ENV] == "1"
    assert "restarting with --resume (1 of" in capsys.readouterr().err
    monkeypatch.setenv(run_bench.RESTARTS_ENV, str(run_bench.MAX_RESTARTS))
    assert run_bench.main(args) == 1  # no endless restarts
    assert len(execs) == 1
    assert run_bench.resume_argv(["--resume", "--suite", "x"]) == ["--resume", "--suite", "x"]


def test_every_option_is_either_repeated_or_dropped_by_the_gate_reruns():
    dests = {a.dest for a in run_bench.build_parser()._actions}
    assert dests == set(run_bench.RERUN_CARRIED) | set(run_bench.RERUN_DROPPED)
    assert not set(run_bench.RERUN_CARRIED) & set(run_bench.RERUN_DROPPED)
    parser = run_bench.build_parser()
    args = parser.parse_args(["--suite", "kernel-regression", "--impl", "triton", "--sizes", "1024,1e4", "--dtype",
                              "bf16", "--full", "--seed", "3", "--compare", "b.json", "--out", "x", "--resume",
                              "--time-budget", "2.5"])
    again = parser.parse_args(run_bench.rerun_argv(args, "cuda:1", ["p1", "p2"], Path("y/confirm-1")))
    for name in run_bench.RERUN_CARRIED:
        assert getattr(again, name) == (getattr(args, name) if name != "device" else "cuda:1"), name
    assert again.point == ["p1", "p2"] and again.out == "y/confirm-1" and again.no_report
    assert again.compare is None and not again.resume  # a rerun measures; it does not gate or resume


def test_a_flagged_point_is_measured_again_in_a_fresh_process(tmp_path, capsys):
    """End to end: a baseline far faster than any real timing flags the point; the rerun (a real
    second process, only that point) finds it slow too, so the gate fails."""
    import json

    out = tmp_path / "run"
    args = ["--suite", "smoke", "--impl", "matmul", "--sizes", "16", "--device", "cpu", "--no-progress",
            "--no-report", "--out", str(out)]
    base = tmp_path / "base.json"
    assert run_bench.main([*args, "--save-baseline", str(base)]) == 0
    doc = json.loads(base.read_text())
    fwd = next(p for p in doc["points"] if p["params"]["mode"] == "fwd")
    # below every sample a real matmul can take, so that the CPU's noise cannot make it inconclusive
    fwd["samples_ms"] = [1e-6 * (1 + 0.01 * i) for i in range(len(fwd["samples_ms"]))]
    doc["points"] = [fwd]
    base.write_text(json.dumps(doc))
    capsys.readouterr()
    assert run_bench.main([*args, "--compare", str(base)]) == 1
    text = capsys.readouterr().out
    assert "confirming 1 flagged point(s)" in text and "FAIL: 1 REGRESSION" in text, text
    again = rec.load_records(out / "confirm-1" / "smoke.jsonl")
    assert [(r["impl"], r["params"]["mode"], r["status"]) for r in again] == [("matmul", "fwd", "ok")]
    assert again[0]["point_id"] == fwd["point_id"]
    # without reruns the first verdict stands alone
    assert run_bench.main([*args, "--compare", str(base), "--confirm", "0"]) == 1
    assert "confirming" not in capsys.readouterr().out
