"""Text-conditioned saliency: where in a slice a CLIP sees what a prompt names, as a map of the slice's size.

Three methods; the first two through the ``grad-cam`` package (``pytorch_grad_cam``):

- ``gscorecam`` (MedCLIP-SAM v1, after Chen et al.'s gScoreCAM): the gradient of the image-text score ranks the
  channels of a vision layer; only the top ``topk`` channels are scored (each channel's map, upsampled and min-max
  scaled, masks the image; the masked images go through the image tower in batches; softmax of their scores weighs
  the channels). About ``topk / batch_size`` image-tower passes per slice and prompt; a channel in the top-k of
  several prompts is scored once for all of them (the masked image is the same; the tower scores every prompt).
- ``gradcam``: channels weighted by their mean gradient (one forward and one backward pass per prompt): cheap.
- ``patch_similarity`` (dense patch-text similarity, as MaskCLIP / CLIP Surgery read a CLIP densely): the last
  block's patch tokens go through the tower's final norm and projection (``dense_features``), so each patch is an
  embedding in the text space; the map is the cosine of each patch with the prompt minus its mean cosine with the
  neutral texts, scaled from its minimum to its maximum (all 0 when no patch is positive). One image forward per
  slice for every prompt, no gradients: the cheapest.
  It localises only as well as the tower's patch tokens follow the text, which a CLIP trained on the pooled token
  alone does not promise (``training.clip_finetune`` adds a patch-level term for that).

A ViT's token layer ``[B, prefix + h*w, C]`` is made a feature map ``[B, C, h, w]`` by ``pytorch_grad_cam``'s
``vit_reshape_transform`` (the class token dropped). The default layer is the last block's first layer norm: the
patch tokens that the class token attends to there (after the last block, patch tokens no longer reach the output).
Text is embedded once per prompt by the caller; only image passes happen here.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ..contract import autocast

METHODS = ("gscorecam", "gradcam", "patch_similarity")
PATCH_SCALE = 10.0  # a patch's logit per unit of (cosine with the prompt - mean cosine with the neutral texts)
PATCH_TOP = 4  # a slice's patch presence reads the mean of its this many highest patch logits


class TextScorer(nn.Module):
    """images ``[B,3,S,S]`` (normalised for the tower) -> logits ``[B,P]``: ``scale`` x cosine of the image
    embedding with each of the P fixed text embeddings ``[P,D]`` (CLIP's logit scale by default)."""

    def __init__(self, clip: nn.Module, text_embeddings: torch.Tensor, scale: float | None = None):
        super().__init__()
        self.clip = clip
        self.register_buffer("text", F.normalize(text_embeddings.detach().float(), dim=-1), persistent=False)
        self.scale = float(clip.logit_scale.exp()) if scale is None else float(scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        return self.scale * image @ self.text.T


def vit_layer(clip: nn.Module, block: int = -1):
    """(layer, (h, w) token grid) of a CLIP image tower: the first layer norm of transformer block ``block`` of
    open_clip's own ViT (``visual.transformer.resblocks``) or of a timm ViT (``visual.trunk.blocks``, BiomedCLIP)."""
    visual = clip.visual
    if hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):
        trunk = visual.trunk
        if getattr(trunk, "num_prefix_tokens", 1) != 1:
            raise InputError(f"timm image tower with {trunk.num_prefix_tokens} prefix tokens; saliency expects one "
                             f"class token")
        return trunk.blocks[block].norm1, tuple(trunk.patch_embed.grid_size)
    if hasattr(visual, "transformer") and hasattr(visual, "grid_size"):
        return visual.transformer.resblocks[block].ln_1, tuple(visual.grid_size)
    raise InputError(f"image tower {type(visual).__name__} is not a ViT this saliency knows (open_clip "
                     f"VisionTransformer or timm ViT)")


def _pytorch_grad_cam():
    try:
        import pytorch_grad_cam
    except ImportError as e:
        raise InputError("saliency needs the grad-cam package (module pytorch_grad_cam); install the pinned version "
                         "from CLIPSeg/Resources/requirements.txt") from e
    return pytorch_grad_cam


def _gscorecam_class():
    """``GScoreCAM``: ``pytorch_grad_cam.base_cam.BaseCAM`` with gScoreCAM's channel weights (made on first use so
    that importing this module does not import the package)."""
    from pytorch_grad_cam.base_cam import BaseCAM

    class GScoreCAM(BaseCAM):
        def __init__(self, model, target_layers, reshape_transform, topk: int, batch_size: int,
                     fill: torch.Tensor | None, precision: str = "fp32", masked_scorer=None):
            super().__init__(model, target_layers, reshape_transform=reshape_transform, compute_input_gradient=True)
            self.topk, self.batch_size, self.fill, self.precision = int(topk), int(batch_size), fill, precision
            self.masked_scorer = masked_scorer or model  # what scores the masked copies (the gradient pass: model)
            # (image index, channel) -> the scorer's output row [P] for that image masked by that channel's map. The
            # activations, hence the masks, are the same for every prompt of one call (one input), and the scorer
            # scores all P prompts at once, so a channel in several prompts' top-k is scored once.
            self.scored: dict[tuple[int, int], torch.Tensor] = {}

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            """activations, grads ``[B,C,h,w]`` (numpy) -> weights ``[B,C]``: 0 but for the top-k channels by mean
            gradient, which get the softmax of the target score of the image masked by their map."""
            acts = torch.from_numpy(activations).to(self.device)
            b, c = acts.shape[:2]
            k = min(self.topk, c)
            top = torch.from_numpy(grads).to(self.device).mean(dim=(2, 3)).topk(k, dim=1).indices  # [B,k]
            weights = torch.zeros(b, c, device=self.device)
            fill = torch.zeros(1, 1, 1, 1, device=self.device) if self.fill is None else self.fill.to(self.device)
            with torch.no_grad():
                for i, target in enumerate(targets):
                    channels = top[i].tolist()
                    todo = [c for c in channels if (i, c) not in self.scored]
                    if todo:
                        maps = F.interpolate(acts[i, todo][None], size=input_tensor.shape[-2:], mode="bilinear",
                                             align_corners=False)[0]
                        low = maps.flatten(1).min(dim=1).values[:, None, None]
                        high = maps.flatten(1).max(dim=1).values[:, None, None]
                        maps = (maps - low) / (high - low + 1e-8)  # [n,H,W] in [0,1]
                        base = input_tensor[i:i + 1].detach() - fill
                        for j in range(0, len(todo), self.batch_size):  # masked copies, batch_size at a time
                            with autocast(self.precision, self.device.type):  # the scorer's rows are float32
                                rows = self.masked_scorer(fill + base * maps[j:j + self.batch_size, None])
                            self.scored.update({(i, ch): row for ch, row in zip(todo[j:j + self.batch_size], rows)})
                    scores = target(torch.stack([self.scored[(i, ch)] for ch in channels]))
                    weights[i, top[i]] = torch.softmax(scores.float(), dim=0)
            return weights.cpu().numpy()

    return GScoreCAM


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """No gradients for ``module``'s weights in the block (only the activations' are needed), restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def dense_features(clip: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image-tower pass -> (image embeddings ``[B,D]``, as ``encode_image``; patch embeddings ``[B,D,h,w]``:
    the last block's patch tokens through the final norm and the projection, the class token's path). ``images``
    ``[B,3,S,S]`` normalised for the tower; open_clip ViT (``visual.proj``) or timm ViT (``visual.head``), through
    their ``forward_intermediates``. Neither is L2-normalised."""
    visual = clip.visual
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise InputError("patch_similarity needs an image tower whose patch tokens share the pooled token's final "
                         "norm and projection (no attention pooling)")
    vit_layer(clip)  # a ViT this module knows, or a named error
    out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NLC")
    tokens = out["image_intermediates"][-1]  # [B,h*w,C] after the final norm, prefix tokens dropped
    if hasattr(visual, "trunk"):
        h, w = visual.trunk.patch_embed.grid_size
        dense = visual.head(tokens)
    else:
        h, w = visual.grid_size
        dense = tokens @ visual.proj if visual.proj is not None else tokens
    return out["image_features"], dense.transpose(1, 2).reshape(dense.shape[0], -1, h, w)


def patch_similarity(dense: torch.Tensor, text_embeddings: torch.Tensor,
                     neutral: torch.Tensor | None = None) -> torch.Tensor:
    """Patch embeddings ``[B,D,h,w]``, prompts ``[P,D]``, neutral texts ``[N,D]`` (or None) -> ``[B,P,h,w]``:
    cos(patch, prompt) - mean_n cos(patch, neutral_n) (differentiable; what ``training.clip_finetune`` trains)."""
    d = F.normalize(dense.float(), dim=1)
    sim = torch.einsum("bdhw,pd->bphw", d, F.normalize(text_embeddings.float(), dim=-1))
    if neutral is not None and len(neutral):
        sim = sim - torch.einsum("bdhw,nd->bnhw", d, F.normalize(neutral.float(), dim=-1)).mean(1, keepdim=True)
    return sim


def patch_presence(similarity: torch.Tensor, top: int = PATCH_TOP) -> torch.Tensor:
    """``patch_similarity`` ``[B,P,h,w]`` -> ``[B,P]`` in (0,1): sigmoid of ``PATCH_SCALE`` x the mean of the
    ``top`` highest patches: the slice-level probability the multiple-instance term of ``training.clip_finetune``
    trains (``--dense-labels caption``)."""
    flat = similarity.flatten(2)
    return torch.sigmoid(PATCH_SCALE * flat.topk(min(top, flat.shape[-1]), dim=-1).values.mean(-1))


def patch_maps(similarity: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``patch_similarity`` ``[B,P,h,w]`` -> ``[B,P,size,size]`` float32: upsampled (bilinear) to ``size`` (default:
    kept at h x w), each map scaled from its minimum (0) to its maximum (1); all 0 where no patch is nearer the prompt
    than the neutral texts (the map itself can say "nothing here"). Scaled from the minimum, not cut at 0: the rim of
    a finding, below 0 but far above the tissue around it, stays in the map and in the box cut from it."""
    sim = similarity.float()
    if size is not None and sim.shape[-1] != size:
        sim = F.interpolate(sim, size=(size, size), mode="bilinear", align_corners=False)
    peak, low = sim.amax(dim=(2, 3), keepdim=True), sim.amin(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, (sim - low) / (peak - low).clamp_min(1e-8), torch.zeros_like(sim))


def saliency(clip: nn.Module, images: torch.Tensor, text_embeddings: torch.Tensor, method: str = "gscorecam",
             topk: int = 300, batch_size: int = 32, block: int = -1,
             fill: torch.Tensor | None = None, neutral: torch.Tensor | None = None,
             precision: str = "fp32", fast: nn.Module | None = None) -> torch.Tensor:
    """Saliency of each prompt in each image.

    ``clip``: an open_clip CLIP (``encode_image``, ``logit_scale``) with a ViT image tower; ``images`` ``[B,3,S,S]``
    normalised for it; ``text_embeddings`` ``[P,D]`` (the prompts, embedded once by the caller). Returns ``[B,P,S,S]``
    float32 in [0,1] on the images' device (each map min-max scaled by ``pytorch_grad_cam``; all 0 where nothing
    scores). ``method``: ``METHODS``; ``topk`` / ``batch_size``: gScoreCAM's channels scored and masked images per
    pass; ``block``: the transformer block whose first layer norm is read; ``fill``: what gScoreCAM's masked-out
    pixels become, ``[1,3,1,1]`` in the normalised space (None: 0, the mean colour, as ``pytorch_grad_cam``'s
    ScoreCAM; black, ``-mean/std``, suits medical images, whose background is dark: with it the map follows the
    prompt, see the tests). Runs with gradients even under ``torch.inference_mode``; the weights are not changed.
    ``patch_similarity`` (``patch_maps``, with ``neutral`` ``[N,D]`` text embeddings) ignores topk, batch_size,
    block and fill, and runs without gradients. ``precision`` bf16: the image-tower passes that cost (gScoreCAM's
    masked copies, patch_similarity's one pass) run under bf16 autocast, through ``fast`` (the same CLIP with
    bfloat16 weights, ``contract.inference_copy``; None: ``clip``); gradients, maps and their scaling stay float32."""
    if method not in METHODS:
        raise InputError(f"saliency method {method!r} is not one of {', '.join(METHODS)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"saliency takes images [B,3,S,S], got {list(images.shape)}")
    if text_embeddings.ndim != 2:
        raise InputError(f"saliency takes text embeddings [P,D], got {list(text_embeddings.shape)}")
    if method == "patch_similarity":
        with torch.no_grad():
            with autocast(precision, images.device.type):
                _, dense = dense_features(fast or clip, images)
            dense = dense.float()
            return patch_maps(patch_similarity(dense, text_embeddings, neutral), images.shape[-1])
    cam_lib = _pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

    layer, (h, w) = vit_layer(clip, block)
    reshape = functools.partial(vit_reshape_transform, height=h, width=w)
    with torch.inference_mode(False), torch.enable_grad(), _frozen(clip):
        x = images.detach().clone().float()  # a normal tensor even if the caller's is an inference tensor
        scorer = TextScorer(clip, text_embeddings.detach().clone())
        if method == "gradcam":
            cam = cam_lib.GradCAM(scorer, [layer], reshape_transform=reshape)
        else:
            masked = TextScorer(fast, scorer.text, scorer.scale) if fast is not None else None
            cam = _gscorecam_class()(scorer, [layer], reshape, topk, batch_size, fill, precision, masked)
        cam.compute_input_gradient = True  # gradients reach the layer even when the CLIP's weights are frozen
        try:
            maps = [cam(x, [ClassifierOutputTarget(p)] * x.shape[0]) for p in range(text_embeddings.shape[0])]
        finally:
            cam.activations_and_grads.release()
    out = np.stack(maps, axis=1).astype(np.float32)  # [B,P,S,S]
    return torch.from_numpy(np.nan_to_num(out, nan=0.0)).to(images.device)


__all__ = ["METHODS", "PATCH_SCALE", "PATCH_TOP", "TextScorer", "dense_features", "patch_maps", "patch_presence",
           "patch_similarity", "saliency", "vit_layer"]
