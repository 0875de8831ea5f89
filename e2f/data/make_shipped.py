"""Generate the shipped labelled dataset (GFN2-xTB on real small organic molecules).

``python -m e2f.data.make_shipped [--out DIR]`` (or ``scripts/make_shipped_dataset.py``)
writes, under ``e2f/data/shipped/`` by default:

- ``xtb_organic.h5``: the SPICE HDF5 layout (one group per species: ``atomic_numbers``,
  ``conformations`` [bohr], ``dft_total_energy`` [hartree], ``dft_total_gradient``
  [hartree/bohr], ``smiles``, ``subset``; plus ``total_charge`` / ``spin_multiplicity`` group
  attributes and per-conformer ``split`` / ``sampling`` datasets). The labels are GFN2-xTB,
  stored under SPICE's ``dft_*`` keys so that any SPICE reader reads them; the ``method``
  attribute of those datasets says so.
- ``xtb_organic.aselmdb``: the same conformers in fairchem's OMol25 ASE-LMDB layout
  (Å, eV, eV/Å; ``charge``, ``spin`` (multiplicity), ``data_id`` (subset) ... in the row data).
- ``xtb_organic.json``: the manifest (counts, splits, per-element reference energies fitted
  by least squares on the train split, SHA-256 of both files, timings, versions).

Species: the G2 set (ASE ``g2``) restricted to H, C, N, O, F, P, S, Cl (neutral molecules and
radicals, with the multiplicity from ASE's magnetic moments), 13 ions built from G2 molecules by
adding or removing a proton (or an electron) and relaxing with GFN2-xTB, the S22 dimers and two
ion-water dimers. Conformers per species: Gaussian-perturbed and randomly rotated copies of the
reference geometry, frames of a short Langevin MD run with GFN2-xTB forces and, for dimers, a
scan of the intermolecular separation.

Reproducibility: every random number comes from a generator seeded by
``(SEED, crc32(species name), stream)``; the GFN2-xTB calls run with one OpenMP thread, so a
sample regenerated with :func:`regenerate` on the same tblite/BLAS build matches the shipped
file bit for bit in its inputs (positions) and within tblite's SCF tolerance in its labels.
Positions are rounded to float32 in bohr (SPICE's storage) *before* labelling, so the stored
labels belong to the stored positions exactly.
"""

from __future__ import annotations

import os

import sys

# One OpenMP thread: bit-for-bit reproducible MD/relaxations, and polite on shared cores.
# It must be set before the OpenMP runtime starts (tblite, torch or numpy's BLAS loaded);
# main() re-executes itself when that was too late.
_THREADS_SET_EARLY = os.environ.get("OMP_NUM_THREADS") == "1" or not (
    {"torch", "tblite", "numpy"} & set(sys.modules)
)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import hashlib
import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEED = 20260125
METHOD = "GFN2-xTB"
ORGANIC_ELEMENTS = frozenset({"H", "C", "N", "O", "F", "P", "S", "Cl"})
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
STEM = "xtb_organic"

N_PERTURBED_MONOMER = 8
N_MD_FRAMES_MONOMER = 12
N_PERTURBED_DIMER = 6
N_MD_FRAMES_DIMER = 10
DIMER_SCAN = (0.9, 1.0, 1.2, 1.5, 2.0)
MD_BURN_IN = 20
MD_STRIDE = 10
MD_TIMESTEP_FS = 0.5
MD_FRICTION_PER_FS = 0.02
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test; per species, over its conformers

# Subset names (SPICE-style: one per species group).
SUBSETS = ("g2-neutral", "g2-radical", "ions", "s22-dimers", "ion-water-dimers")


@dataclass
class Species:
    """A molecule or dimer with its reference geometry and electronic state."""

    name: str
    subset: str
    numbers: np.ndarray  # [N] int
    positions: np.ndarray  # [N, 3] float64, Å
    charge: int = 0
    multiplicity: int = 1
    smiles: str | None = None
    n_first: int | None = None  # dimers: atoms [0, n_first) are monomer A
    md_temperature_k: float = 500.0


@dataclass
class Conformer:
    index: int
    sampling: str  # "perturbed" | "md" | "dimer-scan"
    positions: np.ndarray  # float64 Å, exactly float32(bohr) * BOHR


@dataclass
class Labelled:
    species: Species
    conformers: list[Conformer]
    bohr: np.ndarray  # [M, N, 3] float32
    energy: np.ndarray  # [M] float64 hartree
    gradient: np.ndarray  # [M, N, 3] float64 hartree/bohr
    split: list[str] = field(default_factory=list)


def _rng(name: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(name.encode()), stream])


def _bohr():
    from e2f.data.readers import BOHR_ANG

    return BOHR_ANG


def round_positions(pos_ang: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round Å positions to SPICE storage (float32 bohr); return (bohr32, Å float64)."""
    bohr32 = (np.asarray(pos_ang, dtype=np.float64) / _bohr()).astype(np.float32)
    return bohr32, bohr32.astype(np.float64) * _bohr()


# --------------------------------------------------------------------------- labelling
def xtb_singlepoint(numbers, pos_bohr, charge, multiplicity):
    """GFN2-xTB energy (hartree) and gradient (hartree/bohr) via tblite's native interface."""
    from tblite.interface import Calculator

    calc = Calculator(
        METHOD,
        np.asarray(numbers, dtype=np.int64),
        np.asarray(pos_bohr, dtype=np.float64),
        charge=float(charge),
        uhf=int(multiplicity) - 1,
    )
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    return float(res.get("energy")), np.array(res.get("gradient"), dtype=np.float64)


def _ase_xtb(charge, multiplicity):
    from tblite.ase import TBLite

    return TBLite(method=METHOD, charge=float(charge), multiplicity=int(multiplicity), verbosity=0)


# --------------------------------------------------------------------------- species
def _neighbours(atoms, i, scale=1.25):
    from ase.data import covalent_radii

    d = atoms.get_distances(i, range(len(atoms)))
    r = covalent_radii[atoms.numbers]
    return [j for j in range(len(atoms)) if j != i and d[j] < scale * (r[i] + r[j])]


def _add_proton(atoms, site, bond=1.02):
    from ase import Atoms

    nb = _neighbours(atoms, site)
    p = atoms.positions
    d = -sum((p[j] - p[site]) / np.linalg.norm(p[j] - p[site]) for j in nb)
    if np.linalg.norm(d) < 1e-3:  # linear/planar-symmetric site: any perpendicular will do
        d = np.cross(p[nb[0]] - p[site], [0.3, 0.5, 0.8])
    d = d / np.linalg.norm(d)
    return atoms + Atoms("H", positions=[p[site] + bond * d])


def _remove_acidic_h(atoms):
    syms = atoms.get_chemical_symbols()
    for i, s in enumerate(syms):
        if s == "H" and any(syms[j] in ("O", "S") for j in _neighbours(atoms, i)):
            del atoms[i]
            return atoms
    raise ValueError("no O-H or S-H proton")


def _relax(atoms, charge, multiplicity, name):
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.positions += _rng(name, 99).normal(scale=0.01, size=atoms.positions.shape)
    atoms.calc = _ase_xtb(charge, multiplicity)
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=300)
    return atoms.positions.copy()


def _first(atoms, symbol):
    return atoms.get_chemical_symbols().index(symbol)


# (name, g2 parent, operation, charge, smiles)
_IONS = (
    ("NH4+", "NH3", "protonate:N", 1, "[NH4+]"),
    ("H3O+", "H2O", "protonate:O", 1, "[OH3+]"),
    ("CH3NH3+", "H3CNH2", "protonate:N", 1, "C[NH3+]"),
    ("C5H5NH+", "C5H5N", "protonate:N", 1, "c1cc[nH+]cc1"),
    ("HCOO-", "HCOOH", "deprotonate", -1, "O=C[O-]"),
    ("CH3COO-", "CH3COOH", "deprotonate", -1, "CC(=O)[O-]"),
    ("CH3O-", "CH3OH", "deprotonate", -1, "C[O-]"),
    ("CH3S-", "CH3SH", "deprotonate", -1, "C[S-]"),
    ("CH3CH2O-", "CH3CH2OH", "deprotonate", -1, "CC[O-]"),
    ("OH-", "OH", "electron", -1, "[OH-]"),
    ("SH-", "SH", "electron", -1, "[SH-]"),
    ("CN-", "CN", "electron", -1, "[C-]#N"),
    ("NO+", "NO", "electron", 1, "[N+]#O"),
)


def _ion_water_dimer(ion_pos, ion_numbers, ion_name, charge, site_symbol):
    """Place a water molecule hydrogen-bonded to the first ``site_symbol`` atom of the ion."""
    from ase import Atoms

    ion = Atoms(numbers=ion_numbers, positions=ion_pos)
    ion.positions -= ion.get_center_of_mass()
    s = _first(ion, site_symbol)
    u = ion.positions[s] / np.linalg.norm(ion.positions[s])  # outward from the ion's centre
    v = np.cross(u, [0.3, 0.5, 0.8])
    v /= np.linalg.norm(v)
    half = np.deg2rad(104.5) / 2
    if charge > 0:  # cation donates: water O accepts along the X-H bond, its H's point away
        o = ion.positions[s] + 2.8 * u
        h1 = o + 0.96 * (np.cos(half) * u + np.sin(half) * v)
        h2 = o + 0.96 * (np.cos(half) * u - np.sin(half) * v)
    else:  # anion accepts: one water O-H points at the ion's O
        o = ion.positions[s] + 2.8 * u
        h1 = o - 0.97 * u
        h2 = o + 0.96 * (np.cos(np.pi - 2 * half) * u + np.sin(np.pi - 2 * half) * v)
    water = Atoms("OH2", positions=[o, h1, h2])
    dimer = ion + water
    return dimer, len(ion)


def build_species() -> list[Species]:
    """All species in a fixed order (G2 monomers, ions, S22 dimers, ion-water dimers)."""
    from ase.collections import g2
    from ase.data import s22

    out: list[Species] = []
    for name in g2.names:
        a = g2[name]
        if len(a) < 2 or not set(a.get_chemical_symbols()) <= ORGANIC_ELEMENTS:
            continue
        unpaired = int(round(abs(a.get_initial_magnetic_moments().sum())))
        out.append(
            Species(
                name=f"g2:{name}",
                subset="g2-radical" if unpaired else "g2-neutral",
                numbers=a.numbers.copy(),
                positions=a.positions.copy(),
                multiplicity=unpaired + 1,
            )
        )
    ions = {}
    for name, parent, op, charge, smiles in _IONS:
        a = g2[parent].copy()
        a.set_initial_magnetic_moments(None)
        if op.startswith("protonate:"):
            a = _add_proton(a, _first(a, op.split(":")[1]))
        elif op == "deprotonate":
            a = _remove_acidic_h(a)
        pos = _relax(a, charge, 1, f"ion:{name}")
        ions[name] = (a.numbers.copy(), pos, charge)
        out.append(Species(f"ion:{name}", "ions", a.numbers.copy(), pos, charge, 1, smiles))
    for name in s22.s22:
        d = s22.data[name]
        from ase import Atoms

        a = Atoms(d["symbols"], positions=d["positions"])
        out.append(
            Species(
                f"s22:{name}", "s22-dimers", a.numbers.copy(), a.positions.copy(),
                n_first=d["dimer atoms"][0], md_temperature_k=300.0,
            )
        )
    for ion_name, site, smiles in (("NH4+", "N", "[NH4+].O"), ("HCOO-", "O", "O=C[O-].O")):
        numbers, pos, charge = ions[ion_name]
        dimer, n_first = _ion_water_dimer(pos, numbers, ion_name, charge, site)
        name = f"ion-water:{ion_name}.H2O"
        relaxed = _relax(dimer, charge, 1, name)
        out.append(
            Species(name, "ion-water-dimers", dimer.numbers.copy(), relaxed, charge, 1, smiles,
                    n_first=n_first, md_temperature_k=300.0)
        )
    return out


# --------------------------------------------------------------------------- conformers
def _random_rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _orient(pos, rng):
    c = pos - pos.mean(axis=0)
    return c @ _random_rotation(rng).T


def _md_frames(spec: Species, n_frames: int, upto: int | None = None) -> list[np.ndarray]:
    from ase import Atoms, units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    rng = _rng(spec.name, 2)
    atoms = Atoms(numbers=spec.numbers, positions=spec.positions.copy())
    atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
    MaxwellBoltzmannDistribution(atoms, temperature_K=spec.md_temperature_k, rng=rng)
    Stationary(atoms)
    if len(atoms) > 2:
        ZeroRotation(atoms)
    atoms.calc = _ase_xtb(spec.charge, spec.multiplicity)
    dyn = Langevin(
        atoms,
        timestep=MD_TIMESTEP_FS * units.fs,
        temperature_K=spec.md_temperature_k,
        friction=MD_FRICTION_PER_FS / units.fs,
        rng=rng,
        fixcm=False,
    )
    last = n_frames if upto is None else min(n_frames, upto + 1)
    frames = []
    dyn.run(MD_BURN_IN)
    for _ in range(last):
        dyn.run(MD_STRIDE)
        frames.append(atoms.positions.copy())
    return frames


def _scan(spec: Species, factor: float, rng) -> np.ndarray:
    from ase import Atoms

    a = Atoms(numbers=spec.numbers, positions=spec.positions.copy())
    com_a = a[: spec.n_first].get_center_of_mass()
    com_b = a[spec.n_first :].get_center_of_mass()
    pos = a.positions.copy()
    pos[spec.n_first :] += (factor - 1.0) * (com_b - com_a)
    return pos + rng.normal(scale=0.01, size=pos.shape)


def conformer_plan(spec: Species) -> list[str]:
    """The sampling kind of each conformer index, in storage order."""
    if spec.n_first is None:
        return ["perturbed"] * N_PERTURBED_MONOMER + ["md"] * N_MD_FRAMES_MONOMER
    return (
        ["perturbed"] * N_PERTURBED_DIMER
        + ["dimer-scan"] * len(DIMER_SCAN)
        + ["md"] * N_MD_FRAMES_DIMER
    )


def make_conformers(spec: Species, wanted: set[int] | None = None) -> list[Conformer]:
    """Geometries of ``spec`` (all, or only the indices in ``wanted``), seeded per index."""
    plan = conformer_plan(spec)
    wanted = set(range(len(plan))) if wanted is None else set(wanted)
    md_idx = [i for i, k in enumerate(plan) if k == "md"]
    md_needed = [md_idx.index(i) for i in wanted if i in md_idx]
    frames = _md_frames(spec, len(md_idx), upto=max(md_needed)) if md_needed else []
    out = []
    scan_i = 0
    for i, kind in enumerate(plan):
        if kind == "dimer-scan":
            factor = DIMER_SCAN[scan_i]
            scan_i += 1
        if i not in wanted:
            continue
        rng = _rng(spec.name, 1000 + i)
        if kind == "perturbed":
            sigma = rng.uniform(0.01, 0.08 if spec.n_first is None else 0.05)
            pos = spec.positions + rng.normal(scale=sigma, size=spec.positions.shape)
        elif kind == "dimer-scan":
            pos = _scan(spec, factor, rng)
        else:
            pos = frames[md_idx.index(i)]
        _, pos_ang = round_positions(_orient(pos, rng))
        out.append(Conformer(i, kind, pos_ang))
    return out


def split_of(spec: Species) -> list[str]:
    n = len(conformer_plan(spec))
    n_val = max(1, int(round(SPLIT_FRACTIONS[1] * n)))
    n_test = max(1, int(round(SPLIT_FRACTIONS[2] * n)))
    labels = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
    return labels[_rng(spec.name, 3).permutation(n)].tolist()


def label_species(spec: Species, conformers: list[Conformer]) -> Labelled:
    bohr = np.stack([round_positions(c.positions)[0] for c in conformers])
    energies, grads = [], []
    for b in bohr:
        e, g = xtb_singlepoint(spec.numbers, b.astype(np.float64), spec.charge, spec.multiplicity)
        energies.append(e)
        grads.append(g)
    return Labelled(spec, conformers, bohr, np.array(energies), np.stack(grads))


def regenerate(species_name: str, indices) -> Labelled:
    """Re-create conformers ``indices`` of one species (inputs and labels) from the seeds."""
    specs = {s.name: s for s in build_species()}
    spec = specs[species_name]
    confs = make_conformers(spec, set(indices))
    return label_species(spec, confs)


# --------------------------------------------------------------------------- writing
def _write_h5(path: Path, items: list[Labelled]) -> None:
    import h5py

    str_dt = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs["description"] = (
            "e2f shipped set: GFN2-xTB labels in the SPICE HDF5 layout (dft_* keys hold xTB)"
        )
        f.attrs["method"] = METHOD
        f.attrs["code"] = f"tblite {_tblite_version()}"
        f.attrs["seed"] = SEED
        for it in items:
            s = it.species
            g = f.create_group(s.name)
            g.attrs["total_charge"] = int(s.charge)
            g.attrs["spin_multiplicity"] = int(s.multiplicity)
            g.create_dataset("atomic_numbers", data=s.numbers.astype(np.int16))
            g.create_dataset("conformations", data=it.bohr, dtype=np.float32).attrs["units"] = "bohr"
            ds = g.create_dataset("dft_total_energy", data=it.energy, dtype=np.float64)
            ds.attrs["units"] = "hartree"
            ds.attrs["method"] = METHOD
            ds = g.create_dataset("dft_total_gradient", data=it.gradient.astype(np.float32))
            ds.attrs["units"] = "hartree/bohr"
            ds.attrs["method"] = METHOD
            g.create_dataset("subset", data=[s.subset], dtype=str_dt)
            if s.smiles is not None:
                g.create_dataset("smiles", data=[s.smiles], dtype=str_dt)
            g.create_dataset("split", data=it.split, dtype=str_dt)
            g.create_dataset("sampling", data=[c.sampling for c in it.conformers], dtype=str_dt)


def _write_aselmdb(path: Path, items: list[Labelled]) -> None:
    import ase.db
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from e2f.data.readers import BOHR_ANG as Bohr
    from e2f.data.readers import HARTREE_EV as Hartree

    for p in (path, Path(str(path) + "-lock")):
        if p.exists():
            p.unlink()
    db = ase.db.connect(str(path), use_lock_file=False)
    for it in items:
        s = it.species
        for k, c in enumerate(it.conformers):
            atoms = Atoms(numbers=s.numbers, positions=it.bohr[k].astype(np.float64) * Bohr)
            forces = -it.gradient[k].astype(np.float32).astype(np.float64) * (Hartree / Bohr)
            atoms.calc = SinglePointCalculator(atoms, energy=it.energy[k] * Hartree, forces=forces)
            db.write(
                atoms,
                data={
                    "charge": int(s.charge),
                    "spin": int(s.multiplicity),
                    "num_atoms": len(s.numbers),
                    "data_id": s.subset,
                    "source": f"{s.name}/{c.index}",
                    "split": it.split[k],
                    "sampling": c.sampling,
                },
            )
    if hasattr(db, "close"):
        db.close()
    lock = Path(str(path) + "-lock")
    if lock.exists():
        lock.unlink()


def _tblite_version() -> str:
    from importlib.metadata import version

    return version("tblite")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    if not _THREADS_SET_EARLY and os.environ.get("OMP_NUM_THREADS") == "1":
        # OpenMP was initialised before OMP_NUM_THREADS=1 was set: start afresh with it.
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execv(sys.executable, [sys.executable, "-m", "e2f.data.make_shipped", *argv])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=SHIPPED_DIR)
    ap.add_argument("--limit", type=int, default=None, help="first N species only (debugging)")
    args = ap.parse_args(argv)

    from e2f.data.reference import fit_reference_energies

    t0 = time.process_time()
    w0 = time.perf_counter()
    specs = build_species()[: args.limit]
    items = []
    for i, spec in enumerate(specs):
        confs = make_conformers(spec)
        it = label_species(spec, confs)
        it.split = split_of(spec)
        items.append(it)
        print(f"[{i + 1}/{len(specs)}] {spec.name}: {len(confs)} conformers "
              f"({time.process_time() - t0:.0f} s CPU)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    h5 = args.out / f"{STEM}.h5"
    lmdb = args.out / f"{STEM}.aselmdb"
    _write_h5(h5, items)
    _write_aselmdb(lmdb, items)

    from e2f.data.readers import HARTREE_EV as Hartree

    numbers, energies = [], []
    for it in items:
        for k, sp in enumerate(it.split):
            if sp == "train":
                numbers.append(it.species.numbers)
                energies.append(it.energy[k] * Hartree)
    refs = fit_reference_energies(numbers, energies)
    counts = {"species": len(items), "conformers": sum(len(it.conformers) for it in items)}
    for key in ("subset", "split", "sampling"):
        c: dict[str, int] = {}
        for it in items:
            vals = (
                [it.species.subset] * len(it.conformers) if key == "subset"
                else it.split if key == "split" else [x.sampling for x in it.conformers]
            )
            for v in vals:
                c[v] = c.get(v, 0) + 1
        counts[f"by_{key}"] = dict(sorted(c.items()))
    counts["atoms"] = int(sum(len(it.species.numbers) * len(it.conformers) for it in items))
    manifest = {
        "name": STEM,
        "method": METHOD,
        "code": f"tblite {_tblite_version()}",
        "seed": SEED,
        "units": {"hdf5": "bohr, hartree, hartree/bohr", "aselmdb": "angstrom, eV, eV/angstrom"},
        "counts": counts,
        "reference_energies_eV": {str(z): e for z, e in sorted(refs.items())},
        "reference_fit": "least squares of total energy on element counts, train split",
        "files": {
            h5.name: {"bytes": h5.stat().st_size, "sha256": _sha256(h5)},
            lmdb.name: {"bytes": lmdb.stat().st_size, "sha256": _sha256(lmdb)},
        },
        "generation": {
            "cpu_seconds": round(time.process_time() - t0, 1),
            "wall_seconds": round(time.perf_counter() - w0, 1),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    (args.out / f"{STEM}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["counts"], indent=1))
    print(f"wrote {h5} ({h5.stat().st_size} B), {lmdb} ({lmdb.stat().st_size} B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
