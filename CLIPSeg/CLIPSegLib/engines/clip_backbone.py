"""CLIP towers from open_clip: build from a config, tokenize prompts, normalise images for the image tower.

A CLIP config is a dict, either
  ``{"open_clip_name": "ViT-B-16", "image_size": 352}`` (a named open_clip architecture, e.g. paper size), or
  ``{"embed_dim": 64, "vision_cfg": {...}, "text_cfg": {...}}`` (a custom small model, fields of open_clip's
  ``CLIPVisionCfg`` / ``CLIPTextCfg``);
either with ``"quick_gelu": true`` for towers trained with QuickGELU (OpenAI's CLIP and CLIPSeg).
Weights never come from the internet here: they are loaded by ``CLIPSegLib.models`` from a verified file.
"""

from __future__ import annotations

import functools

import torch

from ..checks import check_prompts  # noqa: F401  (torch-free; re-exported here)
from ..errors import InputError

# Normalisation the image tower was trained with (OpenAI CLIP statistics, per RGB channel).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(cfg: dict) -> torch.nn.Module:
    """Create an open_clip ``CLIP`` model with random weights from ``cfg`` (see module docstring)."""
    import open_clip

    quick_gelu = bool(cfg.get("quick_gelu", False))  # OpenAI's CLIP weights were trained with QuickGELU
    if "open_clip_name" in cfg:
        name = cfg["open_clip_name"]
        if name not in open_clip.list_models():
            import difflib

            close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
            raise InputError(f"unknown open_clip architecture {name!r}; did you mean {close}?")
        kw = {"force_image_size": cfg["image_size"]} if "image_size" in cfg else {}
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, **kw)
    return open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                          quick_gelu=quick_gelu)


class FrozenCLIPNet(torch.nn.Module):
    """Base of a network built around a frozen CLIP (``self.clip``): no gradients, and eval mode whatever mode the
    network is put in (adapters added by training set their own ``requires_grad``)."""

    def freeze_clip(self):
        self.clip.eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    def frozen_visual(self) -> torch.nn.Module:
        """The image tower a forward pass runs: ``clip.visual``, or under CPU bf16 autocast a bfloat16 copy of it
        (``contract.inference_copy``: autocast casts frozen float32 weights again at every op, slower than fp32),
        made once and kept out of the state dict. For training steps under ``--precision bf16``: the tower is frozen,
        so the copy stays its equal; an engine at bf16 runs a copy of the whole network, already bfloat16."""
        visual = self.clip.visual
        weight = next(visual.parameters())
        if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and weight.dtype == torch.float32 and weight.device.type == "cpu"):
            return visual
        from .contract import inference_copy

        return inference_copy(visual, "bf16")


def clip_image_size(clip: torch.nn.Module) -> int:
    """Square input size (pixels) of the image tower."""
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def tokenize(prompts: list[str], context_length: int) -> torch.Tensor:
    """Token ids ``[P, context_length]`` (int64) with open_clip's BPE tokenizer; long prompts are truncated."""
    import open_clip

    return open_clip.tokenize(prompts, context_length=context_length)


@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    """open_clip's ``SimpleTokenizer``: OpenAI CLIP's byte-pair encoding (49,408 tokens), built once."""
    from open_clip.tokenizer import SimpleTokenizer  # the tokenizer open_clip.tokenize uses

    return SimpleTokenizer()


def read_prompt(text: str, context_length: int) -> tuple[tuple[str, ...], str, bool]:
    """How ``tokenize`` reads ``text``: (the BPE pieces kept, the text they spell, whether it was truncated). A
    prompt holds ``context_length - 2`` tokens (start and end tokens take two); the rest is cut."""
    bpe = bpe_tokenizer()
    ids = bpe.encode(text)
    kept = ids[:context_length - 2]
    return tuple(bpe.decode([i]).strip() for i in kept), bpe.decode(kept).strip(), len(ids) > len(kept)


def to_clip_input(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Grey images ``[B,1,H,W]`` in [0,1] -> CLIP input ``[B,3,H,W]``: grey repeated in R, G, B, then normalised by
    the per-channel ``mean`` and ``std`` the image tower was trained with (default: OpenAI CLIP's)."""
    mean = images.new_tensor(mean).view(1, 3, 1, 1)
    std = images.new_tensor(std).view(1, 3, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std
