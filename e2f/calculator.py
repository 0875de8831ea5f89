"""E2FCalculator: an ASE calculator around E2FormerV2 (energy, forces)."""
from __future__ import annotations

from ase.calculators.calculator import Calculator, all_changes

from e2f.batch import AtomsBatch
from e2f.model import E2FormerV2


class E2FCalculator(Calculator):
    """ASE calculator: ``energy`` (eV) and conservative ``forces`` (eV/Å).

    Parameters
    ----------
    model : E2FormerV2
        Put in eval mode; its parameters' dtype and device are used for the inputs.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model: E2FormerV2, **kwargs):
        super().__init__(**kwargs)
        self.model = model.eval()
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        batch = AtomsBatch.from_ase(self.atoms, dtype=self.dtype, device=self.device)
        out = self.model(batch, compute_forces=True, create_graph=False)
        energy = float(out["energy"].detach()[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
        }
