"""Text-conditioned saliency (``engines.medclipsam.saliency``) on a tiny open_clip CLIP trained in the test to tell
images with a bright square from images without: the map must follow the square (and, for gScoreCAM, the prompt).
patch_similarity reads patch tokens, which that training does not shape, so its localisation test uses a tiny CLIP
whose patch tokens were trained to align with the square's text."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from CLIPSegLib.engines.clip_backbone import build_clip, to_clip_input
from CLIPSegLib.engines.medclipsam.saliency import (METHODS, TextScorer, _gscorecam_class, dense_features, saliency,
                                                     vit_layer)
from CLIPSegLib.errors import InputError

S, SQUARE = 64, 16
CLIP = {"embed_dim": 16, "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": S},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
BLACK = to_clip_input(torch.zeros(1, 1, 1, 1))  # what gScoreCAM's masked-out pixels become


def squares(n, generator, present=None):
    """n dark noisy images [n,1,S,S] in [0,1], about half (or all / none) with a bright SQUARE x SQUARE square at a
    random place: (images, labels 1 = square, top-left corners [n,2] as (row, column))."""
    x = 0.2 + 0.05 * torch.rand(n, 1, S, S, generator=generator)
    corner = torch.randint(0, S - SQUARE + 1, (n, 2), generator=generator)
    has = torch.rand(n, generator=generator) < 0.5 if present is None else torch.full((n,), present)
    for i in range(n):
        if has[i]:
            x[i, :, corner[i, 0]:corner[i, 0] + SQUARE, corner[i, 1]:corner[i, 1] + SQUARE] = 0.9
    return x, has.long(), corner


def _train_toy(step):
    """A tiny CLIP and two random unit text rows ``[2,16]``; its image tower trained 150 Adam steps (lr 3e-3, seeded)
    on ``step(clip, text, generator) -> loss`` -> (clip, text, the last loss)."""
    torch.manual_seed(0)
    clip = build_clip(CLIP)
    text = F.normalize(torch.randn(2, 16), dim=-1)
    opt = torch.optim.Adam(clip.visual.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        loss = step(clip, text, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clip, text, loss.item()


@pytest.fixture(scope="module")
def toy():
    """(clip, text [2,16]): a tiny CLIP whose image tower learnt (150 Adam steps, ~2 s) to put images with a square
    near text row 1 ("bright square") and images without near row 0 ("empty")."""
    def step(clip, text, g):
        x, y, _ = squares(32, g)
        return F.cross_entropy(10 * F.normalize(clip.encode_image(to_clip_input(x)), dim=-1) @ text.T, y)

    clip, text, loss = _train_toy(step)
    assert loss < 0.05, "the toy did not learn the square"
    return clip.eval(), text


def inside(corner):
    m = torch.zeros(S, S, dtype=torch.bool)
    m[corner[0]:corner[0] + SQUARE, corner[1]:corner[1] + SQUARE] = True
    return m


@pytest.mark.parametrize("method", METHODS)
def test_maps_have_the_image_shape_are_finite_and_in_range(toy, method):
    clip, text = toy
    x, _, _ = squares(3, torch.Generator().manual_seed(2))
    with torch.inference_mode():  # as the engine calls it
        sal = saliency(clip, to_clip_input(x), text, method=method, topk=8, batch_size=4, fill=BLACK)
    assert sal.shape == (3, 2, S, S) and sal.dtype == torch.float32
    assert torch.isfinite(sal).all() and sal.min() >= 0 and sal.max() <= 1
    assert all(p.grad is None and p.requires_grad for p in clip.parameters())  # weights untouched


@pytest.mark.parametrize("method", ["gscorecam", "gradcam"])
def test_the_square_prompt_lights_up_the_square_wherever_it_is(toy, method):
    clip, text = toy
    x, _, corners = squares(6, torch.Generator().manual_seed(5), present=True)
    sal = saliency(clip, to_clip_input(x), text, method=method, topk=16, batch_size=16, fill=BLACK)
    for i in range(6):
        m, s = inside(corners[i]), sal[i, 1]
        assert s[m].mean() > 2 * s[~m].mean(), (i, s[m].mean().item(), s[~m].mean().item())
        peak = divmod(int(s.argmax()), S)
        assert m[peak], f"image {i}: peak {peak} outside the square at {corners[i].tolist()}"


def test_gscorecam_follows_the_prompt(toy):
    """The "empty" prompt lights up the background, not the square (the reference's maps barely change with the
    prompt)."""
    clip, text = toy
    x, _, corners = squares(6, torch.Generator().manual_seed(5), present=True)
    sal = saliency(clip, to_clip_input(x), text, method="gscorecam", topk=16, batch_size=16, fill=BLACK)
    background = 0
    for i in range(6):
        m = inside(corners[i])
        swap = sal[i, 1] - sal[i, 0]  # square prompt minus empty prompt: positive on the square, not around it
        assert swap[m].mean() > swap[~m].mean() + 0.2, (i, swap[m].mean().item(), swap[~m].mean().item())
        background += bool(sal[i, 0][~m].mean() > sal[i, 0][m].mean())
    assert background >= 5  # the empty prompt's map sits on the background in (nearly) every image


def test_gscorecam_scores_only_the_top_k_channels_by_gradient_whatever_the_batch(toy):
    clip, text = toy
    layer, _ = vit_layer(clip)
    scorer = TextScorer(clip, text)
    rng = np.random.default_rng(0)
    acts = rng.random((2, 32, 8, 8), dtype=np.float32)
    grads = rng.standard_normal((2, 32, 8, 8)).astype(np.float32)
    top = np.argsort(-grads.mean(axis=(2, 3)), axis=1)[:, :5]
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = to_clip_input(squares(2, torch.Generator().manual_seed(3), present=True)[0])
    weights = []
    for batch in (1, 2, 16):
        cam = _gscorecam_class()(scorer, [layer], None, topk=5, batch_size=batch, fill=BLACK)
        weights.append(cam.get_cam_weights(x, layer, [ClassifierOutputTarget(1)] * 2, acts, grads))
        cam.activations_and_grads.release()
    w = weights[0]
    assert w.shape == (2, 32)
    for i in range(2):
        assert set(np.flatnonzero(w[i])) == set(top[i])
        assert w[i].sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(weights[1], w, atol=1e-6)
    np.testing.assert_allclose(weights[2], w, atol=1e-6)


def test_bad_input_is_named(toy):
    clip, text = toy
    with pytest.raises(InputError, match="one of"):
        saliency(clip, torch.zeros(1, 3, S, S), text, method="scorecam")
    with pytest.raises(InputError, match=r"\[B,3,S,S\]"):
        saliency(clip, torch.zeros(1, 1, S, S), text)


@pytest.fixture(scope="module")
def dense_toy():
    """(clip, text [2,16]): a tiny CLIP whose patch embeddings (``dense_features``) learnt (150 Adam steps, ~3 s)
    to lie near text row 1 on patches mostly inside the square and near row 0 elsewhere."""
    def step(clip, text, g):
        x, _, corner = squares(16, g, present=True)
        square = torch.stack([inside(c) for c in corner]).float()[:, None]  # [B,1,S,S]
        target = (F.avg_pool2d(square, 8) > 0.5).long().flatten()  # [B*8*8] patch mostly inside the square
        _, dense = dense_features(clip, to_clip_input(x))
        return F.cross_entropy(10 * F.normalize(dense, dim=1).permute(0, 2, 3, 1).reshape(-1, 16) @ text.T, target)

    clip, text, loss = _train_toy(step)
    assert loss < 0.2, f"the dense toy did not learn the square ({loss:.3f})"
    return clip.eval(), text


def test_patch_similarity_lights_up_the_square_against_the_neutral_text(dense_toy):
    clip, text = dense_toy
    x, _, corners = squares(6, torch.Generator().manual_seed(5), present=True)
    sal = saliency(clip, to_clip_input(x), text[1:], method="patch_similarity", neutral=text[:1])
    assert sal.shape == (6, 1, S, S) and torch.isfinite(sal).all() and sal.min() >= 0 and sal.max() <= 1
    for i in range(6):
        m, s = inside(corners[i]), sal[i, 0]
        assert s[m].mean() > 2 * s[~m].mean(), (i, s[m].mean().item(), s[~m].mean().item())
        assert m[divmod(int(s.argmax()), S)], f"image {i}: peak outside the square"
    # the neutral text's own map against the square's text: the background, not the square
    swap = saliency(clip, to_clip_input(x), text[:1], method="patch_similarity", neutral=text[1:])
    assert all(swap[i, 0][inside(corners[i])].mean() < swap[i, 0][~inside(corners[i])].mean() for i in range(6))


def test_patch_similarity_makes_one_image_pass_for_all_prompts_and_no_gradients(toy):
    clip, _ = toy
    calls = []
    hook = clip.visual.conv1.register_forward_hook(lambda m, i, o: calls.append(o.requires_grad))
    try:
        x, _, _ = squares(4, torch.Generator().manual_seed(2))
        prompts = F.normalize(torch.randn(5, 16), dim=-1)
        sal = saliency(clip, to_clip_input(x), prompts, method="patch_similarity", neutral=prompts[:2])
    finally:
        hook.remove()
    assert sal.shape == (4, 5, S, S) and torch.isfinite(sal).all()
    assert calls == [False]  # one batched pass of the 4 slices for the 5 prompts, without a graph
    _, dense = dense_features(clip, to_clip_input(x))
    assert dense.shape == (4, 16, S // 8, S // 8)
    torch.testing.assert_close(_, clip.encode_image(to_clip_input(x)))  # the pooled embedding is encode_image's


def test_gscorecam_scores_a_channel_shared_by_several_prompts_once_with_the_same_maps(toy, monkeypatch):
    """Three prompts in one call give the maps each gets alone, with fewer masked-image passes than three calls."""
    clip, text = toy
    text3 = torch.cat([text, F.normalize(text[:1] + text[1:], dim=-1)])
    x = to_clip_input(squares(2, torch.Generator().manual_seed(7), present=True)[0])
    images = []
    monkeypatch.setattr(TextScorer, "forward", lambda self, im, real=TextScorer.forward: images.append(len(im))
                        or real(self, im))
    together = saliency(clip, x, text3, method="gscorecam", topk=24, batch_size=8, fill=BLACK)
    shared = sum(images)
    images.clear()
    alone = torch.cat([saliency(clip, x, text3[p:p + 1], method="gscorecam", topk=24, batch_size=8, fill=BLACK)
                       for p in range(3)], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # per call: one forward (+ backward) pass per prompt for the gradients, then the masked copies; alone, every
    # prompt's 24 channels x 2 images are scored; together, a channel already scored is not scored again
    assert sum(images) - 3 * 2 == 3 * 2 * 24
    assert shared - 3 * 2 < 3 * 2 * 24


def test_patch_maps_scale_from_the_minimum_and_keep_a_finding_rim_below_zero():
    """A map with a positive core keeps its rim (below 0, above the tissue) in the component the box is cut from;
    a map with no positive patch is all 0 (nothing there)."""
    from CLIPSegLib.engines.medclipsam.prompts import saliency_to_prompts
    from CLIPSegLib.engines.medclipsam.saliency import patch_maps

    sim = torch.full((1, 2, 8, 8), -0.9)
    sim[0, 0, 2:6, 2:6] = -0.3  # the finding's rim
    sim[0, 0, 3:5, 3:5] = 0.5  # its core
    sim[0, 1] = -0.5
    sim[0, 1, 0, 0] = -0.1  # nothing nearer the prompt than the neutral texts
    maps = patch_maps(sim)
    assert float(maps[0, 0].min()) == 0.0 and float(maps[0, 0].max()) == pytest.approx(1.0)
    assert torch.equal(maps[0, 1], torch.zeros(8, 8))
    box = saliency_to_prompts(maps[0, 0].numpy(), min_area=1).boxes[0]
    assert box.tolist() == [2, 2, 5, 5]  # the rim's bounds, not only the core's 3..4
