import pytest
import torch

from CLIPSegLib.engines.clip_backbone import check_prompts, tokenize
from CLIPSegLib.engines import check_engine, create_engine
from CLIPSegLib.engines.cliptnseg.network import build_network
from CLIPSegLib.errors import InputError
from CLIPSegLib.models import load_spec

from conftest import TINY_SPEC


def test_every_image_pairs_with_every_prompt_and_pairs_match_the_grid():
    torch.manual_seed(0)
    net = build_network(TINY_SPEC).eval()
    x = torch.rand(3, 1, 32, 32)
    text = net.encode_text(tokenize(["thyroid nodule", "cyst"], 8))
    with torch.no_grad():
        grid, grid_presence = net(x, text)
        pairs, pairs_presence = net(x, text[[1, 0, 1]], torch.tensor([0, 1, 2]))
    assert grid.shape == (3, 2, 32, 32) and pairs.shape == (3, 32, 32)
    assert grid_presence.shape == (3, 2) and pairs_presence.shape == (3,)
    torch.testing.assert_close(pairs[0], grid[0, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pairs[1], grid[1, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pairs_presence[:2], grid_presence[[0, 1], [1, 0]], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(grid[:, 0], grid[:, 1])  # the prompt changes the output


def test_split_fuse_equals_the_papers_concatenation():
    """The fuse convolution run as coarse part per pair + fine part per image gives the paper's
    fuse(cat[coarse, fine]) for both pairings (grid and explicit pair_index)."""
    torch.manual_seed(0)
    net = build_network(TINY_SPEC).eval()
    x = torch.rand(3, 1, 32, 32)
    text = net.encode_text(tokenize(["thyroid nodule", "cyst"], 8))
    pair_index = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        grid, _ = net(x, text)
        acts = [a[pair_index] for a in net.clip_activations(x)]
        t = text.repeat(3, 1)
        coarse, _ = net.coarse(acts, t, (32 // net.patch, 32 // net.patch))
        fine = net.fine(x)
        reference = net.fuse(torch.cat([coarse, fine[pair_index]], dim=1))
        expected = net.head(net.head_film(reference, t)).view(3, 2, 32, 32)
        shuffled = torch.tensor([2, 0, 1, 2, 1, 0])
        split = net.fused(coarse[shuffled], fine, pair_index[shuffled], None)
    torch.testing.assert_close(grid, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(split, reference[shuffled], atol=1e-5, rtol=1e-4)


def test_engine_returns_mask_and_slice_presence_probabilities(tiny_model):
    torch.manual_seed(0)
    eng = create_engine(load_spec(tiny_model), torch.device("cpu"))
    x = torch.rand(2, 1, 32, 32)
    state = eng.encode_prompts(["thyroid nodule", "cyst"])
    mask, presence = eng.predict(x, state)
    with torch.no_grad():
        m, s = eng.net(x, state.embeddings)
    torch.testing.assert_close(mask, torch.sigmoid(m))
    torch.testing.assert_close(presence, torch.sigmoid(s))
    assert mask.shape == (2, 2, 32, 32) and presence.shape == (2, 2)
    plain = build_network({**TINY_SPEC, "network": {**TINY_SPEC["network"], "presence_head": False}}).eval()
    with torch.no_grad():
        assert plain(x, eng.encode_prompts(["cyst"]).embeddings)[1] is None
        assert not any(n.startswith("presence") for n, _ in plain.named_parameters())


def test_clip_is_frozen_and_only_the_segmenter_trains():
    net = build_network(TINY_SPEC)
    assert not any(p.requires_grad for p in net.clip.parameters())
    assert all(p.requires_grad for n, p in net.named_parameters() if not n.startswith("clip."))
    net.train()
    assert not net.clip.training


def test_wrong_input_size_is_refused():
    net = build_network(TINY_SPEC)
    with pytest.raises(ValueError, match=r"\[B,1,32,32\]"):
        net(torch.rand(1, 1, 40, 40), torch.rand(1, 16))


def test_paper_size_vit_b16_at_352_segments_one_slice():
    """CLIP-TNseg at paper size: ViT-B/16 image tower at 352x352 (random weights; no downloads here)."""
    spec = {"clip": {"open_clip_name": "ViT-B-16", "image_size": 352},
            "network": {"extract_layers": [3, 6, 9], "reduce_dim": 64, "coarse_channels": 16,
                        "fine_channels": [16, 32, 64, 128], "head_channels": 32}}
    torch.manual_seed(0)
    net = build_network(spec).eval()
    assert net.input_size == 352 and net.patch == 16
    assert net.clip.visual.transformer.width == 768 and len(net.clip.visual.transformer.resblocks) == 12
    with torch.inference_mode():
        out, presence = net(torch.rand(1, 1, 352, 352), net.encode_text(tokenize(["hypoechoic thyroid nodule"], 77)))
    assert out.shape == (1, 1, 352, 352) and presence is None and torch.isfinite(out).all()


def test_prompt_validation():
    assert check_prompts(["  thyroid   nodule "]) == ["thyroid nodule"]
    for bad in ([], [""], ["   "], ["cyst", "Cyst"]):
        with pytest.raises(InputError):
            check_prompts(bad)


def test_unknown_engine_suggests_the_closest(tiny_model):
    with pytest.raises(InputError, match="Did you mean .cliptnseg."):
        check_engine("cliptnsg")
    eng = create_engine(load_spec(tiny_model), torch.device("cpu"))
    probs, _ = eng.predict(torch.rand(2, 1, 32, 32), eng.encode_prompts(["cyst", "nodule"]))
    assert probs.shape == (2, 2, 32, 32) and 0 <= probs.min() and probs.max() <= 1


def test_the_readings_are_what_the_text_tower_gets():
    """read_prompt keeps exactly the tokens open_clip's tokenize keeps, and says when it cut the prompt; the embedded
    model reads 16 tokens (14 of the prompt), so a long description of a nodule is cut and reported so."""
    from CLIPSegLib.engines.clip_backbone import read_prompt

    text = "a large hypoechoic solid thyroid nodule with irregular margins and punctate microcalcifications"
    for context in (8, 16, 77):
        tokens, read_as, truncated = read_prompt(text, context)
        ids = tokenize([text], context)[0]
        assert len(tokens) == int((ids > 0).sum()) - 2 and truncated == (context < 77)
        assert text.startswith(read_as) and (read_as == text) != truncated
    embedded = load_spec(None)
    assert embedded["clip"]["text_cfg"]["context_length"] == 16
    tokens, read_as, truncated = read_prompt(text, 16)
    assert truncated and len(tokens) == 14 and read_as.endswith("irregular margins")
