"""Latency, memory and the physical limit of CLIP-TNseg on this machine, measured side by side in one run.

Prints (and with --results, appends to benchmarks/RESULTS.md):
  1. machine: CPU, threads, torch, measured fp32 matmul throughput (GFLOP/s);
  2. per-slice latency (best of 3 calls) at embedded size and at paper size (ViT-B/16, 352 px; random weights),
     batch-size sweep;
  3. forward FLOPs per slice (``CLIPSegLib.engines.flops``: torch's FlopCounterMode with attention counted) / matmul
     throughput = the FLOP limit, and our fraction of it;
     execution variants side by side (MHA fast path vs SDPA, channels-last, bf16 autocast), each against the limit
     of its own precision;
  4. reference-style execution (one slice per forward, text re-encoded, no batching) vs ours, as a ratio;
  5. volumes 256x256x64 and 512x512x128 (3 prompts) and slice scaling 64 -> 128 -> 256 with peak RSS of each run in
     its own process (memory must stay flat: slices are streamed, not held as activations).
Run:  .venv/bin/python benchmarks/latency.py [--threads 2] [--quick] [--results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLIPSeg"))
PROMPTS = ["hypoechoic thyroid nodule", "anechoic cyst", "calcification"]
PAPER = {"id": "paper-size", "engine": "cliptnseg", "clip": {"open_clip_name": "ViT-B-16", "image_size": 352},
         "network": {"extract_layers": [3, 6, 9], "reduce_dim": 64, "coarse_channels": 16,
                     "fine_channels": [16, 32, 64, 128], "head_channels": 32}}


def matmul_gflops(n=2048, reps=10, dtype=None):
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def engines(which):
    import torch

    from CLIPSegLib.engines.cliptnseg.network import build_network
    from CLIPSegLib.engines.cliptnseg.engine import CLIPTNSegEngine
    from CLIPSegLib.inference.segment_file import load_engine

    out = {}
    if "embedded" in which:
        out["embedded (128 px, ViT 6x128/8)"] = load_engine(None, device="cpu")
    if "paper" in which:
        torch.manual_seed(0)
        out["paper size (352 px, ViT-B/16)"] = CLIPTNSegEngine(build_network(PAPER), torch.device("cpu"), PAPER)
    return out


def slice_flops(engine):
    """Forward FLOPs of one slice with the three prompts, attention included (``CLIPSegLib.engines.flops``)."""
    import torch

    from CLIPSegLib.engines.flops import count_flops

    s = engine.preprocessing.input_size
    text = engine.encode_prompts(PROMPTS).embeddings
    with torch.inference_mode():
        return count_flops(lambda: engine.net(torch.rand(1, engine.preprocessing.channels, s, s), text))


def per_slice(engine, batch, reps=3):
    """Seconds per slice of ``engine.predict`` on a batch: the best of ``reps`` timed calls after one warm-up (the
    best filters out the other processes sharing the cores, as timeit does)."""
    import torch

    s = engine.preprocessing.input_size
    x = torch.rand(batch, engine.preprocessing.channels, s, s)
    state = engine.encode_prompts(PROMPTS)
    engine.predict(x, state)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        engine.predict(x, state)
        times.append(time.perf_counter() - t)
    return min(times) / batch


@contextlib.contextmanager
def execution(engine, variant: str):
    """Run ``engine.predict`` as ``variant``: 'fp32' (PyTorch defaults), 'sdpa' (nn.MultiheadAttention's native fast
    path off, so attention goes through scaled_dot_product_attention), 'channels-last' (NHWC convolutions),
    'bf16' (the engine's bf16 autocast, as ``--precision bf16``)."""
    import torch

    net = engine.net
    if variant == "sdpa":
        torch.backends.mha.set_fastpath_enabled(False)
    if variant == "channels-last":
        net.to(memory_format=torch.channels_last)
    if variant == "bf16":
        engine.precision = "bf16"  # the engine's own autocast path (clipseg segment --precision bf16)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
        net.to(memory_format=torch.contiguous_format)
        engine.precision = "fp32"


VARIANTS = ("fp32", "sdpa", "channels-last", "bf16")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over from the parent."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args):
    """Segment one phantom volume in this process; print wall time and peak RSS as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.synthetic.phantoms import make_phantom
    from CLIPSegLib.inference.pipeline import segment_volume

    engine = list(engines([args.engine]).values())[0]
    ph = make_phantom((args.slices, args.size, args.size), spacing=(0.8, 0.25, 0.25), seed=42,
                      findings=("nodule", "cyst", "calcification"))
    g = Geometry.axis_aligned(ph.spacing)
    segment_volume(engine, ph.image[:2], g, PROMPTS)
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    segment_volume(engine, ph.image, g, PROMPTS)
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0}))


def run_child(engine, slices, size, threads):
    out = subprocess.run([sys.executable, __file__, "--child", "--engine", engine, "--slices", str(slices),
                          "--size", str(size), "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip the paper-size volumes")
    ap.add_argument("--results", action="store_true", help="append the output to benchmarks/RESULTS.md")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--engine", default="embedded")
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    if a.child:
        return child(a)
    import torch

    torch.set_num_threads(a.threads)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    gf = matmul_gflops()
    gf_bf16 = matmul_gflops(dtype=torch.bfloat16)
    say(f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} logical CPUs, {a.threads} threads, "
        f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    say(f"measured matmul throughput (2048x2048): fp32 {gf:.1f} GFLOP/s, bf16 {gf_bf16:.1f} GFLOP/s")
    for name, eng in engines(["embedded", "paper"]).items():
        say(f"\n## {name}")
        flops = slice_flops(eng)
        sweep = {b: per_slice(eng, b) for b in ((1, 4, 16, 32) if "embedded" in name else (1, 4))}
        best_b = min(sweep, key=sweep.get)
        limit = flops / (gf * 1e9)
        say(f"forward FLOPs per slice (3 prompts): {flops / 1e9:.2f} GFLOP -> FLOP limit {1000 * limit:.1f} ms/slice")
        say("batch sweep, ms per slice: " + ", ".join(f"b={b}: {1000 * t:.1f}" for b, t in sweep.items()))
        say(f"best: {1000 * sweep[best_b]:.1f} ms/slice = {sweep[best_b] / limit:.2f}x the FLOP limit "
            f"({100 * limit / sweep[best_b]:.0f}% of peak matmul throughput)")
        batches = (1, 4) if "embedded" in name else (1,)
        say(f"execution variants, ms per slice at batch {'/'.join(map(str, batches))} "
            "(limit = FLOPs / matmul throughput of the variant's precision):")
        for v in VARIANTS:
            with execution(eng, v):
                t = {b: per_slice(eng, b) for b in batches}
            lim = flops / ((gf_bf16 if v == "bf16" else gf) * 1e9)
            say(f"  {v:13s} " + ", ".join(f"b={b}: {1000 * x:.1f}" for b, x in t.items())
                + f" -> {min(t.values()) / lim:.2f}x the {'bf16' if v == 'bf16' else 'fp32'} FLOP limit "
                f"({1000 * lim:.1f} ms)")
        # reference style: one slice per call, text re-encoded every time
        n = 8 if "embedded" in name else 2
        t = time.perf_counter()
        for _ in range(n):
            eng.clear_prompt_cache()
            per_slice(eng, 1, reps=1)
        ref = (time.perf_counter() - t) / n / 2
        say(f"reference-style (batch 1, text re-encoded per slice): {1000 * ref:.1f} ms/slice; ours "
            f"{1000 * sweep[best_b]:.1f} ms/slice; ratio {ref / sweep[best_b]:.2f}x")
    say("\n## volumes (3 prompts, each run in its own process; peak RSS of that process)")
    runs = [("embedded", 64, 256), ("embedded", 128, 256), ("embedded", 256, 256), ("embedded", 128, 512)]
    if not a.quick:
        runs += [("paper", 64, 256), ("paper", 128, 512)]
    base = None
    for engine, slices, size in runs:
        r = run_child(engine, slices, size, a.threads)
        note = ""
        if engine == "embedded" and size == 256:
            base = base or r["seconds"] / slices
            note = f"; {r['seconds'] / slices / base:.2f}x the 64-slice per-slice cost"
        say(f"{engine:8s} {size}x{size}x{slices}: {r['seconds']:.1f} s ({1000 * r['seconds'] / slices:.0f} ms/slice), "
            f"peak RSS {r['peak_rss_mb']:.0f} MB (of which before the run, with the volume: "
            f"{r['rss_before_mb']:.0f} MB){note}")
    if a.results:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write(f"\n### `python benchmarks/latency.py --threads {a.threads}{' --quick' if a.quick else ''}`"
                     f" ({time.strftime('%Y-%m-%d')})\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
