"""SO(3) conventions: e3nn real spherical harmonics, Wigner-D and per-node polar frames.

Everything follows e3nn: degrees stacked l = 0..L, m = -l..l inside a degree, y is the
polar axis and the l = 1 basis is (x, y, z), so ``D^1(R) = R``. Spherical harmonics use
e3nn's ``component`` normalisation (``|Y^l|^2 = 2l + 1``); the first-order solid harmonic
is ``R^1(r) = sqrt(3) r``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from e3nn import o3
from torch import Tensor


def num_rows(lmax: int) -> int:
    """``(lmax + 1)^2``: rows of a feature with all degrees 0..lmax."""
    return (lmax + 1) ** 2


def degree_slice(l: int) -> slice:
    """Rows of degree ``l`` in the stacked layout."""
    return slice(l * l, (l + 1) * (l + 1))


def degree_of_rows(lmax: int) -> Tensor:
    """``[(lmax+1)^2]`` int64: the degree of each row."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


def spherical_harmonics(lmax: int, vec: Tensor, normalize: bool = True) -> Tensor:
    """e3nn spherical harmonics of degrees 0..lmax (component normalisation), ``[..., (L+1)^2]``."""
    return o3.spherical_harmonics(list(range(lmax + 1)), vec, normalize=normalize, normalization="component")


def solid_harmonic_1(r: Tensor) -> Tensor:
    """``R^1(r) = |r| Y^1(r/|r|) = sqrt(3) r``: linear in r, hence defined at r = 0."""
    return math.sqrt(3.0) * r


def polar_angles(r: Tensor) -> tuple[Tensor, Tensor]:
    """e3nn angles ``(alpha, beta)`` with ``R_y(alpha) R_x(beta) y_hat = r / |r|``.

    ``beta = atan2(sqrt(x^2 + z^2), y)`` keeps full precision near the poles (``acos(y)``
    loses half the digits there). On the polar axis and at r = 0, ``alpha = atan2(0, 0) = 0``:
    a deterministic roll. At r = 0 the frame is the identity (``beta = 0``).
    """
    x, y, z = r.unbind(-1)
    alpha = torch.atan2(x, z)
    beta = torch.atan2(torch.sqrt(x * x + z * z), y)
    return alpha, beta


@functools.lru_cache(maxsize=None)
def _so3_generators(l: int) -> Tensor:
    """e3nn's real so(3) generators in float64.

    ``o3.so3_generators`` builds them in the default dtype, and float32 generators limit
    every Wigner-D (and so EAAS) to ~1e-7; they are built once here in float64.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return o3.so3_generators(l).to(torch.float64)
    finally:
        torch.set_default_dtype(previous)


@functools.lru_cache(maxsize=None)
def _rotation_basis(l: int, axis: int, device: torch.device) -> Tensor:
    """``B [2l+1, 2l+1, 2l+1]`` float64 with ``exp(a J) = sum_k f_k(a) B[k]`` for the
    generator ``J`` of ``axis`` and ``f(a) = (1, cos a, .., cos la, sin a, .., sin la)``.

    ``J`` is real and antisymmetric with the simple eigenvalues ``i m``, ``m = -l..l``, so
    ``exp(a J) = sum_m e^{i m a} P_m`` with the projectors ``P_m = v_m v_m^H`` on its unit
    eigenvectors (from the Hermitian ``i J``: stable to rounding); pairing ``m`` with ``-m``
    gives the real terms ``cos(m a) 2 Re P_m`` and ``sin(m a) (-2 Im P_m)``.
    """
    # i J v = -m v  <=>  J v = i m v
    values, vectors = torch.linalg.eigh(1j * _so3_generators(l)[axis].to(torch.complex128))
    proj = {int(round(-float(v))): torch.outer(vectors[:, k], vectors[:, k].conj()) for k, v in enumerate(values)}
    cos = [proj[0].real] + [2 * proj[m].real for m in range(1, l + 1)]
    sin = [-2 * proj[m].imag for m in range(1, l + 1)]
    # cached per device: a host-to-device copy each call would wait for the device's queue
    return torch.stack(cos + sin).to(device)


def _axis_rotation(l: int, axis: int, angle: Tensor) -> Tensor:
    """``exp(angle J_axis)`` for degree ``l``, ``[..., 2l+1, 2l+1]`` float64, by the
    closed form of ``_rotation_basis`` (no matrix exponential: no host synchronisation)."""
    freq = torch.arange(1, l + 1, dtype=torch.float64, device=angle.device) * angle[..., None]
    f = torch.cat([torch.ones_like(angle)[..., None], torch.cos(freq), torch.sin(freq)], dim=-1)
    basis = _rotation_basis(l, axis, angle.device)
    return (f @ basis.reshape(2 * l + 1, -1)).reshape(*angle.shape, 2 * l + 1, 2 * l + 1)


def wigner_d(l: int, alpha: Tensor, beta: Tensor, gamma: Tensor | None = None) -> Tensor:
    """e3nn Wigner-D of ``R_y(alpha) R_x(beta) R_y(gamma)`` for degree ``l``, ``[..., 2l+1, 2l+1]``.

    Same definition as ``o3.wigner_D`` (``matrix_exp`` of e3nn's generators), evaluated in
    float64 whatever the angles' dtype.
    """
    # gamma None: R_y(0) is the identity, two factors instead of three
    angles = (alpha, beta) if gamma is None else (alpha, beta, gamma)
    angles = [a.double() for a in torch.broadcast_tensors(*angles)]
    d = _axis_rotation(l, 1, angles[0]) @ _axis_rotation(l, 0, angles[1])
    return d if gamma is None else d @ _axis_rotation(l, 1, angles[2])


def wigner_d_from_matrix(lmax: int, rot: Tensor) -> Tensor:
    """Block-diagonal Wigner-D ``[..., (L+1)^2, (L+1)^2]`` of rotation matrices ``[..., 3, 3]``.

    Evaluated in float64 (e3nn's ``Irreps.D_from_matrix`` uses default-dtype generators).
    """
    alpha, beta, gamma = o3.matrix_to_angles(rot.double())
    rows = num_rows(lmax)
    out = rot.new_zeros(*rot.shape[:-2], rows, rows, dtype=torch.float64)
    for l in range(lmax + 1):
        out[..., degree_slice(l), degree_slice(l)] = wigner_d(l, alpha, beta, gamma)
    return out


@dataclass
class PolarFrames:
    """Per-node rotations taking ``r`` to the polar axis: ``D(R) r_hat = y_hat``.

    Attributes
    ----------
    blocks : list of Tensor
        ``blocks[l]`` is ``[n, 2l+1, 2l+1]`` (float64), the Wigner-D of R for degree l.
    norm : Tensor
        ``[n]`` ``|r|``.
    """

    blocks: list[Tensor]
    norm: Tensor
    _derived: dict = field(default_factory=dict, repr=False, compare=False)
    _parent: tuple["PolarFrames", slice] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_vectors(cls, r: Tensor, lmax: int) -> "PolarFrames":
        """Frames of the rows of ``r`` ``[n, 3]``; no gradient flows through them."""
        with torch.no_grad():
            alpha, beta = polar_angles(r.double())
            # D(R_y(alpha) R_x(beta)) takes y_hat to r_hat; its transpose is R. D^0 = 1.
            blocks = [alpha.new_ones(alpha.shape[0], 1, 1)]
            blocks += [wigner_d(l, alpha, beta).transpose(-1, -2).contiguous() for l in range(1, lmax + 1)]
            return cls(blocks=blocks, norm=r.norm(dim=-1))

    def split(self, n: int) -> tuple["PolarFrames", "PolarFrames"]:
        """The frames of rows ``[:n]`` and ``[n:]``, sharing this object's derived tensors."""
        parts = []
        for rows in (slice(0, n), slice(n, None)):
            parts.append(PolarFrames([b[rows] for b in self.blocks], self.norm[rows], _parent=(self, rows)))
        return parts[0], parts[1]

    def derived(self, key, make: Callable[["PolarFrames"], list[Tensor]]) -> list[Tensor]:
        """``make(self)``, tensors with one row per frame, computed once per frames object and ``key``.

        One frames object serves every layer of a forward (``Graph.frames``), so casts and
        products of the blocks built here cost one launch per forward instead of one per use;
        frames from :meth:`split` slice their parent's.
        """
        if self._parent is not None:
            parent, rows = self._parent
            return [t[rows] for t in parent.derived(key, make)]
        if key not in self._derived:
            with torch.no_grad():
                self._derived[key] = make(self)
        return self._derived[key]

    def blocks_as(self, dtype: torch.dtype) -> list[Tensor]:
        """``blocks`` cast to ``dtype`` (cached)."""
        return self.derived(("blocks", dtype), lambda f: [b.to(dtype) for b in f.blocks])
