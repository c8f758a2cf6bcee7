"""Masks carried from slice to slice by SAM (``engines.medclipsam.propagation``): a found cross-section's box prompts
the empty neighbouring slice; the new mask is kept only where it continues its source."""

import numpy as np
import pytest
import torch

from CLIPSegLib.engines.medclipsam.propagation import PROPAGATE, propagation_settings
from CLIPSegLib.engines.medclipsam.sam import SamOutput
from CLIPSegLib.errors import ModelError
from CLIPSegLib.inference.pipeline import combine_maps

from test_medclipsam_engine import build  # noqa: F401 (a fixture)


def test_the_settings_are_off_by_default_and_checked():
    assert propagation_settings({}) is None
    assert propagation_settings({"inference": {"propagate": False}}) is None
    assert propagation_settings({"inference": {"propagate": True}}) == PROPAGATE
    assert propagation_settings({"inference": {"propagate": {"min_dice": 0.7}}})["min_dice"] == 0.7
    with pytest.raises(ModelError, match="inference.propagate .*'min_overlap'.* is true, false or an object"):
        propagation_settings({"id": "m", "inference": {"propagate": {"min_overlap": 0.5}}})
    with pytest.raises(ModelError, match="min_dice 2 must lie in 0..1, max_growth 1.5 be at least 1 and min_contrast_ratio 0.5 at least 0"):
        propagation_settings({"id": "m", "inference": {"propagate": {"min_dice": 2}}})


def _bright_sam(engine, monkeypatch, reach: int):
    """SAM stand-in: a slice's 'embedding' is the slice; a box's mask is the bright pixels (> 0.5) within ``reach``
    pixels of the box, at probability 0.9 (``reach`` large: SAM leaking along a bright region)."""
    embedded = []

    def embed(x, precision="fp32"):
        embedded.append(len(x))
        return x[:, :1].clone()

    def decode(e, size, boxes, points=None, labels=None):
        out = torch.zeros(len(boxes), *size)
        for j, (x0, y0, x1, y1) in enumerate(torch.as_tensor(boxes).round().long().tolist()):
            near = torch.zeros(size, dtype=torch.bool)
            near[max(y0 - reach, 0):y1 + reach + 1, max(x0 - reach, 0):x1 + reach + 1] = True
            out[j][(e[0, 0] > 0.5) & near] = 0.9
        return SamOutput(out, torch.ones(len(boxes)))

    monkeypatch.setattr(engine.sam, "embed", embed)
    monkeypatch.setattr(engine.sam, "decode", decode)
    return embedded


def _ball_volume():
    """12 slices of 48 x 48, tissue 0.1; a bright disc on slices 3-8 whose radius changes slowly; slice 9 holds a
    bright band across the whole slice (an object SAM would leak into)."""
    volume = np.full((12, 48, 48), 0.1, dtype=np.float32)
    yy, xx = np.mgrid[:48, :48]
    for k, r in zip(range(3, 9), (5, 7, 8, 8, 7, 5)):
        volume[k][(yy - 24) ** 2 + (xx - 24) ** 2 <= r * r] = 1.0
    volume[10, 20:28, 20:28] = 1.0  # the same place, past the band: never reached
    volume[9, 10:40, :] = 1.0
    return volume


def test_a_mask_is_carried_through_the_object_and_stops_where_it_ends(build, monkeypatch):  # noqa: F811
    engine = build(inference={"propagate": True})
    embedded = _bright_sam(engine, monkeypatch, reach=2)
    volume = _ball_volume()
    maps = np.zeros((2, 12, 48, 48), dtype=np.float32)  # [P,K,J,I]
    maps[0, 5] = 0.9 * (volume[5] > 0.5)  # prompt 0 found on slice 5 only
    propagate = engine.propagator(volume, slice_axis=2)
    out = propagate(maps)
    assert out is maps
    found = [k for k in range(12) if (maps[0, k] > 0.5).any()]
    assert found == [3, 4, 5, 6, 7, 8]  # 2: no signal; 9: the band in the box, 2.8x its source's area
    for k in found:
        disc = volume[k] > 0.5
        assert 2 * (disc & (maps[0, k] > 0.5)).sum() / (disc.sum() + (maps[0, k] > 0.5).sum()) > 0.9
    assert not maps[1].any()  # a prompt with nothing found gets nothing
    assert sum(embedded) == propagate.visited == 6  # slices 3-4 and 6-9 once each (2 is constant: skipped)
    again = np.zeros_like(maps)
    again[0, 5] = maps[0, 5]
    propagate(again)
    assert sum(embedded) == 6 and np.array_equal(again, maps)  # the embeddings are kept


def test_a_mask_that_leaks_far_past_its_source_is_not_kept(build, monkeypatch):  # noqa: F811
    engine = build(inference={"propagate": {"max_growth": 2.0}})
    _bright_sam(engine, monkeypatch, reach=48)  # SAM takes every bright pixel of the slice
    volume = _ball_volume()
    maps = np.zeros((1, 12, 48, 48), dtype=np.float32)
    maps[0, 8] = 0.9 * (volume[8] > 0.5)
    engine.propagator(volume, slice_axis=2)(maps)
    assert not (maps[0, 9] > 0.5).any() and not (maps[0, 10] > 0.5).any()  # the band: 18x its source's area
    assert (maps[0, 7] > 0.5).any()  # the disc below (1.9x) continues it


def test_a_mask_that_stands_out_far_less_than_its_source_is_not_kept(build, monkeypatch):  # noqa: F811
    engine = build(inference={"propagate": {"min_contrast_ratio": 0.5}})
    _bright_sam(engine, monkeypatch, reach=2)
    volume = _ball_volume()
    volume[4][volume[4] > 0.5] = 0.5  # slice 4's disc: 0.4 above the tissue, against 0.9 on the others
    volume += np.random.default_rng(0).normal(0, 0.1, volume.shape).astype(np.float32) * (volume < 0.5)
    maps = np.zeros((1, 12, 48, 48), dtype=np.float32)
    maps[0, 6] = 0.9 * (volume[6] > 0.5)
    engine.propagator(volume, slice_axis=2)(maps)
    found = [k for k in range(12) if (maps[0, k] > 0.5).any()]
    assert 5 in found and 4 not in found and 3 not in found


def test_combine_maps_carries_after_the_presence_floor_and_before_the_vote(monkeypatch):
    from CLIPSegLib.inference import pipeline

    masks = np.zeros((1, 5, 8, 8), dtype=np.float32)
    masks[0, :, 2:6, 2:6] = 0.9
    presence = np.array([[0.9, 0.1, 0.9, 0.9, 0.9]], dtype=np.float32)
    calls = []
    vote = pipeline.slice_vote
    monkeypatch.setattr(pipeline, "slice_vote", lambda m, axis, w: calls.append(("vote", m.copy())) or vote(m, axis, w))

    def propagate(m):
        calls.append(("step", m.copy()))
        m[0, 1] = 0.8  # what the engine's volume step puts back into the emptied slice
        return m

    combine_maps(masks, presence, 2, [0.0], [None], (), floors=[0.5], vote=3, propagate=propagate)
    assert [name for name, _ in calls] == ["step", "vote"]
    assert not calls[0][1][0, 1].any() and calls[0][1][0, 0].any()  # the floor emptied slice 1 before the step
    assert (calls[1][1][1] == 0.8).all()  # the vote judges what the step made
