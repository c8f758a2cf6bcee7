"""Phantom families by name, so every consumer (evaluator, training banks, calibration) can draw either.

``"A"``: ``phantoms`` (echogenicity x Gaussian speckle, log-compressed). ``"B"``: ``scatter_phantoms`` (point
scatterers, pulse and beam, envelope, attenuation and TGC). ``"A+B"``: a mixture, each seed's family drawn from
the seed (half and half), for training or calibration banks. All return a ``phantoms.Phantom`` with the same
findings, phrasings and array layout (``[J, I]`` or ``[K, J, I]``, spacing in mm in array order).
"""

from __future__ import annotations

import numpy as np

from . import phantoms, scatter_phantoms
from .phantoms import Phantom

FAMILIES = {
    "A": "echogenicity x low-pass complex Gaussian speckle, log-compressed (synthetic.phantoms)",
    "B": "point scatterers x pulse/beam PSF, Hilbert envelope, attenuation integral, imperfect TGC, "
         "log or power-law compression (synthetic.scatter_phantoms)",
}
MIXTURE = "A+B"


def check_family(family: str) -> str:
    """The family name, or ValueError naming the valid ones."""
    if family not in FAMILIES and family != MIXTURE:
        raise ValueError(f"phantom family {family!r} is not one of {', '.join([*FAMILIES, MIXTURE])}")
    return family


def family_of(seed: int, family: str) -> str:
    """The single family (``"A"`` or ``"B"``) that draws ``seed``: ``family`` itself, or for the mixture one picked
    by the seed (the same on every machine)."""
    if check_family(family) != MIXTURE:
        return family
    return "AB"[int(np.random.default_rng([seed, 13]).random() < 0.5)]


def make_phantom(shape, spacing=None, seed: int = 0, findings=None, family: str = "A") -> Phantom:
    """One phantom of ``family`` (``phantoms.make_phantom`` or ``scatter_phantoms.make_scatter_phantom``)."""
    make = phantoms.make_phantom if family_of(seed, family) == "A" else scatter_phantoms.make_scatter_phantom
    return make(shape, spacing, seed=seed, findings=findings)


def random_volume_phantom(seed: int, family: str = "A") -> Phantom:
    """A random 3D phantom ``[K, J, I]`` of ``family`` (``phantoms.random_volume_phantom`` or
    ``scatter_phantoms.random_scatter_volume``); family A gives exactly what it always gave."""
    if family_of(seed, family) == "A":
        return phantoms.random_volume_phantom(seed)
    return scatter_phantoms.random_scatter_volume(seed)
