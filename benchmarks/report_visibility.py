"""How visible is each opacity kind of the report phantoms, as the network sees it?

Each phantom of the training bank (``training.report_data.ReportBank``, seeds from 40,000,000, at the network's input
size, no augmentation) is normalised to its own 0.5-99.5 percentile range (0..1, as a display window would); per
opacity: the mean inside its mask minus the mean of a ring around it inside the lungs (2 to 6 pixels out), in that
0..1 scale and in units of the ring's standard deviation. Printed per kind: 10th / 50th / 90th percentiles, the
share with a contrast under 0.02 (about nothing to see), and the median area in pixels. No model is involved: it
says how much a segmenter could see.

With ``--evaluation REPORT.json`` (written by ``clipseg evaluate --family report --report REPORT.json``) it also
splits that run's Dice of the lines that describe opacities by how visible the described mask is in the held-out
image (the same contrast, in the image at its own size): whether a model misses the faint opacities or others.

Run:  .venv/bin/python benchmarks/report_visibility.py --phantoms 200 --size 128 [--evaluation REPORT.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLIPSeg"))

from CLIPSegLib.training.report_data import ReportBank  # noqa: E402


def contrast(image: np.ndarray, mask: np.ndarray, lungs: np.ndarray) -> tuple[float, float] | None:
    """(mean inside ``mask`` minus the mean of its ring inside ``lungs``, in the image's 0.5-99.5 percentile window;
    the same over the ring's SD), or None when the ring holds fewer than 10 pixels."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    x = (image - lo) / max(hi - lo, 1e-6)
    ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2) & lungs
    if ring.sum() < 10:
        return None
    c = float(x[mask].mean() - x[ring].mean())
    return c, c / (float(x[ring].std()) + 1e-6)


def visibility(n: int, size: int) -> dict:
    """-> kind -> rows of (contrast in the 0..1 window, contrast / ring SD, area px)."""
    rows: dict[str, list] = {}
    for ph in ReportBank(n, size, augment=False).phantoms:
        lungs = ph.lungs["right"] | ph.lungs["left"]
        for o in ph.opacities:
            c = contrast(ph.image, o.mask, lungs)
            if c is not None:
                rows.setdefault(o.kind, []).append((*c, int(o.mask.sum())))
    return rows


BINS = (-np.inf, 0.02, 0.05, 0.1, np.inf)  # contrast bins for the evaluation split


def dice_by_visibility(report_path: Path) -> dict:
    """-> kind -> contrast bin index -> Dice of the evaluation's described lines whose mask has that contrast."""
    import json

    from CLIPSegLib.synthetic.report_phantoms import make_report_phantom
    from CLIPSegLib.training.report_data import report_case

    rows = [r for r in json.loads(report_path.read_text(encoding="utf-8"))["cases"] if r["role"] == "describes"]
    out: dict[str, dict[int, list]] = {}
    for seed in sorted({r["seed"] for r in rows}):
        image, _, queries = report_case(seed)  # the content is the same in either wording
        ph = make_report_phantom(seed=seed)
        lungs = ph.lungs["right"] | ph.lungs["left"]
        for r in (r for r in rows if r["seed"] == seed):
            q = queries[int(r["line"].split()[-1]) - 1]
            c = contrast(image, q.mask, lungs)
            if c is None:  # no lung ring to measure against: left out
                continue
            b = int(np.searchsorted(BINS, c[0], side="right") - 1)
            out.setdefault(r["kind"], {}).setdefault(b, []).append(r["dice"] or 0.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phantoms", type=int, default=200)
    ap.add_argument("--size", type=int, default=128, help="pixels (the report network's input: 128)")
    ap.add_argument("--evaluation", type=Path, default=None, metavar="REPORT.json",
                    help="a `clipseg evaluate --family report --report` file: its Dice split by visibility")
    a = ap.parse_args()
    print(f"{a.phantoms} training report phantoms at {a.size} px, each windowed to its 0.5-99.5 percentiles")
    print("| kind | opacities | contrast p10 / p50 / p90 | contrast / ring SD p10 / p50 / p90 | contrast < 0.02 | "
          "median area px |")
    print("|---|---|---|---|---|---|")
    for kind, v in sorted(visibility(a.phantoms, a.size).items()):
        v = np.asarray(v)
        c, z = np.percentile(v[:, 0], [10, 50, 90]), np.percentile(v[:, 1], [10, 50, 90])
        print(f"| {kind} | {len(v)} | {' / '.join(f'{t:.3f}' for t in c)} | {' / '.join(f'{t:.2f}' for t in z)} | "
              f"{100 * np.mean(v[:, 0] < 0.02):.0f}% | {np.median(v[:, 2]):.0f} |")
    if a.evaluation is not None:
        names = [f"{lo:g} to {hi:g}".replace("-inf to ", "under ").replace(" to inf", " and over")
                 for lo, hi in zip(BINS[:-1], BINS[1:])]
        print(f"\nDice of the described lines of {a.evaluation} by the contrast of their mask (lines, mean Dice)")
        print("| kind | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for kind, by_bin in sorted(dice_by_visibility(a.evaluation).items()):
            cells = [f"{len(by_bin[b])}, {np.mean(by_bin[b]):.3f}" if b in by_bin else "-" for b in range(len(names))]
            print(f"| {kind} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
