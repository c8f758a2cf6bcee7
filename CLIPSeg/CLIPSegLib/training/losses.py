"""Loss terms shared by the training recipes (``cliptnseg_recipe``, ``finetune``), beside MONAI's Dice and torch's
BCE."""

from __future__ import annotations

import torch


def rival_negative_loss(logits: torch.Tensor, masks: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    """Pixel BCE towards 0 inside the other phrases' masks of the same slice, averaged per pair over those pixels.

    logits, masks ``[N,S,S]`` (masks {0,1}); pair_index ``[N]``: the slice of each pair. A structure another phrase
    names on that slice is the hardest negative there is (a fourth ventricle for "lateral ventricles"), yet in the
    whole-slice BCE its few pixels weigh next to nothing; here each pair's rival pixels weigh as a whole. -> scalar
    (0 when no pair has a rival pixel)."""
    same = pair_index[:, None] == pair_index[None, :]
    same.fill_diagonal_(False)
    rival = (same.float() @ masks.flatten(1)).view_as(masks) > 0  # [N,S,S]: another pair of the slice holds it
    return per_pair_bce(logits, rival & (masks < 0.5), 0.0)


def foreground_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel BCE towards 1 inside each pair's own mask, averaged per pair over those pixels, then over the pairs that
    have any.

    logits, masks ``[N,S,S]`` (masks {0,1}). In the whole-slice BCE a cluster of calcifications (~100 of 16,384
    pixels) weighs next to nothing, and soft Dice stops pushing once the overlap is good, so small findings end up
    segmented at a mean probability of ~0.83: below the presence rule's mean-probability test, where false blobs
    sit too. Here each pair's finding pixels weigh as a whole, whatever its size. -> scalar (0 when no pair has a
    finding pixel)."""
    return per_pair_bce(logits, masks > 0.5, 1.0)


def per_pair_bce(logits: torch.Tensor, where: torch.Tensor, target: float) -> torch.Tensor:
    """Pixel BCE of ``logits`` [N,S,S] against the constant ``target``, averaged per pair over the pixels of
    ``where`` [N,S,S] (bool), then over the pairs that have any. -> scalar (0, still on the graph, when none has)."""
    counts = where.flatten(1).sum(1)
    if not counts.any():
        return logits.sum() * 0.0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target),
                                                               reduction="none")
    per_pair = (bce * where).flatten(1).sum(1) / counts.clamp(min=1)
    return per_pair[counts > 0].mean()
