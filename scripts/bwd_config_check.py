"""Every backward-kernel configuration of the fused core, one process each, against ``chunked``.

An illegal memory access poisons the CUDA context for the rest of a process, so each
(neighbour cap K, configurations of the five backward kernels, MMA v3 allowed or not) runs in
a child process; the parent records what each one did::

    PYTHONPATH=. python scripts/bwd_config_check.py --out $OUT [--k 32 64] [--n 2048] [--roles gate source]

Each child runs the forward (first configuration) and the backward with exactly one
configuration of each backward kernel from ``e2f.attention.triton.function._bwd_candidates``:
every candidate of each role in ``--roles`` (default: all) with the first of the others; as
the last case of each K, the library's own autotuned choice (the first call tunes). On the paper
sizes (padded value rows; IEEE fp32 products, or TF32 with ``--tf32``: the two compile to
different kernels, only TF32 ones use tensor cores) it compares ``out`` and every gradient with
the ``chunked`` backend. ``--no-mma-v3`` adds a child of the first configurations with
``DISABLE_MMA_V3=1`` (Triton then lowers every ``tl.dot`` to ``mma.sync``, never ``wgmma``).
One JSON line per child in ``<out>/bwd-config-check.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from e2f.attention.triton.function import _BACKWARD, _bwd_candidates

ROLES = tuple(_BACKWARD)  # edge, value, target passes, gate backward, source pass


def child(k: int, n: int, indices: list, tf32: int) -> dict:
    import torch
    import triton

    from e2f.attention.chunked import chunked_attention_core
    from e2f.attention.triton import function as F
    from e2f.attention.triton import kernels as K
    from e2f.attention.workload import random_core_inputs

    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if min(indices) >= 0:  # one configuration each; otherwise the library's autotuned kernels
        candidates = F._bwd_candidates(F._pow2(k, 16))
        chosen = {role: F.backward_role(role, [candidates[role][index]]) for role, index in zip(ROLES, indices)}
        chosen["fwd"] = F._autotuned(K.fwd_kernel, F._fwd_candidates()[:1])
        F._configs = lambda bucket=0, bk=16, fp32=True: chosen
    inp = random_core_inputs(n, max_neighbors=k, device="cuda", requires_grad=True, value_head_stride=64)
    names = [name for name, x in inp.tensors().items() if x.dtype.is_floating_point]
    leaves = [inp.tensors()[name] for name in names]
    out = F.fused_attention_core(inp)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    torch.cuda.synchronize()
    ref = chunked_attention_core(inp)
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    errors = {"out": rel(out, ref), **{name: rel(a, b) for name, a, b in zip(names, grads, ref_grads)}}
    configs = {name: cfg for name, cfg in F.last_config().items() if name != "precision"}
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "max_rel": max(errors.values()), "rel": errors, "configs": configs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--k", type=int, nargs="*", default=[32, 64])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--no-mma-v3", action="store_true", help="also run the default pair with DISABLE_MMA_V3=1")
    ap.add_argument("--tf32", action="store_true", help="TF32 gate products (the library's GPU default)")
    ap.add_argument("--roles", nargs="*", choices=ROLES, default=list(ROLES),
                    help="kernels whose every candidate gets a child (the others: first candidate)")
    ap.add_argument("--child", nargs=3 + len(ROLES), type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        k, n, *indices, tf32 = args.child
        print("RESULT " + json.dumps(child(k, n, indices, tf32)), flush=True)
        return
    from suites.core.env import git_state

    counts = {role: len(c) for role, c in _bwd_candidates(32).items()}  # as many for every slot tile
    first = [0] * len(ROLES)
    cases = [(first, False)]
    for r, role in enumerate(ROLES):
        if role in args.roles:
            cases += [(first[:r] + [i] + first[r + 1:], False) for i in range(1, counts[role])]
    cases += [(first, True)] if args.no_mma_v3 else []
    cases += [([-1] * len(ROLES), False)]
    commit, dirty = git_state()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bwd-config-check.jsonl")
    for k in args.k:
        for indices, no_v3 in cases:
            env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1", **({"DISABLE_MMA_V3": "1"} if no_v3 else {})}
            start = time.time()
            argv = [sys.executable, __file__, "--child", str(k), str(args.n), *map(str, indices), str(int(args.tf32))]
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
            found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            record = {"k": k, "n": args.n, **{f"{role}_index": i for role, i in zip(ROLES, indices)},
                      "disable_mma_v3": no_v3,
                      "tf32": args.tf32, "git_commit": commit, "git_dirty": dirty, "date": time.strftime("%Y-%m-%d"),
                      "returncode": proc.returncode, "seconds": round(time.time() - start, 1)}
            if found:
                record.update(json.loads(found[0]))
            else:
                record["error"] = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
                record["illegal_address"] = "illegal memory access" in proc.stderr
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"K={k} {dict(zip(ROLES, indices))} no_mma_v3={no_v3}: rc={proc.returncode} "
                  f"max_rel={record.get('max_rel')} error={record.get('error')}", flush=True)


if __name__ == "__main__":
    main()
