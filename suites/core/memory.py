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
import inspect
import os
import sys
import threading
import time
import types
import warnings
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


def _describe(obj) -> str:
    if inspect.isframe(obj):
        return f"frame {obj.f_code.co_name} ({os.path.basename(obj.f_code.co_filename)}:{obj.f_lineno})"
    if isinstance(obj, types.TracebackType):
        return "traceback"
    if isinstance(obj, BaseException):
        return f"exception {type(obj).__name__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{type(obj).__name__} {obj.__qualname__}"
    return type(obj).__name__


def holder_chain(obj, ignore: set | None = None, depth: int = 6) -> str:
    """The first chain of objects that keep ``obj`` alive, nearest first, e.g.
    ``frame backward (function.py:412) <- traceback <- exception OutOfMemoryError``."""
    ignore = set(ignore or ()) | {id(sys._getframe())}
    chain = []
    for _ in range(depth):
        referrers = gc.get_referrers(obj)
        ignore.add(id(referrers))
        nxt = next((r for r in referrers if id(r) not in ignore), None)
        del referrers  # no list of ours may hold the next object when its referrers are asked
        if nxt is None:
            break
        ignore.add(id(obj))
        obj = nxt
        chain.append(_describe(obj))
    return " <- ".join(chain) or "?"


def held_tensors(device, *, top: int = 3) -> tuple[int, list[str]]:
    """CUDA bytes of the live tensors ``gc`` can see on ``device``, and a line for each of the
    ``top`` largest with the chain of objects that keeps it alive (what holds memory after a
    failed sweep point)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with warnings.catch_warnings():  # isinstance() on every object touches deprecated torch aliases
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if isinstance(o, Tensor) and o.is_cuda and o.device.index == index]
    storages = {t.untyped_storage().data_ptr(): (t.untyped_storage().nbytes(), t) for t in found}
    largest = sorted(storages.values(), key=lambda item: -item[0])[:top]
    ignore = {id(found), id(storages), id(largest), id(sys._getframe())}
    lines = [f"{tuple(t.shape)} {t.dtype} {nbytes / 2**20:.0f} MiB held by {holder_chain(t, ignore)}"
             for nbytes, t in largest]
    total = sum(nbytes for nbytes, _ in storages.values())
    del found, largest, storages
    return total, lines


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
