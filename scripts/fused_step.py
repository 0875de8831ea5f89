"""One fused forward + backward of the attention core at the paper sizes, for the GPU tools.

``stash_ab.py`` and ``memory_peak.py`` time or trace the same step: fp32 inputs with TF32
gate products (the suites' setting, set here), padded value rows, K = 32, a random ``dout``.
"""
from __future__ import annotations

import torch

from e2f.attention.triton.function import fused_attention_core
from e2f.attention.workload import random_core_inputs


def paper_step(n_atoms: int):
    """``(step, forward)`` closures over fresh inputs of ``n_atoms`` atoms on the GPU: ``step``
    runs forward and backward (gradients of every float input), ``forward`` the forward alone
    without autograd."""
    torch.set_float32_matmul_precision("high")
    inp = random_core_inputs(n_atoms, max_neighbors=32, device="cuda", requires_grad=True, value_head_stride=64)
    leaves = [x for x in inp.tensors().values() if x.dtype.is_floating_point]
    dout = torch.randn(n_atoms, inp.q.shape[1], inp.v.shape[-1], device="cuda")

    def step():
        torch.autograd.grad(fused_attention_core(inp), leaves, dout)

    def forward():
        with torch.no_grad():
            fused_attention_core(inp)

    return step, forward
