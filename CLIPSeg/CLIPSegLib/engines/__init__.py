"""Engine registry: engine id -> where its ``Engine`` subclass lives (``"module:Class"``, built with
``Class.from_spec(spec, device, precision)``) or a builder ``(spec, device, precision) -> Engine``.

``create_engine(spec, device)`` is the only way the pipeline gets an engine. Adding an engine: its own subpackage with
an ``engines.contract.Engine`` subclass, and one entry here. This module imports nothing heavy (no torch), so the run
options (``options.ENGINES``) and the Slicer panel read the engine ids from here: the one list.
"""

from __future__ import annotations

import difflib
import importlib

from ..errors import InputError

ENGINES = {"cliptnseg": "CLIPSegLib.engines.cliptnseg.engine:CLIPTNSegEngine",
           "medclipsam": "CLIPSegLib.engines.medclipsam.engine:MedCLIPSAMEngine",
           "tgcnet": "CLIPSegLib.engines.tgcnet.engine:TGCNetEngine",
           "unet": "CLIPSegLib.engines.unet.engine:UNetEngine"}


def check_engine(name: str) -> str:
    if name not in ENGINES:
        close = difflib.get_close_matches(name, list(ENGINES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}.{hint}")
    return name


def create_engine(spec: dict, device, engine: str | None = None, precision: str = "fp32"):
    """Build the engine named by ``engine`` (default: the spec's) with the spec's verified weights on ``device``
    (a ``torch.device``); ``precision`` fp32 or bf16 (``options.PRECISIONS``; checked by ``Engine``)."""
    name = check_engine(engine or spec["engine"])
    if spec["engine"] != name:
        raise InputError(f"model {spec['id']!r} is for engine {spec['engine']!r}, not {name!r}; "
                         f"pick a {name} model or drop --engine")
    target = ENGINES[name]
    if callable(target):
        return target(spec, device, precision)
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls).from_spec(spec, device, precision)


__all__ = ["ENGINES", "create_engine", "check_engine"]
