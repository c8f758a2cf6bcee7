"""The occlusion choice between MedCLIP-SAM masks (``engines.medclipsam.occlusion``): of a prompt's boxes on a slice,
the mask whose region, filled, takes the presence away is kept."""

import numpy as np
import pytest
import torch

from CLIPSegLib.engines.medclipsam.occlusion import INNER, OUTER, choose_by_occlusion, fill_with_surround
from CLIPSegLib.errors import ModelError
from CLIPSegLib.inference.pipeline import segment_volume

from test_medclipsam_engine import GEOMETRY, build, follow_the_image  # noqa: F401 (build is a fixture)


def test_the_fill_replaces_the_grown_mask_with_the_ring_around_it_the_same_way_each_time():
    image = torch.rand(40, 40, generator=torch.Generator().manual_seed(0)) * 0.2  # tissue: 0-0.2
    image[15:25, 15:25] = 1.0  # the object
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[16:24, 16:24] = True  # a mask a pixel inside the object: the grown hole covers the object's edge
    filled = fill_with_surround(image, mask)
    hole = torch.zeros_like(mask)
    hole[16 - INNER:24 + INNER, 16 - INNER:24 + INNER] = True
    ring = torch.zeros_like(mask)
    ring[16 - OUTER:24 + OUTER, 16 - OUTER:24 + OUTER] = True
    ring &= ~hole
    assert torch.equal(filled[~hole], image[~hole])  # nothing outside the hole moves
    assert set(filled[hole].tolist()) <= set(image[ring].tolist())  # drawn from the ring: tissue
    assert filled[15:25, 15:25].max() <= 0.2  # the bright object is gone
    assert torch.equal(fill_with_surround(image, mask), filled)  # seeded: the same fill
    assert torch.equal(fill_with_surround(image, torch.zeros_like(mask)), image)  # no mask: unchanged
    whole = fill_with_surround(image, torch.ones_like(mask))  # no ring left: the slice's mean
    assert torch.allclose(whole, image.mean().expand_as(image))


def test_of_a_prompts_boxes_the_one_whose_region_holds_the_presence_is_chosen():
    """Slice 0 holds a bright object (the evidence, left) and a grey one (right); prompt 0 has a box on each, the
    grey one first; prompt 1 has one box, taken unscored."""
    x = torch.full((1, 1, 32, 32), 0.1)
    x[0, 0, 4:12, 4:12] = 1.0
    x[0, 0, 18:30, 18:30] = 0.5
    on_grey, on_bright = torch.zeros(32, 32), torch.zeros(32, 32)
    on_grey[18:30, 18:30] = 0.9
    on_bright[4:12, 4:12] = 0.9
    scored = []

    def score(images):  # presence of both prompts: 0.9 while the bright object is in the image, else 0.1
        scored.append(len(images))
        bright = images[:, 0, 4:12, 4:12].amax((1, 2)) > 0.9
        return torch.where(bright, 0.9, 0.1)[:, None].expand(-1, 2)

    chosen = choose_by_occlusion(x, [(0, 0, 0, on_grey), (0, 0, 1, on_bright), (0, 1, 2, on_grey)], score)
    assert chosen == {(0, 0): 1, (0, 1): 2} and scored == [2]  # prompt 1's lone box is not scored
    scored.clear()
    assert choose_by_occlusion(x, [(0, 0, 0, on_grey), (0, 0, 1, on_bright)], score, chunk=1) == {(0, 0): 1}
    assert scored == [1, 1]  # in chunks of one image
    empty = torch.zeros(32, 32)  # removes nothing: beats a mask whose filling leaves the presence as high
    assert choose_by_occlusion(x, [(0, 0, 0, on_grey), (0, 0, 1, empty)], score) == {(0, 0): 0}  # tie: the first
    assert choose_by_occlusion(x, [(0, 0, 0, on_bright), (0, 0, 1, empty)], score) == {(0, 0): 0}
    scored.clear()
    assert choose_by_occlusion(x, [(0, 0, 0, on_grey)], score) == {(0, 0): 0} and scored == []
    assert choose_by_occlusion(x, [], score) == {}


def test_the_engine_with_occlusion_keeps_the_box_the_presence_rests_on(build, monkeypatch):  # noqa: F811
    """Saliency follows brightness: its largest component is a big square, the next a small one; the presence
    rests on the small one. One box: the big square; two boxes and occlusion: the small one alone."""
    with pytest.raises(ModelError, match="saliency occlusion 'yes' is true or false"):
        build(saliency={"method": "gradcam", "occlusion": "yes"})
    volume = np.full((6, 48, 48), 0.1, dtype=np.float32)
    volume[:, 4:20, 4:20] = 1.0  # big
    volume[:, 30:38, 30:38] = 0.95  # small
    rule = {**build().spec["presence"], "min_slice_presence": 0.5, "per_finding": {}}
    masks = {}
    for boxes, occlusion in ((1, False), (2, True)):
        engine = build(saliency={"method": "gradcam", "occlusion": occlusion}, boxes={"max_boxes": boxes},
                       presence=rule)
        follow_the_image(engine, monkeypatch)
        mid = engine.clip.normalize(torch.full((1, 1, 8, 8), 0.5)).amax()

        def slice_presence(images, text, image=None, mid=mid):  # 0.95 while the small square is in the slice
            n = images.shape[-1]
            small = images[:, :, int(0.66 * n):int(0.76 * n), int(0.66 * n):int(0.76 * n)].flatten(1).mean(1) > mid
            return torch.where(small, 0.95, 0.05)[:, None].expand(-1, len(text)).clone()

        monkeypatch.setattr(engine, "slice_presence", slice_presence)
        finding = segment_volume(engine, volume, GEOMETRY, ["bright lesion"], axis=2).findings[0]
        assert finding.found
        masks[boxes, occlusion] = finding.mask
    assert masks[1, False][:, 6:18, 6:18].all() and not masks[1, False][:, 30:38, 30:38].any()
    assert masks[2, True][:, 31:37, 31:37].all() and not masks[2, True][:, 4:20, 4:20].any()


def test_occlusion_rescoring_reads_the_patch_maps_presence_when_the_model_does(build, monkeypatch):  # noqa: F811
    """slice_presence 'patches': the filled slices' presence comes from their own patch maps (one more image pass)."""
    from types import SimpleNamespace

    from CLIPSegLib.engines.medclipsam import engine as engine_module

    engine = build(saliency={"method": "patch_similarity", "slice_presence": "patches", "occlusion": True},
                   boxes={"max_boxes": 2})
    engine.skip_below = 0.0
    two = np.array([[2, 2, 20, 20], [26, 26, 44, 44]], dtype=np.float32)  # every map gives two boxes
    monkeypatch.setattr(engine_module, "saliency_to_prompts", lambda m, **kw: SimpleNamespace(boxes=two))
    read = []
    original = engine_module.patch_presence
    monkeypatch.setattr(engine_module, "patch_presence", lambda sim: read.append(sim.shape[0]) or original(sim))
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    probs, presence = engine.predict(x, engine.encode_prompts(["thyroid nodule"]))
    assert probs.shape == (2, 1, 48, 48) and presence.shape == (2, 1) and torch.isfinite(presence).all()
    assert read == [2, 4]  # the two slices, then their two candidates each, filled
