"""The demo overlay: which slice it shows and whether its legend can be read over speckle."""

import numpy as np
from PIL import Image

from CLIPSegLib.demo import choose_slice, overlay_png

COLORS = [(1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.3, 0.5, 1.0)]


def _truth():
    shape = (10, 40, 40)
    nodule, cyst, calc = (np.zeros(shape, bool) for _ in range(3))
    nodule[0:6, 5:25, 5:25] = True  # large: most voxels on slices 0-5
    cyst[3:9, 28:32, 28:32] = True
    calc[5:7, 10:12, 30:32] = True  # only slices 5 and 6 hold all three findings
    return {"nodule": nodule, "cyst": cyst, "calcification": calc}


def test_the_overlay_shows_the_slice_with_most_findings_ties_by_area():
    truth = _truth()
    k = choose_slice(truth)
    count = sum(t.any(axis=(1, 2)) for t in truth.values())
    assert count[k] == count.max() == 3 and k == 5  # slice 6 has all three too, but no nodule: smaller area
    # the prediction does not decide which slice is shown: a large false segment elsewhere changes nothing
    wrong = {"x": np.zeros((10, 40, 40), bool)}
    wrong["x"][8] = True
    assert choose_slice(truth, wrong) == 5
    assert choose_slice({"cyst": np.zeros((10, 40, 40), bool)}, wrong) == 8  # no truth: most segmented voxels


def test_the_legend_sits_on_an_opaque_box_over_speckle(tmp_path):
    rng = np.random.default_rng(0)
    speckle = rng.gamma(1.0, 1.0, (10, 40, 40)).astype(np.float32)  # bright and dark grains everywhere
    truth = _truth()
    path = overlay_png(tmp_path / "o.png", speckle, {"nodule": truth["nodule"], "cyst": truth["cyst"]}, truth,
                       COLORS)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    legend = img[3:30, 3:30]  # the legend's first two lines ("nodule", "cyst"), top left
    assert np.median(legend) == 0  # the box, not speckle, is behind the text
    for color in COLORS[:2]:  # each legend line is drawn in its segment's colour
        assert (np.abs(legend - np.array(color) * 255).max(-1) < 40).sum() >= 5
    image_area = img[32:56, 32:80]
    assert np.median(image_area) > 0  # elsewhere the speckle shows
