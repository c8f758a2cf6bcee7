import numpy as np
import pytest
import torch
from CLIPSegLib.engines.contract import Engine, Preprocessing, PromptReading
from CLIPSegLib.errors import InputError
from CLIPSegLib.synthetic.phantoms import make_phantom
from CLIPSegLib.inference.pipeline import predict_probabilities


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    from CLIPSegLib.inference.segment_file import load_engine

    return load_engine(str(tiny_model), device="cpu")


def test_batch_size_changes_speed_not_results(tiny_engine):
    ph = make_phantom((7, 40, 36), spacing=(1.0, 0.5, 0.5), seed=4, findings=("nodule",))
    prompts = ["thyroid nodule", "cyst"]
    ref = predict_probabilities(tiny_engine, ph.image, prompts, slice_axis=2, batch_size=1)
    assert ref.shape == (2, 7, 40, 36)
    for b in (3, 16, None):  # None: the engine's default for its device
        np.testing.assert_allclose(predict_probabilities(tiny_engine, ph.image, prompts, 2, batch_size=b), ref,
                                   atol=1e-5)
    assert tiny_engine.default_batch_size == (16 if tiny_engine.device.type == "cuda" else 64)  # 32 px input


def test_batch_size_below_one_is_refused(tiny_engine):
    with pytest.raises(InputError, match="batch size 0 must be at least 1"):
        predict_probabilities(tiny_engine, np.random.rand(2, 8, 8).astype(np.float32), ["cyst"], 2, batch_size=0)


def test_constant_slices_are_skipped_with_probability_zero(tiny_engine):
    vol = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)
    vol[1] = 0.5  # no signal: not sent to the model
    calls = []
    real = tiny_engine.predict

    def counting(images, prompts):
        calls.append(images.shape[0])
        return real(images, prompts)

    tiny_engine.predict = counting
    try:
        p = predict_probabilities(tiny_engine, vol, ["cyst"], 2, batch_size=8)
    finally:
        del tiny_engine.predict
    assert calls == [3] and not p[0, 1].any() and torch.isfinite(torch.from_numpy(p)).all()


def test_presence_gate_scales_each_slice_along_the_slice_axis():
    from CLIPSegLib.inference.pipeline import apply_presence

    mask = np.full((3, 2, 4), 0.8, np.float32)  # [K,J,I]
    presence_k = np.array([1.0, 0.5, 0.1], np.float32)
    joint = apply_presence(mask, presence_k, slice_axis=2, gate=1.0)  # slices along K
    np.testing.assert_allclose(joint[:, 0, 0], [0.8, 0.4, 0.08], rtol=1e-6)
    lenient = apply_presence(mask, presence_k, slice_axis=2, gate=0.5)  # presence >= 0.5 keeps the slice whole
    np.testing.assert_allclose(lenient[:, 0, 0], [0.8, 0.8, 0.16], rtol=1e-6)
    along_i = apply_presence(mask, np.array([1.0, 0.5, 0.0, 0.25], np.float32), slice_axis=0, gate=1.0)
    np.testing.assert_allclose(along_i[0, 0], [0.8, 0.4, 0.0, 0.2], rtol=1e-6)
    assert apply_presence(mask, None, 2) is mask


def test_unknown_precision_is_a_clear_error(tiny_model):
    from CLIPSegLib.inference.segment_file import load_engine

    with pytest.raises(InputError, match="precision 'fp16' is not one of fp32, bf16"):
        load_engine(str(tiny_model), device="cpu", precision="fp16")


class _StandIn(Engine):
    """A contract engine for pipeline tests: words as tokens, ``maps(slices, prompts)`` as its prediction."""

    def __init__(self, spec, input_size):
        super().__init__(spec, "cpu", "fp32", Preprocessing(input_size))

    def encode_texts(self, texts):
        return None, [PromptReading(t, tuple(t.split())) for t in texts]

    def infer(self, slices, state):
        return self.maps(slices, state.prompts)


def test_cpu_default_batch_holds_about_four_128px_slices():
    for size, batch in ((128, 4), (256, 1), (352, 1), (64, 16)):
        assert _StandIn({}, size).default_batch_size == batch


class _MapEngine(_StandIn):
    """A stand-in engine whose probability maps are fixed per finding: prompt -> finding by the first word."""

    def __init__(self, maps):
        names = sorted(maps)
        per = {f: {"threshold": 0.5, "min_peak": 0.5, "min_extent_mm": 0.0, "min_area_mm2": 0.0,
                   "phrases": [f"{f} canonical"]} for f in names}
        super().__init__({"presence": {**per[names[0]], "per_finding": per, "match_min_cosine": 0.9,
                                       "exclusive": [["nodule", "cyst"]]}}, 16)
        self.table, self.asked = maps, []
        self._axes = {f: i for i, f in enumerate(names)}

    def encode_texts(self, texts):
        e = torch.zeros(len(texts), len(self._axes))
        for i, p in enumerate(texts):
            e[i, self._axes[p.split()[0]]] = 1.0
        return e, super().encode_texts(texts)[1]

    def maps(self, images, prompts):
        self.asked.append(list(prompts))
        maps = [self.table[p.split()[0]] * (0.7 if "weak" in p.split() else 1.0) for p in prompts]
        return torch.stack(maps)[None].repeat(len(images), 1, 1, 1), None


def test_a_prompt_naming_one_trained_findings_knowledge_entry_takes_that_findings_rule():
    """TGC-Net's reading names the knowledge entries it read ("knows:" words here): exactly one that is a trained
    finding picks its rule, whatever the text similarity says; none, several or other entries (a location): the
    closest phrasing decides as before."""
    import dataclasses

    from CLIPSegLib.inference.pipeline import finding_phrases, presence_rules

    class Knowing(_MapEngine):
        def encode_texts(self, texts):
            e, readings = super().encode_texts(texts)
            return e, [dataclasses.replace(r, knowledge=tuple(w[6:] for w in t.split() if w.startswith("knows:")))
                       for r, t in zip(readings, texts)]

    m = torch.zeros(16, 16)
    engine = Knowing({"nodule": m, "cyst": m, "calcification": m})
    presence = engine.spec["presence"]
    asked = engine.encode_prompts(["cyst knows:nodule", "cyst knows:nodule knows:calcification", "cyst",
                                   "cyst knows:location"])
    rules = presence_rules(engine, asked, engine.encode_prompts(finding_phrases(presence)), presence)
    assert [name for _, name, _ in rules] == ["nodule", "cyst", "cyst", "cyst"]
    assert rules[0][0] is presence["per_finding"]["nodule"] and rules[0][2] == 0.0  # its cosine, still reported


def test_a_rival_finding_nobody_asked_for_still_claims_its_voxels():
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.inference.pipeline import segment_volume

    nodule = torch.zeros(16, 16)
    nodule[2:10, 2:10] = 0.95  # the model is surer this is a nodule ...
    cyst = torch.zeros(16, 16)
    cyst[2:10, 2:10] = 0.8  # ... than a cyst; and a true cyst elsewhere
    cyst[12:15, 12:15] = 0.9
    engine = _MapEngine({"nodule": nodule, "cyst": cyst, "calcification": nodule})
    vol = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    res = segment_volume(engine, vol, Geometry.axis_aligned((1.0, 1.0, 1.0)), ["cyst please"], axis=2,
                         keep_probabilities=True)
    assert engine.asked[0] == ["cyst please", "nodule canonical"]  # the rival was predicted, not reported
    assert [f.prompt for f in res.findings] == ["cyst please"] and res.probabilities.shape == (1, 3, 16, 16)
    mask = res.findings[0].mask
    assert mask[:, 12:15, 12:15].all() and not mask[:, 2:10, 2:10].any()
    # asked for both, each keeps its own region; calcification is not exclusive with the nodule
    res = segment_volume(engine, vol, Geometry.axis_aligned((1.0, 1.0, 1.0)),
                         ["nodule", "cyst", "calcification"], axis=2)
    # the rivals are the model's own phrasings, not the user's other prompts
    assert engine.asked[-1] == ["nodule", "cyst", "calcification", "cyst canonical", "nodule canonical"]
    n, c, k = (f.mask for f in res.findings)
    assert n[:, 2:10, 2:10].all() and not n[:, 12:15, 12:15].any()
    assert c[:, 12:15, 12:15].all() and not c[:, 2:10, 2:10].any()
    assert k[:, 2:10, 2:10].all()


def test_a_prompt_mask_does_not_depend_on_the_other_prompts_of_the_run():
    """A rival asked by the user in a weaker phrasing must not change the decision: competition is always against
    the model's own phrasing of the rival finding, and the result says which rule read the prompt."""
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.inference.pipeline import segment_volume

    nodule = torch.zeros(16, 16)
    nodule[2:10, 2:10] = 0.95
    cyst = torch.zeros(16, 16)
    cyst[2:10, 2:10] = 0.8
    engine = _MapEngine({"nodule": nodule, "cyst": cyst, "calcification": nodule})
    vol = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    geometry = Geometry.axis_aligned((1.0, 1.0, 1.0))
    alone = segment_volume(engine, vol, geometry, ["cyst please"], axis=2).findings[0]
    for others in (["nodule weak"], ["calcification"], ["nodule weak", "calcification", "nodule canonical"]):
        res = segment_volume(engine, vol, geometry, ["cyst please"] + others, axis=2).findings[0]
        np.testing.assert_array_equal(res.mask, alone.mask, err_msg=f"with {others}")
        assert res.info["status"] == alone.info["status"] == "not found"
    assert alone.info["rule"] == "cyst" and alone.info["competes_with"] == ["nodule"]
    assert "read as the trained finding 'cyst'" in alone.message() and "'nodule'" in alone.message()
    assert alone.info["unseen_words"] == ["please"] and "never saw in training: 'please'" in alone.message()
    assert alone.info["tokens"] == ["cyst", "please"] and alone.info["truncated"] is False
    assert "interpreted as 'cyst please'" in alone.message() and alone.event()["prompt_warning"].startswith("words")


def test_flip_average_mirrors_each_slice_and_averages_the_two_predictions():
    from CLIPSegLib.inference.pipeline import predict_maps

    class Ramp(_StandIn):
        """Predicts a left-to-right ramp whatever the image: not mirror-symmetric, so flipping shows."""

        def __init__(self, flip):
            super().__init__({"inference": {"flip_average": flip}}, 8)
            self.calls = 0

        def maps(self, images, prompts):
            self.calls += 1
            ramp = torch.linspace(0.0, 1.0, 8).expand(len(images), len(prompts), 8, 8)
            return ramp.clone(), torch.full((len(images), len(prompts)), 0.25 * self.calls)

    vol = np.random.default_rng(1).random((2, 8, 8)).astype(np.float32)
    plain, s_plain = predict_maps(Ramp(False), vol, ["cyst"], slice_axis=2)
    np.testing.assert_allclose(plain[0, 0, 0], np.linspace(0, 1, 8), atol=1e-6)
    averaged, s_avg = predict_maps(Ramp(True), vol, ["cyst"], slice_axis=2)
    np.testing.assert_allclose(averaged, 0.5, atol=1e-6)  # ramp + mirrored ramp, halved
    np.testing.assert_allclose(s_avg, (0.25 + 0.5) / 2)  # presence of the two calls averaged
    forced, _ = predict_maps(Ramp(True), vol, ["cyst"], slice_axis=2, flip_average=False)
    np.testing.assert_allclose(forced, plain)


def test_flip_average_per_prompt_asks_the_mirror_only_the_flagged_prompts():
    """One flag per prompt (a report model's rule says it per finding): the flagged prompts are averaged with the
    mirror, the others keep the slice's own maps and presence, and the mirror is asked only the flagged ones."""
    from CLIPSegLib.inference.pipeline import predict_maps

    class Ramp(_StandIn):
        def __init__(self):
            super().__init__({}, 8)
            self.asked = []

        def maps(self, images, prompts):
            self.asked.append(list(prompts))
            ramp = torch.linspace(0.0, 1.0, 8).expand(len(images), len(prompts), 8, 8)
            return ramp.clone(), torch.full((len(images), len(prompts)), 0.2 * len(self.asked))

    vol = np.random.default_rng(1).random((2, 8, 8)).astype(np.float32)
    engine = Ramp()
    maps, presence = predict_maps(engine, vol, ["cyst", "nodule", "fluid"], slice_axis=2,
                                  flip_average=[False, True, False], batch_size=2)
    np.testing.assert_allclose(maps[[0, 2], 0, 0], np.stack([np.linspace(0, 1, 8)] * 2), atol=1e-6)
    np.testing.assert_allclose(maps[1], 0.5, atol=1e-6)
    np.testing.assert_allclose(presence[[0, 2]], 0.2)  # the own call's presence only
    np.testing.assert_allclose(presence[1], (0.2 + 0.4) / 2)
    assert engine.asked == [["cyst", "nodule", "fluid"], ["nodule"]]
    # a prompt given twice, once of the mirror too (as the calibration's flip choice asks): its own maps once
    engine = Ramp()
    twice, presence = predict_maps(engine, vol, ["cyst", "nodule", "cyst", "nodule"], slice_axis=2,
                                   flip_average=[False, False, True, True], batch_size=2)
    np.testing.assert_allclose(twice[:2], np.broadcast_to(np.linspace(0, 1, 8), twice[:2].shape), atol=1e-6)
    np.testing.assert_allclose(twice[2:], 0.5, atol=1e-6)
    np.testing.assert_allclose(presence[:2], 0.2)
    np.testing.assert_allclose(presence[2:], (0.2 + 0.4) / 2)
    assert engine.asked == [["cyst", "nodule"], ["cyst", "nodule"]]
    with pytest.raises(ValueError, match="2 flags for 3 prompts"):
        predict_maps(engine, vol, ["cyst", "nodule", "fluid"], slice_axis=2, flip_average=[True, False])


def test_a_findings_rule_that_says_flip_average_is_followed_and_reported():
    from CLIPSegLib.inference.pipeline import segment_volume
    from CLIPSegLib.io.geometry import Geometry

    off_centre = torch.zeros(16, 16)
    off_centre[4:8, 2:6] = 0.9  # its mirror is elsewhere, so averaging halves it
    maps = {"nodule": off_centre, "cyst": off_centre}
    engine = _MapEngine(maps)
    engine.spec["presence"]["per_finding"]["nodule"]["flip_average"] = True
    engine.spec["presence"]["exclusive"] = []
    res = segment_volume(engine, np.random.default_rng(0).random((1, 16, 16)).astype(np.float32),
                         Geometry.axis_aligned((1.0, 1.0, 1.0)), ["nodule canonical", "cyst canonical"], axis=2)
    nodule, cyst = res.findings
    assert nodule.info["flip_average"] is True and cyst.info["flip_average"] is False
    assert "this finding's rule averages each slice with its mirror" in nodule.message()
    assert "mirror" not in cyst.message() and cyst.info["flip_by_rule"] is False
    assert nodule.event()["flip_average"] is True
    assert nodule.info["status"] == "not found" and not nodule.mask.any()  # 0.45 after averaging, under 0.5
    assert cyst.info["status"] == "found" and cyst.mask.sum() == 16


@pytest.mark.parametrize("shape_kji,spacing_ijk,expected", [
    ((1, 30, 40), (0.5, 0.5, 3.0), 2),   # K = 1: an axial picture
    ((30, 40, 1), (0.5, 0.5, 0.5), 0),   # I = 1, spacing tie: a sagittal image, one slice along I
    ((30, 40, 1), (0.5, 0.5, 3.0), 0),   # I = 1 even when K has the largest spacing
    ((30, 1, 40), (0.5, 0.5, 0.5), 1),   # J = 1, tie: a coronal image
    ((30, 1, 40), (0.2, 0.5, 3.0), 1),   # J = 1, K thickest
    ((1, 30, 1), (1.0, 1.0, 1.0), 2),    # a line: K first
    ((20, 30, 40), (0.5, 0.5, 0.5), 2),  # full volume, all tied: K
    ((20, 30, 40), (0.5, 2.0, 0.5), 1),  # full volume: the thickest-spaced axis
    ((20, 30, 40), (2.0, 2.0, 0.5), 0),  # I and J tied above K: the first of them
])
def test_auto_axis_slices_a_one_voxel_thick_volume_along_its_thin_axis(shape_kji, spacing_ijk, expected):
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.inference.pipeline import choose_axis

    assert choose_axis(shape_kji, Geometry.axis_aligned(spacing_ijk[::-1]), "auto") == expected


@pytest.mark.parametrize("shape_kji,axis", [((24, 28, 1), 0), ((24, 1, 28), 1)])
def test_a_sagittal_or_coronal_image_is_segmented_as_one_slice(tiny_engine, shape_kji, axis):
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.inference.pipeline import segment_volume

    volume = np.random.default_rng(0).random(shape_kji).astype(np.float32)
    calls = []
    real = tiny_engine.predict

    def counting(images, prompts):
        calls.append(tuple(images.shape))
        return real(images, prompts)

    tiny_engine.predict = counting
    try:
        result = segment_volume(tiny_engine, volume, Geometry.axis_aligned((0.5, 0.5, 0.5)), ["cyst"])
    finally:
        del tiny_engine.predict
    assert result.slice_axis == axis and result.findings[0].mask.shape == shape_kji
    assert sum(c[0] for c in calls) == (2 if tiny_engine.spec.get("inference", {}).get("flip_average") else 1)


def test_a_model_that_reads_the_patients_sides_keeps_a_one_sided_segment_there_in_physical_space():
    """``inference.patient_sides``: the slices reach the engine with the patient's left on the image's right, also
    from a volume stored the other way round (direction x = -1, as NIfTI's RAS storage), and a prompt naming one side
    keeps only the voxels on that side of the body's midline (plus the margin); the result says so."""
    import dataclasses

    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.inference.pipeline import segment_volume

    class Sided(_MapEngine):
        def encode_texts(self, texts):
            e, readings = super().encode_texts(texts)
            return e, [dataclasses.replace(r, side=(1 if "left" in t.split() else -1 if "right" in t.split() else 0))
                       for r, t in zip(readings, texts)]

    lit = torch.zeros(16, 16)
    lit[4:12, 2:5] = 0.9  # the image's left half: the patient's right
    lit[4:12, 9:15] = 0.9  # the patient's left (wider: a mirrored input would not give the same voxels)
    engine = Sided({"nodule": lit, "cyst": torch.zeros(16, 16), "calcification": torch.zeros(16, 16)})
    engine.spec["inference"] = {"patient_sides": {"margin_mm": 1.0}}
    vol = (np.random.default_rng(0).random((3, 16, 16)) + 5.0).astype(np.float32)
    vol[:, :, 0] = vol[:, :, 15] = 0.0  # air on both sides: the body spans columns 1..14, midline x = 7.5 mm
    prompts = ["nodule in the left lung", "nodule in the right lung", "nodule"]
    stored = Geometry.axis_aligned((1.0, 1.0, 1.0))
    left, right, both = segment_volume(engine, vol, stored, prompts, axis=2).findings
    assert left.mask[:, 4:12, 9:15].all() and not left.mask[:, :, :7].any()
    assert right.mask[:, 4:12, 2:5].all() and not right.mask[:, :, 9:].any()
    assert both.mask[:, 4:12, 2:5].all() and both.mask[:, 4:12, 9:15].all() and "kept_to_side" not in both.info
    assert left.info["kept_to_side"] == {"side": "left", "midline_lps_x_mm": 7.5, "margin_mm": 1.0}
    assert "kept to the patient's left (up to 1 mm past the body's midline at LPS x = 7.5 mm)" in left.message()
    assert left.event()["kept_to_side"]["side"] == "left"
    # the same voxels stored with the columns toward the patient's right: the engine still sees the left on the
    # right, so the masks are the same voxels in physical space
    flipped = Geometry((1.0, 1.0, 1.0), (15.0, 0.0, 0.0), ((-1, 0, 0), (0, 1, 0), (0, 0, 1)))
    results = segment_volume(engine, np.ascontiguousarray(vol[:, :, ::-1]), flipped, prompts, axis=2).findings
    for again, first in zip(results, (left, right, both)):
        assert np.array_equal(again.mask[:, :, ::-1], first.mask)
    # a coronal stack stored with its rows (J) toward the head: the engine sees them toward the feet (the zone
    # words' frame), and the masks come back on the same voxels
    seen = []
    real = engine.predict
    engine.predict = lambda images, state: (seen.append(images[:, 0].clone()), real(images, state))[1]
    head_up = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 0, 1), (0, 1, 0)))
    feet_down = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 15.0), ((1, 0, 0), (0, 0, 1), (0, -1, 0)))
    upright = segment_volume(engine, vol, head_up, prompts, axis=2).findings
    rows_seen = seen[0]
    seen.clear()
    again = segment_volume(engine, np.ascontiguousarray(vol[:, ::-1]), feet_down, prompts, axis=2).findings
    assert torch.equal(rows_seen, seen[0])  # the same slices reached the network
    seen.clear()
    segment_volume(engine, vol, stored, prompts, axis=2)  # rows posterior (not head-feet): read as stored
    del engine.predict
    assert not torch.equal(rows_seen, seen[0])  # so the head-up storage was the one turned over
    for a, b in zip(upright, again):
        assert np.array_equal(a.mask, b.mask[:, ::-1]) and a.mask.any()
    # without the entry: no mirroring, no restriction
    engine.spec["inference"] = {}
    left, _, _ = segment_volume(engine, vol, stored, prompts, axis=2).findings
    assert left.mask[:, 4:12, 2:5].all() and "kept_to_side" not in left.info
