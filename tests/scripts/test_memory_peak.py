"""``scripts/memory_peak.py``'s replay of an allocator trace (the GPU part needs CUDA; the
replay that decides what is reported does not)."""
from __future__ import annotations


def _frame(path: str, line: int, name: str = "f") -> dict:
    return {"filename": path, "line": line, "name": name}


def test_live_at_peak_replays_allocations_and_completed_frees(load_script):
    mp = load_script("memory_peak")
    ours = "/repo/e2f/attention/triton/function.py"
    trace = [
        {"action": "alloc", "addr": 1, "size": 100,
         "frames": [_frame("/venv/torch/functional.py", 7, "sum"), _frame(ours, 10, "_backward")]},
        {"action": "alloc", "addr": 2, "size": 300, "frames": [_frame(ours, 20, "_backward")]},
        {"action": "free_requested", "addr": 2, "size": 300},  # still held until completed
        {"action": "alloc", "addr": 3, "size": 50, "frames": []},  # the peak: 450
        {"action": "free_completed", "addr": 2, "size": 300},
        {"action": "free_completed", "addr": 99, "size": 7},  # allocated before the trace began
        {"action": "alloc", "addr": 4, "size": 200, "frames": [_frame(ours, 30)]},  # 350, below the peak
    ]
    peak, live = mp.live_at_peak(trace)
    assert peak == 450
    assert live == [(300, "function.py:20 _backward"), (100, "function.py:10 _backward"), (50, "")]
