"""The committed TGC-Net model (``tgcnet-report-small``) on held-out report phantoms (evaluation seeds, never trained
or calibrated on): the line's side decides, and a kind the image lacks gives an empty segment. The README's figures
come from `clipseg evaluate --family report` on 40 phantoms (it misses many opacities; these are cases it gets)."""

import pytest

from CLIPSegLib.evaluation.metrics import dice
from CLIPSegLib.inference.pipeline import segment_volume
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.models import load_spec
from CLIPSegLib.synthetic.report_phantoms import make_report_phantom
from CLIPSegLib.synthetic.report_text import matching, union_mask

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
    assert spec["presence"]["calibration"]["volumes"] == 120 and len(spec["knowledge"]["sha256"]) == 64


def _truth(ph, kind, sides, zone=None):
    return union_mask(ph, matching(ph, kind, sides, zone))


def test_a_counted_line_of_an_absent_kind_is_empty(engine):
    """Seed 1034 has a pleural effusion in the right lung and no consolidation: both lines name a count (the count
    word once meant "present" to the first embedded model), only the effusion is segmented."""
    ph, (effusion, consolidation) = _segment(engine, 1034, ["a single pleural effusion in the right lung",
                                                            "a single area of consolidation in the right lower lung"])
    truth = _truth(ph, "pleural effusion", ("right",))
    assert truth.any() and dice(effusion, truth) > 0.7
    assert not consolidation.any() and not _truth(ph, "consolidation", ()).any()


def test_the_named_side_decides(engine):
    """Seed 1039 has its effusion in the right lower lung (the image's left half) only: the same line asked for the
    left lower lung gives an empty segment."""
    ph, (right, left) = _segment(engine, 1039, ["a single pleural effusion in the right lower lung",
                                                "a single pleural effusion in the left lower lung"])
    truth = _truth(ph, "pleural effusion", ("right",), "lower")
    assert truth.any() and dice(right, truth) > 0.7 and not _truth(ph, "pleural effusion", ("left",)).any()
    assert not left.any()


def test_a_chest_stored_mirrored_gives_the_same_segments_in_physical_space(engine):
    """The same phantom stored with its columns toward the patient's right (direction x = -1, as NIfTI's RAS storage
    keeps a chest): the model still reads it in the patient's frame, so the right-lower effusion of seed 1039 is
    found and the left line stays empty, voxel for voxel as in the standard storage (``inference.laterality``)."""
    import numpy as np

    assert load_spec(MODEL)["inference"]["patient_sides"] == {"margin_mm": 10.0}
    ph = make_report_phantom(seed=1039)
    prompts = ["a single pleural effusion in the right lower lung", "a single pleural effusion in the left lower lung"]
    stored = Geometry.axis_aligned((1.0, *ph.spacing))
    first = segment_volume(engine, ph.image[None], stored, prompts).findings
    n = ph.image.shape[1]
    mirrored = Geometry(stored.spacing, (stored.spacing[0] * (n - 1), 0.0, 0.0), ((-1, 0, 0), (0, 1, 0), (0, 0, 1)))
    again = segment_volume(engine, np.ascontiguousarray(ph.image[None, :, ::-1]), mirrored, prompts).findings
    assert first[0].mask.any() and not first[1].mask.any()
    for a, b in zip(again, first):
        assert np.array_equal(a.mask[..., ::-1], b.mask)
    assert again[0].info["kept_to_side"]["side"] == "right"
