"""Is this image like the ones the model learned from? A cheap check on what the network actually sees.

A model spec's ``domain`` entry states the modality of its training data and, for a few intensity and texture
statistics of the network's input slices (normalised per image to [0, 1], resized to the input size), the range its
training images covered::

    "domain": {"modality": "B-mode ultrasound (CLIPSeg phantoms)",
               "features": {"speckle": [0.21, 0.62], "dark_fraction": [0.0, 0.09], ...},
               "source": "..."}

``check_domain`` measures the same statistics on the slices of a run (the median over slices) and returns a warning
for each that falls outside its range. A CT or MRI given to an ultrasound model has far less speckle and far more
empty background; such a run is flagged in the CLI, the JSON events and the Slicer status, and its findings carry
``out_of_domain``. The statistics are deliberately coarse: they catch another modality, not a subtle shift.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FEATURES = {
    "speckle": "speckle texture (median local std / local mean in tissue, 3x3 windows)",
    "dark_fraction": "share of near-black pixels (< 0.02 after normalisation)",
    "median": "median normalised intensity",
}
MARGIN = 0.5  # a reference range is widened by this factor: [low / (1 + MARGIN), high * (1 + MARGIN)]


def slice_features(slices: torch.Tensor) -> dict[str, np.ndarray]:
    """Network input slices ``[N,1,S,S]`` in [0, 1] -> {feature name: ``[N]`` values} (see ``FEATURES``)."""
    x = slices.float()
    mean = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    var = (F.avg_pool2d(x * x, 3, 1, 1, count_include_pad=False) - mean ** 2).clamp_min(0)
    ratio = var.sqrt() / mean.clamp_min(1e-6)
    tissue = mean > 0.15
    speckle = [float(r[t].median()) if t.any() else 0.0 for r, t in zip(ratio, tissue)]
    flat = x.flatten(1)
    return {"speckle": np.asarray(speckle, np.float32),
            "dark_fraction": (flat < 0.02).float().mean(1).numpy(),
            "median": flat.median(1).values.numpy()}


def volume_features(slices: torch.Tensor) -> dict[str, float]:
    """The features of a run: the median over its slices ``[N,1,S,S]`` (slices with no signal left out)."""
    active = (slices.flatten(1).amax(1) - slices.flatten(1).amin(1)) > 1e-6
    if not active.any():
        return {}
    return {k: float(np.median(v)) for k, v in slice_features(slices[active]).items()}


def reference_ranges(samples: dict[str, np.ndarray], margin: float = MARGIN) -> dict[str, list[float]]:
    """Feature values of in-domain runs -> {feature: [low, high]}: their smallest and largest value, divided and
    multiplied by ``1 + margin`` (the features are non-negative; a relative margin keeps a low bound above 0)."""
    return {k: [round(float(np.min(v)) / (1 + margin), 4), round(float(np.max(v)) * (1 + margin), 4)]
            for k, v in samples.items()}


def check_domain(features: dict[str, float], domain: dict | None) -> list[str]:
    """Warnings (empty: in domain, or the model states no domain) for each feature outside the model's range."""
    ranges = (domain or {}).get("features") or {}
    warnings = []
    for name, (lo, hi) in ranges.items():
        value = features.get(name)
        if value is not None and not lo <= value <= hi:
            warnings.append(f"{FEATURES.get(name, name)} is {value:.3f}, outside the {lo:.3f}..{hi:.3f} of the "
                            f"model's training images")
    return warnings


def comparable_domain(domain: dict | None, preprocessing) -> dict | None:
    """``domain`` if its ranges were measured on slices prepared as ``preprocessing`` (``engines.contract``) prepares
    them (same input size and fit: padding adds black that the near-black share would count), else None (no check)."""
    measured = (domain or {}).get("measured_with") or {}
    if domain and measured and (measured.get("input_size"), measured.get("fit")) != \
            (preprocessing.input_size, preprocessing.fit):
        return None
    return domain


def domain_message(warnings: list[str], domain: dict | None) -> str:
    """One line for the user: what the model was trained on and why this image does not look like it."""
    modality = (domain or {}).get("modality", "its training data")
    return (f"warning: this image does not look like what the model was trained on ({modality}): "
            + "; ".join(warnings) + ". Findings may be wrong, including confident ones: use a model trained on "
            "this kind of image (or fine-tune one on a few labelled slices)")


def pipeline_slices(volume: np.ndarray, array_axis: int, size: int, fit: str = "squash") -> torch.Tensor:
    """A ``[K,J,I]`` volume as the network sees it: normalised as a whole, cut along ``array_axis`` (0=K, 1=J,
    2=I), fitted to ``size`` (``preprocessing.fit_slices``) -> ``[N,1,size,size]``."""
    from .preprocessing import fit_slices, normalize_intensity

    return fit_slices(normalize_intensity(volume).movedim(array_axis, 0)[:, None], size, fit)


def phantom_reference(n_volumes: int = 30, n_images: int = 60, size: int = 128, margin: float = MARGIN,
                      fit: str = "squash", family: str = "A") -> dict:
    """The ``features`` of a spec's ``domain`` for the phantom-trained models: ranges over the volume features of
    ``n_volumes`` training-seed 3D phantoms (``datasets.TRAIN_VOLUME_SEED_BASE``) and ``n_images`` training-seed 2D
    phantoms (``datasets.TRAIN_SEED_BASE``) of ``family`` (``synthetic.families``: "A+B" picks one per seed, as the
    training bank does), prepared as the pipeline prepares a run (no augmentation: the ranges say what in-domain
    input looks like, not what augmentation can reach)."""
    from ..synthetic.families import random_volume_phantom
    from ..training.datasets import TRAIN_SEED_BASE, TRAIN_VOLUME_SEED_BASE, raw_phantom_slice

    runs = [pipeline_slices(random_volume_phantom(TRAIN_VOLUME_SEED_BASE + v, family).image, 0, size, fit)
            for v in range(n_volumes)]
    runs += [pipeline_slices(raw_phantom_slice(TRAIN_SEED_BASE + i, size, family)[0][None], 0, size, fit)
             for i in range(n_images)]
    values = [volume_features(r) for r in runs]
    return reference_ranges({k: np.array([v[k] for v in values]) for k in FEATURES}, margin)


PHANTOM_MODALITY = "B-mode ultrasound-like phantoms (CLIPSeg's generator)"


def phantom_domain(size: int = 128, fit: str = "squash", family: str = "A") -> dict:
    """The ``domain`` entry of a model trained on CLIPSeg's phantoms of ``family`` (``phantom_reference`` at input
    size ``size``, slices fitted by ``fit``); ``measured_with`` says so, and a run prepared otherwise is not checked
    against it."""
    return {"modality": PHANTOM_MODALITY if family == "A" else f"{PHANTOM_MODALITY}, family {family}",
            "features": phantom_reference(size=size, fit=fit, family=family),
            "measured_with": {"input_size": size, "fit": fit},
            "source": f"domain.phantom_reference: 30 training-seed volume phantoms and 60 training-seed 2D phantoms"
                      f"{'' if family == 'A' else f' of family {family}'}, min..max of each feature widened by a "
                      f"factor 1.5"}
