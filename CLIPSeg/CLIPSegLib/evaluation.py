"""Held-out phantom evaluation through the real command line path (``clipseg segment`` on files).

For each volume (seeds ``seed .. seed+n-1``, ``phantoms.random_volume_phantom``), one prompt per finding type is
asked (a random phrasing), whether the finding is present or not. Reported:
  - Dice per finding type over the volumes where it is present (foreground Dice, MONAI);
  - absent-finding empty rate: fraction of (volume, absent finding) whose segment is empty;
  - prompt swap: for volumes with two or more findings, Dice of finding A's segment with finding B's truth.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from .imageio import Geometry, write_volume
from .metrics import dice
from .phantoms import FINDINGS, PHRASES, random_volume_phantom
from .progress import Progress


def evaluate_phantoms(n: int, seed: int, model=None, device="auto", progress: Progress | None = None) -> dict:
    import slicerio

    from .cli import main as cli_main

    progress = progress or Progress("bar")
    rng = np.random.default_rng(seed)
    per_case, dices, empties, swaps = [], {f: [] for f in FINDINGS}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for v in range(n):
            ph = random_volume_phantom(seed + v)
            geometry = Geometry(tuple(ph.spacing[::-1]), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
            vol = write_volume(Path(tmp) / "case.nrrd", ph.image, geometry)
            prompts = [str(rng.choice(PHRASES[f])) for f in FINDINGS]
            out = Path(tmp) / "case.seg.nrrd"
            args = ["segment", str(vol), "--output", str(out), "--progress", "none", "--device", device]
            for p in prompts:
                args += ["--prompt", p]
            if model:
                args += ["--model", str(model)]
            code = cli_main(args)
            if code != 0:
                raise RuntimeError(f"clipseg segment failed with exit code {code} on phantom seed {seed + v}")
            seg = slicerio.read_segmentation(str(out))
            pred = {}
            for f, p in zip(FINDINGS, prompts):
                pred[f] = slicerio.extract_segments(seg, [(p, 1)])["voxels"].transpose(2, 1, 0) > 0
            case = {"seed": seed + v, "present": ph.findings, "prompts": dict(zip(FINDINGS, prompts))}
            for f in FINDINGS:
                if f in ph.masks:
                    d = dice(pred[f], ph.masks[f])
                    dices[f].append(d)
                    case[f"dice_{f}"] = d
                else:
                    empties.append(not pred[f].any())
                    case[f"empty_{f}"] = bool(not pred[f].any())
            for a in ph.findings:
                for b in ph.findings:
                    if a != b:
                        swaps.append(dice(pred[a], ph.masks[b]))
            per_case.append(case)
            progress.update("evaluating phantom volumes", v + 1, n)
    summary = {
        "volumes": n, "seeds": [seed, seed + n - 1],
        "dice_mean": {f: float(np.mean(d)) if d else None for f, d in dices.items()},
        "dice_cases": {f: len(d) for f, d in dices.items()},
        "absent_empty_rate": float(np.mean(empties)) if empties else None,
        "absent_cases": len(empties),
        "swap_dice_mean": float(np.mean(swaps)) if swaps else None,
        "swap_dice_max": float(np.max(swaps)) if swaps else None,
        "swap_pairs": len(swaps),
    }
    return {"summary": summary, "cases": per_case}


def format_summary(s: dict) -> str:
    lines = [f"held-out phantom volumes: {s['volumes']} (seeds {s['seeds'][0]}..{s['seeds'][1]})"]
    for f, d in s["dice_mean"].items():
        lines.append(f"  Dice {f:14s} {d:.3f} over {s['dice_cases'][f]} volumes" if d is not None
                     else f"  Dice {f:14s} n/a (never present)")
    if s["absent_empty_rate"] is not None:
        lines.append(f"  absent finding -> empty segment: {s['absent_empty_rate']:.1%} of {s['absent_cases']}")
    if s["swap_dice_mean"] is not None:
        lines.append(f"  prompt swap: Dice with the other finding's truth mean {s['swap_dice_mean']:.3f}, "
                     f"max {s['swap_dice_max']:.3f} over {s['swap_pairs']} pairs")
    return "\n".join(lines)


def write_report(path: Path, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
