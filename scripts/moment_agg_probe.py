"""Would the forward's aggregation be faster moving v_j (9 rows) instead of V_j = [b_j; v_j] (29 rows)?

The attention core gathers, per edge and head, the 58 numbers of ``V_j = [S_{r_j}(v_j); v_j]``
(29 rows x 2 channels; padded to 64) and runs at the L2's gather rate (perf-notes 21, 29, 35).
But the layer only needs ``m_i = sum_j w_ij v_j (x) R^1(r_i - r_j)`` (``e2f/attention/layer.py``),
and the product with R^1 is bilinear: with the displacement ``r_ij = r_i - r_j`` already in the
kernel's registers, the sum is the Clebsch-Gordan contraction, once per target, of the moments

    M_i[m, row, c] = sum_j w_ij[h(c)] r_ij[m] v_j[row, c]        (m = x, y, z; 9 rows; C channels)

so an edge needs the 18 numbers a head of ``v_j`` (and its position) instead of 58: 3.2x fewer
gathered bytes, for 54 accumulators a head instead of 58. This probe times the aggregation
alone, both forms from the same stashed softmax inputs (``logit``, ``coef``, ``env`` an edge, as
the split forward's logits kernel leaves them) with the same online softmax:

* ``lib,HB,warps``: the library's ``fwd_aggregate_kernel`` on padded 29-row values;
* ``moment,HB,warps``: the moments of 9-row values ``x [M, 9, C]`` (head h owns channels h and
  h + H, as ``rows_to_heads``), with the displacement from the positions.

Each is checked against a float64 PyTorch sum on sampled targets. Paper sizes, the suites'
random workload (non-periodic)::

    PYTHONPATH=. python scripts/moment_agg_probe.py --out moment-agg.jsonl --sizes 65536 --dtype float32
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from agg_order_probe import probe_args, write_record
from e2f.attention.core import padded_head_stride
from e2f.attention.triton import kernels as K
from e2f.attention.workload import random_core_inputs

ROWS = 9  # (L + 1)^2 for L = 2


@triton.jit(do_not_specialize=["T0"])
def moment_aggregate_kernel(nbr, pos_dst, pos_src, x, logit_edge, coef_edge, env_edge, out, m_out, s_out,
                            T0, K, H, C, eps, HB: tl.constexpr):
    # target T0 + program id 0, heads program id 1 * HB .. and their two channels h, h + H;
    # rows 0..7 of both channels as one [16, HB] tile (lane = 2 row + channel half), row 8 apart
    i = T0 + tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * HB + tl.arange(0, HB)
    hm = hh < H
    lane = tl.arange(0, 16)
    main = ((lane // 2) * C + (lane % 2) * H)[:, None] + hh[None, :]
    last = (8 * C + tl.arange(0, 2) * H)[:, None] + hh[None, :]
    px = tl.load(pos_dst + i * 3)
    py = tl.load(pos_dst + i * 3 + 1)
    pz = tl.load(pos_dst + i * 3 + 2)
    mx = tl.zeros([HB], dtype=tl.float32)
    s = tl.zeros([HB], dtype=tl.float32) + eps
    ax = tl.zeros([16, HB], dtype=tl.float32)
    ay = tl.zeros([16, HB], dtype=tl.float32)
    az = tl.zeros([16, HB], dtype=tl.float32)
    bx = tl.zeros([2, HB], dtype=tl.float32)
    by = tl.zeros([2, HB], dtype=tl.float32)
    bz = tl.zeros([2, HB], dtype=tl.float32)
    for slot in range(K):
        row = (i - T0) * K + slot
        lg = tl.load(logit_edge + row * H + hh, mask=hm, other=float("-inf"))
        c = tl.load(coef_edge + row * H + hh, mask=hm, other=0.0)
        env = tl.load(env_edge + row)
        # an empty slot reads source 0: its weight is exactly 0 (logit -inf)
        j = tl.load(nbr + i * K + slot)
        j = tl.where(j >= 0, j, 0).to(tl.int64)
        rx = px - tl.load(pos_src + j * 3)
        ry = py - tl.load(pos_src + j * 3 + 1)
        rz = pz - tl.load(pos_src + j * 3 + 2)
        xm = tl.load(x + j * (9 * C) + main, mask=hm[None, :], other=0.0).to(tl.float32)
        xl = tl.load(x + j * (9 * C) + last, mask=hm[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(mx, lg)
        scale = tl.exp(mx - m_new)
        p = env * tl.exp(lg - m_new)
        s = s * scale + p
        w = (p * c)[None, :]
        sc = scale[None, :]
        ax = ax * sc + (w * rx) * xm
        ay = ay * sc + (w * ry) * xm
        az = az * sc + (w * rz) * xm
        bx = bx * sc + (w * rx) * xl
        by = by * sc + (w * ry) * xl
        bz = bz * sc + (w * rz) * xl
        mx = m_new
    stat = i * H + hh
    tl.store(m_out + stat, mx, mask=hm)
    tl.store(s_out + stat, s, mask=hm)
    inv = (1.0 / s)[None, :]
    o = out + i * (3 * 9 * C)
    tl.store(o + main, ax * inv, mask=hm[None, :])
    tl.store(o + 9 * C + main, ay * inv, mask=hm[None, :])
    tl.store(o + 18 * C + main, az * inv, mask=hm[None, :])
    tl.store(o + last, bx * inv, mask=hm[None, :])
    tl.store(o + 9 * C + last, by * inv, mask=hm[None, :])
    tl.store(o + 18 * C + last, bz * inv, mask=hm[None, :])


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
    args = probe_args(__doc__.splitlines()[0], ["lib,32,1", "lib,64,2", "moment,32,1", "moment,64,1",
                                                 "moment,64,2", "moment,128,2", "moment,128,4", "moment,16,1"], "FORM,HB,num_warps")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    with open(args.out, "a") as out_file:
        for n in args.sizes:
            inp = random_core_inputs(n, max_neighbors=32, device=dev, value_head_stride=64, dtype=dtype)
            nbr, v, heads = inp.nbr, inp.v, inp.num_heads
            kslots, dv = nbr.shape[1], v.shape[2]
            channels = 2 * heads
            gen = torch.Generator(device=dev).manual_seed(1)
            logit, coef, env = stash(nbr, heads, gen)
            x = torch.randn(inp.pos_src.shape[0], ROWS, channels, device=dev, generator=gen).to(dtype)
            rows = torch.randperm(n, device=dev, generator=gen)[:256]
            src = nbr[rows].clamp_min(0)
            w = weights(nbr, logit, coef, env, inp.eps, rows)
            ref_lib = torch.einsum("rkh,rkhd->rhd", w, v[src].double())
            disp = (inp.pos_dst[rows, None] - inp.pos_src[src]).double()
            ref_moment = torch.einsum("rkc,rkm,rkqc->rmqc", torch.cat([w, w], -1), disp, x[src].double())
            edges = float((nbr >= 0).sum())
            for text in args.variants:
                form, hb, warps = text.split(",")
                hb, warps = int(hb), int(warps)
                m_out = torch.empty(n, heads, device=dev)
                s_out = torch.empty(n, heads, device=dev)
                if form == "lib":
                    out = torch.empty(n, heads, dv, device=dev)
                    gathered = edges * heads * padded_head_stride(v) * v.element_size()

                    def run():
                        K.fwd_aggregate_kernel[(n, triton.cdiv(heads, hb))](
                            nbr, v, logit, coef, env, out, m_out, s_out, 0, kslots, heads, inp.eps,
                            DV=dv, DVP=triton.next_power_of_2(dv), VS=padded_head_stride(v) or 0, HB=hb,
                            num_warps=warps)
                    ref = ref_lib
                else:
                    out = torch.empty(n, 3, ROWS, channels, device=dev)
                    gathered = edges * (ROWS * channels * x.element_size() + 12)

                    def run():
                        moment_aggregate_kernel[(n, triton.cdiv(heads, hb))](
                            nbr, inp.pos_dst, inp.pos_src, x, logit, coef, env, out, m_out, s_out, 0, kslots,
                            heads, channels, inp.eps, HB=hb, num_warps=warps)
                    ref = ref_moment
                run()
                err = float((out[rows].double() - ref).norm() / ref.norm())
                ms = (triton.testing.do_bench(run, warmup=50, rep=args.rep, return_mode="median")
                      if dev == "cuda" else None)
                write_record(out_file, {"probe": "moment-aggregation", "n_atoms": n, "dtype": args.dtype,
                                        "form": form, "heads_per_program": hb, "num_warps": warps, "ms": ms,
                                        "gathered_GB": gathered / 1e9,
                                        "gather_TBps": gathered / ms / 1e9 if ms else None, "rel_err": err})


if __name__ == "__main__":
    main()
