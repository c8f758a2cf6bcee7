"""SAM (``engines.medclipsam.sam``) on a small SAM built from segment_anything's own classes and saved in tmp_path."""

import pytest
import torch

from CLIPSegLib.engines.medclipsam.sam import SAM_TYPES, build_sam, checkpoint_sizes, load_sam, sam_sizes
from CLIPSegLib.errors import InputError, ModelError

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "image_size": 64, "patch_size": 8,
        "prompt_dim": 32, "window_size": 4, "mlp_dim": 64, "decoder_heads": 2}


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """(checkpoint path, the model saved in it): random weights, 64 px input, 8 x 8 embedding grid."""
    torch.manual_seed(0)
    sam = build_sam(sam_sizes(TINY))
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path, sam


def slices(n=3, h=40, w=56, seed=0):
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))


def test_loads_the_checkpoint_weights(tiny_sam):
    path, sam = tiny_sam
    seg = load_sam(path, TINY)
    own, saved = seg.sam.state_dict(), sam.state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in own)
    assert seg.image_size == 64 and not seg.sam.training


def test_masks_come_back_at_slice_size_with_one_mask_per_box(tiny_sam):
    seg = load_sam(tiny_sam[0], TINY)
    out = seg.segment(slices(), [torch.tensor([[5., 5., 30., 20.], [10., 0., 55., 39.]]), torch.zeros(0, 4),
                                 torch.tensor([[0., 0., 10., 10.]])])
    assert [o.probabilities.shape for o in out] == [(2, 40, 56), (0, 40, 56), (1, 40, 56)]
    assert all(o.iou.shape == (len(o.probabilities),) for o in out)
    p = out[0].probabilities
    assert p.dtype == torch.float32 and torch.isfinite(p).all() and 0 <= p.min() and p.max() <= 1


def test_each_slice_is_embedded_once_and_slices_without_boxes_never(tiny_sam):
    seg = load_sam(tiny_sam[0], TINY)
    seen = []
    handle = seg.sam.image_encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    boxes = [torch.tensor([[5., 5., 30., 20.], [10., 2., 50., 30.], [0., 0., 9., 9.]]), torch.zeros(0, 4),
             torch.tensor([[3., 3., 20., 20.]]), torch.zeros(0, 4)]
    seg.segment(slices(4), boxes)
    handle.remove()
    assert seen == [2]  # one encoder pass, two slices: the two with boxes
    seen.clear()
    assert [len(o.probabilities) for o in seg.segment(slices(2), [torch.zeros(0, 4)] * 2)] == [0, 0] and not seen


def test_boxes_decoded_together_equal_boxes_decoded_alone(tiny_sam):
    seg = load_sam(tiny_sam[0], TINY)
    x = slices(1)
    boxes = torch.tensor([[5., 5., 30., 20.], [10., 2., 50., 30.], [0., 0., 9., 9.]])
    together = seg.segment(x, [boxes])[0].probabilities
    alone = torch.cat([seg.segment(x, [b[None]])[0].probabilities for b in boxes])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])  # the box matters


def test_points_join_the_box_prompt(tiny_sam):
    seg = load_sam(tiny_sam[0], TINY)
    emb = seg.embed(slices(1))
    box = torch.tensor([[5., 5., 30., 20.]])
    plain = seg.decode(emb, (40, 56), box).probabilities
    pointed = seg.decode(emb, (40, 56), box, torch.tensor([[[12., 10.], [28., 18.]]]), torch.tensor([[1, 0]]))
    assert pointed.probabilities.shape == (1, 40, 56) and not torch.allclose(plain, pointed.probabilities)


def test_a_box_outside_the_slice_is_refused_and_one_across_its_edge_clipped(tiny_sam):
    seg = load_sam(tiny_sam[0], TINY)
    emb = seg.embed(slices(1))
    with pytest.raises(InputError, match="outside the 56 x 40 slice"):
        seg.decode(emb, (40, 56), torch.tensor([[60., 5., 80., 20.]]))
    across = seg.decode(emb, (40, 56), torch.tensor([[40., 30., 90., 70.]])).probabilities
    inside = seg.decode(emb, (40, 56), torch.tensor([[40., 30., 55., 39.]])).probabilities
    torch.testing.assert_close(across, inside)


def test_a_checkpoint_of_another_size_is_named(tiny_sam, tmp_path):
    with pytest.raises(ModelError, match=r"custom size \(embed dim 32, 2 blocks\), not the vit_b"):
        load_sam(tiny_sam[0], "vit_b")
    bigger = dict(TINY, embed_dim=48)
    with pytest.raises(ModelError, match="embed dim 32, 2 blocks"):
        load_sam(tiny_sam[0], bigger)
    # a ViT-L's shapes, without building one: the size is read from the tensors alone
    fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 1, 1),
            **{f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)}}
    torch.save(fake, tmp_path / "sam_vit_l.pth")
    with pytest.raises(ModelError, match=r"SAM ViT-L \(embed dim 1024, 24 blocks\), not the vit_b"):
        load_sam(tmp_path / "sam_vit_l.pth", "vit_b")
    assert checkpoint_sizes(fake) == (1024, 24)
    assert {k: (v.embed_dim, v.depth) for k, v in SAM_TYPES.items()} == \
        {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}


def test_a_medsam_style_checkpoint_wrapped_under_model_loads_with_unit_normalisation(tiny_sam, tmp_path):
    path, sam = tiny_sam
    torch.save({"model": sam.state_dict(), "epoch": 3}, tmp_path / "medsam.pth")
    seg = load_sam(tmp_path / "medsam.pth", TINY, normalize="unit")
    x = seg.prepare(slices(1) * 0.3 + 0.2)
    assert x.shape == (1, 3, 64, 64) and x[..., :45, :].max() == pytest.approx(1.0) and x.min() == 0.0
    with pytest.raises(ModelError, match="normalisation"):
        load_sam(path, TINY, normalize="imagenet")


def test_a_file_that_is_not_sam_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="not a SAM checkpoint"):
        load_sam(tmp_path / "other.pth")
    with pytest.raises(ModelError, match="unknown SAM type 'vit_x'"):
        load_sam(tmp_path / "other.pth", "vit_x")


def test_slices_are_resized_by_their_own_height_and_width_whatever_the_batch(tiny_sam):
    seg = load_sam(tiny_sam[0], TINY)
    x = slices(4, 40, 56)
    prepared = seg.prepare(x)
    assert prepared.shape == (4, 3, 64, 64)
    torch.testing.assert_close(prepared, torch.cat([seg.prepare(x[i:i + 1]) for i in range(4)]), atol=0, rtol=0)
    torch.testing.assert_close(seg.embed(x), torch.cat([seg.embed(x[i:i + 2]) for i in (0, 2)]), atol=1e-5, rtol=0)
    # 56 px wide -> 64: 40 px high -> round(40 * 64 / 56) = 46 rows of image, the rest SAM's zero padding
    padded = seg.sam.preprocess(torch.zeros(1, 3, 46, 64))[0, :, 46:]
    assert torch.equal(prepared[0, :, 46:], padded) and not torch.equal(prepared[0, :, 45], padded[:, 0])
