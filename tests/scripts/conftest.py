"""Loading the GPU tools in ``scripts/`` (not a package) for their CPU-testable parts."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_module(name: str):
    """The module ``scripts/<name>.py``, its sibling scripts importable while it loads."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


@pytest.fixture(scope="session")
def load_script():
    """``load_script(name)``: ``load_module``."""
    return load_module
