"""What is allocated at the peak of one fused forward + backward, and by which line.

The suites report one number, the peak bytes above the inputs; when it moves, this says which
tensors make it (CUDA only: PyTorch's allocator history with Python stacks)::

    PYTHONPATH=. python scripts/memory_peak.py --sizes 1024 16384 --out peak.jsonl

Paper sizes, fp32 inputs with TF32 gate products, padded value rows, one warm-up step
(autotuning, cuBLAS workspaces) before the traced one. Per size one JSON line: the peak above
what was allocated before the step (per atom), and the allocations live at that moment,
largest first, each with its size and the innermost frames of the repository that made it.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from fused_step import paper_step

from e2f.attention.triton.function import last_config


def _where(frames: list) -> str:
    """The innermost frames of this repository (or of whatever imported e2f) as file:line."""
    ours = [f for f in frames if "/e2f/" in f.get("filename", "") or "/scripts/" in f.get("filename", "")]
    return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f.get('name', '')}" for f in ours[:3])


def live_at_peak(trace: list) -> tuple[int, list]:
    """Replay one device's allocator trace: the peak of the bytes allocated during it and the
    allocations live then (size, where)."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, _where(event.get("frames", [])))
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]
    return peak, sorted(at_peak.values(), key=lambda x: -x[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    with open(args.out, "a") as out:
        for n in args.sizes:
            step, forward = paper_step(n)
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
            step()
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peak, live = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
            record = {"gpu": torch.cuda.get_device_name(), "git_commit": os.environ.get("E2F_GIT_COMMIT"),
                      "n_atoms": n, "peak_above_inputs_per_atom": (torch.cuda.max_memory_allocated() - before) / n,
                      "traced_peak_per_atom": peak / n, "chunks": last_config().get("backward_chunks"),
                      "live_at_peak": [{"bytes": size, "where": where} for size, where in live[:args.top]]}
            print(json.dumps(record, indent=1), flush=True)
            out.write(json.dumps(record) + "\n")
            out.flush()
            del step, forward  # their inputs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
