"""The posterior acoustic shadow of a candidate region, and the rule and calibration that may ask for it."""

import numpy as np
import pytest
from CLIPSegLib.inference.acoustic_shadow import posterior_shadow
from CLIPSegLib.inference.postprocess import Component, components, decide
from CLIPSegLib.training.calibration import evaluate_rule, search_rule

SPACING = (0.25, 0.25, 1.0)  # mm along (I, J, K)
SPACING_KJI = SPACING[::-1]


def _focus(posterior: float, seed: int = 0, shape=(5, 60, 60), top: int = 20):
    """Speckle tissue (mean 50, std 4, slowly brighter with depth) with a bright 4x4 focus on slices 1..3 at rows
    top..top+3, columns 28..31, and ``posterior`` added to the tissue below it (negative: a shadow, as behind a
    calcification; positive: enhancement). Returns (image, region, map sure of the focus)."""
    rng = np.random.default_rng(seed)
    image = 50.0 + 4.0 * rng.standard_normal(shape) + np.linspace(0, 10, shape[1])[None, :, None]
    image[1:4, top:top + 4, 28:32] += 40.0
    image[1:4, top + 4:, 28:32] += posterior
    region = np.zeros(shape, bool)
    region[1:4, top:top + 4, 28:32] = True
    return image, region, np.where(region, 0.97, 0.0).astype(np.float32)


def test_a_shadow_below_a_bright_focus_is_measured_in_spreads_of_the_tissue_beside_it():
    shadowed = posterior_shadow(*_focus(-12.0)[:2], SPACING_KJI, 0)
    plain = posterior_shadow(*_focus(0.0)[:2], SPACING_KJI, 0)
    enhanced = posterior_shadow(*_focus(+12.0)[:2], SPACING_KJI, 0)
    assert 2.0 < shadowed < 4.0  # 12 / 4: darker by three spreads of the speckle beside it
    assert abs(plain) < 0.5  # a bright grain with nothing below it: no shadow
    assert -4.0 < enhanced < -2.0  # enhancement (as behind a cyst) is negative


def test_the_shadow_ignores_gain_and_offset_and_follows_slicing_along_i():
    image, region, _ = _focus(-12.0)
    ref = posterior_shadow(image, region, SPACING_KJI, 0)
    for gain, offset in ((3.0, 0.0), (0.2, 0.0), (1.0, -40.0), (2.5, 17.0)):
        assert np.isclose(posterior_shadow(gain * image + offset, region, SPACING_KJI, 0), ref)
    # the same volume sliced along I (slices = columns): the beam still runs down J
    assert posterior_shadow(image, region, SPACING_KJI, 2) > 2.0


def test_a_shadow_that_cannot_be_measured_asks_nothing():
    image, region, _ = _focus(-12.0)
    assert posterior_shadow(image, region, SPACING_KJI, 1) == np.inf  # slices along J, the beam's own axis
    image, region, _ = _focus(-12.0, top=56)  # the focus touches the bottom of the image: no tissue below it
    assert posterior_shadow(image, region, SPACING_KJI, 0) == np.inf


RULE = {"threshold": 0.5, "min_peak": 0.5, "min_mean": 0.9, "min_extent_mm": 2.0, "min_area_mm2": 0.0}


def test_a_rule_with_min_shadow_keeps_a_shadowing_focus_and_drops_a_bright_grain():
    rule = {**RULE, "min_shadow": 1.0}
    image, _, prob = _focus(-12.0)
    mask, info = decide(prob, SPACING, 0, rule, image)
    assert info["status"] == "found" and mask.sum() == 48 and info["evidence"][0]["shadow"] > 2.0
    assert info["required"]["min_shadow"] == 1.0
    image, _, prob = _focus(0.0)
    mask, info = decide(prob, SPACING, 0, rule, image)
    assert info["status"] == "not found" and not mask.any() and info["rejected"] == {"min_shadow": 1}
    assert info["closest_miss"][0][0] == "min_shadow"
    # the default rule asks no shadow: an enhancing region (negative shadow) is found, and the JSON says None
    image, _, prob = _focus(+12.0)
    mask, info = decide(prob, SPACING, 0, RULE, image)
    assert info["status"] == "found" and info["evidence"][0]["shadow"] < -2.0 and info["required"]["min_shadow"] is None
    # without the image no shadow is measured or asked
    _, info = decide(prob, SPACING, 0, rule)
    assert info["status"] == "found" and info["evidence"][0]["shadow"] is None


def test_a_shadow_just_below_the_rule_is_uncertain():
    image, _, prob = _focus(-12.0)
    s = components(prob, SPACING, 0, 0.5, image)[1][0].shadow
    mask, info = decide(prob, SPACING, 0, {**RULE, "min_shadow": s / 0.95}, image)
    assert info["status"] == "uncertain" and mask.sum() == 48
    assert decide(prob, SPACING, 0, {**RULE, "min_shadow": s / 0.8}, image)[1]["status"] == "not found"


def _c(voxels, mean, shadow, contrast=3.0):
    return Component(1, voxels, 0.99, n_slices=3, extent_mm=3.0, max_area_mm2=4.0, mean=mean, contrast=contrast,
                     shadow=shadow)


@pytest.mark.parametrize("shadows", [(2.0, 1.8, 0.1), (1.2, 0.9, -0.5)])
def test_the_search_asks_for_a_shadow_when_only_the_shadow_tells_true_foci_from_bright_grains(shadows):
    """True clusters and bright grains alike in size, contrast and (middling) mean probability: only the shadow below
    them differs, and the search finds that test."""
    true_a, true_b, grain = shadows
    cases = [
        ("calcification", 60, [(_c(60, 0.82, true_a), 60)], 20.0),
        ("calcification", 50, [(_c(50, 0.83, true_b), 50)], 20.0),
        ("calcification", 0, [(_c(55, 0.83, grain), 0)], 20.0),
        ("calcification", 0, [(_c(40, 0.82, grain + 0.05), 0)], 20.0),
    ]
    rule = search_rule(cases)
    assert grain + 0.05 < rule["min_shadow"] <= true_b
    assert rule["calibration"]["absent_empty_rate"] == 1.0 and rule["calibration"]["mean_dice"]["calcification"] == 1.0
    assert evaluate_rule(cases, {**rule, "min_shadow": 0.0})[0] == 0.0  # without it both grains are reported
