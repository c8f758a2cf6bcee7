"""Engine registry: engine id -> builder ``(spec, device, precision) -> Engine`` (``engines.contract``).

``create_engine(spec, device)`` is the only way the pipeline gets an engine. Adding an engine: its own module with an
``Engine`` subclass, and one entry here.
"""

from __future__ import annotations

import difflib

import torch

from ..errors import InputError
from .contract import Engine, Preprocessing, PromptReading, PromptState


def _cliptnseg(spec, device, precision):
    from .cliptnseg.engine import CLIPTNSegEngine

    return CLIPTNSegEngine.from_spec(spec, device, precision)


ENGINES = {"cliptnseg": _cliptnseg}


def check_engine(name: str) -> str:
    if name not in ENGINES:
        close = difflib.get_close_matches(name, list(ENGINES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}.{hint}")
    return name


def create_engine(spec: dict, device: torch.device, engine: str | None = None, precision: str = "fp32") -> Engine:
    """Build the engine named by ``engine`` (default: the spec's) with the spec's verified weights; ``precision``
    fp32 or bf16 (``checks.PRECISIONS``; checked by ``Engine``)."""
    name = check_engine(engine or spec["engine"])
    if spec["engine"] != name:
        raise InputError(f"model {spec['id']!r} is for engine {spec['engine']!r}, not {name!r}; "
                         f"pick a {name} model or drop --engine")
    return ENGINES[name](spec, device, precision)


__all__ = ["Engine", "Preprocessing", "PromptReading", "PromptState", "ENGINES", "create_engine", "check_engine"]
