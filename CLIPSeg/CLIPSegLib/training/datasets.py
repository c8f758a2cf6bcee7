"""Training data: (image, phrases, masks) samples from phantoms or from a folder of labelled images.

A sample is ``(image [C,S,S] float in [0,1], phrases list[str] (P items), masks [P,S,S] float {0,1})``; S is the
model's input size, C is 1, or 1 + 2 x context for a network that reads neighbouring slices (the slice in the
middle). Phantom samples carry one phrase per finding (a random phrasing), with an empty mask when the finding is
absent, so the model learns both selectivity (prompt swap) and absence.

Folder layout for your own data: a CSV with columns ``image,mask,phrase`` (paths relative to the CSV). Each row is a
binary mask for one phrase; 3D images contribute every slice along K.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..synthetic.families import make_phantom, random_volume_phantom
from ..synthetic.phantoms import FINDINGS, PHRASES
from ..inference.preprocessing import neighbours_of, normalize_intensity, resize_slices

TRAIN_SEED_BASE = 10_000_000  # phantom seeds used for training; calibration and evaluation use other ranges
CALIBRATION_SEED_BASE = 20_000_000
TRAIN_VOLUME_SEED_BASE = 30_000_000  # 3D phantoms whose slices are added to the segmenter's training bank
NORMAL_PHRASES = ("normal thyroid tissue", "no focal lesion", "normal tissue")


def raw_phantom_slice(seed: int, size: int, family: str = "A") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 2D phantom of ``family`` ("A", "B" or "A+B", ``synthetic.families``) at a random field of view and matrix,
    resized to ``size``: (image [S,S], masks {f: [S,S]})."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([128, 160, 192, 256]))
    fov = rng.uniform(40.0, 90.0)  # mm
    aspect = rng.uniform(0.8, 1.25)
    spacing = (fov * aspect / n, fov / n)
    p = make_phantom((n, n), spacing=spacing, seed=seed, family=family)
    img = resize_slices(torch.from_numpy(p.image)[None, None], size)[0, 0].numpy()
    masks = {f: resize_slices(torch.from_numpy(m.astype(np.float32))[None, None], size)[0, 0].numpy() > 0.5
             for f, m in p.masks.items()}
    return img, masks


def volume_phantom_slices(seed: int, size: int, family: str = "A") -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Every K slice of ``families.random_volume_phantom(seed, family)``, resized to ``size``: [(image [S,S], masks)].

    Slices cut from volumes hold what 2D phantoms rarely do: the thin end cuts of a nodule or cyst, foci seen on one
    slice, and many slices with no finding at all, as the pipeline sees them."""
    p = random_volume_phantom(seed, family)
    images = resize_slices(torch.from_numpy(p.image)[:, None], size)[:, 0].numpy()
    masks = {f: resize_slices(torch.from_numpy(m.astype(np.float32))[:, None], size)[:, 0].numpy() > 0.5
             for f, m in p.masks.items()}
    return [(images[k], {f: m[k] for f, m in masks.items() if m[k].any()}) for k in range(len(images))]


class PhantomBank(torch.utils.data.Dataset):
    """``n`` pre-generated 2D phantoms (seeds ``TRAIN_SEED_BASE + i``) plus the K slices of ``volumes`` 3D phantoms
    (seeds ``TRAIN_VOLUME_SEED_BASE + v``), of phantom ``family`` ("A", "B" or the mixture "A+B"), augmented on
    access.

    Each access returns ``n_prompts`` of the findings (a random subset, in FINDINGS order), each with a random
    phrasing and its mask (empty if absent). ``concepts`` (phrasing -> finding) and ``normal_phrases`` tell the
    contrastive CLIP stage which texts name the same thing and what to call an image with no finding.

    ``context`` (settable): neighbouring slices on each side returned with each image as channels (a network's
    ``context_slices``): a volume slice gets its own volume's neighbours (the nearest slice repeated past its ends),
    a 2D phantom itself repeated (it has none)."""

    concepts = {p: f for f in FINDINGS for p in PHRASES[f]}
    normal_phrases = NORMAL_PHRASES

    def __init__(self, n: int, size: int, seed_base: int = TRAIN_SEED_BASE, augment: bool = True, progress=None,
                 n_prompts: int = len(FINDINGS), volumes: int = 0, family: str = "A", context: int = 0):
        self.size, self.augment, self.n_prompts, self.context = size, augment, n_prompts, context
        samples, spans = [], []
        for i in range(n + volumes):
            if i < n:
                samples.append(raw_phantom_slice(seed_base + i, size, family))
                spans.append((len(samples) - 1, len(samples) - 1))
            else:
                cut = volume_phantom_slices(TRAIN_VOLUME_SEED_BASE + i - n, size, family)
                spans.extend([(len(samples), len(samples) + len(cut) - 1)] * len(cut))
                samples.extend(cut)
            if progress:
                progress(i + 1, n + volumes)
        self.images = np.zeros((len(samples), size, size), np.float32)
        self.masks = np.zeros((len(samples), len(FINDINGS), size, size), bool)
        for i, (img, masks) in enumerate(samples):
            self.images[i] = img
            for j, f in enumerate(FINDINGS):
                if f in masks:
                    self.masks[i, j] = masks[f]
        self.spans = np.asarray(spans, np.int64).reshape(-1, 2)  # [N, 2]: first and last slice of each one's volume
        self.transform = make_augmentation() if augment else None

    def __len__(self):
        return len(self.images)

    def image_stack(self, i: int) -> np.ndarray:
        """Sample ``i``'s image ``[S,S]``, or ``[1 + 2 x context, S, S]`` between its neighbours (class docstring)."""
        if not self.context:
            return self.images[i]
        first, last = self.spans[i]
        return self.images[first + neighbours_of(i - first, last - first + 1, self.context).numpy()]

    def __getitem__(self, i):
        which = torch.randperm(len(FINDINGS))[: self.n_prompts].sort().values.tolist()
        image, masks = apply_augmentation(self.transform, self.image_stack(i), self.masks[i][which])
        phrases = [PHRASES[FINDINGS[j]][int(torch.randint(len(PHRASES[FINDINGS[j]]), ()))] for j in which]
        return image, phrases, masks


class FolderTriples(torch.utils.data.Dataset):
    """Slices of labelled images listed in a CSV (``image,mask,phrase``), resized to ``size`` and augmented; with
    ``context``, each slice between its neighbours along K as channels (``PhantomBank``)."""

    def __init__(self, csv_path: Path, size: int, augment: bool = True, context: int = 0):
        from ..io.geometry import check_same_grid
        from ..io.read import read_image

        from ..io.tables import read_table

        self.items, self.context = [], context
        for r in read_table(csv_path, files=("image", "mask"), name=f"training table {csv_path}"):
            image, image_geometry = read_image(r.path("image"))
            mask, mask_geometry = read_image(r.path("mask"))
            check_same_grid(mask, mask_geometry, image, image_geometry, r["mask"], r["image"])
            norm = resize_slices(normalize_intensity(image)[:, None], size)[:, 0].numpy()  # [K,S,S]
            for k in range(image.shape[0]):
                m = resize_slices(torch.from_numpy((mask[k] > 0).astype(np.float32))[None, None], size)[0, 0] > 0.5
                self.items.append((norm, k, m.numpy()[None], r["phrase"]))
        self.transform = make_augmentation() if augment else None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        norm, k, m, phrase = self.items[i]
        img = norm[neighbours_of(k, len(norm), self.context).numpy()] if self.context else norm[k]
        image, masks = apply_augmentation(self.transform, img, m)
        return image, [phrase], masks


def make_augmentation(mild: bool = False, flip: bool = True):
    """MONAI dict transforms: intensity (gamma, gain, noise, speckle-like Rician noise, blur, bias field) on the raw
    image, then geometry (rotation, scale, shear, translation, flips), on keys ``image`` ``[C,S,S]`` and ``label``
    ``[P,S,S]``. ``mild``: for a user's real images, whose intensities carry the meaning (grey vs white matter):
    a narrower gamma and gain, light noise and bias field, smaller rotations and scalings, no Rician speckle.
    ``flip`` False (with ``mild``): no left-right flip, for a model that reads the patient's sides
    (``inference.laterality``), where a mirrored slice would answer the other side's question."""
    from monai import transforms as T

    if mild:
        return T.Compose([
            T.RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
            T.RandScaleIntensityd("image", prob=0.3, factors=0.1),
            T.RandGaussianNoised("image", prob=0.2, std=0.02),
            T.RandBiasFieldd("image", prob=0.2, coeff_range=(0.05, 0.15)),
            T.RandAffined(("image", "label"), prob=0.8, rotate_range=0.25, scale_range=(0.15, 0.15),
                          shear_range=0.05, translate_range=(8, 8), mode=("bilinear", "nearest"),
                          padding_mode="zeros"),
            *([T.RandFlipd(("image", "label"), prob=0.5, spatial_axis=1)] if flip else []),
        ])
    return T.Compose([
        T.RandAdjustContrastd("image", prob=0.6, gamma=(0.5, 2.0)),
        T.RandScaleIntensityd("image", prob=0.5, factors=0.4),
        T.RandRicianNoised("image", prob=0.3, std=0.08, relative=True, channel_wise=True),
        T.RandGaussianNoised("image", prob=0.3, std=0.05),
        T.RandGaussianSmoothd("image", prob=0.3, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        T.RandBiasFieldd("image", prob=0.3, coeff_range=(0.1, 0.4)),
        T.RandAffined(("image", "label"), prob=0.8, rotate_range=0.5, scale_range=(0.3, 0.3), shear_range=0.1,
                      translate_range=(12, 12), mode=("bilinear", "nearest"), padding_mode="reflection"),
        T.RandFlipd(("image", "label"), prob=0.5, spatial_axis=1),
        T.RandFlipd(("image", "label"), prob=0.1, spatial_axis=0),
    ])


def apply_augmentation(transform, image: np.ndarray, masks: np.ndarray):
    """image ``[S,S]`` (or ``[C,S,S]``: a slice between its neighbours, transformed alike) raw intensities, masks
    ``[P,S,S]`` -> (``[1,S,S]`` (``[C,S,S]``) in [0,1], ``[P,S,S]`` float)."""
    img = torch.from_numpy(np.asarray(image, np.float32))
    img = img[None] if img.ndim == 2 else img
    img = img / (img.max() + 1e-6)
    lab = torch.from_numpy(np.asarray(masks, np.float32))
    if transform is not None:
        out = transform({"image": img, "label": lab})
        img, lab = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
    return normalize_intensity(img.float()), (lab > 0.5).float()


def collate(batch):
    """-> images ``[B,C,S,S]``, phrases list (N), masks ``[N,S,S]``, pair_index ``[N]`` (image of each phrase)."""
    images = torch.stack([torch.as_tensor(b[0]) for b in batch])
    phrases = [p for b in batch for p in b[1]]
    masks = torch.cat([torch.as_tensor(b[2]) for b in batch])
    pair_index = torch.tensor([i for i, b in enumerate(batch) for _ in b[1]], dtype=torch.long)
    return images, phrases, masks, pair_index
