"""CLIPSeg's public checkpoint as a CLIP-TNseg model (``clipseg models convert``), checked against transformers.

transformers' ``CLIPSegForImageSegmentation`` (a test dependency only) is built with tiny random towers, saved as the
public checkpoint is laid out, converted, and the converted coarse branch must give transformers' logits for the same
image and text, through CLIPSeg's own image processor and tokenizer. No network: the checkpoints are written here.
"""

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="a test dependency: pip install -e '.[test]'")

from conftest import CLIPSEG_SIZE, IMAGENET_MEAN, IMAGENET_STD, write_clipseg_checkpoint  # noqa: E402

from CLIPSegLib.engines import create_engine  # noqa: E402
from CLIPSegLib.engines.clip_backbone import build_clip, tokenize  # noqa: E402
from CLIPSegLib.engines.clip_weights import hf_clip_to_open_clip, load_clip_weights  # noqa: E402
from CLIPSegLib.engines.cliptnseg.convert import convert_clipseg  # noqa: E402
from CLIPSegLib.errors import ClipSegError, InputError, ModelError  # noqa: E402
from CLIPSegLib.models import load_checkpoint, load_spec, write_spec  # noqa: E402
from CLIPSegLib.inference.preprocessing import fit_slices  # noqa: E402

TEXTS = ["hypoechoic thyroid nodule", "a photo of a cat", "Ground-glass opacity in the right lower lobe!"]


def _processor(folder):
    """CLIPSeg's processor as transformers loads it from the checkpoint's files."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    images = transformers.ViTImageProcessor.from_pretrained(folder)
    return transformers.CLIPSegProcessor(image_processor=images, tokenizer=tokenizer)


def _images(n, size=CLIPSEG_SIZE, seed=0):
    """n grey 8-bit images ``[n, size, size]``: noise over a bright disc (something to segment)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size * 0.4) ** 2 + (xx - size * 0.6) ** 2 < (size * 0.2) ** 2) * 120
    return np.clip(rng.normal(90, 30, (n, size, size)) + disc, 0, 255).astype(np.uint8)


def _transformers_logits(model, folder, images, texts):
    """transformers' logits ``[n, S, S]`` for image i with text i, and the processor's token ids and pixels."""
    inputs = _processor(folder)(text=texts, images=[np.repeat(i[:, :, None], 3, 2) for i in images], padding=True,
                                return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits, inputs


def _our_logits(engine, images, texts):
    """The converted engine's coarse logits ``[n, S, S]`` for image i with text i (the pipeline's [0,1] slices)."""
    x = torch.from_numpy(images).float()[:, None] / 255
    state = engine.encode_prompts(texts)
    with torch.no_grad():
        return engine.net(x, state.embeddings, torch.arange(len(texts)))[0], x, state


@pytest.mark.parametrize("complex_conv", [True, False], ids=["complex-transposed-conv", "simple-transposed-conv"])
def test_the_converted_coarse_branch_reproduces_transformers_clipseg(tmp_path, complex_conv):
    folder = tmp_path / "clipseg"
    model = write_clipseg_checkpoint(folder, complex_conv, seed=int(complex_conv))
    spec_path, record = convert_clipseg(folder, tmp_path / "out", "converted")
    spec = load_spec(spec_path)
    net = spec["network"]
    assert (net["coarse_style"], net["coarse_only"], net["text_normalize"]) == ("clipseg", True, False)
    assert net["transposed_conv"] == ("complex" if complex_conv else "simple")
    assert net["extract_layers"] == [1, 2, 4]  # transformers' hidden_states[i + 1] for extract_layers [0, 1, 3]
    assert (net["image_mean"], net["image_std"]) == (IMAGENET_MEAN, IMAGENET_STD)
    assert spec["presence"]["calibration"] is None and "features" not in spec["domain"]
    assert set(record["clipseg"]["files"]) == {"config.json", "preprocessor_config.json", "model.safetensors"}
    engine = create_engine(spec, torch.device("cpu"))
    assert engine.preprocessing.input_size == CLIPSEG_SIZE and engine.preprocessing.fit == "squash"

    images = _images(3)
    reference, inputs = _transformers_logits(model, folder, images, TEXTS)
    ours, x, state = _our_logits(engine, images, TEXTS)
    # the same tokens: CLIPSeg's tokenizer (its vocab.json / merges.txt) and open_clip's BPE, up to the end token
    ids = tokenize(TEXTS, 77)
    for i in range(len(TEXTS)):
        n = int(inputs["attention_mask"][i].sum())
        assert inputs["input_ids"][i, :n].tolist() == ids[i, :n].tolist()
        assert [str(t) for t in state.readings[i].tokens] and state.readings[i].truncated is False
    # the same pixels: the processor's 8-bit image / 255, normalised with the checkpoint's ImageNet mean and std
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close((x.expand(-1, 3, -1, -1) - mean) / std, inputs["pixel_values"], atol=1e-6, rtol=0)
    assert reference.shape == ours.shape == (3, CLIPSEG_SIZE, CLIPSEG_SIZE)
    difference = float((reference - ours).abs().max())
    print(f"max |logit difference| {difference:.2e} (logits up to {float(reference.abs().max()):.1f})")
    assert 1.0 < float(reference.abs().max()) < 100  # realistic logits, not all near zero
    assert difference <= 1e-4
    # the engine's probabilities are the sigmoid of the same logits, for every image with every prompt
    probabilities, presence = engine.predict(x, state)
    assert presence is None and probabilities.shape == (3, 3, CLIPSEG_SIZE, CLIPSEG_SIZE)
    torch.testing.assert_close(probabilities[[0, 1, 2], [0, 1, 2]], torch.sigmoid(reference), atol=1e-5, rtol=0)


def test_the_processors_resize_is_the_pipelines_within_one_grey_level(clipseg_checkpoint):
    """A slice of another size: the pipeline squashes it to 80 x 80 as CLIPSeg's processor does (bilinear,
    antialiased); the processor rounds its resized image to 8 bits, so the two differ by less than one grey level."""
    folder, _ = clipseg_checkpoint
    image = _images(1, size=CLIPSEG_SIZE + 37)[0][:, :-30]  # 117 x 87
    pixels = _processor(folder)(images=[np.repeat(image[:, :, None], 3, 2)], return_tensors="pt")["pixel_values"]
    theirs = pixels[:, :1] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    ours = fit_slices(torch.from_numpy(image).float()[None, None] / 255, CLIPSEG_SIZE, "squash")
    assert ours.shape == theirs.shape == (1, 1, CLIPSEG_SIZE, CLIPSEG_SIZE)
    assert float((ours - theirs).abs().max()) < 1 / 255


def test_the_clip_towers_give_transformers_image_and_text_features(clipseg_checkpoint, converted_clipseg):
    """Every CLIP weight is mapped, the projections and final norms too (which the decoder never reads): image and
    text features of the mapped open_clip towers at the towers' own size equal transformers'; at the converted size
    the position embeddings are what CLIPSeg interpolates at every forward pass."""
    folder, model = clipseg_checkpoint
    spec = load_spec(converted_clipseg)
    clip = build_clip({**spec["clip"], "vision_cfg": {**spec["clip"]["vision_cfg"], "image_size": 48}}).eval()
    load_clip_weights(clip, hf_clip_to_open_clip(load_checkpoint(folder / "model.safetensors"), "clip."), "test")
    pixels = torch.randn(2, 3, 48, 48)
    ids = tokenize(TEXTS[:2], 77)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(pixels),
                                   model.clip.get_image_features(pixel_values=pixels).pooler_output,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(clip.encode_text(ids),
                                   model.clip.get_text_features(input_ids=ids).pooler_output, atol=1e-5, rtol=0)
        converted = create_engine(spec, torch.device("cpu")).net.clip.visual.positional_embedding
        embeddings = torch.zeros(1, 1 + (CLIPSEG_SIZE // 16) ** 2, 32)
        expected = model.clip.vision_model.embeddings.interpolate_pos_encoding(embeddings, CLIPSEG_SIZE,
                                                                                CLIPSEG_SIZE)[0]
    torch.testing.assert_close(converted, expected, atol=1e-6, rtol=0)


def test_clip_towers_from_an_open_clip_layout_file(clipseg_checkpoint, converted_clipseg, tmp_path):
    """The OpenAI ViT-B/16 file open_clip publishes is a ``CLIP.state_dict()``: written here from the tiny CLIP,
    it loads through our path as through open_clip's own ``load_checkpoint``, and converting with it gives the same
    model as the CLIP inside the checkpoint; a CLIP with other weights is reported by how far it is from it."""
    import open_clip
    from safetensors.torch import save_file

    folder, _ = clipseg_checkpoint
    spec = load_spec(converted_clipseg)
    native = {**spec["clip"], "vision_cfg": {**spec["clip"]["vision_cfg"], "image_size": 48}}
    clip = build_clip(native).eval()
    load_clip_weights(clip, hf_clip_to_open_clip(load_checkpoint(folder / "model.safetensors"), "clip."), "test")
    openai_file = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(openai_file))
    theirs, ours = build_clip(native).eval(), build_clip(native).eval()
    open_clip.load_checkpoint(theirs, str(openai_file))
    load_clip_weights(ours, load_checkpoint(openai_file), str(openai_file))
    pixels, ids = torch.randn(2, 3, 48, 48), tokenize(TEXTS[:2], 77)
    with torch.no_grad():
        assert torch.equal(ours.encode_image(pixels), theirs.encode_image(pixels))
        assert torch.equal(ours.encode_text(ids), theirs.encode_text(ids))

    path, record = convert_clipseg(folder, tmp_path / "with-openai", "with-openai", clip_file=openai_file)
    assert record["clip_max_abs_difference_to_clipseg"] == 0.0 and record["clip_towers"] == str(openai_file)
    key = "clip.visual.positional_embedding"
    assert torch.equal(load_checkpoint(path.with_suffix(".safetensors"))[key],
                       load_checkpoint(converted_clipseg.with_suffix(".safetensors"))[key])
    shifted = {k: v + 0.25 if k == "token_embedding.weight" else v for k, v in clip.state_dict().items()}
    save_file({k: v.contiguous() for k, v in shifted.items()}, str(openai_file))
    _, record = convert_clipseg(folder, tmp_path / "shifted", "shifted", clip_file=openai_file)
    assert record["clip_max_abs_difference_to_clipseg"] == pytest.approx(0.25, abs=1e-6)


def test_the_full_model_starts_as_clipseg_and_trains_its_fine_branch_and_head(converted_clipseg, tmp_path):
    """coarse_only false (what fine-tuning trains): the head is added to CLIPSeg's logits and starts at zero, so the
    full model starts exactly where CLIPSeg is; CLIP stays frozen, the decoder, fine branch and head train."""
    spec = load_spec(converted_clipseg)
    coarse = create_engine(spec, torch.device("cpu"))
    full = create_engine({**spec, "network": {**spec["network"], "coarse_only": False}}, torch.device("cpu"))
    images = _images(2)
    start, x, state = _our_logits(full, images, TEXTS[:2])
    assert torch.equal(start, _our_logits(coarse, images, TEXTS[:2])[0])
    net = full.net.train()
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"coarse", "fine", "fuse", "head_film", "head"}
    optimiser = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    logits, _ = net(x, state.embeddings, torch.arange(2))
    torch.nn.functional.binary_cross_entropy_with_logits(logits, (x[:, 0] > 0.5).float()).backward()
    assert all(p.grad is None for p in net.clip.parameters())
    optimiser.step()
    net.eval()
    assert not torch.equal(_our_logits(full, images, TEXTS[:2])[0], start)


def test_older_config_layouts_and_pytorch_weights_convert_to_the_same_model(clipseg_checkpoint, converted_clipseg,
                                                                              tmp_path):
    """CIDAS's config.json (2022) holds the towers' settings in ``*_config_dict`` over ``*_config`` and the end token
    as id 2; some checkpoints ship pytorch_model.bin instead of safetensors (read with weights_only=True)."""
    folder, _ = clipseg_checkpoint
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    config = json.loads((old / "config.json").read_text(encoding="utf-8"))
    vision = config.pop("vision_config")
    config["vision_config"] = {**vision, "patch_size": 32, "image_size": 224}  # overridden by the _dict below
    config["vision_config_dict"] = {k: vision[k] for k in ("hidden_size", "num_hidden_layers", "patch_size",
                                                           "image_size", "intermediate_size", "num_attention_heads")}
    config["text_config"] = {**config["text_config"], "eos_token_id": 2, "bos_token_id": 0}
    (old / "config.json").write_text(json.dumps(config), encoding="utf-8")
    state = load_checkpoint(old / "model.safetensors")
    (old / "model.safetensors").unlink()
    torch.save(state, old / "pytorch_model.bin")
    path, _ = convert_clipseg(old, tmp_path / "out", "tiny-clipseg-converted")
    ours, reference = load_spec(path), load_spec(converted_clipseg)
    assert (ours["clip"], ours["network"]) == (reference["clip"], reference["network"])
    a, b = (load_checkpoint(p.with_suffix(".safetensors")) for p in (path, converted_clipseg))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_what_cannot_be_converted_is_refused_with_the_reason(clipseg_checkpoint, tmp_path):
    folder, _ = clipseg_checkpoint

    def variant(name, change):
        other = tmp_path / name
        shutil.copytree(folder, other)
        change(other)
        return other

    def edit_json(name, **entries):
        def change(f):
            data = json.loads((f / name).read_text(encoding="utf-8"))
            (f / name).write_text(json.dumps({**data, **entries}), encoding="utf-8")
        return change

    cases = [
        (variant("no-weights", lambda f: (f / "model.safetensors").unlink()), ModelError, "holds no weights"),
        (variant("no-processor", lambda f: (f / "preprocessor_config.json").unlink()), ModelError,
         "has no preprocessor_config.json"),
        (variant("not-clipseg", edit_json("config.json", model_type="clip")), ModelError, "not CLIPSeg"),
        (variant("odd-size", edit_json("preprocessor_config.json", size={"height": 90, "width": 90})), ModelError,
         "multiple of the patch size 16"),
        (variant("other-vocab", edit_json("vocab.json", cat=7)), ModelError, "not CLIP's byte-pair encoding"),
        (variant("other-merges", lambda f: (f / "merges.txt").write_text("#version: 0.2\nc a\n")), ModelError,
         "merges from rule 0 on"),
    ]
    for source, error, message in cases:
        with pytest.raises(error, match=message):
            convert_clipseg(source, tmp_path / "out", "refused")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    convert_clipseg(folder, tmp_path / "out", "taken")
    with pytest.raises(InputError, match="add --force"):
        convert_clipseg(folder, tmp_path / "out", "taken")
    with pytest.raises(ModelError, match="needs patch 16"):
        spec = load_spec(tmp_path / "out" / "taken.json")
        spec["clip"]["vision_cfg"]["patch_size"] = 8
        write_spec(spec, {}, tmp_path / "patch8", half=False)
        create_engine(load_spec(tmp_path / "patch8" / "taken.json"), torch.device("cpu"))
    assert issubclass(ModelError, ClipSegError)


def test_at_rd64_refined_size_the_converted_model_reproduces_transformers(tmp_path):
    """The same at CLIPSeg rd64-refined's own size (ViT-B/16 towers, 12 layers, 352 px, random weights): about 35 s
    on 2 CPU cores and 1.2 GB of temporary files, removed once read."""
    folder = tmp_path / "clipseg"
    model = write_clipseg_checkpoint(folder, full_size=True)
    spec_path, _ = convert_clipseg(folder, tmp_path / "out", "rd64-size")
    spec = load_spec(spec_path)
    assert spec["clip"]["vision_cfg"] == {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0,
                                          "patch_size": 16, "image_size": 352}
    assert spec["network"]["extract_layers"] == [4, 7, 10] and spec["network"]["decoder_ff"] == 2048
    engine = create_engine(spec, torch.device("cpu"))
    for weights in (folder / "model.safetensors", spec_path.with_suffix(".safetensors")):  # 600 MB each, read by now
        weights.unlink()  # pytest keeps the temporary folders of the last runs
    images, texts = _images(1, size=352), ["hypoechoic thyroid nodule"]
    reference, _ = _transformers_logits(model, folder, images, texts)
    ours, _, _ = _our_logits(engine, images, texts)
    difference = float((reference - ours).abs().max())
    print(f"ViT-B/16 size: max |logit difference| {difference:.2e} (logits up to {float(reference.abs().max()):.1f})")
    assert difference <= 1e-4


@pytest.fixture
def local_registry(tmp_path, monkeypatch):
    """registry(changes) -> the shipped registry with ``changes`` (id -> {file name -> entry keys}) applied, used in
    place of the shipped one; the cache (``CLIPSEG_HOME``) empty in ``tmp_path``."""
    from CLIPSegLib.models import store

    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path / "home"))

    def make(changes):
        registry = json.loads(store.REGISTRY.read_text(encoding="utf-8"))
        for m in registry["models"]:
            for f in m.get("files", []):
                f.update(changes.get(m["id"], {}).get(f["name"], {}))
        path = tmp_path / "registry.json"
        path.write_text(json.dumps(registry), encoding="utf-8")
        monkeypatch.setattr(store, "REGISTRY", path)

    return make


def _serve(folder):
    """A local HTTP server (127.0.0.1) serving ``folder``: (base URL, server to shut down)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}", httpd


def test_the_shipped_registry_lists_clipseg_and_openai_clip_as_parts(clipseg_checkpoint, tmp_path, monkeypatch,
                                                                      capsys):
    from CLIPSegLib.cli import main
    from CLIPSegLib.models import catalogue, store

    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path / "home"))
    registry = store.load_registry()
    clipseg, openai = registry["clipseg-rd64-refined"], registry["openai-clip-vit-b16"]
    assert (clipseg["role"], clipseg["engine"], clipseg["license"]) == ("clipseg", "cliptnseg", "Apache-2.0")
    assert (openai["role"], openai["engine"], openai["license"]) == ("clip", "cliptnseg", "MIT")
    assert {f["name"] for f in clipseg["files"]} == {"config.json", "preprocessor_config.json", "model.safetensors",
                                                    "vocab.json", "merges.txt"}
    assert all(f["url"].startswith("https://huggingface.co/CIDAS/clipseg-rd64-refined/resolve/main/")
               for f in clipseg["files"])
    assert openai["files"][0]["url"] == ("https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/"
                                         "open_clip_model.safetensors")
    assert main(["models", "list"]) == 0
    rows = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["clipseg-rd64-refined"] == ["cliptnseg", "clipseg", "not"]
    assert rows["openai-clip-vit-b16"] == ["cliptnseg", "clip", "not"]
    with pytest.raises(ModelError, match="a CLIPSeg checkpoint .* `clipseg models convert clipseg-rd64-refined"):
        catalogue.resolve("clipseg-rd64-refined")
    # files copied by hand are checked against the published entry: the small ones fit, tiny weights do not
    folder, _ = clipseg_checkpoint
    small = [folder / n for n in ("config.json", "preprocessor_config.json", "vocab.json", "merges.txt")]
    assert main(["models", "import", "clipseg-rd64-refined", *map(str, small)]) == 0
    assert main(["models", "import", "clipseg-rd64-refined", str(folder / "model.safetensors")]) == 3
    assert "expected at least 550.0 MB" in capsys.readouterr().err
    status = store.verify("clipseg-rd64-refined")
    assert status.pop("model.safetensors") == "missing" and set(status.values()) == {"present"}
    assert main(["models", "convert", "clipseg-rd64-refined", "--output-dir", str(tmp_path / "out")]) == 3
    assert "model.safetensors missing" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_fetched_clipseg_converts_offline_and_segments_a_volume(clipseg_checkpoint, local_registry, phantom_file,
                                                                 tmp_path, capsys):
    """`clipseg models fetch` (from a local server standing in for Hugging Face), `convert`, then `segment` with the
    converted model: the pipeline at the model's input size, coarse only, no calibrated rule, no domain check."""
    from CLIPSegLib.cli import main
    from CLIPSegLib.models import store

    folder, _ = clipseg_checkpoint
    url, server = _serve(folder)
    names = [f["name"] for f in store.load_registry()["clipseg-rd64-refined"]["files"]]
    local_registry({"clipseg-rd64-refined": {n: {"url": f"{url}/{n}", "min_size": 1} for n in names}})
    try:
        assert main(["models", "fetch", "clipseg-rd64-refined", "--progress", "none"]) == 0
    finally:
        server.shutdown()
    pins = json.loads((store.cache_dir() / "clipseg-rd64-refined" / "checksums.json").read_text(encoding="utf-8"))
    assert set(pins) == set(names)
    out = tmp_path / "models"
    assert main(["models", "convert", "clipseg-rd64-refined", "--output-dir", str(out)]) == 0
    assert "coarse_only: true" in capsys.readouterr().out
    spec_path = out / "cliptnseg-clipseg-rd64-refined.json"
    spec = load_spec(spec_path)
    assert spec["conversion"]["clipseg"]["source"] == "clipseg-rd64-refined"
    assert spec["conversion"]["clipseg"]["files"]["model.safetensors"] == pins["model.safetensors"]
    assert spec["training"]["command"].startswith("clipseg models convert clipseg-rd64-refined --output-dir")
    seg = tmp_path / "out.seg.nrrd"
    assert main(["segment", str(phantom_file[0]), "--prompt", "anechoic cyst", "--output", str(seg), "--model",
                 str(spec_path), "--device", "cpu", "--progress", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    done = next(e for e in events if e.get("event") == "done")
    (finding,) = done["findings"]
    assert finding["rule"] == "global" and finding["out_of_domain"] is False and finding["unseen_words"] == []
    assert "".join(finding["tokens"]) == "anechoiccyst" and seg.is_file()  # CLIP's BPE pieces
    from CLIPSegLib.io.outputs import read_segmentation

    assert [s["name"] for s in read_segmentation(seg)["segments"]] == ["anechoic cyst"]


def test_the_openai_clip_entry_is_imported_offline_and_gives_the_towers(clipseg_checkpoint, converted_clipseg,
                                                                        local_registry, tmp_path, capsys):
    from safetensors.torch import save_file

    from CLIPSegLib.cli import main

    folder, _ = clipseg_checkpoint
    spec = load_spec(converted_clipseg)
    clip = build_clip({**spec["clip"], "vision_cfg": {**spec["clip"]["vision_cfg"], "image_size": 48}})
    load_clip_weights(clip, hf_clip_to_open_clip(load_checkpoint(folder / "model.safetensors"), "clip."), "test")
    copied = tmp_path / "usb-stick" / "open_clip_model.safetensors"
    copied.parent.mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(copied))
    local_registry({"openai-clip-vit-b16": {"open_clip_model.safetensors": {"min_size": 1}}})
    assert main(["models", "import", "openai-clip-vit-b16", str(copied)]) == 0
    assert main(["models", "convert", str(folder), "--clip", "openai-clip-vit-b16", "--output-dir",
                 str(tmp_path / "out"), "--model-id", "with-openai-towers"]) == 0
    assert "largest difference between the two CLIP weight sets: 0" in capsys.readouterr().out
    record = load_spec(tmp_path / "out" / "with-openai-towers.json")["conversion"]
    assert record["clip_towers"].endswith("openai-clip-vit-b16/open_clip_model.safetensors")
    assert main(["models", "convert", str(folder), "--clip", "clipseg-rd64-refined", "--output-dir",
                 str(tmp_path / "out2")]) == 2
    assert "is a clipseg entry, not a clip checkpoint" in capsys.readouterr().err


def test_the_converter_needs_neither_transformers_nor_the_network(clipseg_checkpoint, tmp_path):
    """The command runs in a process where transformers cannot be imported and every connection is refused."""
    import subprocess
    import sys
    from pathlib import Path

    folder, _ = clipseg_checkpoint
    package = Path(__file__).resolve().parents[1] / "CLIPSeg"
    code = (f"import sys, socket; sys.path.insert(0, {str(package)!r}); sys.modules['transformers'] = None\n"
            "def refuse(*a, **k): raise OSError('no network in this test')\n"
            "socket.socket.connect = refuse; socket.create_connection = refuse\n"
            "from CLIPSegLib.cli import main\n"
            f"sys.exit(main(['models', 'convert', {str(folder)!r}, '--output-dir', {str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "cliptnseg-clipseg-rd64-refined.json").is_file()
