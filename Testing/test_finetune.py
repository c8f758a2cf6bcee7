"""clipseg finetune: a new phrase taught from sparse labelled slices, never from unlabelled ones; errors; lineage;
resume; the engine reading the learned phrases."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from CLIPSegLib.engines import create_engine
from CLIPSegLib.models import load_spec
from CLIPSegLib.errors import InputError
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.io.outputs import write_volume
from CLIPSegLib.training import labelled_slices as ls
from CLIPSegLib.training.finetune import finetune

GEOMETRY = Geometry.axis_aligned((2.0, 1.0, 1.0))
PAINTED = (2, 5)  # the slices a user labelled; the disc is on every slice of the image


def _disc_volume(depth=8, size=32, centre=(16, 14), checker=False):
    """A noisy volume with a bright disc on every K slice -> (image [K,J,I] float32, disc bool [K,J,I]).
    ``checker``: the disc bright in a 2-pixel checkerboard (texture: a flat disc leaves the tiny random network's
    ReLUs dead inside it, where it then learns only through biases)."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (depth, size, size)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = np.broadcast_to((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < 40, image.shape).copy()
    bright = disc & ((yy // 2 + xx // 2) % 2 == 1) if checker else disc
    image[bright] += 70
    return image, disc


@pytest.fixture
def sparse_table(tmp_path):
    """A CSV whose mask holds the disc only on the painted slices (as a user leaves it), listed in its slices
    column, while the image shows the disc on every slice."""
    image, disc = _disc_volume()
    mask = np.zeros(disc.shape, np.uint8)
    mask[list(PAINTED)] = disc[list(PAINTED)]
    write_volume(tmp_path / "img.nrrd", image, GEOMETRY)
    write_volume(tmp_path / "mask.nrrd", mask, GEOMETRY)
    table = tmp_path / "table.csv"
    table.write_text(f"image,mask,phrase,slices\nimg.nrrd,mask.nrrd,bright disc,{';'.join(map(str, PAINTED))}\n",
                     encoding="utf-8")
    return table


def test_only_labelled_slices_become_samples_and_calibration_cases(sparse_table):
    volumes = ls.read_data(sparse_table)
    assert volumes[0].slices == {"bright disc": list(PAINTED)}
    train, held = ls.split_slices(volumes, 0.25)
    assert sorted(train + held) == [(0, k) for k in PAINTED] and len(held) == 1
    samples = ls.SliceSamples(volumes, train + held, 32)
    assert len(samples) == 2  # one per labelled slice: the six unlabelled slices yield no sample, so no negative
    for (_, k), (image, phrases, masks) in zip(train + held, (samples[i] for i in range(2))):
        assert phrases == ["bright disc"] and masks.sum() > 0  # each sample is a painted slice holding the disc
        normalised = ls.INTENSITIES["percentile"](volumes[0].image)[k]
        assert torch.allclose(image[0], normalised, atol=1e-6)


def test_unlabelled_slices_holding_the_structure_do_not_teach_its_absence(tiny_model, tmp_path, monkeypatch):
    """The disc is on all eight slices, painted on two. Taught from the two painted slices, the model's disc
    probability on the six unpainted ones is high (they were not negatives); taught from the same mask with every
    slice declared labelled (empty slices column), the six are negatives and the disc fades there."""
    from CLIPSegLib.inference.pipeline import predict_maps
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.training import finetune as ft

    monkeypatch.setitem(ft.LEARNING_RATES, "segmenter", 1e-2)  # the tiny model is random: a from-scratch rate
    image, disc = _disc_volume(checker=True)
    mask = np.zeros(disc.shape, np.uint8)
    mask[list(PAINTED)] = disc[list(PAINTED)]
    write_volume(tmp_path / "img.nrrd", image, GEOMETRY)
    write_volume(tmp_path / "mask.nrrd", mask, GEOMETRY)
    unpainted = [k for k in range(8) if k not in PAINTED]
    inside = {}
    for name, slices in (("sparse", "2;5"), ("dense", "")):
        (tmp_path / f"{name}.csv").write_text(f"image,mask,phrase,slices\nimg.nrrd,mask.nrrd,bright disc,{slices}\n",
                                              encoding="utf-8")
        torch.manual_seed(0)
        result = finetune(tmp_path / f"{name}.csv", tmp_path / "out", tiny_model, name, steps=100, batch_size=1)
        maps, _ = predict_maps(load_engine(str(result.spec_path), device="cpu"), image, ["bright disc"], 2)
        inside[name] = float(maps[0][unpainted][disc[unpainted]].mean())
        outside = float(maps[0][unpainted][~disc[unpainted]].mean())
        calibration = result.spec["presence"]["per_finding"]["bright disc"]["calibration"]
        if name == "sparse":
            assert inside[name] > 0.4 and inside[name] > 20 * outside, (inside, outside)
            assert calibration["absent_slices"] == 0  # nor is an unlabelled slice counted as absent
            # one held-out slice cannot choose another probability threshold, and the model says so
            assert result.spec["presence"]["per_finding"]["bright disc"]["threshold"] == 0.5
            assert "threshold 0.5 kept: trying others needs at least 5 held-out slices holding the phrase, 1 here" \
                in calibration["method"], calibration["method"]
    # dense: 5 of its 6 training slices are negatives (one empty slice is held out to calibrate), and the disc fades
    assert inside["dense"] < 0.7 * inside["sparse"], inside


def _spec_sha(path):
    return hashlib.sha256(path.with_suffix(".safetensors").read_bytes()).hexdigest()


def test_lineage_learned_phrase_and_engine(sparse_table, tiny_model, tmp_path):
    from CLIPSegLib.engines.cliptnseg.engine import LEARNED_KEY
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.models import load_weights, read_spec

    result = finetune(sparse_table, tmp_path / "out", tiny_model, "disc", steps=2, batch_size=1, command="cmd x")
    spec = read_spec(result.spec_path)
    training = spec["training"]
    assert training["parent"]["id"] == "tiny-random" and training["command"] == "cmd x"
    assert training["parent"]["weights_sha256"] == {"tiny-random.safetensors": _spec_sha(tiny_model)}
    assert training["data"]["phrases"]["bright disc"] == {"labelled_slices": 2, "slices_holding_it": 2,
                                                          "voxels": 2 * int(_disc_volume()[1][0].sum())}
    assert training["data"]["volumes"] == 1 and "held-out split" in training["calibration"]
    assert "bright disc" in training["phrases"] and spec["learned_phrases"] == ["bright disc"]
    assert load_weights(spec)[LEARNED_KEY].shape == (1, 16)
    assert not (tmp_path / "out" / ".disc.finetune").exists()  # checkpoints go once the model is written
    tuned, parent = load_engine(str(result.spec_path), device="cpu"), load_engine(str(tiny_model), device="cpu")
    state = tuned.encode_prompts(["bright disc", "Bright  DISC", "dark square"])
    reference = parent.encode_prompts(["bright disc", "dark square"])
    assert torch.equal(state.embeddings[0], state.embeddings[1])  # case and spacing aside, the learned phrase
    assert not torch.allclose(state.embeddings[0], reference.embeddings[0])
    assert torch.allclose(state.embeddings[2], reference.embeddings[1])  # any other wording: CLIP's embedding


def test_lora_text_side_is_merged_into_the_text_tower(sparse_table, tiny_model, tmp_path):
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.models import read_spec

    result = finetune(sparse_table, tmp_path / "out", tiny_model, "lora", steps=3, batch_size=1,
                      text_adaptation="lora")
    spec = read_spec(result.spec_path)
    assert "learned_phrases" not in spec and spec["training"]["text_adaptation"] == "lora"
    tuned, parent = load_engine(str(result.spec_path), device="cpu"), load_engine(str(tiny_model), device="cpu")
    a, b = tuned.encode_prompts(["bright disc"]), parent.encode_prompts(["bright disc"])
    assert not torch.allclose(a.embeddings, b.embeddings)  # the adapted tower, in plain weights the engine loads
    assert torch.equal(tuned.net.clip.visual.conv1.weight, parent.net.clip.visual.conv1.weight)


def _recorder(messages):
    return type("P", (), {"message": lambda self, t: messages.append(t), "update": lambda *a, **k: None})()


def test_an_interrupted_run_resumes_from_its_checkpoint(sparse_table, tiny_model, tmp_path):
    """Interrupted in the first training, then in the refit: each call goes on where the last one stopped."""
    out = tmp_path / "out"
    work = out / ".disc.finetune"
    assert finetune(sparse_table, out, tiny_model, "disc", steps=6, batch_size=1, stop_after=4) is None
    assert torch.load(work / "finetune.pt", weights_only=True)["step"] == 4 and not (out / "disc.json").exists()
    messages = []
    assert finetune(sparse_table, out, tiny_model, "disc", steps=6, batch_size=1, stop_after=4,
                    progress=_recorder(messages)) is None  # 2 steps end the first training, 2 of the refit
    assert any("resuming" in m and "fine-tuning step 4 of 6" in m for m in messages), messages
    assert torch.load(work / "refit.pt", weights_only=True)["step"] == 2 and not (out / "disc.json").exists()
    messages = []
    result = finetune(sparse_table, out, tiny_model, "disc", steps=6, batch_size=1, progress=_recorder(messages))
    assert len(result.losses) == 4 and any("refit step 2 of 6" in m for m in messages), messages
    assert result.spec_path == out / "disc.json" and not work.exists()


def test_the_refit_trains_on_every_labelled_slice_and_keeps_the_calibrated_rules(tiny_model, tmp_path,
                                                                                 monkeypatch):
    """The first training leaves the held-out slices out, the refit trains on all of them; the written model keeps
    the rules calibrated on the first one (the same with --no-refit, whose model is that first one)."""
    image, disc = _disc_volume()
    mask = disc.astype(np.uint8)
    mask[6:] = 0  # labelled absent there: slices 0..5 hold the disc, 6 and 7 not
    write_volume(tmp_path / "img.nrrd", image, GEOMETRY)
    write_volume(tmp_path / "mask.nrrd", mask, GEOMETRY)
    table = tmp_path / "table.csv"
    table.write_text("image,mask,phrase,slices\nimg.nrrd,mask.nrrd,bright disc,\n", encoding="utf-8")
    trained_on = []
    samples = ls.SliceSamples

    def spy(volumes, units, *args, **kwargs):
        trained_on.append([k for _, k in units])
        return samples(volumes, units, *args, **kwargs)

    monkeypatch.setattr(ls, "SliceSamples", spy)
    refit = finetune(table, tmp_path / "a", tiny_model, "disc", steps=3, batch_size=1)
    held = [k for _, k in ls.split_slices(ls.read_data(table), 0.25)[1]]
    assert len(held) == 2 and trained_on == [[k for k in range(8) if k not in held], list(range(8))]
    assert refit.spec["training"]["refit"] and "refit on all" in refit.spec["training"]["calibration"]
    trained_on.clear()
    first = finetune(table, tmp_path / "b", tiny_model, "disc", steps=3, batch_size=1, refit=False)
    assert trained_on == [[k for k in range(8) if k not in held]] and not first.spec["training"]["refit"]
    rules = [r.spec["presence"]["per_finding"]["bright disc"] for r in (refit, first)]
    methods = [r["calibration"].pop("method") for r in rules]
    assert rules[0] == rules[1] and methods[0].startswith(methods[1])
    assert "refit on all labelled slices" in methods[0] and "refit" not in methods[1]
    assert _spec_sha(refit.spec_path) != _spec_sha(first.spec_path)


def test_a_refit_that_fits_its_slices_worse_than_the_first_model_is_not_written(sparse_table, tiny_model, tmp_path,
                                                                                 monkeypatch):
    from CLIPSegLib.training import finetune as ft

    messages = []
    fit = {"dice": 0.9, "empty": None, "slices": 2}
    monkeypatch.setattr(ft, "check_refit", lambda *a, **k: {"bright disc": {"first": {**fit, "score": 2.9},
                                                                            "refit": {**fit, "score": 2.1}}})
    kept = finetune(sparse_table, tmp_path / "a", tiny_model, "disc", steps=3, batch_size=1,
                    progress=_recorder(messages))
    first = finetune(sparse_table, tmp_path / "b", tiny_model, "disc", steps=3, batch_size=1, refit=False)
    training = kept.spec["training"]
    assert not training["refit"] and training["refit_check"]["bright disc"]["refit"]["score"] == 2.1
    assert training["fit_on_labelled"]["phrases"]["bright disc"]["score"] == 2.9  # the model written: the first
    assert any("refit not kept" in m and "'bright disc' scores 2.100 (the first model 2.900)" in m for m in messages)
    assert kept.spec["files"] == first.spec["files"]  # the same weights (SHA-256) as the model never refit


def test_check_refit_scores_each_model_on_the_slices_under_the_rules(sparse_table, tiny_model, tmp_path,
                                                                     monkeypatch):
    from CLIPSegLib.training import calibration
    from CLIPSegLib.training.finetune import check_refit

    result = finetune(sparse_table, tmp_path / "a", tiny_model, "disc", steps=3, batch_size=1, refit=False)
    engine = create_engine(load_spec(str(result.spec_path)), torch.device("cpu"))
    volumes = ls.read_data(sparse_table)
    units = [(0, k) for k in volumes[0].slices["bright disc"]]
    rule = result.spec["presence"]["per_finding"]["bright disc"]
    rules = {"bright disc": {**rule, "min_peak": 0.0, "min_mean": 0.0}}
    same = check_refit(engine, engine, volumes, units, rules)["bright disc"]
    assert same["first"] == same["refit"] and same["first"]["score"] > 0 and same["first"]["slices"] == len(units)
    blank = create_engine(load_spec(str(result.spec_path)), torch.device("cpu"))
    real = calibration.predict_maps
    truth = volumes[0].truth["bright disc"].astype(np.float32)

    def maps(eng, *args, **kwargs):  # the first model draws the truth, the "refit" nothing
        masks, presence = real(eng, *args, **kwargs)
        masks = masks * 0
        if eng is engine:
            masks[0] = truth
        return masks, presence

    monkeypatch.setattr(calibration, "predict_maps", maps)
    scores = check_refit(engine, blank, volumes, units, rules)["bright disc"]
    assert scores["first"]["score"] == pytest.approx(3.0)  # Dice 1 + 2 x every absent slice left empty (or none)
    assert scores["first"]["dice"] == pytest.approx(1.0) and scores["refit"]["dice"] == 0.0
    assert scores["refit"]["score"] < scores["first"]["score"] - 0.05


def test_a_model_that_does_not_reproduce_its_own_labelled_slices_says_so(sparse_table, tiny_model, tmp_path,
                                                                         monkeypatch):
    """The written model's fit on the slices it trained on is recorded and printed; under FIT_DICE / FIT_EMPTY the
    run warns (Slicer shows progress messages in its status line)."""
    from CLIPSegLib.training import finetune as ft

    assert ft.poor_fit({"a": {"dice": 0.95, "empty": None}, "b": {"dice": None, "empty": 1.0}}) == []
    assert ft.poor_fit({"a": {"dice": 0.6, "empty": 0.8}}) == [
        "'a': Dice 0.60 and 80% of the slices without it left empty"]
    messages = []
    monkeypatch.setattr(ft, "fit_on_slices", lambda *a, **k: {"bright disc": {
        "dice": 0.55, "empty": 1.0, "slices": 3, "score": 2.55}})
    result = finetune(sparse_table, tmp_path / "a", tiny_model, "disc", steps=2, batch_size=1, refit=False,
                      progress=_recorder(messages))
    assert result.spec["training"]["fit_on_labelled"]["phrases"]["bright disc"]["dice"] == 0.55
    assert any(m.startswith("warning: the model does not reproduce the labelled slices it trained on")
               and "'bright disc': Dice 0.55" in m and "label more slices" in m for m in messages), messages


def test_a_checkpoint_of_other_settings_is_not_resumed(sparse_table, tiny_model, tmp_path):
    out = tmp_path / "out"
    finetune(sparse_table, out, tiny_model, "disc", steps=6, batch_size=1, stop_after=2)
    messages = []
    result = finetune(sparse_table, out, tiny_model, "disc", steps=3, batch_size=1, seed=1,
                      progress=_recorder(messages))
    assert len(result.losses) == 3 + 3 and any("starting over" in m for m in messages)  # training and refit


def test_folder_of_label_maps_labels_the_painted_slices(tmp_path):
    image, disc = _disc_volume()
    labels = np.zeros(disc.shape, np.uint8)
    labels[2][disc[2]] = 1
    labels[6, 0, 0] = 2  # slice 6 holds only another label: painted, so a negative for label 1
    for sub, array in (("images", image), ("labels", labels)):
        (tmp_path / sub).mkdir()
        write_volume(tmp_path / sub / "a.nrrd", array, GEOMETRY)
    volumes = ls.read_data(tmp_path, {"1": "bright disc", "2": "speck"})
    assert volumes[0].slices == {"bright disc": [2, 6], "speck": [2, 6]}
    assert volumes[0].holds("bright disc", 2) and not volumes[0].holds("bright disc", 6)


def _main(argv, capsys):
    from CLIPSegLib.cli import main

    code = main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("case, message", [
    ("no labelled slice", "no labelled slice"),
    ("empty phrase", "'bright disc' has only empty masks on its labelled slices"),
    ("other grid", "is on another grid than its image"),
    ("small batch", "fewer than one batch of 4"),
    ("bad slices", "slice 9 is outside the image's 0..7 slices"),
])
def test_bad_data_is_refused_with_exit_code_2(case, message, tiny_model, tmp_path, capsys):
    image, disc = _disc_volume()
    write_volume(tmp_path / "img.nrrd", image, GEOMETRY)
    data, slices = tmp_path / "table.csv", "2;5"
    mask, geometry = disc.astype(np.uint8), GEOMETRY
    extra = []
    if case == "no labelled slice":
        for sub, array in (("images", image), ("labels", np.zeros(disc.shape, np.uint8))):
            (tmp_path / sub).mkdir()
            write_volume(tmp_path / sub / "a.nrrd", array, GEOMETRY)
        data, extra = tmp_path, ["--prompt-map", '{"1": "bright disc"}']
    elif case == "empty phrase":
        mask = np.zeros_like(mask)
        mask[4] = disc[4]  # painted on a slice the slices column does not list
    elif case == "other grid":
        geometry = Geometry.axis_aligned((2.0, 1.0, 1.1))
    elif case == "bad slices":
        slices = "2;9"
    write_volume(tmp_path / "mask.nrrd", mask, geometry)
    (tmp_path / "table.csv").write_text(f"image,mask,phrase,slices\nimg.nrrd,mask.nrrd,bright disc,{slices}\n",
                                        encoding="utf-8")
    code, out = _main(["finetune", "--data", str(data), "--from", str(tiny_model), "--output-dir",
                       str(tmp_path / "out"), "--progress", "none", "--steps", "1", *extra], capsys)
    assert code == 2 and message in out.err, out.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.json"))


def test_cli_writes_the_model_and_ends_with_a_done_event(sparse_table, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["finetune", "--data", str(sparse_table), "--from", str(tiny_model), "--output-dir", str(out),
            "--model-id", "disc", "--steps", "2", "--batch-size", "1", "--progress", "json", "--device", "cpu"]
    code, printed = _main(argv, capsys)
    assert code == 0, printed.err
    done = json.loads(printed.out.strip().splitlines()[-1])
    assert done["event"] == "done" and done["model"] == str(out / "disc.json") and done["parent"] == "tiny-random"
    assert done["rules"]["bright disc"]["slices"] == 1 and "held-out split" in done["calibration"]
    fit = done["fit_on_labelled"]["bright disc"]
    assert fit["slices"] >= 1 and 0 <= fit["score"] <= 3
    command = json.loads((out / "disc.json").read_text(encoding="utf-8"))["training"]["command"]
    assert command.startswith("clipseg finetune --data ") and command.endswith("--model-id disc --force")
    stamp = (out / "disc.json").stat().st_mtime_ns
    code, printed = _main(argv, capsys)  # the model is there now: refused before any work, unless --force
    assert code == 2 and "--force" in printed.err and (out / "disc.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("native", [True, False])
def test_bf16_fine_tuning_is_recorded_or_falls_back_to_fp32_on_a_cpu_without_it(native, sparse_table, tiny_model,
                                                                                tmp_path, capsys, monkeypatch):
    from CLIPSegLib.engines import contract

    monkeypatch.setattr(contract, "native_bf16", lambda: native)
    out = tmp_path / "out"
    code, printed = _main(["finetune", "--data", str(sparse_table), "--from", str(tiny_model), "--output-dir",
                           str(out), "--model-id", "disc", "--steps", "2", "--batch-size", "1", "--progress", "none",
                           "--device", "cpu", "--precision", "bf16"], capsys)
    assert code == 0, printed.err
    training = json.loads((out / "disc.json").read_text(encoding="utf-8"))["training"]
    assert training["precision"] == ("bf16" if native else "fp32")
    assert ("--precision bf16" in training["command"]) is native  # the command re-creates what ran
    assert ("--precision bf16 ignored" in printed.err + printed.out) is not native
    assert "'bright disc': calibrated on 1 held-out slice(s)" in printed.out
    assert "labelled slice(s) it trained on: Dice" in printed.out


def test_train_has_no_model_flag_it_would_ignore():
    from CLIPSegLib.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model", "cliptnseg-phantom-small"])


def test_a_converted_clipseg_model_is_fine_tuned_whole_with_its_unnormalised_text(sparse_table, converted_clipseg,
                                                                                   tmp_path):
    """A converted CLIPSeg model segments coarse-only; fine-tuning trains the full CLIP-TNseg (coarse_only false in
    the new spec) and keeps CLIPSeg's unnormalised text embeddings (its FiLM expects them)."""
    from CLIPSegLib.engines.cliptnseg.engine import LEARNED_KEY
    from CLIPSegLib.models import load_weights, read_spec

    parent = read_spec(converted_clipseg)
    assert parent["network"]["coarse_only"] and parent["network"]["text_normalize"] is False
    result = finetune(sparse_table, tmp_path / "out", converted_clipseg, "from-clipseg", steps=2, batch_size=1)
    spec = read_spec(result.spec_path)
    assert spec["network"]["coarse_only"] is False and spec["network"]["text_normalize"] is False
    table = load_weights(spec)[LEARNED_KEY]
    assert not torch.allclose(table.norm(dim=-1), torch.ones(len(table)), atol=1e-3)  # not L2-normalised
    from CLIPSegLib.inference.segment_file import load_engine

    engine = load_engine(str(result.spec_path), device="cpu")  # and used as trained, not normalised at load
    assert torch.allclose(engine.encode_prompts(["bright disc"]).embeddings[0], table[-1], atol=1e-6)


def test_a_model_fine_tuned_at_another_input_size_is_written_and_run_at_that_size(sparse_table, tiny_model, tmp_path):
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.models import read_spec

    # replay=2 with distillation: the parent (32 px) teaches the 64 px student through resized images and logits
    result = finetune(sparse_table, tmp_path / "out", tiny_model, "big", steps=2, batch_size=1, replay=2,
                      input_size=64, command="cmd")
    spec = read_spec(result.spec_path)
    assert spec["network"]["input_size"] == 64 and spec["training"]["input_size"] == 64
    assert spec["clip"] == json.loads(tiny_model.read_text())["clip"]  # CLIP keeps its own size
    engine = load_engine(str(result.spec_path), device="cpu")
    assert engine.preprocessing.input_size == 64 and engine.net.clip_size == 32
    state = engine.encode_prompts(["bright disc"])
    probs, _ = engine.infer(torch.rand(2, 1, 64, 64), state)
    assert probs.shape == (2, 1, 64, 64)


def test_a_slice_size_the_fine_branch_cannot_take_is_refused_before_any_work(sparse_table, tiny_model, tmp_path):
    for size in (63, 2048):
        with pytest.raises(InputError, match=f"--input-size {size}: give a multiple of 32"):
            finetune(sparse_table, tmp_path / "out", tiny_model, "odd", steps=2, batch_size=1, input_size=size)
    assert not (tmp_path / "out").exists()


def test_the_fine_branch_at_a_larger_size_keeps_every_weight_and_the_coarse_map(tiny_model):
    from CLIPSegLib.engines.cliptnseg.network import CLIPTNSegNet, network_at_input_size
    from CLIPSegLib.errors import ModelError
    from CLIPSegLib.inference.preprocessing import resize_slices
    from CLIPSegLib.inference.segment_file import load_engine

    engine = load_engine(str(tiny_model), device="cpu")
    net = engine.net
    big = network_at_input_size(net, 64)
    old, new = net.state_dict(), big.state_dict()
    assert set(old) == set(new) and all(torch.equal(old[k], new[k]) for k in old)
    text = engine.encode_prompts(["bright disc"]).embeddings
    image = torch.rand(1, 1, 64, 64)
    # CLIP sees the same 32 px image either way: its tokens agree
    small_acts = net.clip_activations(resize_slices(image, 32))
    assert all(torch.allclose(a, b) for a, b in zip(small_acts, big.clip_activations(image)))
    mask, _ = big(image, text)
    assert mask.shape == (1, 1, 64, 64)
    with pytest.raises(ModelError, match="multiple of 2"):
        CLIPTNSegNet(net.clip, {**net.cfg, "input_size": 63})


@pytest.fixture
def tiny_with_finding(tiny_model, tmp_path):
    """The tiny model with a calibrated finding phrased "dark square" (as the embedded model has its findings)."""
    from CLIPSegLib.models import load_weights, read_spec, write_spec

    spec = read_spec(tiny_model)
    weights = load_weights(spec)
    spec = {k: v for k, v in spec.items() if not k.startswith("_") and k != "files"}
    spec["presence"] = {**spec["presence"], "match_min_cosine": 0.95,
                        "per_finding": {"square": {**spec["presence"], "phrases": ["dark square"]}}}
    return write_spec(spec, weights, tmp_path / "parent")


def _maps(engine, prompts, size=32):
    torch.manual_seed(1)
    slices = torch.rand(2, 1, size, size)
    return slices, engine.predict(slices, engine.encode_prompts(prompts))


def test_the_parents_findings_are_answered_by_its_kept_network_unchanged(sparse_table, tiny_with_finding, tmp_path):
    """A fine-tuned cliptnseg model keeps its parent's network: a prompt that is not the new phrase gives exactly
    the parent's maps, the new phrase the fine-tuned network's; the parent's frozen CLIP image tower is stored
    once."""
    from safetensors import safe_open

    from CLIPSegLib.inference.segment_file import load_engine

    result = finetune(sparse_table, tmp_path / "out", tiny_with_finding, "disc", steps=3, batch_size=1)
    spec = result.spec
    assert spec["new_phrases"] == ["bright disc"] and spec["parent_network"]["id"] == "tiny-random"
    assert spec["parent_network"]["presence"]["per_finding"]["square"]["phrases"] == ["dark square"]
    assert spec["training"]["keeps_parent_network"] and spec["training"]["replay_phantoms"] == 0
    with safe_open(str(result.spec_path.with_suffix(".safetensors")), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("parent.") for k in keys)  # the trained decoder, fine branch and head of the parent
    assert not any(k.startswith("parent.clip.visual.") for k in keys)  # frozen: stored once
    tuned, parent = load_engine(str(result.spec_path), device="cpu"), load_engine(str(tiny_with_finding), device="cpu")
    _, (old, old_presence) = _maps(tuned, ["dark square", "bright disc"])
    _, (ref, ref_presence) = _maps(parent, ["dark square", "bright disc"])
    close = lambda a, b: torch.allclose(a, b, atol=1e-6)  # noqa: E731  (batched with other prompts: rounding)
    assert close(old[:, 0], ref[:, 0]) and close(old_presence[:, 0], ref_presence[:, 0])
    assert not torch.allclose(old[:, 1], ref[:, 1])  # the new phrase: the fine-tuned network
    assert tuned.parent.net.clip.visual is tuned.net.clip.visual  # and held once in memory
    readings = tuned.encode_prompts(["dark square", "bright disc"]).readings
    assert readings[0].interpretation().endswith("answered by the kept network of 'tiny-random'")
    assert readings[1].interpretation().endswith("answered by the fine-tuned network")
    _, (alone, _) = _maps(tuned, ["bright disc"])
    assert close(alone[:, 0], old[:, 1])  # a prompt's map does not depend on the others asked with it


def test_a_kept_parent_of_another_size_and_a_second_fine_tune(sparse_table, tiny_with_finding, tmp_path):
    """At 64 px the kept 32 px parent sees the slices resized (its maps resized back); fine-tuned again, the new
    model keeps both: its parent's phrase and the root's findings are answered as they were."""
    from CLIPSegLib.inference.preprocessing import resize_slices
    from CLIPSegLib.inference.segment_file import load_engine

    first = finetune(sparse_table, tmp_path / "out", tiny_with_finding, "big", steps=2, batch_size=1, input_size=64)
    ring = tmp_path / "ring.csv"
    ring.write_text(sparse_table.read_text(encoding="utf-8").replace("bright disc", "dark ring"), encoding="utf-8")
    second = finetune(ring, tmp_path / "out", first.spec_path, "again", steps=2, batch_size=1)
    assert second.spec["new_phrases"] == ["dark ring"]
    assert second.spec["parent_network"]["parent_network"]["id"] == "tiny-random"
    root, big = load_engine(str(tiny_with_finding), device="cpu"), load_engine(str(first.spec_path), device="cpu")
    again = load_engine(str(second.spec_path), device="cpu")
    slices, (maps, _) = _maps(again, ["dark square", "bright disc", "dark ring"], 64)
    torch.manual_seed(1)
    ref_root, _ = root.predict(resize_slices(slices, 32), root.encode_prompts(["dark square"]))
    assert torch.allclose(maps[:, :1], resize_slices(ref_root, 64), atol=1e-6)
    ref_big, _ = big.predict(slices, big.encode_prompts(["bright disc"]))
    assert torch.allclose(maps[:, 1:2], ref_big, atol=1e-6)
    assert not torch.allclose(maps[:, 2], ref_big[:, 0])
    readings = again.encode_prompts(["dark square", "bright disc", "dark ring"]).readings
    assert [r.answered for r in readings] == ["the kept network of 'tiny-random'", "the kept network of 'big'",
                                              "the fine-tuned network"]


def test_a_single_network_keeps_no_parent(sparse_table, tiny_model, tmp_path):
    from safetensors import safe_open

    result = finetune(sparse_table, tmp_path / "out", tiny_model, "one", steps=2, batch_size=1, keep_parent=False)
    assert "parent_network" not in result.spec and "new_phrases" not in result.spec
    with safe_open(str(result.spec_path.with_suffix(".safetensors")), "pt") as f:
        assert not any(k.startswith("parent.") for k in f.keys())


def test_weights_of_a_kept_parent_without_its_spec_entry_are_refused(sparse_table, tiny_model, tmp_path):
    from CLIPSegLib.errors import ModelError
    from CLIPSegLib.inference.segment_file import load_engine

    result = finetune(sparse_table, tmp_path / "out", tiny_model, "disc", steps=2, batch_size=1)
    spec = json.loads(result.spec_path.read_text(encoding="utf-8"))
    del spec["parent_network"]
    result.spec_path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ModelError, match="kept parent network.*parent_network"):
        load_engine(str(result.spec_path), device="cpu")


def test_a_kept_parent_entry_without_its_weights_is_refused(sparse_table, tiny_model, tmp_path):
    from CLIPSegLib.errors import ModelError
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.models import load_weights, read_spec, write_spec

    result = finetune(sparse_table, tmp_path / "out", tiny_model, "disc", steps=2, batch_size=1)
    spec = read_spec(result.spec_path)
    weights = {k: v for k, v in load_weights(spec).items() if not k.startswith("parent.")}
    path = write_spec({k: v for k, v in spec.items() if not k.startswith("_") and k != "files"}, weights,
                      tmp_path / "stripped")
    with pytest.raises(ModelError, match="keeps a parent network.*its weights hold none"):
        load_engine(str(path), device="cpu")


def test_the_teacher_answers_as_the_parent_engine_does_kept_parent_included(sparse_table, tiny_with_finding,
                                                                            tmp_path):
    """Replay distils the parent's answers: for a model that keeps its parent, an old finding's target is the kept
    network's map, the new phrase's the fine-tuned network's (what `clipseg segment` would give)."""
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.training.finetune import Teacher

    result = finetune(sparse_table, tmp_path / "out", tiny_with_finding, "disc", steps=2, batch_size=1)
    engine = load_engine(str(result.spec_path), device="cpu")
    teacher = Teacher(engine, torch.device("cpu"))
    images = torch.rand(2, 1, 32, 32)
    phrases = ["dark square", "bright disc", "dark square"]
    probs, _ = teacher._targets(images, phrases, torch.tensor([0, 0, 1]))
    maps, _ = engine.predict(images, engine.encode_prompts(["dark square", "bright disc"]))
    kept, _ = engine.parent.predict(images, engine.parent.encode_prompts(["dark square"]))
    assert torch.allclose(probs[0], kept[0, 0], atol=1e-6) and torch.allclose(probs[2], kept[1, 0], atol=1e-6)
    assert torch.allclose(probs[1], maps[0, 1], atol=1e-6)
    assert not torch.allclose(probs[1], kept[0, 0], atol=1e-3)


def _two_structures(tmp_path, overlap: bool):
    """A volume with a disc and a square painted on slices 1..6, as a CSV of two phrases (``overlap``: the square's
    mask also takes the disc's centre voxel on one slice)."""
    image, disc = _disc_volume()
    square = np.zeros_like(disc)
    square[:, 2:8, 22:28] = True
    image[square] -= 60
    if overlap:
        square[3, 16, 14] = True
    write_volume(tmp_path / "img.nrrd", image, GEOMETRY)
    for name, m in (("disc", disc), ("square", square)):
        write_volume(tmp_path / f"{name}.nrrd", m.astype(np.uint8), GEOMETRY)
    table = tmp_path / "two.csv"
    table.write_text("image,mask,phrase,slices\nimg.nrrd,disc.nrrd,bright disc,1;2;3;4;5;6\n"
                     "img.nrrd,square.nrrd,dark square,2;3;4;5;6;7\n", encoding="utf-8")
    return table, image


def test_phrases_that_never_share_a_voxel_are_exclusive(tmp_path):
    table, _ = _two_structures(tmp_path, overlap=False)
    assert ls.exclusive_pairs(ls.read_data(table)) == [("bright disc", "dark square")]
    table, _ = _two_structures(tmp_path, overlap=True)
    assert ls.exclusive_pairs(ls.read_data(table)) == []
    table.write_text("image,mask,phrase,slices\nimg.nrrd,disc.nrrd,bright disc,1;2\n"
                     "img.nrrd,square.nrrd,dark square,5;6\n", encoding="utf-8")
    assert ls.exclusive_pairs(ls.read_data(table)) == []  # never labelled together: nothing says they exclude


def test_exclusive_new_phrases_compete_voxel_wise_in_the_model_they_make(tmp_path, tiny_model):
    """Fine-tuned on two structures that never overlap, the model lists them as exclusive and the pipeline lets
    them compete: each voxel keeps at most one of the two probabilities, whatever the network says."""
    from CLIPSegLib.inference.pipeline import segment_volume
    from CLIPSegLib.inference.segment_file import load_engine

    table, image = _two_structures(tmp_path, overlap=False)
    result = finetune(table, tmp_path / "out", tiny_model, "two", steps=2, batch_size=1)
    presence = result.spec["presence"]
    assert presence["exclusive"] == [["bright disc", "dark square"]]
    engine = load_engine(str(result.spec_path), device="cpu")
    run = segment_volume(engine, image, GEOMETRY, ["bright disc"], presence={"threshold": 0.0},
                         keep_probabilities=True)
    assert run.findings[0].info["competes_with"] == ["dark square"]
    both = segment_volume(engine, image, GEOMETRY, ["bright disc", "dark square"], keep_probabilities=True)
    p = both.probabilities
    assert not ((p[0] > 0) & (p[1] > 0)).any() and ((p[0] > 0) | (p[1] > 0)).any()
    np.testing.assert_array_equal(run.probabilities[0], p[0])  # the rival is asked whether or not the user asks it


def test_rival_negative_loss_weighs_each_pairs_rival_pixels_as_a_whole():
    """Against a direct computation: pair 0's rival pixels are pair 1's mask (same slice) and the other way; pair 2
    (alone on its slice) has none; a pixel both phrases hold is no negative for either."""
    from CLIPSegLib.training.losses import rival_negative_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 6)
    masks = torch.zeros(3, 6, 6)
    masks[0, :2, :2] = 1
    masks[1, 4:, 3:] = 1
    masks[1, 0, 0] = 1  # shared with pair 0
    masks[2, 3, 3] = 1
    pair_index = torch.tensor([0, 0, 1])
    bce = lambda x: torch.nn.functional.softplus(x)  # noqa: E731  (BCE of a logit against 0)
    hard0 = (masks[1] > 0) & (masks[0] == 0)
    hard1 = (masks[0] > 0) & (masks[1] == 0)
    expected = (bce(logits[0][hard0]).mean() + bce(logits[1][hard1]).mean()) / 2
    assert torch.allclose(rival_negative_loss(logits, masks, pair_index), expected)
    assert rival_negative_loss(logits[2:], masks[2:], pair_index[2:]) == 0


def test_foreground_loss_weighs_each_pairs_own_pixels_as_a_whole():
    """Against a direct computation: a one-pixel finding weighs as much as a nine-pixel one; a pair without a
    finding adds nothing; no finding at all gives 0 with a gradient path."""
    from CLIPSegLib.training.losses import foreground_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 6, requires_grad=True)
    masks = torch.zeros(3, 6, 6)
    masks[0, :3, :3] = 1
    masks[1, 4, 4] = 1
    bce = lambda x: torch.nn.functional.softplus(-x)  # noqa: E731  (BCE of a logit against 1)
    expected = (bce(logits[0, :3, :3]).mean() + bce(logits[1, 4, 4])) / 2
    assert torch.allclose(foreground_loss(logits, masks), expected)
    even = torch.zeros(3, 6, 6, requires_grad=True)
    foreground_loss(even, masks).backward()
    assert torch.allclose(even.grad[1, 4, 4], 9 * even.grad[0, 0, 0])  # per pixel, the small finding weighs more
    assert (even.grad[2] == 0).all() and (even.grad[0][masks[0] == 0] == 0).all()
    assert foreground_loss(logits, torch.zeros_like(masks)) == 0


def test_the_held_out_share_spares_the_slices_holding_a_structure():
    """Twelve labelled slices, a structure on five: a quarter (3) is held out, one holding the structure (the
    middle one) and two without it; so four of the five slices showing it are trained on."""
    truth = np.zeros((12, 8, 8), bool)
    truth[3:8, 2:5, 2:5] = True
    vol = ls.LabelledVolume(np.zeros((12, 8, 8), np.float32), GEOMETRY, {"blob": truth}, {"blob": list(range(12))})
    train, held = ls.split_slices([vol], 0.25)
    assert len(held) == 3 and sorted(train + held) == [(0, k) for k in range(12)]
    assert [k for _, k in held if truth[k].any()] == [5]
    assert sum(truth[k].any() for _, k in train) == 4


def _marks(spec: dict, depth: int = 12, labelled=None) -> ls.LabelledVolume:
    """A volume whose phrase p is present on the slices ``spec[p]`` (one voxel each), all slices labelled."""
    truth = {}
    for p, ks in spec.items():
        truth[p] = np.zeros((depth, 4, 4), bool)
        truth[p][ks, 1, 1 + list(spec).index(p)] = True
    return ls.LabelledVolume(np.zeros((depth, 4, 4), np.float32), GEOMETRY, truth,
                             {p: list(labelled or range(depth)) for p in spec})


@pytest.mark.parametrize("spec", [{"a": [4, 5], "b": [5, 6]}, {"a": [4, 5], "b": [3, 4, 6]},
                                  {"blob": list(range(3, 12))}, {"a": [4, 5], "b": [4, 5]}])
def test_every_phrase_keeps_a_slice_showing_it_on_both_sides_of_the_split(spec):
    vol = _marks(spec)
    train, held = ls.split_slices([vol], 0.25)
    for p in spec:
        assert any(vol.holds(p, k) for _, k in held) and any(vol.holds(p, k) for _, k in train), (p, held)
    if "blob" in spec:  # the 3 empty slices are the absent cases: two of them held, not a second slice of the blob
        assert [k for _, k in held if not vol.holds("blob", k)] == [0, 2]


def test_phrases_never_shown_on_a_common_slice_are_not_called_exclusive():
    lesion = _marks({"liver": [2, 3, 4], "lesion": [8]})
    lesion.slices = {"liver": [2, 3, 4, 5], "lesion": [5, 8]}  # together only on 5, where the lesion is not shown
    assert ls.exclusive_pairs([lesion]) == []


def test_recalibration_keeps_the_exclusive_pairs_of_fine_tuned_phrases():
    from CLIPSegLib.training.calibration import merged_presence

    parent = {"presence": {"per_finding": {"nodule": {"phrases": ["nodule"]}, "cyst": {"phrases": ["cyst"]}},
                           "exclusive": [["nodule", "cyst"], ["lateral ventricles", "fourth ventricle"]]}}
    own = {"lateral ventricles": {"phrases": ["lateral ventricles"]},
           "fourth ventricle": {"phrases": ["fourth ventricle"]}}
    assert merged_presence(parent, own)["exclusive"] == parent["presence"]["exclusive"]
    replaced = merged_presence(parent, {"cyst": {"phrases": ["cyst"]}}, [("cyst", "septum")])
    assert replaced["exclusive"] == [["lateral ventricles", "fourth ventricle"], ["cyst", "septum"]]


def test_new_phrases_start_as_far_apart_as_the_parents_findings():
    from CLIPSegLib.training.finetune import mean_cosine, spread_apart

    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, generator=gen)
    # three near-identical embeddings, two of them nearer still (a cluster of near-synonyms), unnormalised
    near = torch.stack([base + 0.05 * torch.randn(8, generator=gen) for _ in range(2)])
    near = torch.cat([near, near[1:] + 0.001 * torch.randn(1, 8, generator=gen)]) * torch.tensor([[1.], [2.], [3.]])
    assert mean_cosine(near) > 0.99 and float(unit(near[1]) @ unit(near[2])) > 0.9999
    spread = spread_apart(near, 0.8)
    assert mean_cosine(spread) == pytest.approx(0.8, abs=1e-4)
    assert torch.allclose(spread.norm(dim=-1), near.norm(dim=-1))  # lengths kept (unnormalised text embeddings)
    cos = unit(spread) @ unit(spread).T
    assert float(cos[1, 2]) < 0.85  # the cluster is spread too, not left at 0.9999 while the third moves away
    far = torch.eye(3, 8)
    assert torch.equal(spread_apart(far, 0.8), far) and torch.equal(spread_apart(near[:1], 0.8), near[:1])
    same = base.repeat(2, 1)
    assert torch.equal(spread_apart(same, 0.8), same)  # nothing to spread along


def test_only_the_phrases_starting_from_clip_are_spread():
    from CLIPSegLib.engines.cliptnseg.engine import phrase_key
    from CLIPSegLib.models.catalogue import load_spec
    from CLIPSegLib.progress import Progress
    from CLIPSegLib.training.finetune import CLIPTNSegTuning, mean_cosine

    tuning = CLIPTNSegTuning(load_spec(None), None, Progress("none"))
    target = tuning.findings_spread()
    phrases = ["lateral ventricles", "fourth ventricle", "third ventricle"]
    tuning.adapt_text("embeddings", phrases, torch.device("cpu"))
    assert mean_cosine(tuning.text.weight.detach()) == pytest.approx(target, abs=1e-3)
    assert tuning.spread_to == target and 0 < target < 0.95
    learned = {phrase_key("lateral ventricles"): torch.nn.functional.normalize(torch.ones(64), dim=0)}
    tuning.engine.learned = learned  # as if the parent had learned this phrase: its embedding is the start, unmoved
    tuning.adapt_text("embeddings", phrases, torch.device("cpu"))
    start = tuning.text.weight.detach()
    assert torch.equal(start[0], learned[phrase_key("lateral ventricles")])
    assert mean_cosine(start[1:]) == pytest.approx(target, abs=1e-3)
