"""The options of one segmentation run (``SegmentOptions``), each declared once, and the one copy of each list.

Every field is one ``option(...)`` declaration: default, type, allowed values, help text, validation, and where it
is used (``use``: the engine, the pipeline, the pipeline's found / not-found rule, or the image reader). Derived from
the declarations:

- ``clipseg segment``'s flags (``add_arguments``; ``batch_size`` -> ``--batch-size``) and ``from_args``;
- the background process's argv (``to_argv``, read back by the same parser);
- the Slicer Logic's keyword arguments (``from_keywords``; camelCase ``batchSize`` or snake_case ``batch_size``),
  which ``scene_run.SceneRun`` and ``segment_file.segment_file`` take as well;
- the keyword arguments of ``segment_file.load_engine`` (``engine_arguments``) and ``pipeline.segment_volume``
  (``pipeline_arguments``).

Adding an option = one declaration here (and its use where ``use`` sends it). Validation runs when an options
object is made and raises InputError naming the bad value and what is allowed.

Stdlib only: the Slicer panel imports this module when it opens (no torch, MONAI or numpy needed).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields, replace

from .engines import ENGINES as _REGISTERED_ENGINES
from .errors import InputError
from .models.spec import DEFAULT_MODEL

ENGINES = tuple(_REGISTERED_ENGINES)  # engine ids, from the (torch-free) registry in engines/__init__.py
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" picks one GPU
AXES = ("auto", "0", "1", "2")  # slice axis as a voxel axis: 0 = I, 1 = J, 2 = K
PRECISIONS = ("fp32", "bf16")
# the panel's fine-tuning slice sizes: choice shown -> `clipseg finetune --input-size` (None: the parent model's own)
TRAIN_INPUT_SIZES = {"the model's own (fastest)": None, "256 px (large slices, ~4x slower)": 256}
# every slice size a cliptnseg fine branch may be trained at (`clipseg train` / `finetune --input-size`), in pixels
INPUT_SIZES = range(32, 1025, 32)
# neighbouring slices on each side a cliptnseg fine branch may read (network context_slices, --context-slices)
CONTEXT_SLICES = range(0, 4)
USES = ("engine", "pipeline", "presence", "reader")


def _text_or_none(value) -> str | None:
    """A model id / path or engine id: None or "" -> None, a path -> its text."""
    return os.fspath(value) if value not in (None, "") else None


def check_device(device) -> str:
    """auto, cpu, cuda or cuda:N (lower case) -> the same; else InputError."""
    name = str(device or "auto").lower()
    if name in DEVICES or re.fullmatch(r"cuda:\d+", name):
        return name
    raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}; use fp32 (exact) or bf16 "
                         f"(faster on CPUs with AMX and on GPUs)")
    return precision


def check_axis(axis) -> str:
    """A slice axis given as text or voxel axis number (2 or "2") -> its text in ``AXES``."""
    text = str(axis)
    if isinstance(axis, bool) or text not in AXES:
        raise InputError(f"axis {text!r} is not one of auto, 0 (I), 1 (J), 2 (K)")
    return text


def _convert(convert, value):
    """``convert(value)`` (float, int), or None where it fails; a bool is not a number here."""
    if isinstance(value, bool):
        return None
    try:
        return convert(value)
    except (TypeError, ValueError, OverflowError):
        return None


def check_threshold(threshold) -> float | None:
    if threshold is None:
        return None
    value = _convert(float, threshold)
    if value is None or not 0.0 < value < 1.0:
        raise InputError(f"threshold {threshold} must be between 0 and 1 (exclusive), e.g. 0.5")
    return value


def check_batch_size(batch_size) -> int | None:
    if batch_size is None:
        return None
    value = _convert(int, batch_size)
    if value is None or value != batch_size:
        raise InputError(f"batch size {batch_size!r} must be a whole number of slices per forward pass, e.g. 4")
    if value < 1:
        raise InputError(f"batch size {batch_size} must be at least 1 (slices per forward pass)")
    return value


def parse_spacing(spacing) -> tuple[float, ...] | None:
    """``--spacing``: one value (mm per pixel along I and J) or three (mm along I, J, K), as text ``"0.3"`` /
    ``"0.5,0.5,2"`` or numbers; None stays None. Each must be a positive finite number."""
    if spacing is None:
        return None
    values = spacing.replace(" ", "").split(",") if isinstance(spacing, str) else \
        list(spacing) if isinstance(spacing, (tuple, list)) else [spacing]
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) not in (1, 3) or not all(math.isfinite(v) and v > 0 for v in out):
        raise InputError(f"--spacing {spacing!r} must be one positive size in mm (pixel size along I and J, e.g. "
                         f"0.3) or three separated by commas (along I, J, K, e.g. 0.5,0.5,2)")
    return out


def option(default, help: str, use: str, check=None, type=str, choices: tuple | None = None,
           metavar: str | None = None):
    """Declare one field of ``SegmentOptions``. ``check(value) -> value`` validates and normalises (InputError);
    ``type`` converts command-line text (bool: a flag without value); ``choices`` are listed in the help and by the
    panel (``check`` does the refusing); ``use``: one of ``USES``."""
    if use not in USES:
        raise ValueError(f"use {use!r} is not one of {USES}")
    return field(default=default, metadata={"help": help, "use": use, "check": check, "type": type,
                                            "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment (not what or where: prompts and file paths are passed beside it). Frozen; ``replace`` or
    ``from_keywords`` make a changed copy, validated again."""

    model: str | None = option(
        None, f"model id or path to a model .json (default: {DEFAULT_MODEL})", "engine", _text_or_none,
        metavar="ID_OR_PATH")
    engine: str | None = option(
        None, f"engine id (default: the model's engine): {', '.join(ENGINES)}", "engine", _text_or_none,
        choices=ENGINES, metavar="ENGINE")
    device: str = option("auto", "auto (CUDA if present), cpu or cuda", "engine", check_device, choices=DEVICES)
    precision: str = option(
        "fp32", "fp32 (exact) or bf16 autocast: ~1.8x faster for the paper-size network on CPUs with AMX "
        "and on GPUs; masks within Dice ~0.99 of fp32", "engine", check_precision, choices=PRECISIONS)
    axis: str = option("auto", "slice axis as voxel axis 0=I, 1=J, 2=K (auto: the thickest-spaced axis, else K)",
                       "pipeline", check_axis, choices=AXES)
    threshold: float | None = option(
        None, "probability threshold of the masks (default: the model's calibrated value; a threshold given also "
        "turns off the rule's growth of a found mask to a lower probability)", "presence",
        check_threshold, type=float)
    batch_size: int | None = option(
        None, "slices per forward pass (default on CPU: about 4 x 128^2 input pixels, e.g. 4 slices at 128 px and 1 "
        "at 352 px, as larger batches are slower per slice there; 16 on CUDA)", "pipeline", check_batch_size,
        type=int)
    keep_probabilities: bool = option(
        False, "also write the per-prompt probabilities, beside the output (OUT.probabilities.nrrd for "
        "OUT.seg.nrrd) unless --probabilities names the file", "pipeline", bool, type=bool)
    spacing: tuple[float, ...] | None = option(
        None, "voxel size in mm replacing the file's: one value for a picture's pixel size (PNG/JPEG have none: 1.0 "
        "mm is used, DPI is ignored) or I,J,K for a volume with a wrong header", "reader", parse_spacing,
        metavar="MM|I,J,K")

    def __post_init__(self):
        for f in fields(self):
            check = f.metadata["check"]
            if check is not None:
                object.__setattr__(self, f.name, check(getattr(self, f.name)))

    @classmethod
    def from_keywords(cls, options: "SegmentOptions | None" = None, **keywords) -> "SegmentOptions":
        """``options`` (default: all defaults) with ``keywords`` changed; each keyword is a field's name
        (``batch_size``) or its Slicer Logic name (``batchSize``). InputError for an unknown name."""
        names = {**{f.name: f.name for f in fields(cls)}, **{logic_name(f.name): f.name for f in fields(cls)}}
        for key in keywords:
            if key not in names:
                close = difflib.get_close_matches(key, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InputError(f"unknown option {key!r}{hint}; the options are {', '.join(LOGIC_KEYWORDS)} (or "
                                 f"the same names in snake_case)")
        return replace(options or cls(), **{names[k]: v for k, v in keywords.items()})

    @classmethod
    def from_args(cls, namespace: argparse.Namespace) -> "SegmentOptions":
        """From parsed arguments: every field that ``add_arguments`` added to the parser (the others stay default)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})

    def to_argv(self) -> list[str]:
        """Command-line arguments that ``add_arguments``' flags read back as these options (None and False are
        left out: they are the defaults)."""
        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value is False:
                continue
            if value is True:
                argv.append(flag(f.name))
                continue
            text = ",".join(map(repr, value)) if isinstance(value, tuple) else repr(value) \
                if isinstance(value, float) else str(value)
            argv += [f"{flag(f.name)}={text}"] if text.startswith("-") else [flag(f.name), text]
        return argv

    def _used_by(self, use: str) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["use"] == use}

    def engine_arguments(self) -> dict:
        """Keywords of ``segment_file.load_engine``: model, engine, device, precision."""
        return self._used_by("engine")

    def pipeline_arguments(self) -> dict:
        """Keywords of ``pipeline.segment_volume``: its own options, and ``presence`` (the options that override the
        model's found / not-found rule, e.g. ``threshold``; None when none is set)."""
        presence = {k: v for k, v in self._used_by("presence").items() if v is not None}
        return {**self._used_by("pipeline"), "presence": presence or None}


def flag(name: str) -> str:
    """A field's command-line flag: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def logic_name(name: str) -> str:
    """A field's Slicer Logic keyword (Slicer's camelCase): ``keep_probabilities`` -> ``keepProbabilities``."""
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


LOGIC_KEYWORDS = tuple(logic_name(f.name) for f in fields(SegmentOptions))


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add the flags of the fields ``names`` (default: all) to ``parser``; ``SegmentOptions.from_args`` reads them.
    Values are checked by ``SegmentOptions`` (InputError, exit code 2), not by argparse."""
    chosen = [f for f in fields(SegmentOptions) if names is None or f.name in names]
    unknown = set(names or ()) - {f.name for f in chosen}
    if unknown:
        raise ValueError(f"no options named {sorted(unknown)}")
    for f in chosen:
        m = f.metadata
        if m["type"] is bool:
            parser.add_argument(flag(f.name), action="store_true", help=m["help"])
            continue
        metavar = m["metavar"] or ("{" + ",".join(m["choices"]) + "}" if m["choices"] else f.name.upper())
        parser.add_argument(flag(f.name), type=m["type"], default=f.default, metavar=metavar, help=m["help"])
