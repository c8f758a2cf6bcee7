"""Segment Anything from a checkpoint file: build (``segment_anything``'s classes), load safely, embed slices once,
decode every box of a slice in one batch.

A SAM is named by a type of ``SAM_TYPES`` (vit_b, the default; vit_l; vit_h; MedSAM is a vit_b checkpoint read with
``normalize="unit"``) or by a dict of sizes (``SamSizes`` fields; the small SAMs of tests and embedded models). The
checkpoint's size is read from its tensors (patch-embedding width, number of blocks) before anything is loaded, so a
checkpoint of another size is refused with the size it is. ``torch.load(weights_only=True)`` or safetensors only
(``segment_anything``'s own builder unpickles the file, so it is not used to load).

Conventions as ``SamPredictor``: slices ``[B,1|3,H,W]`` in [0,1]; boxes ``[N,4]`` XYXY in pixels of the slice;
points ``[N,K,2]`` XY in pixels, labels ``[N,K]`` (1 positive, 0 negative, -1 ignored).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import InputError, ModelError
from ..contract import autocast, inference_copy

# sam: 0-255 with SAM's pixel mean / std (SAM's own checkpoints); unit: each slice min-max scaled to [0,1] (MedSAM)
NORMALIZE = ("sam", "unit")


@dataclass(frozen=True)
class SamSizes:
    """A SAM's architecture: image encoder width / depth / heads and its global-attention blocks, input size and
    patch (pixels), prompt embedding width, window size, decoder MLP width."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    prompt_dim: int = 256
    window_size: int = 14
    mlp_dim: int = 2048
    decoder_heads: int = 8

    def describe(self) -> str:
        """"SAM ViT-L (embed dim 1024, 24 blocks)", or "a SAM of custom size (...)" for sizes no type has."""
        size = f"embed dim {self.embed_dim}, {self.depth} blocks"
        for name, t in SAM_TYPES.items():
            if (t.embed_dim, t.depth) == (self.embed_dim, self.depth):
                return f"SAM ViT-{name[-1].upper()} ({size})"
        return f"a SAM of custom size ({size})"


# segment_anything's build_sam.py sizes (all 1024 px input, 16 px patches, 256-wide prompts)
SAM_TYPES = {
    "vit_b": SamSizes(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamSizes(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamSizes(1280, 32, 16, (7, 15, 23, 31)),
}


def sam_sizes(sam_type: str | dict | SamSizes) -> SamSizes:
    """A type name of ``SAM_TYPES`` or a dict of ``SamSizes`` fields -> ``SamSizes``."""
    if isinstance(sam_type, SamSizes):
        return sam_type
    if isinstance(sam_type, dict):
        try:
            return SamSizes(**{**sam_type, "global_attn_indexes": tuple(sam_type["global_attn_indexes"])})
        except (TypeError, KeyError) as e:
            raise ModelError(f"SAM sizes {sam_type!r} are not SamSizes fields ({e})") from e
    if sam_type not in SAM_TYPES:
        raise ModelError(f"unknown SAM type {sam_type!r}; one of {', '.join(SAM_TYPES)} (MedSAM is vit_b)")
    return SAM_TYPES[sam_type]


def build_sam(sizes: SamSizes):
    """A random-weight ``segment_anything.modeling.Sam`` of ``sizes`` (eval mode), wired as ``build_sam.py`` does."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = sizes.image_size // sizes.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=sizes.depth, embed_dim=sizes.embed_dim, img_size=sizes.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=sizes.num_heads,
            patch_size=sizes.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=sizes.global_attn_indexes, window_size=sizes.window_size, out_chans=sizes.prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=sizes.prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(sizes.image_size, sizes.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=sizes.prompt_dim, mlp_dim=sizes.mlp_dim,
                                          num_heads=sizes.decoder_heads),
            transformer_dim=sizes.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=sizes.prompt_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def checkpoint_sizes(state: dict) -> tuple[int, int]:
    """(image-encoder embed dim, number of blocks) of a SAM state dict, read from tensor shapes and key names.
    ModelError when the tensors are not a SAM's."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        raise ModelError(f"not a SAM checkpoint: no {key} (first keys: {list(state)[:3]})")
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")}
    return int(state[key].shape[0]), (max(blocks) + 1 if blocks else 0)


def load_sam(path: str | os.PathLike, sam_type: str | dict | SamSizes = "vit_b", device="cpu",
             normalize: str = "sam") -> "SamSegmenter":
    """The SAM of checkpoint ``path`` as a ``SamSegmenter`` on ``device``. The checkpoint must be of ``sam_type``:
    otherwise ModelError naming the size it is (e.g. "SAM ViT-L (embed dim 1024, 24 blocks)")."""
    from ...models.weights import load_checkpoint

    state = load_checkpoint(Path(path))
    if "model" in state and isinstance(state["model"], dict):  # training checkpoints (MedSAM's) wrap the weights
        state = state["model"]
    return sam_from_state(state, sam_type, device, normalize, f"SAM checkpoint {path}")


def sam_from_state(state: dict, sam_type: str | dict | SamSizes = "vit_b", device="cpu", normalize: str = "sam",
                   name: str = "SAM weights") -> "SamSegmenter":
    """A ``SamSegmenter`` on ``device`` from a SAM state dict already loaded (e.g. the ``sam.`` tensors of a model's
    safetensors); ``name`` says where it came from in errors. Its size is checked against ``sam_type`` first."""
    sizes = sam_sizes(sam_type)
    got = checkpoint_sizes(state)
    if got != (sizes.embed_dim, sizes.depth):
        found = SamSizes(got[0], got[1], 1, ())
        asked = sam_type if isinstance(sam_type, str) else sizes.describe()
        raise ModelError(f"{name} is {found.describe()}, not the {asked} asked for; pick the SAM type "
                         f"of the file (vit_b, vit_l, vit_h; MedSAM is vit_b) or the checkpoint of that type")
    sam = build_sam(sizes)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{name} does not fit a {sizes.describe()} ({str(e).splitlines()[0]} "
                         f"...); it is damaged or of another SAM variant") from e
    return SamSegmenter(sam.to(device), normalize)


@dataclass
class SamOutput:
    """Masks of one slice: ``probabilities`` ``[N,H,W]`` float32 (sigmoid of SAM's mask logits, slice pixels) and
    ``iou`` ``[N]`` (SAM's predicted IoU), one per box; N = 0 for a slice without boxes."""

    probabilities: torch.Tensor
    iou: torch.Tensor = field(default=None)


class SamSegmenter:
    """SAM on slices: ``embed`` (image encoder, once per slice), ``decode`` (all boxes of one slice in one batch),
    ``segment`` (both, skipping slices without boxes)."""

    def __init__(self, sam, normalize: str = "sam"):
        from segment_anything.utils.transforms import ResizeLongestSide

        if normalize not in NORMALIZE:
            raise ModelError(f"SAM input normalisation {normalize!r} is not one of {', '.join(NORMALIZE)}")
        self.sam, self.normalize = sam.eval(), normalize
        self.image_size = int(sam.image_encoder.img_size)
        self.resize = ResizeLongestSide(self.image_size)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def prepare(self, slices: torch.Tensor) -> torch.Tensor:
        """Slices ``[B,1|3,H,W]`` in [0,1] -> encoder input ``[B,3,S,S]`` (longest side resized to S, normalised,
        padded bottom / right as ``Sam.preprocess``)."""
        if slices.ndim != 4 or slices.shape[1] not in (1, 3):
            raise InputError(f"SAM takes slices [B,1|3,H,W], got {list(slices.shape)}")
        x = slices.to(self.device, torch.float32).expand(-1, 3, -1, -1)
        # not ResizeLongestSide.apply_image_torch: it sizes by shape[0], shape[1] (batch and channels, not H and W)
        target = self.resize.get_preprocess_shape(x.shape[-2], x.shape[-1], self.image_size)
        x = F.interpolate(x, target, mode="bilinear", align_corners=False, antialias=True)
        if self.normalize == "unit":  # MedSAM: each slice min-max scaled to [0,1], then padded with 0
            low = x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
            high = x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
            x = (x - low) / (high - low).clamp_min(1e-8)
            return F.pad(x, (0, self.image_size - x.shape[-1], 0, self.image_size - x.shape[-2]))
        return self.sam.preprocess(x * 255.0)

    @torch.no_grad()
    def embed(self, slices: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Slices ``[B,1|3,H,W]`` in [0,1] -> image embeddings ``[B,C,S/p,S/p]`` float32 (one encoder pass per slice;
        ``precision`` bf16: a bfloat16 copy of the encoder under bf16 autocast, made on first use)."""
        x = self.prepare(slices)
        with autocast(precision, x.device.type):
            return self.encoder(precision)(x).float()

    def encoder(self, precision: str = "fp32") -> torch.nn.Module:
        """The image encoder ``embed`` runs at ``precision``: SAM's own for fp32, a bfloat16 copy for bf16
        (``contract.inference_copy``, made on first use: SAM's weights are not to change after it)."""
        return inference_copy(self.sam.image_encoder, precision)

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, size: tuple[int, int], boxes: torch.Tensor,
               points: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> SamOutput:
        """One slice's ``embedding`` ``[1,C,h,w]`` (from ``embed``), its ``size`` (H, W) in pixels, ``boxes``
        ``[N,4]`` XYXY pixels (and optional ``points`` ``[N,K,2]`` / ``labels`` ``[N,K]``) -> ``SamOutput`` with N
        masks, decoded in one batch. A box is clipped to the slice; one wholly outside it is an InputError."""
        h, w = int(size[0]), int(size[1])
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).reshape(-1, 4)
        if len(boxes) == 0:
            return SamOutput(torch.zeros(0, h, w, device=self.device), torch.zeros(0, device=self.device))
        outside = (boxes[:, 2] < 0) | (boxes[:, 3] < 0) | (boxes[:, 0] > w - 1) | (boxes[:, 1] > h - 1)
        if outside.any() or (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            bad = boxes[outside | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])][0].tolist()
            raise InputError(f"box {bad} (XYXY pixels) is empty or outside the {w} x {h} slice; give x0 <= x1, "
                             f"y0 <= y1 inside the slice")
        boxes = torch.stack([boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1),
                             boxes[:, 2].clamp(0, w - 1), boxes[:, 3].clamp(0, h - 1)], dim=1)
        point_prompt = None
        if points is not None and points.numel():
            coords = self.resize.apply_coords_torch(torch.as_tensor(points, dtype=torch.float32,
                                                                    device=self.device), (h, w))
            point_prompt = (coords, torch.as_tensor(labels, dtype=torch.int64, device=self.device))
        sparse, dense = self.sam.prompt_encoder(points=point_prompt, boxes=self.resize.apply_boxes_torch(boxes, (h, w)),
                                                masks=None)
        low, iou = self.sam.mask_decoder(image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=False)
        input_size = self.resize.get_preprocess_shape(h, w, self.image_size)
        logits = self.sam.postprocess_masks(low, input_size, (h, w))  # [N,1,H,W]
        return SamOutput(torch.sigmoid(logits[:, 0].float()), iou[:, 0].float())

    def segment(self, slices: torch.Tensor, boxes: list, points: list | None = None,
                labels: list | None = None, precision: str = "fp32") -> list[SamOutput]:
        """Slices ``[B,1|3,H,W]`` in [0,1] and per slice ``boxes[b]`` ``[N_b,4]`` (points / labels likewise, or None)
        -> one ``SamOutput`` per slice. Only slices with at least one box are embedded, all in one encoder batch
        (``embed``'s ``precision``)."""
        if len(boxes) != slices.shape[0]:
            raise InputError(f"{len(boxes)} box lists for {slices.shape[0]} slices; give one (maybe empty) per slice")
        size = tuple(slices.shape[-2:])
        wanted = [b for b, bx in enumerate(boxes) if len(bx)]
        embeddings = self.embed(slices[wanted], precision) if wanted else None
        out = []
        for b, bx in enumerate(boxes):
            if not len(bx):
                out.append(self.decode(None, size, torch.zeros(0, 4)))
                continue
            e = embeddings[wanted.index(b)].unsqueeze(0)
            out.append(self.decode(e, size, bx, None if points is None else points[b],
                                   None if labels is None else labels[b]))
        return out


__all__ = ["SAM_TYPES", "NORMALIZE", "SamSizes", "SamOutput", "SamSegmenter", "build_sam", "checkpoint_sizes",
           "load_sam", "sam_from_state", "sam_sizes"]
