"""suites.core.roofs: lookup by pynvml name, dense figures, fractions, unknown cards."""
import pytest
import torch

from suites.core import roofs

NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA A100-SXM4-40GB": "A100 SXM 40GB",
    "NVIDIA A100-SXM4-80GB": "A100 SXM 80GB",
    "NVIDIA A100-PCIE-40GB": "A100 PCIe 40GB",
    "NVIDIA A100 80GB PCIe": "A100 PCIe 80GB",
    "NVIDIA L40S": "L40S",
}


@pytest.mark.parametrize("gpu,roof", NAMES.items())
def test_lookup_by_nvml_name(gpu, roof):
    assert roofs.roof_for(gpu).name == roof


@pytest.mark.parametrize("gpu", [None, "", "Tesla V100-SXM2-16GB", "NVIDIA GH200 480GB", "cpu"])
def test_unknown_cards_give_none(gpu):
    assert roofs.roof_for(gpu) is None
    assert roofs.roof_fraction(100.0, gpu, "bf16") is None
    assert roofs.bandwidth_fraction(1000.0, gpu) is None


def test_dense_not_sparse_figures():
    h100 = roofs.roof_for("NVIDIA H100 80GB HBM3")
    assert h100.peak_tflops(torch.bfloat16) == pytest.approx(989.5)  # 1979 is the sparse figure
    assert h100.peak_tflops("tf32") == pytest.approx(494.5)
    assert h100.peak_tflops("float32") == pytest.approx(67.0)  # CUDA cores, no tensor cores
    assert h100.peak_tflops("float64") == pytest.approx(67.0)  # FP64 tensor cores
    assert roofs.roof_for("NVIDIA H200").hbm_gbps > h100.hbm_gbps
    a100 = roofs.roof_for("NVIDIA A100-SXM4-80GB")
    assert a100.peak_tflops("fp16") == 312.0 and a100.peak_tflops("fp8") is None
    for roof in roofs.ROOFS.values():
        assert roof.tflops["bf16"] > roof.tflops["tf32"] > roof.tflops["fp32"] > 0


def test_fractions():
    assert roofs.roof_fraction(494.75, "NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(0.5)
    assert roofs.bandwidth_fraction(1675.0, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    assert roofs.roof_fraction(None, "NVIDIA H100 80GB HBM3", "bf16") is None
    with pytest.raises(ValueError, match="known"):
        roofs.roof_fraction(1.0, "NVIDIA H100 80GB HBM3", "int3")
