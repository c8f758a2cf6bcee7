"""BiomedCLIP (and any open_clip model with a Hugging Face text tower) from a local folder, never the network.

The folder holds what open_clip would fetch from two Hub repositories for
``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``:

- ``open_clip_config.json``: ``model_cfg`` (``embed_dim``, a timm ``vision_cfg``, a ``text_cfg`` naming
  ``hf_model_name`` / ``hf_tokenizer_name``) and ``preprocess_cfg`` (mean, std);
- the CLIP weights, ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin`` (both towers and projections);
- the text tower's Hugging Face files (from the ``hf_model_name`` repository, e.g. BiomedBERT): ``config.json`` and
  the tokenizer's ``vocab.txt`` (or ``tokenizer.json``).

open_clip builds the text tower with ``AutoConfig.from_pretrained(hf_model_name)`` and the tokenizer with
``AutoTokenizer.from_pretrained(hf_tokenizer_name)``; both accept a local folder, so the two names are pointed at the
folder and open_clip's own classes (``CustomTextCLIP``, ``HFTokenizer``, ``load_checkpoint``) do the rest, with
``timm_model_pretrained`` / ``hf_model_pretrained`` off (the weights come from the folder's checkpoint) and Hugging
Face kept offline while they run. The registry entry ``biomedclip-vit-b16`` lists the files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ModelError

CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
TEXT_CONFIG = "config.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass
class BiomedCLIP:
    """A loaded model: ``model`` (open_clip ``CustomTextCLIP``, eval mode), ``tokenizer`` (open_clip ``HFTokenizer``:
    texts -> token ids ``[P, context_length]`` int64), ``image_size`` (square input, pixels), ``mean`` / ``std``
    (per RGB channel, for images in [0,1]) and ``folder``."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int
    folder: Path

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,1|3,S,S]`` in [0,1] (S = ``image_size``) -> ``[B,3,S,S]`` normalised for the image tower."""
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std


@contextlib.contextmanager
def offline():
    """Hugging Face libraries told not to touch the network (their offline variables) for the ``with`` block."""
    saved = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fix(folder: Path) -> str:
    return (f"put the missing file in {folder} (`clipseg models fetch biomedclip-vit-b16` downloads the whole "
            f"folder; the registry lists its files)")


def read_folder(folder: str | os.PathLike) -> dict:
    """Check a BiomedCLIP-style folder and return its ``open_clip_config.json`` (dict with ``model_cfg``). Raises
    ModelError naming the first missing or unusable file: the open_clip config, the CLIP weights, the text tower's
    ``config.json``, the tokenizer (``vocab.txt`` or ``tokenizer.json``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"BiomedCLIP folder {folder} does not exist or is not a folder; give the folder that holds "
                         f"{CONFIG}, the weights, {TEXT_CONFIG} and the tokenizer's vocab.txt")
    path = folder / CONFIG
    if not path.is_file():
        raise ModelError(f"BiomedCLIP folder {folder} has no {CONFIG} (the open_clip model config); {_fix(folder)}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        model_cfg = config["model_cfg"]
        text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ModelError(f"{path} is not an open_clip config with model_cfg.text_cfg and model_cfg.vision_cfg "
                         f"({type(e).__name__}: {e}); restore the file") from e
    if not text_cfg.get("hf_model_name"):
        raise ModelError(f"{path}: text_cfg has no hf_model_name, so this is not a CLIP with a Hugging Face text "
                         f"tower (BiomedCLIP's layout); a BPE-text open_clip model is built from its spec instead")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise ModelError(f"BiomedCLIP folder {folder} has no CLIP weights ({' or '.join(WEIGHTS)}); {_fix(folder)}")
    if not (folder / TEXT_CONFIG).is_file():
        raise ModelError(f"BiomedCLIP folder {folder} has no {TEXT_CONFIG}: the text tower's Hugging Face config "
                         f"(from {text_cfg['hf_model_name']}); {_fix(folder)}")
    if not any((folder / t).is_file() for t in TOKENIZER_FILES):
        raise ModelError(f"BiomedCLIP folder {folder} has no tokenizer file ({' or '.join(TOKENIZER_FILES)}, from "
                         f"{text_cfg.get('hf_tokenizer_name') or text_cfg['hf_model_name']}); {_fix(folder)}")
    return config


def local_model_cfg(config: dict, folder: Path) -> dict:
    """The ``model_cfg`` with the Hugging Face names pointed at ``folder`` and every "download pretrained tower"
    switch off (a copy; the config is not changed)."""
    cfg = copy.deepcopy(config["model_cfg"])
    cfg.pop("custom_text", None)
    cfg["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_model_pretrained=False)
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    return cfg


def load_biomedclip(folder: str | os.PathLike, weights: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu") -> BiomedCLIP:
    """The model of a BiomedCLIP-style ``folder`` (see the module docstring) on ``device``, in eval mode; ``weights``
    overrides the folder's checkpoint (e.g. one fine-tuned with DHN-NCE; the same state-dict layout). Weights load
    with ``weights_only=True`` (or safetensors). Raises ModelError naming a missing file or a checkpoint that does
    not fit the config."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    folder = Path(folder).resolve()
    config = read_folder(folder)
    cfg = local_model_cfg(config, folder)
    checkpoint = Path(weights) if weights else next(folder / w for w in WEIGHTS if (folder / w).is_file())
    if not checkpoint.is_file():
        raise ModelError(f"CLIP weights {checkpoint} do not exist")
    context_length = int(cfg["text_cfg"].get("context_length", 77))
    with offline():
        try:
            model = open_clip.CustomTextCLIP(**cfg)
            tokenizer = HFTokenizer(str(folder), context_length=context_length, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:  # transformers: OSError for files it cannot read
            raise ModelError(f"BiomedCLIP folder {folder}: the text tower or tokenizer cannot be built from "
                             f"{TEXT_CONFIG} / {', '.join(TOKENIZER_FILES)} ({type(e).__name__}: {e}); "
                             f"{_fix(folder)}") from e
    positions = getattr(model.text.config, "max_position_embeddings", context_length)
    if context_length > positions:
        raise ModelError(f"{folder / CONFIG}: text context_length {context_length} exceeds the text tower's "
                         f"{positions} positions ({TEXT_CONFIG}); the two files are of different models")
    try:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    except RuntimeError as e:  # load_state_dict's missing / unexpected / size-mismatch report
        raise ModelError(f"CLIP weights {checkpoint} do not fit {folder / CONFIG} ({str(e).splitlines()[0]} ...); "
                         f"they belong to another model") from e
    except Exception as e:  # noqa: BLE001 - unpickling can fail in many ways; weights_only refuses code
        raise ModelError(f"CLIP weights {checkpoint} cannot be read safely ({type(e).__name__}: {e}); "
                         f"download them again") from e
    preprocess = config.get("preprocess_cfg") or {}
    from ..clip_backbone import CLIP_MEAN, CLIP_STD

    size = model.visual.image_size
    return BiomedCLIP(model.to(device).eval(), tokenizer, int(size[0] if isinstance(size, tuple) else size),
                      tuple(preprocess.get("mean", CLIP_MEAN)), tuple(preprocess.get("std", CLIP_STD)),
                      context_length, folder)


__all__ = ["BiomedCLIP", "load_biomedclip", "read_folder", "offline", "CONFIG", "WEIGHTS", "TEXT_CONFIG",
           "TOKENIZER_FILES"]
