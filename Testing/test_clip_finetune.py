"""``clipseg finetune-clip`` (``training.clip_finetune``) on a tiny open_clip CLIP and tiny data in tmp_path: the
loss goes down (DHN-NCE and the dense term), the exported model loads as a medclipsam engine with the tuned CLIP,
LoRA merges, bad input is named, a stopped run resumes."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CLIPSegLib.cli import main
from CLIPSegLib.engines import create_engine
from CLIPSegLib.engines.medclipsam.clip_model import load_clip
from CLIPSegLib.engines.medclipsam.saliency import saliency
from CLIPSegLib.errors import ModelError
from CLIPSegLib.models import load_spec, load_weights, write_spec
from CLIPSegLib.training import clip_finetune as cf
from CLIPSegLib.training.datasets import collate
from CLIPSegLib.training.loop import Recipe, run_loop

from conftest import TINY_SAM, TINY_SPEC

S, SQ = 32, 12
WORDS = ["nodule", "cyst", "lesion", "tumor", "mass", "calcification", "fluid", "tissue"]


@pytest.fixture(scope="module")
def tiny_open(tmp_path_factory):
    """A medclipsam spec whose CLIP is TINY_SPEC's open_clip config (32 px, 4 x 4 patches) and SAM TINY_SAM."""
    from CLIPSegLib.engines.clip_backbone import build_clip
    from CLIPSegLib.engines.medclipsam.sam import build_sam, sam_sizes

    torch.manual_seed(0)
    clip, sam = build_clip(TINY_SPEC["clip"]), build_sam(sam_sizes(TINY_SAM))
    spec = {"id": "tiny-open", "engine": "medclipsam", "input_size": 32, "clip": TINY_SPEC["clip"],
            "sam": {"type": TINY_SAM}, "saliency": {"method": "gradcam"}, "boxes": {"min_area": 4},
            "presence": {"threshold": 0.5, "min_peak": 0.5, "min_extent_mm": 0.0, "min_area_mm2": 0.0,
                         "min_slice_presence": 0.0}, "files": []}
    weights = {**{f"clip.{k}": v for k, v in clip.state_dict().items()},
               **{f"sam.{k}": v for k, v in sam.state_dict().items()}}
    return write_spec(spec, weights, tmp_path_factory.mktemp("tiny-open"), half=False)


def caption_csv(folder, n=8, rows=None):
    """n PNGs (a bright square at a different place each) and a CSV image,caption with a distinct caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((S, S), 40, np.uint8)
        r, c = divmod(i, 4)
        a[2 + 14 * r:2 + 14 * r + SQ, 1 + 7 * c:1 + 7 * c + SQ // 2] = 220
        sitk.WriteImage(sitk.GetImageFromArray(a), str(folder / f"{i}.png"))
    lines = rows if rows is not None else ["image,caption"] + [f"{i}.png,{WORDS[i]}" for i in range(n)]
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "pairs.csv"


def squares(n, g, absent_every=0, side=SQ):
    """Samples (image [1,S,S], ["caption", "nodule"], masks [2,S,S]) with a bright square of ``side`` px at a random
    place; with ``absent_every`` k, every k-th sample has none (empty masks)."""
    out = []
    for i in range(n):
        x = 0.2 + 0.05 * torch.rand(1, S, S, generator=g)
        r, c = torch.randint(0, S - side + 1, (2,), generator=g).tolist()
        m = torch.zeros(S, S)
        if not (absent_every and i % absent_every == 0):
            m[r:r + side, c:c + side] = 1
        x[0][m > 0] = 0.9
        out.append((x, [WORDS[len(out) % len(WORDS)], "nodule"], torch.stack([m, m])))
    return out


def _clip(tiny_open):
    spec = load_spec(tiny_open)
    return load_clip(spec, load_weights(spec), torch.device("cpu"))


def test_last_trains_the_last_blocks_and_the_projections_only(tiny_open):
    tuner = cf.Tuner(_clip(tiny_open), "last", blocks=1)
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in tuner.names)
    assert {"visual.proj", "visual.ln_post.weight", "text_projection", "ln_final.weight"} <= set(tuner.names)
    assert not any("visual.transformer.resblocks.0." in n or "embedding" in n or n == "logit_scale"
                   for n in tuner.names)
    assert all(p.requires_grad == (n in tuner.names) for n, p in tuner.clip.model.named_parameters())


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_a_few_steps_lower_the_loss(tiny_open, tmp_path, trainable):
    clip = _clip(tiny_open)
    data = cf.CaptionTable(caption_csv(tmp_path / "d"), clip.image_size)
    tuner = cf.Tuner(clip, trainable, blocks=1, lora_rank=4)
    loss = cf.clip_loss_fn(clip, ["normal tissue"])
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        before = loss(batch).item()
    recipe = Recipe("clip", [{"params": tuner.params, "lr": 1e-2}], loss, tuner.state, tuner.load, tuner.train)
    run_loop(recipe, data, 12, tmp_path / "ck.pt", batch_size=8)
    with torch.no_grad():
        after = loss(batch).item()
    assert after < before - 0.2, (before, after)
    merged = tuner.merged()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loss(batch).item(), after, atol=1e-4, rtol=1e-4)  # merging keeps what was learnt


def test_the_multiple_instance_loss_wants_a_few_patches_lit_where_the_caption_says_and_none_elsewhere():
    present = torch.tensor([True, False])
    good = torch.full((2, 8, 8), -6.0)
    good[0, 2:4, 2:4] = 6.0  # 4 patches of the slice holding the finding
    lit_everywhere = good.clone()
    lit_everywhere[0] = 6.0  # the whole slice lit: its lowest half should be background
    wrong_slice = good.flip(0)  # lit on the slice without the finding, dark on the one with it
    loss = lambda x: float(cf.mil_loss(x, present, top=4))  # noqa: E731
    assert loss(good) < 0.05
    assert loss(lit_everywhere) > 1.0 and loss(wrong_slice) > 5.0
    assert float(cf.mil_loss(good[1:], present[1:])) < 0.01  # only absent pairs: no positive term


def test_a_caption_trained_patch_term_makes_a_model_read_presence_from_the_patches(tiny_open, tmp_path):
    spec, state = load_spec(tiny_open), load_weights(load_spec(tiny_open))
    clip = _clip(tiny_open)
    base = {"parent": {"id": "tiny-open"}, "dense_weight": 1.0, "loss": "DHN-NCE + patch MIL from captions"}
    read = {}
    for name, training in (("caption", {**base, "dense_labels": "caption", "data": {"phantoms": 8}}),
                           ("mask", {**base, "dense_labels": "mask", "data": {"phantoms": 8}}),
                           ("csv", {**base, "dense_labels": "caption", "data": {"csv": "x.csv"}})):
        path = cf.export(clip.model, spec["clip"], spec, state, tmp_path, name, training)
        read[name] = load_spec(path)["saliency"]["slice_presence"]
    assert read == {"caption": "patches", "mask": "image", "csv": "image"}


def test_balanced_bce_averages_each_side_apart_and_skips_an_empty_side():
    logits, target = torch.tensor([2.0, -1.0, 0.5, 3.0]), torch.tensor([True, False, False, False])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    assert torch.isclose(cf.balanced_bce(logits, target), bce[0] + bce[1:].mean())
    assert torch.isclose(cf.balanced_bce(logits, target, (True,)), bce[0])
    assert torch.isclose(cf.balanced_bce(logits, torch.ones(4, dtype=torch.bool)),
                         torch.nn.functional.softplus(-logits).mean())  # no negatives: the positives' mean alone
    assert float(cf.balanced_bce(logits[:0], target[:0])) == 0.0


def test_the_mask_term_stays_finite_when_a_finding_fills_every_patch(tiny_open):
    """A finding covering the whole slice leaves the patch term no negatives: that side adds nothing (it was NaN)."""
    clip = _clip(tiny_open)
    loss = cf.clip_loss_fn(clip, ["normal tissue"], 1.0, dense_labels="mask")(
        collate(squares(4, torch.Generator().manual_seed(0), side=S)))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in clip.model.parameters() if p.grad is not None)


def test_without_the_absent_bag_the_slices_without_the_finding_lose_only_their_slice_score():
    present = torch.tensor([True, False])
    x = torch.full((2, 8, 8), -6.0)
    x[0, 2:4, 2:4] = 6.0
    x[1, 5:7, 5:7] = 3.0  # the slice without the finding lit in 4 patches
    bag = x[1].flatten().sort().values[-4:].mean()
    gap = float(cf.mil_loss(x, present, top=4)) - float(cf.mil_loss(x, present, top=4, absent_bag=False))
    assert gap == pytest.approx(float(torch.nn.functional.softplus(bag)), rel=1e-5)  # BCE of its bag against 0
    assert float(cf.mil_loss(x, present, top=4, absent_bag=False)) > float(cf.mil_loss(
        torch.where(x == 3.0, -6.0, x), present, top=4, absent_bag=False)) + 0.05  # its patches stay negatives


def test_presence_from_carries_another_clip_that_gives_the_slice_presence(tiny_open, tmp_path, capsys):
    from CLIPSegLib.engines.clip_backbone import build_clip

    torch.manual_seed(7)  # a presence CLIP with other weights than the tuned one
    other = build_clip(TINY_SPEC["clip"])
    ospec = {k: v for k, v in {**load_spec(tiny_open), "id": "other-clip", "files": []}.items()
             if not k.startswith("_")}
    other_path = write_spec(ospec, {f"clip.{k}": v for k, v in other.state_dict().items()}, tmp_path / "o",
                            half=False)
    code = main(["finetune-clip", "--from", str(tiny_open), "--presence-from", str(other_path), "--data",
                 str(caption_csv(tmp_path / "d")), "--output-dir", str(tmp_path / "out"), "--model-id", "where",
                 "--steps", "2", "--batch-size", "4", "--work-dir", str(tmp_path / "w"), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    spec = load_spec(tmp_path / "out" / "where.json")
    assert spec["saliency"]["slice_presence"] == "presence_clip" and "--presence-from" in spec["training"]["command"]
    assert spec["presence_clip"] == {"model": str(other_path.resolve()), "files": [
        {"name": f["name"], "sha256": f["sha256"]} for f in load_spec(other_path)["files"]]}  # referenced, not copied
    assert not any(k.startswith("presence_clip.") for k in load_weights(spec))
    engine = create_engine(spec, torch.device("cpu"))
    slices = torch.rand(3, 1, 32, 32)
    prompts = engine.encode_prompts(["nodule", "cyst"])
    _, presence = engine.predict(slices, prompts)
    pc = engine.presence_clip
    with torch.inference_mode():
        own = engine.slice_presence(engine.clip.normalize(slices), prompts.embeddings)  # the tuned CLIP's reading
        image = pc.encode_image(pc.normalize(slices))
        want = engine_module_presence(pc, image, pc.encode_text(["nodule", "cyst"], "cpu"),
                                      pc.encode_text(engine.neutral, "cpu"))
    torch.testing.assert_close(presence, want)
    assert not torch.allclose(presence, own, atol=1e-3)
    # the referenced model's weights changed after: the model is refused, naming why
    weights = {f"clip.{k}": v + 0.01 for k, v in other.state_dict().items()}
    write_spec(ospec, weights, tmp_path / "o", half=False)
    with pytest.raises(ModelError, match="no longer those it was calibrated with"):
        create_engine(load_spec(tmp_path / "out" / "where.json"), torch.device("cpu"))
    for entry, message in (({"model": str(other_path)}, "without the SHA-256 of its files"),
                           ({"model": "no-such-model", "files": []}, "no-such-model, which cannot be loaded"),
                           ("cliptnseg-phantom-small", "it is a CLIP entry like 'clip'")):
        with pytest.raises(ModelError, match=message):
            create_engine({**spec, "presence_clip": entry}, torch.device("cpu"))
    # a model with two CLIPs is no --presence-from: which one says whether would be a guess
    from CLIPSegLib.training.clip_finetune import presence_source

    with pytest.raises(ModelError, match=r"says whether with a second CLIP of its own .* comes from \(.*other"):
        presence_source(str(tmp_path / "out" / "where.json"))


def test_presence_from_leaves_the_absent_slices_bag_out_of_the_patch_term(tiny_open, tmp_path, monkeypatch):
    seen = []
    real = cf.clip_loss_fn
    monkeypatch.setattr(cf, "clip_loss_fn", lambda *a, **k: seen.append(k["absent_bag"]) or real(*a, **k))
    for presence in (None, str(tiny_open)):
        cf.finetune_clip(tmp_path / f"o{len(seen)}", tmp_path / f"w{len(seen)}", str(tiny_open), "m",
                         caption_csv(tmp_path / "d"), steps=1, batch_size=4, presence_from=presence)
    assert seen == [True, False]


def engine_module_presence(clip, image, text, neutral):
    """exp(own) / (exp(own) + sum exp(neutral)) at the CLIP's scale, written out."""
    scale = clip.model.logit_scale.exp()
    own, rival = torch.exp(scale * image @ text.T), torch.exp(scale * image @ neutral.T).sum(1, keepdim=True)
    return own / (own + rival)


@pytest.mark.parametrize("labels", ["mask", "caption"])
def test_the_dense_term_makes_patch_similarity_follow_the_finding(tiny_open, tmp_path, labels):
    """With masks, or with only whether each slice holds the square (``caption``: multiple-instance learning, a third
    of the slices without it), the patch map comes to follow the square."""
    clip = _clip(tiny_open)
    g = torch.Generator().manual_seed(0)
    if labels == "mask":
        data, probe = squares(32, g), squares(8, g)
    else:  # squares of 8 px (at most 4 of the 16 patches): the lowest half of the patches are taken as background
        data, probe = squares(48, g, absent_every=3, side=8), squares(8, g, side=8)
    neutral = ["normal tissue"]

    def contrast():
        with torch.no_grad():
            x = torch.stack([p[0] for p in probe])
            text = clip.encode_text(["nodule"], "cpu")
            sal = saliency(clip.model, clip.normalize(x), text, "patch_similarity",
                           neutral=clip.encode_text(neutral, "cpu"))[:, 0]
        m = torch.stack([p[2][1] for p in probe]) > 0
        return (sal[m].mean() - sal[~m].mean()).item()

    before = contrast()
    tuner = cf.Tuner(clip, "all")
    recipe = Recipe("clip", [{"params": tuner.params, "lr": 1e-2}], cf.clip_loss_fn(clip, neutral, 1.0,
                                                                                 dense_labels=labels),
                    tuner.state, tuner.load, tuner.train)
    losses = run_loop(recipe, data, 30, tmp_path / "ck.pt", batch_size=8)
    clip.model.eval()
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    after = contrast()
    assert after > max(0.3, before + 0.2), (before, after)


def test_the_command_writes_a_medclipsam_model_with_the_tuned_clip(tiny_open, tmp_path, capsys):
    csv_path = caption_csv(tmp_path / "d")
    out = tmp_path / "out"
    code = main(["finetune-clip", "--from", str(tiny_open), "--data", str(csv_path), "--output-dir", str(out),
                 "--model-id", "tuned", "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--work-dir",
                 str(tmp_path / "w"), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    spec = load_spec(out / "tuned.json")
    assert spec["saliency"]["method"] == "patch_similarity" and spec["training"]["parent"]["id"] == "tiny-open"
    assert "clipseg finetune-clip" in spec["training"]["command"] and spec["training"]["steps"] == 4
    new, old = load_weights(spec), load_weights(load_spec(tiny_open))
    assert any(not torch.equal(new[k], old[k]) for k in old if k.startswith("clip."))
    assert all(torch.equal(new[k], old[k].half().float()) for k in old if k.startswith("sam."))  # fp16 export
    engine = create_engine(spec, torch.device("cpu"))
    probs, presence = engine.predict(torch.rand(2, 1, 32, 32), engine.encode_prompts(["nodule", "cyst"]))
    assert probs.shape == (2, 2, 32, 32) and torch.isfinite(probs).all()


@pytest.mark.parametrize("rows, batch, message", [
    (["image,text", "0.png,nodule"], "4", "columns image,caption"),
    (["image,caption", "0.png,nodule", "1.png,  "], "4", "line 3: the caption is empty"),
    (None, "1", "at least 2 image-caption pairs"),
    (None, "16", "fewer than one batch of 16"),
])
def test_bad_input_exits_with_a_clear_message(tiny_open, tmp_path, capsys, rows, batch, message):
    csv_path = caption_csv(tmp_path / "d", rows=rows)
    code = main(["finetune-clip", "--from", str(tiny_open), "--data", str(csv_path), "--output-dir",
                 str(tmp_path / "o"), "--steps", "2", "--batch-size", batch, "--work-dir", str(tmp_path / "w"),
                 "--progress", "none"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_stopped_run_resumes_where_it_stopped(tiny_open, tmp_path):
    csv_path = caption_csv(tmp_path / "d")
    args = dict(out_dir=tmp_path / "o", work_dir=tmp_path / "w", source=str(tiny_open), model_id="r",
                data_csv=csv_path, steps=6, batch_size=4, lr=1e-3)
    assert cf.finetune_clip(**args, stop_after=3) is None
    assert torch.load(tmp_path / "w" / "clip.pt", weights_only=True)["step"] == 3
    path = cf.finetune_clip(**args)
    assert torch.load(tmp_path / "w" / "clip.pt", weights_only=True)["step"] == 6
    assert json.loads(path.read_text())["training"]["steps"] == 6
    with pytest.raises(Exception, match="other settings"):  # a checkpoint of other settings is not continued
        cf.finetune_clip(**{**args, "lr": 2e-3, "force": True})


def test_a_biomedclip_folder_is_tuned_and_exported_with_its_folder_and_hashed_tensors(tiny_biomedclip, tmp_path):
    path = cf.finetune_clip(tmp_path / "o", tmp_path / "w", str(tiny_biomedclip), "bm", caption_csv(tmp_path / "d", 4),
                            steps=2, batch_size=2, lr=1e-3, trainable="lora", lora_rank=2,
                            template=None)
    spec = load_spec(path)
    assert spec["clip"] == {"folder": str(tiny_biomedclip.resolve()), "weights_prefix": "clip."}
    assert any(k.startswith("text.transformer.") for k in (k[5:] for k in load_weights(spec) if k[:5] == "clip."))
    clip = load_clip(spec, load_weights(spec), torch.device("cpu"))  # the folder's config and tokenizer, tuned tensors
    assert clip.encode_text(["thyroid nodule"], "cpu").shape == (1, 16)


def test_augmented_phantom_captions_vary_per_access_and_their_masks_follow_the_image():
    """The same slice read twice: another image each time (strong augmentation), each finding's mask moved with it
    (still inside the image, the union channel their union); without --augment the slice as generated."""
    torch.manual_seed(0)
    plain = cf.PhantomCaptions(3, 64)
    augmented = cf.PhantomCaptions(3, 64, augment=True)
    augmented.bank.transform.set_random_state(seed=0)  # MONAI's own random state: the same draws on every run
    index = next(i for i in range(3) if plain.bank.masks[i].any())
    a, b = augmented[index], augmented[index]
    assert not torch.equal(a[0], b[0])
    torch.testing.assert_close(plain[index][0], plain[index][0])
    for image, _, masks in (a, b):
        assert image.shape == (1, 64, 64) and masks.shape == (4, 64, 64)
        torch.testing.assert_close(masks[0], masks[1:].amax(0))
    assert not torch.equal(a[2], b[2])


def test_augment_with_a_caption_table_is_refused(tiny_open, tmp_path, capsys):
    code = main(["finetune-clip", "--from", str(tiny_open), "--data", str(caption_csv(tmp_path / "d")), "--augment",
                 "--output-dir", str(tmp_path / "o"), "--steps", "2", "--batch-size", "4", "--work-dir",
                 str(tmp_path / "w"), "--progress", "none"])
    assert code == 2 and "--augment applies to phantom captions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_exported_model_keeps_the_training_phrases_of_its_source_else_of_its_template(tiny_open, tmp_path):
    template = {"training": {"phrases": ["thyroid nodule", "anechoic cyst"]}}
    assert cf._phrases(None, template) == ["thyroid nodule", "anechoic cyst"]
    assert cf._phrases(str(tmp_path), template) == ["thyroid nodule", "anechoic cyst"]  # a folder records none
    spec = {k: v for k, v in load_spec(tiny_open).items() if not k.startswith("_")}
    for training, want in (({"phrases": ["nodule"]}, ["nodule"]), ({"phrases": []}, []), (None, template["training"][
            "phrases"])):
        path = tmp_path / f"s{len(str(training))}.json"
        path.write_text(json.dumps({**spec, "training": training}))
        for f in spec["files"]:
            (tmp_path / f["name"]).write_bytes((tiny_open.parent / f["name"]).read_bytes())
        assert cf._phrases(str(path), template) == want


def test_the_presence_term_teaches_the_score_the_engine_reads_to_tell_slices_with_the_finding(tiny_open, tmp_path):
    from CLIPSegLib.engines.medclipsam.engine import _presence

    data = squares(32, torch.Generator().manual_seed(3), absent_every=2)
    batch = collate(data)
    present = torch.tensor([bool(m.any()) for _, _, m in data])
    neutral = ["normal tissue", "a medical image"]

    def trained_gap(weight):  # after 30 steps: mean engine presence of "nodule" on slices with the square - without
        clip = _clip(tiny_open)
        tuner = cf.Tuner(clip, "all")
        loss = cf.clip_loss_fn(clip, neutral, dense_weight=0.0, presence_weight=weight)
        recipe = Recipe("clip", [{"params": tuner.params, "lr": 1e-2}], loss, tuner.state, tuner.load, tuner.train)
        run_loop(recipe, data, 30, tmp_path / f"ck{weight}.pt", batch_size=16)
        with torch.no_grad():
            image = clip.encode_image(clip.normalize(batch[0]))
            text = clip.model.encode_text(clip.tokenizer(["nodule"] + neutral))
            p = _presence(clip, image, text[:1], torch.nn.functional.normalize(text[1:], dim=-1))[:, 0]
        return float(p[present].mean() - p[~present].mean())

    control, taught = trained_gap(0.0), trained_gap(1.0)  # DHN-NCE alone, then with the presence term
    assert taught > 0.3 and taught > control + 0.3, (control, taught)


def test_presence_weight_with_a_caption_table_is_refused(tiny_open, tmp_path, capsys):
    code = main(["finetune-clip", "--from", str(tiny_open), "--data", str(caption_csv(tmp_path / "d")),
                 "--presence-weight", "1", "--output-dir", str(tmp_path / "o"), "--steps", "2", "--batch-size", "4",
                 "--work-dir", str(tmp_path / "w"), "--progress", "none"])
    assert code == 2 and "--presence-weight needs to know which findings each slice holds" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def mil_tops(monkeypatch):
    """The ``top`` of every ``mil_loss`` call, in order (the real loss still computed)."""
    seen, real = [], cf.mil_loss
    monkeypatch.setattr(cf, "mil_loss", lambda logits, present, top=None, **kw: seen.append(top) or real(
        logits, present, top, **kw))
    return seen


def test_mil_top_sets_how_many_patches_make_a_slices_caption_score(tiny_open, mil_tops):
    """``mil_top`` reaches the patch term (default: the engine's ``PATCH_TOP``), and more top patches give a
    different loss on the same batch."""
    batch = collate(squares(8, torch.Generator().manual_seed(5), absent_every=2))
    neutral = ["normal tissue", "a medical image"]
    clip = _clip(tiny_open)
    with torch.no_grad():
        default, wide = (float(cf.clip_loss_fn(clip, neutral, dense_weight=1.0, mil_top=k)(batch)) for k in (None, 9))
    assert mil_tops == [None, 9] and default != wide


def test_mil_top_reaches_the_loss_and_the_model_record_from_the_command_line(tiny_open, tmp_path, mil_tops):
    code = main(["finetune-clip", "--from", str(tiny_open), "--presence-from", str(tiny_open), "--phantoms", "8",
                 "--dense-weight", "1", "--mil-top", "9", "--output-dir", str(tmp_path / "o"), "--model-id", "m",
                 "--steps", "1", "--batch-size", "4", "--work-dir", str(tmp_path / "w"), "--progress", "none"])
    assert code == 0
    training = load_spec(tmp_path / "o" / "m.json")["training"]
    assert set(mil_tops) == {9} and training["mil_top"] == 9 and "--mil-top 9" in training["command"]


@pytest.mark.parametrize("extra, presence, data", [
    (["--mil-top", "0"], True, False),
    (["--mil-top", "8", "--dense-labels", "mask"], True, False),
    (["--mil-top", "8", "--dense-weight", "0"], True, False),
    (["--mil-top", "8"], False, False),  # no presence CLIP: the model reads presence from PATCH_TOP patches
    (["--mil-top", "8"], True, True),  # a caption table: no patch term
])
def test_mil_top_where_it_means_nothing_is_refused(tiny_open, tmp_path, capsys, extra, presence, data):
    extra = extra + (["--presence-from", str(tiny_open)] if presence else []) + (
        ["--data", str(caption_csv(tmp_path / "d"))] if data else [])
    code = main(["finetune-clip", "--from", str(tiny_open), "--output-dir", str(tmp_path / "o"), "--steps", "2",
                 "--batch-size", "4", "--work-dir", str(tmp_path / "w"), "--progress", "none", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "--mil-top" in err and "patch term learnt from phantom captions" in err
    assert not (tmp_path / "o").exists()
