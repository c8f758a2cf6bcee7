"""One catalogue of models: a model id or a spec path -> the spec."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..errors import ModelError
from .spec import DEFAULT_MODEL, MODELS_DIR, read_spec


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
    return read_spec(resolve_spec_path(model, models_dir))
