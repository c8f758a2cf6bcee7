"""The CLIP of a MedCLIP-SAM model, whichever way its spec names it, behind one small interface (``CLIPModel``).

A spec's ``clip`` entry is one of

- ``{"folder": PATH}``: a BiomedCLIP-style folder (``biomedclip``; PATH relative to the spec's folder), optionally
  ``"weights": PATH`` (e.g. fine-tuned with DHN-NCE, the same state-dict layout) or ``"weights_prefix": "clip."``:
  the spec files' tensors under that prefix replace the folder's weights (how ``clipseg finetune-clip`` exports a
  fine-tuned BiomedCLIP: hashed with the model, the folder giving config and tokenizer);
- ``{"part": ID}``: the registry's CLIP part of that id (e.g. ``biomedclip-vit-b16``), fetched by ``clipseg models
  fetch ID`` and hashed against its pins before it is loaded;
- an open_clip config as a cliptnseg spec's (``clip_backbone.build_clip``: ``embed_dim`` + ``vision_cfg`` +
  ``text_cfg``, or ``open_clip_name``) whose tensors are those of the spec's files under ``weights_prefix``
  (default ``clip.``, how a cliptnseg model stores its frozen CLIP: the embedded phantom CLIP is reused this way),
  with optional ``mean`` / ``std`` (default OpenAI CLIP's).

A spec may also hold ``presence_clip``, a second CLIP in any of these forms (its own tensors under its
``weights_prefix``, default ``presence_clip.``), or ``{"model": ID_OR_SPEC, "files": [{name, sha256}...]}``: the
``clip`` of another model (an id, or a spec path: absolute, or relative to this spec's folder), whose files must
still have the SHA-256 listed (how ``clipseg finetune-clip --presence-from MODEL`` writes it, so the embedded phantom
CLIP is not stored twice; retraining any part of that model invalidates the reference): the CLIP whose
image-text score gives the slice presence when ``saliency.slice_presence`` is ``"presence_clip"``, so one CLIP can be
tuned to localise and another kept for telling whether the finding is there (``load_presence_clip``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import ModelError


@dataclass
class CLIPModel:
    """``model``: an open_clip CLIP (eval; ``encode_image``, ``encode_text``, ``logit_scale``), ``image_size``
    (square input, pixels), ``mean`` / ``std`` (per RGB channel for [0,1] images), ``context_length`` (tokens),
    ``tokenizer`` (texts -> ids ``[N, context_length]``) and ``read`` (text -> (token strings kept, the text they
    spell, whether it was cut); the start and end tokens take two places of the context)."""

    model: torch.nn.Module
    image_size: int
    mean: tuple
    std: tuple
    context_length: int
    tokenizer: object
    read: object

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Grey ``[B,1,H,W]`` in [0,1] -> ``[B,3,S,S]`` for the image tower (S = ``image_size``; bilinear)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images.expand(-1, 3, -1, -1) - mean) / std

    def black(self) -> torch.Tensor:
        """A black pixel in the normalised space, ``[1,3,1,1]`` (gScoreCAM's fill for masked-out pixels)."""
        return -torch.tensor(self.mean).view(1, 3, 1, 1) / torch.tensor(self.std).view(1, 3, 1, 1)

    def encode_text(self, texts: list[str], device) -> torch.Tensor:
        """Texts -> L2-normalised embeddings ``[N,D]`` float32 on ``device``."""
        ids = self.tokenizer(list(texts)).to(device)
        return F.normalize(self.model.encode_text(ids).float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B,3,S,S]`` -> L2-normalised embeddings ``[B,D]`` float32."""
        return F.normalize(self.model.encode_image(images).float(), dim=-1)


def _part_folder(part: str) -> Path:
    """The folder of a registry part, its files checked against their pins (SHA-256)."""
    from ...models import store

    m = store.entry(part)
    status = store.verify(part)
    bad = {k: v for k, v in status.items() if v != "present"}
    if bad:
        raise ModelError(f"{part}: files {bad} are not usable; run `clipseg models fetch {part}` (or copy them over "
                         f"and `clipseg models import {part} FILE...`)")
    return store.model_dir(m)


def _local(spec: dict, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(spec.get("_dir", ".")) / p


def _load_own(model: torch.nn.Module, spec: dict, state: dict, prefix: str) -> None:
    """Load the spec files' tensors under ``prefix`` into ``model`` (strict), or a ModelError that says why not."""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise ModelError(f"model {spec['id']!r}: its files hold no CLIP tensors under {prefix!r} (first keys: "
                         f"{list(state)[:3]}); set clip.weights_prefix, or name a BiomedCLIP folder or part")
    model_state = model.state_dict()
    own = {k: v.to(model_state[k].dtype) if k in model_state else v for k, v in own.items()}
    try:
        model.load_state_dict(own, strict=True)
    except RuntimeError as e:
        raise ModelError(f"model {spec['id']!r}: the {prefix!r} tensors do not fit its clip config "
                         f"({str(e).splitlines()[0]} ...); the spec and weights come from different models") from e


def load_clip(spec: dict, state: dict, device) -> CLIPModel:
    """The CLIP of a medclipsam ``spec`` (module docstring) on ``device``; ``state``: the spec files' tensors."""
    cfg = spec["clip"]
    if "folder" in cfg or "part" in cfg:
        from .biomedclip import load_biomedclip

        folder = _part_folder(cfg["part"]) if "part" in cfg else _local(spec, cfg["folder"])
        weights = _local(spec, cfg["weights"]) if cfg.get("weights") else None
        bm = load_biomedclip(folder, weights, device)
        if cfg.get("weights_prefix"):
            _load_own(bm.model, spec, state, cfg["weights_prefix"])
        hf = bm.tokenizer.tokenizer  # the Hugging Face tokenizer inside open_clip's HFTokenizer

        def read(text: str):
            pieces = hf.tokenize(text)
            kept = pieces[:bm.context_length - 2]
            return tuple(kept), hf.convert_tokens_to_string(kept).strip(), len(pieces) > len(kept)

        return CLIPModel(bm.model, bm.image_size, bm.mean, bm.std, bm.context_length, bm.tokenizer, read)
    from ..clip_backbone import CLIP_MEAN, CLIP_STD, build_clip, clip_image_size, read_prompt, tokenize

    model = build_clip(cfg)
    _load_own(model, spec, state, cfg.get("weights_prefix", "clip."))
    context = int(model.context_length)
    return CLIPModel(model.to(device).eval(), clip_image_size(model), tuple(cfg.get("mean", CLIP_MEAN)),
                     tuple(cfg.get("std", CLIP_STD)), context, lambda texts: tokenize(texts, context),
                     lambda text: read_prompt(text, context))


def load_presence_clip(spec: dict, state: dict, device) -> CLIPModel | None:
    """The spec's ``presence_clip`` (module docstring) on ``device``, or None when it has none."""
    cfg = spec.get("presence_clip")
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ModelError(f"model {spec.get('id')!r}: presence_clip is {cfg!r}; it is a CLIP entry like 'clip', or "
                         f"{{\"model\": ID, \"files\": [{{\"name\": ..., \"sha256\": ...}}]}}")
    if "model" in cfg:
        return _referenced_clip(spec, cfg, device)
    if "folder" not in cfg and "part" not in cfg:  # an open_clip config: its tensors are the spec files' own
        cfg = {"weights_prefix": "presence_clip.", **cfg}
    return load_clip({"id": f"{spec.get('id')} presence_clip", "_dir": spec.get("_dir", "."), "clip": cfg},
                     state, device)


def _referenced_clip(spec: dict, cfg: dict, device) -> CLIPModel:
    """The CLIP of the model a ``presence_clip`` reference names, once its files match the pinned SHA-256."""
    from ...models import load_spec, load_weights

    name, own = str(cfg["model"]), f"model {spec.get('id')!r}: its presence_clip"
    try:
        pinned = {str(f["name"]): str(f["sha256"]) for f in cfg["files"]}
    except (KeyError, TypeError) as e:
        raise ModelError(f"{own} names {name} without the SHA-256 of its files ('files': [{{name, sha256}}]); "
                         f"re-export it with `clipseg finetune-clip --presence-from`") from e
    try:
        ref = load_spec(_local(spec, name) if name.lower().endswith(".json") else name)
    except ModelError as e:
        raise ModelError(f"{own} is the CLIP of {name}, which cannot be loaded: {e}") from e
    found = {f["name"]: f["sha256"] for f in ref["files"]}
    if found != pinned:
        raise ModelError(f"{own} is the CLIP of {name}, whose files are no longer those it was calibrated with "
                         f"({pinned} pinned, {found} found); restore that model or re-export and re-calibrate this one")
    if "clip" not in ref:
        raise ModelError(f"{own} names {name}, a {ref.get('engine')} model without a CLIP")
    return load_clip(ref, load_weights(ref), device)


__all__ = ["CLIPModel", "load_clip", "load_presence_clip"]
