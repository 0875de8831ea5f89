"""Time the radial table's build: ``function.radial_table`` (one Triton kernel) against its
PyTorch twin (``function._radial_rows`` over the whole grid), paper sizes (R = 256, G = 128,
cutoff 5 Å), do_bench medians (ms) with the L2 flushed; prints one JSON line."""
from __future__ import annotations

import json

import torch
import triton

from e2f.attention.triton import function as F
from e2f.nn import rbf_centers_and_gamma


def main() -> None:
    centers, gamma = rbf_centers_and_gamma(5.0, 256)
    centers = centers.float().cuda()
    w = torch.randn(256, 128, device="cuda") / 16
    grid, h = F._radial_grid(gamma, 5.0, "cuda")
    kernel = lambda: F.radial_table(centers, w, gamma, 5.0)  # noqa: E731
    twin = lambda: F._radial_rows(grid, centers.double(), w.double(), gamma, h).float()  # noqa: E731
    table, _ = kernel()
    ref = twin()
    print(json.dumps({"device": torch.cuda.get_device_name(), "max_abs_diff": float((table - ref).abs().max()),
                      "scale": float(ref.abs().max()), "kernel_ms": triton.testing.do_bench(kernel, warmup=50, rep=300),
                      "twin_ms": triton.testing.do_bench(twin, warmup=50, rep=300)}))


if __name__ == "__main__":
    main()
