"""The MedCLIP-SAM engine (``engines.medclipsam.engine``) on the tiny BiomedCLIP folder + a small SAM, through the
pipeline and the CLI: geometry, the slice vote, the presence rule and its reason, one SAM embedding per slice, the
cliptnseg model's CLIP reused. With random weights masks are arbitrary; where a test needs a known map, saliency and
SAM are replaced by stand-ins that follow the image (the engine's own box and vote logic still runs)."""

import json
import shutil

import numpy as np
import pytest
import slicerio
import torch

from CLIPSegLib.cli import main
from CLIPSegLib.engines import create_engine
from CLIPSegLib.engines.medclipsam import engine as engine_module
from CLIPSegLib.engines.medclipsam.sam import SamOutput
from CLIPSegLib.errors import ModelError
from CLIPSegLib.inference.pipeline import segment_volume
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.models import load_spec

from conftest import TINY_SPEC, write_tiny_medclipsam

GEOMETRY = Geometry.axis_aligned((2.0, 0.5, 0.5))  # K, J, I: slices along K


@pytest.fixture
def build(tiny_medclipsam):
    """build(**spec entries) -> the tiny engine on CPU."""
    def make(**entries):
        spec = {**load_spec(tiny_medclipsam), **entries}
        return create_engine(spec, torch.device("cpu"))
    return make


def follow_the_image(engine, monkeypatch):
    """Saliency = the slice's own intensity (bright is salient) and SAM = its box filled with probability 0.9."""
    def bright(clip, images, text, *args, **kwargs):
        grey = images.mean(1, keepdim=True)
        return ((grey - grey.amin((2, 3), keepdim=True)) /
                (grey.amax((2, 3), keepdim=True) - grey.amin((2, 3), keepdim=True) + 1e-8)).expand(-1, len(text),
                                                                                                 -1, -1)

    def filled(slices, boxes, points=None, labels=None, precision="fp32"):
        h, w = slices.shape[-2:]
        out = []
        for bx in boxes:
            m = torch.zeros(len(bx), h, w)
            for j, (x0, y0, x1, y1) in enumerate(bx.round().long().tolist()):
                m[j, y0:y1 + 1, x0:x1 + 1] = 0.9
            out.append(SamOutput(m, torch.ones(len(bx))))
        return out

    monkeypatch.setattr(engine_module, "saliency", bright)
    monkeypatch.setattr(engine.sam, "segment", filled)


def volume_with_a_stray_blob():
    """[8,48,48] dark (a slice without anything bright is constant: the pipeline skips it); a bright 12 x 12 square
    on slices 2-5 and a bright 10 x 10 blob on slice 7 alone."""
    v = np.full((8, 48, 48), 0.1, dtype=np.float32)
    v[2:6, 10:22, 10:22] = 1.0
    v[7, 30:40, 30:40] = 1.0
    return v


def test_masks_have_the_volume_shape_and_probabilities_the_grid(build):
    engine = build()
    volume = np.random.default_rng(1).random((3, 40, 56)).astype(np.float32)
    result = segment_volume(engine, volume, GEOMETRY, ["thyroid nodule", "cyst"], keep_probabilities=True)
    assert [f.mask.shape for f in result.findings] == [(3, 40, 56)] * 2 and result.slice_axis == 2
    assert result.probabilities.shape == (2, 3, 40, 56) and np.isfinite(result.probabilities).all()
    assert all(0.0 <= f.info["presence_peak"] <= 1.0 for f in result.findings)


def test_a_blob_on_one_stray_slice_is_voted_out_and_the_finding_kept(build, monkeypatch):
    voted, unvoted = build(), build(inference={"slice_vote": 1})
    for e in (voted, unvoted):
        follow_the_image(e, monkeypatch)
    volume = volume_with_a_stray_blob()
    kept = segment_volume(voted, volume, GEOMETRY, ["bright lesion"], axis=2).findings[0]
    raw = segment_volume(unvoted, volume, GEOMETRY, ["bright lesion"], axis=2).findings[0]
    assert raw.mask[7, 30:40, 30:40].all()  # without the vote the stray slice makes an island
    assert kept.found and not kept.mask[7].any() and not kept.mask[:, 26:, 26:].any()
    assert kept.mask[2:6, 11:21, 11:21].all() and not kept.mask[[0, 1, 6]].any()


def test_a_prompt_below_the_presence_rule_is_empty_with_the_reason_and_runs_no_sam(build):
    volume = np.random.default_rng(2).random((3, 48, 48)).astype(np.float32)
    peak = segment_volume(build(), volume, GEOMETRY, ["thyroid nodule"]).findings[0].info["presence_peak"]
    assert peak < 0.99
    rule = {**load_spec_presence(build()), "min_slice_presence": round(peak + 0.01, 4)}
    engine = build(presence=rule)
    calls = []
    engine.sam.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    finding = segment_volume(engine, volume, GEOMETRY, ["thyroid nodule"]).findings[0]
    assert not finding.found and not finding.mask.any() and finding.status == "not found"
    assert "presence score for this finding stays below its rule on every slice" in finding.message()
    assert f"{peak:.2f} < {peak + 0.01:.2f}" in finding.message() and finding.event()["presence_peak"] == peak
    assert calls == []  # every slice below the rule: neither saliency nor SAM ran


def load_spec_presence(engine):
    return dict(engine.spec["presence"])


def test_each_slice_is_embedded_once_per_call_whatever_the_number_of_prompts(build, monkeypatch):
    engine = build(saliency={"method": "gscorecam", "topk": 8, "batch_size": 8})  # the paper's saliency
    calls = []
    engine.sam.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    state = engine.encode_prompts(["thyroid nodule", "cyst", "bright lesion"])
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    probs, presence = engine.predict(x, state)
    assert probs.shape == (2, 3, 48, 48) and presence.shape == (2, 3)
    assert len(calls) == 1 and calls[0] <= 2  # one encoder pass over the slices that have a box
    calls.clear()
    follow_the_image(engine, monkeypatch)  # SAM replaced: nothing reaches its encoder
    engine.predict(x, state)
    assert calls == []


def test_gscorecam_runs_once_per_set_of_wanted_prompts_with_the_maps_it_gave_prompt_by_prompt(build, monkeypatch):
    """A slice's wanted prompts go to the saliency together (gScoreCAM then scores a channel in several prompts'
    top-k once, ``test_medclipsam_saliency``); the boxes are those of one call per prompt."""
    engine = build(saliency={"method": "gscorecam", "topk": 8, "batch_size": 8})
    state = engine.encode_prompts(["thyroid nodule", "cyst", "bright lesion"])
    images = engine.clip.normalize(torch.rand(3, 1, 48, 48, generator=torch.Generator().manual_seed(0)))
    wanted = torch.tensor([[True, True, False], [True, True, False], [False, True, True]])
    together = engine.boxes_of(images, state.embeddings, wanted, 48)
    calls = []
    original = engine_module.saliency
    monkeypatch.setattr(engine_module, "saliency", lambda clip, im, text, *a, **k: calls.append(
        (im.shape[0], text.shape[0])) or original(clip, im, text, *a, **k))

    def rounded(found):
        return [[(p, tuple(np.round(np.asarray(b, float), 3))) for p, b in f] for f in found]  # order kept

    assert rounded(engine.boxes_of(images, state.embeddings, wanted, 48)) == rounded(together)
    assert calls == [(2, 2), (1, 2)]  # slices 0-1 with prompts 0 and 1; slice 2 with prompts 1 and 2
    one = [[] for _ in range(3)]
    for p in range(3):  # prompt by prompt, as before
        only = torch.zeros_like(wanted)
        only[:, p] = wanted[:, p]
        for b, boxes in enumerate(engine.boxes_of(images, state.embeddings, only, 48)):
            one[b] += boxes
    assert rounded(one) == rounded(together) and sum(map(len, together)) >= 3  # not vacuous: boxes were cut


def test_patch_similarity_makes_one_clip_image_pass_per_batch_for_presence_and_every_prompt(build):
    engine = build(saliency={"method": "patch_similarity"})
    calls = []
    engine.clip.model.visual.trunk.patch_embed.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    state = engine.encode_prompts(["thyroid nodule", "cyst", "bright lesion"])
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    probs, presence = engine.predict(x, state)
    assert probs.shape == (2, 3, 48, 48) and presence.shape == (2, 3) and torch.isfinite(probs).all()
    assert calls == [2]  # the two slices once, whatever the number of prompts


@pytest.mark.parametrize("method", ["gscorecam", "patch_similarity"])
def test_bf16_runs_the_image_passes_in_bf16_and_gives_float32_maps(method, tiny_medclipsam):
    """bf16: CLIP's image tower (gScoreCAM's masked copies; patch_similarity's one pass) and SAM's image encoder
    run a bfloat16 copy of their weights under autocast (frozen float32 weights under CPU autocast are slower than
    fp32); gScoreCAM's gradient pass (the CLIP's own weights), the maps and the masks stay float32."""
    spec = {**load_spec(tiny_medclipsam), "saliency": {"method": method, "topk": 8, "batch_size": 8}}
    engine = create_engine(spec, torch.device("cpu"), precision="bf16")
    fast, own, sam_dtypes = [], [], []
    assert engine.fast_clip is not engine.clip.model and engine.fast_clip.visual.trunk.blocks[0].mlp.fc1.weight.dtype \
        == torch.bfloat16 and engine.clip.model.visual.trunk.blocks[0].mlp.fc1.weight.dtype == torch.float32
    engine.fast_clip.visual.trunk.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: fast.append(o.dtype))
    engine.clip.model.visual.trunk.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: own.append(o.dtype))
    encoder = engine.sam.encoder("bf16")
    assert encoder is not engine.sam.sam.image_encoder and encoder is engine.sam.encoder("bf16")  # made once
    encoder.blocks[0].mlp.lin1.register_forward_hook(lambda m, i, o: sam_dtypes.append(o.dtype))
    state = engine.encode_prompts(["thyroid nodule", "cyst"])
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    probs, presence = engine.predict(x, state)
    assert probs.dtype == torch.float32 and probs.shape == (2, 2, 48, 48) and torch.isfinite(probs).all()
    assert fast and set(fast) == {torch.bfloat16}
    assert set(own) == ({torch.float32} if method == "gscorecam" else set())  # the gradient pass, slice presence
    sam_dtypes.clear()
    assert engine.sam.embed(x, "bf16").dtype == torch.float32 and sam_dtypes == [torch.bfloat16]
    fp32 = create_engine(spec, torch.device("cpu"))
    hooked = []
    fp32.clip.model.visual.trunk.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: hooked.append(o.dtype))
    fp32.predict(x, fp32.encode_prompts(["thyroid nodule", "cyst"]))
    assert set(hooked) == {torch.float32}


def test_patch_presence_is_the_patch_maps_own_slice_probability(build):
    """slice_presence "patches": a slice's presence is sigmoid(PATCH_SCALE x the mean of its PATCH_TOP best patches)
    of the same patch similarity the boxes come from, not CLIP's pooled image-text score; other methods refuse it."""
    from CLIPSegLib.engines.medclipsam.saliency import PATCH_SCALE, PATCH_TOP, dense_features, patch_similarity

    image_way = build(saliency={"method": "patch_similarity"})
    engine = build(saliency={"method": "patch_similarity", "slice_presence": "patches"})
    state = engine.encode_prompts(["thyroid nodule", "cyst"])
    x = torch.rand(3, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    _, presence = engine.predict(x, state)
    with torch.no_grad():
        _, dense = dense_features(engine.clip.model, engine.clip.normalize(x))
        sim = patch_similarity(dense, state.embeddings, engine.neutral_embeddings()).flatten(2)
    expected = torch.sigmoid(PATCH_SCALE * sim.topk(PATCH_TOP, dim=-1).values.mean(-1))
    torch.testing.assert_close(presence, expected)
    assert not torch.allclose(presence, image_way.predict(x, state)[1])
    with pytest.raises(ModelError, match="slice_presence 'patches' is image, or patches with the patch_similarity"):
        build(saliency={"method": "gradcam", "slice_presence": "patches"})


def test_the_cliptnseg_models_clip_is_reused_as_the_clip(tiny_model, tiny_biomedclip, tmp_path):
    """A medclipsam spec whose CLIP is the cliptnseg model's (its clip config, the clip.* tensors of its file)."""
    from CLIPSegLib.models import load_weights

    shutil.copy(tiny_model.with_suffix(".safetensors"), tmp_path)
    path = write_tiny_medclipsam(tmp_path, tiny_biomedclip, input_size=32, id="reuse")
    spec = json.loads(path.read_text())
    clip_file = tiny_model.with_suffix(".safetensors").name
    cliptnseg = json.loads(tiny_model.read_text())["files"][0]
    spec["clip"] = dict(TINY_SPEC["clip"])
    spec["files"].append(cliptnseg)
    path.write_text(json.dumps(spec))
    engine = create_engine(load_spec(path), torch.device("cpu"))
    theirs = load_weights(load_spec(tiny_model))
    own = engine.clip.model.state_dict()
    assert all(torch.equal(own[k], theirs["clip." + k]) for k in own) and clip_file in [f["name"] for f in spec["files"]]
    reading = engine.encode_prompts(["anechoic cyst"]).readings[0]
    assert reading.read_as == "anechoic cyst" and not reading.truncated  # open_clip's BPE, the CLIP's own
    probs, presence = engine.predict(torch.rand(2, 1, 32, 32), engine.encode_prompts(["cyst"]))
    assert probs.shape == (2, 1, 32, 32) and presence.shape == (2, 1)


def test_a_sam_of_another_size_or_none_at_all_is_named(tiny_medclipsam):
    spec = load_spec(tiny_medclipsam)
    with pytest.raises(ModelError, match=r"is a SAM of custom size \(embed dim 32, 2 blocks\), not the vit_b"):
        create_engine({**spec, "sam": {**spec["sam"], "type": "vit_b"}}, torch.device("cpu"))
    with pytest.raises(ModelError, match="sam names no checkpoint or part and its files hold no 'sam.' tensors"):
        create_engine({**spec, "files": []}, torch.device("cpu"))
    with pytest.raises(ModelError, match="saliency method 'm2ib'"):
        create_engine({**spec, "saliency": {"method": "m2ib"}}, torch.device("cpu"))


def test_clipseg_segment_runs_a_medclipsam_model_end_to_end(phantom_file, tiny_medclipsam, tmp_path, capsys):
    path, ph, geometry = phantom_file
    out = tmp_path / "out.seg.nrrd"
    code = main([str(a) for a in ["segment", path, "--prompt", "thyroid nodule", "--prompt", "cyst", "--output", out,
                                  "--model", tiny_medclipsam, "--device", "cpu", "--progress", "none"]])
    err = capsys.readouterr().err
    assert code == 0, err
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["thyroid nodule", "cyst"]
    np.testing.assert_allclose(seg["ijkToLPS"], geometry.ijk_to_lps(), atol=1e-5)
    assert seg["voxels"].shape[-3:] == ph.image.shape[::-1]
    assert "'thyroid nodule'" in err and "'cyst'" in err


def test_the_slice_vote_keeps_two_slice_findings_drops_one_slice_blobs_even_at_the_ends_and_leaves_2d_alone():
    from CLIPSegLib.inference.postprocess import slice_vote

    p = np.zeros((6, 4, 4), np.float32)
    p[0, 0, 0] = 0.9  # stray at the first slice
    p[4:6, 2, 2] = 0.8  # two slices at the far end
    p[2, 1, 1] = 0.9  # stray inside
    voted = slice_vote(p, 0, 3)
    assert voted[0, 0, 0] == 0 and voted[2, 1, 1] == 0 and (voted[4:6, 2, 2] == 0.8).all()
    flat = np.random.default_rng(0).random((1, 5, 5)).astype(np.float32)
    assert np.array_equal(slice_vote(flat, 0, 3), flat) and np.array_equal(slice_vote(p, 0, 1), p)


@pytest.mark.parametrize("case", ["slice presence alone", "presence clip alone"])
def test_a_presence_clip_and_its_slice_presence_go_together(build, tiny_medclipsam, case):
    entries = ({"saliency": {"method": "gradcam", "slice_presence": "presence_clip"}} if case == "slice presence alone"
               else {"presence_clip": load_spec(tiny_medclipsam)["clip"]})  # the same folder CLIP, loaded twice
    with pytest.raises(ModelError, match="presence_clip entry and slice_presence 'presence_clip' go together"):
        build(**entries)
    if case == "presence clip alone":  # with both, the engine reads presence from it
        engine = build(saliency={"method": "gradcam", "slice_presence": "presence_clip"}, **entries)
        assert engine.presence_clip is not None and engine.presence_clip.model is not engine.clip.model
        with torch.no_grad():
            engine.presence_clip.model.logit_scale.add_(1.0)  # the same CLIP but for a sharper presence
        x = torch.rand(2, 1, engine.preprocessing.input_size, engine.preprocessing.input_size)
        prompts = engine.encode_prompts(["nodule", "cyst"])
        _, presence = engine.predict(x, prompts)
        with torch.inference_mode():
            own = engine.slice_presence(engine.clip.normalize(x), prompts.embeddings)
            torch.testing.assert_close(presence, engine.presence_of(x, prompts.prompts))
        assert not torch.allclose(presence, own, atol=1e-4)


def test_an_even_slice_vote_is_refused(build):
    engine = build(inference={"slice_vote": 2})
    with pytest.raises(ModelError, match="inference.slice_vote 2 must be an odd number of slices"):
        segment_volume(engine, np.random.default_rng(0).random((3, 16, 16)).astype(np.float32), GEOMETRY, ["cyst"])


def test_a_sam_registry_part_is_hashed_before_it_is_loaded(tiny_medclipsam, tmp_path, monkeypatch):
    import hashlib

    from CLIPSegLib.engines.medclipsam.sam import build_sam, sam_sizes
    from CLIPSegLib.models import store

    from conftest import TINY_SAM

    home = tmp_path / "home"
    (home / "tiny-sam").mkdir(parents=True)
    checkpoint = home / "tiny-sam" / "sam_tiny.pth"
    torch.manual_seed(1)
    sam = build_sam(sam_sizes(TINY_SAM))
    torch.save(sam.state_dict(), checkpoint)
    registry = json.loads(store.REGISTRY.read_text(encoding="utf-8"))
    registry["models"].append({"id": "tiny-sam", "engine": "medclipsam", "role": "sam", "license": "MIT",
                               "citation": "", "description": "a tiny random SAM",
                               "files": [{"name": checkpoint.name, "url": "https://example.invalid/sam_tiny.pth",
                                          "size": checkpoint.stat().st_size,
                                          "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}]})
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(registry), encoding="utf-8")
    monkeypatch.setattr(store, "REGISTRY", path)
    monkeypatch.setenv("CLIPSEG_HOME", str(home))
    spec = {**load_spec(tiny_medclipsam), "sam": {"type": TINY_SAM, "part": "tiny-sam"}}
    engine = create_engine(spec, torch.device("cpu"))
    assert all(torch.equal(v, sam.state_dict()[k]) for k, v in engine.sam.sam.state_dict().items())
    data = bytearray(checkpoint.read_bytes())
    data[-10] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"tiny-sam: files \{'sam_tiny.pth': 'corrupt'\}.*clipseg models fetch tiny-sam"):
        create_engine(spec, torch.device("cpu"))


def test_paper_size_biomedclip_and_sam_vit_b_segment_a_small_volume(tmp_path):
    """BiomedCLIP's shape (timm ViT-B/16 at 224 + a BERT-base text tower, random weights, this project's folder
    layout) and SAM ViT-B at 1024 build from a spec and segment a 2-slice volume through the pipeline: one SAM
    embedding per slice with a box, masks on the volume's grid."""
    from conftest import write_tiny_biomedclip
    from CLIPSegLib.engines.medclipsam.sam import build_sam, sam_sizes
    from CLIPSegLib.models import write_spec

    folder = write_tiny_biomedclip(tmp_path / "biomedclip-b16", paper_size=True)
    torch.manual_seed(0)
    sam = build_sam(sam_sizes("vit_b"))
    spec = {"id": "paper-size-medclipsam", "engine": "medclipsam", "clip": {"folder": str(folder)},
            "sam": {"type": "vit_b"}, "saliency": {"method": "gradcam"}, "inference": {"slice_vote": 1},
            "presence": {"threshold": 0.5, "min_peak": 0.0, "min_extent_mm": 0.0, "min_area_mm2": 0.0,
                         "min_slice_presence": 0.0, "slice_gate": 0.0}}
    path = write_spec(spec, {f"sam.{k}": v for k, v in sam.state_dict().items()}, tmp_path / "model", half=True)
    del sam
    engine = create_engine(load_spec(path), torch.device("cpu"))
    assert engine.preprocessing.input_size == 224 and engine.sam.image_size == 1024
    # ViT-B/16 + BERT-base: 172.5 M with this 20-word vocabulary (BiomedCLIP's 30,522 words add 23 M)
    assert sum(p.numel() for p in engine.clip.model.parameters()) > 170e6
    calls = []
    engine.sam.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    volume = np.random.default_rng(0).random((2, 60, 80)).astype(np.float32)
    volume[:, 20:40, 30:50] += 2.0
    finding = segment_volume(engine, volume, GEOMETRY, ["thyroid nodule"]).findings[0]
    assert finding.mask.shape == (2, 60, 80) and finding.info["interpreted_as"].startswith("interpreted as")
    assert 1 <= sum(c[0] for c in calls) <= 2 and all(c[-2:] == (1024, 1024) for c in calls)
