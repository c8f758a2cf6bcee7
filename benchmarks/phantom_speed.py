"""Time drawing one phantom of each family on this machine, side by side: family A (``phantoms``) and family B
(``scatter_phantoms``), a 2D image and a 3D volume, the median of a few seeds, and B's time as a ratio of A's.

Run:  .venv/bin/python benchmarks/phantom_speed.py [--slices 20] [--size 160] [--seeds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CLIPSeg"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()

    from CLIPSegLib.synthetic.families import make_phantom

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for shape in ((a.size, a.size), (a.slices, a.size, a.size)):
        spacing = (0.25, 0.25) if len(shape) == 2 else (0.8, 0.25, 0.25)
        times = {}
        for family in ("A", "B"):
            runs = []
            for seed in range(a.seeds):
                start = time.perf_counter()
                make_phantom(shape, spacing, seed=seed, family=family)
                runs.append(time.perf_counter() - start)
            times[family] = statistics.median(runs)
        print(f"{'x'.join(map(str, shape)):>12s}: family A {times['A']:.3f} s, family B {times['B']:.3f} s "
              f"(B/A {times['B'] / times['A']:.1f}x), median of {a.seeds} seeds")


if __name__ == "__main__":
    main()
