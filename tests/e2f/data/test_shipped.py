"""The shipped GFN2-xTB set: both layouts agree, the manifest is true, samples regenerate."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from e2f.data import (
    AseDBReader,
    SpiceHDF5Reader,
    fit_reference_energies,
    shipped_manifest,
    shipped_path,
)

pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def manifest():
    return shipped_manifest()


@pytest.fixture(scope="module")
def h5_structures():
    reader = SpiceHDF5Reader(shipped_path("h5"))
    return list(reader), reader.report


def test_files_match_manifest(manifest):
    for fmt in ("h5", "aselmdb"):
        p = shipped_path(fmt)
        meta = manifest["files"][p.name]
        assert p.stat().st_size == meta["bytes"] < 10 * 2**20
        assert hashlib.sha256(p.read_bytes()).hexdigest() == meta["sha256"]


def test_counts_splits_and_reference_energies(manifest, h5_structures):
    structures, report = h5_structures
    assert report.num_bad == 0 and report.charge_unknown == 0
    counts = manifest["counts"]
    assert len(structures) == counts["conformers"] >= 3000
    assert sum(s.num_atoms for s in structures) == counts["atoms"]
    by = {}
    for s in structures:
        by[s.subset] = by.get(s.subset, 0) + 1
    assert by == counts["by_subset"]
    assert {s.split for s in structures} == {"train", "val", "test"}
    assert sum(s.split == "train" for s in structures) == counts["by_split"]["train"]
    charged = {s.group for s in structures if s.charge != 0}
    open_shell = {s.group for s in structures if s.spin != 1}
    assert len(charged) >= 10 and len(open_shell) >= 10
    train = [s for s in structures if s.split == "train"]
    refs = fit_reference_energies([s.numbers for s in train], [s.energy for s in train])
    for z, e in manifest["reference_energies_eV"].items():
        assert refs[int(z)] == pytest.approx(e, abs=1e-6)
    # labels are physical: forces of perturbed/MD geometries, not zeros or garbage
    fmax = max(np.abs(s.forces).max() for s in structures)
    fmean = np.mean([np.abs(s.forces).mean() for s in structures])
    assert 0.2 < fmean < 3.0 and fmax < 50.0


def test_aselmdb_layout_equals_hdf5_layout(h5_structures):
    structures, _ = h5_structures
    by_source = {s.source: s for s in structures}
    reader = AseDBReader(shipped_path("aselmdb"))
    n = 0
    for s in reader:
        h = by_source[s.source]
        assert (s.charge, s.spin, s.subset, s.split) == (h.charge, h.spin, h.subset, h.split)
        np.testing.assert_array_equal(s.numbers, h.numbers)
        np.testing.assert_allclose(s.positions, h.positions, rtol=0, atol=1e-12)
        assert s.energy == pytest.approx(h.energy, abs=1e-9)
        np.testing.assert_allclose(s.forces, h.forces, rtol=1e-12, atol=1e-12)
        n += 1
    assert n == len(structures) and reader.report.num_bad == 0


REGEN = """
import json, sys
import numpy as np
from e2f.data.make_shipped import regenerate
out = {}
for name, idx in json.loads(sys.argv[1]):
    lab = regenerate(name, idx)
    out[name] = {"index": [c.index for c in lab.conformers], "sampling": [c.sampling for c in lab.conformers],
                 "bohr": lab.bohr.tolist(), "energy": lab.energy.tolist(), "gradient": lab.gradient.tolist()}
print(json.dumps(out))
"""


def test_script_regenerates_samples_bit_for_bit():
    h5py = pytest.importorskip("h5py")
    pytest.importorskip("tblite")
    # perturbed, MD (first frames: a short trajectory), a radical, an ion built and relaxed by
    # the script, a dimer scan point and an ion-water dimer.
    wanted = [["g2:H2O", [0, 5, 8, 9]], ["g2:OH", [2, 8]], ["ion:NH4+", [1, 8]],
              ["s22:Water_dimer", [6, 9]], ["ion-water:HCOO-.H2O", [0]]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", REGEN, json.dumps(wanted)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    with h5py.File(shipped_path("h5"), "r") as f:
        for name, idx in wanted:
            g, r = f[name], got[name]
            assert r["index"] == idx
            assert [s.decode() if isinstance(s, bytes) else s for s in g["sampling"][idx]] == r["sampling"]
            # inputs: bit for bit (float32 bohr, as stored)
            np.testing.assert_array_equal(np.asarray(r["bohr"], dtype=np.float32), g["conformations"][idx])
            # labels: within tblite's SCF convergence
            np.testing.assert_allclose(r["energy"], g["dft_total_energy"][idx], rtol=0, atol=1e-7)
            np.testing.assert_allclose(np.asarray(r["gradient"], dtype=np.float32),
                                       g["dft_total_gradient"][idx], rtol=0, atol=1e-6)


def test_fairchem_reads_the_omol25_layout(h5_structures):
    """fairchem's own OMol25 pipeline (AtomicData with charge and spin) reads the shipped LMDB."""
    datasets = pytest.importorskip("fairchem.core.datasets")
    structures, _ = h5_structures
    by_source = {s.source: s for s in structures}
    ds = datasets.AseDBDataset({"src": str(shipped_path("aselmdb")), "a2g_args": {
        "r_energy": True, "r_forces": True, "r_data_keys": ["charge", "spin"]}})
    assert len(ds) == len(structures)
    for i in (0, 2600, len(ds) - 1):
        data, atoms = ds[i], ds.get_atoms(i)
        h = by_source[atoms.info["source"]]
        assert (int(data.charge), int(data.spin)) == (h.charge, h.spin)
        assert float(data.energy) == pytest.approx(h.energy, rel=1e-6)
        np.testing.assert_allclose(data.forces.numpy(), h.forces, rtol=1e-5, atol=1e-5)
