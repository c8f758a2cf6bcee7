import json

import pytest

from CLIPSegLib.errors import ModelError
from CLIPSegLib.models import load_spec, load_weights


def _copy_model(tiny_model, tmp_path):
    for p in tiny_model.parent.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    return tmp_path / tiny_model.name


def test_verified_weights_load(tiny_model):
    state = load_weights(load_spec(tiny_model))
    assert any(k.startswith("clip.visual") for k in state) and any(k.startswith("head.") for k in state)


def test_exported_weights_are_readable_like_any_new_file(tiny_model, tmp_path):
    import os

    probe = tmp_path / "probe"
    probe.write_text("")
    wfile = tiny_model.parent / load_spec(tiny_model)["files"][0]["name"]
    assert wfile.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
    assert os.access(wfile, os.R_OK)


def test_corrupt_weights_are_refused(tiny_model, tmp_path):
    spec_path = _copy_model(tiny_model, tmp_path)
    spec = load_spec(spec_path)
    wfile = tmp_path / spec["files"][0]["name"]
    data = bytearray(wfile.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wfile.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_weights(spec)
    wfile.write_bytes(bytes(data[:100]))
    with pytest.raises(ModelError, match="truncated"):
        load_weights(spec)
    wfile.unlink()
    with pytest.raises(ModelError, match="missing"):
        load_weights(spec)


def test_bad_specs_and_unknown_ids(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_spec(tmp_path / "broken.json")
    (tmp_path / "partial.json").write_text(json.dumps({"id": "x"}))
    with pytest.raises(ModelError, match="lacks the field 'engine'"):
        load_spec(tmp_path / "partial.json")
    with pytest.raises(ModelError, match="unknown model"):
        load_spec("no-such-model")


def test_pickled_checkpoints_are_refused(tiny_model, tmp_path):
    spec_path = _copy_model(tiny_model, tmp_path)
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    spec["files"] = [{"name": "evil.pt", "sha256": "0" * 64}]
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="only .safetensors"):
        load_weights(load_spec(spec_path))


def _segment(phantom_file, tmp_path, model):
    from CLIPSegLib.cli import main

    return main(["segment", str(phantom_file[0]), "--prompt", "nodule", "--output", str(tmp_path / "out.seg.nrrd"),
                 "--model", str(model), "--device", "cpu", "--progress", "none"])


@pytest.mark.parametrize("key", ["clip", "network", "presence"])
def test_spec_without_an_engine_field_is_a_model_error_naming_it(tiny_model, tmp_path, phantom_file, capsys, key):
    spec_path = _copy_model(tiny_model, tmp_path)
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    del spec[key]
    spec_path.write_text(json.dumps(spec))
    assert _segment(phantom_file, tmp_path, spec_path) == 3
    err = capsys.readouterr().err
    assert f"lacks the field {key!r} that a cliptnseg model needs" in err and "clipseg train" in err
    assert "Traceback" not in err and not (tmp_path / "out.seg.nrrd").exists()


def test_spec_with_an_incomplete_clip_or_bad_files_is_refused(tiny_model, tmp_path):
    spec_path = _copy_model(tiny_model, tmp_path)
    good = json.loads(spec_path.read_text(encoding="utf-8"))
    for change, message in (({"clip": {"embed_dim": 16}}, "'clip' lacks 'vision_cfg'"),
                            ({"network": [1, 2]}, "'network' must be a JSON object"),
                            ({"files": []}, "'files' must list the weight files"),
                            ({"files": [{"name": "../w.safetensors", "sha256": "0" * 64}]}, "plain file name")):
        spec_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ModelError, match=message):
            load_spec(spec_path)
    spec_path.write_text("[1, 2]")
    with pytest.raises(ModelError, match="not an object"):
        load_spec(spec_path)


def test_weights_file_given_as_model_points_to_its_json(tiny_model, tmp_path, phantom_file, capsys):
    weights = tiny_model.with_suffix(".safetensors")
    assert _segment(phantom_file, tmp_path, weights) == 3
    err = capsys.readouterr().err
    assert f"give the model's .json beside it: {tiny_model}" in err and "Traceback" not in err
    assert _segment(phantom_file, tmp_path, tiny_model.parent) == 3
    assert f"is a folder; give a model's .json file (e.g. {tiny_model})" in capsys.readouterr().err


def test_a_models_own_tensors_win_over_those_of_a_file_it_lists_after(tmp_path):
    import torch

    from CLIPSegLib.models import write_spec

    base = {"engine": "medclipsam", "clip": {}, "sam": {}}
    other = load_spec(write_spec({**base, "id": "where", "files": []},
                                 {"clip.w": torch.ones(2), "sam.w": torch.zeros(2)}, tmp_path, half=False))
    own = load_spec(write_spec({**base, "id": "new", "files": []}, {"sam.w": torch.full((2,), 7.0)}, tmp_path,
                               half=False, extra_files=other["files"]))
    assert [f["name"] for f in own["files"]] == ["new.safetensors", "where.safetensors"]
    state = load_weights(own)
    assert state["sam.w"].tolist() == [7.0, 7.0] and state["clip.w"].tolist() == [1.0, 1.0]


def test_a_hand_edited_presence_rule_out_of_range_is_refused_when_the_model_is_read(tiny_model, tmp_path, phantom_file,
                                                                                    capsys):
    spec_path = _copy_model(tiny_model, tmp_path)
    good = json.loads(spec_path.read_text(encoding="utf-8"))
    finding, rule = "cyst", {k: v for k, v in good["presence"].items() if k != "per_finding"}
    good["presence"] = {**good["presence"], "per_finding": {finding: rule}}
    spec_path.write_text(json.dumps(good))
    load_spec(spec_path)  # a valid per-finding rule
    for change, message in ((("grow_threshold", "0.2"), f"'grow_threshold' of the rule of {finding!r} in 'presence' "
                                                        "must be a probability between 0 and 1 or null"),
                            (("min_peak", 1.5), "must be a probability between 0 and 1, not 1.5"),
                            (("min_extent_mm", -2), "'min_extent_mm' of the rule of .* must be a number of at least 0"),
                            (("threshold", True), "'threshold' .* not True"),
                            (("min_shadow", float("nan")), "'min_shadow' .* must be a finite number, not nan"),
                            (("match_min_cosine", 1.7), "'match_min_cosine' .* a cosine between -1 and 1, not 1.7"),
                            (("uncertain_margin", 0.1), "'uncertain_margin' .* must be a JSON object"),
                            (("uncertain_margin", {"mean": -0.01}), "'uncertain_margin' .* 'mean' must be a number of "
                                                                    "at least 0, not -0.01"),
                            (("uncertain_margin", {"peek": 0.02}), "'uncertain_margin' .* has no margin 'peek'")):
        bad = {**good, "presence": {**good["presence"], "per_finding": {**good["presence"]["per_finding"],
                                                                         finding: {**rule, change[0]: change[1]}}}}
        spec_path.write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=message):
            load_spec(spec_path)
    spec_path.write_text(json.dumps({**good, "presence": {**good["presence"], "min_mean": "high"}}))
    with pytest.raises(ModelError, match="'min_mean' of the global rule in 'presence'"):
        load_spec(spec_path)
    # a rule without growth (null) is valid, and the command line reports a bad one as a model error, no traceback
    spec_path.write_text(json.dumps({**good, "presence": {**good["presence"], "grow_threshold": None,
                                                           "min_shadow": -0.5,  # a shadow may be negative
                                                           "uncertain_margin": {"peak": 0.05, "extent_slices": 1}}}))
    load_spec(spec_path)
    spec_path.write_text(json.dumps({**good, "presence": {**good["presence"], "slice_gate": 7}}))
    assert _segment(phantom_file, tmp_path, spec_path) == 3
    err = capsys.readouterr().err
    assert "'slice_gate' of the global rule" in err and "remove it" in err and "Traceback" not in err
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_the_spec_check_knows_every_uncertain_margin_the_rule_reads():
    from CLIPSegLib.inference.postprocess import UNCERTAIN_MARGIN
    from CLIPSegLib.models.spec import MARGIN_KEYS

    assert set(MARGIN_KEYS) == set(UNCERTAIN_MARGIN)
