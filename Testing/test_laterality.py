"""The patient's sides in physical space (``inference.laterality``): the body's midline, which array axis to mirror,
and the region a one-sided prompt keeps, for volumes stored in either left-right order."""

import numpy as np
import pytest

from CLIPSegLib.errors import ModelError
from CLIPSegLib.inference.laterality import (body_midline_mm, lps_x_mm, mirror_axis, patient_sides_of,
                                             side_regions)
from CLIPSegLib.io.geometry import Geometry


def _body(shape=(3, 40, 60), lo=30, hi=56, seed=0):
    """A dim background with a bright body spanning columns lo..hi-1 (off-centre) and two dark lungs inside it."""
    rng = np.random.default_rng(seed)
    v = rng.normal(10.0, 1.0, shape).astype(np.float32)
    v[:, 5:35, lo:hi] += 100.0
    v[:, 10:30, lo + 3:lo + 10] -= 90.0  # a dark lung beside the midline does not move it
    return v


def _mirrored(volume, geometry):
    """The same voxels in physical space, stored with the column axis pointing the other way."""
    n = volume.shape[2]
    d = geometry.direction_matrix.copy()
    origin = np.asarray(geometry.origin) + d[:, 0] * geometry.spacing[0] * (n - 1)
    d[:, 0] *= -1
    return np.ascontiguousarray(volume[:, :, ::-1]), Geometry(geometry.spacing, tuple(origin), tuple(map(tuple, d)))


def test_the_midline_is_the_middle_of_the_body_in_mm_whichever_way_the_volume_is_stored():
    g = Geometry((2.0, 1.0, 3.0), (-50.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    v = _body()
    expected = -50.0 + 2.0 * (30 + 55) / 2  # columns 30..55, 2 mm apart, from x = -50
    assert body_midline_mm(v, g) == pytest.approx(expected)
    mv, mg = _mirrored(v, g)
    assert body_midline_mm(mv, mg) == pytest.approx(expected)
    assert np.allclose(lps_x_mm(mv.shape, mg)[:, :, ::-1], lps_x_mm(v.shape, g))


def test_a_constant_volume_has_its_midline_in_the_middle_of_the_grid():
    g = Geometry.axis_aligned((1.0, 1.0, 0.5))
    assert body_midline_mm(np.zeros((2, 8, 11), np.float32), g) == pytest.approx(2.5)


def test_columns_toward_the_patients_right_are_mirrored():
    identity = Geometry.axis_aligned((1.0, 1.0, 1.0))
    assert mirror_axis(identity, 2) is None and mirror_axis(identity, 1) is None
    ras_stored = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)))
    assert mirror_axis(ras_stored, 2) == 2 and mirror_axis(ras_stored, 1) == 2  # columns: I
    sagittal_cols = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((0, -1, 0), (-1, 0, 0), (0, 0, 1)))
    assert mirror_axis(sagittal_cols, 0) == 1  # slices along I: columns are J, which points to the right here


def test_a_one_sided_prompt_keeps_its_side_of_the_midline_and_the_margin():
    g = Geometry((2.0, 1.0, 3.0), (-50.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    v = _body()
    (left, right, none), midline = side_regions(v, g, [1, -1, 0], margin_mm=4.0)
    x = lps_x_mm(v.shape, g)
    assert none is None and midline == pytest.approx(35.0)
    assert np.array_equal(left, x >= 31.0) and np.array_equal(right, x <= 39.0)
    assert side_regions(v, g, [0, 0], 4.0) == ([None, None], None)


def test_a_malformed_patient_sides_entry_names_the_fix():
    assert patient_sides_of({"inference": {}}) is None
    assert patient_sides_of({"inference": {"patient_sides": {"margin_mm": 10}}}) == 10.0
    for bad in ({"margin_mm": -1}, {"margin": 10}, 10, {"margin_mm": True}):
        with pytest.raises(ModelError, match="inference.patient_sides must be"):
            patient_sides_of({"id": "m", "inference": {"patient_sides": bad}})


def test_labelled_volumes_reach_a_side_reading_model_in_its_frame():
    """Fine-tuning a model that reads the patient's sides: a volume stored with its columns toward the patient's right
    is reversed along I with its labels and geometry (the same voxels in physical space); one stored in the
    patient's frame is kept as it is."""
    from CLIPSegLib.training.labelled_slices import LabelledVolume, in_patient_frame

    g = Geometry((2.0, 1.0, 3.0), (-50.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    v = _body()
    truth = np.zeros(v.shape, bool)
    truth[1, 20:25, 50:54] = True  # on the patient's left
    stored, sg = _mirrored(v, g)
    mirrored = LabelledVolume(stored, sg, {"mass": truth[:, :, ::-1].copy()}, {"mass": [1]}, {"image": "x.nii.gz"})
    kept = LabelledVolume(v, g, {"mass": truth}, {"mass": [1]}, {})
    out = in_patient_frame([mirrored, kept])
    assert out[1] is kept
    assert np.array_equal(out[0].image, v) and np.array_equal(out[0].truth["mass"], truth)
    assert np.allclose(out[0].geometry.ijk_to_lps(), g.ijk_to_lps()) and out[0].slices == {"mass": [1]}
    assert out[0].source == {"image": "x.nii.gz", "mirrored": "I"}


def test_rows_toward_the_head_are_turned_upright_for_the_zone_words():
    """``feet_axis``: rows that run mostly toward the head (LPS +z) are reversed, so "upper" is the top rows as on a
    displayed radiograph; rows toward the feet, or not head-feet at all (an axial slice; a 2D image stored without
    a real direction), are kept."""
    from CLIPSegLib.inference.laterality import feet_axis, frame_flips, mirrored_along

    identity = Geometry.axis_aligned((1.0, 1.0, 1.0))
    assert feet_axis(identity, 2) is None  # an axial slice: rows are posterior
    assert feet_axis(identity, 1) == 0 and feet_axis(identity, 0) == 0  # coronal / sagittal slices: rows are K, up
    # direction matrices: row = LPS component, column = voxel axis (I, J, K)
    coronal_stack = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 0, 1), (0, 1, 0)))  # J up, K back
    assert feet_axis(coronal_stack, 2) == 1
    coronal_down = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 0, 1), (0, -1, 0)))  # DICOM's usual
    assert feet_axis(coronal_down, 2) is None
    ras_coronal = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((-1, 0, 0), (0, 0, -1), (0, 1, 0)))
    assert frame_flips(ras_coronal, 2) == (2, 1) and frame_flips(coronal_down, 2) == ()
    # reversing an array axis keeps every voxel where it was in physical space
    g = Geometry((2.0, 1.0, 3.0), (-50.0, 4.0, 7.0), ((1, 0, 0), (0, 0, 1), (0, 1, 0)))
    v = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    for a in (0, 1, 2):
        m = mirrored_along(g, a, v.shape[a])
        kji = np.array([1, 2, 3])
        flipped = kji.copy()
        flipped[a] = v.shape[a] - 1 - kji[a]
        lps = lambda geo, p: geo.ijk_to_lps() @ np.r_[p[::-1], 1.0]  # noqa: E731
        assert np.allclose(lps(g, kji), lps(m, flipped))
        assert np.flip(v, a)[tuple(flipped)] == v[tuple(kji)]


def test_labelled_volumes_stored_head_up_reach_a_side_reading_model_upright():
    from CLIPSegLib.training.labelled_slices import LabelledVolume, in_patient_frame

    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 0, 1), (0, 1, 0)))  # rows (J) toward the head
    v = _body()
    truth = np.zeros(v.shape, bool)
    truth[1, 30:34, 40:44] = True  # high J: near the head
    out, = in_patient_frame([LabelledVolume(v, g, {"mass": truth}, {"mass": [1]}, {})])
    assert out.source == {"mirrored": "J"} and np.array_equal(out.image, v[:, ::-1])
    assert out.truth["mass"][1, 40 - 34:40 - 30, 40:44].all() and out.truth["mass"].sum() == 16  # now top rows
    assert np.allclose(out.geometry.ijk_to_lps() @ [40, 6, 1, 1], g.ijk_to_lps() @ [40, 33, 1, 1])
