"""TGC-Net's ablation table and its comparison with CLIP-TNseg on report phantoms, side by side in one run: the full
network, without SSE / DATE / VLCM, and a CLIP-TNseg segmenter, each trained for the same steps on the same report
bank from the same CLIP (the report CLIP of a ``clipseg train --engine tgcnet`` work folder), calibrated on the same
held-out phantoms, and scored on held-out phantoms in the training wording and rephrased.

Run (after ``clipseg train --engine tgcnet --dataset report`` has made its CLIP):
  .venv/bin/python benchmarks/tgcnet_ablation.py [--clip build/work/tgcnet-report-small/clip.pt] [--steps 600]
      [--phantoms 600] [--eval 40] [--variants full,no-sse,no-date,no-vlcm,cliptnseg]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CLIPSeg"))

VARIANTS = {"full": (), "no-sse": ("sse",), "no-date": ("date",), "no-vlcm": ("vlcm",), "cliptnseg": None}


def train_cliptnseg(clip_ckpt: Path, work: Path, steps: int, n_images: int, calibration: int, progress):
    """A CLIP-TNseg segmenter (the embedded model's architecture, with a presence head as TGC-Net has) on the report
    bank with the report CLIP frozen, its rule calibrated as TGC-Net's (one per kind) -> (engine, trainable
    parameters)."""
    import torch

    from CLIPSegLib.engines.clip_backbone import build_clip
    from CLIPSegLib.engines.cliptnseg.engine import CLIPTNSegEngine
    from CLIPSegLib.engines.cliptnseg.network import CLIPTNSegNet
    from CLIPSegLib.training.cliptnseg_recipe import embedded_spec, train_segmenter
    from CLIPSegLib.training.report_data import ReportBank, calibrate_report_rules
    from CLIPSegLib.training.tgcnet_recipe import REPORT_CLIP

    clip = build_clip(REPORT_CLIP)
    clip.load_state_dict(torch.load(clip_ckpt, map_location="cpu", weights_only=True)["model"])
    net = CLIPTNSegNet(clip, embedded_spec(presence_head=True)["network"])
    bank = ReportBank(n_images, net.input_size,  # three lines per image, as TGC-Net's
                      progress=lambda d, t: progress.update("report phantoms", d, t))
    train_segmenter(net, bank, steps, work / "segmenter.pt", progress=progress)
    net.eval()
    engine = CLIPTNSegEngine(net, torch.device("cpu"), {"inference": {"flip_average": False}})
    engine.spec["presence"] = calibrate_report_rules(engine, calibration, progress)
    return engine, sum(p.numel() for p in net.parameters() if p.requires_grad)


def _row(name: str, trainable: int, minutes: float, scores: dict) -> str:
    """One Markdown table row: the variant's Dice in both wordings (all described lines, then per kind in the
    training wording) and its empty rates (training wording)."""
    from CLIPSegLib.synthetic.report_phantoms import KINDS

    def rate(part):
        return "n/a" if part["empty_rate"] is None else f"{part['empty_rate']:.1%} of {part['lines']}"

    def dice(value):
        return "n/a" if value is None else f"{value:.3f}"

    t, r = scores["train"], scores["rephrased"]
    kinds = " | ".join(dice(t["dice_by_kind"].get(k)) for k in KINDS)
    return (f"| {name} | {trainable:,} | {minutes:.1f} | {dice(t['dice']['mean'])} | {dice(r['dice']['mean'])} | "
            f"{kinds} | {rate(t['wrong-side'])} | {rate(t['absent'])} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default="build/work/tgcnet-report-small/clip.pt")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--phantoms", type=int, default=600)
    ap.add_argument("--calibration", type=int, default=24)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()

    from CLIPSegLib.evaluation.evaluator import evaluate
    from CLIPSegLib.evaluation.report_cases import ReportCases
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.progress import Progress
    from CLIPSegLib.training.tgcnet_recipe import run_tgcnet_training

    clip = Path(a.clip)
    if not clip.is_file():
        sys.exit(f"no report CLIP checkpoint {clip}: run `clipseg train --engine tgcnet --dataset report` first "
                 f"(its work folder holds clip.pt), or give --clip")
    progress = Progress("bar")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="tgcnet-ablation-"))
    for name in a.variants.split(","):
        ablate = VARIANTS[name]
        work = tmp / name
        work.mkdir()
        start = time.perf_counter()
        if ablate is None:
            engine, trainable = train_cliptnseg(clip, work, a.steps, a.phantoms, a.calibration, progress)
        else:
            shutil.copy(clip, work / "clip.pt")
            path = run_tgcnet_training(tmp / "models", work, f"ablation-{name}", "report", a.phantoms,
                                       steps=a.steps, stages=("segmenter", "calibrate", "export"),
                                       calibration_volumes=a.calibration, progress=progress, ablate=ablate)
            engine = load_engine(str(path), device="cpu")
            trainable = load_spec(str(path))["training"]["parameters"]["trainable"]
        minutes = (time.perf_counter() - start) / 60
        scores = {w: evaluate(ReportCases(a.eval, a.seed, w), engine, progress=progress)["summary"]
                  for w in ("train", "rephrased")}
        rows.append(_row(name, trainable, minutes, scores))
        print(f"{name}: done in {minutes:.1f} min: {rows[-1]}", flush=True)  # a row as soon as it is measured
    print(f"\nreport phantoms, {a.steps} steps on {a.phantoms} phantoms each, same CLIP ({clip}), calibrated on "
          f"{a.calibration}, scored on {a.eval} held-out phantoms (seeds {a.seed}..{a.seed + a.eval - 1})\n")
    print("| variant | trainable params | train+calibrate min | Dice (train wording) | Dice (rephrased) | "
          "ground-glass | consolidation | effusion | wrong side -> empty | absent -> empty |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
