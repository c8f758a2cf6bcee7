"""The slice/volume pipeline: volume ``[K,J,I]`` + prompts -> one mask per prompt, with a presence decision.

1. normalise the whole volume's intensity (``preprocessing.normalize_intensity``);
2. cut it into slices along the chosen axis, resize each to the engine's input size, batch them;
3. ``engine.predict`` -> probabilities, resized back to the slice grid (text is embedded once per run);
4. per prompt, 3D post-processing and the found / not-found decision (``postprocess.decide``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .clip_backbone import check_prompts
from .errors import DeviceError, InputError
from .imageio import Geometry, check_volume
from .postprocess import DEFAULT_PRESENCE, decide
from .preprocessing import normalize_intensity, resize_slices
from .progress import Progress

AXES = ("auto", "0", "1", "2")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA if present else CPU; 'cuda' without a GPU is an error that says what to do."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but no CUDA GPU is available to PyTorch "
                              f"(torch {torch.__version__}); use --device cpu or --device auto")
        return torch.device(name)
    raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")


def choose_axis(shape_kji: tuple[int, int, int], geometry: Geometry, axis: str | int = "auto") -> int:
    """Slice axis as a voxel axis index (0 = I, 1 = J, 2 = K).

    'auto' takes the axis with the largest spacing (the acquisition direction of thick-slice volumes), K on ties
    and for 2D images."""
    axis = str(axis)
    if axis not in AXES:
        raise InputError(f"axis {axis!r} is not one of auto, 0 (I), 1 (J), 2 (K)")
    if axis != "auto":
        return int(axis)
    if shape_kji[0] == 1:
        return 2
    spacing = np.asarray(geometry.spacing)
    best = 2
    for a in (0, 1):
        if spacing[a] > spacing[best] * 1.01 and shape_kji[2 - a] > 1:
            best = a
    return best


@dataclass
class FindingResult:
    """Result for one prompt. mask: bool ``[K,J,I]``; info: found, score, components, voxels."""

    prompt: str
    mask: np.ndarray
    info: dict

    @property
    def found(self) -> bool:
        return self.info["found"]

    def message(self) -> str:
        if self.found:
            return f"{self.prompt!r}: found ({self.info['components']} region(s), {self.info['voxels']} voxels, " \
                   f"peak probability {self.info['score']:.2f})"
        return f"{self.prompt!r}: not found in this image (peak probability {self.info['score']:.2f}); " \
               f"the segment is empty"


@dataclass
class SegmentationResult:
    findings: list[FindingResult]
    slice_axis: int  # voxel axis: 0 = I, 1 = J, 2 = K
    probabilities: np.ndarray | None = field(default=None, repr=False)  # [P,K,J,I] float32 when kept

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return {f.prompt: f.mask for f in self.findings}


def predict_probabilities(engine, volume: np.ndarray, prompts: list[str], slice_axis: int, batch_size: int = 16,
                          progress: Progress | None = None, cancel=None) -> np.ndarray:
    """volume ``[K,J,I]`` (raw intensities) -> probabilities ``[P,K,J,I]`` float32.

    Slices along ``slice_axis`` (voxel axis 0=I, 1=J, 2=K) are resized to the engine's input size and predicted in
    batches; constant slices (no signal) are skipped and get probability 0. ``cancel()`` returning True stops."""
    progress = progress or Progress("none")
    array_axis = 2 - slice_axis
    norm = normalize_intensity(volume)
    slices = norm.movedim(array_axis, 0)  # [N, a, b]
    n, a, b = slices.shape
    probs = torch.zeros((len(prompts), n, a, b), dtype=torch.float32)
    active = (slices.flatten(1).amax(1) - slices.flatten(1).amin(1)) > 1e-6
    todo = active.nonzero().flatten()
    size = engine.input_size
    with torch.inference_mode():
        for start in range(0, len(todo), batch_size):
            if cancel is not None and cancel():
                from .errors import Cancelled

                raise Cancelled("cancelled by the user; nothing was written")
            idx = todo[start:start + batch_size]
            x = resize_slices(slices[idx][:, None], size)
            p = engine.predict(x, prompts).float().cpu()  # [B,P,S,S]
            probs[:, idx] = resize_slices(p, (a, b)).clamp_(0, 1).transpose(0, 1)
            progress.update("segmenting slices", min(start + batch_size, len(todo)), len(todo))
    return probs.movedim(1, 1 + array_axis).numpy()


def presence_rule(engine, prompt: str, presence: dict) -> tuple[dict, str]:
    """The found / not-found rule for ``prompt``: the calibrated rule of the trained finding whose phrasings are
    closest in the engine's text embedding space (cosine >= ``match_min_cosine``), else the model's global rule.
    Returns (rule, name of the finding used or 'global')."""
    per = presence.get("per_finding") or {}
    if not per or not hasattr(engine, "text_embeddings"):
        return presence, "global"
    t = engine.text_embeddings([prompt])[0]
    best, best_cos = "global", -1.0
    for finding, rule in per.items():
        cos = float((engine.text_embeddings(rule["phrases"]) @ t).max())
        if cos > best_cos:
            best, best_cos = finding, cos
    if best_cos < presence.get("match_min_cosine", 1.0):
        return presence, "global"
    return per[best], best


def segment_volume(engine, volume: np.ndarray, geometry: Geometry, prompts: list[str], axis: str | int = "auto",
                   presence: dict | None = None, batch_size: int = 16, keep_probabilities: bool = False,
                   progress: Progress | None = None, cancel=None) -> SegmentationResult:
    """Segment each prompt's finding in a ``[K,J,I]`` volume. ``presence`` overrides the model's decision rule."""
    prompts = check_prompts(prompts)
    volume = check_volume(volume)
    progress = progress or Progress("none")
    slice_axis = choose_axis(volume.shape, geometry, axis)
    probs = predict_probabilities(engine, volume, prompts, slice_axis, batch_size, progress, cancel)
    model_presence = (getattr(engine, "spec", {}) or {}).get("presence", {})
    findings = []
    for prompt, prob in zip(prompts, probs):
        rule, rule_name = presence_rule(engine, prompt, model_presence)
        cfg = {k: v for k, v in {**rule, **(presence or {})}.items() if k in DEFAULT_PRESENCE}
        mask, info = decide(prob, geometry.spacing, 2 - slice_axis, cfg)
        info["rule"] = rule_name
        findings.append(FindingResult(prompt, mask, info))
    return SegmentationResult(findings, slice_axis, probs if keep_probabilities else None)
