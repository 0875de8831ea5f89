"""Benchmark suites. Each module here registers its suite(s) with
``suites.core.runner.register_suite``; :func:`discover_suites` imports them all.

A module that fails to import is reported on stderr and in :data:`IMPORT_ERRORS`; the
other suites stay usable.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

IMPORT_ERRORS: dict[str, str] = {}
_discovered = False


def discover_suites(*, force: bool = False) -> dict[str, str]:
    """Import every module in ``suites/`` (not ``suites.core``) once; return the failures."""
    global _discovered
    if _discovered and not force:
        return IMPORT_ERRORS
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        module = f"{__name__}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 -- one broken suite must not hide the others
            IMPORT_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
            print(f"warning: suite module {module} failed to import: {IMPORT_ERRORS[info.name]}", file=sys.stderr)
        else:
            IMPORT_ERRORS.pop(info.name, None)
    return IMPORT_ERRORS
