"""How well a MedCLIP-SAM model's saliency localises, per method, side by side: on every slice of a few calibration
phantom volumes where a finding is present, the saliency of its canonical phrase is cut into a box as the engine
cuts it (``prompts.saliency_to_prompts`` with the model's box settings) and compared with the bounding box of the
truth (IoU; 0 when no box). Also the mean map inside the truth minus outside, seconds per slice, and how well the
model's slice presence (CLIP's image-text score, the patch score with ``saliency.slice_presence`` "patches", or the
presence CLIP's image-text score with "presence_clip")
tells the slices holding the finding from those without it, over every slice of the volumes (ROC AUC, MONAI's
``compute_roc_auc``; mean presence on slices with / without), and the volumes holding it from the others by their
highest slice presence (volume AUC).

Run:  .venv/bin/python benchmarks/medclipsam_saliency.py [--models medclipsam-phantom-small,OTHER.json]
      [--methods gradcam,patch_similarity] [--volumes 4] [--family A]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CLIPSeg"))


def box_iou(a, b) -> float:
    """Boxes XYXY inclusive pixels -> IoU."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def slices_of(seed: int, size: int, family: str):
    """(images [K,1,S,S] in [0,1], {finding: masks [K,S,S] bool}) of a calibration phantom volume."""
    import torch

    from CLIPSegLib.inference.preprocessing import normalize_intensity, resize_slices
    from CLIPSegLib.synthetic.families import random_volume_phantom

    p = random_volume_phantom(seed, family)
    images = resize_slices(normalize_intensity(p.image)[:, None], size)
    masks = {f: resize_slices(torch.from_numpy(m.astype("float32"))[:, None], size)[:, 0] > 0.5
             for f, m in p.masks.items()}
    return images, masks


def slice_presence_auc(engine, volumes) -> dict:
    """{finding: "AUC, mean presence on slices with / without"} of the engine's own slice presence (``predict``'s
    second output) for each finding's canonical phrase over every slice of ``volumes``."""
    import numpy as np
    import torch
    from monai.metrics import compute_roc_auc

    from CLIPSegLib.synthetic.phantoms import FINDINGS, PHRASES

    state = engine.encode_prompts([PHRASES[f][0] for f in FINDINGS])
    scores, truth, floor = [], [], engine.skip_below
    engine.skip_below = 1.1  # presence only: no slice reaches saliency or SAM
    try:
        for images, masks in volumes:
            scores.append(engine.predict(images, state)[1].cpu())
            truth.append(torch.stack([masks[f].flatten(1).any(1) if f in masks
                                      else torch.zeros(len(images), dtype=bool) for f in FINDINGS], 1))
    finally:
        engine.skip_below = floor
    peak = torch.stack([s.amax(0) for s in scores])  # [V,F] each volume's highest slice presence
    held = torch.stack([t.any(0) for t in truth])  # [V,F] the volume holds the finding
    scores, truth = torch.cat(scores), torch.cat(truth)

    def roc(s, y):
        return compute_roc_auc(s, y.float()) if 0 < int(y.sum()) < len(y) else float("nan")

    out = {}
    for i, f in enumerate(FINDINGS):
        y, s = truth[:, i], scores[:, i]
        out[f] = (f"{roc(s, y):.3f}, {float(s[y].mean()) if y.any() else np.nan:.2f} / {float(s[~y].mean()):.2f}; "
                  f"volumes {roc(peak[:, i], held[:, i]):.3f} ({int(held[:, i].sum())} of {len(held)} hold it)")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="medclipsam-phantom-small")
    ap.add_argument("--methods", default="gradcam,patch_similarity")
    ap.add_argument("--volumes", type=int, default=4)
    ap.add_argument("--family", default="A")
    a = ap.parse_args()

    import numpy as np
    import torch

    from CLIPSegLib.engines import create_engine
    from CLIPSegLib.engines.medclipsam.prompts import saliency_to_prompts
    from CLIPSegLib.engines.medclipsam.saliency import saliency
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.synthetic.phantoms import PHRASES
    from CLIPSegLib.training.datasets import CALIBRATION_SEED_BASE

    torch.set_num_threads(2)
    seeds = [CALIBRATION_SEED_BASE + i for i in range(a.volumes)]
    print(f"{a.volumes} calibration volumes (seeds {seeds[0]}..{seeds[-1]}, family {a.family}); box IoU with the truth "
          f"box on slices where the finding is present (0 when no box); contrast = mean map inside - outside")
    print(f"{'model':34s} {'method':17s} {'finding':14s} {'slices':>6s} {'box IoU':>8s} {'IoU>0.5':>8s} "
          f"{'contrast':>9s} {'s/slice':>8s}   slice presence: AUC, mean with / without; volume AUC")
    for model in a.models.split(","):
        engine = create_engine(load_spec(model), torch.device("cpu"))
        clip, size = engine.clip, engine.clip.image_size
        volumes = [slices_of(s, size, a.family) for s in seeds]
        auc = slice_presence_auc(engine, volumes)
        for method in a.methods.split(","):
            stats, seconds, n_slices = {}, 0.0, 0
            for images, masks in volumes:
                for finding, m in masks.items():
                    ks = [k for k in range(len(m)) if m[k].any()]
                    if not ks:
                        continue
                    with torch.inference_mode():
                        text = clip.encode_text([PHRASES[finding][0]], "cpu")
                        x = clip.normalize(images[ks])
                    start = time.perf_counter()
                    sal = saliency(clip.model, x, text, method, block=-1, neutral=engine.neutral_embeddings(),
                                   fill=clip.black())[:, 0].numpy()
                    seconds += time.perf_counter() - start
                    n_slices += len(ks)
                    for s, k in zip(sal, ks):
                        truth = m[k].numpy()
                        rows, cols = np.nonzero(truth)
                        tbox = [cols.min(), rows.min(), cols.max(), rows.max()]
                        boxes = saliency_to_prompts(s, **engine.boxes).boxes
                        iou = box_iou(boxes[0], tbox) if len(boxes) else 0.0
                        contrast = float(s[truth].mean() - s[~truth].mean())
                        stats.setdefault(finding, []).append((iou, contrast))
            for finding, v in sorted(stats.items()):
                v = np.asarray(v)
                print(f"{Path(model).stem:34s} {method:17s} {finding:14s} {len(v):6d} {v[:, 0].mean():8.3f} "
                      f"{(v[:, 0] > 0.5).mean():8.2f} {v[:, 1].mean():9.3f} {seconds / max(n_slices, 1):8.3f}   "
                      f"{auc[finding]}")


if __name__ == "__main__":
    main()
