"""The domain check: a run on an image unlike the model's training data is flagged, a phantom is not."""

import json

import numpy as np


def _ct_like(shape=(6, 128, 128), seed=0):
    """A CT-like slab: a smooth soft-tissue ellipse with mild noise in air, nothing like ultrasound speckle."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    body = ((j - shape[1] / 2) / (shape[1] * 0.42)) ** 2 + ((i - shape[2] / 2) / (shape[2] * 0.35)) ** 2 < 1
    return np.where(body, 40.0, -1000.0) + rng.normal(0, 8, shape)


def test_features_tell_speckle_from_smooth_tissue():
    import torch

    from CLIPSegLib.inference.domain import check_domain, pipeline_slices, volume_features
    from CLIPSegLib.synthetic.phantoms import random_volume_phantom

    domain = {"features": {"speckle": [0.057, 0.5], "dark_fraction": [0.0, 0.072], "median": [0.31, 1.12]}}
    phantom = volume_features(pipeline_slices(random_volume_phantom(1000).image, 0, 128))
    ct = volume_features(pipeline_slices(_ct_like(), 0, 128))
    assert check_domain(phantom, domain) == []
    warnings = check_domain(ct, domain)
    assert warnings and any("speckle" in w or "near-black" in w for w in warnings)
    assert check_domain(ct, None) == [] and volume_features(torch.zeros(3, 1, 8, 8)) == {}


def test_embedded_model_flags_a_ct_like_image_but_not_a_held_out_phantom(tmp_path, capsys):
    from CLIPSegLib.cli import main
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.io.outputs import write_volume
    from CLIPSegLib.synthetic.phantoms import make_phantom

    ph = make_phantom((8, 160, 160), spacing=(0.8, 0.25, 0.25), seed=1001, findings=("nodule",))
    write_volume(tmp_path / "us.nrrd", ph.image, Geometry.axis_aligned(ph.spacing))
    write_volume(tmp_path / "ct.nrrd", _ct_like(), Geometry.axis_aligned((5.0, 0.66, 0.66)))
    out = {}
    for name in ("us", "ct"):
        code = main(["segment", str(tmp_path / f"{name}.nrrd"), "--prompt", "lung nodule", "--output",
                     str(tmp_path / f"{name}.seg.nrrd"), "--device", "cpu", "--progress", "json"])
        assert code == 0
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        out[name] = events
    done = {name: next(e for e in ev if e["event"] == "done") for name, ev in out.items()}
    assert done["us"]["out_of_domain"] is False and not done["us"]["findings"][0]["out_of_domain"]
    assert done["ct"]["out_of_domain"] is True and done["ct"]["findings"][0]["out_of_domain"] is True
    texts = [e["text"] for e in out["ct"] if e["event"] == "message"]
    assert any("does not look like what the model was trained on" in t and "ultrasound" in t for t in texts)
    # the finding's own line says so too, and how the prompt was read
    assert any(t.startswith("'lung nodule'") and "outside the model's training domain" in t and
               "read as the trained finding 'nodule'" in t for t in texts)


def test_bf16_on_a_cpu_without_native_bf16_runs_in_fp32_and_says_so(tiny_model, tmp_path, monkeypatch):
    from CLIPSegLib.engines import contract as base
    from CLIPSegLib.inference.segment_file import load_engine

    (tmp_path / "old").write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    (tmp_path / "avx512").write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")  # no AMX: slower
    (tmp_path / "amx").write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    (tmp_path / "arm").write_text("processor : 0\nFeatures : fp asimd sve bf16 i8mm\n")
    assert [base.native_bf16(str(tmp_path / n)) for n in ("old", "avx512", "amx", "arm")] == [False, False, True, True]
    assert base.native_bf16(str(tmp_path / "none")) is None
    notes = []
    monkeypatch.setattr(base, "native_bf16", lambda: False)
    engine = load_engine(str(tiny_model), device="cpu", precision="bf16", notify=notes.append)
    assert engine.precision == "fp32" and "bf16 ignored" in notes[0]
    monkeypatch.setattr(base, "native_bf16", lambda: True)
    assert load_engine(str(tiny_model), device="cpu", precision="bf16").precision == "bf16"


def test_a_domain_measured_with_other_preprocessing_is_not_checked():
    from CLIPSegLib.engines.contract import Preprocessing
    from CLIPSegLib.inference.domain import comparable_domain

    domain = {"features": {"speckle": [0.05, 0.5]}, "measured_with": {"input_size": 128, "fit": "squash"}}
    assert comparable_domain(domain, Preprocessing(128, "squash")) is domain
    assert comparable_domain(domain, Preprocessing(128, "pad")) is None  # padding adds black: not comparable
    assert comparable_domain(domain, Preprocessing(352, "squash")) is None
    assert comparable_domain(None, Preprocessing(128, "pad")) is None


def test_a_model_trained_on_both_families_measures_its_domain_on_both(monkeypatch):
    """The reference of an A+B model spans family-B volumes too: a B volume darker than family A's range (held-out
    seed 1008: median 0.26, under the family-A model's lower bound 0.31, its darkest A run / 1.5) is flagged by an
    A reference and inside a B or A+B one."""
    from CLIPSegLib.inference import domain
    from CLIPSegLib.synthetic.families import family_of, random_volume_phantom
    from CLIPSegLib.training.datasets import TRAIN_SEED_BASE, TRAIN_VOLUME_SEED_BASE

    small = {"n_volumes": 4, "n_images": 4}
    picked = [family_of(b + i, "A+B") for b in (TRAIN_VOLUME_SEED_BASE, TRAIN_SEED_BASE) for i in range(4)]
    assert {"A", "B"} <= set(picked)  # the small mixture measures both families
    a, b, both = ({"features": domain.phantom_reference(family=f, **small)} for f in ("A", "B", "A+B"))
    dark_b = domain.volume_features(domain.pipeline_slices(random_volume_phantom(1008, "B").image, 0, 128, "squash"))
    assert [w for w in domain.check_domain(dark_b, a) if w.startswith("median normalised intensity")]
    assert not domain.check_domain(dark_b, b) and not domain.check_domain(dark_b, both)
    monkeypatch.setattr(domain, "phantom_reference", lambda **kw: kw)  # the entry says which families it measured
    spec = domain.phantom_domain(family="A+B")
    assert spec["features"]["family"] == "A+B" and "family A+B" in spec["modality"] and "family A+B" in spec["source"]
    assert domain.phantom_domain()["modality"] == domain.PHANTOM_MODALITY  # family A reads as it always did
