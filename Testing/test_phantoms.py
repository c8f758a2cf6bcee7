import numpy as np
import pytest

from CLIPSegLib.synthetic.phantoms import FINDINGS, PHRASES, make_phantom, random_volume_phantom


def test_same_seed_same_phantom_and_different_seed_differs():
    a = make_phantom((64, 64), seed=5)
    b = make_phantom((64, 64), seed=5)
    c = make_phantom((64, 64), seed=6)
    assert np.array_equal(a.image, b.image)
    assert a.findings == b.findings
    assert not np.array_equal(a.image, c.image)


def test_findings_have_their_ultrasound_appearance():
    ph = make_phantom((256, 256), seed=11, findings=FINDINGS)
    tissue = ~(ph.masks["nodule"] | ph.masks["cyst"] | ph.masks["calcification"])
    med = {f: np.median(ph.image[m]) for f, m in ph.masks.items()}
    bg = np.median(ph.image[tissue])
    assert med["cyst"] < med["nodule"] < bg < med["calcification"]
    # posterior acoustic enhancement: tissue just below the cyst is brighter than tissue beside it
    rows, cols = np.nonzero(ph.masks["cyst"])
    below = ph.image[rows.max() + 2: rows.max() + 12, cols.min() + 2: cols.max() - 1]
    assert below.mean() > bg


def test_volume_and_images_without_findings():
    v = make_phantom((8, 64, 64), seed=1, findings=("cyst",))
    assert v.image.shape == (8, 64, 64) and v.findings == ["cyst"]
    assert v.masks["cyst"].any() and v.masks["cyst"].shape == v.image.shape
    empty = make_phantom((64, 64), seed=2, findings=())
    assert empty.masks == {}
    assert {f for s in range(40) for f in make_phantom((64, 64), seed=s).findings} == set(FINDINGS)


def test_every_finding_has_several_phrasings():
    assert all(len(PHRASES[f]) >= 3 for f in FINDINGS)
    assert "hypoechoic thyroid nodule" in PHRASES["nodule"] and "anechoic cyst" in PHRASES["cyst"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown findings"):
        make_phantom((32, 32), findings=("tumour",))
    with pytest.raises(ValueError, match="shape"):
        make_phantom((32,))


def test_random_volume_phantom_geometry():
    ph = random_volume_phantom(123)
    assert 16 <= ph.image.shape[0] <= 40 and ph.image.shape[1:] == (256, 256)
    assert 0.5 <= ph.spacing[0] <= 1.0 and 0.2 <= ph.spacing[1] <= 0.3


def test_findings_declared_exclusive_never_share_a_voxel():
    from CLIPSegLib.synthetic.phantoms import EXCLUSIVE

    for seed in range(12):
        shape, spacing = ((96, 96), (0.5, 0.5)) if seed % 2 else ((24, 96, 96), (1.0, 0.5, 0.5))
        ph = make_phantom(shape, spacing, seed=seed, findings=FINDINGS)
        for a, b in EXCLUSIVE:
            assert a in ph.masks and b in ph.masks
            assert not (ph.masks[a] & ph.masks[b]).any(), (seed, a, b)
