"""The committed default model, trained on both phantom families (``cliptnseg-phantom-ab-small``), on held-out volumes
of family B, the physical model the family-A model it descends from was not trained on (seeds it was neither trained
nor calibrated on). The README's figures for both families come from ``clipseg evaluate`` on more volumes."""

import numpy as np
import pytest

from CLIPSegLib.evaluation.metrics import dice
from CLIPSegLib.inference.pipeline import segment_volume
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.models import DEFAULT_MODEL, catalogue, load_spec
from CLIPSegLib.synthetic.families import make_phantom

MODEL = "cliptnseg-phantom-ab-small"
SEEDS_BOTH = (501, 502, 504, 505)  # as test_embedded_model.py; the model misses the nodule of 502 (a faint one)
SEED_CYST_ONLY = 503


@pytest.fixture(scope="module")
def engine():
    from CLIPSegLib.inference.segment_file import load_engine

    return load_engine(MODEL, device="cpu")


def _volume(seed, findings):
    ph = make_phantom((20, 256, 256), spacing=(0.8, 0.25, 0.25), seed=seed, findings=findings, family="B")
    return ph, Geometry.axis_aligned(ph.spacing)


def test_spec_says_it_is_the_default_and_continues_the_family_a_model_on_both_families():
    assert DEFAULT_MODEL == MODEL and catalogue.resolve(None).id == MODEL
    spec = load_spec(MODEL)
    assert spec["engine"] == "cliptnseg" and spec["training"]["family"] == "A+B"
    assert spec["training"]["n_volumes"] > 0  # the second run's bank holds slices cut from 3D phantoms
    # two A+B runs: the first (the previous weights of this id) continued the family-A model
    parent = spec["training"]["parent"]
    assert parent["id"] == MODEL and parent["training"]["family"] == "A+B"
    assert parent["training"]["parent"]["id"] == "cliptnseg-phantom-small"
    assert parent["weights_sha256"] != {f["name"]: f["sha256"] for f in spec["files"]}
    assert spec["inference"] == {"flip_average": True, "slice_vote": 3}
    assert spec["presence"]["calibration"]["slice_vote"] == 3 and spec["presence"]["calibration"]["family"] == "A+B"
    assert "family A+B" in spec["domain"]["modality"]


def test_family_b_findings_are_segmented_and_an_absent_one_is_left_empty(engine):
    nodule_dice, cyst_dice = [], []
    for seed in SEEDS_BOTH:
        ph, geometry = _volume(seed, ("nodule", "cyst"))
        nod, cyst = segment_volume(engine, ph.image, geometry, ["solid nodule", "anechoic cyst"]).findings
        nodule_dice.append(dice(nod.mask, ph.masks["nodule"]))
        cyst_dice.append(dice(cyst.mask, ph.masks["cyst"]))
        assert dice(nod.mask, ph.masks["cyst"]) < 0.1 and dice(cyst.mask, ph.masks["nodule"]) < 0.1
    assert np.mean(nodule_dice) > 0.6 and sum(d > 0.7 for d in nodule_dice) >= 3, nodule_dice
    assert np.mean(cyst_dice) > 0.8, cyst_dice
    ph, geometry = _volume(SEED_CYST_ONLY, ("cyst",))
    result = segment_volume(engine, ph.image, geometry, ["thyroid nodule", "calcification", "cyst"])
    nodule, calc, cyst = result.findings
    assert not nodule.mask.any() and not calc.mask.any() and "not found" in nodule.message()
    assert cyst.found
