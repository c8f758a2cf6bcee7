"""Occlusion choice between SAM masks: which region holds what made the slice score the finding?

A prompt's saliency may light another object that CLIP confuses with the finding (a cyst for a nodule: both are
darker than the tissue), so its largest component's box lands there. The slice's presence score says whether the
finding is in the slice; filling a candidate mask's region with the tissue around it and scoring the slice again
says whether that region is why: among a prompt's boxes on a slice, the mask whose removal leaves the least presence
is kept. No mask supervision: only the presence score of the engine's own CLIP (trained from captions) is read.

The fill: the mask grown by ``INNER`` pixels, each of its pixels drawn (with replacement) from the ring between
``INNER`` and ``OUTER`` pixels around the mask (the tissue's own grey levels and speckle spread, not its texture),
with a fixed seed for each slice, so a slice is filled the same way whatever batch it is in.

Limits: the choice is made before SAM's IoU floor (``presence.min_sam_iou``; a chosen box under it leaves the slice
empty for that prompt, as the calibration, which records the chosen box's IoU, assumes); a mask spilling over most of
the slice removes most of any evidence and so tends to win, as a box the saliency drew that large would anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INNER, OUTER = 2, 8  # pixels: the filled hole grows the mask by INNER; the ring sampled reaches OUTER
MASK_AT = 0.5  # SAM probability from which a pixel belongs to the mask


def _grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Bool ``[H,W]`` -> bool ``[H,W]`` grown by ``pixels`` (a square structuring element)."""
    k = 2 * pixels + 1
    return F.max_pool2d(mask[None, None].float(), k, stride=1, padding=pixels)[0, 0] > 0


def fill_with_surround(image: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A slice ``[H,W]`` with the region ``mask`` (bool ``[H,W]``) grown by ``INNER`` pixels replaced by pixels drawn
    from the ring around it (module docstring); a ring with no pixel (the mask covers the slice): the slice's
    mean. -> a new ``[H,W]`` tensor."""
    hole = _grow(mask, INNER)
    ring = _grow(mask, OUTER) & ~hole
    out = image.clone()
    n = int(hole.sum())
    if n == 0:
        return out
    source = image[ring]
    if source.numel() == 0:
        out[hole] = image.mean()
        return out
    g = torch.Generator().manual_seed(seed)
    out[hole] = source[torch.randint(source.numel(), (n,), generator=g).to(source.device)]
    return out


def choose_by_occlusion(x: torch.Tensor, candidates, score, chunk: int = 32) -> dict:
    """Slices ``x`` ``[B,1,H,W]`` in [0,1]; ``candidates``: (slice, prompt, k, SAM probabilities ``[H,W]``) of every
    box; ``score(images [N,1,H,W]) -> [N,P]`` (the engine's slice presence of every prompt), called on at most
    ``chunk`` images at a time -> {(slice, prompt): k} the candidate whose region, filled with the tissue around it,
    leaves that prompt's presence lowest: the region that holds what the presence score saw (module docstring). A
    (slice, prompt) with one candidate takes it unscored; an empty mask (no pixel at ``MASK_AT``) removes nothing, so
    it wins when filling each of the others raises the presence (none of them holds it); ties go to the first (the
    largest saliency component)."""
    groups: dict = {}
    for i, j, k, mask in candidates:
        groups.setdefault((i, j), []).append((k, mask >= MASK_AT))
    chosen = {key: group[0][0] for key, group in groups.items()}
    rivals = [(key, k, mask) for key, group in groups.items() if len(group) > 1 for k, mask in group]
    left = []
    for start in range(0, len(rivals), chunk):
        part = rivals[start:start + chunk]
        filled = torch.stack([fill_with_surround(x[i, 0], mask) for (i, _), _, mask in part])[:, None]
        left += score(filled).float()[torch.arange(len(part)), torch.tensor([j for (_, j), _, _ in part])].tolist()
    lowest: dict = {}
    for (key, k, _), value in zip(rivals, left):
        if key not in lowest or value < lowest[key][0]:
            lowest[key] = (value, k)
    chosen.update({key: k for key, (_, k) in lowest.items()})
    return chosen


__all__ = ["INNER", "OUTER", "MASK_AT", "fill_with_surround", "choose_by_occlusion"]
