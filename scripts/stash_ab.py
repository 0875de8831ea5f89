"""The fused backward's stash budget, A/B in one process: time and peak memory per budget.

``E2F_TRITON_STASH_BYTES`` is read at every backward, so budgets can alternate inside one
process on the same inputs and compiled kernels (run-to-run spread between processes is ~4 %
at N = 65,536, more than the effect of a budget)::

    PYTHONPATH=. python scripts/stash_ab.py --out stash-ab.jsonl --sizes 16384 65536 --budgets auto 6144

Paper sizes, fp32 inputs with TF32 gate products, padded value rows; per size, ``--repeats``
rounds over the budgets (``auto``: the library's default). Each point: ``do_bench`` median of
forward + backward, peak bytes allocated above what was allocated before it (per atom), the
number of target chunks, the forward alone (``do_bench`` median) and the backward kernels'
configurations (with the autotuner's timings of one chunk when it tuned, i.e. unless
``E2F_TRITON_AUTOTUNE=0``). One JSON line per point. The script imports only ``e2f`` and
``suites.core.memory``, so ``PYTHONPATH=<an older checkout>`` times that commit's kernels with
the same script.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
from fused_step import paper_step

from e2f.attention.triton.function import STASH_ENV, last_config
from suites.core.memory import peak_bytes_above_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--budgets", nargs="+", default=["auto", "6144"], help="bytes an atom, or auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with open(args.out, "a") as out:
        for n in args.sizes:
            step, forward = paper_step(n)
            for repeat in range(args.repeats):
                for budget in args.budgets:
                    os.environ[STASH_ENV] = "" if budget == "auto" else budget
                    step()  # autotuning (first round) and warm-up
                    ms = triton.testing.do_bench(step, warmup=300, rep=2000, return_mode="median")
                    peak = peak_bytes_above_inputs(step, device="cuda") / n
                    config = last_config()
                    record = {"gpu": torch.cuda.get_device_name(), "git_commit": os.environ.get("E2F_GIT_COMMIT"),
                              "n_atoms": n, "stash_bytes": budget, "repeat": repeat, "fwd_bwd_ms": ms,
                              "fwd_ms": triton.testing.do_bench(forward, warmup=100, rep=1000, return_mode="median"),
                              "peak_above_inputs_per_atom": peak, "chunks": config["backward_chunks"],
                              "config": {name: config.get(name) for name in ("bwd_target", "bwd_gate", "bwd_source")}}
                    print(json.dumps(record), flush=True)
                    out.write(json.dumps(record) + "\n")
                    out.flush()


if __name__ == "__main__":
    main()
