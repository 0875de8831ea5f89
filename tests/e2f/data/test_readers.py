"""Loaders on files written here in the official layouts: units, charges, corrupt records."""

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from e2f.data import (  # noqa: E402
    AseDBReader,
    ExtXYZReader,
    SpiceHDF5Reader,
    fit_reference_energies,
    open_dataset,
    smiles_total_charge,
)

# CODATA 2018, written out so that the test does not trust the code's own constants.
HARTREE_EV = 27.211386245988
BOHR_ANG = 0.529177210903

# Water: the GFN2-xTB numbers are illustrative labels; only the unit conversion is tested.
WATER_Z = np.array([8, 1, 1])
WATER_BOHR = np.array([[0.0, 0.0, 0.2217], [0.0, 1.4309, -0.8867], [0.0, -1.4309, -0.8867]])
WATER_E_HA = -5.0705443
WATER_GRAD = np.array([[0.0, 0.0, 0.0123], [0.0, 0.0101, -0.00615], [0.0, -0.0101, -0.00615]])


def _str(g, key, value):
    g.create_dataset(key, data=[value], dtype=h5py.string_dtype())


def _spice_group(f, name, z, conf, energy, grad, subset="SPICE PubChem Set 1", smiles=None):
    g = f.create_group(name)
    if z is not None:
        g.create_dataset("atomic_numbers", data=np.asarray(z, dtype=np.int16))
    if conf is not None:
        g.create_dataset("conformations", data=np.asarray(conf, dtype=np.float32))
    if energy is not None:
        g.create_dataset("dft_total_energy", data=np.asarray(energy, dtype=np.float64))
    if grad is not None:
        g.create_dataset("dft_total_gradient", data=np.asarray(grad, dtype=np.float32))
    _str(g, "subset", subset)
    if smiles is not None:
        _str(g, "smiles", smiles)
    return g


def test_spice_units_on_water(tmp_path):
    path = tmp_path / "spice.hdf5"
    with h5py.File(path, "w") as f:
        _spice_group(f, "[H]O[H]", WATER_Z, WATER_BOHR[None], [WATER_E_HA], WATER_GRAD[None],
                     smiles="[H:2][O:1][H:3]")
    reader = SpiceHDF5Reader(path)
    (s,) = list(reader)
    np.testing.assert_allclose(s.positions, WATER_BOHR.astype(np.float32) * BOHR_ANG, rtol=1e-7)
    assert s.energy == pytest.approx(WATER_E_HA * HARTREE_EV, rel=1e-9)
    assert s.energy == pytest.approx(-137.9768, abs=1e-3)
    np.testing.assert_allclose(
        s.forces, -WATER_GRAD.astype(np.float32) * HARTREE_EV / BOHR_ANG, rtol=1e-7
    )
    # 0.0123 hartree/bohr on O along z is a force of -0.6325 eV/Å.
    assert s.forces[0, 2] == pytest.approx(-0.63249, abs=1e-4)
    assert (s.charge, s.spin, s.charge_known, s.subset) == (0, 1, True, "SPICE PubChem Set 1")
    assert s.split in ("train", "val", "test")
    assert reader.report.read == 1 and reader.report.num_bad == 0


@pytest.mark.parametrize(
    "smiles, charge",
    [("[NH4+]", 1), ("CC(=O)[O-]", -1), ("C[N+](=O)[O-]", 0), ("[Fe+2]", 2), ("[Co+++]", 3),
     ("[O-:4]C(=O)C", -1), ("c1cc[nH+]cc1", 1), ("[H:1][O:2][H:3]", 0), ("[Cl-].[Na+]", 0),
     ("[N-]=[N+]=[N-]", -1)],
)
def test_smiles_total_charge(smiles, charge):
    assert smiles_total_charge(smiles) == charge


def test_spice_charge_sources_and_corrupt_records(tmp_path):
    path = tmp_path / "spice.hdf5"
    conf = np.stack([WATER_BOHR, WATER_BOHR + 0.01, WATER_BOHR - 0.01])
    grad = np.stack([WATER_GRAD] * 3)
    with h5py.File(path, "w") as f:
        _spice_group(f, "acetate", [6, 6, 8, 8, 1, 1, 1], np.zeros((2, 7, 3)) + np.arange(7)[:, None],
                     [-1.0, -1.1], np.zeros((2, 7, 3)), subset="ions", smiles="CC(=O)[O-]")
        g = _spice_group(f, "attr-charge", WATER_Z, conf, [1.0, np.nan, 2.0], grad, subset="water")
        g.attrs["total_charge"] = 1
        g.attrs["spin_multiplicity"] = 2
        _spice_group(f, "no-smiles", WATER_Z, conf[:1], [1.0], grad[:1], subset="water")
        _spice_group(f, "missing-gradient", WATER_Z, conf, [1.0, 2.0, 3.0], None)
        _spice_group(f, "zero-atoms", [], np.zeros((2, 0, 3)), [1.0, 2.0], np.zeros((2, 0, 3)))
        _spice_group(f, "count-mismatch", WATER_Z, conf, [1.0, 2.0], grad)
        bad_pos = conf.copy()
        bad_pos[1, 0, 0] = np.inf
        _spice_group(f, "inf-position", WATER_Z, bad_pos, [1.0, 2.0, 3.0], grad)
        _spice_group(f, "unknown-element", [8, 1, 0], conf[:1], [1.0], grad[:1])
    reader = open_dataset(path)
    got = list(reader)
    by_group = {}
    for s in got:
        by_group.setdefault(s.group, []).append(s)
    assert [s.charge for s in by_group["acetate"]] == [-1, -1]
    assert [(s.charge, s.spin) for s in by_group["attr-charge"]] == [(1, 2), (1, 2)]
    assert by_group["no-smiles"][0].charge_known is False
    assert len(by_group["inf-position"]) == 2
    rep = reader.report
    assert rep.read == 2 + 2 + 1 + 2
    assert rep.bad == {
        "non-finite energy": 1,
        "missing key 'dft_total_gradient'": 3,
        "zero atoms": 2,
        "inconsistent conformer counts (conformations (3, 3, 3), energy (2,), gradient (3, 3, 3))": 3,
        "non-finite positions": 1,
        "unknown element": 1,
    }
    assert rep.charge_unknown == 3  # no-smiles (1) and the good inf-position conformers (2)
    assert "missing key 'dft_total_gradient'" in str(rep)
    assert rep.examples["non-finite energy"] == ["attr-charge/1"]
    # the subset filter skips whole groups without reading them
    assert {s.subset for s in SpiceHDF5Reader(path, subsets={"ions"})} == {"ions"}


def test_extxyz_mace_off_layout_and_corrupt_frames(tmp_path):
    from ase import Atoms
    from ase.io import write

    frames = []
    for k in range(3):
        a = Atoms(WATER_Z, positions=WATER_BOHR * BOHR_ANG + 0.01 * k)
        a.info["REF_energy"] = -137.97 - k
        a.info["config_type"] = "water" if k < 2 else "PubChem"
        a.arrays["REF_forces"] = np.full((3, 3), 0.1 * k)
        frames.append(a)
    frames[2].info["total_charge"] = -1
    good = tmp_path / "good.xyz"
    write(good, frames, format="extxyz")
    text = good.read_text()
    nan_frame = text.split("\n3\n")[0].replace("REF_energy=-137.97", "REF_energy=nan")
    no_energy = text.split("\n3\n")[0].replace("REF_energy=-137.97 ", "")
    lines = text.splitlines(keepends=True)
    bad = tmp_path / "bad.xyz"
    bad.write_text(
        text + "three\nnot a frame\nO 0 0 0\n" + nan_frame + "\n" + no_energy + "\n" + "".join(lines[:4])
    )
    reader = ExtXYZReader(bad)
    got = list(reader)
    assert len(got) == 3
    assert [s.subset for s in got] == ["water", "water", "PubChem"]
    assert got[2].charge == -1 and got[2].charge_known and not got[0].charge_known
    np.testing.assert_allclose(got[1].forces, 0.1)
    assert got[1].energy == pytest.approx(-138.97)
    assert reader.report.bad == {
        "unparsable atom-count line": 1,
        "non-finite energy": 1,
        "missing key 'REF_energy'": 1,
        "truncated frame": 1,
    }
    assert reader.report.charge_unknown == 2


def test_extxyz_plain_energy_forces_keys(tmp_path):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    a = Atoms(WATER_Z, positions=WATER_BOHR * BOHR_ANG)
    a.calc = SinglePointCalculator(a, energy=-1.5, forces=np.ones((3, 3)))
    write(tmp_path / "p.extxyz", [a], format="extxyz")
    (s,) = list(open_dataset(tmp_path / "p.extxyz"))
    assert s.energy == -1.5 and np.all(s.forces == 1.0)


@pytest.mark.parametrize("use_fairchem", [True, False])
def test_aselmdb_omol25_layout(tmp_path, use_fairchem):
    if use_fairchem:
        pytest.importorskip("fairchem.core.datasets")
    import ase.db
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    path = tmp_path / "omol.aselmdb"
    db = ase.db.connect(str(path), use_lock_file=False)
    for k in range(3):
        a = Atoms(WATER_Z, positions=WATER_BOHR * BOHR_ANG + 0.01 * k)
        a.calc = SinglePointCalculator(a, energy=-137.9 - k, forces=np.full((3, 3), 0.2 * k))
        db.write(a, data={"charge": k - 1, "spin": 2 if k == 1 else 1, "data_id": "elytes",
                          "source": f"w/{k}"})
    db.write(Atoms(WATER_Z, positions=WATER_BOHR), data={"charge": 0, "spin": 1, "source": "w/3"})
    nan = Atoms(WATER_Z, positions=WATER_BOHR)
    nan.calc = SinglePointCalculator(nan, energy=float("nan"), forces=np.zeros((3, 3)))
    db.write(nan, data={"charge": 0, "spin": 1, "source": "w/4"})
    if hasattr(db, "close"):
        db.close()
    reader = AseDBReader(path, use_fairchem=use_fairchem)
    got = list(reader)
    assert [(s.charge, s.spin, s.subset) for s in got] == [(-1, 1, "elytes"), (0, 2, "elytes"),
                                                           (1, 1, "elytes")]
    assert got[2].energy == pytest.approx(-139.9)
    np.testing.assert_allclose(got[2].forces, 0.4)
    np.testing.assert_allclose(got[1].positions, WATER_BOHR * BOHR_ANG + 0.01)
    assert reader.report.bad == {"missing key 'energy'": 1, "non-finite energy": 1}


def test_reference_energies_recover_exact_offsets():
    rng = np.random.default_rng(0)
    truth = {1: -13.6, 6: -1029.0, 8: -2041.0}
    zs = [rng.choice([1, 6, 8], size=rng.integers(2, 9)) for _ in range(40)]
    energies = [sum(truth[int(z)] for z in zz) for zz in zs]
    got = fit_reference_energies(zs, energies)
    assert got.keys() == truth.keys()
    for z in truth:
        assert got[z] == pytest.approx(truth[z], abs=1e-8)
    with pytest.raises(ValueError):
        fit_reference_energies([], [])


def test_unknown_format_is_a_clear_error(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_dataset(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "missing.h5")
