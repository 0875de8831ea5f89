"""How the force-training step of E2Former-V2 depends on the second order's block size.

With ``create_graph=True`` the fused backend's first-order gradients are differentiable: their
backward recomputes target blocks through the reference formula
(``e2f.attention.chunked.second_order_grads``). Each block costs a fixed number of launches
(thousands), so small blocks make the step launch-bound; large blocks hold more memory. One
JSON line per (N, setting): median step time over ``--steps`` steps after two warm-up steps,
peak allocated memory of one more step above what was allocated before it, and the targets per block;
``auto`` is the library's choice (``function.twin_plan``); E2Former v1 (the same function
through plain autograd) at the same N for scale::

    PYTHONPATH=. python scripts/twin_blocks.py --out twin-blocks.jsonl --sizes 1000 4000 --blocks 250 1000 auto
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from baselines.registry import default_config
from e2f.attention.triton import function
from suites.core.memory import peak_bytes_above_inputs
from suites.workloads import liquid_box, model_call


def _step_stats(name: str, batch, device, steps: int) -> dict:
    forward, module = model_call(name, default_config(), batch, "fwd+bwd", device=device)

    def step():
        energy, forces = forward()
        (energy.sum() + forces.square().sum()).backward()
        module.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = peak_bytes_above_inputs(step, device=device)
    del forward, module
    torch.cuda.empty_cache()
    return {"step_ms": statistics.median(times) * 1e3, "step_ms_all": [t * 1e3 for t in times], "peak_gib": peak / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000])
    ap.add_argument("--blocks", nargs="+", default=["auto"],
                    help="targets per second-order block (E2F_TRITON_TWIN_BLOCK), or 'auto'")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.set_float32_matmul_precision("high")  # the suites' fp32 (TF32 products)
    with open(args.out, "a") as out_file:
        for n in args.sizes:
            batch = liquid_box(n, device=device)
            for name, block in [("e2former-v1", None)] + [("e2former-v2", b) for b in args.blocks]:
                record = {"gpu": torch.cuda.get_device_name(), "git_commit": os.environ.get("E2F_GIT_COMMIT"),
                          "n_atoms": n, "model": name, "block": block}
                if block is not None:
                    os.environ[function.TWIN_BLOCK_ENV] = "" if block == "auto" else block
                try:
                    record.update(_step_stats(name, batch, device, args.steps))
                    if block is not None:
                        record["targets_per_block"] = function.last_config().get("twin_target_block")
                except torch.OutOfMemoryError as err:
                    record["error"] = f"out of memory: {str(err).splitlines()[0]}"
                    torch.cuda.empty_cache()
                print(json.dumps(record), flush=True)
                out_file.write(json.dumps(record) + "\n")
                out_file.flush()


if __name__ == "__main__":
    main()
