"""Does the posterior acoustic shadow (``inference/acoustic_shadow.py``) tell calcifications from other bright blobs?

1. On the phantoms' own truth, per family: every calcification focus of ``--volumes`` volumes (seeds 5000..) against
   the ``BLOBS`` largest bright blobs of each volume (top 0.3% of the in-plane smoothed image, 3 voxels or more away
   from any calcification); the shadow's percentiles and the share at or above each threshold.
2. With ``--model``: on that network's calcification components, read from the cache ``benchmarks/presence_rules.py``
   wrote for it (run that first): true (overlapping the truth) against false components, all of them and those of
   mean probability 0.80-0.85 (where the missed clusters and most false blobs sit), then a few calcification rules
   with and without the shadow, asked of every component or of one ("anchor": once a shadowing component is kept,
   the other components the rule keeps stay): absent volumes reported and mean Dice over present ones.

Run:  .venv/bin/python benchmarks/acoustic_shadow.py [--volumes 12] [--model build/models/X.json]
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLIPSeg"))

from CLIPSegLib.inference.acoustic_shadow import posterior_shadow  # noqa: E402
from CLIPSegLib.inference.postprocess import DEFAULT_PRESENCE, keep  # noqa: E402
from CLIPSegLib.synthetic.families import random_volume_phantom  # noqa: E402
from CLIPSegLib.training.calibration import case_table, kept_outcomes  # noqa: E402
from presence_rules import cache_prefix  # noqa: E402

SEED = 5000
BLOBS = 6
THRESHOLDS = (0.25, 0.5, 0.75, 1.0)


def _pct(values) -> str:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return " / ".join(f"{p:.2f}" for p in np.percentile(v, [10, 50, 90])) if v.size else "-"


def truth_study(volumes: int) -> None:
    print("| family | calcification foci | shadow 10/50/90th pct | bright blobs | shadow 10/50/90th pct | "
          + " | ".join(f">= {t}: foci / blobs" for t in THRESHOLDS) + " |")
    print("|---" * (5 + len(THRESHOLDS)) + "|")
    for family in ("A", "B"):
        foci, blobs = [], []
        for seed in range(SEED, SEED + volumes):
            p = random_volume_phantom(seed, family)
            spacing_kji = np.asarray(p.spacing, float)  # the phantom's spacing is in array order
            calc = p.masks.get("calcification")
            if calc is not None and calc.any():
                labels, n = ndimage.label(calc)
                foci += [posterior_shadow(p.image, labels == i, spacing_kji, 0) for i in range(1, n + 1)]
            smooth = ndimage.gaussian_filter(p.image, (0, 1, 1))
            bright = smooth > np.percentile(smooth, 99.7)
            if calc is not None:
                bright &= ~ndimage.binary_dilation(calc, iterations=3)
            labels, n = ndimage.label(bright)
            sizes = ndimage.sum(bright, labels, range(1, n + 1))
            blobs += [posterior_shadow(p.image, labels == i, spacing_kji, 0) for i in np.argsort(-sizes)[:BLOBS] + 1]
        f, b = np.asarray(foci), np.asarray(blobs)
        shares = [f"{np.mean(f >= t):.0%} / {np.mean(b >= t):.0%}" for t in THRESHOLDS]
        print(f"| {family} | {len(f)} | {_pct(f)} | {len(b)} | {_pct(b)} | " + " | ".join(shares) + " |")


def _outcome(table, rule: dict, anchor: float | None):
    """(left empty per case, Dice per case) of ``rule``; ``anchor``: a case keeps its components only if one of
    them casts at least this shadow."""
    kept = keep(table, rule, table.volume_extent_mm)
    if anchor is not None:
        kept &= (np.bincount(table.case[kept & (table.shadow >= anchor)], minlength=len(table.truth)) > 0)[table.case]
    return kept_outcomes(table, kept)


def model_study(model: str, cache: Path) -> None:
    from CLIPSegLib.models import load_spec

    spec = load_spec(model)
    prefix = cache_prefix(spec)
    files = sorted(cache.glob(f"{prefix}-*.pkl"))
    if not files:
        sys.exit(f"no cached components of {spec['id']} under {cache}: run benchmarks/presence_rules.py --model "
                 f"{model} first")
    rules = [("no shadow", 0.80, 0.0, None), ("shadow >= 0.5, every component", 0.80, 0.5, None),
             ("shadow >= 0.5, an anchor", 0.80, 0.0, 0.5), ("mean >= 0.85, no shadow", 0.85, 0.0, None)]
    print(f"\nmodel {spec['id']}, calcification components (gate 1.0)\n")
    print("| set | true | shadow 10/50/90th pct | false | shadow 10/50/90th pct | mean 0.80-0.85: true (>= 0.5) "
          "| false (>= 0.5) | " + " | ".join(r[0] + ": absent reported, Dice" for r in rules) + " |")
    print("|---" * (7 + len(rules)) + "|")
    for path in files:
        cases = [c for c in pickle.loads(path.read_bytes())[1.0] if c[0] == "calcification"]
        table = case_table(cases)
        absent = table.truth == 0
        true, band = table.overlap > 0, (table.mean >= 0.8) & (table.mean < 0.85)
        cells = [f"{true.sum()}", _pct(table.shadow[true]), f"{(~true).sum()}", _pct(table.shadow[~true])]
        for sel in (band & true, band & ~true):
            cells.append(f"{sel.sum()} ({np.mean(table.shadow[sel] >= 0.5):.0%})" if sel.any() else "0")
        for _, mean, shadow, anchor in rules:
            rule = {**DEFAULT_PRESENCE, "min_peak": 0.5, "min_mean": mean, "min_extent_mm": 1.0, "min_area_mm2": 0.0,
                    "min_shadow": shadow}
            empty, dice = _outcome(table, rule, anchor)
            cells.append(f"{(~empty[absent]).sum()} of {absent.sum()}, {dice[~absent].mean():.3f}")
        label = path.stem[len(prefix) + 1:]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=12, help="phantom volumes per family for the truth study")
    ap.add_argument("--model", help="a cliptnseg model whose components benchmarks/presence_rules.py cached")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "presence_rules")
    a = ap.parse_args(argv)
    truth_study(a.volumes)
    if a.model:
        model_study(a.model, a.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
