"""Would the forward's aggregation be faster moving v_j (9 rows) instead of V_j = [b_j; v_j] (29 rows)?

The attention core gathers, per edge and head, the 58 numbers of ``V_j = [S_{r_j}(v_j); v_j]``
(29 rows x 2 channels; padded to 64) and runs at the L2's gather rate (perf-notes 21, 29, 35).
But the layer only needs ``m_i = sum_j w_ij v_j (x) R^1(r_i - r_j)`` (``e2f/attention/layer.py``),
and the product with R^1 is bilinear: with the displacement ``r_ij = r_i - r_j`` in the kernel's
registers, the sum is the Clebsch-Gordan contraction, once per target, of the moments

    M_i[a, h, :] = sum_j w_ij[h] r_ij[a] v_j[h, :]        (a = x, y, z; 18 numbers a head)

(``CoreInputs.moments``): an edge needs the 18 numbers a head of ``v_j`` and its position instead
of 58, 3.2x fewer gathered bytes, for 54 sums a head instead of 58. This probe times the
aggregation alone, both forms from the same stashed softmax inputs (``logit``, ``coef``, ``env``
an edge, as the split forward's logits kernel leaves them):

* ``lib,HB,warps``: the library's ``fwd_aggregate_kernel`` on padded 29-row values;
* ``moment,HB,warps``: the library's ``fwd_moment_kernel`` on 18-number head rows padded to 20
  (``value_head_stride(18, moments=True)``), the displacement from the positions.

Each is checked against a float64 PyTorch sum on sampled targets. Session 23's call 1 (2af0edc,
perf-notes 36) ran this probe's first form, a kernel of its own over ``[M, 9, C]`` rows (3.55 ms
against 8.61 at 65,536, fp32); the library's kernel came from it. Paper sizes, the suites'
random workload (non-periodic)::

    PYTHONPATH=. python scripts/moment_agg_probe.py --out moment-agg.jsonl --sizes 65536 --dtype float32
"""
from __future__ import annotations

import torch
import triton

from agg_order_probe import probe_args, write_record
from e2f.attention.core import padded_head_stride, value_head_stride
from e2f.attention.triton import kernels as K
from e2f.attention.triton.function import MOMENT_HEADS, _moment_split
from e2f.attention.workload import random_core_inputs

MOMENT_DV = 18  # 9 rows x C / H = 2


def stash(nbr: torch.Tensor, heads: int, gen: torch.Generator):
    """Random per-edge softmax inputs as the logits kernel leaves them: ``logit [N K, H]``
    (``-inf`` at empty slots), ``coef [N K, H]`` (``u / d``) and ``env [N K]``."""
    n, k = nbr.shape
    dev = nbr.device
    logit = torch.randn(n * k, heads, device=dev, generator=gen)
    logit[(nbr.reshape(-1) < 0)] = float("-inf")
    coef = 0.5 + torch.rand(n * k, heads, device=dev, generator=gen)
    env = torch.rand(n * k, device=dev, generator=gen)
    return logit, coef, env


def weights(nbr, logit, coef, env, eps, rows):
    """float64 ``w [r, K, H]`` of the targets ``rows`` (the sink: logit 0, weight eps)."""
    k = nbr.shape[1]
    lg = logit.reshape(nbr.shape[0], k, -1)[rows].double()
    top = lg.amax(dim=1, keepdim=True).clamp_min(0.0)
    e = env.reshape(-1, k)[rows].double()[..., None] * torch.exp(lg - top)
    return coef.reshape(nbr.shape[0], k, -1)[rows].double() * e / (eps * torch.exp(-top) + e.sum(1, keepdim=True))


def main() -> None:
    args = probe_args(__doc__.splitlines()[0], ["lib,32,1", "lib,64,2", f"moment,{MOMENT_HEADS},1", "moment,64,2",
                                                 "moment,16,1"], "FORM,HB,num_warps")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    with open(args.out, "a") as out_file:
        for n in args.sizes:
            rows_inp = random_core_inputs(n, max_neighbors=32, device=dev, value_head_stride=64, dtype=dtype)
            moment_inp = random_core_inputs(n, max_neighbors=32, device=dev, dtype=dtype, dv=MOMENT_DV,
                                            value_head_stride=value_head_stride(MOMENT_DV, moments=True))
            nbr, heads = rows_inp.nbr, rows_inp.num_heads
            kslots = nbr.shape[1]
            gen = torch.Generator(device=dev).manual_seed(1)
            logit, coef, env = stash(nbr, heads, gen)
            rows = torch.randperm(n, device=dev, generator=gen)[:256]
            src = nbr[rows].clamp_min(0)
            w = weights(nbr, logit, coef, env, rows_inp.eps, rows)
            disp = (moment_inp.pos_dst[rows, None] - moment_inp.pos_src[src]).double()
            refs = {"lib": torch.einsum("rkh,rkhd->rhd", w, rows_inp.v[src].double()),
                    "moment": torch.einsum("rkh,rka,rkhd->rhad", w, disp, moment_inp.v[src].double()).flatten(2)}
            edges = float((nbr >= 0).sum())
            for text in args.variants:
                form, hb, warps = text.split(",")
                hb, warps = int(hb), int(warps)
                m_out = torch.empty(n, heads, device=dev)
                s_out = torch.empty(n, heads, device=dev)
                v = rows_inp.v if form == "lib" else moment_inp.v
                dv, vs = v.shape[-1], padded_head_stride(v) or 0
                gathered = edges * heads * (vs or dv) * v.element_size()
                if form == "lib":
                    out = torch.empty(n, heads, dv, device=dev)

                    def run():
                        K.fwd_aggregate_kernel[(n, triton.cdiv(heads, hb))](
                            nbr, v, logit, coef, env, out, m_out, s_out, 0, kslots, heads, rows_inp.eps,
                            DV=dv, DVP=triton.next_power_of_2(dv), VS=vs, HB=hb, num_warps=warps)
                else:
                    out = torch.empty(n, heads, 3 * dv, device=dev)
                    gathered += edges * 12  # the source's position
                    tiles = {**_moment_split({"DV": dv, "H": heads}), "HB": hb}

                    def run():
                        K.fwd_moment_kernel[(n, triton.cdiv(heads, hb))](
                            nbr, moment_inp.pos_dst, moment_inp.pos_src, v, logit, coef, env, out, m_out, s_out, 0,
                            kslots, heads, moment_inp.eps, DV=dv, VS=vs, num_warps=warps, **tiles)
                run()
                ref = refs[form]
                err = float((out[rows].double() - ref).norm() / ref.norm())
                ms = (triton.testing.do_bench(run, warmup=50, rep=args.rep, return_mode="median")
                      if dev == "cuda" else None)
                write_record(out_file, {"probe": "moment-aggregation", "n_atoms": n, "dtype": args.dtype,
                                        "form": form, "heads_per_program": hb, "num_warps": warps, "ms": ms,
                                        "gathered_GB": gathered / 1e9,
                                        "gather_TBps": gathered / ms / 1e9 if ms else None, "rel_err": err})


if __name__ == "__main__":
    main()
