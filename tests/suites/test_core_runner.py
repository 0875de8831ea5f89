"""suites.core.runner: OOM and errors are data, resume measures nothing twice, discovery."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import suites
from suites.core import records as rec
from suites.core.runner import Point, SkipPoint, Suite, SweepConfig, run_suite

REPO = Path(__file__).resolve().parents[2]


def _fake_suite(runner, name, measure, impls=("a", "b"), sizes=(10, 20, 40), unavailable=None):
    class Fake(Suite):
        description = "test suite"

        def points(self, cfg):
            return [Point(i, {"n_atoms": n, "mode": "fwd"}) for i in self.impls for n in sizes]

        def measure(self, point, cfg):
            return measure(point)

        def unavailable(self, impl, cfg):
            return (unavailable or {}).get(impl)

    Fake.name, Fake.impls = name, impls
    Fake.__qualname__ = f"Fake_{name}"
    return runner.register_suite(Fake)


def _cfg(tmp_path, **kw):
    return SweepConfig(device="cpu", out_dir=tmp_path, progress=False, **kw)


def _by_point(result):
    return {(r["impl"], r["params"]["n_atoms"]): r for r in result.records}


def test_oom_is_stored_as_data_and_the_sweep_continues(fresh_suite_registry, tmp_path):
    def measure(point):
        if point.impl == "a" and point.params["n_atoms"] >= 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if point.impl == "b" and point.params["n_atoms"] == 20:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: out of memory")
        return {"latency_ms": 1.0}

    _fake_suite(fresh_suite_registry, "fake-oom", measure)
    result = run_suite("fake-oom", _cfg(tmp_path))
    got = {k: r["status"] for k, r in _by_point(result).items()}
    assert got == {("a", 10): "ok", ("a", 20): "oom", ("a", 40): "skipped",
                   ("b", 10): "ok", ("b", 20): "oom", ("b", 40): "skipped"}
    rows = _by_point(result)
    assert "out of memory" in rows[("a", 20)]["error"]
    assert "n_atoms=20" in rows[("a", 40)]["error"]  # not run into the same wall, says why
    assert rows[("a", 20)]["metrics"] == {}
    stored = rec.load_records(result.path)
    assert len(stored) == 6 and stored == result.records


def test_a_failed_point_frees_its_tensors_even_if_the_exception_is_kept(fresh_suite_registry, tmp_path):
    # PyTorch's autograd engine keeps the exception of a CUDA backward that ran out of memory
    # (pytorch/pytorch#82218); the runner must still free what the failed call's frames held
    import weakref

    kept_exceptions, freed = [], []

    def deep(point):
        activations = torch.ones(256, 256)
        freed.append(weakref.ref(activations))
        exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        kept_exceptions.append(exc)
        raise exc

    def measure(point):
        return deep(point)

    _fake_suite(fresh_suite_registry, "fake-kept", measure, impls=("a",), sizes=(10,))
    result = run_suite("fake-kept", _cfg(tmp_path))
    assert result.records[0]["status"] == "oom"
    assert kept_exceptions and all(ref() is None for ref in freed)


def test_a_point_that_loses_gpu_memory_ends_the_process_sweep(fresh_suite_registry, tmp_path, monkeypatch):
    # after an OOM inside a CUDA backward PyTorch may keep the failed graph: the points after
    # it must not run in that process (run_bench.py restarts itself with --resume)
    from suites.core import runner

    lost = {"bytes": 0}
    monkeypatch.setattr(runner, "_allocated", lambda device: lost["bytes"])

    def measure(point):
        if point.params["n_atoms"] == 20:
            lost["bytes"] = 3 * 2**30
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"latency_ms": 1.0}

    _fake_suite(fresh_suite_registry, "fake-lost", measure, impls=("a",))
    with pytest.raises(runner.DeviceMemoryLost, match="3.0 GiB"):
        run_suite("fake-lost", _cfg(tmp_path))
    stored = {r["params"]["n_atoms"]: r for r in rec.load_records(tmp_path / "fake-lost.jsonl")}
    assert stored[10]["status"] == "ok" and stored[20]["status"] == "oom" and 40 not in stored
    assert stored[20]["metrics"]["held_after_failure_bytes"] == 3 * 2**30
    assert "3.00 GiB stayed allocated" in stored[20]["error"]
    lost["bytes"] = 0  # the fresh process
    result = run_suite("fake-lost", _cfg(tmp_path, resume=True))
    assert result.resumed == 2 and {r["params"]["n_atoms"]: r["status"] for r in result.records}[40] == "skipped"


def test_errors_are_recorded_and_the_sweep_continues(fresh_suite_registry, tmp_path):
    def measure(point):
        if point.impl == "a":
            raise ValueError("kernel precondition failed")
        return {"latency_ms": 2.0}

    _fake_suite(fresh_suite_registry, "fake-err", measure)
    result = run_suite("fake-err", _cfg(tmp_path))
    rows = _by_point(result)
    assert all(rows[("a", n)]["status"] == "error" for n in (10, 20, 40))
    assert "ValueError: kernel precondition failed" in rows[("a", 10)]["error"]
    assert all(rows[("b", n)]["status"] == "ok" for n in (10, 20, 40))


def test_skips_are_recorded_with_reasons(fresh_suite_registry, tmp_path):
    def measure(point):
        if point.params["n_atoms"] == 20:
            raise SkipPoint("too small to matter")
        return {"latency_ms": 2.0}

    _fake_suite(fresh_suite_registry, "fake-skip", measure, unavailable={"b": "needs CUDA"})
    rows = _by_point(run_suite("fake-skip", _cfg(tmp_path)))
    assert rows[("a", 20)]["status"] == "skipped" and rows[("a", 20)]["error"] == "too small to matter"
    assert {rows[("b", n)]["error"] for n in (10, 20, 40)} == {"needs CUDA"}
    assert rows[("a", 10)]["status"] == "ok"


def test_a_failing_availability_check_is_an_error_not_a_crash(fresh_suite_registry, tmp_path):
    class Checked(Suite):
        name = "fake-check"
        impls = ("a", "b")

        def points(self, cfg):
            return [Point(i, {"n_atoms": 1}) for i in self.impls]

        def unavailable(self, impl, cfg):
            if impl == "a":
                raise TypeError("model constructor changed")
            return None

        def measure(self, point, cfg):
            return {"latency_ms": 1.0}

    fresh_suite_registry.register_suite(Checked)
    rows = {r["impl"]: r for r in run_suite("fake-check", _cfg(tmp_path)).records}
    assert rows["a"]["status"] == "error" and "model constructor changed" in rows["a"]["error"]
    assert rows["b"]["status"] == "ok"


def test_impl_filter_and_env(fresh_suite_registry, tmp_path):
    _fake_suite(fresh_suite_registry, "fake-filter", lambda p: {"latency_ms": 1.0})
    result = run_suite("fake-filter", _cfg(tmp_path, impls=("b",)))
    assert {r["impl"] for r in result.records} == {"b"}
    assert result.records[0]["env"]["device"] == "cpu"
    assert "torch" in result.records[0]["env"]


_KILLABLE = textwrap.dedent("""
    import os, signal
    from suites.core.runner import Point, Suite, register_suite

    @register_suite
    class Killable(Suite):
        name = "fake-killable"
        impls = ("a", "b")

        def points(self, cfg):
            return [Point(i, {"n_atoms": n, "mode": "fwd"}) for i in self.impls for n in (10, 20, 40)]

        def measure(self, point, cfg):
            key = f"{point.impl}:{point.params['n_atoms']}"
            with open(os.environ["FAKE_LOG"], "a") as f:
                f.write(key + "\\n")
            if key == os.environ.get("FAKE_KILL_AT"):
                os.kill(os.getpid(), signal.SIGKILL)  # killed mid-point, nothing written
            return {"latency_ms": 1.0}
""")


def _run_killable(tmp_path, resume, kill_at=None):
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import fake_killable; "
        "from suites.core.runner import SweepConfig, run_suite; "
        f"run_suite('fake-killable', SweepConfig(out_dir={str(tmp_path / 'out')!r}, progress=False, resume={resume}))"
    )
    env = {**os.environ, "FAKE_LOG": str(tmp_path / "log.txt"), "PYTHONPATH": str(REPO)}
    if kill_at:
        env["FAKE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_killed_sweep_resumed_measures_nothing_twice(tmp_path):
    (tmp_path / "fake_killable.py").write_text(_KILLABLE)
    log = tmp_path / "log.txt"
    killed = _run_killable(tmp_path, resume=False, kill_at="b:10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first = rec.load_records(tmp_path / "out" / "fake-killable.jsonl")
    assert [(r["impl"], r["params"]["n_atoms"]) for r in first] == [("a", 10), ("a", 20), ("a", 40)]

    log.write_text("")
    resumed = _run_killable(tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert log.read_text().split() == ["b:10", "b:20", "b:40"]  # nothing already stored
    assert "3 point(s) already stored" in resumed.stderr
    assert len(rec.load_records(tmp_path / "out" / "fake-killable.jsonl")) == 6

    log.write_text("")
    assert _run_killable(tmp_path, resume=True).returncode == 0
    assert log.read_text() == ""


def test_resume_keeps_oom_walls_and_retries_errors(fresh_suite_registry, tmp_path):
    fail = {"on": True}
    calls = []

    def measure(point):
        calls.append((point.impl, point.params["n_atoms"]))
        if point.impl == "a" and point.params["n_atoms"] == 20:
            raise torch.OutOfMemoryError("out of memory")
        if point.impl == "b" and fail["on"]:
            raise RuntimeError("flaky")
        return {"latency_ms": 1.0}

    _fake_suite(fresh_suite_registry, "fake-retry", measure)
    run_suite("fake-retry", _cfg(tmp_path))
    fail["on"], calls[:] = False, []
    result = run_suite("fake-retry", _cfg(tmp_path, resume=True))
    assert calls == [("b", 10), ("b", 20), ("b", 40)]  # errors retried; OOM and its wall kept
    assert result.counts() == {"ok": 4, "oom": 1, "skipped": 1}


def test_fresh_run_sets_old_results_aside(fresh_suite_registry, tmp_path):
    _fake_suite(fresh_suite_registry, "fake-fresh", lambda p: {"latency_ms": 1.0}, sizes=(10,))
    run_suite("fake-fresh", _cfg(tmp_path))
    run_suite("fake-fresh", _cfg(tmp_path))
    assert len(rec.load_records(tmp_path / "fake-fresh.jsonl")) == 2
    assert len(list(tmp_path.glob("fake-fresh.jsonl.*.old"))) == 1


def test_registry_errors(fresh_suite_registry):
    with pytest.raises(ValueError, match="valid suites: .*smoke"):
        fresh_suite_registry.get_suite("no-such-suite")

    class Nameless(Suite):
        pass

    with pytest.raises(ValueError, match="name"):
        fresh_suite_registry.register_suite(Nameless)

    class Clash(Suite):
        name = "smoke"

    with pytest.raises(ValueError, match="taken"):
        fresh_suite_registry.register_suite(Clash)


def test_sweep_config_picks():
    cfg = SweepConfig(quick=True, dtypes=("fp32", "bf16"))
    assert cfg.dtypes == ("float32", "bfloat16")
    assert cfg.pick_sizes([1], [2]) == [1] and SweepConfig(quick=False).pick_sizes([1], [2]) == [2]
    assert SweepConfig(sizes=(5,)).pick_sizes([1], [2]) == [5]
    assert SweepConfig().pick_dtypes(("fp16",)) == ["float16"]
    assert not cfg.full and SweepConfig(quick=False).full
    with pytest.raises(ValueError, match="valid"):
        SweepConfig(dtypes=("int7",))


def test_discovery_reports_a_broken_module_and_keeps_the_others(fresh_suite_registry, tmp_path, monkeypatch, capsys):
    (tmp_path / "zz_broken.py").write_text("import no_such_package_xyz\n")
    (tmp_path / "zz_good.py").write_text(textwrap.dedent("""
        from suites.core.runner import Point, Suite, register_suite

        @register_suite
        class Good(Suite):
            name = "zz-good"
            impls = ("x",)
    """))
    monkeypatch.setattr(suites, "__path__", [*suites.__path__, str(tmp_path)])
    try:
        errors = suites.discover_suites(force=True)
        assert "zz_broken" in errors and "no_such_package_xyz" in errors["zz_broken"]
        assert "zz_broken" in capsys.readouterr().err
        assert {"zz-good", "smoke"} <= set(fresh_suite_registry.suite_names())
    finally:
        for mod in ("suites.zz_broken", "suites.zz_good"):
            sys.modules.pop(mod, None)
        suites.IMPORT_ERRORS.pop("zz_broken", None)
