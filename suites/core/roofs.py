"""Peak throughput roofs per GPU, so every TFLOPS figure can be shown as a fraction.

Figures are NVIDIA's datasheet numbers at boost clock, **dense** (the datasheets quote
tensor-core figures "with sparsity"; those are halved here). TFLOP/s per dtype:

- ``fp64``: FP64 on CUDA cores; ``fp64_tc``: FP64 tensor cores (DGEMM);
- ``fp32``: FP32 on CUDA cores (no tensor cores: what a plain fp32 kernel can reach);
- ``tf32``: TF32 tensor cores (fp32 inputs, ``allow_tf32`` / Triton ``tl.dot`` default);
- ``bf16``, ``fp16``: tensor cores with fp32 accumulation; ``fp8``: FP8 tensor cores.

``hbm_gbps`` is the memory bandwidth in GB/s (1e9 bytes/s). A card is found from the name
pynvml (or ``torch.cuda.get_device_name``) reports; an unknown card gives None.

Sources: NVIDIA H100 datasheet (SXM5 / PCIe / NVL), H200 datasheet (SXM / NVL),
A100 datasheet (40/80 GB, SXM4 / PCIe), L40S datasheet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Roof:
    """Peak dense throughput of one GPU model."""

    name: str
    tflops: dict[str, float] = field(hash=False)
    hbm_gbps: float
    memory_gib: float

    def peak_tflops(self, dtype) -> float | None:
        """The dense peak for ``dtype`` (see :func:`roof_dtype`), or None if not listed."""
        key = roof_dtype(dtype)
        if key == "fp64" and "fp64_tc" in self.tflops:
            key = "fp64_tc"
        return self.tflops.get(key)


_HOPPER_SXM = {"fp64": 34.0, "fp64_tc": 67.0, "fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979.0}
_HOPPER_NVL = {"fp64": 30.0, "fp64_tc": 60.0, "fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}
_H100_PCIE = {"fp64": 25.6, "fp64_tc": 51.2, "fp32": 51.2, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5, "fp8": 1513.0}
_A100 = {"fp64": 9.7, "fp64_tc": 19.5, "fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}
_L40S = {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0}

ROOFS: dict[str, Roof] = {
    r.name: r
    for r in (
        Roof("H100 SXM", _HOPPER_SXM, 3350.0, 80),
        Roof("H100 PCIe", _H100_PCIE, 2000.0, 80),
        Roof("H100 NVL", _HOPPER_NVL, 3900.0, 94),
        Roof("H200 SXM", _HOPPER_SXM, 4800.0, 141),
        Roof("H200 NVL", _HOPPER_NVL, 4800.0, 141),
        Roof("A100 SXM 40GB", _A100, 1555.0, 40),
        Roof("A100 SXM 80GB", _A100, 2039.0, 80),
        Roof("A100 PCIe 40GB", _A100, 1555.0, 40),
        Roof("A100 PCIe 80GB", _A100, 1935.0, 80),
        Roof("L40S", _L40S, 864.0, 48),
    )
}

# (pattern on the lower-cased device name, roof). First match wins, so the specific
# variants come before the generic name. "\b" keeps "GH200" from matching "H200".
_RULES: list[tuple[str, str]] = [
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b", "H100 SXM"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200 SXM"),
    (r"\ba100\b.*80\s*gb.*\bpcie\b|\ba100\b.*\bpcie\b.*80\s*gb", "A100 PCIe 80GB"),
    (r"\ba100\b.*\bpcie\b", "A100 PCIe 40GB"),
    (r"\ba100\b.*80\s*gb", "A100 SXM 80GB"),
    (r"\ba100\b", "A100 SXM 40GB"),
    (r"\bl40s\b", "L40S"),
]

_DTYPE_KEYS = {
    "float64": "fp64", "fp64": "fp64", "double": "fp64",
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
    "tf32": "tf32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "fp16": "fp16", "half": "fp16",
    "fp8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
    "fp64_tc": "fp64_tc",
}


def roof_dtype(dtype) -> str:
    """Roof key of a dtype: a ``torch.dtype`` or a name ('float32', 'bf16', 'tf32', ...)."""
    name = str(dtype).removeprefix("torch.").lower() if isinstance(dtype, torch.dtype) else str(dtype).lower()
    try:
        return _DTYPE_KEYS[name]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} for a roof; known: {', '.join(sorted(_DTYPE_KEYS))}") from None


def roof_for(gpu_name: str | None) -> Roof | None:
    """The roof of the GPU called ``gpu_name`` (pynvml's name string), or None if unknown."""
    if not gpu_name:
        return None
    name = gpu_name.lower().replace("-", " ").replace("_", " ")
    for pattern, roof_name in _RULES:
        if re.search(pattern, name):
            return ROOFS[roof_name]
    return None


def roof_fraction(tflops: float | None, gpu_name: str | None, dtype) -> float | None:
    """``tflops`` as a fraction of the card's dense peak for ``dtype``; None if unknown."""
    roof = roof_for(gpu_name)
    if roof is None or tflops is None:
        return None
    peak = roof.peak_tflops(dtype)
    return tflops / peak if peak else None


def bandwidth_fraction(gbps: float | None, gpu_name: str | None) -> float | None:
    """``gbps`` as a fraction of the card's HBM bandwidth; None if unknown."""
    roof = roof_for(gpu_name)
    if roof is None or gbps is None:
        return None
    return gbps / roof.hbm_gbps
