"""Neighbouring slices as input channels (network ``context_slices``, ``Preprocessing.context``): what the pipeline
gives such an engine, how a network that reads the slice alone is widened, and what training samples hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from CLIPSegLib.engines.contract import Engine, Preprocessing, PromptReading
from CLIPSegLib.errors import InputError, ModelError

from conftest import TINY_SPEC


class _Recorder(Engine):
    """A contract engine that keeps every input batch and answers each slice's mean as its probability."""

    name = "recorder"

    def __init__(self, context, size=16):
        super().__init__({}, "cpu", "fp32", Preprocessing(size, fit="squash", context=context))
        self.seen = []

    def encode_texts(self, texts):
        return None, [PromptReading(t) for t in texts]

    def infer(self, slices, state):
        self.seen.append(slices.clone())
        mean = slices[:, self.preprocessing.context].mean(dim=(-2, -1))  # the middle channel: the slice itself
        return mean[:, None, None, None].expand(-1, len(state), *slices.shape[-2:]).clone(), None


def _numbered_volume(k=5, j=12, i=10):
    """[K,J,I] whose slice k along K holds the value k (plus a ramp so no slice is constant)."""
    ramp = np.linspace(0, 0.01, i, dtype=np.float32)
    return np.stack([np.full((j, i), float(n), np.float32) + ramp for n in range(k)])


def test_each_slice_comes_between_its_neighbours_the_ends_repeated():
    from CLIPSegLib.inference.pipeline import predict_maps

    engine = _Recorder(context=1)
    features = []
    probs, _ = predict_maps(engine, _numbered_volume(), ["x"], slice_axis=2, batch_size=2,
                            on_slices=features.append)
    x = torch.cat(engine.seen)  # [5, 3, 16, 16] after the volume's percentile normalisation
    assert x.shape == (5, 3, 16, 16)
    level = x.mean(dim=(-2, -1))  # [5, 3]: one level per slice, increasing with k
    order = torch.argsort(level[:, 1])
    assert order.tolist() == [0, 1, 2, 3, 4]
    for k in range(5):
        assert torch.allclose(level[k, 0], level[max(k - 1, 0), 1])
        assert torch.allclose(level[k, 2], level[min(k + 1, 4), 1])
    assert all(f.shape[1] == 1 for f in features)  # what the network sees is measured on the slices themselves
    assert torch.allclose(torch.cat(features)[:, 0], x[:, 1])
    assert probs.shape == (1, 5, 12, 10)


def test_neighbours_follow_the_slice_axis_asked():
    from CLIPSegLib.inference.pipeline import predict_maps

    vol = np.transpose(_numbered_volume(k=4, j=10, i=10), (1, 2, 0)).copy()  # numbered along I (voxel axis 0)
    engine = _Recorder(context=2)
    predict_maps(engine, vol, ["x"], slice_axis=0)
    level = torch.cat(engine.seen).mean(dim=(-2, -1))
    assert level.shape == (4, 5)  # the four slices along I, each with two neighbours on either side
    assert (level[1:, 2] > level[:-1, 2]).all()  # in order along I: slices cut along another axis would be equal
    for k in range(4):
        expected = [level[min(max(k + d, 0), 3), 2] for d in (-2, -1, 0, 1, 2)]
        assert torch.allclose(level[k], torch.stack(expected))


def test_an_engine_refuses_slices_without_their_neighbours():
    engine = _Recorder(context=1)
    with pytest.raises(InputError, match=r"takes slices \[B,3,16,16\], got \[2, 1, 16, 16\].*neighbours"):
        engine.predict(torch.rand(2, 1, 16, 16), engine.encode_prompts(["x"]))


def test_a_bad_context_is_refused():
    from CLIPSegLib.engines.cliptnseg.network import build_network

    with pytest.raises(ModelError, match="context_slices -1 must be 0"):
        build_network({**TINY_SPEC, "network": {**TINY_SPEC["network"], "context_slices": -1}})
    with pytest.raises(ModelError, match="context 1.5 must be a number of neighbouring slices"):
        Preprocessing(16, context=1.5)


def test_widened_network_starts_as_the_network_it_was_widened_from():
    from CLIPSegLib.engines.cliptnseg.network import build_network, widen_from

    torch.manual_seed(0)
    alone = build_network(TINY_SPEC).eval()
    wide = build_network({**TINY_SPEC, "network": {**TINY_SPEC["network"], "context_slices": 1}}).eval()
    wide.load_state_dict(widen_from(alone.state_dict(), wide, alone.cfg))
    x = torch.rand(3, 3, 32, 32)
    text = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    with torch.no_grad():
        mask, presence = wide(x, text)
        ref_mask, ref_presence = alone(x[:, 1:2], text)
    torch.testing.assert_close(mask, ref_mask)
    torch.testing.assert_close(presence, ref_presence)
    # and the neighbours do reach the output once their weights move off zero
    with torch.no_grad():
        for name, p in wide.named_parameters():
            if name.startswith("fine.") and p.ndim == 4 and p.shape[1] == 3:
                p[:, 0] += 0.5
        changed, _ = wide(x, text)
    assert (changed - ref_mask).abs().max() > 1e-3


def test_an_exported_context_model_segments_a_volume_as_the_model_it_was_widened_from(tmp_path):
    """An exported model with context 1 runs end to end through the CLI's engine loader, and equals the model it
    was widened from (zero neighbour weights) on the same volume."""
    from CLIPSegLib.engines.cliptnseg.network import build_network, widen_from
    from CLIPSegLib.inference.pipeline import predict_probabilities
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.models import write_spec
    from CLIPSegLib.synthetic.phantoms import make_phantom

    torch.manual_seed(1)
    alone = build_network(TINY_SPEC)
    spec = {**TINY_SPEC, "id": "tiny-context", "network": {**TINY_SPEC["network"], "context_slices": 1}}
    wide = build_network(spec)
    wide.load_state_dict(widen_from(alone.state_dict(), wide, alone.cfg))
    a = load_engine(str(write_spec(dict(TINY_SPEC), alone.state_dict(), tmp_path / "a")), device="cpu")
    b = load_engine(str(write_spec(spec, wide.state_dict(), tmp_path / "b")), device="cpu")
    assert (a.preprocessing.channels, b.preprocessing.channels) == (1, 3)
    ph = make_phantom((5, 40, 36), spacing=(1.0, 0.5, 0.5), seed=4, findings=("nodule",))
    np.testing.assert_allclose(predict_probabilities(b, ph.image, ["nodule"], 2),
                               predict_probabilities(a, ph.image, ["nodule"], 2), atol=1e-6)


def test_phantom_bank_gives_volume_slices_their_own_neighbours():
    from CLIPSegLib.training.datasets import PhantomBank

    bank = PhantomBank(2, 32, augment=False, volumes=1, context=1)
    n = len(bank)
    assert n > 2 + 3
    first, last = bank.spans[2]
    assert (first, last) == (2, n - 1) and tuple(bank.spans[0]) == (0, 0)
    np.testing.assert_array_equal(bank.image_stack(0), np.stack([bank.images[0]] * 3))  # a 2D phantom: itself
    np.testing.assert_array_equal(bank.image_stack(2), bank.images[[2, 2, 3]])  # the volume's first slice
    np.testing.assert_array_equal(bank.image_stack(4), bank.images[[3, 4, 5]])
    np.testing.assert_array_equal(bank.image_stack(n - 1), bank.images[[n - 2, n - 1, n - 1]])
    image, phrases, masks = bank[4]
    assert image.shape == (3, 32, 32) and masks.shape == (len(phrases), 32, 32)
    bank.context = 0
    assert bank[4][0].shape == (1, 32, 32)


def test_flip_averaging_mirrors_every_channel():
    from CLIPSegLib.inference.pipeline import predict_maps

    vol = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    engine = _Recorder(context=1)
    predict_maps(engine, vol, ["x"], slice_axis=2, batch_size=3, flip_average=True)
    plain, mirrored = engine.seen  # one batch of the slices as they are, one of their mirrors
    torch.testing.assert_close(mirrored, plain.flip(-1))
    assert not torch.equal(plain[:, 0], plain[:, 1])  # the neighbours are other slices, not copies


def test_a_kept_parent_reading_other_neighbours_is_refused(tmp_path):
    from CLIPSegLib.engines.cliptnseg.engine import CLIPTNSegEngine
    from CLIPSegLib.engines.cliptnseg.network import build_network

    parent = CLIPTNSegEngine(build_network(TINY_SPEC), torch.device("cpu"), {"id": "alone"})
    spec = {**TINY_SPEC, "id": "wide", "network": {**TINY_SPEC["network"], "context_slices": 1}}
    child = CLIPTNSegEngine(build_network(spec), torch.device("cpu"), spec, parent=parent)
    child._to_parent["x"] = True
    state = child.encode_prompts(["x"])
    with pytest.raises(ModelError, match="reads 1 neighbouring slice.*kept parent reads 0"):
        child.predict(torch.rand(1, 3, 32, 32), state)


def _context_parent(tmp_path):
    """The tiny model reading one neighbour on each side, with a calibrated finding "dark square"."""
    from CLIPSegLib.engines.cliptnseg.network import build_network
    from CLIPSegLib.models import write_spec

    torch.manual_seed(2)
    spec = {**TINY_SPEC, "id": "tiny-context", "network": {**TINY_SPEC["network"], "context_slices": 1}}
    spec["presence"] = {**spec["presence"], "match_min_cosine": 0.95,
                        "per_finding": {"square": {**spec["presence"], "phrases": ["dark square"]}}}
    return write_spec(spec, build_network(spec).state_dict(), tmp_path / "parent")


def _disc_table(tmp_path):
    """A volume whose slice k holds the value 10 k (plus noise), a disc painted on slices 2 and 5."""
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.io.outputs import write_volume

    rng = np.random.default_rng(0)
    image = (np.arange(8, dtype=np.float32)[:, None, None] * 10 + rng.normal(100, 5, (8, 32, 32))).astype(np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    disc = (yy - 16) ** 2 + (xx - 14) ** 2 < 40
    image[:, disc] += 70
    mask = np.zeros(image.shape, np.uint8)
    mask[[2, 5]] = disc
    geometry = Geometry.axis_aligned((2.0, 1.0, 1.0))
    write_volume(tmp_path / "img.nrrd", image, geometry)
    write_volume(tmp_path / "mask.nrrd", mask, geometry)
    table = tmp_path / "table.csv"
    table.write_text("image,mask,phrase,slices\nimg.nrrd,mask.nrrd,bright disc,2;5\n", encoding="utf-8")
    return table


def test_labelled_slices_come_with_their_unlabelled_neighbours(tmp_path):
    from CLIPSegLib.training import labelled_slices as ls

    volumes = ls.read_data(_disc_table(tmp_path))
    samples = ls.SliceSamples(volumes, [(0, 2), (0, 5)], 32, context=1)
    normalised = ls.INTENSITIES["percentile"](volumes[0].image)
    for i, k in enumerate((2, 5)):
        image, phrases, masks = samples[i]
        assert image.shape == (3, 32, 32) and phrases == ["bright disc"]
        torch.testing.assert_close(image, normalised[k - 1:k + 2], atol=1e-6, rtol=0)


def test_fine_tuning_a_parent_that_reads_neighbours(tmp_path):
    """Few-shot fine-tuning keeps the parent's context: the user's slices and the replayed phantoms come with
    their neighbours, the teacher reads them, and the written model segments a volume; the parent's finding is
    still answered by its kept network."""
    from CLIPSegLib.inference.pipeline import predict_probabilities
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.training.finetune import finetune

    parent = _context_parent(tmp_path)
    table = _disc_table(tmp_path)
    kept = finetune(table, tmp_path / "out", parent, "disc", steps=2, batch_size=1)
    replayed = finetune(table, tmp_path / "out", parent, "disc-replay", steps=2, batch_size=1, replay=2,
                        keep_parent=False)
    for result in (kept, replayed):
        assert result.spec["network"]["context_slices"] == 1
        engine = load_engine(str(result.spec_path), device="cpu")
        assert engine.preprocessing.channels == 3
        probs = predict_probabilities(engine, np.random.default_rng(1).random((4, 32, 32)).astype(np.float32),
                                      ["bright disc", "dark square"], 2)
        assert probs.shape == (2, 4, 32, 32) and np.isfinite(probs).all()
    tuned, original = load_engine(str(kept.spec_path), device="cpu"), load_engine(str(parent), device="cpu")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(tuned.predict(x, tuned.encode_prompts(["dark square"]))[0],
                               original.predict(x, original.encode_prompts(["dark square"]))[0])
