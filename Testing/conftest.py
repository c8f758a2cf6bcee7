"""Shared fixtures: a tiny random-weight model written like a real export, phantom files with known geometry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CLIPSeg"))
torch.set_num_threads(2)

TINY_SPEC = {
    "id": "tiny-random",
    "engine": "cliptnseg",
    "clip": {
        "embed_dim": 16,
        "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
    },
    "network": {"extract_layers": [1, 2], "reduce_dim": 16, "decoder_heads": 2, "coarse_channels": 4,
                "fine_channels": [4, 8], "head_channels": 4, "presence_head": True},
    "presence": {"threshold": 0.5, "min_peak": 0.5, "min_extent_mm": 0.0, "min_area_mm2": 0.0},
    "files": [],
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Path to the spec JSON of a random-weight CLIP-TNseg model (safetensors + SHA-256, as exported)."""
    from CLIPSegLib.engines.cliptnseg.network import build_network
    from CLIPSegLib.models import write_spec

    torch.manual_seed(0)
    net = build_network(TINY_SPEC)
    return write_spec(dict(TINY_SPEC), net.state_dict(), tmp_path_factory.mktemp("models"))


OBLIQUE = ((0.0, -1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0))


@pytest.fixture
def phantom_file(tmp_path):
    """A small phantom volume written as NRRD with non-identity direction and origin: (path, phantom, geometry)."""
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.io.outputs import write_volume
    from CLIPSegLib.synthetic.phantoms import make_phantom

    ph = make_phantom((6, 48, 40), spacing=(1.5, 0.7, 0.6), seed=3, findings=("nodule", "cyst"))
    geometry = Geometry((0.6, 0.7, 1.5), (10.0, -20.0, 5.0), OBLIQUE)
    path = write_volume(tmp_path / "phantom.nrrd", ph.image, geometry)
    return path, ph, geometry


def assert_no_partial_files(folder: Path):
    left = [p.name for p in Path(folder).iterdir() if "partial" in p.name]
    assert not left, f"partial files left behind: {left}"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def registry_model(tiny_model, tmp_path, monkeypatch):
    """The shipped registry plus one segmenter, ``tiny-registry``, whose files are the tiny model's spec and weights
    (as a published model lists them: URL, size, SHA-256), read from ``tmp_path`` instead of the shipped registry;
    the cache (``CLIPSEG_HOME``) empty in ``tmp_path``. Returns (id, the files to import)."""
    import hashlib
    import json

    from CLIPSegLib.models import store

    files = [tiny_model, tiny_model.with_suffix(".safetensors")]
    registry = json.loads(store.REGISTRY.read_text(encoding="utf-8"))
    registry["models"].append({
        "id": "tiny-registry", "engine": "cliptnseg", "role": "segmenter", "spec": tiny_model.name, "license": "MIT",
        "citation": "", "description": "a tiny random model",
        "files": [{"name": p.name, "url": f"https://example.invalid/{p.name}", "size": p.stat().st_size,
                   "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files]})
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(registry), encoding="utf-8")
    monkeypatch.setattr(store, "REGISTRY", path)
    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path / "home"))
    return "tiny-registry", files


def _pick(r, items):
    return items[int(r.integers(len(items)))]


# One random value maker per SegmentOptions field (None: the default); test_options checks every field has one.
OPTION_VALUES = {
    "model": lambda r: _pick(r, [None, "cliptnseg-phantom-small", "/models/my model v2.json", "-odd-name.json"]),
    "engine": lambda r: _pick(r, [None, "cliptnseg"]),
    "device": lambda r: _pick(r, ["auto", "cpu", "cuda", f"cuda:{r.integers(0, 4)}"]),
    "precision": lambda r: _pick(r, ["fp32", "bf16"]),
    "axis": lambda r: _pick(r, ["auto", "0", "1", "2"]),
    "threshold": lambda r: None if r.random() < 0.3 else float(r.uniform(1e-6, 1 - 1e-6)),
    "batch_size": lambda r: None if r.random() < 0.3 else int(r.integers(1, 65)),
    "keep_probabilities": lambda r: bool(r.random() < 0.5),
    "spacing": lambda r: None if r.random() < 0.3 else tuple(float(v) for v in r.uniform(0.01, 5, _pick(r, [1, 3]))),
}


def random_options(r: np.random.Generator):
    """A SegmentOptions with a random valid value in every field."""
    from CLIPSegLib.options import SegmentOptions

    return SegmentOptions(**{name: make(r) for name, make in OPTION_VALUES.items()})
