"""MedCLIP-SAM's weakly supervised stage against its own zero-shot masks, on the same volumes and on held-out ones.

1. Writes ``--volumes`` phantom volumes (seeds from ``--seed``, a range no training, calibration, validation or
   evaluation uses) as NIfTI files: the "unlabelled folder" (their truth is kept aside, never shown to training).
2. Runs ``clipseg train --engine medclipsam --pseudo-labels FOLDER --zero-shot MODEL`` (the real command): the
   zero-shot model segments every volume, a MONAI UNet learns those masks on 75% of them, its rule is calibrated on
   the pseudo masks of the other 25%.
3. Scores, on the same volumes against the phantoms' truth: the zero-shot masks (the pseudo labels, read back from
   the work folder) and the UNet's masks, each finding asked in the same phrasing: Dice where present, empty where
   absent. Printed side by side, for all volumes and for the 25% the UNet did not train on.
4. ``clipseg evaluate --phantoms --heldout --seed 1000 --model`` the UNet (held-out seeds, as every model's figures).

Run:  .venv/bin/python benchmarks/weakly_supervised.py [--zero-shot medclipsam-phantom-small] [--volumes 16]
      [--steps 1500] [--heldout 40] [--work build/weak]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLIPSeg"))
UNLABELLED_SEED_BASE = 60_000_000


def write_volumes(folder: Path, n: int, seed: int, family: str) -> list:
    """Phantom volumes seeds ``seed..seed+n-1`` -> ``folder/vol_<seed>.nii.gz``; returns the phantoms (truth)."""
    import SimpleITK as sitk

    from CLIPSegLib.synthetic.families import random_volume_phantom

    folder.mkdir(parents=True, exist_ok=True)
    names = {f"vol_{s:010d}.nii.gz" for s in range(seed, seed + n)}  # zero-padded: name order is seed order
    extra = sorted(f.name for f in folder.iterdir() if f.name not in names)
    if extra:
        sys.exit(f"{folder} holds files of another run ({', '.join(extra[:3])}); give another --work")
    phantoms = []
    for s in range(seed, seed + n):
        ph = random_volume_phantom(s, family)
        path = folder / f"vol_{s:010d}.nii.gz"
        if not path.is_file():
            image = sitk.GetImageFromArray(ph.image.astype("float32"))
            image.SetSpacing(tuple(float(x) for x in ph.spacing[::-1]))
            sitk.WriteImage(image, str(path))
        phantoms.append(ph)
    return phantoms


def score(masks: dict, ph) -> dict:
    """finding -> ("dice", value) where present, ("empty", bool) where absent."""
    import numpy as np
    import torch
    from monai.metrics import compute_dice

    out = {}
    for f, m in masks.items():
        truth = ph.masks.get(f)
        if truth is None or not truth.any():
            out[f] = ("empty", not m.any())
        else:
            d = compute_dice(torch.from_numpy(m)[None, None].float(), torch.from_numpy(truth)[None, None].float(),
                             ignore_empty=False)
            out[f] = ("dice", float(np.nan_to_num(d.item())))
    return out


def summary(rows: list[dict], findings) -> str:
    parts = []
    for f in findings:
        dice = [v for r in rows for k, (kind, v) in r.items() if k == f and kind == "dice"]
        parts.append(f"{f} {sum(dice) / len(dice):.3f} ({len(dice)})" if dice else f"{f} - (0)")
    empty = [v for r in rows for kind, v in r.values() if kind == "empty"]
    rate = f"{100 * sum(empty) / len(empty):.1f}% of {len(empty)}" if empty else "- (0)"
    return "Dice " + ", ".join(parts) + f"; absent -> empty {rate}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zero-shot", default="medclipsam-phantom-small")
    ap.add_argument("--volumes", type=int, default=16)
    ap.add_argument("--seed", type=int, default=UNLABELLED_SEED_BASE)
    ap.add_argument("--family", default="A")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--heldout", type=int, default=40, help="held-out phantom volumes (seeds 1000+); 0: skip")
    ap.add_argument("--work", default="build/weak")
    a = ap.parse_args()

    import numpy as np
    import torch

    from CLIPSegLib.engines import create_engine
    from CLIPSegLib.inference.pipeline import segment_volume
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.training.pseudo_labels import split

    work = Path(a.work).resolve()
    clipseg = str(Path(sys.executable).with_name("clipseg"))
    phantoms = write_volumes(work / "unlabelled", a.volumes, a.seed, a.family)
    model = work / "models" / "weak-unet.json"
    start = time.perf_counter()
    # --no-resume: a measurement starts over (a work folder left by another zero-shot model would be refused)
    code = subprocess.run([clipseg, "train", "--engine", "medclipsam", "--pseudo-labels", str(work / "unlabelled"),
                           "--zero-shot", a.zero_shot, "--output-dir", str(work / "models"), "--model-id",
                           "weak-unet", "--work-dir", str(work / "train"), "--steps", str(a.steps), "--force",
                           "--no-resume", "--progress", "none"]).returncode
    if code:
        sys.exit(code)  # clipseg said why
    train_s = time.perf_counter() - start
    spec = load_spec(str(model))
    findings = list(spec["findings"])
    unet = create_engine(spec, torch.device("cpu"))
    labelled = sorted((work / "train" / "pseudo").glob("[0-9]*.npz"))
    _, held = split(labelled)
    zero, student = [], []
    for path, ph in zip(labelled, phantoms):
        z = np.load(path)
        zero.append(score({f: z[f"mask_{i}"] for i, f in enumerate(findings)}, ph))
        result = segment_volume(unet, ph.image, Geometry.axis_aligned(ph.spacing),
                                [spec["findings"][f][0] for f in findings])
        student.append(score({f: r.mask for f, r in zip(findings, result.findings)}, ph))
    n_held = len(held)
    print(f"\nweakly supervised stage, zero-shot model {a.zero_shot}, {a.volumes} family-{a.family} volumes (seeds "
          f"{a.seed}..{a.seed + a.volumes - 1}); train + label + calibrate {train_s / 60:.1f} min on "
          f"{torch.get_num_threads()} threads")
    rows = [(f"all {a.volumes} volumes, zero-shot masks (the pseudo labels)", zero),
            (f"all {a.volumes} volumes, the UNet trained on them", student),
            (f"the {n_held} it did not train on, zero-shot", zero[-n_held:]),
            (f"the {n_held} it did not train on, the UNet", student[-n_held:])]
    for label, scored in rows:
        print(f"  {label:<58} {summary(scored, findings)}")
    print(f"  training record: {json.dumps(spec['training']['pseudo_labels'])}")
    if a.heldout:
        subprocess.run([clipseg, "evaluate", "--phantoms", str(a.heldout), "--seed", "1000", "--family", a.family,
                        "--model", str(model), "--report", str(work / "heldout.json"), "--progress", "none"],
                       check=True)


if __name__ == "__main__":
    main()
