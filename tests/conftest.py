"""Shared test setup and fixtures.

On a machine without CUDA the Triton kernels run in Triton's interpreter: the variable
must be set before any test module (or anything it imports) imports a kernel, which is
why it is set here, before collection, and not in the kernel tests themselves.

``fresh_suite_registry``: tests that register throw-away suites get the registry back
as it was afterwards, so a fake suite never leaks into ``--list`` of another test.
``one_thread``: one intra-op thread for a module of tiny models or measurements (on a
shared 2-core box OpenMP spin-waiting of two threads makes them 10-20x slower).
``no_triton_interpreter``: Triton as it is on a CPU machine (unavailable, recorded as
skipped) for suite tests, instead of minutes in the interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fresh_suite_registry():
    from suites.core import runner

    runner.suite_names()  # discover the real suites first, so the snapshot holds them
    saved = dict(runner._SUITES)
    yield runner
    runner._SUITES.clear()
    runner._SUITES.update(saved)


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
