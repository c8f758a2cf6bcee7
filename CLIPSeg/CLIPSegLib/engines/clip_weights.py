"""Published CLIP weights into open_clip's ``CLIP``: Hugging Face's CLIP layout mapped to open_clip's, the
positional embedding resized to another input size as CLIPSeg resizes it, and weights loaded with the mismatch named.

Two layouts are read:

- open_clip's own (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``, e.g. OpenAI's ViT-B/16 as
  open_clip publishes it): a ``CLIP.state_dict()``, loaded as it is;
- Hugging Face's ``CLIPModel`` (inside a CLIPSeg checkpoint under ``clip.``): ``text_model.*``, ``vision_model.*``,
  ``visual_projection``, ``text_projection``, mapped key by key (``hf_clip_to_open_clip``).

Nothing here reads a file or touches the network: the caller loads the tensors (``models.load_checkpoint``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..errors import ModelError

# Hugging Face CLIP encoder layer -> open_clip residual block (q/k/v are joined into in_proj separately)
_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
          "self_attn.out_proj": "attn.out_proj"}
_TOWER = {"text_model": "transformer", "vision_model": "visual.transformer"}
_FIXED = {  # whole keys: Hugging Face -> open_clip
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_LAYER = re.compile(r"(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_clip_to_open_clip(state: dict, prefix: str = "") -> dict:
    """Hugging Face ``CLIPModel`` tensors (keys under ``prefix``, e.g. "clip." in a CLIPSeg checkpoint) -> an
    open_clip ``CLIP`` state dict. Projections are transposed (``[out, in]`` Linear weights -> ``[in, out]``
    matrices); q, k, v projections are stacked into ``in_proj_weight`` / ``in_proj_bias``; ``position_ids`` buffers
    are dropped. Raises ModelError naming a key it does not know (not a CLIP checkpoint of this layout)."""
    out, qkv = {}, {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k.endswith("position_ids"):
            continue
        if k in _FIXED:
            out[_FIXED[k]] = value
        elif k in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if k.startswith("visual") else "text_projection"] = value.t().contiguous()
        elif m := _LAYER.match(k):
            tower, layer, part, kind = m.groups()
            base = f"{_TOWER[tower]}.resblocks.{layer}"
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((base, kind), {})[part[10]] = value
            elif part in _BLOCK:
                out[f"{base}.{_BLOCK[part]}.{kind}"] = value
            else:
                raise ModelError(f"checkpoint key {key!r} is not part of a CLIP encoder layer; the file is not a "
                                 f"Hugging Face CLIP / CLIPSeg checkpoint")
        else:
            raise ModelError(f"checkpoint key {key!r} is not a CLIP weight this converter knows; the file is not a "
                             f"Hugging Face CLIP / CLIPSeg checkpoint")
    return {**out, **stack_qkv(qkv, "{}.attn.in_proj_{}")}


def stack_qkv(qkv: dict, key: str) -> dict:
    """``{(block, "weight"|"bias"): {"q": t, "k": t, "v": t}}`` -> ``{key.format(block, kind): cat[q, k, v]}``: the
    separate query, key and value projections of Hugging Face attention as torch's ``MultiheadAttention``
    ``in_proj`` (rows q, then k, then v). ModelError when one of the three is missing."""
    out = {}
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ModelError(f"{block}: the attention projections are incomplete (found {sorted(parts)} of q, k, v); "
                             f"the checkpoint is damaged")
        out[key.format(block, kind)] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def resize_positions(positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Vision positional embedding ``[1 + g*g, W]`` (class token first, a square g x g grid) -> ``[1 + h*w, W]`` for
    an ``(h, w)`` token grid: bicubic, ``align_corners=False``, no antialiasing, as CLIPSeg (transformers'
    ``interpolate_pos_encoding``) resizes it at every forward pass. open_clip's own ``resize_pos_embed`` antialiases,
    which gives other values; unchanged when the grid already fits."""
    n, width = positions.shape
    g = int(round((n - 1) ** 0.5))
    if g * g != n - 1:
        raise ModelError(f"vision positional embedding of {n} rows is not a class token plus a square grid")
    if (g, g) == tuple(grid):
        return positions
    patch = positions[1:].reshape(1, g, g, width).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([positions[:1], patch.permute(0, 2, 3, 1).reshape(-1, width)], dim=0)


def load_clip_weights(clip: torch.nn.Module, state: dict, source: str) -> None:
    """Load an open_clip-layout ``state`` into ``clip`` (an open_clip ``CLIP``), resizing the vision positional
    embedding to its input size (``resize_positions``). Every weight of ``clip`` must be given and none be left over
    (``logit_bias`` and ``attn_mask`` aside): otherwise ModelError naming ``source`` and the first keys."""
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "visual.positional_embedding" in state:
        grid = tuple(clip.visual.grid_size)
        state["visual.positional_embedding"] = resize_positions(state["visual.positional_embedding"], grid)
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    own = clip.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own) - {"logit_bias", "attn_mask"})
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
        raise ModelError(f"{source} does not fit the CLIP architecture of the spec (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shapes: {shapes or 'none'}); it is another model's checkpoint")
    clip.load_state_dict({k: state[k] for k in own})


def open_clip_config(vision: dict, text: dict, projection_dim: int, image_size: int) -> dict:
    """Hugging Face vision / text config dicts (``hidden_size``, ``num_hidden_layers``, ...) -> a ``clip`` spec entry
    (``clip_backbone.build_clip``) for an input of ``image_size`` pixels."""
    def act(cfg):
        return cfg.get("hidden_act", "quick_gelu")

    if act(vision) != act(text) or act(vision) not in ("quick_gelu", "gelu"):
        raise ModelError(f"CLIP towers with activations {act(vision)!r} / {act(text)!r} cannot be built with "
                         f"open_clip (quick_gelu or gelu in both)")
    eps = {cfg.get("layer_norm_eps", 1e-5) for cfg in (vision, text)}
    if eps != {1e-5}:
        raise ModelError(f"CLIP towers with layer norm epsilon {sorted(eps)} cannot be built with open_clip (1e-5)")
    return {
        "embed_dim": int(projection_dim),
        "quick_gelu": act(vision) == "quick_gelu",
        "vision_cfg": {"layers": vision["num_hidden_layers"], "width": vision["hidden_size"],
                       "head_width": vision["hidden_size"] // vision["num_attention_heads"],
                       "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"],
                       "patch_size": vision["patch_size"], "image_size": int(image_size)},
        "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
                     "width": text["hidden_size"], "heads": text["num_attention_heads"],
                     "layers": text["num_hidden_layers"],
                     "mlp_ratio": text["intermediate_size"] / text["hidden_size"]},
    }
