"""TGC-Net training on report phantoms (``training.tgcnet_recipe``, ``training.report_data``) and its evaluation
(``evaluation.report_cases``): a tiny run end to end, the exported model, and what the report data never does."""

import json
import re

import numpy as np
import pytest
import torch

from CLIPSegLib.errors import InputError
from CLIPSegLib.synthetic.report_phantoms import KINDS

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
             "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}


def test_report_augmentation_never_mirrors_the_chest():
    """A report names left and right: the augmentation never flips an image (a bright image-left half stays on the
    left under every augmentation); only ``ReportBank(mirror=True)`` mirrors, with its lines' sides swapped."""
    from CLIPSegLib.training.datasets import apply_augmentation
    from CLIPSegLib.training.report_data import make_report_augmentation

    transform = make_report_augmentation()
    transform.set_random_state(0)
    image = np.zeros((32, 32), np.float32)
    image[:, :16] = 1.0
    mask = np.zeros((1, 32, 32), np.float32)
    mask[0, 8:24, 2:12] = 1
    for _ in range(40):
        img, m = apply_augmentation(transform, image, mask)
        assert img[0, :, :16].mean() > img[0, :, 16:].mean()
        cols = torch.nonzero(m[0])[:, 1]
        assert len(cols) and cols.float().mean() < 16


def test_report_lines_are_the_same_content_in_both_wordings():
    from CLIPSegLib.training.report_data import report_case

    _, _, train = report_case(1000, "train")
    _, _, rephrased = report_case(1000, "rephrased")
    assert [q.role for q in train] == [q.role for q in rephrased]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(train, rephrased))
    assert [q.text for q in train] != [q.text for q in rephrased]


def test_a_line_drawn_twice_is_asked_once_in_both_wordings():
    """Some seeds draw the same line (kind, sides, zone) twice; a run asks it once, in either wording."""
    from CLIPSegLib.synthetic.report_phantoms import make_report_phantom
    from CLIPSegLib.synthetic.report_text import sample_queries
    from CLIPSegLib.training.report_data import report_case

    def content(queries):
        return [(q.kind, q.sides, q.zone) for q in queries]

    twice = [seed for seed in range(1000, 1040)
             if len(set(drawn := content(sample_queries(make_report_phantom(seed=seed),
                                                        np.random.default_rng([seed, 7]), 3, "train")))) < len(drawn)]
    assert twice, "no seed of 1000..1039 draws a line twice: pick a range that does"
    for wording in ("train", "rephrased"):
        queries = report_case(twice[0], wording)[2]
        assert len(queries) == len(set(content(queries))) == len({q.text for q in queries}) < 3


def test_thyroid_maps_average_the_mirror_and_report_maps_do_not_by_default():
    """Left and right carry meaning in a report line, not in an ultrasound slice: only thyroid models (and their
    calibration) average each slice's map with its mirror's by default (a report model only when trained on mirrors
    with their sides swapped, ``--report-mirror``), and only report models read the patient's sides
    (``inference.laterality``)."""
    from CLIPSegLib.training.tgcnet_recipe import tgcnet_spec

    assert tgcnet_spec("t", TINY_CLIP, "thyroid")["inference"] == {"flip_average": True}
    assert tgcnet_spec("r", TINY_CLIP, "report")["inference"] == {"flip_average": False,
                                                                   "patient_sides": {"margin_mm": 10.0}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    root = tmp_path_factory.mktemp("tgcnet-train")
    path = run_tgcnet_training(root / "models", root / "work", "tgcnet-test", "report", n_images=12, clip_steps=2,
                               steps=3, calibration_volumes=2, batch_size=4, clip_cfg=TINY_CLIP, lora_rank=2,
                               network={"extract_layers": [1, 2], "dim": 16, "heads": 2,
                                        "cnn_channels": [4, 4, 8, 8]})
    return path, root


def test_a_report_run_exports_a_tgcnet_model_with_its_adapters_merged(trained):
    from safetensors.torch import load_file

    from CLIPSegLib.models import load_spec

    path, root = trained
    spec = load_spec(str(path))
    assert spec["engine"] == "tgcnet" and spec["inference"]["flip_average"] is False
    assert len(spec["knowledge"]["sha256"]) == 64 and spec["presence"]["calibration"]["volumes"] == 2
    assert spec["network"]["location"] is True and len(spec["locations"]["sha256"]) == 64
    per = spec["presence"]["per_finding"]  # one rule per opacity kind the calibration lines named
    assert per and all(kind in KINDS and rule["phrases"] == [kind] for kind, rule in per.items())
    assert set(spec["presence"]["calibration"]["mean_dice"]) <= set(KINDS)
    counts = spec["training"]["parameters"]
    assert 0 < counts["trainable"] < counts["total"]
    weights = load_file(str(path.with_suffix(".safetensors")))
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    clip = torch.load(root / "work" / "clip.pt", weights_only=True)["model"]
    key = "transformer.resblocks.0.mlp.c_fc.weight"  # a LoRA target of the text tower: trained, then merged
    assert not torch.allclose(weights[f"clip.{key}"].float(), clip[key].half().float())
    vkey = "visual.transformer.resblocks.0.mlp.c_fc.weight"  # the image tower stays frozen
    assert torch.equal(weights[f"clip.{vkey}"], clip[vkey].half())


def test_the_report_evaluation_scores_lines_by_role(trained):
    from CLIPSegLib.evaluation.evaluator import evaluate
    from CLIPSegLib.evaluation.report_cases import ReportCases
    from CLIPSegLib.inference.segment_file import load_engine

    engine = load_engine(str(trained[0]), device="cpu")
    source = ReportCases(2, 1000, "rephrased")
    report = evaluate(source, engine)
    rows, s = report["cases"], report["summary"]
    from CLIPSegLib.training.report_data import report_case

    asked = sum(len(report_case(seed, "rephrased")[2]) for seed in (1000, 1001))
    assert len(rows) == asked and {r["role"] for r in rows} <= {"describes", "absent", "wrong-side"}
    assert s["dice"]["n"] == sum(r["role"] == "describes" for r in rows)
    assert all(r["dice"] is None for r in rows if r["role"] != "describes")
    text = ReportCases.format(report)
    assert "rephrased wording" in text and "wrong side" in text


def test_a_clip_stage_alone_writes_the_clip_and_stops_without_error(tmp_path):
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    out = run_tgcnet_training(tmp_path / "models", tmp_path / "work", "clip-only", "report", n_images=8,
                              clip_steps=1, stages=("clip",), batch_size=4, clip_cfg=TINY_CLIP,
                              network={"extract_layers": [1, 2], "dim": 16, "heads": 2, "cnn_channels": [4, 4, 8, 8]})
    assert out is None and (tmp_path / "work" / "clip.pt").is_file()
    assert not (tmp_path / "work" / "segmenter.pt").exists() and not (tmp_path / "models").exists()


def test_report_rules_calibrate_a_cliptnseg_engine_too():
    """The CLIP-TNseg comparison (benchmarks/tgcnet_ablation.py) is calibrated as TGC-Net is: one rule per kind."""
    from CLIPSegLib.engines.clip_backbone import build_clip
    from CLIPSegLib.engines.cliptnseg.engine import CLIPTNSegEngine
    from CLIPSegLib.engines.cliptnseg.network import CLIPTNSegNet
    from CLIPSegLib.training.report_data import REPORT_CALIBRATION_SEED_BASE, calibrate_report_rules

    torch.manual_seed(0)
    net = CLIPTNSegNet(build_clip(TINY_CLIP), {"extract_layers": [1, 2], "reduce_dim": 8, "decoder_heads": 2,
                                               "coarse_channels": 4, "fine_channels": [4, 4, 8, 8],
                                               "head_channels": 4, "presence_head": True}).eval()
    engine = CLIPTNSegEngine(net, torch.device("cpu"), {"inference": {"flip_average": False}})
    rule = calibrate_report_rules(engine, 2)
    assert rule["calibration"]["volumes"] == 2
    assert rule["calibration"]["seeds"] == [REPORT_CALIBRATION_SEED_BASE, REPORT_CALIBRATION_SEED_BASE + 1]
    assert rule["per_finding"] and all(r["phrases"] == [k] and k in KINDS for k, r in rule["per_finding"].items())


def test_bad_tgcnet_training_arguments_are_refused_before_any_work(tmp_path):
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    with pytest.raises(InputError, match="--ablate 'cnn' is not a TGC-Net module"):
        run_tgcnet_training(tmp_path, tmp_path / "w", "x", ablate=("cnn",))
    with pytest.raises(InputError, match="--dataset 'xray'"):
        run_tgcnet_training(tmp_path, tmp_path / "w", "x", data="xray")
    assert not (tmp_path / "w").exists()


def test_init_from_continues_a_tgcnet_model_and_records_its_lineage(trained, tmp_path):
    from safetensors.torch import load_file

    from CLIPSegLib.engines.tgcnet.network import TGCNet
    from CLIPSegLib.engines.clip_backbone import build_clip
    from CLIPSegLib.engines.tgcnet.knowledge import DEFAULT_KNOWLEDGE, load_knowledge
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    parent_path = trained[0]
    network = load_spec(str(parent_path))["network"]
    path = run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgcnet-more", "report", n_images=12,
                               steps=1, calibration_volumes=2, batch_size=4, clip_cfg=TINY_CLIP, lora_rank=2,
                               network=network, stages=("segmenter", "calibrate", "export"),
                               init_from=str(parent_path), max_grad_norm=1.0)
    spec, parent = load_spec(str(path)), load_spec(str(parent_path))
    assert spec["training"]["parent"]["id"] == "tgcnet-test" and spec["training"]["clip_steps"] == 0
    assert spec["training"]["max_grad_norm"] == 1.0 and "max_grad_norm" not in parent["training"]
    segmenter_run = torch.load(tmp_path / "work" / "segmenter.pt", weights_only=True)  # the loop itself got the limit
    assert json.loads(segmenter_run["fingerprint"])["max_grad_norm"] == 1.0
    assert spec["training"]["parent"]["weights_sha256"] == {f["name"]: f["sha256"] for f in parent["files"]}
    assert not (tmp_path / "work" / "clip.pt").exists()  # the parent's CLIP is kept, not retrained
    child, before = load_file(str(path.with_suffix(".safetensors"))), load_file(str(parent_path.with_suffix(
        ".safetensors")))
    vkey = "clip.visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(child[vkey], before[vkey])
    fresh = TGCNet(build_clip(TINY_CLIP), network, load_knowledge(DEFAULT_KNOWLEDGE)).state_dict()
    modules = [k for k in child if not k.startswith("clip.") and child[k].is_floating_point()
               and child[k].numel() > 16]
    # one step at the warm-up learning rate moves a weight by ~1e-4; a random start differs by far more
    moved = max((child[k].float() - before[k].float()).abs().max().item() for k in modules)
    fresh_gap = max((fresh[k].float() - before[k].float()).abs().max().item() for k in modules)
    assert moved < 0.01 < fresh_gap


def test_a_varied_wording_run_trains_on_varied_lines_and_says_so(trained, tmp_path):
    """--report-wording varied: the bank draws varied lines, the spec records the wording (and its words as the
    training vocabulary), and its checkpoint does not resume as a run of the training wording."""
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.training.report_data import ReportBank
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    bank = ReportBank(4, 32, wording="varied")
    torch.manual_seed(0)
    lines = {text for i in range(4) for _ in range(10) for text in bank[i][1]}
    assert any(text.startswith(("impression:", "cxr:", "film:", "today:", "report:")) for text in lines)
    with pytest.raises(ValueError, match="wording must be one of train, varied"):
        ReportBank(1, 32, wording="rephrased")
    args = dict(n_images=12, steps=1, calibration_volumes=2, batch_size=4, clip_cfg=TINY_CLIP, lora_rank=2,
                network=load_spec(str(trained[0]))["network"], init_from=str(trained[0]))
    path = run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgcnet-varied", "report",
                               stages=("segmenter", "calibrate", "export"), wording="varied", **args)
    training = load_spec(str(path))["training"]
    assert training["wording"] == "varied" and {"impression", "unchanged"} <= set(training["phrases"])
    with pytest.raises(InputError, match="other settings"):
        run_tgcnet_training(tmp_path / "models2", tmp_path / "work", "tgcnet-varied", "report",
                            stages=("segmenter",), **args)


def test_location_support_is_recorded_before_the_rules_are_calibrated(trained, tmp_path):
    """--location-support: a recalibration of the parent writes ``inference.location_support`` and its rules were
    fitted with it (the calibration's engine backs located lines); thyroid data and an ablated DATE refuse it."""
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    network = load_spec(str(trained[0]))["network"]
    path = run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgcnet-backed", "report", calibration_volumes=2,
                               clip_cfg=TINY_CLIP, lora_rank=2, network=network, init_from=str(trained[0]),
                               stages=("calibrate", "export"), location_support=True)
    spec = load_spec(str(path))
    sides = {"patient_sides": {"margin_mm": 10.0}}
    assert spec["inference"] == {"flip_average": False, "location_support": True, **sides}
    assert load_spec(str(trained[0]))["inference"] == {"flip_average": False, **sides}
    assert spec["presence"]["calibration"]["location_support"] is True
    assert spec["presence"]["calibration"]["patient_sides"] == 10.0
    with pytest.raises(InputError, match="calibrated with --location-support, this run asks without --location-support; run the calibrate stage"):
        run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgcnet-unbacked", "report", clip_cfg=TINY_CLIP,
                            lora_rank=2, network=network, init_from=str(trained[0]), stages=("export",))
    # rules fitted before the report models read the patient's sides are not exported under a spec that does
    staged = tmp_path / "work" / "presence.json"
    presence = json.loads(staged.read_text())
    del presence["calibration"]["patient_sides"]
    staged.write_text(json.dumps(presence))
    with pytest.raises(InputError, match="calibrated without the patient's sides, this run asks with one-sided lines "
                                         r"kept to their side \(10 mm margin\)"):
        run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgcnet-old", "report", clip_cfg=TINY_CLIP,
                            lora_rank=2, network=network, init_from=str(trained[0]), stages=("export",),
                            location_support=True)
    # clipseg calibrate re-fits a report model's rules on report phantoms, with the maps its spec asks for
    from CLIPSegLib.training.recalibrate import recalibrate_model
    from CLIPSegLib.training.report_data import REPORT_CALIBRATION_SEED_BASE

    out = tmp_path / "again" / "re.json"
    again = load_spec(str(recalibrate_model(str(path), out, 2)))
    calibration = again["presence"]["calibration"]
    assert calibration["family"] == "report" and calibration["location_support"] is True
    # the command it records re-runs it: the report seeds it used, no thyroid family
    assert calibration["command"] == (f"clipseg calibrate --output {out} --phantoms 2 --seed "
                                      f"{REPORT_CALIBRATION_SEED_BASE} --model {path} --force")
    for family in ("B", "A+B"):  # an explicit family, even the thyroid default, is refused
        with pytest.raises(InputError, match=re.escape(f"--family {family}: ") + ".* is a report model, calibrated"):
            recalibrate_model(str(path), tmp_path / "again" / "re2.json", 2, family=family)
    assert calibration["seeds"] == [REPORT_CALIBRATION_SEED_BASE, REPORT_CALIBRATION_SEED_BASE + 1]
    assert set(again["presence"]["per_finding"]) <= set(KINDS)
    for bad in ({"data": "thyroid"}, {"ablate": ("date",)}):
        with pytest.raises(InputError, match="--location-support needs --dataset report"):
            run_tgcnet_training(tmp_path, tmp_path / "w", "x", clip_cfg=TINY_CLIP, location_support=True, **bad)
    assert not (tmp_path / "w").exists()


def test_a_mirrored_run_trains_on_mirrors_with_swapped_sides_and_flip_averages(trained, tmp_path, monkeypatch):
    """--report-mirror: about half the bank's draws are the phantom mirrored (image and masks) with every side word of
    its lines swapped; the run sets flip averaging before its rules are calibrated and records it, and rules
    calibrated without it are not exported under it; thyroid data refuses it."""
    from CLIPSegLib.engines.tgcnet.engine import TGCNetEngine
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.training.report_data import ReportBank
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    plain, mirrored = ReportBank(2, 32, augment=False), ReportBank(2, 32, augment=False, mirror=True)
    flips = sided = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, lines, masks = plain[1]
        torch.manual_seed(seed)  # the same lines drawn, then the coin
        m_image, m_lines, m_masks = mirrored[1]
        if torch.equal(image, m_image):
            assert m_lines == lines and torch.equal(masks, m_masks)
            continue
        flips += 1
        sided += any(w in ("left", "right") for line in lines for w in line.split(" "))
        assert torch.allclose(m_image, image.flip(-1)) and torch.equal(m_masks, masks.flip(-1))
        swap = {"left": "right", "right": "left"}
        assert m_lines == [" ".join(swap.get(w, w) for w in line.split(" ")) for line in lines]
    assert 3 <= flips <= 9 and sided  # some mirrored draws named a side
    args = dict(n_images=12, calibration_volumes=2, batch_size=4, clip_cfg=TINY_CLIP, lora_rank=2,
                network=load_spec(str(trained[0]))["network"], init_from=str(trained[0]))
    asked = []  # the lines the calibration asked mirrored slices
    real = TGCNetEngine.mirror_prompts
    monkeypatch.setattr(TGCNetEngine, "mirror_prompts", lambda self, state: asked.append(state.prompts) or
                        real(self, state))
    path = run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgcnet-mirror", "report", steps=1,
                               stages=("segmenter", "calibrate", "export"), mirror=True, **args)
    spec = load_spec(str(path))
    assert spec["inference"]["flip_average"] is True and spec["training"]["mirror"] is True
    assert spec["presence"]["calibration"]["flip_average"] is True and len(asked) >= 2  # each phantom
    with pytest.raises(InputError, match="trained with --report-mirror, this run asks without it"):
        run_tgcnet_training(tmp_path / "models2", tmp_path / "work", "tgcnet-mirror", "report", stages=("export",),
                            **args)
    staged = tmp_path / "work" / "presence.json"  # rules fitted without flip averaging, on the mirrored segmenter
    presence = json.loads(staged.read_text())
    presence["calibration"]["flip_average"] = False
    staged.write_text(json.dumps(presence))
    with pytest.raises(InputError, match=r"calibrated without flip averaging, this run asks with flip averaging"):
        run_tgcnet_training(tmp_path / "models4", tmp_path / "work", "tgcnet-mirror", "report", stages=("export",),
                            mirror=True, **args)
    with pytest.raises(InputError, match="trained without --report-mirror, this run asks with it"):  # the parent's
        run_tgcnet_training(tmp_path / "models3", tmp_path / "work3", "tgcnet-m", "report", mirror=True,
                            stages=("calibrate", "export"), **args)
    with pytest.raises(InputError, match="--report-mirror needs --dataset report"):
        run_tgcnet_training(tmp_path, tmp_path / "w", "x", "thyroid", clip_cfg=TINY_CLIP, mirror=True)


def test_a_focused_run_draws_the_phantoms_of_one_kind_twice_and_records_it(trained, tmp_path):
    """--report-focus KIND: every phantom holding that kind is listed twice in the bank (the others once), the run's
    checkpoint and spec say so; an unknown kind or thyroid data is refused before any work."""
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.training.report_data import ReportBank
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    kind = "ground-glass opacity"
    plain, focused = ReportBank(12, 32, augment=False), ReportBank(12, 32, augment=False, focus=kind)
    holding = [i for i, ph in enumerate(plain.phantoms) if any(o.kind == kind for o in ph.opacities)]
    assert 0 < len(holding) < 12 and len(focused) == 12 + len(holding)
    assert sorted(focused.order) == sorted(list(range(12)) + holding)
    torch.manual_seed(0)
    image, lines, masks = focused[12]  # the first repeat: the first phantom holding the kind
    torch.manual_seed(0)
    p_image, p_lines, p_masks = plain[holding[0]]
    assert torch.equal(image, p_image) and lines == p_lines and torch.equal(masks, p_masks)
    once = focused.drawn_once()  # the CLIP stage's view: each phantom once
    assert len(once) == 12 and once.focus is None and len(focused) == 12 + len(holding)
    args = dict(n_images=12, calibration_volumes=2, batch_size=4, clip_cfg=TINY_CLIP, lora_rank=2,
                network=load_spec(str(trained[0]))["network"], init_from=str(trained[0]))
    path = run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgcnet-focus", "report", steps=1,
                               stages=("segmenter", "calibrate", "export"), focus=kind, **args)
    assert load_spec(str(path))["training"]["focus"] == kind
    assert json.loads(torch.load(tmp_path / "work" / "segmenter.pt", weights_only=True)["fingerprint"])["focus"] == kind
    for bad, message in (({"focus": "nodule"}, "--report-focus 'nodule' is not an opacity kind"),
                         ({"focus": kind, "data": "thyroid"}, "--report-focus needs --dataset report"),
                         ({"focus": kind, "stages": ("calibrate", "export")}, "trains no segmenter")):
        with pytest.raises(InputError, match=message):
            run_tgcnet_training(tmp_path, tmp_path / "w", "x", clip_cfg=TINY_CLIP, **bad)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("init_from, message", [
    ("cliptnseg-phantom-small", "is a cliptnseg model; --engine tgcnet continues tgcnet models only"),
    ("tgcnet-report-small", "its clip .* is not the recipe's"),
])
def test_init_from_refuses_a_model_the_tgcnet_recipe_cannot_continue(init_from, message, tmp_path):
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    with pytest.raises(InputError, match=message):
        run_tgcnet_training(tmp_path, tmp_path / "w", "x", clip_cfg=TINY_CLIP, init_from=init_from,
                            network={"extract_layers": [1, 2], "dim": 16, "heads": 2, "cnn_channels": [4, 4, 8, 8]})
    assert not (tmp_path / "w").exists()


def test_a_thyroid_run_with_a_slice_vote_calibrates_the_voted_maps(tiny_model, tmp_path, monkeypatch):
    """--slice-vote 3 on thyroid phantoms: the spec says it before the calibration, which combines its maps with
    that vote (so the rule judges what the pipeline gives); report data (single radiographs) refuses it."""
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.training import calibration
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    votes, combine = [], calibration.combine_maps

    def spy_combine(*args, vote=1, **kw):
        votes.append(vote)
        return combine(*args, vote=vote, **kw)

    monkeypatch.setattr(calibration, "combine_maps", spy_combine)
    network = {"extract_layers": [1, 2], "dim": 16, "heads": 2, "cnn_channels": [4, 4, 8, 8]}
    path = run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgc-voted", "thyroid", n_images=4, steps=1,
                               calibration_volumes=1, clip_from=str(tiny_model), lora_rank=2, network=network,
                               batch_size=2, stages=("segmenter", "calibrate", "export"), slice_vote=3)
    spec = load_spec(str(path))
    assert spec["inference"] == {"flip_average": True, "slice_vote": 3}
    assert votes and set(votes) == {3} and spec["presence"]["calibration"]["slice_vote"] == 3
    with pytest.raises(InputError, match="calibrated with --slice-vote 3, this run asks with --slice-vote 1; run the "
                                         "calibrate stage again"):  # a spec never says a vote its rules did not see
        run_tgcnet_training(tmp_path / "models", tmp_path / "work", "tgc-unvoted", "thyroid", clip_from=str(tiny_model),
                            lora_rank=2, network=network, stages=("export",))
    assert not (tmp_path / "models" / "tgc-unvoted.json").exists()
    with pytest.raises(InputError, match="--slice-vote 2: give an odd number"):
        run_tgcnet_training(tmp_path, tmp_path / "w", "x", "thyroid", clip_from=str(tiny_model), slice_vote=2)
    with pytest.raises(InputError, match="--slice-vote needs volumes: --dataset report is single radiographs"):
        run_tgcnet_training(tmp_path, tmp_path / "w", "x", clip_cfg=TINY_CLIP, slice_vote=3)
    assert not (tmp_path / "w").exists()
