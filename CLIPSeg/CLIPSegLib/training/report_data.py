"""Report-style training and evaluation data: chest-radiograph phantoms (``synthetic.report_phantoms``) asked report
lines (``synthetic.report_text``) whose masks hold only what the line describes.

Seeds: training from ``REPORT_TRAIN_SEED_BASE``, calibration from ``REPORT_CALIBRATION_SEED_BASE``, evaluation its
own (``clipseg evaluate --family report --seed``). A case's lines are drawn from the seed, and the same draws give the
same content in either wording (``style`` "train" or "rephrased"), so the two wordings are scored on the same masks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..inference.preprocessing import resize_slices
from ..synthetic.report_phantoms import ReportPhantom, make_report_phantom
from ..synthetic.report_text import NORMAL_REPORTS, Query, sample_queries
from .datasets import apply_augmentation

REPORT_TRAIN_SEED_BASE = 40_000_000
REPORT_CALIBRATION_SEED_BASE = 50_000_000
QUERIES_PER_CASE = 3
TRAINING_WORDINGS = ("train", "varied")  # report_text styles a model may train on ("rephrased" is for evaluation)


def report_case(seed: int, style: str = "train", n: int = QUERIES_PER_CASE):
    """One evaluation or calibration case -> (image ``[J,I]`` raw intensities, spacing (row, column) in mm, up to
    ``n`` ``Query`` s in ``style``): ``report_lines`` without the phantom's other fields."""
    ph, queries = report_lines(seed, style, n)
    return ph.image, tuple(ph.spacing), queries


def report_lines(seed: int, style: str = "train", n: int = QUERIES_PER_CASE) -> tuple[ReportPhantom, list[Query]]:
    """The phantom of ``seed`` and up to ``n`` of its report lines in ``style``. A line drawn twice (the same kind,
    sides and zone) is asked once: a run takes each prompt once, and the content, not the wording, decides, so both
    wordings keep the same lines."""
    ph = make_report_phantom(seed=seed)
    queries, seen = [], set()
    for q in sample_queries(ph, np.random.default_rng([seed, 7]), n, style):
        if (q.kind, q.sides, q.zone) not in seen:
            seen.add((q.kind, q.sides, q.zone))
            queries.append(q)
    return ph, queries


def _resized(ph: ReportPhantom, size: int) -> ReportPhantom:
    """The phantom at ``size`` x ``size`` pixels (image bilinear, masks by nearest after a 0.5 threshold)."""
    def mask(m):
        return resize_slices(torch.from_numpy(m.astype(np.float32))[None, None], size)[0, 0].numpy() > 0.5

    image = resize_slices(torch.from_numpy(ph.image.astype(np.float32))[None, None], size)[0, 0].numpy()
    opacities = [dataclasses.replace(o, mask=mask(o.mask)) for o in ph.opacities]
    return dataclasses.replace(ph, image=image, lungs={s: mask(m) for s, m in ph.lungs.items()},
                               opacities=[o for o in opacities if o.mask.any()])


def make_report_augmentation():
    """MONAI dict transforms for report phantoms: intensity as ``datasets.make_augmentation`` (gamma, gain, noise,
    blur, bias field), geometry small (rotation, scale, shift) and no flip here: a mirrored chest swaps the left and
    right the report names, so ``ReportBank(mirror=True)`` mirrors the image and swaps its lines' side words
    together."""
    from monai import transforms as T

    return T.Compose([
        T.RandAdjustContrastd("image", prob=0.6, gamma=(0.6, 1.7)),
        T.RandScaleIntensityd("image", prob=0.5, factors=0.3),
        T.RandGaussianNoised("image", prob=0.3, std=0.04),
        T.RandGaussianSmoothd("image", prob=0.3, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        T.RandBiasFieldd("image", prob=0.3, coeff_range=(0.1, 0.3)),
        T.RandAffined(("image", "label"), prob=0.8, rotate_range=0.15, scale_range=(0.15, 0.15),
                      translate_range=(8, 8), mode=("bilinear", "nearest"), padding_mode="zeros"),
    ])


class ReportBank(torch.utils.data.Dataset):
    """``n`` pre-generated report phantoms (seeds ``seed_base + i``) at ``size`` pixels; each access asks
    ``n_prompts`` fresh report lines in ``wording`` ("train", or "varied": the training words with generic variety
    around them, ``report_text``; never "rephrased", the evaluation's) and augments image and masks together:
    ``(image [1,S,S] in [0,1], lines (P), masks [P,S,S])``. ``normal_phrases`` name an image without opacity for the
    contrastive CLIP stage; every line is its own concept there. ``mirror``: each access mirrors the image and masks
    left-right with probability 1/2 and swaps the side words of its lines (``Locations.mirrored``: the mirrored
    chest's left opacity is the line's right one), so the network learns the side from the slice's frame, not the
    heart's side, and a flip-averaged prediction (``inference.flip_average``) asks it what it was trained on.
    ``focus``: an opacity kind (``KINDS``) whose phantoms are drawn twice as often (each phantom holding one is listed
    twice: an epoch is longer), so the network sees more of a kind it misses."""

    concepts: dict = {}
    normal_phrases = NORMAL_REPORTS

    def __init__(self, n: int, size: int, seed_base: int = REPORT_TRAIN_SEED_BASE, augment: bool = True,
                 n_prompts: int = QUERIES_PER_CASE, progress=None, wording: str = "train", mirror: bool = False,
                 focus: str | None = None):
        from ..synthetic.report_phantoms import KINDS

        if wording not in TRAINING_WORDINGS:
            raise ValueError(f"wording must be one of {', '.join(TRAINING_WORDINGS)}, got {wording!r}")
        if focus is not None and focus not in KINDS:
            raise ValueError(f"focus must be one of {', '.join(KINDS)}, got {focus!r}")
        self.size, self.n_prompts, self.wording = size, n_prompts, wording
        self.mirror = None
        if mirror:
            from ..engines.tgcnet.location import load_locations

            self.mirror = load_locations()
        self.phantoms = []
        for i in range(n):
            self.phantoms.append(_resized(make_report_phantom(seed=seed_base + i), size))
            if progress:
                progress(i + 1, n)
        self.transform = make_report_augmentation() if augment else None
        self.focus = focus
        self.order = list(range(n)) + [i for i, ph in enumerate(self.phantoms)
                                       if focus is not None and any(o.kind == focus for o in ph.opacities)]

    def drawn_once(self) -> "ReportBank":
        """The same bank with every phantom listed once (no ``focus``): the contrastive CLIP stage's, where two
        copies of one phantom in a batch would be each other's false negatives."""
        import copy

        once = copy.copy(self)
        once.focus, once.order = None, list(range(len(self.phantoms)))
        return once

    def __len__(self):
        return len(self.order)

    def queries(self, i: int) -> list[Query]:
        """Fresh lines for item ``i`` (its phantom ``order[i]``), drawn from torch's generator (seeded by the training
        loop)."""
        rng = np.random.default_rng(int(torch.randint(2 ** 31, ())))
        return sample_queries(self.phantoms[self.order[i]], rng, self.n_prompts, self.wording)

    def __getitem__(self, i):
        queries = self.queries(i)
        masks = np.stack([q.mask for q in queries])
        image, texts = self.phantoms[self.order[i]].image, [q.text for q in queries]
        if self.mirror is not None and bool(torch.rand(()) < 0.5):  # torch's generator, seeded by the loop
            image, masks = image[:, ::-1].copy(), masks[..., ::-1].copy()
            texts = [self.mirror.mirrored(t) for t in texts]
        image, masks = apply_augmentation(self.transform, image, masks)
        return image, texts, masks


def report_calibration_cases(n: int, seed_base: int = REPORT_CALIBRATION_SEED_BASE):
    """``n`` held-out report phantoms as ``calibration.CalibrationCase`` s (one-slice volumes), every query keyed
    ``"<kind>|<volume>|<line>"`` (``report_kind`` reads the kind back: each kind gets its own rule)."""
    from .calibration import CalibrationCase

    for v in range(n):
        image, spacing, queries = report_case(seed_base + v)
        yield CalibrationCase(image[None], (spacing[1], spacing[0], 1.0),
                              {f"{q.kind}|{v}|{i}": q.mask[None] for i, q in enumerate(queries)},
                              {f"{q.kind}|{v}|{i}": q.text for i, q in enumerate(queries)})


def report_kind(key: str) -> str:
    """The opacity kind of a ``report_calibration_cases`` key."""
    return key.split("|")[0]


def calibrate_report_rules(engine, n: int, progress=None, seed_base: int = REPORT_CALIBRATION_SEED_BASE,
                           flip_choice: bool = False) -> dict:
    """The presence rule of any engine for report lines, calibrated on ``n`` held-out report phantoms (seeds from
    ``seed_base``): a global rule plus one per opacity kind (a hazy ground-glass map and a dense
    effusion need other tests), picked at inference by the kind the line names (TGC-Net: DATE's knowledge entry;
    else the kind name closest to the line, ``pipeline.presence_rules``). The maps are the model's own: flip
    averaged when its spec says so (the mirror asked the line with its sides swapped); with ``flip_choice`` a kind's
    rule takes the other setting when that scores clearly better on its lines (``calibrate_rules``). A kind's rule may
    take another probability threshold than 0.5 (``calibration.THRESHOLDS``): a hazy ground-glass map is hazy at
    its edges too. The rule records the engine's ``location_support`` (TGC-Net's, off for other engines), side
    margin (``laterality.patient_sides_of``) and flip averaging: the maps it was fitted to."""
    from ..inference.laterality import patient_sides_of
    from ..inference.pipeline import flip_average_of
    from ..synthetic.report_phantoms import KINDS
    from .calibration import THRESHOLDS, calibrate_rules

    rule = calibrate_rules(engine, report_calibration_cases(n, seed_base), {k: [k] for k in KINDS}, (), progress,
                           None, n, finding_of=report_kind, thresholds=THRESHOLDS, flip_choice=flip_choice)
    rule["calibration"].update({"volumes": n, "seeds": [seed_base, seed_base + n - 1],
                                "flip_average": flip_average_of(engine), "flip_choice": flip_choice,
                                "location_support": bool(getattr(engine, "location_support", False)),
                                "patient_sides": patient_sides_of(engine.spec)})
    return rule
