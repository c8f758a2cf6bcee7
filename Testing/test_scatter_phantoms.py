"""Phantom family B (``synthetic.scatter_phantoms``) and the family choice (``synthetic.families``)."""

import numpy as np
import pytest
from scipy import ndimage, stats

from CLIPSegLib.synthetic import families, phantoms
from CLIPSegLib.synthetic.phantoms import EXCLUSIVE, FINDINGS
from CLIPSegLib.synthetic.scatter_phantoms import make_scatter_phantom, random_scatter_volume


def test_same_seed_same_phantom_and_different_seed_differs():
    for shape in ((96, 80), (5, 64, 48)):
        a, b = make_scatter_phantom(shape, seed=5), make_scatter_phantom(shape, seed=5)
        c = make_scatter_phantom(shape, seed=6)
        assert np.array_equal(a.image, b.image) and a.findings == b.findings
        assert all(np.array_equal(a.masks[f], b.masks[f]) for f in a.masks)
        assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("shape, spacing", [((192, 160), (0.3, 0.3)), ((6, 160, 128), (0.9, 0.25, 0.35))])
def test_shapes_masks_and_phrasings_follow_family_a(shape, spacing):
    ph = make_scatter_phantom(shape, spacing, seed=3, findings=FINDINGS)
    assert ph.image.shape == shape and ph.image.dtype == np.float32 and np.isfinite(ph.image).all()
    assert ph.image.min() >= 0 and ph.image.max() > 100
    assert ph.spacing == spacing and ph.findings == list(FINDINGS)
    assert ph.descriptions == {f: phantoms.PHRASES[f] for f in FINDINGS}
    for f, m in ph.masks.items():
        assert m.dtype == bool and m.shape == shape and m.any(), f


def test_masks_lie_inside_the_image_and_exclusive_findings_never_share_a_voxel():
    for seed in range(10):
        shape, spacing = ((128, 128), (0.4, 0.4)) if seed % 2 else ((16, 96, 96), (1.0, 0.5, 0.5))
        ph = make_scatter_phantom(shape, spacing, seed=seed, findings=FINDINGS)
        for a, b in EXCLUSIVE:
            assert a in ph.masks and b in ph.masks
            assert not (ph.masks[a] & ph.masks[b]).any(), (seed, a, b)
        for f in ("nodule", "cyst"):  # whole lesions: placed with a margin, never cut by the image border
            m = ph.masks[f]
            border = np.zeros_like(m)
            for ax in range(m.ndim - 2, m.ndim):  # in-plane borders (a volume's end slices may cut a lesion)
                index = [slice(None)] * m.ndim
                for end in (0, -1):
                    index[ax] = end
                    border[tuple(index)] = True
            assert not (m & border).any(), (seed, f)


def test_findings_are_drawn_like_family_a_so_absent_cases_come_at_the_same_rate():
    same = [families.make_phantom((160, 160), seed=s, family="B").findings
            == families.make_phantom((160, 160), seed=s, family="A").findings for s in range(30)]
    assert sum(same) >= 28  # the same draw decides presence; a rare failed placement may drop one
    drawn = [make_scatter_phantom((96, 96), (0.5, 0.5), seed=s).findings for s in range(30)]
    assert any(d == [] for d in drawn) and {f for d in drawn for f in d} == set(FINDINGS)


def _posterior_ratio(ph, finding, depth_mm=6.0):
    """Median image intensity in a band below ``finding`` (its largest piece, in its fullest slice) over the median
    at the same depth in columns beside it with no finding above: > 1 enhancement, < 1 shadow. None if no room."""
    img, truth = ph.image, ph.masks[finding]
    k = int(np.argmax(truth.sum(axis=(1, 2)))) if truth.ndim == 3 else None
    plane = (lambda a: a[k]) if k is not None else (lambda a: a)
    img, truth = plane(img), plane(truth)
    lab, n = ndimage.label(truth)
    piece = lab == 1 + int(np.argmax(ndimage.sum(truth, lab, range(1, n + 1))))
    rows, cols = np.nonzero(piece)
    w = cols.max() - cols.min() + 1
    core = np.arange(cols.min() + w // 4, cols.max() - w // 4 + 1)
    r0, r1 = rows.max() + 2, min(rows.max() + 2 + int(depth_mm / ph.spacing[-2]), img.shape[0])
    clear = ~np.any([plane(m)[:r1] for m in ph.masks.values()], axis=(0, 1))  # columns with nothing above
    side = [c for off in (-2 * w, 2 * w) for c in core + off if 0 <= c < img.shape[1] and clear[c]]
    if r1 - r0 < 4 or len(side) < 3:
        return None
    return float(np.median(img[r0:r1, core]) / np.median(img[r0:r1, side]))


@pytest.mark.parametrize("shape", [(256, 256), (12, 160, 160)])
def test_shadow_below_calcifications_and_enhancement_below_cysts_come_from_the_attenuation(shape):
    shadows = [_posterior_ratio(make_scatter_phantom(shape, seed=s, findings=("calcification",), steer_deg=0.0),
                                "calcification") for s in range(6)]
    cysts = [_posterior_ratio(make_scatter_phantom(shape, seed=s, findings=("cyst",), steer_deg=0.0), "cyst")
             for s in range(6)]
    shadows, cysts = [r for r in shadows if r is not None], [r for r in cysts if r is not None]
    assert len(shadows) >= 4 and len(cysts) >= 4
    assert max(shadows) < 0.85, shadows  # darker below the focus than beside it at the same depth
    assert min(cysts) > 1.0 and np.median(cysts) > 1.08, cysts  # brighter below the cyst


def test_a_steered_beam_casts_the_shadow_along_the_beam():
    """Seed 6 holds one focus. 15 mm below it the shadow is straight below with the beam along J, and shifted by
    15 mm x tan(12 deg) with the beam steered 12 degrees; the truth mask does not move."""
    tilted = make_scatter_phantom((256, 256), seed=6, findings=("calcification",), steer_deg=12.0)
    straight = make_scatter_phantom((256, 256), seed=6, findings=("calcification",), steer_deg=0.0)
    truth = straight.masks["calcification"]
    assert np.array_equal(tilted.masks["calcification"], truth) and ndimage.label(truth)[1] == 1
    rows, cols = np.nonzero(truth)
    r, c = rows.max() + 60, int(round(cols.mean()))  # 60 rows of 0.25 mm below the focus
    shift = 60 * np.tan(np.deg2rad(12.0))

    def darkest_column(image):
        profile = ndimage.uniform_filter1d(image[r - 6:r + 6].mean(axis=0), 5)
        return int(np.argmin(profile[c - 30:c + 31])) - 30 + c

    assert abs(darkest_column(straight.image) - c) <= 3
    assert abs(darkest_column(tilted.image) - (c + shift)) <= 3


def test_bright_point_scatterers_that_are_not_calcifications():
    """Heavy-tailed bright dots in tissue: in some family-B images with no calcification at all, tissue holds
    pixels more than 3 SD above its mean; never in family A's speckle."""

    def tail(image):
        patch = image[100:228, 32:224].astype(np.float64)  # gland, below the superficial layers
        return float((patch > patch.mean() + 3 * patch.std()).mean())

    b = [tail(make_scatter_phantom((256, 256), seed=s, findings=()).image) for s in range(12)]
    a = [tail(phantoms.make_phantom((256, 256), seed=s, findings=()).image) for s in range(12)]
    assert sum(t > 1e-3 for t in b) >= 3 and max(a) < 1e-4, (a, b)
    bright = []  # with calcifications present: such pixels far (> 2 mm) from any calcification mask
    for seed in range(12):
        ph = make_scatter_phantom((256, 256), seed=seed, findings=("calcification",))
        far = ~ndimage.binary_dilation(ph.masks["calcification"], iterations=8)
        tissue = ph.image[100:][far[100:]]
        bright.append(int(((ph.image > tissue.mean() + 3 * tissue.std()) & far).sum()))
    assert sum(n > 10 for n in bright) >= 2, bright


def test_speckle_statistics_differ_from_family_a():
    """Speckle size along the beam: family B's is set by the pulse length (pixel-to-pixel correlation along depth
    well above family A's low-pass Gaussian speckle). A two-sample test over 12 seeds each."""

    def axial_correlation(image):
        z = image[100:228, 32:224].astype(np.float64)
        z = (z - z.mean()) / z.std()
        return float(np.corrcoef(z[1:].ravel(), z[:-1].ravel())[0, 1])

    a = [axial_correlation(phantoms.make_phantom((256, 256), seed=s, findings=()).image) for s in range(12)]
    b = [axial_correlation(make_scatter_phantom((256, 256), seed=s, findings=()).image) for s in range(12)]
    assert stats.mannwhitneyu(a, b).pvalue < 1e-3 and np.median(b) > np.median(a) + 0.2, (a, b)


def test_random_volume_geometry_is_anisotropic_and_seeded():
    ph = random_scatter_volume(123, shape_ij=(64, 64))
    assert 16 <= ph.image.shape[0] <= 40 and ph.image.shape[1:] == (64, 64)
    k, j, i = ph.spacing
    assert 0.4 <= k <= 1.2 and 0.15 <= j <= 0.3 and 0.2 <= i <= 0.32
    assert np.array_equal(random_scatter_volume(123, shape_ij=(64, 64)).image, ph.image)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown findings"):
        make_scatter_phantom((32, 32), findings=("tumour",))
    with pytest.raises(ValueError, match="shape"):
        make_scatter_phantom((32,))
    with pytest.raises(ValueError, match="spacing"):
        make_scatter_phantom((32, 32), spacing=(0.5,))
    with pytest.raises(ValueError, match="'C' is not one of A, B, A\\+B"):
        families.random_volume_phantom(1, "C")


def test_family_a_through_families_is_unchanged_and_the_mixture_takes_both():
    a = families.random_volume_phantom(1000, "A")
    assert np.array_equal(a.image, phantoms.random_volume_phantom(1000).image)
    picked = [families.family_of(s, "A+B") for s in range(40)]
    assert {"A", "B"} == set(picked) and picked == [families.family_of(s, "A+B") for s in range(40)]
    s = picked.index("B")
    assert np.array_equal(families.make_phantom((64, 64), seed=s, family="A+B").image,
                          make_scatter_phantom((64, 64), seed=s).image)


def test_training_and_calibration_banks_take_a_family():
    from CLIPSegLib.training.calibration import phantom_cases
    from CLIPSegLib.training.datasets import raw_phantom_slice

    img_a, _ = raw_phantom_slice(7, 64)
    img_b, masks_b = raw_phantom_slice(7, 64, family="B")
    assert img_a.shape == img_b.shape == (64, 64) and not np.allclose(img_a, img_b)
    assert all(m.shape == (64, 64) for m in masks_b.values())
    case = next(phantom_cases(1, seed_base=5, family="B"))
    assert np.array_equal(case.image, random_scatter_volume(5).image)
