"""``clipseg demo``: a phantom volume -> .seg.nrrd + overlay PNG + Dice against the phantom's truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io.geometry import Geometry
from .io.outputs import write_volume
from .evaluation.metrics import dice
from .options import SegmentOptions
from .synthetic.phantoms import make_phantom
from .progress import Progress
from .inference.segment_file import segment_file

DEMO_PROMPTS = {"nodule": "hypoechoic thyroid nodule", "cyst": "anechoic cyst", "calcification": "calcification"}


def choose_slice(truth: dict[str, np.ndarray], masks: dict[str, np.ndarray] | None = None) -> int:
    """Index k (along K of ``[K,J,I]`` masks) of the slice where the most findings are present in the truth; ties go
    to the largest total truth area. Without any truth: the slice with the most segmented voxels, else the middle."""
    if any(t.any() for t in truth.values()):
        count = sum(t.any(axis=(1, 2)).astype(int) for t in truth.values())
        area = sum(t.sum(axis=(1, 2)) for t in truth.values())
        return int(np.lexsort((area, count))[-1])  # last key sorts first: count, then area
    total = sum(m.sum(axis=(1, 2)) for m in (masks or {}).values())
    return int(np.argmax(total)) if np.any(total) else next(iter((masks or truth).values())).shape[0] // 2


def _label(draw, xy, text: str, fill, pad: int = 3) -> tuple[int, int, int, int]:
    """Draw ``text`` at ``xy`` on an opaque black box (readable over speckle); returns the box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = draw.textbbox(xy, text)
    box = (x0 - pad, y0 - pad, x1 + pad, y1 + pad)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text(xy, text, fill=fill)
    return box


def overlay_png(path: Path, image_kji: np.ndarray, masks: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                colors) -> Path:
    """Save the slice (along K) with the most findings present in the truth (``choose_slice``): filled predictions,
    truth outlines in white, a legend on an opaque box (top left) and the slice index (bottom left)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    k = choose_slice(truth, masks) if truth or masks else image_kji.shape[0] // 2
    sl = image_kji[k]
    lo, hi = np.percentile(sl, [1, 99.5])
    grey = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, -1)
    for (name, m), c in zip(masks.items(), colors):
        rgb[m[k]] = 0.55 * rgb[m[k]] + 0.45 * np.asarray(c)
    for t in truth.values():
        edge = t[k] & ~ndimage.binary_erosion(t[k])
        rgb[edge] = 1.0
    img = Image.fromarray((rgb * 255).astype(np.uint8)).resize((sl.shape[1] * 2, sl.shape[0] * 2), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    lines = [(name, tuple(int(255 * v) for v in c)) for name, c in zip(masks, colors)]
    if lines:  # one opaque box behind the whole legend, then its lines
        boxes = [draw.textbbox((6, 6 + 14 * n), name) for n, (name, _) in enumerate(lines)]
        draw.rectangle((3, 3, max(b[2] for b in boxes) + 3, max(b[3] for b in boxes) + 3), fill=(0, 0, 0))
        for n, (name, fill) in enumerate(lines):
            draw.text((6, 6 + 14 * n), name, fill=fill)
    _label(draw, (6, img.size[1] - 18), f"slice k={k}; white outline = truth", (255, 255, 255))
    img.save(path)
    return path


def run_demo(output_dir: Path, seed: int = 7, options: SegmentOptions | None = None, progress: Progress | None = None,
             **keywords) -> dict:
    """Segment a phantom volume (``options`` with ``keywords`` changed: any ``SegmentOptions`` field) and write it,
    its segmentation and an overlay PNG to ``output_dir``; -> their paths and the Dice of each prompt."""
    from .io.outputs import SEGMENT_COLORS

    progress = progress or Progress("bar")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ph = make_phantom((32, 256, 256), spacing=(0.8, 0.25, 0.25), seed=seed, findings=tuple(DEMO_PROMPTS))
    geometry = Geometry.axis_aligned(ph.spacing)
    volume_path = write_volume(output_dir / "phantom.nrrd", ph.image, geometry)
    seg_path = output_dir / "phantom.seg.nrrd"
    prompts = [DEMO_PROMPTS[f] for f in ph.findings]
    result = segment_file(volume_path, prompts, seg_path, options, progress=progress, **keywords)
    scores = {}
    for f, fr in zip(ph.findings, result.findings):
        scores[fr.prompt] = dice(fr.mask, ph.masks[f])
    png = overlay_png(output_dir / "overlay.png", ph.image, result.masks,
                      {f: ph.masks[f] for f in ph.findings}, SEGMENT_COLORS)
    return {"volume": str(volume_path), "segmentation": str(seg_path), "overlay": str(png), "dice": scores}
