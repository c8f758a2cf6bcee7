"""Time `clipseg segment`'s pipeline on a 256x256x64 phantom volume with the embedded model, on this machine.

Prints machine info, the wall time of the whole volume (3 prompts, batched slices, text embedded once) and, measured
side by side in the same run, the reference-style execution (one slice at a time, text re-encoded per slice) as a
ratio. Run:  .venv/bin/python benchmarks/segment_speed.py [--threads 2] [--slices 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CLIPSeg"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reference-slices", type=int, default=16, help="slices timed in the reference style")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.synthetic.phantoms import make_phantom
    from CLIPSegLib.inference.pipeline import flip_average_of, predict_probabilities, segment_volume
    from CLIPSegLib.inference.segment_file import load_engine

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__}, {a.threads} threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    ph = make_phantom((a.slices, a.size, a.size), spacing=(0.8, 0.25, 0.25), seed=42,
                      findings=("nodule", "cyst", "calcification"))
    geometry = Geometry.axis_aligned(ph.spacing)
    prompts = ["hypoechoic thyroid nodule", "anechoic cyst", "calcification"]
    t0 = time.perf_counter()
    engine = load_engine(None, device="cpu")
    t_load = time.perf_counter() - t0
    segment_volume(engine, ph.image[:2], geometry, prompts)  # warm-up
    t0 = time.perf_counter()
    result = segment_volume(engine, ph.image, geometry, prompts)
    t_vol = time.perf_counter() - t0
    print(f"model load (verify SHA-256 + build): {t_load:.2f} s; flip averaging "
          f"{'on (two forward passes per slice)' if flip_average_of(engine) else 'off'}")
    print(f"volume {a.size}x{a.size}x{a.slices}, {len(prompts)} prompts, batched: {t_vol:.2f} s "
          f"({1000 * t_vol / a.slices:.1f} ms per slice, all prompts) -> {'under' if t_vol < 60 else 'OVER'} 1 minute")
    found = {f.prompt: f.found for f in result.findings}
    print(f"found: {found}")

    # Reference style: one slice per forward pass, text re-encoded for every slice, no batching.
    n = min(a.reference_slices, a.slices)
    sub = ph.image[:n]
    t0 = time.perf_counter()
    for k in range(n):
        engine.clear_prompt_cache()
        predict_probabilities(engine, sub[k:k + 1], prompts, slice_axis=2, batch_size=1)
    t_ref = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    predict_probabilities(engine, sub, prompts, slice_axis=2)  # the engine's default batch for this device
    t_ours = (time.perf_counter() - t0) / n
    print(f"per slice over {n} slices: reference-style {1000 * t_ref:.1f} ms, ours {1000 * t_ours:.1f} ms, "
          f"ratio {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
