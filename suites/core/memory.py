"""Memory measurements: peak CUDA bytes above the inputs, bytes saved for backward, RSS.

- :func:`peak_bytes_above_inputs` (CUDA): ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before the call (the inputs, the
  parameters, and for the backward mode the graph built in ``setup``). Allocator bytes,
  not reserved/cached bytes. Returns None on the CPU, where no allocator keeps stats.
- :func:`saved_tensor_bytes` (any device): the bytes autograd keeps for backward while
  ``fn`` runs, collected with ``torch.autograd.graph.saved_tensors_hooks`` and
  deduplicated by storage (a tensor saved by five ops, or five views of one buffer,
  counts once, at its storage's size). This is what "linear activation memory" is about:
  an implementation that saves an ``[E, ...]`` tensor shows it here on the CPU too.
- :func:`rss_bytes` / :func:`peak_rss_delta`: process resident memory on the CPU (a
  sampled, coarse figure: other allocations of the process are included).
"""
from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def free_memory(device=None) -> None:
    """Collect garbage and return cached CUDA blocks (after an OOM, between points)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or _is_cuda(device)):
        torch.cuda.empty_cache()


def held_tensors(device, *, top: int = 4) -> tuple[int, list[str]]:
    """CUDA bytes of the live tensors ``gc`` can see on ``device``, and a line for each of the
    ``top`` largest naming the types of the objects that refer to it (what keeps it alive
    after a failed sweep point)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = [o for o in gc.get_objects() if isinstance(o, Tensor) and o.is_cuda and o.device.index == index]
    storages = {t.untyped_storage().data_ptr(): (t.untyped_storage().nbytes(), t) for t in found}
    largest = sorted(storages.values(), key=lambda item: -item[0])[:top]
    lines = []
    for nbytes, t in largest:
        holders = sorted({type(r).__name__ for r in gc.get_referrers(t) if r is not found})
        lines.append(f"{tuple(t.shape)} {t.dtype} {nbytes / 2**20:.0f} MiB held by {', '.join(holders) or '?'}")
    del found, largest
    return sum(nbytes for nbytes, _ in storages.values()), lines


def peak_bytes_above_inputs(fn: Callable[..., Any], *, device, setup: Callable[[], Any] | None = None) -> int | None:
    """Peak CUDA bytes allocated during ``fn`` above those allocated before it.

    ``fn`` is called as ``fn()``, or ``fn(setup())`` when ``setup`` is given (``setup``
    runs first and what it allocates, e.g. an autograd graph, counts as a baseline).
    The output of ``fn`` is dropped before returning. Returns None on a non-CUDA device.
    """
    if not _is_cuda(device):
        if setup is None:
            fn()
        else:
            fn(setup())
        return None
    device = torch.device(device)
    state = setup() if setup is not None else None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn() if setup is None else fn(state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out, state
    return max(0, int(peak - base))


@dataclass(frozen=True)
class SavedTensor:
    """One storage autograd saved for backward."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    nbytes: int  # the storage's size (what is kept alive), not the view's


def _storage_key(t: Tensor):
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())


def saved_tensors(fn: Callable[[], Any]) -> tuple[list[SavedTensor], Any]:
    """Run ``fn()`` and list the distinct storages autograd saved for backward.

    Returns ``(saved, output)``. Deduplicated by storage: the first tensor seen on a
    storage names it. Tensors are held until ``fn`` returns, so no storage address is
    reused during the call.
    """
    seen: dict[tuple, SavedTensor] = {}
    keep: list[Tensor] = []

    def pack(t: Tensor):
        if isinstance(t, Tensor) and t.layout == torch.strided and t.device.type != "meta":
            key = _storage_key(t)
            if key not in seen:
                seen[key] = SavedTensor(
                    shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."), device=str(t.device), nbytes=key[3]
                )
                keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    keep.clear()
    return list(seen.values()), out


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs, deduplicated by storage."""
    saved, out = saved_tensors(fn)
    del out
    return sum(s.nbytes for s in saved)


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_delta(fn: Callable[[], Any], *, interval_s: float = 0.001) -> int:
    """Largest RSS growth seen while ``fn()`` runs (sampled every ``interval_s``), in bytes.

    Coarse: it includes whatever else the process allocates, and allocator caching may
    hide reuse. Use it as a CPU-side sanity figure, never instead of CUDA peaks.
    """
    gc.collect()
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
        peak[0] = max(peak[0], rss_bytes())
    finally:
        done.set()
        thread.join()
    del out
    return max(0, peak[0] - base)
