"""The engine contract (``engines.contract``), checked on every registered engine and on a minimal engine defined here.

``ThresholdEngine`` is all that adding an engine takes: an ``Engine`` subclass in its own module, and one entry in
``engines.ENGINES`` (made here with monkeypatch). Each engine is built through ``create_engine`` from a tiny spec.
"""

import numpy as np
import pytest
import torch

from CLIPSegLib.engines import ENGINES, create_engine
from CLIPSegLib.engines.contract import COPY_KEY, Engine, Preprocessing, PromptReading, PromptState, inference_copy
from CLIPSegLib.errors import InputError, ModelError, UnsupportedError
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.models import load_spec
from CLIPSegLib.inference.pipeline import segment_volume
from CLIPSegLib.inference.preprocessing import FITS, fit_slices, unfit_slices


class ThresholdEngine(Engine):
    """Intensity is the probability: ``sigmoid(8 (x - 0.5))``, reversed for prompts naming something dark ("cyst",
    "dark"). No presence estimate, no text embeddings; reads at most ``MAX_WORDS`` words of a prompt."""

    name = "threshold"
    MAX_WORDS = 8

    def __init__(self, spec, device, precision="fp32"):
        super().__init__(spec, device, precision, Preprocessing.from_spec(spec, 24))

    def encode_texts(self, texts):
        readings = []
        for text in texts:
            words = text.lower().split()
            kept = words[:self.MAX_WORDS]
            readings.append(PromptReading(text, tuple(kept), len(words) > len(kept), " ".join(kept)))
        return None, readings

    def infer(self, slices, state):
        dark = [bool({"cyst", "dark"} & set(p.lower().split())) for p in state.prompts]
        sign = torch.tensor([-1.0 if d else 1.0 for d in dark], device=self.device).view(1, -1, 1, 1)
        x = slices.to(self.device, torch.float32)
        with self.autocast():
            logits = (x - 0.5) * 8.0 * sign  # [B,1,S,S] x [1,P,1,1] -> [B,P,S,S]
        return torch.sigmoid(logits.float()), None


PHRASES = ["thyroid nodule", "anechoic cyst"]  # the training phrases every test spec records
TINY = {  # engine or variant -> its tiny spec (random weights); every registered engine needs one here
    "cliptnseg": lambda models: load_spec(models["cliptnseg"]),
    # CLIP-TNseg in CLIPSeg's style, coarse only: what `clipseg models convert` makes of CLIPSeg
    "cliptnseg-clipseg-coarse-only": lambda models: load_spec(models["clipseg-style"]),
    "threshold": lambda models: {"id": "threshold-test", "engine": "threshold", "files": []},
    # MedCLIP-SAM: the tiny BiomedCLIP folder + a small SAM (conftest.write_tiny_medclipsam)
    "medclipsam": lambda models: load_spec(models["medclipsam"]),
    "tgcnet": lambda models: load_spec(models["tgcnet"]),
    "unet": lambda models: load_spec(models["unet"]),
}
NAMES = sorted(set(ENGINES) | set(TINY))


@pytest.fixture
def build(tiny_model, tiny_clipseg_model, tiny_medclipsam, tiny_tgcnet, tiny_unet, monkeypatch):
    """build(engine or variant name, precision=..., **spec entries) -> the engine, from its tiny spec."""
    monkeypatch.setitem(ENGINES, "threshold", ThresholdEngine)  # the one registration a new engine needs
    models = {"cliptnseg": tiny_model, "clipseg-style": tiny_clipseg_model, "medclipsam": tiny_medclipsam,
              "tgcnet": tiny_tgcnet, "unet": tiny_unet}

    def make(name, precision="fp32", **entries):
        spec = {**TINY[name](models), "training": {"phrases": PHRASES}, **entries}
        return create_engine(spec, torch.device("cpu"), precision=precision)

    return make


def _slices(engine, n, seed=0):
    s = engine.preprocessing.input_size
    return torch.rand(n, 1, s, s, generator=torch.Generator().manual_seed(seed))


def test_every_registered_engine_is_checked_here():
    assert set(ENGINES) <= set(TINY), f"add a tiny spec for {sorted(set(ENGINES) - set(TINY))} to TINY"


@pytest.mark.parametrize("name", NAMES)
def test_outputs_have_the_contract_shapes_dtypes_device_and_range(build, name):
    engine = build(name)
    assert engine.name == name.split("-")[0] and isinstance(engine.preprocessing, Preprocessing)
    assert engine.preprocessing.fit in FITS and engine.default_batch_size >= 1
    state = engine.encode_prompts(["thyroid nodule", "cyst"])
    assert isinstance(state, PromptState) and state.prompts == ["thyroid nodule", "cyst"] and len(state.readings) == 2
    assert state.embeddings is None or (state.embeddings.shape[0] == 2 and state.embeddings.device == engine.device
                                        and not state.embeddings.requires_grad)
    s = engine.preprocessing.input_size
    probs, presence = engine.predict(_slices(engine, 3), state)
    assert probs.shape == (3, 2, s, s) and probs.dtype == torch.float32 and probs.device == engine.device
    assert 0.0 <= probs.min() and probs.max() <= 1.0 and not probs.requires_grad
    if presence is not None:
        assert presence.shape == (3, 2) and presence.dtype == torch.float32 and presence.device == engine.device
        assert 0.0 <= presence.min() and presence.max() <= 1.0
    cosine = engine.similarity(state, engine.encode_prompts(["cyst"]))
    assert cosine.shape == (2, 1) and abs(float(cosine[1, 0]) - 1.0) < 1e-5 and float(cosine.abs().max()) <= 1 + 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_the_same_input_gives_the_same_output(build, name):
    engine = build(name)
    state = engine.encode_prompts(["thyroid nodule"])
    x = _slices(engine, 2)
    first, second = engine.predict(x, state), engine.predict(x.clone(), state)
    assert torch.equal(first[0], second[0])
    assert (first[1] is None) == (second[1] is None) and (first[1] is None or torch.equal(first[1], second[1]))


@pytest.mark.parametrize("name", NAMES)
def test_no_prompt_or_a_blank_prompt_is_refused_with_a_clear_error(build, name):
    engine = build(name)
    with pytest.raises(InputError, match="no prompt to encode"):
        engine.encode_prompts([])
    with pytest.raises(InputError, match="each prompt must name a finding"):
        engine.encode_prompts(["cyst", "  "])


@pytest.mark.parametrize("name", NAMES)
def test_a_repeated_prompt_is_encoded_once(build, name, monkeypatch):
    engine = build(name)
    calls = []
    real = engine.encode_texts
    monkeypatch.setattr(engine, "encode_texts", lambda texts: calls.append(list(texts)) or real(texts))
    state = engine.encode_prompts(["cyst", "thyroid nodule", "cyst"])
    assert calls == [["cyst", "thyroid nodule"]] and state.prompts == ["cyst", "thyroid nodule", "cyst"]
    again = engine.encode_prompts(["thyroid nodule", "cyst"])
    assert calls == [["cyst", "thyroid nodule"]]  # cached: nothing encoded again
    if state.embeddings is not None:
        assert torch.equal(state.embeddings[0], state.embeddings[2])
        assert torch.equal(again.embeddings, state.embeddings[[1, 0]])
    probs, _ = engine.predict(_slices(engine, 1), state)
    assert torch.equal(probs[:, 0], probs[:, 2])


@pytest.mark.parametrize("name", NAMES)
def test_results_do_not_depend_on_the_batch_size(build, name):
    engine = build(name)
    state = engine.encode_prompts(["thyroid nodule", "cyst"])
    x = _slices(engine, 4)
    whole, whole_presence = engine.predict(x, state)
    halves = [engine.predict(x[i:i + 2], state) for i in (0, 2)]
    torch.testing.assert_close(whole, torch.cat([h[0] for h in halves]), atol=1e-5, rtol=0)
    if whole_presence is not None:
        torch.testing.assert_close(whole_presence, torch.cat([h[1] for h in halves]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_runs_and_stays_close_to_fp32(build, name):
    fp32, bf16 = build(name), build(name, precision="bf16")
    assert bf16.precision == "bf16"
    x = _slices(fp32, 2)
    exact, exact_presence = fp32.predict(x, fp32.encode_prompts(["thyroid nodule"]))
    approx, approx_presence = bf16.predict(x, bf16.encode_prompts(["thyroid nodule"]))
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    assert float((approx - exact).abs().max()) < 0.02
    if exact_presence is not None:
        assert float((approx_presence - exact_presence).abs().max()) < 0.02


def test_bf16_runs_a_bfloat16_copy_of_the_network_made_once_and_fp32_the_network_itself(build):
    """Under CPU autocast, frozen float32 weights are cast again at every op (slower than fp32: ``inference_copy``);
    a bf16 engine runs a bfloat16 copy of its network instead, and leaves the network itself float32."""
    fp32, bf16 = build("cliptnseg"), build("cliptnseg", precision="bf16")
    assert fp32.runner(fp32.net) is fp32.net
    copy = bf16.runner(bf16.net)
    assert copy is not bf16.net and copy is bf16.runner(bf16.net)
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.net.parameters()} == {torch.float32} and not copy.training
    seen = []
    copy.register_forward_hook(lambda m, i, o: seen.append(True))
    bf16.predict(_slices(bf16, 1), bf16.encode_prompts(["thyroid nodule"]))
    assert seen == [True]


def test_a_bfloat16_copy_leaves_out_the_copies_kept_inside_the_module():
    """A network whose CLIP tower already holds its bfloat16 copy (training under bf16) is copied without it: the
    tower's copy stays with the tower, and the network's copy holds no second one."""
    tower = torch.nn.Linear(4, 4)
    net = torch.nn.Sequential(tower, torch.nn.ReLU())
    tower_copy = inference_copy(tower, "bf16")
    fast = inference_copy(net, "bf16")
    assert tower.__dict__[COPY_KEY] is tower_copy and COPY_KEY not in fast[0].__dict__
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16} and inference_copy(net, "bf16") is fast
    assert inference_copy(net, "fp32") is net


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("name", NAMES)
def test_a_non_square_image_is_segmented_at_its_own_size(build, name, fit):
    engine = build(name, preprocessing={"fit": fit})
    assert engine.preprocessing.fit == fit
    volume = np.random.default_rng(0).random((1, 40, 64)).astype(np.float32)
    result = segment_volume(engine, volume, Geometry.axis_aligned((1.0, 0.5, 0.5)), ["thyroid nodule"],
                            keep_probabilities=True)
    assert result.slice_axis == 2 and result.findings[0].mask.shape == (1, 40, 64)
    assert result.probabilities.shape == (1, 1, 40, 64) and np.isfinite(result.probabilities).all()


@pytest.mark.parametrize("name", NAMES)
def test_readings_say_what_was_cut_and_which_words_are_new(build, name):
    engine = build(name)
    long = " ".join(["thyroid nodule"] * 60)
    state = engine.encode_prompts(["thyroid nodule", long, "sparkly cyst"])
    short, cut, new = state.readings
    assert not short.truncated and short.unseen_words == () and short.warning() is None
    assert short.interpretation().startswith("interpreted as 'thyroid nodule'") and short.tokens
    assert cut.truncated and "cut" in cut.interpretation() and "cut after" in cut.warning()
    assert 0 < len(cut.tokens) < 120 and cut.read_as and long.startswith(cut.read_as)
    assert new.unseen_words == ("sparkly",) and "never saw in training: 'sparkly'" in new.warning()


@pytest.mark.parametrize("name", NAMES)
def test_refinement_unsupported_is_a_clear_error(build, name):
    engine = build(name)
    if engine.supports_refine:
        pytest.skip(f"{name} supports refinement")
    with pytest.raises(UnsupportedError, match=f"engine '{engine.name}' has no image-embedding step"):
        engine.embed(_slices(engine, 1))
    with pytest.raises(NotImplementedError, match="interactive refinement"):
        engine.refine(None, points=[[4, 4]])


@pytest.mark.parametrize("name", NAMES)
def test_predict_refuses_texts_or_slices_of_the_wrong_size(build, name):
    engine = build(name)
    with pytest.raises(InputError, match="PromptState that encode_prompts returns"):
        engine.predict(_slices(engine, 1), ["cyst"])
    s = engine.preprocessing.input_size
    with pytest.raises(InputError, match=rf"slices \[B,1,{s},{s}\]"):
        engine.predict(torch.rand(1, 1, s + 2, s), engine.encode_prompts(["cyst"]))


def test_a_spec_preprocessing_entry_is_checked(build):
    with pytest.raises(ModelError, match="fit 'stretch' is not one of pad, squash"):
        build("threshold", preprocessing={"fit": "stretch"})
    with pytest.raises(ModelError, match=r"preprocessing \['size'\] is not understood"):
        build("threshold", preprocessing={"size": 64})
    assert build("cliptnseg").preprocessing.fit == "squash"  # as its models were trained
    assert build("threshold").preprocessing.fit == "pad"  # the default for new engines


def test_pad_centres_the_slice_and_comes_back_exactly():
    x = torch.rand(2, 1, 3, 5)
    padded = fit_slices(x, 5, "pad")
    assert padded.shape == (2, 1, 5, 5) and torch.equal(padded[:, :, 1:4], x)
    assert not padded[:, :, 0].any() and not padded[:, :, 4].any()
    assert torch.equal(unfit_slices(padded, (3, 5), "pad"), x)
    assert fit_slices(x, 8, "squash").shape == (2, 1, 8, 8) and unfit_slices(torch.rand(2, 4, 8, 8), (3, 5),
                                                                              "squash").shape == (2, 4, 3, 5)


def test_the_minimal_engine_segments_a_volume_end_to_end(build):
    rule = {"threshold": 0.5, "min_peak": 0.5, "min_extent_mm": 0.0, "min_area_mm2": 0.0}
    engine = build("threshold", presence={**rule, "per_finding": {"lesion": {**rule, "phrases": ["bright lesion"]}},
                                          "match_min_cosine": 0.95})
    volume = np.random.default_rng(0).normal(0.2, 0.01, (3, 32, 48)).astype(np.float32)
    volume[:, 8:20, 10:26] = 1.0
    result = segment_volume(engine, volume, Geometry.axis_aligned((1.0, 0.5, 0.5)), ["Bright  lesion", "shiny blob"])
    lesion, blob = result.findings
    assert lesion.found and lesion.info["rule"] == "lesion" and lesion.info["rule_cosine"] == 1.0
    assert lesion.mask[:, 10:18, 12:24].all() and not lesion.mask[:, 24:, :].any() and not lesion.mask[:, :, 32:].any()
    assert lesion.info["tokens"] == ["bright", "lesion"] and lesion.info["unseen_words"] == []
    assert "interpreted as 'bright lesion'" in lesion.message()
    assert blob.info["rule"] == "global" and blob.event()["unseen_words"] == ["shiny", "blob"]
    assert "never saw in training: 'shiny', 'blob'" in blob.message() and blob.event()["prompt_warning"]
