"""MedCLIP-SAM's weakly supervised stage (v2's recipe, with a MONAI UNet in place of nnU-Net): a zero-shot model
(a ``medclipsam`` spec, or any model) segments every volume of an unlabelled folder through the pipeline
(``pipeline.segment_volume``: its found / not-found rule included, so "not found" gives an empty pseudo mask); a
MONAI 2D UNet (``engines.unet``) learns those masks on the slices of most volumes; its found / not-found rule is
calibrated on the pseudo masks of the volumes it did not train on; it is exported as a model the pipeline runs.

No mask drawn by anyone enters this path: the targets are the zero-shot model's own output. Stages (each resumable
from ``work_dir``): ``label`` (pseudo masks, one ``.npz`` per volume in ``work_dir/pseudo``), ``unet`` (training,
through the one loop), ``calibrate``, ``export``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..progress import Progress
from .loop import Recipe, check_stage_list, run_loop, staged_presence

STAGES = ("label", "unet", "calibrate", "export")
SIZE = 128  # training slice size (px): the embedded models' input size
BATCH = 8
HOLD_OUT = 0.25  # share of the volumes (at least 1) whose pseudo masks calibrate the rule instead of training


def check_stages(stages) -> tuple:
    return check_stage_list(stages, STAGES, "--pseudo-labels")


def unlabelled_volumes(folder: Path) -> list[Path]:
    """The image files (NIfTI, NRRD, MHA) of ``folder``, sorted by name; InputError if it holds fewer than two (one
    to train on, one to calibrate on)."""
    from ..io.formats import LABELMAP_SUFFIXES, SEGMENTATION_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--pseudo-labels {folder}: not a folder; give a folder of unlabelled volumes (.nii.gz, "
                         f".nrrd, .mha)")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(LABELMAP_SUFFIXES)
                   and not f.name.lower().endswith(SEGMENTATION_SUFFIXES))
    if len(files) < 2:
        raise InputError(f"--pseudo-labels {folder} holds {len(files)} volume(s) (.nii.gz, .nii, .nrrd, .mha); "
                         f"at least 2 are needed (most train the network, at least one calibrates its rule)")
    return files


def source_findings(spec: dict, prompts: list[str] | None = None) -> dict:
    """finding -> phrasings that the pseudo masks stand for: the given ``prompts`` (each its own finding), else the
    zero-shot model's calibrated findings (its ``presence.per_finding``, all phrasings; the first is asked)."""
    if prompts:
        return {p: [p] for p in dict.fromkeys(" ".join(p.split()) for p in prompts)}
    per = (spec.get("presence") or {}).get("per_finding") or {}
    found = {f: list(r["phrases"]) for f, r in per.items() if r.get("phrases")}
    if not found:
        raise InputError(f"model {spec.get('id')!r} names no calibrated findings with phrases; give the findings to "
                         f"pseudo-label with --prompt (one per finding)")
    return found


def asked_phrases(findings: dict) -> list[str]:
    """The phrase each finding is asked (and trained, and calibrated) by: its first phrasing."""
    return [phrases[0] for phrases in findings.values()]


def volume_key(path: Path, asked: list[str], source_sha256: str) -> str:
    """What a volume's pseudo masks were made from: the file (path, size, modification time), the phrases asked and
    the zero-shot model (its spec's SHA-256)."""
    stat = Path(path).stat()
    return json.dumps({"file": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "asked": asked, "zero_shot": source_sha256})


def pseudo_targets(work_dir: Path, files: list[Path], findings: dict, source_sha256: str) -> list[tuple]:
    """Per volume: (its file, its pseudo-mask file ``work_dir/pseudo/<n>.npz``, the ``volume_key`` that file holds
    when it is current)."""
    asked = asked_phrases(findings)
    return [(f, Path(work_dir) / "pseudo" / f"{n:04d}.npz", volume_key(f, asked, source_sha256))
            for n, f in enumerate(files)]


def is_current(target: Path, key: str) -> bool:
    return target.is_file() and str(np.load(target)["key"]) == key


def label_volumes(engine, targets: list[tuple], findings: dict, progress: Progress | None = None,
                  resume: bool = True) -> list[Path]:
    """Pseudo masks of every volume of ``targets`` (``pseudo_targets``), each an ``.npz`` (image ``[K,J,I]`` float32,
    spacing mm (I,J,K), slice_axis, one bool mask ``[K,J,I]`` per finding, the zero-shot decision per finding, its
    key). With ``resume``, a volume whose file is current (same file, phrases and zero-shot model) is not labelled
    again. Returns the mask files."""
    from ..inference.pipeline import segment_volume
    from ..io.read import read_image

    progress = progress or Progress("none")
    for n, (path, target, key) in enumerate(targets):
        if resume and is_current(target, key):
            progress.update("pseudo-labels", n + 1, len(targets))
            continue
        image, geometry = read_image(path)
        result = segment_volume(engine, image, geometry, asked_phrases(findings))
        masks = {f"mask_{i}": r.mask.astype(bool) for i, r in enumerate(result.findings)}
        found = np.array([bool(r.found) for r in result.findings])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.stem + ".partial.npz")
        np.savez_compressed(tmp, key=key, image=image.astype(np.float32), spacing=np.asarray(geometry.spacing),
                            slice_axis=result.slice_axis, found=found, **masks)
        tmp.replace(target)
        progress.update("pseudo-labels", n + 1, len(targets), f"{Path(path).name}: found {int(found.sum())} of "
                                                              f"{len(found)}")
    return [target for _, target, _ in targets]


def split(labelled: list[Path]) -> tuple[list[Path], list[Path]]:
    """(volumes to train on, volumes to calibrate on): the last ``HOLD_OUT`` share, at least one, calibrates."""
    held = max(1, round(len(labelled) * HOLD_OUT))
    return labelled[:-held], labelled[-held:]


class PseudoSlices(torch.utils.data.Dataset):
    """The slices (along each volume's segmented axis) of pseudo-labelled volumes, fitted to ``size`` (padded, as the
    pipeline fits them) and augmented (``datasets.make_augmentation``): samples (image ``[1,S,S]``, the findings'
    first phrasings, pseudo masks ``[F,S,S]``) for ``datasets.collate``. ``augment``: strong (the phantom recipe's),
    mild (for real images, whose intensities carry meaning) or none."""

    def __init__(self, labelled: list[Path], findings: dict, size: int = SIZE, augment: str = "strong"):
        from ..inference.preprocessing import fit_slices, normalize_intensity
        from ..io.geometry import array_axis_of
        from .datasets import make_augmentation

        self.phrases = asked_phrases(findings)
        images, masks = [], []
        for path in labelled:
            z = np.load(path)
            axis = array_axis_of(int(z["slice_axis"]))
            # normalised as a whole volume, as the pipeline does (``predict_maps``): a slice without tissue stays dark
            image = normalize_intensity(np.moveaxis(z["image"], axis, 0).copy())[:, None]
            mask = np.stack([np.moveaxis(z[f"mask_{i}"], axis, 0) for i in range(len(findings))], 1)
            keep = (image.flatten(1).amax(1) - image.flatten(1).amin(1)) > 1e-6  # slices with signal only
            images.append(fit_slices(image[keep], size, "pad")[:, 0].numpy())
            masks.append(fit_slices(torch.from_numpy(mask[keep.numpy()]).float(), size, "pad").numpy() > 0.5)
        self.images, self.masks = np.concatenate(images), np.concatenate(masks)
        self.transform = None if augment == "none" else make_augmentation(mild=augment == "mild")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = torch.from_numpy(self.images[i])[None]
        masks = torch.from_numpy(self.masks[i]).float()
        if self.transform is not None:  # on the volume-normalised slice; not normalised again per slice
            out = self.transform({"image": image, "label": masks})
            image, masks = torch.as_tensor(out["image"]).clamp(0, 1), torch.as_tensor(out["label"])
        return image.float(), list(self.phrases), (masks > 0.5).float()


def unet_loss_fn(net, n_findings: int, device="cpu"):
    """-> ``loss(batch)``: MONAI DiceCE (sigmoid) of the UNet's ``[B,F,S,S]`` logits against the pseudo masks, Dice
    over the whole batch per finding (``batch=True``: a slice without the finding, of which a volume has many, would
    otherwise score Dice loss 1 whatever the network says)."""
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(sigmoid=True, batch=True)

    def loss(batch):
        images, _, masks, _ = batch
        target = masks.reshape(images.shape[0], n_findings, *masks.shape[-2:]).to(device)
        return dice_ce(net(images.to(device)), target)

    return loss


def calibration_cases(labelled: list[Path], findings: dict):
    """The held-out pseudo-labelled volumes as ``calibration.CalibrationCase`` s (truth = the pseudo masks)."""
    from .calibration import CalibrationCase

    from ..io.geometry import array_axis_of

    for path in labelled:
        z = np.load(path)
        # calibration slices along K (array axis 0): bring the axis the volume was segmented (and the UNet trained)
        # along there, with the spacing (mm along I, J, K) permuted to match
        axis = array_axis_of(int(z["slice_axis"]))
        order = [axis] + [a for a in range(3) if a != axis]
        spacing_kji = np.asarray(z["spacing"])[::-1][order]
        yield CalibrationCase(np.transpose(z["image"], order), tuple(spacing_kji[::-1].tolist()),
                              {f: np.transpose(z[f"mask_{i}"], order) for i, f in enumerate(findings)},
                              dict(zip(findings, asked_phrases(findings))))


def _spec_sha256(model) -> str:
    """SHA-256 of the zero-shot model's spec file (its weights' hashes are in it): the lineage of the pseudo masks."""
    from ..models import resolve, sha256_file

    return sha256_file(Path(resolve(model).spec_path))


def run_pseudo_label_training(folder: Path, out_dir: Path, work_dir: Path, model_id: str, zero_shot: str,
                              prompts: list[str] | None = None, steps: int = 1500, seed: int = 0, stages=STAGES,
                              resume: bool = True, progress: Progress | None = None, device="cpu",
                              command: str = "", force: bool = False, size: int = SIZE,
                              network: dict | None = None, augment: str = "strong",
                              precision: str = "fp32") -> Path | None:
    """The weakly supervised stage (module docstring): ``zero_shot`` (model id or spec path) pseudo-labels the
    volumes of ``folder``; a UNet trains ``steps`` steps on the slices of the first 75%, its rule is calibrated on the
    rest; export to ``out_dir/<model_id>.{json,safetensors}``. ``size``: training slice size (px); ``network``: the
    UNet's sizes (``engines.unet.NETWORK``); ``augment``: ``PseudoSlices``'; ``precision``: fp32 or bf16 autocast of
    the UNet's training steps. Returns the spec path if exported."""
    from ..engines import create_engine
    from ..engines.unet.engine import NETWORK, UNetEngine, build_unet
    from ..models import load_spec, write_spec
    from .calibration import calibrate_rules
    from .cliptnseg_recipe import _checkpoint, start_staged_run

    stages = check_stages(stages)
    files = unlabelled_volumes(folder)
    work_dir, progress = start_staged_run(stages, out_dir, model_id, force, work_dir, seed, progress)
    source = load_spec(zero_shot)
    findings = source_findings(source, prompts)
    device = torch.device(device)
    source_sha256 = _spec_sha256(zero_shot)
    targets = pseudo_targets(work_dir, files, findings, source_sha256)
    if "label" in stages:
        labelled = label_volumes(create_engine(source, device), targets, findings, progress, resume)
    else:
        stale = [f.name for f, target, key in targets if not is_current(target, key)]
        if stale:
            raise InputError(f"{work_dir / 'pseudo'} has no pseudo masks of {stale[0]} (of {len(stale)} volumes) "
                             f"made by {source['id']} for these findings: run the 'label' stage first (--stages "
                             f"label,...)")
        labelled = [target for _, target, _ in targets]
    if stages == ("label",):
        return None
    train, held = split(labelled)
    network = {**NETWORK, **(network or {})}
    net = build_unet(len(findings), network)
    ckpt = work_dir / "unet.pt"
    if "unet" in stages:
        net.to(device)
        recipe = Recipe("UNet on pseudo-labels", [{"params": list(net.parameters()), "lr": 1e-3}],
                        unet_loss_fn(net, len(findings), device), net.state_dict, net.load_state_dict, net.train,
                        weight_decay=1e-4, fingerprint={"findings": list(findings), "volumes": len(train),
                                                        "zero_shot": source_sha256,
                                                        "network": network, "size": size,
                                                        "augment": augment})
        run_loop(recipe, PseudoSlices(train, findings, size, augment), steps, ckpt, BATCH, seed, resume,
                 progress=progress, precision=precision)
    net.load_state_dict(_checkpoint(ckpt, "unet"))
    spec = {"id": model_id, "engine": "unet",
            "description": f"MONAI 2D UNet trained on the zero-shot masks of {source['id']} (MedCLIP-SAM's weakly "
                           f"supervised stage) on {len(train)} unlabelled volumes; knows only its findings' phrasings.",
            "license": source.get("license", "Apache-2.0"),
            "citation": "Koleilat et al., MedCLIP-SAMv2, Medical Image Analysis 2025 (weakly supervised stage)",
            "network": network, "findings": findings, "input_size": size, "inference": {"slice_vote": 1}}
    engine = UNetEngine(net, findings, device, spec)

    def calibrate():
        rule = calibrate_rules(engine, list(calibration_cases(held, findings)), findings, (), progress,
                               flip_average=False, total=len(held))
        rule["calibration"].update({"volumes": len(held), "truth": "pseudo masks of held-out unlabelled volumes"})
        return rule

    presence = staged_presence(work_dir, stages, calibrate)
    if presence is None:
        return None
    counts = {f: int(sum(bool(np.load(p)["found"][i]) for p in labelled)) for i, f in enumerate(findings)}
    spec["presence"] = presence
    spec["training"] = {
        "command": command, "steps": steps, "seed": seed, "batch_size": BATCH, "augment": augment, "precision": precision,
        "phrases": [p for phrases in findings.values() for p in phrases],
        "pseudo_labels": {"zero_shot_model": source["id"], "zero_shot_spec_sha256": source_sha256,
                          "folder": str(folder), "volumes": len(files),
                          "train_volumes": len(train), "calibration_volumes": len(held),
                          "volumes_found": counts}}
    return write_spec(spec, {f"unet.{k}": v for k, v in net.state_dict().items()}, out_dir)


__all__ = ["STAGES", "check_stages", "unlabelled_volumes", "source_findings", "asked_phrases", "volume_key",
           "pseudo_targets", "is_current", "label_volumes", "split",
           "PseudoSlices", "unet_loss_fn", "calibration_cases", "run_pseudo_label_training"]
