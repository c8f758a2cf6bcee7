"""Masks carried from slice to slice: a found cross-section's box prompts SAM on the neighbouring slice.

The slice presence of a finding is read per slice, and it is erratic along a volume: a nodule found on slices 14-21
scores 0.05-0.09 on slices 9-13 and 22-31 that hold it as plainly, so the presence floor empties them (or the engine
never draws them a box). A 3D object's cross-sections change little from one slice to the next, so SAM, prompted on
an empty slice with the box of its neighbour's mask, outlines the same object there. The new mask is kept only if it
continues its source: Dice with the source's mask at least ``min_dice``, at most ``max_growth`` times its area, a
contrast to its own surround (``contrast``, in units of the surround's spread) at least ``min_contrast_ratio`` times
the source's, and SAM's IoU estimate at least the engine's ``min_sam_iou``; then it becomes a source in turn, until
nothing continues. Limit: nothing here tells the object's end from a structure that continues it (a vessel or duct
running on through the slices carries a mask along with it); the calibrated rule judges what it makes.

It runs on the maps the rule will judge (after the presence floor), so only what survived the floor is carried, and
only into slices left empty (no pixel at ``MASK_AT``). Every step reads no truth: the path stays zero-shot. SAM embeds
each slice it visits once per volume, whatever the number of prompts.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import ModelError
from ...inference.preprocessing import INTENSITIES, fit_slices, unfit_slices
from ...io.geometry import array_axis_of
from .occlusion import MASK_AT, grow_mask

PROPAGATE = {"min_dice": 0.5, "max_growth": 1.5, "min_contrast_ratio": 0.5}
RING = 4  # pixels: the surround a mask's contrast is measured against


def propagation_settings(spec: dict) -> dict | None:
    """The spec's ``inference.propagate``: false / absent -> None (off); true -> ``PROPAGATE``; an object -> its
    values over ``PROPAGATE`` (``min_dice`` in 0..1, ``max_growth`` >= 1, ``min_contrast_ratio`` >= 0)."""
    given = (spec.get("inference") or {}).get("propagate", False)
    if given is False or given is None:
        return None
    cfg = dict(PROPAGATE) if given is True else given
    if not isinstance(cfg, dict) or set(cfg) - set(PROPAGATE):
        raise ModelError(f"model {spec.get('id')!r}: inference.propagate {given!r} is true, false or an object of "
                         f"{', '.join(PROPAGATE)}")
    cfg = {**PROPAGATE, **cfg}
    if not 0.0 <= float(cfg["min_dice"]) <= 1.0 or float(cfg["max_growth"]) < 1.0 or cfg["min_contrast_ratio"] < 0:
        raise ModelError(f"model {spec.get('id')!r}: inference.propagate min_dice {cfg['min_dice']} must lie in "
                         f"0..1, max_growth {cfg['max_growth']} be at least 1 and min_contrast_ratio "
                         f"{cfg['min_contrast_ratio']} at least 0")
    return cfg


def _box(mask: torch.Tensor) -> list[float]:
    """Bool ``[S,S]`` (not empty) -> its bounding box XYXY in pixels."""
    ys, xs = mask.nonzero(as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def contrast(image: torch.Tensor, mask: torch.Tensor) -> float:
    """|mean inside ``mask`` - mean of the ``RING``-pixel ring around it| / the ring's standard deviation (``image``,
    ``mask`` ``[H,W]``): how far the region stands out from its surround, in units of the surround's spread."""
    ring = grow_mask(mask, RING) & ~mask
    if not ring.any():
        return 0.0
    around = image[ring]
    return float((image[mask].mean() - around.mean()).abs() / around.std().clamp_min(1e-6))


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    from monai.metrics import compute_dice

    return float(compute_dice(a[None, None].float(), b[None, None].float(), include_background=True,
                              ignore_empty=False)[0, 0])


class SlicePropagation:
    """Carries masks along the slice axis of one volume (module docstring). ``engine``: the MedCLIP-SAM engine (its
    SAM, input size, fit and precision; its ``min_sam_iou`` is the IoU floor, ``min_iou``); ``volume`` ``[K,J,I]`` raw intensities;
    ``slice_axis``: voxel axis (0=I, 1=J, 2=K). SAM embeddings are kept per slice for the life of the object (the
    calibration carries masks of the same volume under several floors)."""

    def __init__(self, engine, volume: np.ndarray, slice_axis: int, settings: dict):
        prep = engine.preprocessing
        self.engine, self.settings, self.axis = engine, settings, array_axis_of(slice_axis)
        self.slices = INTENSITIES[prep.intensity](volume).movedim(self.axis, 0)  # [N,a,b], normalised as predicted
        flat = self.slices.flatten(1)
        self.active = ((flat.amax(1) - flat.amin(1)) > 1e-6).tolist()
        self.min_iou = engine.min_sam_iou  # SAM IoU floor of a carried mask (the calibration sets its candidate)
        self.embeddings: dict[int, torch.Tensor] = {}
        self.visited = 0  # slices SAM was asked about (for reports and tests)

    def _fit(self, maps: torch.Tensor) -> torch.Tensor:
        prep = self.engine.preprocessing
        return fit_slices(maps.float(), prep.input_size, prep.fit)

    def _embed(self, ks: list[int]) -> None:
        new = [k for k in ks if k not in self.embeddings]
        if new:
            x = self._fit(self.slices[new][:, None]).to(self.engine.device)
            for k, e in zip(new, self.engine.sam.embed(x, self.engine.precision)):
                self.embeddings[k] = e[None]

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """Probabilities ``[P,K,J,I]`` (after the presence floor) -> the same array, empty slices next to a mask
        filled where SAM's mask there continues it (in place)."""
        maps = torch.from_numpy(np.moveaxis(masks, 1 + self.axis, 1))  # [P,N,a,b], a view of ``masks``
        on = maps > MASK_AT
        frontier = on.flatten(2).any(2)  # [P,N]: the slices masks are carried from this round
        filled = frontier.clone()
        size = self.engine.preprocessing.input_size
        n = maps.shape[1]
        while frontier.any():
            targets: dict = {}  # (prompt, empty slice) -> the slice its mask is carried from (the first found)
            for p, j in frontier.nonzero().tolist():
                for k in (j - 1, j + 1):
                    if 0 <= k < n and self.active[k] and not filled[p, k]:
                        targets.setdefault((p, k), j)
            frontier = torch.zeros_like(frontier)
            if not targets:
                break
            wanted: dict[int, list] = {}  # slice -> [(prompt, source slice)]
            for (p, k), j in targets.items():
                wanted.setdefault(k, []).append((p, j))
            ks = sorted(wanted)
            self._embed(ks)
            self.visited += len(ks)
            for k in ks:
                pairs = wanted[k]
                sources = self._fit(on[[p for p, _ in pairs], [j for _, j in pairs]][:, None])[:, 0] > MASK_AT
                keep = [i for i in range(len(pairs)) if sources[i].any()]
                if not keep:
                    continue
                boxes = torch.tensor([_box(sources[i]) for i in keep])
                out = self.engine.sam.decode(self.embeddings[k], (size, size), boxes)
                probs = unfit_slices(out.probabilities[:, None].cpu(), tuple(maps.shape[-2:]),
                                     self.engine.preprocessing.fit)[:, 0].clamp_(0, 1)
                for row, i in enumerate(keep):
                    p, j = pairs[i]
                    new, src = probs[row] > MASK_AT, on[p, j]
                    if (float(out.iou[row]) < self.min_iou or not new.any()
                            or new.sum() > self.settings["max_growth"] * src.sum()
                            or _dice(new, src) < self.settings["min_dice"]
                            or contrast(self.slices[k], new) < self.settings["min_contrast_ratio"] * contrast(
                                self.slices[j], src)):
                        continue
                    maps[p, k] = probs[row]
                    on[p, k], filled[p, k], frontier[p, k] = new, True, True
        return masks


__all__ = ["PROPAGATE", "SlicePropagation", "propagation_settings"]
