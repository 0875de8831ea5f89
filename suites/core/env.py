"""The environment record stored with every result.

:func:`environment` never raises: a missing GPU, driver or library is recorded as such
(``None`` values plus a ``*_error`` string saying why), so a record made on a CPU-only
machine has the same keys as one made on an H100.

Keys (see README "Results schema"): ``gpu_name``, ``gpu_count``, ``gpu_names``,
``driver``, ``gpu_memory_bytes``, ``sm_clock_mhz``, ``mem_clock_mhz`` (current),
``max_sm_clock_mhz``, ``max_mem_clock_mhz``, ``power_limit_w``, ``nvml_error``,
``device``, ``cpu``, ``cpu_count``, ``python``, ``platform``, ``torch``,
``torch_threads``, ``triton``,
``cuda``, ``cudnn``, ``e3nn``, ``fairchem``, ``vesin``, ``numpy``, ``e2f``,
``git_commit``, ``git_dirty``, ``command``.
"""
from __future__ import annotations

import functools
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

ENV_KEYS = (
    "gpu_name", "gpu_count", "gpu_names", "driver", "gpu_memory_bytes", "sm_clock_mhz", "mem_clock_mhz",
    "max_sm_clock_mhz", "max_mem_clock_mhz", "power_limit_w", "nvml_error", "device", "cpu", "cpu_count",
    "python", "platform", "torch", "torch_threads", "triton", "cuda", "cudnn", "e3nn", "fairchem", "vesin", "numpy", "e2f",
    "git_commit", "git_dirty", "command",
)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_info(index: int = 0) -> dict:
    """GPU facts from pynvml for device ``index``; on any failure the keys are None and
    ``nvml_error`` says why (no library, no driver, no GPU)."""
    info = {
        "gpu_name": None, "gpu_count": 0, "gpu_names": [], "driver": None, "gpu_memory_bytes": None,
        "sm_clock_mhz": None, "mem_clock_mhz": None, "max_sm_clock_mhz": None, "max_mem_clock_mhz": None,
        "power_limit_w": None, "nvml_error": None,
    }
    try:
        import pynvml
    except ImportError as exc:
        info["nvml_error"] = f"pynvml not installed: {exc}"
        return info
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError: no driver / no GPU
        info["nvml_error"] = f"NVML unavailable: {exc}"
        return info
    try:
        count = pynvml.nvmlDeviceGetCount()
        info["gpu_count"] = count
        info["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        info["gpu_names"] = [_text(pynvml.nvmlDeviceGetName(h)) for h in handles]
        if count == 0:
            info["nvml_error"] = "NVML reports no GPU"
            return info
        h = handles[min(index, count - 1)]
        info["gpu_name"] = info["gpu_names"][min(index, count - 1)]
        probes = {
            "gpu_memory_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "max_mem_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
        }
        failures = []
        for key, probe in probes.items():
            try:
                info[key] = probe()
            except Exception as exc:  # some queries are unsupported on some boards / in VMs
                failures.append(f"{key}: {exc}")
        if failures:
            info["nvml_error"] = "; ".join(failures)
    except Exception as exc:
        info["nvml_error"] = f"NVML query failed: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return info


def cpu_model() -> str:
    """CPU model name (from /proc/cpuinfo on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


#: Names the commit when the checkout's git metadata does not (a copied working tree whose
#: ``.git`` is older than its files, as on the lent GPU machines); ``git_dirty`` is then None.
GIT_COMMIT_ENV = "E2F_GIT_COMMIT"


def git_state(root: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout at ``root``; ``(None, None)`` outside git;
    ``(E2F_GIT_COMMIT, None)`` when that variable is set."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV], None

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


@functools.lru_cache(maxsize=None)
def _static_environment(gpu_index: int) -> tuple:
    env = gpu_info(gpu_index)
    commit, dirty = git_state()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env.update(
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        triton=_version("triton"),
        cuda=torch.version.cuda,
        cudnn=cudnn,
        e3nn=_version("e3nn"),
        fairchem=_version("fairchem-core"),
        vesin=_version("vesin"),
        numpy=_version("numpy"),
        e2f=_version("e2f"),
        git_commit=commit,
        git_dirty=dirty,
    )
    return tuple(env.items())


def environment(device=None) -> dict:
    """The environment record (a fresh dict; GPU and git facts are cached per process).

    ``device`` is the device the suite measures on ("cpu", "cuda", "cuda:1"); its index
    picks the GPU whose name and clocks are recorded.
    """
    dev = torch.device(device) if device is not None else None
    index = dev.index or 0 if dev is not None and dev.type == "cuda" else 0
    env = dict(_static_environment(index))
    env["gpu_names"] = list(env["gpu_names"])
    env["device"] = str(dev) if dev is not None else None
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    env["command"] = shlex.join(argv)
    return env
