"""BiomedCLIP from a local folder (``engines.medclipsam.biomedclip``), offline, on a tiny folder of the same layout."""

import json
import shutil
import socket

import pytest
import torch

from CLIPSegLib.engines.medclipsam.biomedclip import TEXT_CONFIG, TOKENIZER_FILES, WEIGHTS, load_biomedclip
from CLIPSegLib.errors import ModelError
from CLIPSegLib.models import store
from conftest import BIOMEDCLIP_WORDS, write_tiny_biomedclip


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_loads_offline_with_the_folder_weights_and_vocabulary(tiny_biomedclip, no_network):
    bc = load_biomedclip(tiny_biomedclip)
    saved = torch.load(tiny_biomedclip / "open_clip_pytorch_model.bin", weights_only=True)
    own = bc.model.state_dict()
    assert set(own) == set(saved) - {"text.transformer.embeddings.position_ids"}
    assert all(torch.equal(own[k], saved[k]) for k in own)
    assert not bc.model.training and bc.image_size == 160 and bc.context_length == 12
    ids = bc.tokenizer(["Thyroid nodules", "a dark cyst"])
    assert ids.shape == (2, 12) and ids.dtype == torch.int64
    words = {w: i for i, w in enumerate(BIOMEDCLIP_WORDS)}
    assert ids[0, :5].tolist() == [words["[CLS]"], words["thyroid"], words["nodule"], words["##s"], words["[SEP]"]]
    with torch.no_grad():
        text = bc.model.encode_text(ids)
        image = bc.model.encode_image(bc.normalize(torch.rand(2, 1, 160, 160)))
    assert text.shape == (2, 16) and image.shape == (2, 16)
    assert torch.isfinite(text).all() and torch.isfinite(image).all()
    assert not torch.allclose(text[0], text[1])


def test_fine_tuned_weights_override_the_folder_checkpoint(tiny_biomedclip, tmp_path, no_network):
    from safetensors.torch import save_file

    tuned = {k: v + 0.01 if v.is_floating_point() else v
             for k, v in load_biomedclip(tiny_biomedclip).model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    bc = load_biomedclip(tiny_biomedclip, weights=tmp_path / "tuned.safetensors")
    assert torch.equal(bc.model.logit_scale, tuned["logit_scale"])


@pytest.mark.parametrize("missing,named", [(TEXT_CONFIG, "config.json"), ("vocab.txt", "vocab.txt"),
                                           ("open_clip_config.json", "open_clip_config.json"),
                                           ("open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin")])
def test_a_missing_file_is_named(tiny_biomedclip, tmp_path, missing, named):
    folder = shutil.copytree(tiny_biomedclip, tmp_path / "bc")
    (folder / missing).unlink()
    with pytest.raises(ModelError, match=named.replace(".", r"\.")):
        load_biomedclip(folder)


def test_weights_of_another_size_are_refused(tiny_biomedclip, tmp_path):
    other = write_tiny_biomedclip(tmp_path / "other", context_length=12)
    config = json.loads((other / "open_clip_config.json").read_text())
    config["model_cfg"]["embed_dim"] = 24
    (other / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="do not fit"):
        load_biomedclip(other, weights=tiny_biomedclip / "open_clip_pytorch_model.bin")


def test_the_registry_entry_lists_every_file_the_folder_needs():
    entry = store.entries()["biomedclip-vit-b16"]
    names = {f["name"] for f in entry["files"]}
    assert "open_clip_config.json" in names and TEXT_CONFIG in names
    assert names & set(WEIGHTS) and names & set(TOKENIZER_FILES)
    assert entry["engine"] == "medclipsam" and entry["role"] == "clip"
    assert all(f["url"].startswith("https://huggingface.co/microsoft/") for f in entry["files"])
