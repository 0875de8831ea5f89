"""suites.core.env: the environment record is complete without a GPU or without pynvml."""
import sys

import torch

from suites.core import env as envmod


def test_environment_complete_on_this_machine():
    env = envmod.environment("cpu")
    assert set(envmod.ENV_KEYS) <= set(env)
    assert env["torch"] == torch.__version__
    assert env["device"] == "cpu"
    assert env["cpu"] and env["cpu_count"] >= 1
    assert env["python"] and env["platform"]
    assert env["command"]  # the full command line of this process
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)
    if not torch.cuda.is_available():
        assert env["gpu_count"] == 0 and env["gpu_name"] is None and env["gpu_names"] == []
        assert env["nvml_error"]  # says why there is no GPU record
        assert env["cuda"] is None or isinstance(env["cuda"], str)


def test_environment_is_a_fresh_dict_each_time():
    a = envmod.environment("cpu")
    a["gpu_names"].append("x")
    a["torch"] = "changed"
    b = envmod.environment("cpu")
    assert b["torch"] == torch.__version__ and "x" not in b["gpu_names"]


def test_gpu_info_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    info = envmod.gpu_info()
    assert info["gpu_count"] == 0 and info["gpu_name"] is None
    assert "pynvml not installed" in info["nvml_error"]
    assert {"driver", "sm_clock_mhz", "mem_clock_mhz", "power_limit_w", "gpu_memory_bytes"} <= set(info)


def test_git_state_outside_a_checkout(tmp_path):
    assert envmod.git_state(tmp_path) == (None, None)


def test_git_commit_named_by_the_environment(monkeypatch, tmp_path):
    # a copied checkout whose .git is older than its files names its commit instead
    monkeypatch.setenv(envmod.GIT_COMMIT_ENV, "e143fcd")
    assert envmod.git_state(tmp_path) == ("e143fcd", None)
