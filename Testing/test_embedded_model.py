"""The committed embedded default model, and the family-A model it was continued from, on held-out family-A phantom
volumes (seeds neither was trained nor calibrated on).

These assert behaviour a user relies on: the named finding is segmented, an absent finding gives an empty segment,
and swapping prompts swaps masks. The README's figures come from `clipseg evaluate` on more volumes."""


import numpy as np
import pytest
from PIL import Image

from CLIPSegLib.evaluation.metrics import dice
from CLIPSegLib.models import DEFAULT_MODEL, load_spec
from CLIPSegLib.synthetic.phantoms import make_phantom
from CLIPSegLib.inference.pipeline import segment_volume
from CLIPSegLib.io.geometry import Geometry


BASE_MODEL = "cliptnseg-phantom-small"  # trained from scratch on family A; the default continues it on A and B


@pytest.fixture(scope="module", params=[None, BASE_MODEL], ids=["default", "base"])
def engine(request):
    from CLIPSegLib.inference.segment_file import load_engine

    return load_engine(request.param, device="cpu")


def _geometry(ph):
    return Geometry.axis_aligned(ph.spacing)


def test_spec_records_how_it_was_made_and_its_calibration():
    spec = load_spec(DEFAULT_MODEL)
    assert spec["engine"] == "cliptnseg"
    assert spec["training"]["command"].startswith("clipseg train")
    assert spec["presence"]["calibration"]["volumes"] > 0
    assert spec["files"][0]["size"] < 20e6


def test_named_findings_are_segmented_and_prompt_swap_swaps_masks(engine):
    """Over four held-out volumes (the model misses a nodule now and then; the README gives the rates)."""
    nodule_dice, cyst_dice = [], []
    for seed in (501, 502, 504, 505):
        ph = make_phantom((20, 256, 256), spacing=(0.8, 0.25, 0.25), seed=seed, findings=("nodule", "cyst"))
        nod, cyst = segment_volume(engine, ph.image, _geometry(ph), ["solid nodule", "anechoic cyst"]).findings
        nodule_dice.append(dice(nod.mask, ph.masks["nodule"]))
        cyst_dice.append(dice(cyst.mask, ph.masks["cyst"]))
        assert dice(nod.mask, ph.masks["cyst"]) < 0.1 and dice(cyst.mask, ph.masks["nodule"]) < 0.1
    assert np.mean(nodule_dice) > 0.6 and sum(d > 0.7 for d in nodule_dice) >= 3, nodule_dice
    assert np.mean(cyst_dice) > 0.8, cyst_dice


def test_absent_finding_gives_an_empty_segment_and_says_so(engine):
    ph = make_phantom((20, 256, 256), spacing=(0.8, 0.25, 0.25), seed=503, findings=("cyst",))
    res = segment_volume(engine, ph.image, _geometry(ph), ["thyroid nodule", "calcification", "cyst"])
    nodule, calc, cyst = res.findings
    assert not nodule.mask.any() and not calc.mask.any()
    assert "not found" in nodule.message() and "empty" in nodule.message()
    assert cyst.found


def test_demo_writes_segmentation_overlay_and_dice(tmp_path):
    import slicerio

    from CLIPSegLib.demo import run_demo

    out = run_demo(tmp_path, seed=7, device="cpu")
    seg = slicerio.read_segmentation(out["segmentation"])
    assert {s["name"] for s in seg["segments"]} == set(out["dice"])
    assert Image.open(out["overlay"]).size == (512, 512)
    assert all(0.0 <= d <= 1.0 for d in out["dice"].values())
    assert np.mean(list(out["dice"].values())) > 0.6


def test_bf16_gives_the_same_findings_as_fp32(monkeypatch):
    from CLIPSegLib.engines import contract
    from CLIPSegLib.inference.segment_file import load_engine

    monkeypatch.setattr(contract, "native_bf16", lambda: True)  # bf16 runs even where it would not pay

    ph = make_phantom((12, 256, 256), spacing=(0.8, 0.25, 0.25), seed=506, findings=("nodule", "calcification"))
    prompts = ["thyroid nodule", "cyst", "calcification"]
    engines = [load_engine(None, device="cpu", precision=p) for p in ("fp32", "bf16")]
    assert [e.precision for e in engines] == ["fp32", "bf16"]
    fp32, bf16 = (segment_volume(e, ph.image, _geometry(ph), prompts) for e in engines)
    for a, b in zip(fp32.findings, bf16.findings):
        assert a.found == b.found, a.prompt
        assert dice(a.mask, b.mask) > 0.95, a.prompt
