"""``scripts/profile_model.py --host`` on the CPU: the cProfile rows name the functions that
ran, and a call without a GPU reports no host synchronisations."""
from __future__ import annotations

import torch


def _work():
    x = torch.randn(64, 64)
    for _ in range(3):
        x = torch.tanh(x @ x)
    return x.sum()


def test_host_profile_names_the_functions_that_ran(load_script):
    pm = load_script("profile_model")
    result = pm.host_profile(_work, torch.device("cpu"), top=50)
    names = [row["function"] for row in result["by_total_time"]]
    assert any("test_profile_model.py" in name and "_work" in name for name in names)
    assert any("tanh" in row["function"] and row["calls"] == 3 for row in result["by_own_time"])
    assert result["syncs"] == {}


def test_repo_line_skips_library_frames(load_script):
    import traceback

    pm = load_script("profile_model")
    stack = traceback.extract_stack()
    assert pm._repo_line(stack).startswith("test_profile_model.py:")
