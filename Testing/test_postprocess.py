import numpy as np
from CLIPSegLib.inference.postprocess import components, decide


def _volume_with_blob(n_slices_blob: int, peak: float = 0.95):
    prob = np.zeros((10, 20, 20), np.float32)
    prob[2:2 + n_slices_blob, 5:10, 5:10] = peak  # 5x5 voxels per slice
    return prob


def test_extent_along_the_slice_axis_is_measured_in_mm():
    prob = _volume_with_blob(3)
    _, comps = components(prob, spacing=(0.5, 0.5, 2.0), array_axis=0, threshold=0.5)  # (I, J, K) mm
    (c,) = comps
    assert c.n_slices == 3 and c.extent_mm == 6.0 and c.voxels == 75
    assert c.max_area_mm2 == 25 * 0.25 and c.peak == np.float32(0.95)


def test_persistence_rule_is_the_same_in_mm_for_thin_and_thick_slices():
    rule = {"threshold": 0.5, "min_peak": 0.9, "min_extent_mm": 3.0, "min_area_mm2": 2.0}
    # 3 slices of 1.2 mm = 3.6 mm: kept; the same 3 slices at 0.6 mm = 1.8 mm: dropped
    mask, info = decide(_volume_with_blob(3), (0.5, 0.5, 1.2), 0, rule)
    assert info["found"] and mask.sum() == 75
    mask, info = decide(_volume_with_blob(3), (0.5, 0.5, 0.6), 0, rule)
    assert not info["found"] and not mask.any() and info["dropped_components"] == 1


def test_a_single_image_can_hold_a_finding_whatever_the_extent_rule():
    prob = np.zeros((1, 20, 20), np.float32)
    prob[0, 5:10, 5:10] = 0.95
    mask, info = decide(prob, (0.5, 0.5, 1.0), 0, {"min_peak": 0.9, "min_extent_mm": 5.0, "min_area_mm2": 2.0})
    assert info["found"] and mask.sum() == 25


def test_weak_or_small_components_are_dropped_and_reported():
    rule = {"threshold": 0.5, "min_peak": 0.9, "min_extent_mm": 0.0, "min_area_mm2": 2.0}
    _, info = decide(_volume_with_blob(3, peak=0.8), (0.5, 0.5, 1.0), 0, rule)  # peak below 0.9
    assert not info["found"] and info["score"] == np.float32(0.8)
    prob = np.zeros((4, 20, 20), np.float32)
    prob[1, 3, 3] = 0.99  # one voxel = 0.25 mm^2 < 2 mm^2
    _, info = decide(prob, (0.5, 0.5, 1.0), 0, rule)
    assert not info["found"] and info["dropped_components"] == 1


def test_filling_holes_in_the_bounding_box_equals_filling_the_whole_volume():
    from CLIPSegLib.inference.postprocess import fill_holes
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((12, 30, 30), bool)
        for _ in range(3):  # hollow boxes (some touching the border) and random speckle
            k, j, i = rng.integers(0, [9, 24, 24])
            mask[k:k + 4, j:j + 7, i:i + 7] = True
            mask[k + 1:k + 3, j + 1:j + 6, i + 1:i + 6] = rng.random() < 0.3
        mask |= rng.random(mask.shape) < 0.02
        expected = ndimage.binary_fill_holes(mask)
        fill_holes(mask)
        np.testing.assert_array_equal(mask, expected)


def test_a_component_of_middling_mean_probability_is_dropped_by_min_mean():
    prob = np.zeros((4, 20, 20), np.float32)
    prob[1:3, 4:12, 4:12] = 0.7  # 128 voxels of 0.7 ...
    prob[1, 8, 8] = 0.99  # ... around one confident voxel: mean ~0.702
    rule = {"threshold": 0.5, "min_peak": 0.9, "min_extent_mm": 0.0, "min_area_mm2": 2.0}
    _, comps = components(prob, (0.5, 0.5, 1.0), 0, 0.5)
    assert abs(comps[0].mean - (127 * 0.7 + 0.99) / 128) < 1e-5
    assert decide(prob, (0.5, 0.5, 1.0), 0, rule)[1]["found"]
    mask, info = decide(prob, (0.5, 0.5, 1.0), 0, {**rule, "min_mean": 0.8})
    assert not info["found"] and not mask.any() and info["dropped_components"] == 1


def test_exclusive_findings_compete_voxel_by_voxel_on_the_maps_as_given():
    from CLIPSegLib.inference.postprocess import suppress_exclusive

    probs = np.zeros((4, 1, 2, 3), np.float32)
    probs[0, 0, 0] = (0.9, 0.6, 0.5)  # nodule
    probs[1, 0, 0] = (0.8, 0.7, 0.5)  # cyst: loses voxel 0, wins voxel 1, ties voxel 2
    probs[2, 0, 0] = (0.95, 0.95, 0.95)  # calcification: not exclusive with either here
    probs[3, 0, 0] = (0.99, 0.99, 0.99)  # a prompt matched to no trained finding
    out = suppress_exclusive(probs.copy(), ["nodule", "cyst", "calcification", None], [("nodule", "cyst")])
    np.testing.assert_allclose(out[0, 0, 0], (0.9, 0.0, 0.5), rtol=1e-6)
    np.testing.assert_allclose(out[1, 0, 0], (0.0, 0.7, 0.5), rtol=1e-6)
    np.testing.assert_array_equal(out[2:], probs[2:])
    np.testing.assert_array_equal(out[:, 0, 1], probs[:, 0, 1])  # the other row: all zero, nothing to decide
    # two prompts of one finding do not compete with each other
    same = suppress_exclusive(probs[[1, 1]].copy() * np.array([1.0, 0.5], np.float32)[:, None, None, None],
                              ["cyst", "cyst"], [("nodule", "cyst")])
    assert same[1].max() > 0


def _blob(value):
    prob = np.zeros((4, 20, 20), np.float32)
    prob[1:3, 5:15, 5:15] = value
    prob[1:3, 9, 9] = 1.0  # a confident peak inside
    return prob


def test_a_decision_just_below_the_rule_is_kept_and_flagged_uncertain():
    from CLIPSegLib.inference.postprocess import decide

    rule = {"threshold": 0.5, "min_peak": 0.5, "min_mean": 0.88, "min_extent_mm": 0.0, "min_area_mm2": 0.0}
    mask, info = decide(_blob(0.8777), (1.0, 1.0, 1.0), 0, rule)  # mean over the blob ~0.878 < 0.88
    assert info["status"] == "uncertain" and info["found"] and mask.sum() == 200
    assert info["closest_miss"][0][0] == "min_mean" and info["closest_miss"][0][2] == 0.88
    mask, info = decide(_blob(0.80), (1.0, 1.0, 1.0), 0, rule)  # far below: dropped, and said why
    assert info["status"] == "not found" and not mask.any()
    assert info["rejected"] == {"min_mean": 1} and info["closest_miss"][0][0] == "min_mean"
    mask, info = decide(_blob(0.95), (1.0, 1.0, 1.0), 0, rule)
    assert info["status"] == "found" and info["closest_miss"] == []


def test_not_found_messages_say_which_part_of_the_rule_failed_without_contradiction():
    from CLIPSegLib.inference.pipeline import FindingResult
    from CLIPSegLib.inference.postprocess import decide

    rule = {"threshold": 0.5, "min_peak": 0.5, "min_mean": 0.93, "min_extent_mm": 0.0, "min_area_mm2": 500.0}
    mask, info = decide(_blob(0.8), (1.0, 1.0, 1.0), 0, rule)
    text = FindingResult("cyst", mask, {**info, "rule": "cyst", "rule_cosine": 0.99}).message()
    assert "not found" in text and "peak probability 1.00" not in text
    assert "mean probability too low" in text and "cross-section too small" in text and "0.93" in text
    mask, info = decide(np.zeros((2, 8, 8), np.float32), (1.0, 1.0, 1.0), 0, rule)
    assert "no voxel above probability 0.50" in FindingResult("cyst", mask, info).message()


def _speckle_case(speckle: float, bump: float, seed: int = 0):
    """A log-compressed-like image [6,40,40] (0.25 mm pixels, 1 mm slices): tissue mean 50 with Gaussian speckle of
    std ``speckle``, a 5x5-voxel region on slices 1..4 brighter by ``bump``; and a map that is sure of that region."""
    rng = np.random.default_rng(seed)
    image = 50.0 + speckle * rng.standard_normal((6, 40, 40))
    image[1:5, 18:23, 18:23] += bump
    prob = np.zeros(image.shape, np.float32)
    prob[1:5, 18:23, 18:23] = 0.97
    return image, prob


RULE_WITH_CONTRAST = {"threshold": 0.5, "min_peak": 0.5, "min_mean": 0.9, "min_extent_mm": 2.0, "min_area_mm2": 0.0,
                      "min_contrast": 2.0}
SPACING = (0.25, 0.25, 1.0)  # mm along (I, J, K)


def test_contrast_is_measured_against_the_region_own_surround_and_ignores_gain():
    from CLIPSegLib.inference.postprocess import components

    image, prob = _speckle_case(speckle=2.0, bump=10.0)
    (c,) = components(prob, SPACING, 0, 0.5, image)[1]
    assert 4.0 < c.contrast < 6.0  # 10 / 2: the bump in units of the surround's spread
    for gain, offset in ((3.0, 0.0), (0.2, 0.0), (1.0, -40.0), (2.5, 17.0)):  # linear gain, dB offset: unchanged
        (g,) = components(prob, SPACING, 0, 0.5, gain * image + offset)[1]
        assert np.isclose(g.contrast, c.contrast)
    (c,) = components(prob, SPACING, 0, 0.5)[1]
    assert c.contrast == np.inf  # no image: not measured


def test_gain_or_stronger_speckle_never_turns_an_absent_finding_into_a_found_one():
    # a speckle grain the model is sure of (absent finding): weak contrast in its surround -> not found
    image, prob = _speckle_case(speckle=4.0, bump=3.0)
    mask, info = decide(prob, SPACING, 0, RULE_WITH_CONTRAST, image)
    assert info["status"] == "not found" and not mask.any() and info["rejected"] == {"min_contrast": 1}
    for gain, offset in ((5.0, 0.0), (0.1, 0.0), (1.0, 30.0)):
        assert decide(prob, SPACING, 0, RULE_WITH_CONTRAST, gain * image + offset)[1]["status"] == "not found"
    for speckle in (6.0, 10.0):  # more speckle: the same bump stands out even less
        image2, prob2 = _speckle_case(speckle=speckle, bump=3.0)
        assert decide(prob2, SPACING, 0, RULE_WITH_CONTRAST, image2)[1]["status"] == "not found"
    # a region that does stand out of its tissue is found, whatever the gain
    image, prob = _speckle_case(speckle=4.0, bump=20.0)
    for gain in (1.0, 5.0, 0.1):
        mask, info = decide(prob, SPACING, 0, RULE_WITH_CONTRAST, gain * image)
        assert info["status"] == "found" and mask.sum() == 100


def test_decision_reports_what_the_rule_asked_and_the_inputs_it_judged():
    image, prob = _speckle_case(speckle=4.0, bump=3.0)
    _, info = decide(prob, SPACING, 0, RULE_WITH_CONTRAST, image)
    assert info["required"]["min_contrast"] == 2.0 and info["required"]["min_mean"] == 0.9
    (e,) = info["evidence"]  # the nearest miss
    assert e["voxels"] == 100 and e["extent_mm"] == 4.0 and e["contrast"] < 2.0 and abs(e["mean"] - 0.97) < 1e-3
    assert info["closest_miss"][0][0] == "min_contrast"
    image, prob = _speckle_case(speckle=4.0, bump=20.0)
    _, info = decide(prob, SPACING, 0, RULE_WITH_CONTRAST, image)
    assert info["status"] == "found" and info["evidence"][0]["contrast"] > 2.0
    # without the image the contrast is neither measured nor required
    _, info = decide(prob, SPACING, 0, RULE_WITH_CONTRAST)
    assert info["required"]["min_contrast"] == 0.0 and info["evidence"][0]["contrast"] is None


def test_a_contrast_just_below_the_rule_is_uncertain_not_silently_dropped():
    image, prob = _speckle_case(speckle=4.0, bump=7.6)
    _, info = decide(prob, SPACING, 0, RULE_WITH_CONTRAST, image)
    c = info["evidence"][0]["contrast"]
    rule = {**RULE_WITH_CONTRAST, "min_contrast": c / 0.95}  # 5% short: within the 10% margin
    mask, info = decide(prob, SPACING, 0, rule, image)
    assert info["status"] == "uncertain" and mask.sum() == 100
    rule = {**RULE_WITH_CONTRAST, "min_contrast": c / 0.8}  # 20% short: dropped
    assert decide(prob, SPACING, 0, rule, image)[1]["status"] == "not found"
