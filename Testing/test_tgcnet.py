"""TGC-Net (``engines.tgcnet``): DATE's knowledge file and matching, each module changes the result (none is an
identity), ablation switches remove their module, paired and all-pairs forward agree, the paper-size network builds
and segments, and the engine says which knowledge it used."""

import json
from pathlib import Path

import pytest
import torch

from CLIPSegLib.engines.tgcnet.knowledge import load_knowledge
from CLIPSegLib.engines.tgcnet.location import cue_maps, load_locations
from CLIPSegLib.engines.tgcnet.network import MODULES, TGCNet, alignment_loss, build_network, parameter_counts
from CLIPSegLib.errors import ModelError
from conftest import TINY_TGCNET_SPEC

PROMPTS = ["GGO in the right lower lung", "bilateral consolidation, two areas", "clear lungs"]


def _net(seed=0, **network):
    torch.manual_seed(seed)
    net = build_network({**TINY_TGCNET_SPEC, "network": {**TINY_TGCNET_SPEC["network"], **network}})
    return net.eval()


def _images(n=2, seed=0):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _randomise(module):
    """Give every parameter of ``module`` random values (zero-initialised layers would hide a module's effect)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_knowledge_names_the_entries_a_prompt_mentions_longest_first():
    k = load_knowledge()
    assert k.names("GGO in the right lower lung") == ["ground-glass opacity"]
    assert k.names("Right pleural effusions and left ground-glass opacities") == ["pleural effusion",
                                                                                 "ground-glass opacity"]
    assert k.names("airspace consolidation noted") == ["consolidation"]
    assert k.names("clear lungs") == []
    assert k.knowledge_text("consolidation").startswith("consolidation: ")


@pytest.mark.parametrize("content, says", [
    (None, "cannot be read"),
    ("{not json", "not valid JSON"),
    ('{"version": "1"}', "no 'findings' object"),
    ('{"findings": {"cyst": {"synonyms": []}}}', "finding 'cyst' needs an 'appearance'"),
])
def test_a_broken_knowledge_file_is_named_with_the_fix(tmp_path, content, says):
    path = tmp_path / "findings.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ModelError, match=says) as e:
        load_knowledge(path)
    assert str(path) in str(e.value)


def test_date_fuses_the_knowledge_and_without_date_the_prompt_is_read_alone():
    net = _net()
    _randomise(net.text.mlp)
    with torch.no_grad():
        fused = net.encode_text(PROMPTS)
        raw = _net(date=False).encode_text(PROMPTS)  # same seed: the same CLIP
    assert fused.valid[:, -2].tolist() == [True, True, False]  # the knowledge token: only prompts naming an entry
    assert not torch.allclose(fused.pooled[0], raw.pooled[0], atol=1e-4)  # knowledge changed the embedding
    assert torch.allclose(fused.tokens[:, :-2], raw.tokens[:, :-2])  # the prompt's own tokens are the same
    assert not raw.valid[:, -2].any() and torch.allclose(raw.pooled, raw.tokens[:, -1])


def test_date_reads_an_edited_knowledge_file(tmp_path):
    data = json.loads(Path(load_knowledge().path).read_text(encoding="utf-8"))
    data["findings"]["ground-glass opacity"]["appearance"] = "bright round spot"
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    net = _net()
    _randomise(net.text.mlp)
    with torch.no_grad():
        before = net.encode_text(PROMPTS[:1]).pooled
        net.knowledge = load_knowledge(path)
        after = net.encode_text(PROMPTS[:1]).pooled
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("module", MODULES)
def test_each_module_changes_the_masks_and_its_switch_removes_it(module):
    full, without = _net(), _net(**{module: False})
    names = {n.split(".")[0] for n, _ in full.named_parameters()} - {n.split(".")[0] for n, _ in
                                                                     without.named_parameters()}
    assert names, f"turning {module} off removed no parameters"
    owned = {"sse": full.cnn, "date": full.text.mlp, "vlcm": full.vlcm}[module]
    x = _images()
    with torch.no_grad():
        text = full.encode_text(PROMPTS)
        before = full(x, text)[0]
        _randomise(owned)
        after = full(x, full.encode_text(PROMPTS))[0]
    assert not torch.allclose(before, after, atol=1e-4), f"{module} does not change the masks"


def test_vlcm_calibrates_the_tokens_and_its_similarity_map_is_trained_towards_the_mask():
    net = _net()
    text = net.encode_text(PROMPTS)
    tokens = torch.randn(3, 16, net.cfg["dim"])
    out, t, sim = net.vlcm(tokens, text.tokens, text.valid, text.pooled)
    assert out.shape == tokens.shape and t.shape == (3, net.cfg["dim"]) and sim.shape == (3, 16)
    assert not torch.allclose(out, tokens)
    masks = torch.zeros(1, 32, 32)
    masks[0, :16] = 1  # the top half of the slice
    grid = torch.zeros(1, 4, 4)
    grid[0, :2] = 1
    assert alignment_loss(grid * 20 - 10, masks) < 0.01 < alignment_loss(10 - grid * 20, masks)


@pytest.mark.parametrize("location", [False, True])
def test_paired_and_all_pairs_forward_give_the_same_masks(location):
    net = _net(location=location)
    x = _images(2)
    with torch.no_grad():
        text = net.encode_text(PROMPTS)
        mask, presence, sim = net(x, text)
        index = torch.tensor([1, 0, 1])
        pm, pp, ps = net(x, text.rows([0, 1, 2]), index)
    assert mask.shape == (2, 3, 32, 32) and presence.shape == (2, 3) and sim.shape == (2, 3, 4, 4)
    for n, b in enumerate(index.tolist()):
        assert torch.allclose(pm[n], mask[b, n], atol=1e-5) and torch.allclose(pp[n], presence[b, n], atol=1e-5)


def test_a_patch_that_does_not_fit_the_cnn_stages_is_a_clear_error():
    with pytest.raises(ModelError, match=r"cnn_channels has 3 entries but a ViT patch of 8 px needs"):
        _net(cnn_channels=[4, 8, 8])


def test_paper_size_tgcnet_builds_and_segments_with_a_small_trainable_share():
    spec = {"clip": {"open_clip_name": "ViT-B-16"}, "network": {"cnn_channels": [16, 32, 64, 128, 256],
                                                                "extract_layers": [3, 6, 9], "dim": 64}}
    torch.manual_seed(0)
    net = build_network(spec).eval()
    counts = parameter_counts(net)
    assert counts["total"] > 140e6 and counts["trainable"] / counts["total"] < 0.03
    with torch.no_grad():
        mask, presence, _ = net(torch.rand(1, 1, 224, 224), net.encode_text(["a single consolidation in the left "
                                                                             "lower lung"]))
    assert mask.shape == (1, 1, 224, 224) and torch.isfinite(mask).all() and presence.shape == (1, 1)


def test_the_engine_says_which_knowledge_it_read_and_when_the_file_was_edited(tiny_tgcnet):
    from CLIPSegLib.engines import create_engine
    from CLIPSegLib.models import load_spec

    spec = load_spec(tiny_tgcnet)
    engine = create_engine(spec, torch.device("cpu"))
    reading = engine.encode_prompts(["GGO in the right lower lung"]).readings[0]
    assert reading.knowledge == ("ground-glass opacity",)
    assert reading.interpretation().endswith("with knowledge of: ground-glass opacity")
    edited = create_engine({**spec, "knowledge": {"sha256": "0" * 64}}, torch.device("cpu"))
    assert "was edited since training" in edited.encode_prompts(["GGO"]).readings[0].interpretation()
    assert isinstance(engine.net, TGCNet)
    from CLIPSegLib.engines.tgcnet.engine import TGCNetEngine

    located = {**spec, "network": {**spec["network"], "location": True}}
    engine = TGCNetEngine(build_network(located), torch.device("cpu"), located)
    reading = engine.encode_prompts(["GGO in the right lower lung"]).readings[0]
    assert reading.knowledge == ("ground-glass opacity", "location: patient's right, lower zone")
    edited = {**located, "locations": {"file": "locations.json", "sha256": "0" * 64}}
    engine = TGCNetEngine(build_network(edited), torch.device("cpu"), edited)
    assert "location words file" in engine.encode_prompts(["left GGO"]).readings[0].interpretation()


@pytest.mark.parametrize("text, cue, said", [
    ("a single ground-glass opacity in the right lower lung", (-1, 1), "patient's right, lower zone"),
    ("there is GGO in the left apex", (1, -1), "patient's left, upper zone"),
    ("in the right base, one hazy opacity", (-1, 1), "patient's right, lower zone"),
    ("left-sided effusion noted", (1, 0), "patient's left"),
    ("bilateral consolidation, two areas", (0, 0), "no side or zone"),
    ("two areas of consolidation in both lungs", (0, 0), "no side or zone"),
    ("lower left lung and upper right lung", (0, 0), "no side or zone"),  # both directions named: no cue
    ("clear lungs", (0, 0), "no side or zone"),
])
def test_location_words_give_the_patients_side_and_zone(text, cue, said):
    locations = load_locations()
    assert locations.cue(text) == cue and locations.describe(text) == said


@pytest.mark.parametrize("text, mirrored", [
    ("a single ground-glass opacity in the right lower lung", "a single ground-glass opacity in the left lower lung"),
    ("Left-sided effusions noted", "Right-sided effusions noted"),
    ("LEFT base and the leftover right apex", "RIGHT base and the leftover left apex"),
    ("bilateral consolidation, two areas", "bilateral consolidation, two areas"),
    ("lower left lung and upper right lung", "lower right lung and upper left lung"),
    ("dextral opacity", "sinistral opacity"),
    ("LEFTS and rights, left's", "RIGHTS and lefts, right's"),
])
def test_a_mirrored_line_names_the_other_side_and_keeps_everything_else(text, mirrored):
    locations = load_locations()
    assert locations.mirrored(text) == mirrored
    side, zone = locations.cue(text)
    assert locations.cue(mirrored) == (-side, zone)
    assert locations.mirrored(mirrored) == text


def test_flip_averaging_asks_the_mirrored_slice_the_line_with_its_sides_swapped():
    """A model reading the patient's sides averages each slice with its mirror asked the side-swapped line: an image
    and a line, and the mirrored image with the swapped line, give mirrored maps; a model reading sides on an engine
    that cannot swap them is refused with the fix."""
    import numpy as np

    from CLIPSegLib.engines.contract import Engine, Preprocessing, PromptReading
    from CLIPSegLib.engines.tgcnet.engine import TGCNetEngine
    from CLIPSegLib.inference.pipeline import predict_maps

    sides = {"flip_average": True, "patient_sides": {"margin_mm": 10.0}}
    spec = {**TINY_TGCNET_SPEC, "network": {**TINY_TGCNET_SPEC["network"], "location": True}, "inference": sides}
    net = _net(location=True)
    _randomise(net.where)
    engine = TGCNetEngine(net, torch.device("cpu"), spec)
    state = engine.encode_prompts(["GGO in the right lower lung", "bilateral consolidation, two areas"])
    mirrored = engine.mirror_prompts(state)
    assert mirrored.prompts == ["GGO in the left lower lung", "bilateral consolidation, two areas"]
    assert [r.side for r in mirrored.readings] == [1, 0] and [r.side for r in state.readings] == [-1, 0]
    vol = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    maps, presence = predict_maps(engine, vol, state, slice_axis=2)
    other, other_presence = predict_maps(engine, vol[..., ::-1].copy(), mirrored, slice_axis=2)
    np.testing.assert_allclose(maps, other[..., ::-1], atol=1e-5)
    np.testing.assert_allclose(presence, other_presence, atol=1e-5)
    plain, _ = predict_maps(engine, vol, state, slice_axis=2, flip_average=False)
    assert not np.allclose(maps[0], plain[0], atol=1e-4)  # the mirrored pass is averaged in
    thyroid = TGCNetEngine(net, torch.device("cpu"), {**spec, "inference": {"flip_average": True}})  # no sides read
    assert thyroid.mirror_prompts(thyroid.encode_prompts(["left nodule"])).prompts == ["left nodule"]

    class Words(Engine):
        name = "words"

        def encode_texts(self, texts):
            return None, [PromptReading(t, tuple(t.split())) for t in texts]

        def infer(self, slices, state):
            return torch.zeros(len(slices), len(state), *slices.shape[-2:]), None

    words = Words({"id": "w", "inference": sides}, "cpu", "fp32", Preprocessing(32))
    with pytest.raises(ModelError, match="cannot swap a prompt's side words .* set inference.flip_average to false"):
        predict_maps(words, vol, ["left cyst"], slice_axis=2)
    no_sides = Words({"inference": {"flip_average": True}}, "cpu", "fp32", Preprocessing(32))
    assert no_sides.mirror_prompts(no_sides.encode_prompts(["left cyst"])).prompts == ["left cyst"]


def test_a_broken_location_words_file_is_named_with_the_fix(tmp_path):
    path = tmp_path / "locations.json"
    path.write_text('{"side": {"left": ["left"], "sideways": ["x"]}, "zone": {}}', encoding="utf-8")
    with pytest.raises(ModelError, match="'side' must map left, right, both to lists of words") as e:
        load_locations(path)
    assert str(path) in str(e.value)


def test_cue_maps_point_toward_the_named_side_in_the_slice_frame():
    maps = cue_maps(torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]]), 4)
    assert maps.shape == (3, 2, 4, 4)
    assert (maps[0, 0, :, 2:] > 0).all() and (maps[0, 0, :, :2] < 0).all()  # left: the columns toward +I
    assert (maps[1, 0, :, :2] > 0).all() and (maps[1, 1, 2:] > 0).all()  # right: columns toward -I; lower: rows
    assert not maps[2].any() and not maps[0, 1].any()


def test_the_location_cue_changes_masks_and_presence_and_is_off_in_older_networks():
    """The same text embedding with the side cue flipped gives other masks and presence (the cue is not an identity);
    a network without the entry (every model trained before it) has no cue parameters and ignores ``where``."""
    net = _net(location=True)
    _randomise(net.where)
    x = _images()
    with torch.no_grad():
        text = net.encode_text(PROMPTS)
        assert text.where.tolist() == [[-1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
        mask, presence, _ = net(x, text)
        text.where = text.where * torch.tensor([-1.0, 1.0])  # "left" where it said "right"
        flipped, flipped_presence, _ = net(x, text)
    assert not torch.allclose(mask[:, 0], flipped[:, 0], atol=1e-4)
    assert not torch.allclose(presence[:, 0], flipped_presence[:, 0], atol=1e-4)
    assert torch.allclose(mask[:, 1:], flipped[:, 1:])  # prompts without a side cue unchanged
    old = _net()
    assert old.where is None and old.locations is None and old.encode_text(PROMPTS).where is None


def test_location_support_holds_a_located_line_to_its_kinds_own_map():
    """With ``inference.location_support`` a line naming a side is the minimum of its own map and the map of its kind
    alone ("<kind> present"), and its reading says so; lines without a side or zone, and models without the entry,
    are unchanged."""
    from CLIPSegLib.engines.tgcnet.engine import TGCNetEngine

    spec = {**TINY_TGCNET_SPEC, "network": {**TINY_TGCNET_SPEC["network"], "location": True}}
    net = _net(location=True)
    _randomise(net.where)
    x = _images()
    plain = TGCNetEngine(net, torch.device("cpu"), spec)
    backed = TGCNetEngine(net, torch.device("cpu"), {**spec, "inference": {"location_support": True}})
    prompts = ["GGO in the right lower lung", "bilateral consolidation, two areas", "ground-glass opacity present"]
    own, own_presence = plain.predict(x, plain.encode_prompts(prompts))
    state = backed.encode_prompts(prompts)
    mask, presence = backed.predict(x, state)
    assert mask.shape == own.shape and torch.equal(presence, own_presence)
    assert torch.allclose(mask[:, 0], torch.minimum(own[:, 0], own[:, 2]))
    assert not torch.allclose(mask[:, 0], own[:, 0])  # the kind's own map lowers it somewhere
    assert torch.equal(mask[:, 1:], own[:, 1:])
    assert state.readings[0].knowledge[-1] == "location backed by the map of 'ground-glass opacity present'"
    assert not any("backed" in k for k in state.readings[1].knowledge)
    with pytest.raises(ModelError, match="needs a network with the location cue and DATE"):
        TGCNetEngine(_net(), torch.device("cpu"), {**TINY_TGCNET_SPEC, "inference": {"location_support": True}})
    backed.clear_prompt_cache()
    alone, _ = backed.predict(x, backed.encode_prompts(prompts[:1]))  # the kind's line encoded as an extra
    assert alone.shape[1] == 1
    assert torch.allclose(alone[:, 0], mask[:, 0], atol=1e-6)
