"""Saliency -> SAM prompts (``engines.medclipsam.prompts``) on synthetic saliency maps with known blobs."""

import numpy as np
import pytest

from CLIPSegLib.engines.medclipsam import prompts as P
from CLIPSegLib.errors import InputError


def blob_map(shape=(64, 80), blobs=((10, 20, 8, 12, 0.9),), noise=0.05, seed=0):
    """Background noise in [0, noise) plus rectangles (row, col, height, width, value) with a peak at the centre."""
    rng = np.random.default_rng(seed)
    s = rng.random(shape).astype(np.float32) * noise
    for r, c, h, w, v in blobs:
        s[r:r + h, c:c + w] = v
        s[r + h // 2, c + w // 2] = v + 0.05
    return s


def test_one_blob_gives_its_bounding_box_in_xyxy_pixels():
    p = P.saliency_to_prompts(blob_map())
    assert len(p) == 1
    np.testing.assert_array_equal(p.boxes, [[20, 10, 31, 17]])  # x0 = col, y0 = row, last col / row inclusive
    assert p.areas.tolist() == [96] and p.scores[0] == pytest.approx(0.9, abs=0.01)
    assert p.points.shape == (1, 0, 2) and p.labels.shape == (1, 0)


def test_the_largest_components_come_first_and_small_ones_are_dropped():
    s = blob_map(blobs=((5, 5, 6, 6, 0.8), (30, 40, 12, 20, 0.7), (50, 5, 2, 2, 0.9)))
    p = P.saliency_to_prompts(s, max_boxes=3, min_area=16)
    np.testing.assert_array_equal(p.boxes, [[40, 30, 59, 41], [5, 5, 10, 10]])
    assert P.saliency_to_prompts(s, max_boxes=1, min_area=16).boxes.tolist() == [[40, 30, 59, 41]]


def test_points_are_the_peak_inside_and_the_lowest_saliency_in_the_box_outside_the_component():
    s = blob_map(blobs=((10, 10, 20, 20, 0.9),), noise=0.0)
    s[10:20, 10:20] = 0.0  # an L-shaped component: its box holds a dark corner
    p = P.saliency_to_prompts(s, positive_points=True, negative_points=True)
    assert p.points.shape == (1, 2, 2) and p.labels.tolist() == [[1, 0]]
    assert p.points[0, 0].tolist() == [20, 20]  # the peak (row 20, col 20) as XY
    x, y = p.points[0, 1].astype(int)
    assert 10 <= x < 20 and 10 <= y < 20 and not p.mask[y, x]


def test_a_component_filling_its_box_has_no_negative_point():
    p = P.saliency_to_prompts(blob_map(noise=0.0), negative_points=True)
    assert p.labels.tolist() == [[-1]]


def test_margin_grows_the_box_but_never_past_the_image():
    s = blob_map(blobs=((0, 70, 10, 10, 0.9),))
    p = P.saliency_to_prompts(s, margin=4)
    np.testing.assert_array_equal(p.boxes, [[66, 0, 79, 13]])


@pytest.mark.parametrize("s", [np.zeros((32, 32)), np.full((32, 32), 0.7), np.full((32, 32), np.nan)])
def test_flat_or_empty_saliency_gives_no_box(s):
    p = P.saliency_to_prompts(s, positive_points=True)
    assert len(p) == 0 and p.boxes.shape == (0, 4) and p.points.shape == (0, 1, 2) and not p.mask.any()


def test_otsu_splits_two_populations_between_them():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.2, 0.03, 5000), rng.normal(0.7, 0.03, 1000)])
    assert 0.3 < P.otsu_threshold(values) < 0.6
    s = blob_map(noise=0.3)
    assert P.binarize(s, "threshold", 0.5).sum() == 96


def test_bad_input_is_named():
    with pytest.raises(InputError, match="one of"):
        P.binarize(np.zeros((4, 4)), "crf")
    with pytest.raises(InputError, match=r"\[H,W\]"):
        P.binarize(np.zeros((1, 4, 4)))
