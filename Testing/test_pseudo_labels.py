"""MedCLIP-SAM's weakly supervised stage (``training.pseudo_labels``): a zero-shot model's masks of an unlabelled
folder train a MONAI UNet that becomes a model the pipeline runs (``engines.unet``)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice

from CLIPSegLib import cli
from CLIPSegLib.engines import ENGINES, create_engine
from CLIPSegLib.errors import InputError
from CLIPSegLib.inference.pipeline import segment_volume
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.models import load_spec, spec as spec_module
from CLIPSegLib.training import pseudo_labels
from test_engine_contract import ThresholdEngine

SHAPE = (6, 40, 40)  # K, J, I


def _volume(seed: int) -> np.ndarray:
    """Noise with a bright disc (radius 5-9 px, random centre) on slices 1..4: what a threshold finds."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0.3, 0.05, SHAPE).astype(np.float32)
    r = rng.uniform(5, 9)
    cy, cx = rng.uniform(12, 28, 2)
    yy, xx = np.mgrid[:SHAPE[1], :SHAPE[2]]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    vol[1:5][:, disc] = rng.normal(0.8, 0.05, (4, int(disc.sum())))
    return vol


def _write(folder, n):
    folder.mkdir()
    for i in range(n):
        image = sitk.GetImageFromArray(_volume(i))
        image.SetSpacing((0.5, 0.5, 1.0))
        sitk.WriteImage(image, str(folder / f"case{i}.nii.gz"))
    return folder


@pytest.fixture
def zero_shot(tmp_path, monkeypatch):
    """A 'zero-shot' model whose masks are a threshold of the intensity (the contract suite's ThresholdEngine)."""
    monkeypatch.setitem(ENGINES, "threshold", ThresholdEngine)
    monkeypatch.setattr(spec_module, "PARTS_ONLY", spec_module.PARTS_ONLY | {"threshold"})
    path = tmp_path / "threshold.json"
    path.write_text(json.dumps({"id": "threshold-zero-shot", "engine": "threshold", "files": [],
                                "presence": {"threshold": 0.5, "min_peak": 0.6, "min_extent_mm": 0.0,
                                             "min_area_mm2": 2.0}}))
    return path


SMALL = {"channels": [8, 16], "strides": [2], "num_res_units": 1}


def test_the_network_learns_the_zero_shot_masks_and_runs_as_a_model(tmp_path, zero_shot):
    folder = _write(tmp_path / "unlabelled", 4)
    path = pseudo_labels.run_pseudo_label_training(folder, tmp_path / "models", tmp_path / "work", "weak", zero_shot,
                                                   ["bright spot"], steps=160, size=32, network=SMALL,
                                                   augment="none")
    spec = load_spec(path)
    assert spec["engine"] == "unet" and spec["findings"] == {"bright spot": ["bright spot"]}
    lineage = spec["training"]["pseudo_labels"]
    assert lineage["zero_shot_model"] == "threshold-zero-shot" and len(lineage["zero_shot_spec_sha256"]) == 64
    assert (lineage["volumes"], lineage["train_volumes"], lineage["calibration_volumes"]) == (4, 3, 1)
    assert lineage["volumes_found"] == {"bright spot": 4}
    assert spec["presence"]["calibration"]["truth"].startswith("pseudo masks")
    # the pseudo masks are the zero-shot model's own output, volume by volume
    teacher = create_engine(load_spec(zero_shot), torch.device("cpu"))
    geometry = Geometry.axis_aligned((1.0, 0.5, 0.5))
    z = np.load(tmp_path / "work" / "pseudo" / "0000.npz")
    expected = segment_volume(teacher, _volume(0), geometry, ["bright spot"]).findings[0].mask
    assert np.array_equal(z["mask_0"], expected) and expected.sum() > 100
    # the exported network segments a volume it never saw as the zero-shot model does, on its own
    student = create_engine(spec, torch.device("cpu"))
    unseen = _volume(99)
    truth = segment_volume(teacher, unseen, geometry, ["bright spot"]).findings[0].mask
    result = segment_volume(student, unseen, geometry, ["a bright spot"]).findings[0]
    dice = float(compute_dice(torch.from_numpy(result.mask)[None, None].float(),
                              torch.from_numpy(truth)[None, None].float()))
    assert result.found and dice > 0.8, dice
    assert "as the finding 'bright spot'" in result.info["interpreted_as"]


def test_labelled_volumes_are_not_labelled_again(tmp_path, zero_shot, monkeypatch):
    folder = _write(tmp_path / "unlabelled", 3)
    args = (folder, tmp_path / "models", tmp_path / "work", "weak", zero_shot, ["bright spot"])
    pseudo_labels.run_pseudo_label_training(*args, steps=2, size=32, network=SMALL, stages=("label",))
    calls = []
    monkeypatch.setattr("CLIPSegLib.inference.pipeline.segment_volume",
                        lambda *a, **k: calls.append(1) or pytest.fail("labelled again"))
    path = pseudo_labels.run_pseudo_label_training(*args, steps=2, size=32, network=SMALL)
    assert calls == [] and path.is_file()
    # other findings, or the label stage skipped for masks of other findings: refused, never reused
    with pytest.raises(InputError, match="has no pseudo masks of case0.nii.gz .*run the 'label' stage first"):
        pseudo_labels.run_pseudo_label_training(*args[:5], ["dark spot"], steps=2, size=32, network=SMALL,
                                                stages=("unet", "calibrate", "export"), force=True)


def test_a_prompt_sharing_no_word_with_the_findings_is_refused(tiny_unet):
    engine = create_engine(load_spec(tiny_unet), torch.device("cpu"))
    with pytest.raises(InputError, match=r"'left lung' shares no word with any of its phrasings \(thyroid nodule: "
                                         r"'thyroid nodule', 'nodule'; cyst: 'anechoic cyst', 'cyst'\)"):
        engine.encode_prompts(["left lung"])
    state = engine.encode_prompts(["simple cyst", "nodule"])
    assert [r.finding for r in state.readings] == ["cyst", "thyroid nodule"]


def test_bad_input_is_refused_before_any_work(tmp_path, zero_shot, capsys):
    folder = _write(tmp_path / "one", 1)
    with pytest.raises(InputError, match="holds 1 volume.*at least 2 are needed"):
        pseudo_labels.run_pseudo_label_training(folder, tmp_path / "m", tmp_path / "w", "weak", zero_shot)
    assert cli.main(["train", "--pseudo-labels", str(folder)]) == 2
    assert "weakly supervised stage of --engine medclipsam" in capsys.readouterr().err
    assert cli.main(["train", "--engine", "medclipsam", "--pseudo-labels", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err
    two = _write(tmp_path / "two", 2)
    assert cli.main(["train", "--engine", "medclipsam", "--pseudo-labels", str(two), "--family", "B",
                     "--calibration-volumes", "8"]) == 2
    assert "--family, --calibration-volumes do not apply; drop them" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "w").exists()
