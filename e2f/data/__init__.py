"""Datasets: streaming SPICE / MACE-OFF / OMol25 readers, the shipped GFN2-xTB set, batching.

Readers yield :class:`Structure` records in Å, eV, eV/Å and count bad records in their
``report`` (:class:`ReadReport`). :func:`collate` turns a list of them into an
``e2f.batch.AtomsBatch`` plus :class:`Targets`.
"""

from .dataset import (
    SHIPPED_DIR,
    Targets,
    batches,
    collate,
    load_structures,
    shipped_manifest,
    shipped_path,
    shipped_reference_energies,
)
from .readers import (
    AseDBReader,
    ExtXYZReader,
    ReadReport,
    SpiceHDF5Reader,
    Structure,
    hash_split,
    open_dataset,
    smiles_total_charge,
)
from .reference import fit_reference_energies, reference_energy

__all__ = [
    "SHIPPED_DIR",
    "AseDBReader",
    "ExtXYZReader",
    "ReadReport",
    "SpiceHDF5Reader",
    "Structure",
    "Targets",
    "batches",
    "collate",
    "fit_reference_energies",
    "hash_split",
    "load_structures",
    "open_dataset",
    "reference_energy",
    "shipped_manifest",
    "shipped_path",
    "shipped_reference_energies",
    "smiles_total_charge",
]
