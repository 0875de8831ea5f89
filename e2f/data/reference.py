"""Per-element reference energies: the mean-per-element baseline and the energy offset.

E(structure) ~ sum_i e_ref[Z_i], fitted by least squares on the train split. Subtracting it
leaves the (much smaller) interaction energy that a model learns; predicting it alone is the
"mean per element" baseline of the accuracy suite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def fit_reference_energies(
    numbers: Iterable[np.ndarray], energies: Iterable[float], rcond: float | None = None
) -> dict[int, float]:
    """Least-squares per-element energies.

    Parameters
    ----------
    numbers : iterable of int arrays
        Atomic numbers of each structure.
    energies : iterable of float
        Total energy of each structure (any unit; the result is in the same unit).

    Returns
    -------
    dict
        ``{Z: e_ref}`` for every element present. Elements whose counts are collinear
        with others get the minimum-norm solution (``numpy.linalg.lstsq``).
    """
    numbers = [np.asarray(z, dtype=np.int64) for z in numbers]
    energies = np.asarray(list(energies), dtype=np.float64)
    if len(numbers) == 0 or len(numbers) != len(energies):
        raise ValueError(
            f"need one energy per structure and at least one structure "
            f"(got {len(numbers)} structures, {len(energies)} energies)"
        )
    elements = np.unique(np.concatenate(numbers))
    col = {int(z): k for k, z in enumerate(elements)}
    counts = np.zeros((len(numbers), len(elements)))
    for i, z in enumerate(numbers):
        for zz, c in zip(*np.unique(z, return_counts=True)):
            counts[i, col[int(zz)]] = c
    coef, *_ = np.linalg.lstsq(counts, energies, rcond=rcond)
    return {int(z): float(coef[k]) for k, z in enumerate(elements)}


def reference_energy(numbers: np.ndarray, refs: Mapping[int, float]) -> float:
    """Sum of the reference energies of the atoms (``KeyError`` names an unfitted element)."""
    try:
        return float(sum(refs[int(z)] for z in np.asarray(numbers).ravel()))
    except KeyError as err:
        raise KeyError(f"no reference energy for element Z={err.args[0]}") from None
