"""How visible is each opacity kind of the report phantoms, and which ones does a model miss?

Visibility is measured by the generator (``synthetic.report_phantoms``: ``Opacity.contrast`` and ``clutter``, at the
generated 256 x 256 size, in the display window of the image, its 0.5-99.5 percentiles): the opacity's own mean
brightening of its mask (the noiseless image with it minus without its added density), and the spread of the image
without it over the mask and 3 pixels around inside its lung (ribs, vessels, the lung's depth). Their ratio, contrast
to clutter (CNR, ``Opacity.cnr``), says how well it stands out of what lies under it. (A contrast against a ring of
lung around the mask, the measure before, rose for opacities on the bright medial border of a lung whatever they
added: a ground-glass patch over the heart's edge read as the most visible.) No model is involved: it says how much
a segmenter could see.

Printed per kind over ``--phantoms`` phantoms of the training bank's seeds: contrast and CNR percentiles, the share
with CNR under 1, and the median area. With ``--evaluation REPORT.json`` (written by ``clipseg evaluate --family
report --report REPORT.json``) it also splits that run's Dice of the lines that describe opacities, and the share
of them left non-empty, by the CNR of what each line describes (area-weighted over its opacities). With ``--model M``
it asks M each kind's name on ``--maps`` calibration phantoms (seeds from ``REPORT_CALIBRATION_SEED_BASE``; the
network's own maps, before any presence rule, at probability 0.5 for every kind whatever threshold its rule takes)
and prints where each map's pixels over 0.5 fall: on that kind's opacities, on another kind's, on no opacity inside
the lungs, or outside the lungs; and the mean share of each kind's mask the map covers.

Run:  .venv/bin/python benchmarks/report_visibility.py --phantoms 200 [--evaluation REPORT.json] [--model M --maps 120]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLIPSeg"))

from CLIPSegLib.synthetic.report_phantoms import KINDS, make_report_phantom  # noqa: E402
from CLIPSegLib.synthetic.report_text import matching, union_mask  # noqa: E402
from CLIPSegLib.training.report_data import (  # noqa: E402
    REPORT_CALIBRATION_SEED_BASE, REPORT_TRAIN_SEED_BASE, report_lines,
)

CNR_BINS = (-np.inf, 0.5, 1.0, 1.5, np.inf)  # contrast / clutter bins for the evaluation split


def visibility(n: int, seed_base: int = REPORT_TRAIN_SEED_BASE) -> dict:
    """-> kind -> rows of (contrast, CNR, area px) of the opacities of ``n`` phantoms from ``seed_base``."""
    rows: dict[str, list] = {}
    for seed in range(seed_base, seed_base + n):
        for o in make_report_phantom(seed=seed).opacities:
            rows.setdefault(o.kind, []).append((o.contrast, o.cnr, int(o.mask.sum())))
    return rows


def line_cnr(opacities, mask: np.ndarray) -> float:
    """Area-weighted contrast / clutter of the ``opacities`` a line's ``mask`` covers (NaN when it covers none)."""
    parts = [(int((o.mask & mask).sum()), o.cnr) for o in opacities]
    area = sum(a for a, _ in parts)
    return sum(a * c for a, c in parts) / area if area else float("nan")


def dice_by_visibility(report_path: Path) -> dict:
    """-> kind -> CNR bin index -> [(Dice, non-empty)] of the evaluation's lines that describe opacities."""
    rows = [r for r in json.loads(report_path.read_text(encoding="utf-8"))["cases"] if r["role"] == "describes"]
    out: dict[str, dict[int, list]] = {}
    for seed in sorted({r["seed"] for r in rows}):
        ph, queries = report_lines(seed)  # the content is the same in either wording
        for r in (r for r in rows if r["seed"] == seed):
            c = line_cnr(ph.opacities, queries[int(r["line"].split()[-1]) - 1].mask)
            if np.isfinite(c):
                b = int(np.searchsorted(CNR_BINS, c, side="right") - 1)
                out.setdefault(r["kind"], {}).setdefault(b, []).append((r["dice"] or 0.0, r["pred_voxels"] > 0))
    return out


PLACES = (*(f"on {k}" for k in KINDS), "on no opacity, in the lungs", "outside the lungs")


def where_maps_fall(model: str, n: int) -> dict:
    """-> kind asked -> {"on <kind>" / "on no opacity, in the lungs" / "outside the lungs": pixels of its map over
    0.5, "covered": the share of that kind's mask over 0.5, one per phantom holding it}, on ``n`` calibration
    phantoms."""
    from CLIPSegLib.inference.pipeline import predict_maps
    from CLIPSegLib.inference.segment_file import load_engine

    engine = load_engine(model)
    out = {k: {**{p: 0 for p in PLACES}, "covered": []} for k in KINDS}
    for seed in range(REPORT_CALIBRATION_SEED_BASE, REPORT_CALIBRATION_SEED_BASE + n):
        ph = make_report_phantom(seed=seed)
        maps, _ = predict_maps(engine, ph.image[None], list(KINDS), 2)
        truth = {k: union_mask(ph, matching(ph, k)) for k in KINDS}
        anything = union_mask(ph, ph.opacities)
        lungs = ph.lungs["right"] | ph.lungs["left"]
        for p, k in enumerate(KINDS):
            painted = maps[p, 0] > 0.5
            for j in KINDS:
                out[k][f"on {j}"] += int((painted & truth[j]).sum())
            out[k][PLACES[-2]] += int((painted & ~anything & lungs).sum())
            out[k][PLACES[-1]] += int((painted & ~anything & ~lungs).sum())
            if truth[k].any():
                out[k]["covered"].append(float((painted & truth[k]).sum() / truth[k].sum()))
    return out


def pct(v, q=(10, 50, 90), fmt="{:.3f}") -> str:
    return " / ".join(fmt.format(t) for t in np.percentile(v, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phantoms", type=int, default=200)
    ap.add_argument("--evaluation", type=Path, default=None, metavar="REPORT.json",
                    help="a `clipseg evaluate --family report --report` file: its Dice split by visibility")
    ap.add_argument("--model", default=None, help="also: where this model's maps fall (id or spec path)")
    ap.add_argument("--maps", type=int, default=120, help="calibration phantoms for --model")
    a = ap.parse_args()
    print(f"{a.phantoms} training-bank report phantoms (seeds from {REPORT_TRAIN_SEED_BASE}), at 256 px, in each "
          f"image's display window")
    print("| kind | opacities | contrast p10 / p50 / p90 | contrast / clutter p10 / p50 / p90 | under 1 | "
          "median area px |")
    print("|---|---|---|---|---|---|")
    for kind, v in sorted(visibility(a.phantoms).items()):
        v = np.asarray(v)
        cnr = v[:, 1]
        print(f"| {kind} | {len(v)} | {pct(v[:, 0])} | {pct(cnr, fmt='{:.2f}')} | {100 * np.mean(cnr < 1):.0f}% | "
              f"{np.median(v[:, 2]):.0f} |")
    if a.evaluation is not None:
        names = [f"{lo:g} to {hi:g}".replace("-inf to ", "under ").replace(" to inf", " and over")
                 for lo, hi in zip(CNR_BINS[:-1], CNR_BINS[1:])]
        print(f"\n{a.evaluation}: the described lines by the contrast / clutter of what they describe "
              f"(lines, share non-empty, mean Dice)")
        print("| kind | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for kind, by_bin in sorted(dice_by_visibility(a.evaluation).items()):
            cells = [f"{len(by_bin[b])}, {np.mean([f for _, f in by_bin[b]]):.0%}, "
                     f"{np.mean([d for d, _ in by_bin[b]]):.3f}" if b in by_bin else "-" for b in range(len(names))]
            print(f"| {kind} | " + " | ".join(cells) + " |")
    if a.model is not None:
        print(f"\n{a.model} asked each kind's name on {a.maps} calibration phantoms: its map's pixels over 0.5")
        print("| asked | " + " | ".join(PLACES) + " | share of the kind's mask covered (phantoms) |")
        print("|---|" + "---|" * (len(PLACES) + 1))
        for k, row in where_maps_fall(a.model, a.maps).items():
            total = max(sum(row[p] for p in PLACES), 1)
            cells = [f"{row[p]} ({row[p] / total:.0%})" for p in PLACES]
            covered = f"{np.mean(row['covered']):.2f} ({len(row['covered'])})" if row["covered"] else "- (0)"
            print(f"| {k} | " + " | ".join(cells) + f" | {covered} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
