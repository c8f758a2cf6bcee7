"""Calibrate a MedCLIP-SAM model's found / not-found rule on phantom volumes (calibration seeds,
``datasets.CALIBRATION_SEED_BASE``; evaluation uses 1000.., validation 40,000,000..).

Besides the pipeline's component rule (``calibration.search_rule``: peak, mean probability, extent, area) the rule of
this engine has two slice tests: ``min_slice_presence`` (the pipeline empties a slice whose CLIP presence is below
it) and ``min_sam_iou`` (the engine drops a box whose mask SAM's IoU head scores lower). Each volume is predicted
once with both off (the engine's ``on_iou`` hook records the best SAM IoU of every slice and prompt); each candidate
pair then empties the slices it would, the maps go through ``pipeline.combine_maps`` (slice gate 0: SAM's masks are
used as they are, with the floor and the model's slice vote, as the pipeline will), and the component rule is
searched on them. The pair and rule maximising 2 x (absent findings left empty) + mean Dice win, as for cliptnseg.
Dropping a slice by SAM IoU is exact for one mask per slice and prompt: one box (``boxes.max_boxes`` 1), or the
occlusion choice of one of several (``saliency.occlusion``: the hook records the chosen box's IoU, the embedded
model's setting); several boxes without it are merged and judged by the best IoU, an approximation.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..inference.pipeline import combine_maps, predict_maps, slice_vote_of
from ..io.geometry import array_axis_of
from ..progress import Progress
from ..synthetic.phantoms import FINDINGS, PHRASES
from ..engines.contract import MATCH_MIN_COSINE
from .calibration import SLICE_AXIS, _entry, phantom_cases, search_rule
from .datasets import CALIBRATION_SEED_BASE

FLOORS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)  # candidate min_slice_presence
IOUS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8)  # candidate min_sam_iou


def predict_cases(engine, cases, progress: Progress | None = None, total: int | None = None) -> list:
    """-> per case (case, masks ``[P,K,J,I]``, presence ``[P,K]``, best SAM IoU ``[P,K]``), the engine run with no
    presence floor and no IoU floor. Every slice of a phantom has signal, so the IoU of batch after batch is that of
    slice after slice (checked)."""
    progress = progress or Progress("none")
    engine.skip_below, engine.min_sam_iou = 0.0, 0.0
    out = []
    for v, case in enumerate(cases):
        recorded = []
        engine.on_iou = lambda best: recorded.append(best.clone())
        try:
            masks, presence = predict_maps(engine, case.image, [case.prompts[f] for f in case.prompts],
                                           slice_axis=SLICE_AXIS, flip_average=False)
        finally:
            engine.on_iou = None
        iou = torch.cat(recorded).T.numpy() if recorded else np.zeros((len(case.prompts), 0))
        if iou.shape != presence.shape:
            raise InputError(f"calibration volume {v}: {iou.shape[1]} slices scored by SAM for {presence.shape[1]} "
                             f"slices; a volume with blank slices cannot calibrate min_sam_iou")
        out.append((case, masks, presence, iou))
        progress.update("calibration volumes", v + 1, total or v + 1)
    return out


def entries_for(predicted: list, floor: float, min_iou: float, vote: int) -> list:
    """The calibration entries (``calibration._entry``: one per case x finding) of the maps a rule with this slice
    floor and SAM IoU floor would judge."""
    entries = []
    array_axis = array_axis_of(SLICE_AXIS)
    for case, masks, presence, iou in predicted:
        shape = [len(masks), 1, 1, 1]
        shape[1 + array_axis] = -1
        kept = masks * (iou >= min_iou).astype(np.float32).reshape(shape)
        n = len(case.prompts)
        kept = combine_maps(kept, presence, SLICE_AXIS, [0.0] * n, [None] * n, (), None, [floor] * n, vote)
        for i, f in enumerate(case.prompts):
            entries.append(_entry(f, kept[i], case.truths[f], case.spacing, array_axis))
    return entries


def search(predicted: list, vote: int, finding: str | None = None, floors=FLOORS, ious=IOUS) -> dict:
    """The best (min_slice_presence, min_sam_iou, component rule) over the candidates, for one finding's cases (or
    all if ``finding`` is None)."""
    best = None
    for floor in floors:
        for min_iou in ious:
            cases = [e for e in entries_for(predicted, floor, min_iou, vote) if finding is None or e[0] == finding]
            rule = search_rule(cases, gate=0.0)
            rule = {**rule, "min_slice_presence": float(floor), "min_sam_iou": float(min_iou)}
            if best is None or rule["calibration"]["score"] > best["calibration"]["score"]:
                best = rule
    return best


def calibrate_medclipsam(engine, n_volumes: int = 24, seed_base: int = CALIBRATION_SEED_BASE,
                         progress: Progress | None = None, family: str = "A", floors=FLOORS, ious=IOUS) -> dict:
    """The presence rule of a MedCLIP-SAM ``engine`` on ``n_volumes`` phantom volumes of ``family``: a global rule
    (with ``min_slice_presence``, ``min_sam_iou``) and one per finding (its own floor and component rule; SAM's IoU
    floor is the engine's, one for all), each with the figures it reached, plus the engine's ``neutral`` texts."""
    vote = slice_vote_of(engine)
    predicted = predict_cases(engine, phantom_cases(n_volumes, seed_base, family), progress, n_volumes)
    rule = search(predicted, vote, None, floors, ious)
    rule["per_finding"] = {}
    for f in FINDINGS:
        sub = search(predicted, vote, f, floors, (rule["min_sam_iou"],))
        sub.pop("min_sam_iou")
        sub["calibration"] = {"absent_empty_rate": sub["calibration"]["absent_empty_rate"],
                              "mean_dice": sub["calibration"]["mean_dice"][f]}
        rule["per_finding"][f] = {**sub, "phrases": list(PHRASES[f])}
    rule["match_min_cosine"] = MATCH_MIN_COSINE
    rule["exclusive"] = []
    rule["neutral"] = list(engine.neutral)
    rule["calibration"].update({"volumes": n_volumes, "seeds": [seed_base, seed_base + n_volumes - 1],
                                "family": family})
    return rule


__all__ = ["FLOORS", "IOUS", "predict_cases", "entries_for", "search", "calibrate_medclipsam"]
