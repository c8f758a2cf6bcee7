"""DHN-NCE: the decoupled hard-negative noise-contrastive loss MedCLIP-SAM fine-tunes BiomedCLIP with.

For a batch of B matching (image, text) pairs with L2-normalised embeddings v_i, t_i and temperature tau, let
s_ij = v_i . t_j / tau. Image -> text:

    L_v2t = mean_i  -log( exp(s_ii) / sum_{j != i} W_ij exp(s_ij) ),
    W_ij  = (B - 1) exp(beta1 s_ij) / sum_{k != i} exp(beta1 s_ik)

so the positive is left out of the denominator ("decoupled") and each negative is weighted by how similar it is
("hardness"; the weights of a row average 1). Text -> image is the same on s.T with beta2; the loss is their sum.
beta = 0 makes every weight 1: decoupled InfoNCE. The weights are part of the graph (not detached), as in the formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import InputError


def _direction(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """One direction: ``logits`` [B,B] (row i: anchor i against every candidate j; s_ii the positive) -> [B] losses."""
    b = logits.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=logits.device)
    neg = logits.masked_fill(~off, float("-inf"))  # the positive removed from every sum over j
    hard = (beta * logits).masked_fill(~off, float("-inf"))
    log_w = math.log(b - 1) + hard - torch.logsumexp(hard, dim=1, keepdim=True)  # log W_ij, -inf at j = i
    log_denominator = torch.logsumexp(neg + log_w, dim=1)
    return log_denominator - logits.diagonal()


def dhn_nce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.6, beta1: float = 0.15,
                 beta2: float = 0.15, normalize: bool = True) -> torch.Tensor:
    """DHN-NCE of B matching pairs: ``image_emb``, ``text_emb`` [B,D] (row i of each is a pair; L2-normalised here
    unless ``normalize`` is False) -> scalar loss (mean over the batch of each direction, the two directions summed).
    ``temperature`` tau > 0; ``beta1`` weighs hard negatives image -> text, ``beta2`` text -> image (>= 0).
    Defaults: the MedCLIP-SAM paper's (tau 0.6, beta 0.15). B >= 2 (a pair needs at least one negative)."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise InputError(f"DHN-NCE takes image and text embeddings [B,D] of the same shape, got "
                         f"{list(image_emb.shape)} and {list(text_emb.shape)}")
    if image_emb.shape[0] < 2:
        raise InputError(f"DHN-NCE needs at least 2 pairs per batch (the other pairs are the negatives), got "
                         f"{image_emb.shape[0]}; use a larger batch")
    if temperature <= 0 or beta1 < 0 or beta2 < 0:
        raise InputError(f"DHN-NCE needs temperature > 0 and betas >= 0, got temperature {temperature}, "
                         f"beta1 {beta1}, beta2 {beta2}")
    if normalize:
        image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = image_emb @ text_emb.T / temperature  # [B,B]: images (rows) x texts (columns)
    return _direction(logits, beta1).mean() + _direction(logits.T, beta2).mean()


__all__ = ["dhn_nce_loss"]
