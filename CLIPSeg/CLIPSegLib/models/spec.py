"""Model specs: the JSON file that says what a model is.

A model is a JSON spec beside its weight files, e.g. ``Resources/Models/cliptnseg-phantom-small.json``::

    {"id": ..., "engine": "cliptnseg", "clip": {...}, "network": {...},
     "files": [{"name": "x.safetensors", "sha256": "...", "size": 123}], "presence": {...}, ...}

``read_spec`` checks the fields every spec needs and those its engine reads (``ENGINE_SPEC_KEYS``) before anything
is built, so a hand-edited spec fails with the missing field's name, not deep inside the engine. Standard library
only: the Slicer panel lists models with it before torch is installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ModelError

MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
DEFAULT_MODEL = "cliptnseg-phantom-ab-small"

# the spec fields each engine reads (all JSON objects), with what they hold; engines not listed are checked by their
# builder
ENGINE_SPEC_KEYS = {
    "cliptnseg": {
        "clip": "the CLIP architecture: {\"embed_dim\", \"vision_cfg\", \"text_cfg\"} or {\"open_clip_name\"}",
        "network": "the segmenter architecture: extract_layers, reduce_dim, fine_channels, ...",
        "presence": "the calibrated found / not-found rule (written by the calibrate stage of `clipseg train`)",
    },
    "tgcnet": {
        "clip": "the CLIP architecture: {\"embed_dim\", \"vision_cfg\", \"text_cfg\"} or {\"open_clip_name\"}",
        "network": "the TGC-Net architecture: extract_layers, dim, cnn_channels, sse, date, vlcm, ...",
    },
    "medclipsam": {
        "clip": "the CLIP: {\"folder\"} or {\"part\"} (BiomedCLIP) or an open_clip config with clip.* tensors",
        "sam": "the SAM: {\"type\", and \"checkpoint\", \"part\" or sam.* tensors in the files}",
    },
    "unet": {
        "network": "the MONAI UNet's channels, strides, num_res_units",
        "findings": "each finding's phrasings, in output channel order",
    },
}
# a presence rule's values (``inference.postprocess``; the global rule and each of ``per_finding``): probabilities,
# limits that are at least 0 (mm, mm², speckle spreads) and numbers of any sign (a shadow may be negative: the
# enhancement behind a cyst); a ``grow_threshold`` of null means no growth
RULE_PROBABILITIES = ("threshold", "min_peak", "min_mean", "slice_gate", "grow_threshold", "min_slice_presence",
                      "min_sam_iou")
RULE_LIMITS = ("min_extent_mm", "min_area_mm2", "min_contrast")
RULE_NUMBERS = ("min_shadow",)
# a rule's ``uncertain_margin`` (``postprocess.UNCERTAIN_MARGIN``): how narrowly a component may miss each criterion
# and still be kept as "uncertain"; each at least 0
MARGIN_KEYS = ("peak", "mean", "area", "extent_slices", "contrast", "shadow")
# engines whose spec may list no files of its own (every weight comes from registry parts or named checkpoints)
PARTS_ONLY = {"medclipsam"}


def lineage(spec: dict) -> dict:
    """How a derived model names the model it started from: its id and its weight files' SHA-256 (file name ->
    digest), as a spec's ``training.parent`` records it (with the parent's ``training``) and a checkpoint's
    fingerprint."""
    return {"id": spec["id"], "weights_sha256": {f["name"]: f["sha256"] for f in spec["files"]}}


def is_spec_name(path: Path) -> bool:
    """Whether a ``.json`` in a models folder is a model spec (not the registry, its schema or a hidden file)."""
    return path.suffix == ".json" and not path.name.startswith(("_", ".", "registry"))


def read_spec(path: Path) -> dict:
    """The checked spec at ``path``; adds ``_dir`` (the folder its files are in)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model spec {path} does not exist{' (it is a folder)' if path.is_dir() else ''}; give the "
                         f"path of a model .json (`clipseg train` and `clipseg finetune` write one beside its weights)")
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
    if not isinstance(files, list) or (not files and spec["engine"] not in PARTS_ONLY):
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
    if spec["engine"] in ("cliptnseg", "tgcnet") and "open_clip_name" not in clip:
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in clip:
                raise ModelError(f"model spec {path}: 'clip' lacks {key!r} (give embed_dim, vision_cfg and text_cfg, "
                                 f"or open_clip_name for a published open_clip architecture); {fix}")
    if "presence" in spec:
        check_presence(spec["presence"], path)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_presence(presence, path) -> None:
    """Raise ModelError naming the first rule value of a spec's ``presence`` that is not a number in its range
    (``RULE_PROBABILITIES``: 0 to 1; ``RULE_LIMITS``: at least 0; ``RULE_NUMBERS``: finite; ``match_min_cosine``: a
    cosine, -1 to 1; ``uncertain_margin``: an object of ``MARGIN_KEYS``, each at least 0), so a hand-edited rule
    fails when the model is read, not in the middle of a segmentation."""
    fix = ("correct the value or remove it (the rule's default applies), or restore the spec it was exported with "
           "and re-fit its rules with `clipseg calibrate`")
    if not isinstance(presence, dict) or not isinstance(presence.get("per_finding", {}), dict):
        raise ModelError(f"model spec {path}: 'presence' must be a JSON object whose 'per_finding' maps each finding "
                         f"to its rule; {fix}")
    rules = [("the global rule", presence)] + [(f"the rule of {name!r}", rule)
                                               for name, rule in presence.get("per_finding", {}).items()]
    for where, rule in rules:
        if not isinstance(rule, dict):
            raise ModelError(f"model spec {path}: {where} in 'presence' must be a JSON object, not {rule!r}; {fix}")
        for key in RULE_PROBABILITIES + RULE_LIMITS + RULE_NUMBERS:
            value = rule.get(key)
            if key not in rule or (value is None and key == "grow_threshold"):
                continue
            number = _is_number(value)
            if not number or (key not in RULE_NUMBERS and value < 0) or (key in RULE_PROBABILITIES and value > 1):
                want = ("a probability between 0 and 1" + (" or null (no growth)" if key == "grow_threshold" else "")
                        if key in RULE_PROBABILITIES else "a number of at least 0" if key in RULE_LIMITS
                        else "a finite number")
                raise ModelError(f"model spec {path}: {key!r} of {where} in 'presence' must be {want}, not {value!r}; "
                                 f"{fix}")
        cosine = rule.get("match_min_cosine", 0.0)
        if not _is_number(cosine) or not -1 <= cosine <= 1:
            raise ModelError(f"model spec {path}: 'match_min_cosine' of {where} in 'presence' must be a cosine "
                             f"between -1 and 1, not {cosine!r}; {fix}")
        margin = rule.get("uncertain_margin") or {}
        if not isinstance(margin, dict):
            raise ModelError(f"model spec {path}: 'uncertain_margin' of {where} in 'presence' must be a JSON object "
                             f"of {', '.join(MARGIN_KEYS)}, not {margin!r}; {fix}")
        for key, value in margin.items():
            if key not in MARGIN_KEYS or not _is_number(value) or value < 0:
                what = (f"has no margin {key!r} (it knows {', '.join(MARGIN_KEYS)})" if key not in MARGIN_KEYS
                        else f"{key!r} must be a number of at least 0, not {value!r}")
                raise ModelError(f"model spec {path}: 'uncertain_margin' of {where} in 'presence' {what}; {fix}")
