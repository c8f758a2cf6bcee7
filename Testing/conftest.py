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


TINY_TGCNET_SPEC = {
    "id": "tiny-tgcnet",
    "engine": "tgcnet",
    "clip": {
        "embed_dim": 16,
        "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
    },
    "network": {"extract_layers": [1, 2], "dim": 16, "heads": 2, "cnn_channels": [4, 4, 8, 8]},
    "presence": {"threshold": 0.5, "min_peak": 0.5, "min_extent_mm": 0.0, "min_area_mm2": 0.0},
    "files": [],
}


@pytest.fixture(scope="session")
def tiny_tgcnet(tmp_path_factory) -> Path:
    """Path to the spec JSON of a random-weight TGC-Net model (as exported), reading the shipped knowledge file."""
    from CLIPSegLib.engines.tgcnet.network import build_network
    from CLIPSegLib.models import write_spec

    torch.manual_seed(0)
    net = build_network(TINY_TGCNET_SPEC)
    return write_spec(dict(TINY_TGCNET_SPEC), net.state_dict(), tmp_path_factory.mktemp("tgcnet"))


TINY_UNET_SPEC = {
    "id": "tiny-unet",
    "engine": "unet",
    "network": {"channels": [4, 8], "strides": [2], "num_res_units": 1},
    "findings": {"thyroid nodule": ["thyroid nodule", "nodule"], "cyst": ["anechoic cyst", "cyst"]},
    "input_size": 32,
    "presence": {"threshold": 0.5, "min_peak": 0.5, "min_extent_mm": 0.0, "min_area_mm2": 0.0},
    "files": [],
}


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory) -> Path:
    """Path to the spec JSON of a random-weight fixed-vocabulary UNet model (engines.unet), as exported."""
    from CLIPSegLib.engines.unet.engine import build_unet
    from CLIPSegLib.models import write_spec

    torch.manual_seed(0)
    net = build_unet(2, TINY_UNET_SPEC["network"])
    weights = {f"unet.{k}": v for k, v in net.state_dict().items()}
    return write_spec(dict(TINY_UNET_SPEC), weights, tmp_path_factory.mktemp("unet"))


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


# CLIP-TNseg in CLIPSeg's style, coarse only (what `clipseg models convert` makes of CLIPSeg), tiny and random
TINY_CLIPSEG_SPEC = {
    **TINY_SPEC,
    "id": "tiny-clipseg-style",
    "clip": {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 32},
             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}},
    "network": {"extract_layers": [1, 2], "reduce_dim": 16, "decoder_heads": 2, "decoder_ff": 24,
                "coarse_style": "clipseg", "transposed_conv": "complex", "coarse_channels": 1,
                "text_normalize": False, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                "coarse_only": True, "residual_head": True, "fine_channels": [4, 8], "head_channels": 4},
}


@pytest.fixture(scope="session")
def tiny_clipseg_model(tmp_path_factory) -> Path:
    """Path to the spec JSON of a random-weight CLIPSeg-style, coarse-only CLIP-TNseg model."""
    from CLIPSegLib.engines.cliptnseg.network import build_network
    from CLIPSegLib.models import write_spec

    torch.manual_seed(0)
    net = build_network(TINY_CLIPSEG_SPEC)
    return write_spec(dict(TINY_CLIPSEG_SPEC), net.state_dict(), tmp_path_factory.mktemp("clipseg-style"), half=False)


# A CLIPSeg checkpoint as Hugging Face publishes CIDAS/clipseg-rd64-refined, with tiny random towers (transformers is a
# test dependency only): the processor resizes to 80 px (5 x 5 tokens of 16 px) while the image tower was made for 48
# (3 x 3), so the position embeddings are interpolated as CLIPSeg's are from 224 to 352 px.
CLIPSEG_SIZE = 80
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_clip_vocab(folder: Path) -> None:
    """``vocab.json`` and ``merges.txt`` of CLIP's BPE as Hugging Face publishes them, from open_clip's own vocabulary
    file (special tokens renamed the Hugging Face way)."""
    import json

    from CLIPSegLib.engines.clip_backbone import bpe_tokenizer

    bpe = bpe_tokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}),
                                       encoding="utf-8")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")


def write_clipseg_checkpoint(folder: Path, complex_conv: bool = True, seed: int = 0, full_size: bool = False):
    """Save a random ``transformers.CLIPSegForImageSegmentation`` into ``folder`` the way the public checkpoint is laid
    out (config.json, model.safetensors, preprocessor_config.json, vocab.json, merges.txt); returns the model.

    Tiny towers and an 80 px input, or with ``full_size`` rd64-refined's own: ViT-B/16, 512-wide text, 352 px. The
    last transposed convolution is scaled so that the logits reach +-20, as CLIPSeg's do (random weights give
    hundreds, where float32 rounding alone exceeds 1e-4)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, ViTImageProcessor

    if full_size:
        config, size = CLIPSegConfig(vision_config={"patch_size": 16}, use_complex_transposed_convolution=True), 352
    else:
        size = CLIPSEG_SIZE
        config = CLIPSegConfig(
            text_config={"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "max_position_embeddings": 77},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                           "num_attention_heads": 2, "image_size": 48, "patch_size": 16},
            projection_dim=24, extract_layers=[0, 1, 3], reduce_dim=16, decoder_num_attention_heads=2,
            decoder_intermediate_size=40, use_complex_transposed_convolution=complex_conv)
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    last = model.decoder.transposed_convolution
    last = last[-1] if complex_conv or full_size else last
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[49406, 320, 2368, 49407]]),
                       pixel_values=torch.randn(1, 3, size, size)).logits
        scale = 20.0 / float(logits.abs().max())
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                      resample=2).save_pretrained(folder)
    write_clip_vocab(folder)
    return model


@pytest.fixture(scope="session")
def clipseg_checkpoint(tmp_path_factory):
    """(folder, model): a tiny random CLIPSeg checkpoint with the complex transposed convolution (rd64-refined's)."""
    pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("clipseg") / "clipseg-rd64-refined"
    return folder, write_clipseg_checkpoint(folder)


@pytest.fixture(scope="session")
def converted_clipseg(clipseg_checkpoint, tmp_path_factory) -> Path:
    """The spec path of ``clipseg_checkpoint`` converted by ``clipseg models convert`` (coarse only)."""
    from CLIPSegLib.engines.cliptnseg.convert import convert_clipseg

    path, _ = convert_clipseg(clipseg_checkpoint[0], tmp_path_factory.mktemp("converted"), "tiny-clipseg-converted")
    return path


# BiomedCLIP's folder layout (open_clip_config.json + weights + the text tower's config.json and vocab.txt) at tiny
# sizes: timm's 6-block, 64-wide ``test_vit`` (160 px, 16 px patches) for ViT-B/16 and a 2-layer, 32-wide BERT with a
# WordPiece vocabulary of a few words for PubMedBERT. Random weights.
BIOMEDCLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "thyroid", "nodule", "cyst", "breast", "tumor",
                    "lesion", "bright", "dark", "square", "a", "the", "in", "of", "##s", "##al"]


def write_tiny_biomedclip(folder: Path, seed: int = 0, context_length: int = 12, paper_size: bool = False) -> Path:
    """Write a tiny random BiomedCLIP-style folder; returns it. The checkpoint also holds the
    ``text.transformer.embeddings.position_ids`` buffer older transformers saved (the published file has it).
    ``paper_size``: BiomedCLIP's own sizes instead (timm ViT-B/16 at 224, a BERT-base text tower: 768 wide, 12
    layers, 256 tokens, embeddings of 512), with the same small vocabulary."""
    import json

    import open_clip
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BIOMEDCLIP_WORDS) + "\n", encoding="utf-8")
    bert = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                max_position_embeddings=512) if paper_size else \
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    BertConfig(vocab_size=len(BIOMEDCLIP_WORDS), **bert).save_pretrained(folder)
    name = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    vit, image_size = ("vit_base_patch16_224", 224) if paper_size else ("test_vit", 160)
    context_length = 256 if paper_size else context_length
    config = {"model_cfg": {"embed_dim": 512 if paper_size else 16,
                            "vision_cfg": {"timm_model_name": vit, "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "image_size": image_size},
                            "text_cfg": {"hf_model_name": name, "hf_tokenizer_name": name, "hf_proj_type": "mlp",
                                         "hf_pooler_type": "cls_last_hidden_state_pooler",
                                         "context_length": context_length}},
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    cfg = json.loads(json.dumps(config["model_cfg"]))
    cfg["text_cfg"].update(hf_model_name=str(folder), hf_model_pretrained=False)
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**cfg)
    state = model.state_dict()
    state["text.transformer.embeddings.position_ids"] = torch.arange(bert["max_position_embeddings"]).unsqueeze(0)
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def tiny_biomedclip(tmp_path_factory) -> Path:
    """A tiny random BiomedCLIP-style folder (``write_tiny_biomedclip``); read-only for tests."""
    pytest.importorskip("transformers")
    return write_tiny_biomedclip(tmp_path_factory.mktemp("biomedclip") / "biomedclip-tiny")


# MedCLIP-SAM at tiny sizes: the tiny BiomedCLIP folder as its CLIP and a small SAM of segment_anything's own classes
# (64 px input, 8 x 8 embedding grid; random weights) exported in the spec's safetensors under "sam.".
TINY_SAM = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "image_size": 64, "patch_size": 8,
            "prompt_dim": 32, "window_size": 4, "mlp_dim": 64, "decoder_heads": 2}
TINY_MEDCLIPSAM_SPEC = {
    "id": "tiny-medclipsam",
    "engine": "medclipsam",
    "input_size": 48,
    "sam": {"type": TINY_SAM},
    "saliency": {"method": "gradcam"},  # the cheaper method keeps the suite fast; gscorecam in its own tests
    "boxes": {"min_area": 4},
    "inference": {"slice_vote": 3},
    "presence": {"threshold": 0.5, "min_peak": 0.5, "min_extent_mm": 0.0, "min_area_mm2": 0.0,
                 "min_slice_presence": 0.0, "slice_gate": 0.0},
    "files": [],
}


def write_tiny_medclipsam(folder: Path, biomedclip: Path, seed: int = 0, **entries) -> Path:
    """Write the tiny MedCLIP-SAM spec (``TINY_MEDCLIPSAM_SPEC`` with ``entries``; its CLIP the ``biomedclip``
    folder) and its SAM weights into ``folder``; returns the spec path."""
    from CLIPSegLib.engines.medclipsam.sam import build_sam, sam_sizes
    from CLIPSegLib.models import write_spec

    torch.manual_seed(seed)
    sam = build_sam(sam_sizes(TINY_SAM))
    spec = {**TINY_MEDCLIPSAM_SPEC, "clip": {"folder": str(biomedclip)}, **entries}
    return write_spec(spec, {f"sam.{k}": v for k, v in sam.state_dict().items()}, folder, half=False)


@pytest.fixture(scope="session")
def tiny_medclipsam(tiny_biomedclip, tmp_path_factory) -> Path:
    """The spec path of a tiny random MedCLIP-SAM model (``write_tiny_medclipsam``)."""
    return write_tiny_medclipsam(tmp_path_factory.mktemp("medclipsam"), tiny_biomedclip)
