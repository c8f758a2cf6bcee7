"""clipseg finetune from a TGC-Net parent: LoRA on its text tower, trained and merged; lineage; the new phrase's rule;
replay of the parent's own training data (report or thyroid phantoms) distilled from the parent; settings it cannot
do refused; an interrupted run resumed to the same weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from CLIPSegLib.errors import InputError
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.io.outputs import write_volume
from CLIPSegLib.training import finetune as ft

GEOMETRY = Geometry.axis_aligned((2.0, 1.0, 1.0))


@pytest.fixture
def disc_table(tmp_path):
    """A CSV of one 32 px volume with a textured bright disc on every slice, labelled on slices 2 and 5 (one is
    trained on, one held out to calibrate)."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (8, 32, 32)).astype(np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    disc = np.broadcast_to((yy - 16) ** 2 + (xx - 14) ** 2 < 40, image.shape)
    image[disc & ((yy // 2 + xx // 2) % 2 == 1)] += 70
    write_volume(tmp_path / "img.nrrd", image, GEOMETRY)
    write_volume(tmp_path / "mask.nrrd", disc.astype(np.uint8), GEOMETRY)
    table = tmp_path / "table.csv"
    table.write_text("image,mask,phrase,slices\nimg.nrrd,mask.nrrd,bright disc,2;5\n", encoding="utf-8")
    return table


def _weights(spec_path):
    from safetensors.torch import load_file

    return load_file(str(spec_path.with_suffix(".safetensors")))


def _with_training(tiny_tgcnet, tmp_path, training: dict):
    """A copy of the tiny TGC-Net whose spec records ``training`` (e.g. the data set it was trained on)."""
    from CLIPSegLib.models import read_spec, write_spec

    spec = {**read_spec(tiny_tgcnet), "training": training}
    return write_spec(spec, {k: v.float() for k, v in _weights(tiny_tgcnet).items()}, tmp_path / "parent")


def test_a_tgcnet_model_is_fine_tuned_with_lora_merged_into_its_text_tower(disc_table, tiny_tgcnet, tmp_path):
    from CLIPSegLib.engines import create_engine
    from CLIPSegLib.inference.pipeline import predict_maps
    from CLIPSegLib.models import read_spec

    result = ft.finetune(disc_table, tmp_path / "out", tiny_tgcnet, "tgc-disc", steps=3, batch_size=1,
                         command="cmd x")
    spec = read_spec(result.spec_path)
    assert spec["engine"] == "tgcnet" and spec["id"] == "tgc-disc" and "learned_phrases" not in spec
    assert spec["clip"] == read_spec(tiny_tgcnet)["clip"] and spec["network"] == read_spec(tiny_tgcnet)["network"]
    training = spec["training"]
    assert training["parent"]["id"] == "tiny-tgcnet" and training["command"] == "cmd x"
    sha = hashlib.sha256(tiny_tgcnet.with_suffix(".safetensors").read_bytes()).hexdigest()
    assert training["parent"]["weights_sha256"] == {"tiny-tgcnet.safetensors": sha}
    assert training["text_adaptation"] == "lora" and training["replay_phantoms"] == 0  # no training data recorded
    assert training["input_size"] == 32 and "bright disc" in training["phrases"]
    rule = spec["presence"]["per_finding"]["bright disc"]
    assert rule["phrases"] == ["bright disc"] and rule["calibration"]["slices"] == 1
    assert not (tmp_path / "out" / ".tgc-disc.finetune").exists()

    tuned, parent = _weights(result.spec_path), _weights(tiny_tgcnet)
    assert set(tuned) == set(parent)  # plain TGC-Net weights: no lora_* / base_layer keys left
    text_tower = [k for k in parent if k.startswith("clip.transformer.resblocks.")]
    assert text_tower and any(not torch.equal(tuned[k], parent[k]) for k in text_tower)  # adapters merged in
    assert all(torch.equal(tuned[k], parent[k]) for k in parent if k.startswith("clip.visual."))  # image tower frozen

    engine = create_engine(spec, torch.device("cpu"))
    assert engine.name == "tgcnet"
    image = np.random.default_rng(1).normal(100, 5, (3, 32, 32)).astype(np.float32)
    maps, _ = predict_maps(engine, image, ["bright disc"], 2)
    assert maps[0].shape == (3, 32, 32) and np.isfinite(maps[0]).all()


@pytest.mark.parametrize("dataset, distill", [("report", True), ("thyroid", True), ("thyroid", False)])
def test_replay_is_of_the_parent_training_data_and_distilled_from_it(dataset, distill, disc_table, tiny_tgcnet,
                                                                     tmp_path, monkeypatch):
    """The replay bank follows the parent's ``training.dataset`` (report phantoms' sentences or thyroid findings);
    with distillation the replayed pairs are taught by the frozen parent (``TGCNetTeacher``), without it by the
    training loss against their masks."""
    parent = _with_training(tiny_tgcnet, tmp_path, {"dataset": dataset, "phrases": ["old finding"]})
    monkeypatch.setattr(ft, "REPLAY_PHANTOMS", 2)
    banks, taught = [], []
    original_bank, original_loss = ft.TGCNetTuning.replay_bank, ft.TGCNetTeacher.loss
    monkeypatch.setattr(ft.TGCNetTuning, "replay_bank",
                        lambda self, n, p: banks.append(original_bank(self, n, p)) or banks[-1])
    monkeypatch.setattr(ft.TGCNetTeacher, "loss",
                        lambda self, *a: taught.append(len(a[1])) or original_loss(self, *a))
    result = ft.finetune(disc_table, tmp_path / "out", parent, "replayed", steps=4, batch_size=1, distill=distill)
    kind = {"report": "ReportBank", "thyroid": "PhantomBank"}[dataset]
    assert [type(b).__name__ for b in banks] == [kind] and len(banks[0]) == 2
    assert bool(taught) == distill  # the seeded batches hold replayed pairs
    training = result.spec["training"]
    assert training["replay_phantoms"] == 2 and training["parent"]["training"]["dataset"] == dataset
    assert training["phrases"] == ["bright disc", "old finding"]


def _main(argv, capsys):
    from CLIPSegLib.cli import main

    code = main(argv)
    return code, capsys.readouterr()


def test_settings_a_tgcnet_parent_cannot_do_are_refused(disc_table, tiny_tgcnet, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed = _main(["finetune", "--data", str(disc_table), "--from", str(tiny_tgcnet), "--output-dir",
                           str(out), "--input-size", "64", "--progress", "none"], capsys)
    assert code == 2 and "--input-size 64 is not supported" in printed.err and "tgcnet" in printed.err
    with pytest.raises(InputError, match="adapts its text tower with LoRA"):
        ft.finetune(disc_table, out, tiny_tgcnet, "x", text_adaptation="embeddings")
    with pytest.raises(InputError, match="no record of the data it was trained on"):
        ft.finetune(disc_table, out, tiny_tgcnet, "x", steps=1, batch_size=1, replay=2)
    assert not out.exists() or not any(out.glob("*.json"))


class _Same:
    """An augmentation that changes nothing (so batches do not depend on where a run starts)."""

    def set_random_state(self, seed):
        return self

    def __call__(self, data):
        return data


def test_an_interrupted_run_resumes_to_the_same_weights(disc_table, tiny_tgcnet, tmp_path, monkeypatch):
    from CLIPSegLib.training import datasets

    monkeypatch.setattr(datasets, "make_augmentation", lambda mild=False, flip=True: _Same())
    whole = ft.finetune(disc_table, tmp_path / "whole", tiny_tgcnet, "disc", steps=4, batch_size=1)
    out = tmp_path / "split"
    assert ft.finetune(disc_table, out, tiny_tgcnet, "disc", steps=4, batch_size=1, stop_after=2) is None
    assert torch.load(out / ".disc.finetune" / "finetune.pt", weights_only=True)["step"] == 2
    assert any("lora_" in k for k in torch.load(out / ".disc.finetune" / "finetune.pt", weights_only=True)["model"])
    messages = []
    progress = type("P", (), {"message": lambda self, t: messages.append(t), "update": lambda *a, **k: None})()
    resumed = ft.finetune(disc_table, out, tiny_tgcnet, "disc", steps=4, batch_size=1, progress=progress)
    assert len(resumed.losses) == 2 + 4 and any("resuming" in m and "step 2 of 4" in m for m in messages)  # + refit
    assert resumed.losses == whole.losses[2:]
    a, b = _weights(whole.spec_path), _weights(resumed.spec_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(resumed.spec_path.read_text())["presence"] == whole.spec["presence"]


def test_a_side_reading_parent_is_fine_tuned_in_the_patients_frame_and_never_mirrored(disc_table, tiny_tgcnet,
                                                                                       tmp_path, monkeypatch):
    """A parent with ``inference.patient_sides``: the labelled volumes go through ``in_patient_frame`` and the
    augmentation has no left-right flip; without the entry, neither (``inference.laterality``)."""
    from CLIPSegLib.models import read_spec, write_spec
    from CLIPSegLib.training import datasets
    from CLIPSegLib.training import labelled_slices as ls

    spec = read_spec(tiny_tgcnet)
    sided = write_spec({**spec, "inference": {"flip_average": False, "patient_sides": {"margin_mm": 10.0}}},
                       {k: v.float() for k, v in _weights(tiny_tgcnet).items()}, tmp_path / "sided")
    framed, flips = [], []
    real_frame, real_augmentation = ls.in_patient_frame, datasets.make_augmentation
    monkeypatch.setattr(ls, "in_patient_frame", lambda volumes: framed.append(len(volumes)) or real_frame(volumes))
    monkeypatch.setattr(datasets, "make_augmentation",
                        lambda mild=False, flip=True: flips.append(flip) or real_augmentation(mild, flip))
    ft.finetune(disc_table, tmp_path / "out", sided, "disc", steps=1, batch_size=1)
    assert framed == [1] and flips and not any(flips)
    ft.finetune(disc_table, tmp_path / "out2", tiny_tgcnet, "disc", steps=1, batch_size=1)
    assert framed == [1] and all(flips[len(flips) - 1:])


def test_a_parent_trained_on_mirrors_replays_mirrored_phantoms(tiny_tgcnet, tmp_path):
    """A report parent trained on mirrors (``--report-mirror``: training.mirror) replays its phantoms mirrored with
    their lines' sides swapped, as it was trained; one trained without replays them as drawn, even when it (or one
    finding's rule) averages slices with their mirror at inference."""
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.progress import Progress

    sides = {"patient_sides": {"margin_mm": 10.0}}
    rules = {"per_finding": {"effusion": {"flip_average": True, "phrases": ["effusion"]}}}
    for trained, mirrored in ((True, True), (False, False)):
        parent = load_spec(str(_with_training(tiny_tgcnet, tmp_path / str(trained),
                                              {"dataset": "report", "mirror": trained})))
        for inference in ({"flip_average": trained, **sides}, {"flip_average": not trained, **sides}):
            tuning = ft.TGCNetTuning({**parent, "inference": inference,
                                      "presence": {**parent["presence"], **rules}}, None, Progress("none"))
            assert (tuning.replay_bank(2, Progress("none")).mirror is not None) == mirrored
