"""A user's labelled slices for fine-tuning (``training.finetune``): read, check, split, and serve as samples.

DATA is either
  - a CSV with columns ``image,mask,phrase`` and an optional ``slices`` column (paths relative to the CSV): each row
    is one binary mask of one phrase on one image; ``slices`` lists the 0-based indices along the array's first axis
    K (the volume's K axis) that are labelled for that phrase, separated by semicolons (``3;7;12``); empty or absent:
    every slice is labelled;
  - or a folder with ``images/`` and ``labels/`` (label maps of the same file names) and a prompt map
    (``{"1": "white matter"}``): a slice is labelled when its label map holds any label there (a user painted it),
    for every phrase of the map.

Only labelled slices are used. An unlabelled slice is never a negative: no sample is made of it for that phrase, and
the calibration never counts it as "absent". A labelled slice whose mask is empty for a phrase is a negative for it.
Internal layout: images ``[K,J,I]`` as ``io.read.read_image`` gives them; slices are taken along K (array axis 0).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..inference.preprocessing import INTENSITIES, fit_slices, neighbours_of


@dataclass
class LabelledVolume:
    """One image and what is labelled on it. ``image``: ``[K,J,I]`` raw intensities; ``truth``: phrase -> bool
    ``[K,J,I]``; ``slices``: phrase -> sorted K indices labelled for it; ``source``: where it came from."""

    image: np.ndarray
    geometry: object
    truth: dict[str, np.ndarray]
    slices: dict[str, list[int]]
    source: dict = field(default_factory=dict)

    def holds(self, phrase: str, k: int) -> bool:
        """Whether slice ``k`` is labelled for ``phrase`` and its mask is not empty there."""
        return k in self.slices.get(phrase, ()) and bool(self.truth[phrase][k].any())


def parse_slices(text: str | None, depth: int, where: str) -> list[int]:
    """A ``slices`` cell (``"3;7;12"``; empty or None: every slice) -> sorted distinct K indices in ``0..depth-1``."""
    if text is None or not text.strip():
        return list(range(depth))
    out = set()
    for part in text.replace(";", " ").split():
        try:
            k = int(part)
        except ValueError:
            raise InputError(f"{where}: slices {text!r} must be 0-based slice indices along K separated by "
                             f"semicolons, e.g. \"3;7;12\" ({part!r} is not a whole number)") from None
        if not 0 <= k < depth:
            raise InputError(f"{where}: slice {k} is outside the image's 0..{depth - 1} slices along K; give "
                             f"0-based indices along the array's first axis (the volume's K axis)")
        out.add(k)
    return sorted(out)


def _read_checked(path: Path, image, geometry, image_name: str):
    from ..io.geometry import check_same_grid
    from ..io.read import read_image

    if not Path(path).is_file():
        raise InputError(f"mask {path} does not exist; check the path (relative to the CSV) or the labels/ folder")
    mask, mask_geometry = read_image(path)
    check_same_grid(mask, mask_geometry, image, geometry, str(path), image_name)
    return mask


def _from_table(table: Path) -> list[LabelledVolume]:
    from ..io.read import read_image
    from ..io.tables import read_table

    by_image: dict[Path, list] = {}
    for r in read_table(table, optional=("slices",), files=("image", "mask")):
        by_image.setdefault(r.path("image"), []).append(r)
    volumes = []
    for path, image_rows in by_image.items():
        image, geometry = read_image(path)
        v = LabelledVolume(image, geometry, {}, {}, {"image": str(path), "shape_kji": list(image.shape)})
        for r in image_rows:
            phrase = " ".join(r["phrase"].split())
            if phrase in v.truth:
                raise InputError(f"{r.where}: {phrase!r} is given twice for {r['image']}; merge the two masks into "
                                 f"one")
            v.truth[phrase] = _read_checked(r.path("mask"), image, geometry, str(path)) > 0
            v.slices[phrase] = parse_slices(r.get("slices"), image.shape[0], r.where)
        volumes.append(v)
    return volumes


def _from_folder(folder: Path, prompt_map: dict | None) -> list[LabelledVolume]:
    from ..evaluation.evaluator import load_cases
    from ..io.read import read_image

    volumes = []
    for case in load_cases(folder, prompt_map):
        image, geometry = read_image(case["image"])
        label_path = next(iter(case["truth"].values()))[1]
        labels = np.rint(_read_checked(label_path, image, geometry, str(case["image"])))
        painted = [int(k) for k in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))]
        v = LabelledVolume(image, geometry, {}, {}, {"image": str(case["image"]), "labels": str(label_path),
                                                     "shape_kji": list(image.shape)})
        for phrase, (_, _, value) in case["truth"].items():
            v.truth[phrase] = labels == value
            v.slices[phrase] = list(painted)
        volumes.append(v)
    return volumes


def read_data(data, prompt_map: dict | None = None) -> list[LabelledVolume]:
    """DATA (module docstring) -> its labelled volumes, checked: every mask on its image's grid, at least one
    labelled slice, and every phrase present (a non-empty mask) on at least one of its labelled slices."""
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        volumes = _from_table(data)
    elif data.is_dir():
        volumes = _from_folder(data, prompt_map)
    else:
        raise InputError(f"--data {data} is neither a CSV (image,mask,phrase[,slices]) nor a folder with images/ and "
                         f"labels/")
    if not any(ks for v in volumes for ks in v.slices.values()):
        raise InputError(f"{data}: no labelled slice: every label map is empty. Paint the structure on a few slices "
                         f"(each painted slice counts as labelled), or give a CSV with a slices column")
    for phrase in dict.fromkeys(p for v in volumes for p in v.truth):
        if not any(v.holds(phrase, k) for v in volumes for k in v.slices.get(phrase, ())):
            raise InputError(f"{data}: {phrase!r} has only empty masks on its labelled slices, so there is nothing "
                             f"to learn it from; paint it on the slices that hold it (or list those slices), or drop "
                             f"the phrase")
    return volumes


def in_patient_frame(volumes: list[LabelledVolume]) -> list[LabelledVolume]:
    """The volumes as a model that reads the patient's sides sees them (``inference.laterality``; slices along K): a
    volume whose columns (I) point to the patient's right is reversed along I, one whose rows (J) point to the head
    along J (``frame_flips``), its labels and geometry with it (the same voxels in physical space), so a fine-tuned
    model learns "left" and "upper" where its pipeline will ask them; the others are returned as they are."""
    from ..inference.laterality import frame_flips, mirrored_along

    out = []
    for v in volumes:
        axes = frame_flips(v.geometry, 2)
        if not axes:
            out.append(v)
            continue
        flip = lambda a: np.ascontiguousarray(np.flip(a, axes))  # noqa: E731
        geometry = v.geometry
        for a in axes:
            geometry = mirrored_along(geometry, a, v.image.shape[a])
        out.append(LabelledVolume(flip(v.image), geometry, {p: flip(m) for p, m in v.truth.items()}, v.slices,
                                  {**v.source, "mirrored": ",".join("KJI"[a] for a in axes)}))
    return out


def phrases_of(volumes: list[LabelledVolume]) -> list[str]:
    """Every phrase of the data, in order of first appearance."""
    return list(dict.fromkeys(p for v in volumes for p in v.truth))


def exclusive_pairs(volumes: list[LabelledVolume]) -> list[tuple[str, str]]:
    """Pairs of phrases that never share a voxel: each shown on at least one of the slices labelled for both, and
    no slice labelled for both has a voxel in both masks (a Slicer segmentation's segments on one layer, tissue
    classes, separate structures). The pipeline lets such phrases compete voxel-wise
    (``postprocess.suppress_exclusive``)."""
    phrases = phrases_of(volumes)
    pairs = []
    for n, a in enumerate(phrases):
        for b in phrases[n + 1:]:
            common = [(v, sorted(set(v.slices[a]) & set(v.slices[b]))) for v in volumes
                      if a in v.truth and b in v.truth]
            common = [(v, ks) for v, ks in common if ks]
            shown = all(any(v.truth[p][ks].any() for v, ks in common) for p in (a, b))
            if shown and not any((v.truth[a][ks] & v.truth[b][ks]).any() for v, ks in common):
                pairs.append((a, b))
    return pairs


Unit = tuple[int, int]  # (volume index, K index): one labelled slice


def _spread(pool: list, n: int) -> list:
    """``n`` distinct items of ``pool`` (n <= len), evenly spread, none at the ends unless needed."""
    return [pool[int(i)] for i in ((np.arange(n) + 0.5) * len(pool) / n)]


def split_slices(volumes: list[LabelledVolume], share: float) -> tuple[list[Unit], list[Unit]]:
    """Labelled slices -> (training slices, held-out calibration slices): about ``share`` of them held out for every
    phrase (a held-out slice is never trained on). Slices holding a structure are the scarce ones, so the held-out
    set takes one slice holding each phrase (the one nearest the middle of those holding it that leaves every phrase
    a slice holding it to train on) and fills the rest of its share with slices that hold none of them (the
    calibration's absent cases), spread evenly over all the volumes' labelled slices in order; only when those run
    out does it take more slices holding a phrase. Each phrase keeps at least one slice holding it on each side;
    InputError if a phrase is held by fewer than two slices, or if the phrases share their slices so that no split
    gives each one on both sides."""
    units = sorted({(v, k) for v, vol in enumerate(volumes) for ks in vol.slices.values() for k in ks})
    n_held = max(1, round(share * len(units)))
    holding = {p: [u for u in units if volumes[u[0]].holds(p, u[1])] for p in phrases_of(volumes)}
    for phrase, units_of in holding.items():
        if len(units_of) < 2:
            raise InputError(f"{phrase!r} is present on only {len(units_of)} labelled slice: label it on at least "
                             f"two slices (one is held out to calibrate its found / not-found rule, one is trained "
                             f"on)")
    held: set = set()

    def trainable(extra) -> bool:  # every phrase keeps a slice holding it to train on
        return all(any(u not in held and u not in extra for u in units_of) for units_of in holding.values())

    for phrase, units_of in holding.items():
        if any(u in held for u in units_of):
            continue
        middle = len(units_of) // 2
        pick = next((units_of[i] for i in sorted(range(len(units_of)), key=lambda i: abs(i - middle))
                     if trainable({units_of[i]})), None)
        if pick is None:
            raise InputError(f"{phrase!r} cannot keep a slice holding it both for training and for calibration: the "
                             f"slices that hold it are the only slices holding other phrases; label it on more "
                             f"slices")
        held.add(pick)
    empty = [u for u in units if not any(u in units_of for units_of in holding.values())]
    need = min(n_held - len(held), len(empty))
    if need > 0:
        held |= set(_spread(empty, need))
    if n_held > len(held):
        for u in _spread([u for u in units if u not in held], n_held - len(held)):
            if trainable({u}):
                held.add(u)
    return [u for u in units if u not in held], sorted(held)


def summary(volumes: list[LabelledVolume], train: list[Unit], held: list[Unit]) -> dict:
    """What a model was fine-tuned on (recorded in its spec): per phrase the labelled slices and those holding it,
    per volume its file and labelled slices, and the split."""
    per = {}
    for p in phrases_of(volumes):
        per[p] = {"labelled_slices": sum(len(v.slices.get(p, ())) for v in volumes),
                  "slices_holding_it": sum(v.holds(p, k) for v in volumes for k in v.slices.get(p, ())),
                  "voxels": int(sum(v.truth[p][v.slices[p]].sum() for v in volumes if p in v.truth))}
    return {"volumes": len(volumes), "phrases": per, "training_slices": len(train), "calibration_slices": len(held),
            "files": [{**v.source, "slices": {p: ks for p, ks in v.slices.items()}} for v in volumes]}


def fingerprint(volumes: list[LabelledVolume]) -> str:
    """SHA-256 of the data's voxels, masks and labelled slices (a checkpoint resumes only on the same data)."""
    h = hashlib.sha256()
    for v in volumes:
        h.update(np.ascontiguousarray(v.image).tobytes())
        for p in sorted(v.truth):
            h.update(p.encode())
            h.update(np.packbits(v.truth[p]).tobytes())
            h.update(np.asarray(v.slices[p], np.int64).tobytes())
    return h.hexdigest()


class SliceSamples(torch.utils.data.Dataset):
    """Samples of the labelled slices ``units`` as the pipeline prepares them: each volume normalised as a whole
    (``intensity``), each K slice fitted to ``size`` x ``size`` (``fit``); a sample holds only the phrases labelled
    on that slice: (image ``[C,S,S]`` in [0,1], phrases (P), masks ``[P,S,S]`` float {0,1}), augmented on access
    (``transform``: MONAI dict transforms on ``image``/``label``, or None). C = 1 + 2 x ``context``: the slice
    between its ``context`` neighbours along K on each side (labelled or not; the nearest slice repeated past the
    volume's ends), as the pipeline gives them to a network that reads them (``preprocessing.with_neighbours``)."""

    def __init__(self, volumes: list[LabelledVolume], units: list[Unit], size: int, fit: str = "squash",
                 intensity: str = "percentile", transform=None, context: int = 0):
        self.transform = transform
        self.items = []
        normalised = {}
        for v, k in units:
            vol = volumes[v]
            if v not in normalised:
                normalised = {v: INTENSITIES[intensity](vol.image)}  # one volume at a time: units are sorted
            phrases = [p for p, ks in vol.slices.items() if k in ks]
            near = neighbours_of(k, len(normalised[v]), context)[None]
            image = fit_slices(normalised[v][near], size, fit)[0]
            masks = torch.from_numpy(np.stack([vol.truth[p][k] for p in phrases]).astype(np.float32))
            masks = fit_slices(masks[None], size, fit)[0] > 0.5
            self.items.append((image, phrases, masks))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, phrases, masks = self.items[i]
        if self.transform is None:
            return image.clone(), list(phrases), masks.float()
        out = self.transform({"image": image, "label": masks.float()})
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().clamp(0, 1)
        return image, list(phrases), (torch.as_tensor(out["label"]).as_subclass(torch.Tensor) > 0.5).float()


class Mixed(torch.utils.data.Dataset):
    """The user's samples with a share ``replay_share`` of another dataset's (the parent's own training data),
    as one dataset of ``length`` items for ``loop.run_loop``'s shuffled batches: items below ``length x (1 -
    replay_share)`` cycle through ``user``, the rest through ``replay``."""

    def __init__(self, user, replay, replay_share: float, length: int = 4096):
        self.user, self.replay = user, replay
        self.n_user = length if replay is None else int(round(length * (1 - replay_share)))
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if i < self.n_user:
            return self.user[i % len(self.user)]
        return self.replay[(i - self.n_user) % len(self.replay)]
