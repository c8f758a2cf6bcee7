"""MedCLIP-SAM at real sizes: the reference-style sequence against this engine, side by side in one run.

Models: a CLIP ViT-B/16 at 224 (open_clip's architecture) and SAM ViT-B at 1024, random weights (timing does not
depend on them), written once as a medclipsam model spec. Input: ``--slices`` phantom slices (256 x 256), ``--prompts``
findings each. Every variant runs in its own process (so its peak resident memory is its own) on ``--threads``:

- reference: what the published scripts do per slice and prompt: the text encoded again, gScoreCAM with the top
  ``--topk`` channels scoring one masked image at a time, the saliency cut into a box, and SAM's image embedding
  computed again for that prompt;
- engine gscorecam: ``engine.predict`` on the slices (text encoded once; masked images in batches of 32, a channel
  in several prompts' top-k scored once; one SAM embedding per slice for all prompts);
- engine patch_similarity: the same with the cheaper saliency (one CLIP image pass per slice for every prompt);
- ``-bf16`` variants: the same engine with ``precision`` bf16 (the CLIP image-tower passes and SAM's image encoder
  under bf16 autocast; maps, boxes and masks in float32); their outputs are compared with the fp32 variant's (Dice
  of the masks at 0.5 over all slices and prompts, each mask's voxels, and the probabilities' mean and largest
  difference; random weights, so this measures rounding, not accuracy).

Every slice gets a box in every variant here (presence floor 0), so the figures are per slice with work to do; on a
volume the engine also skips SAM on slices without a box and everything on slices below the presence rule.
Prints seconds per slice, the ratio to the reference, and peak resident memory (MB). bf16 pays only on a CPU with
AMX (``contract.native_bf16``, printed); elsewhere the engine runs those variants in fp32.

Run:  .venv/bin/python benchmarks/medclipsam_speed.py [--slices 2] [--prompts 3] [--threads 2] [--topk 300]
      [--variants reference,engine-gscorecam,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CLIPSeg"))
PROMPTS = ["hypoechoic thyroid nodule", "anechoic cyst", "calcification"]
VARIANTS = ("reference", "engine-gscorecam", "engine-patch_similarity", "engine-gscorecam-bf16",
            "engine-patch_similarity-bf16")


def write_model(folder: Path, topk: int) -> Path:
    """A medclipsam spec: CLIP ViT-B/16 at 224 (``clip.*``) + SAM ViT-B (``sam.*``), random weights."""
    import torch

    from CLIPSegLib.engines.clip_backbone import build_clip
    from CLIPSegLib.engines.medclipsam.sam import build_sam, sam_sizes
    from CLIPSegLib.models import write_spec

    torch.manual_seed(0)
    clip, sam = build_clip({"open_clip_name": "ViT-B-16"}), build_sam(sam_sizes("vit_b"))
    weights = {**{f"clip.{k}": v for k, v in clip.state_dict().items()},
               **{f"sam.{k}": v for k, v in sam.state_dict().items()}}
    spec = {"id": "medclipsam-speed", "engine": "medclipsam", "clip": {"open_clip_name": "ViT-B-16"},
            "sam": {"type": "vit_b"}, "saliency": {"method": "gscorecam", "topk": topk, "batch_size": 32},
            "boxes": {"split": "otsu", "min_area": 1, "max_boxes": 1},
            "presence": {"threshold": 0.5, "min_peak": 0.0, "min_slice_presence": 0.0, "slice_gate": 0.0}}
    return write_spec(spec, weights, folder, half=False)


def slices(n: int):
    """``[n,1,256,256]`` phantom slices in [0,1] (each with a nodule, a cyst and foci)."""
    import torch

    from CLIPSegLib.inference.preprocessing import normalize_intensity
    from CLIPSegLib.synthetic.phantoms import make_phantom

    ph = make_phantom((n, 256, 256), spacing=(1.0, 0.25, 0.25), seed=7, findings=("nodule", "cyst", "calcification"))
    return normalize_intensity(ph.image)[:, None].contiguous().to(torch.float32)


def run_reference(engine, x, prompts, topk: int) -> None:
    """The reference scripts' sequence, slice by slice and prompt by prompt (module docstring)."""
    import torch
    import torch.nn.functional as F

    from CLIPSegLib.engines.medclipsam.prompts import saliency_to_prompts
    from CLIPSegLib.engines.medclipsam.saliency import saliency

    clip, sam = engine.clip, engine.sam
    size = engine.preprocessing.input_size
    with torch.inference_mode():
        for b in range(x.shape[0]):
            image = F.interpolate(x[b:b + 1], size=(size, size), mode="bilinear", align_corners=False)
            for prompt in prompts:
                text = clip.encode_text([prompt], engine.device)
                sal = saliency(clip.model, clip.normalize(image), text, "gscorecam", topk, 1, -1, clip.black())
                boxes = saliency_to_prompts(sal[0, 0].cpu().numpy(), min_area=1).boxes
                box = torch.as_tensor(boxes[:1] if len(boxes) else [[0, 0, size - 1, size - 1]],
                                      dtype=torch.float32)
                sam.segment(image, [box])  # embeds the slice again for every prompt


def child(variant: str, spec_path: str, n: int, n_prompts: int, topk: int, threads: int, masks: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from CLIPSegLib.engines import create_engine
    from CLIPSegLib.engines.contract import effective_precision
    from CLIPSegLib.models import load_spec

    spec = load_spec(spec_path)
    if "patch_similarity" in variant:
        spec["saliency"] = {**(spec.get("saliency") or {}), "method": "patch_similarity"}
    precision = effective_precision("bf16" if variant.endswith("-bf16") else "fp32", torch.device("cpu"))
    engine = create_engine(spec, torch.device("cpu"), precision=precision)
    prompts = PROMPTS[:n_prompts]
    x = slices(n)
    start = time.perf_counter()
    if variant == "reference":
        run_reference(engine, x, prompts, topk)
    else:
        state = engine.encode_prompts(prompts)
        fitted = torch.nn.functional.interpolate(x, size=(engine.preprocessing.input_size,) * 2, mode="bilinear",
                                                 align_corners=False)
        probs, _ = engine.predict(fitted, state)
        np.save(masks, probs.float().cpu().numpy())
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "seconds_per_slice": seconds / n, "peak_rss_mb": peak_mb,
                      "precision": precision}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--topk", type=int, default=300)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--masks", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.spec, a.slices, a.prompts, a.topk, a.threads, a.masks)

    import numpy as np
    import torch

    from CLIPSegLib.engines.contract import native_bf16

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
          f"{torch.__version__}, {a.threads} threads; CLIP ViT-B/16 at 224, SAM ViT-B at 1024, random weights; "
          f"{a.slices} slices x {a.prompts} prompts, gScoreCAM top {a.topk}; native bf16: {native_bf16()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_model(Path(tmp), a.topk)
        for variant in a.variants.split(","):
            masks = Path(tmp) / f"{variant}.npy"
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--spec", str(spec), "--slices",
                                  str(a.slices), "--prompts", str(a.prompts), "--topk", str(a.topk), "--threads",
                                  str(a.threads), "--masks", str(masks)], check=True, capture_output=True,
                                 text=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
            r = results[variant]
            ratio = results["reference"]["seconds_per_slice"] / r["seconds_per_slice"] if "reference" in results \
                else float("nan")
            fp32 = Path(tmp) / f"{variant.removesuffix('-bf16')}.npy"
            agree = ""
            if variant.endswith("-bf16") and fp32.is_file():
                p, q = np.load(masks), np.load(fp32)
                x, y = p > 0.5, q > 0.5
                dice = f"Dice {2 * (x & y).sum() / (x.sum() + y.sum()):.3f}" if x.any() or y.any() else "both empty"
                agree = (f"   vs fp32: masks {dice} ({x.sum()} / {y.sum()} voxels), probabilities differ by "
                         f"{np.abs(p - q).mean():.4f} on average, {np.abs(p - q).max():.3f} at most")
            print(f"  {variant:<29} {r['seconds_per_slice']:8.1f} s per slice   {ratio:6.1f}x faster than the "
                  f"reference   peak memory {r['peak_rss_mb']:7.0f} MB   ({r['precision']}){agree}", flush=True)


if __name__ == "__main__":
    main()
