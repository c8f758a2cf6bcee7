"""One catalogue of models: every way to name a model resolves here to one ``ModelRef`` and its spec.

A model is named by

- an id of the catalogue (``store.entries``): the embedded models (``Resources/Models``), a registry entry (its files
  downloaded into the cache by ``clipseg models fetch`` or copied in by ``clipseg models import ID FILE...``), or a
  model imported from its spec (``clipseg models import SPEC.json``);
- or the path to a model spec ``.json`` (e.g. one ``clipseg train`` wrote).

``resolve`` is what the CLI (segment, evaluate, demo), the Slicer logic, evaluation and the benchmarks use (through
``load_spec``); ``segmentation_models`` is the one list that ``clipseg models list`` prints and the Slicer panel
offers. Registry entries with the role ``clip``, ``sam`` or ``clipseg`` are parts of an engine (checkpoints it
builds on), not segmentation models that run alone; ``clipseg models convert`` makes one of a ``clipseg`` checkpoint.
Standard library only: the panel lists models before torch is installed.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ModelError
from . import store
from .spec import DEFAULT_MODEL, is_spec_name, read_spec

ENGINE_NAMES = {"cliptnseg": "CLIP-TNseg", "tgcnet": "TGC-Net", "medclipsam": "MedCLIP-SAM"}
PART_NAMES = {"clip": "a CLIP checkpoint", "sam": "a SAM checkpoint", "clipseg": "a CLIPSeg checkpoint"}
CONVERTIBLE = {"clipseg"}  # parts `clipseg models convert` makes a segmentation model of


@dataclass(frozen=True)
class ModelRef:
    """A model of the catalogue, or a spec file given by path.

    ``source``: embedded | registry | imported | file; ``role``: segmenter, or clip / sam for parts of an engine;
    ``spec_path``: the spec .json (None for parts); ``present``: its files are on this computer."""

    id: str
    engine: str
    role: str
    source: str
    present: bool
    spec_path: Path | None = None
    size: str = ""
    license: str = ""
    description: str = ""

    @property
    def runnable(self) -> bool:
        """A segmentation model (a spec an engine is built from), not a part of one."""
        return self.role == "segmenter"

    @property
    def engine_name(self) -> str:
        return ENGINE_NAMES.get(self.engine, self.engine)

    @property
    def status(self) -> str:
        """embedded, imported, file, present (downloaded) or not downloaded."""
        if self.source in ("embedded", "imported", "file"):
            return self.source
        return "present" if self.present else "not downloaded"


def _ref(m: dict) -> ModelRef:
    name = store.spec_name(m)
    spec_path = store.model_dir(m) / name if name else None
    source = "embedded" if m.get("embedded") else "imported" if m.get("imported") else "registry"
    present = store.is_present(m) and (spec_path is None or spec_path.is_file())
    return ModelRef(m["id"], m["engine"], m["role"], source, present, spec_path, store.display_size(m),
                    m.get("license", ""), m.get("description", ""))


def entries(registry: dict | None = None) -> list[ModelRef]:
    """Every model of the catalogue, segmentation models and parts (``registry``: entries by id, default the
    registry file)."""
    return [_ref(m) for m in store.entries(registry).values()]


def segmentation_models(registry: dict | None = None) -> list[ModelRef]:
    """The models that segment, downloaded or not, the default (``DEFAULT_MODEL``) first: what ``clipseg models
    list`` prints first and the Slicer panel offers."""
    return sorted((r for r in entries(registry) if r.runnable), key=lambda r: r.id != DEFAULT_MODEL)


def find(model: str | os.PathLike | None = None, registry: dict | None = None) -> ModelRef:
    """The catalogue entry of a model id (default: ``DEFAULT_MODEL``), or a ``ModelRef`` of a spec file given by
    path (read and checked). An id wins over a same-named file or folder in the working directory. Raises
    ModelError for an unknown id (naming the closest), a folder, a weight file instead of its spec, a missing file."""
    model = str(model or DEFAULT_MODEL)
    path = Path(model)
    refs = {r.id: r for r in entries(registry)}
    runnable = ", ".join(r.id for r in refs.values() if r.runnable) or "none"
    if len(path.parts) == 1 and path.suffix.lower() != ".json" and model in refs:
        return refs[model]
    if path.is_dir():
        specs = sorted(p for p in path.glob("*.json") if is_spec_name(p))
        raise ModelError(f"model {path} is a folder; give a model's .json file "
                         f"({f'e.g. {specs[0]}' if specs else 'that folder holds none'}) or a model id ({runnable})")
    if path.is_file() and path.suffix.lower() != ".json":
        beside = path.with_suffix(".json")
        where = f": {beside}" if beside.is_file() else " (the spec `clipseg train` writes beside the weights)"
        raise ModelError(f"model {path} is not a model spec but a {path.suffix or 'suffix-less'} file; give the "
                         f"model's .json beside it{where}. The spec names the weights and holds their SHA-256")
    if path.suffix.lower() == ".json" or path.exists():
        if not path.is_file():
            raise ModelError(f"model spec {path} does not exist; pass a model id ({runnable}) "
                             f"or the path to a model .json")
        spec = read_spec(path)
        return ModelRef(spec["id"], spec["engine"], "segmenter", "file", True, path,
                        license=str(spec.get("license", "")), description=str(spec.get("description", "")))
    close = difflib.get_close_matches(model, list(refs), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ModelError(f"unknown model {model!r}; {hint}known models: {runnable} (`clipseg models list`)")


def resolve(model: str | os.PathLike | None = None, engine: str | None = None,
            registry: dict | None = None) -> ModelRef:
    """``find``, then require a segmentation model whose files are here, of ``engine`` when one is given.

    Raises ModelError for a part (a CLIP or SAM checkpoint) and for a registry model not downloaded yet (naming
    ``clipseg models fetch ID``); InputError when ``engine`` is not the model's engine (the model determines it)."""
    ref = find(model, registry)
    if not ref.runnable:
        others = ", ".join(r.id for r in segmentation_models(registry))
        convert = (f", or make one of it: `clipseg models convert {ref.id} --output-dir DIR`"
                   if ref.role in CONVERTIBLE else "")
        raise ModelError(f"{ref.id} is {PART_NAMES.get(ref.role, 'a ' + ref.role)} that the {ref.engine_name} engine "
                         f"builds on: a part, not a segmentation model that runs on its own. Give a segmentation "
                         f"model: {others} (`clipseg models list`){convert}")
    if not ref.present and ref.source == "registry":
        raise ModelError(f"model {ref.id} ({ref.size}) is in the registry but not on this computer; download it "
                         f"with `clipseg models fetch {ref.id}` (the Slicer panel offers the download at Apply), or "
                         f"copy its files over by hand and run `clipseg models import {ref.id} FILE...`")
    if engine and engine != ref.engine:
        raise InputError(f"engine {engine!r} does not match the model {ref.id!r}, a {ref.engine} "
                         f"({ref.engine_name}) model: a model determines its engine, so leave the engine out or "
                         f"pick a {engine} model")
    return ref


def load_spec(model: str | os.PathLike | None = None, registry: dict | None = None) -> dict:
    """The checked spec of ``model`` (see ``resolve``), with ``_dir``, the folder its weight files are in."""
    return read_spec(resolve(model, registry=registry).spec_path)


def load_parent(init_from: str | os.PathLike, spec: dict, parts=("clip",), example: str = "") -> dict:
    """The checked spec of the model a training run continues (``--init-from``): of the recipe's engine
    (``spec["engine"]``) and equal to ``spec`` in each of ``parts`` (e.g. "clip", "network": the architecture);
    else InputError naming what differs, before any work. ``example``: a model the recipe can continue, named in the
    fix."""
    from ..errors import InputError

    parent = load_spec(init_from)
    name, engine = f"--init-from {init_from}", spec["engine"]
    if parent["engine"] != engine:
        raise InputError(f"{name} is a {parent['engine']} model; --engine {engine} continues {engine} models only")
    for part in parts:
        if parent.get(part) != spec[part]:
            raise InputError(f"{name}: its {part} ({parent.get(part)}) is not the recipe's ({spec[part]}); the "
                             f"recipe continues models of its own architecture" + (f" (e.g. {example})" if example
                                                                                  else ""))
    return parent
