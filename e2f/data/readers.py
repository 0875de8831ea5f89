"""Streaming readers for SPICE HDF5, MACE-OFF extended XYZ and OMol25 ASE-LMDB files.

Every reader is an iterable of :class:`Structure` (Å, eV, eV/Å) that reads one record at a
time (a SPICE molecule group, an XYZ frame, a database row), so a 2M-conformer file is never
loaded whole. Bad records (missing keys, NaN/inf, zero atoms, shape mismatches, unknown
elements, unparsable frames) are not yielded but counted, by reason, in the reader's
:class:`ReadReport` (``reader.report``), which also counts structures whose total charge
could not be determined. Nothing is dropped silently: ``print(reader.report)``.

>>> reader = open_dataset("SPICE-2.0.1.hdf5")
>>> for s in reader: ...
>>> print(reader.report)
"""

from __future__ import annotations

import abc
import io
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase.units import create_units

# CODATA 2018 (ase.units defaults to 2014; the difference is 3e-8 relative).
_UNITS = create_units("2018")
HARTREE_EV = float(_UNITS["Hartree"])
BOHR_ANG = float(_UNITS["Bohr"])
MAX_Z = 118
DEFAULT_SPLIT_FRACTIONS = (0.9, 0.05, 0.05)


@dataclass
class Structure:
    """One labelled structure (numpy; no torch).

    ``spin`` is the spin multiplicity 2S+1 (OMol25's convention); ``charge_known`` is False
    when the total charge had to be assumed 0.
    """

    positions: np.ndarray  # [N, 3] float64, Å
    numbers: np.ndarray  # [N] int64
    energy: float  # eV
    forces: np.ndarray  # [N, 3] float64, eV/Å
    charge: int = 0
    spin: int = 1
    subset: str = ""
    split: str | None = None
    group: str = ""  # molecule / system the structure belongs to (split unit)
    source: str = ""  # file-local id, e.g. "<group>/<conformer>"
    charge_known: bool = True

    @property
    def num_atoms(self) -> int:
        return len(self.numbers)


@dataclass
class ReadReport:
    """What a reader saw: good records, bad records by reason (with a few example ids)."""

    path: str = ""
    read: int = 0
    bad: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    charge_unknown: int = 0

    def add_bad(self, reason: str, source: str, count: int = 1) -> None:
        self.bad[reason] += count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(source)

    @property
    def num_bad(self) -> int:
        return int(sum(self.bad.values()))

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "read": self.read,
            "bad": dict(self.bad),
            "bad_examples": self.examples,
            "charge_unknown": self.charge_unknown,
        }

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.read} structures read, {self.num_bad} bad records skipped"]
        for reason, n in self.bad.most_common():
            lines.append(f"  {n:8d}  {reason}  (e.g. {', '.join(self.examples[reason])})")
        if self.charge_unknown:
            lines.append(f"  {self.charge_unknown:8d}  total charge unknown, assumed 0")
        return "\n".join(lines)


def _check(s: Structure) -> str | None:
    """Reason why ``s`` is unusable, or None."""
    n = len(s.numbers)
    if n == 0:
        return "zero atoms"
    if s.positions.shape != (n, 3):
        return f"positions shape {s.positions.shape} != ({n}, 3)"
    if s.forces.shape != (n, 3):
        return f"forces shape {s.forces.shape} != ({n}, 3)"
    if np.any(s.numbers < 1) or np.any(s.numbers > MAX_Z):
        return "unknown element"
    if not np.all(np.isfinite(s.positions)):
        return "non-finite positions"
    if not np.isfinite(s.energy):
        return "non-finite energy"
    if not np.all(np.isfinite(s.forces)):
        return "non-finite forces"
    return None


def hash_split(group: str, fractions=DEFAULT_SPLIT_FRACTIONS) -> str:
    """Deterministic train/val/test assignment of a whole group (molecule) by its name."""
    u = zlib.crc32(group.encode()) / 2**32
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


class _Reader(abc.ABC):
    """Common iteration: validate, count, fill in the split."""

    def __init__(self, path, *, subsets=None, split_fractions=DEFAULT_SPLIT_FRACTIONS):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no such dataset file: {self.path}")
        self.subsets = None if subsets is None else set(subsets)
        self.split_fractions = split_fractions
        self.report = ReadReport(path=str(self.path))

    @abc.abstractmethod
    def _records(self) -> Iterator[Structure]:
        """Raw records of the file, in file order (validated by ``__iter__``)."""

    def __iter__(self) -> Iterator[Structure]:
        self.report = ReadReport(path=str(self.path))
        for s in self._records():
            if self.subsets is not None and s.subset not in self.subsets:
                continue
            reason = _check(s)
            if reason is not None:
                self.report.add_bad(reason, s.source)
                continue
            if s.split is None:
                s.split = hash_split(s.group or s.source, self.split_fractions)
            if not s.charge_known:
                self.report.charge_unknown += 1
            self.report.read += 1
            yield s


# --------------------------------------------------------------------------- SPICE HDF5
_BRACKET = re.compile(r"\[([^\]]*)\]")
_CHARGE = re.compile(r"([+-]+)(\d*)$")


def smiles_total_charge(smiles: str) -> int:
    """Sum of the formal charges of a SMILES string.

    Formal charges occur only inside bracket atoms (``[NH4+]``, ``[O-]``, ``[Fe+2]``,
    ``[Co+++]``); the atom class (``:n``) is stripped first. Exact per the OpenSMILES grammar,
    no RDKit needed.
    """
    total = 0
    for atom in _BRACKET.findall(smiles):
        atom = atom.split(":")[0]
        m = _CHARGE.search(atom)
        if not m:
            continue
        signs, digits = m.groups()
        sign = 1 if signs[0] == "+" else -1
        total += sign * (int(digits) if digits else len(signs))
    return total


def _h5_str(ds) -> str:
    v = ds[()]
    v = v[0] if getattr(v, "shape", ()) not in ((), None) and len(v) else v
    return v.decode() if isinstance(v, bytes) else str(v)


class SpiceHDF5Reader(_Reader):
    """The official SPICE HDF5 layout: one group per molecule.

    Per group: ``atomic_numbers`` [N], ``conformations`` [M, N, 3] bohr,
    ``dft_total_energy`` [M] hartree, ``dft_total_gradient`` [M, N, 3] hartree/bohr
    (forces = -gradient), ``subset`` and ``smiles`` (1-element string datasets).
    Total charge: the group attribute ``total_charge`` if present (e2f's files), else the sum
    of the SMILES formal charges, else unknown (assumed 0, counted). Spin multiplicity: the
    ``spin_multiplicity`` attribute, else 1 (SPICE is closed-shell). Split: a per-conformer
    ``split`` dataset if present, else by molecule (:func:`hash_split`).
    """

    def __init__(self, path, *, energy_key="dft_total_energy", gradient_key="dft_total_gradient",
                 subsets=None, split_fractions=DEFAULT_SPLIT_FRACTIONS):
        super().__init__(path, subsets=subsets, split_fractions=split_fractions)
        self.energy_key = energy_key
        self.gradient_key = gradient_key

    def _records(self):
        import h5py

        with h5py.File(self.path, "r") as f:
            for name in f:
                g = f[name]
                if not isinstance(g, h5py.Group):
                    continue
                yield from self._group(name, g)

    def _group(self, name, g):
        subset = _h5_str(g["subset"]) if "subset" in g else ""
        if self.subsets is not None and subset not in self.subsets:
            return
        keys = ("atomic_numbers", "conformations", self.energy_key, self.gradient_key)
        missing = [k for k in keys if k not in g]
        if missing:
            m = g["conformations"].shape[0] if "conformations" in g else 1
            self.report.add_bad(f"missing key {missing[0]!r}", name, count=m)
            return
        numbers = np.asarray(g["atomic_numbers"][()], dtype=np.int64).reshape(-1)
        conf = np.asarray(g["conformations"][()], dtype=np.float64)
        energy = np.asarray(g[self.energy_key][()], dtype=np.float64).reshape(-1)
        grad = np.asarray(g[self.gradient_key][()], dtype=np.float64)
        m = conf.shape[0] if conf.ndim == 3 else 0
        if conf.ndim != 3 or energy.shape[0] != m or grad.shape[:1] != (m,):
            self.report.add_bad(
                f"inconsistent conformer counts (conformations {conf.shape}, energy {energy.shape}, "
                f"gradient {grad.shape})", name, count=max(m, 1))
            return
        if "total_charge" in g.attrs:
            charge, known = int(g.attrs["total_charge"]), True
        elif "smiles" in g:
            charge, known = smiles_total_charge(_h5_str(g["smiles"])), True
        else:
            charge, known = 0, False
        spin = int(g.attrs.get("spin_multiplicity", 1))
        split = [(_s.decode() if isinstance(_s, bytes) else str(_s)) for _s in g["split"][()]] \
            if "split" in g else None
        for k in range(m):
            yield Structure(
                positions=conf[k] * BOHR_ANG,
                numbers=numbers,
                energy=float(energy[k]) * HARTREE_EV,
                forces=-grad[k] * (HARTREE_EV / BOHR_ANG),
                charge=charge,
                spin=spin,
                subset=subset,
                split=None if split is None else split[k],
                group=name,
                source=f"{name}/{k}",
                charge_known=known,
            )


# --------------------------------------------------------------------------- extended XYZ
class ExtXYZReader(_Reader):
    """Extended XYZ (MACE-OFF split files): one frame at a time.

    Energy from the first present of ``energy_keys`` (``REF_energy``, then ``energy``) in the
    comment line, forces from ``forces_keys`` (``REF_forces``, then ``forces``); subset from
    ``config_type``; charge from ``total_charge``/``charge`` if present (else unknown, 0);
    spin multiplicity from ``total_spin``/``spin`` if present, else 1. A frame that does not
    parse is counted and the reader moves on to the next frame.
    """

    def __init__(self, path, *, energy_keys=("REF_energy", "energy"),
                 forces_keys=("REF_forces", "forces"), subsets=None,
                 split_fractions=DEFAULT_SPLIT_FRACTIONS):
        super().__init__(path, subsets=subsets, split_fractions=split_fractions)
        self.energy_keys = energy_keys
        self.forces_keys = forces_keys

    def _frames(self):
        """(index, text) of each frame; a bad atom-count line starts a resync to the next one."""
        with open(self.path) as fh:
            idx = 0
            line = fh.readline()
            while line:
                if not line.strip():
                    line = fh.readline()
                    continue
                try:
                    n = int(line.split()[0])
                except ValueError:
                    self.report.add_bad("unparsable atom-count line", f"frame {idx}")
                    idx += 1
                    line = fh.readline()
                    while line and not re.fullmatch(r"\s*\d+\s*", line):
                        line = fh.readline()
                    continue
                body = [fh.readline() for _ in range(n + 1)]
                yield idx, line + "".join(body), all(body)
                idx += 1
                line = fh.readline()

    def _records(self):
        from ase.io.extxyz import read_xyz

        for idx, text, complete in self._frames():
            src = f"frame {idx}"
            if not complete:
                self.report.add_bad("truncated frame", src)
                continue
            try:
                atoms = next(read_xyz(io.StringIO(text), index=0))
            except Exception as err:  # noqa: BLE001 -- any parse failure is a counted bad record
                self.report.add_bad(f"unparsable frame ({type(err).__name__})", src)
                continue
            yield from self._structure(atoms, src)

    def _structure(self, atoms, src):
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        energy = next((atoms.info[k] for k in self.energy_keys if k in atoms.info), None)
        if energy is None:
            energy = next((results[k] for k in self.energy_keys if k in results), None)
        forces = next((atoms.arrays[k] for k in self.forces_keys if k in atoms.arrays), None)
        if forces is None:
            forces = next((results[k] for k in self.forces_keys if k in results), None)
        if energy is None or forces is None:
            self.report.add_bad(
                f"missing key {self.energy_keys[0]!r}" if energy is None
                else f"missing key {self.forces_keys[0]!r}", src)
            return
        info = atoms.info
        charge_key = next((k for k in ("total_charge", "charge") if k in info), None)
        spin_key = next((k for k in ("total_spin", "spin") if k in info), None)
        group = str(info.get("smiles", info.get("name", src)))
        yield Structure(
            positions=np.asarray(atoms.positions, dtype=np.float64),
            numbers=np.asarray(atoms.numbers, dtype=np.int64),
            energy=float(energy),
            forces=np.asarray(forces, dtype=np.float64),
            charge=int(info[charge_key]) if charge_key else 0,
            spin=int(info[spin_key]) if spin_key else 1,
            subset=str(info.get("config_type", "")),
            split=info.get("split"),
            group=group,
            source=src,
            charge_known=charge_key is not None,
        )


# --------------------------------------------------------------------------- OMol25 ASE-LMDB
class AseDBReader(_Reader):
    """OMol25's ASE-LMDB (``.aselmdb``) files, or any ASE database, row by row.

    Read through fairchem-core's ``AseDBDataset`` (which understands a file, a folder of
    ``.aselmdb`` shards or a glob, and puts the row's ``data`` into ``atoms.info``); plain
    ``ase.db.connect`` when fairchem is not installed. Energy and forces from the row's
    calculator (eV, eV/Å); ``charge`` and ``spin`` (multiplicity) from ``atoms.info`` (unknown
    charge: 0, counted); subset from ``data_id`` (OMol25's sub-dataset name) or ``subset``.
    """

    def __init__(self, path, *, subsets=None, split_fractions=DEFAULT_SPLIT_FRACTIONS,
                 use_fairchem: bool | None = None):
        self.path = Path(path)
        if not self.path.exists() and not any(Path().glob(str(path))):
            raise FileNotFoundError(f"no such dataset: {path}")
        self.subsets = None if subsets is None else set(subsets)
        self.split_fractions = split_fractions
        self.report = ReadReport(path=str(self.path))
        if use_fairchem is None:
            try:
                import fairchem.core.datasets  # noqa: F401

                use_fairchem = True
            except ImportError:
                use_fairchem = False
        self.use_fairchem = use_fairchem

    def _atoms(self):
        if self.use_fairchem:
            from fairchem.core.datasets import AseDBDataset

            ds = AseDBDataset({"src": str(self.path)})
            for i in range(len(ds)):
                try:
                    yield i, ds.get_atoms(i)
                except Exception as err:  # noqa: BLE001
                    self.report.add_bad(f"unreadable row ({type(err).__name__})", f"row {i}")
            return
        import ase.db

        db = ase.db.connect(str(self.path), readonly=True, use_lock_file=False) \
            if str(self.path).endswith("aselmdb") else ase.db.connect(str(self.path))
        for i, row in enumerate(db.select()):
            atoms = row.toatoms()
            if isinstance(row.data, dict):
                atoms.info.update(row.data)
            yield i, atoms

    def _records(self):
        for i, atoms in self._atoms():
            info = atoms.info
            src = str(info.get("source", f"row {i}"))
            try:
                energy = atoms.get_potential_energy()
                forces = atoms.get_forces()
            except Exception:  # noqa: BLE001 -- no calculator / no stored property
                energy = forces = None
            if energy is None or forces is None:
                self.report.add_bad(f"missing key {'energy' if energy is None else 'forces'!r}", src)
                continue
            known = "charge" in info
            yield Structure(
                positions=np.asarray(atoms.positions, dtype=np.float64),
                numbers=np.asarray(atoms.numbers, dtype=np.int64),
                energy=float(energy),
                forces=np.asarray(forces, dtype=np.float64),
                charge=int(info.get("charge", 0)),
                spin=int(info.get("spin", 1)),
                subset=str(info.get("data_id", info.get("subset", ""))),
                split=info.get("split"),
                group=src.rsplit("/", 1)[0],
                source=src,
                charge_known=known,
            )


# --------------------------------------------------------------------------- dispatch
def open_dataset(path, **kwargs) -> _Reader:
    """A reader chosen by the file name: ``.h5``/``.hdf5`` (SPICE), ``.xyz``/``.extxyz``
    (MACE-OFF), ``.aselmdb``/``.db``/``.lmdb``/a folder of them (OMol25 / ASE DB)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return SpiceHDF5Reader(p, **kwargs)
    if suffix in (".xyz", ".extxyz"):
        return ExtXYZReader(p, **kwargs)
    if suffix in (".aselmdb", ".db", ".lmdb") or p.is_dir():
        return AseDBReader(p, **kwargs)
    raise ValueError(
        f"cannot tell the format of {p}: expected .h5/.hdf5 (SPICE), .xyz/.extxyz (MACE-OFF) "
        f"or .aselmdb/.db/.lmdb or a folder (OMol25 / ASE DB)"
    )
