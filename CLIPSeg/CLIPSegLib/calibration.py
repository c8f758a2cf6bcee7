"""Calibrate the found / not-found rule (``postprocess``) on phantom volumes the model was not trained on.

Seeds come from ``CALIBRATION_SEED_BASE`` (training uses ``TRAIN_SEED_BASE``, evaluation its own seeds). For every
volume and finding, the connected components of the probability map are measured once; a grid search then picks the
rule that maximises 2 x (fraction of absent findings left empty) + mean Dice over present findings: absence
weighs double, but a rule that empties everything still pays with its Dice.
"""

from __future__ import annotations

import itertools

import numpy as np

from .datasets import CALIBRATION_SEED_BASE
from .phantoms import FINDINGS, PHRASES, random_volume_phantom
from .pipeline import predict_probabilities
from .postprocess import DEFAULT_PRESENCE, components, keep
from .progress import Progress

MATCH_MIN_COSINE = 0.95  # a prompt takes a finding's rule only if this close to one of its phrasings


def collect_cases(engine, n_volumes: int, seed_base: int = CALIBRATION_SEED_BASE, progress: Progress | None = None):
    """-> list of (finding, truth voxel count, [(Component, overlap voxels)], n_slices), one per volume x finding."""
    progress = progress or Progress("none")
    rng = np.random.default_rng(seed_base)
    cases = []
    for v in range(n_volumes):
        ph = random_volume_phantom(seed_base + v)
        prompts = [str(rng.choice(PHRASES[f])) for f in FINDINGS]
        probs = predict_probabilities(engine, ph.image, prompts, slice_axis=2)
        spacing_ijk = ph.spacing[::-1]
        for f, prob in zip(FINDINGS, probs):
            truth = ph.masks.get(f, np.zeros(prob.shape, bool))
            labels, comps = components(prob, spacing_ijk, 0, DEFAULT_PRESENCE["threshold"])
            overlaps = np.bincount(labels[truth], minlength=len(comps) + 1)
            cases.append((f, int(truth.sum()), [(c, int(overlaps[c.label])) for c in comps], prob.shape[0]))
        progress.update("calibration volumes", v + 1, n_volumes)
    return cases


def evaluate_rule(cases, cfg: dict):
    """-> (fraction of absent findings left empty, {finding: mean Dice over present cases})."""
    empty, dice = [], {f: [] for f in FINDINGS}
    for f, truth, comps, n_slices in cases:
        kept = [(c, o) for c, o in comps if keep(c, cfg, n_slices)]
        if truth == 0:
            empty.append(not kept)
        else:
            dice[f].append(2 * sum(o for _, o in kept) / (sum(c.voxels for c, _ in kept) + truth))
    return (float(np.mean(empty)) if empty else 1.0), {f: float(np.mean(d)) if d else float("nan")
                                                        for f, d in dice.items()}


def search_rule(cases) -> dict:
    """Grid search over (min_peak, min_slices, min_area_mm2) maximising 2 x absent-empty rate + mean Dice."""
    best = None
    grid = itertools.product(np.round(np.linspace(0.5, 0.99, 50), 3), (1, 2, 3, 4, 6, 8),
                             (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
    for min_peak, min_slices, min_area in grid:
        cfg = {**DEFAULT_PRESENCE, "min_peak": float(min_peak), "min_slices": min_slices, "min_area_mm2": min_area}
        empty, dice = evaluate_rule(cases, cfg)
        mean = float(np.nanmean(list(dice.values())))
        # absence weighs twice as much as Dice; a rule that empties everything still loses its Dice term
        key = 2.0 * empty + mean
        if best is None or key > best[0]:
            best = (key, cfg, empty, dice)
    _, cfg, empty, dice = best
    return {**cfg, "calibration": {"absent_empty_rate": round(empty, 4),
                                   "mean_dice": {f: round(d, 4) for f, d in dice.items()},
                                   "objective": "2 x absent_empty_rate + mean_dice"}}


def calibrate_presence(net, n_volumes: int = 24, progress: Progress | None = None, device="cpu",
                       seed_base: int = CALIBRATION_SEED_BASE) -> dict:
    """Calibrated presence rule for a trained CLIPTNSegNet, with the figures it reached on the calibration set."""
    import torch

    from .engines.cliptnseg_engine import CLIPTNSegEngine

    engine = CLIPTNSegEngine(net, torch.device(device))
    cases = collect_cases(engine, n_volumes, seed_base, progress)
    rule = search_rule(cases)
    rule["calibration"].update({"volumes": n_volumes, "seeds": [seed_base, seed_base + n_volumes - 1]})
    # One rule per trained finding (a nodule and a few foci need different size and persistence tests); a prompt
    # uses the rule of the finding whose phrasings its text embedding is closest to (see pipeline.presence_rule).
    rule["per_finding"] = {}
    for f in FINDINGS:
        sub = search_rule([c for c in cases if c[0] == f])
        sub["calibration"] = {"absent_empty_rate": sub["calibration"]["absent_empty_rate"],
                              "mean_dice": sub["calibration"]["mean_dice"][f]}
        rule["per_finding"][f] = {**sub, "phrases": list(PHRASES[f])}
    rule["match_min_cosine"] = MATCH_MIN_COSINE
    return rule
