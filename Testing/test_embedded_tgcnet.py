"""The committed TGC-Net model (``tgcnet-report-small``) on held-out report phantoms (evaluation seeds, never trained
or calibrated on): the line's side decides, and a kind the image lacks gives an empty segment. The README's figures
come from `clipseg evaluate --family report` on 40 phantoms (it misses many opacities; these are cases it gets)."""

import numpy as np
import pytest

from CLIPSegLib.evaluation.metrics import dice
from CLIPSegLib.inference.pipeline import segment_volume
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.models import load_spec
from CLIPSegLib.synthetic.report_phantoms import make_report_phantom
from CLIPSegLib.synthetic.report_text import matching

MODEL = "tgcnet-report-small"


@pytest.fixture(scope="module")
def engine():
    from CLIPSegLib.inference.segment_file import load_engine

    return load_engine(MODEL, device="cpu")


def _segment(engine, seed, prompts):
    ph = make_report_phantom(seed=seed)
    result = segment_volume(engine, ph.image[None], Geometry.axis_aligned((1.0, *ph.spacing)), prompts)
    return ph, [f.mask[0] for f in result.findings]


def test_spec_records_its_command_knowledge_and_calibration():
    spec = load_spec(MODEL)
    assert spec["engine"] == "tgcnet" and spec["inference"]["flip_average"] is False
    assert spec["training"]["command"].startswith("clipseg train --engine tgcnet --dataset report")
    assert "--output-dir CLIPSeg/Resources/Models" in spec["training"]["command"]
    assert spec["presence"]["calibration"]["volumes"] == 40 and len(spec["knowledge"]["sha256"]) == 64


def test_the_named_side_decides_and_an_absent_kind_is_empty(engine):
    """Seed 1020 has one pleural effusion, in the right lung (the image's left half), and no ground-glass opacity."""
    ph, (right, left, ggo) = _segment(engine, 1020, ["a single pleural effusion in the right lower lung",
                                                     "pleural effusion of the left lower lung",
                                                     "ground-glass opacity of the right upper lung"])
    truth = np.zeros_like(right, dtype=bool)
    for o in matching(ph, "pleural effusion", ("right",), "lower"):
        truth |= o.mask
    assert truth.any() and dice(right, truth) > 0.7
    assert not left.any() and not ggo.any()


def test_bilateral_effusions_are_both_segmented(engine):
    """Seed 1031 has an effusion in each lung: the bilateral line covers both sides of the image."""
    ph, (both,) = _segment(engine, 1031, ["two pleural effusions in both lungs"])
    truth = np.zeros_like(both, dtype=bool)
    for o in matching(ph, "pleural effusion"):
        truth |= o.mask
    half = both.shape[1] // 2
    assert dice(both, truth) > 0.7 and both[:, :half].any() and both[:, half:].any()
