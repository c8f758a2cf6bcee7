"""Model specs (JSON files) and verified weight loading.

A model is a JSON spec beside its weight files, e.g. ``Resources/Models/cliptnseg-phantom-small.json``::

    {"id": ..., "engine": "cliptnseg", "clip": {...}, "network": {...},
     "files": [{"name": "x.safetensors", "sha256": "...", "size": 123}], "presence": {...}, ...}

Weights are safetensors only, read after their size and SHA-256 match the spec. Nothing here touches the network.
``load_spec`` checks the fields every spec needs and those its engine reads (``ENGINE_SPEC_KEYS``) before anything
is built, so a hand-edited spec fails with the missing field's name, not deep inside the engine.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path

from .errors import ModelError

MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
DEFAULT_MODEL = "cliptnseg-phantom-small"

# the spec fields each engine reads (all JSON objects), with what they hold; engines not listed are checked by their
# builder
ENGINE_SPEC_KEYS = {
    "cliptnseg": {
        "clip": "the CLIP architecture: {\"embed_dim\", \"vision_cfg\", \"text_cfg\"} or {\"open_clip_name\"}",
        "network": "the segmenter architecture: extract_layers, reduce_dim, fine_channels, ...",
        "presence": "the calibrated found / not-found rule (written by the calibrate stage of `clipseg train`)",
    },
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def list_models(models_dir: Path = MODELS_DIR) -> list[str]:
    """Ids of the model specs shipped in ``models_dir``."""
    return sorted(p.stem for p in Path(models_dir).glob("*.json")
                  if not p.name.startswith(("_", ".", "registry")))


def resolve_spec_path(model: str | os.PathLike | None, models_dir: Path = MODELS_DIR) -> Path:
    """A model id (``cliptnseg-phantom-small``) or a path to a spec JSON -> the spec's path."""
    model = str(model or DEFAULT_MODEL)
    path = Path(model)
    known_id = Path(models_dir) / f"{model}.json"
    if len(path.parts) == 1 and path.suffix.lower() != ".json" and known_id.is_file():
        return known_id  # an id wins over a same-named file or folder in the working directory
    if path.is_dir():
        specs = sorted(p for p in path.glob("*.json") if not p.name.startswith(("_", ".", "registry")))
        raise ModelError(f"model {path} is a folder; give a model's .json file "
                         f"({f'e.g. {specs[0]}' if specs else 'that folder holds none'}) or a model id "
                         f"({', '.join(list_models(models_dir))})")
    if path.is_file() and path.suffix.lower() != ".json":
        beside = path.with_suffix(".json")
        where = f": {beside}" if beside.is_file() else " (the spec `clipseg train` writes beside the weights)"
        raise ModelError(f"model {path} is not a model spec but a {path.suffix or 'suffix-less'} file; give the "
                         f"model's .json beside it{where}. The spec names the weights and holds their SHA-256")
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            known = ", ".join(list_models(models_dir))
            raise ModelError(f"model spec {path} does not exist; pass a model id ({known}) "
                             f"or the path to a model .json")
        return path
    if known_id.is_file():
        return known_id
    known = list_models(models_dir)
    close = difflib.get_close_matches(model, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ModelError(f"unknown model {model!r}; {hint}known models: {', '.join(known) or 'none'}")


def load_spec(model: str | os.PathLike | None = None, models_dir: Path = MODELS_DIR) -> dict:
    """Read a model spec; adds ``_dir`` (the folder its files are in)."""
    path = resolve_spec_path(model, models_dir)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model spec {path} is not valid JSON ({e}); "
                         "restore it from the release or re-export it") from e
    check_spec(spec, path)
    spec["_dir"] = str(path.parent)
    return spec


def check_spec(spec, path) -> None:
    """Raise ModelError naming the first missing or mistyped field of a model spec (common fields, then the engine's
    ``ENGINE_SPEC_KEYS``)."""
    fix = "re-export the model with `clipseg train`, or restore the field from the spec it was exported with"
    if not isinstance(spec, dict):
        raise ModelError(f"model spec {path} holds a JSON {type(spec).__name__}, not an object; {fix}")
    for key in ("id", "engine", "files"):
        if key not in spec:
            raise ModelError(f"model spec {path} lacks the field {key!r}; {fix}")
    for key in ("id", "engine"):
        if not isinstance(spec[key], str) or not spec[key]:
            raise ModelError(f"model spec {path}: {key!r} must be a non-empty string, not {spec[key]!r}; {fix}")
    files = spec["files"]
    if not isinstance(files, list) or not files:
        raise ModelError(f"model spec {path}: 'files' must list the weight files "
                         f"([{{\"name\": ..., \"sha256\": ..., \"size\": ...}}]), not {files!r}; {fix}")
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("sha256"), str):
            raise ModelError(f"model spec {path}: every entry of 'files' needs a 'name' and a 'sha256', got {f!r}; "
                             f"{fix}")
        if Path(f["name"]).name != f["name"] or f["name"] in ("", ".", ".."):
            raise ModelError(f"model spec {path}: file name {f['name']!r} must be a plain file name beside the spec; "
                             f"{fix}")
    for key, holds in ENGINE_SPEC_KEYS.get(spec["engine"], {}).items():
        if key not in spec:
            raise ModelError(f"model spec {path} lacks the field {key!r} that a {spec['engine']} model needs "
                             f"({holds}); {fix}")
        if not isinstance(spec[key], dict):
            raise ModelError(f"model spec {path}: {key!r} must be a JSON object ({holds}), not {spec[key]!r}; {fix}")
    clip = spec.get("clip")
    if spec["engine"] == "cliptnseg" and "open_clip_name" not in clip:
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in clip:
                raise ModelError(f"model spec {path}: 'clip' lacks {key!r} (give embed_dim, vision_cfg and text_cfg, "
                                 f"or open_clip_name for a published open_clip architecture); {fix}")


def verify_file(path: Path, sha256: str, size: int | None = None) -> None:
    """Raise ModelError unless ``path`` exists with the expected size and SHA-256."""
    if not path.is_file():
        raise ModelError(f"weight file {path} is missing; restore it, or re-create it with the command in the model's "
                         f"spec ('training.command')")
    if size is not None and path.stat().st_size != size:
        raise ModelError(f"weight file {path} has {path.stat().st_size} bytes, expected {size}: it is truncated or "
                         f"replaced; restore the original file")
    digest = sha256_file(path)
    if digest != sha256:
        raise ModelError(f"weight file {path} has SHA-256 {digest}, expected {sha256}: the file is corrupt or not this "
                         f"model's; restore the original file")


def load_weights(spec: dict) -> dict:
    """Verified state dict (name -> tensor, float32) from the spec's safetensors files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for entry in spec["files"]:
        path = Path(spec["_dir"]) / entry["name"]
        if path.suffix != ".safetensors":
            raise ModelError(f"{path}: only .safetensors weights are loaded (pickled checkpoints can run arbitrary "
                             f"code); convert it with `clipseg` export tools")
        verify_file(path, entry["sha256"], entry.get("size"))
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"weight file {path} cannot be read as safetensors ({e}); "
                             "restore the original file") from e
        state.update({k: v.float() for k, v in part.items()})
    return state


def load_checkpoint(path: Path) -> dict:
    """Tensors of a checkpoint file, loaded safely: safetensors, or a PyTorch pickle restricted to tensors and plain
    containers (``torch.load(weights_only=True)``). A pickle that needs arbitrary code is refused."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(f"checkpoint {path} needs arbitrary code to load (it pickles objects other than tensors), "
                         f"so it is refused for safety; convert it to safetensors with a trusted tool first") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"checkpoint {path} is not a readable PyTorch file ({e}); download it again") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of tensors")
    return state


def write_spec(spec: dict, weights: dict, out_dir: Path, half: bool = True) -> Path:
    """Write ``<id>.safetensors`` (fp16 unless ``half=False``) and ``<id>.json`` with size and SHA-256.

    Files are written under temporary names and renamed, so a crash never leaves a spec pointing at a half file."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mid = spec["id"]
    wpath = out_dir / f"{mid}.safetensors"
    tmp = out_dir / f".{mid}.partial.safetensors"
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(tensors, str(tmp))
    # safetensors writes through a private temporary file (mode 0600): give the model the mode any new file gets, so
    # other users of a shared models folder can read it
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, wpath)
    spec = {k: v for k, v in spec.items() if not k.startswith("_")}
    spec["files"] = [{"name": wpath.name, "sha256": sha256_file(wpath), "size": wpath.stat().st_size}]
    spath = out_dir / f"{mid}.json"
    tmp = out_dir / f".{mid}.partial.json"
    tmp.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, spath)
    return spath
