"""Calibrate the found / not-found rule (``postprocess``) on phantom volumes the model was not trained on.

Seeds come from ``CALIBRATION_SEED_BASE`` (training uses ``TRAIN_SEED_BASE``, evaluation its own seeds). For every
volume and finding, the mask and slice presence maps are predicted once and, for each candidate slice gate
(``pipeline.apply_presence``), the connected components of the gated probability map are measured once; a grid search
then picks the gate and rule (peak, mean probability, extent, area) that maximise 2 x (fraction of absent findings
left empty) + mean Dice over present findings: absence weighs double, but a rule that empties everything still pays
with its Dice.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np

from .datasets import CALIBRATION_SEED_BASE
from .imageio import array_axis_of
from .phantoms import EXCLUSIVE, FINDINGS, PHRASES, random_volume_phantom
from .pipeline import combine_maps, predict_maps
from .postprocess import DEFAULT_PRESENCE, components, keep, volume_extent_mm, with_rivals
from .progress import Progress

MATCH_MIN_COSINE = 0.95  # a prompt takes a finding's rule only if this close to one of its phrasings
SLICE_GATES = (1.0, 0.7, 0.5, 0.3)  # candidate pipeline.apply_presence gates
MEAN_GRID = (0.0, 0.8, 0.85, 0.88, 0.9, 0.92, 0.93, 0.94, 0.95)  # candidate min_mean (component mean probability)
SLICE_AXIS = 2  # phantoms are sliced along K, as they are acquired


def collect_cases(engine, n_volumes: int, seed_base: int = CALIBRATION_SEED_BASE, progress: Progress | None = None,
                  gates=SLICE_GATES, exclusive=EXCLUSIVE, flip_average: bool | None = None) -> dict:
    """-> {gate: list of (finding, truth voxel count, [(Component, overlap voxels)], volume extent along the slice
    axis in mm)}, one entry per volume x finding for each gate (engines without slice presence: gate 1.0 only).

    The engine is used through its contract (``engines.contract``: ``encode_prompts``, then ``predict`` via
    ``pipeline.predict_maps``), slicing along K. The maps are gated and compete as in the pipeline
    (``pipeline.combine_maps`` over ``exclusive`` pairs, against each rival finding's first phrasing:
    ``postprocess.with_rivals``); ``flip_average`` as in ``pipeline.predict_maps`` (default: the engine's model
    setting)."""
    progress = progress or Progress("none")
    rng = np.random.default_rng(seed_base)
    cases: dict[float, list] = {}
    for v in range(n_volumes):
        ph = random_volume_phantom(seed_base + v)
        prompts, findings, judges = with_rivals([str(rng.choice(PHRASES[f])) for f in FINDINGS], list(FINDINGS),
                                                {f: PHRASES[f][0] for f in FINDINGS}, exclusive)
        state = engine.encode_prompts(prompts)
        masks, presence = predict_maps(engine, ph.image, state, slice_axis=SLICE_AXIS, flip_average=flip_average)
        spacing_ijk = ph.spacing[::-1]
        array_axis = array_axis_of(SLICE_AXIS)
        extent = volume_extent_mm(masks.shape[1:], spacing_ijk, array_axis)
        for gate in (gates if presence is not None else (1.0,)):
            gated = combine_maps(masks.copy(), presence, SLICE_AXIS, [gate] * len(prompts), findings, exclusive,
                                 judges)
            for i, f in enumerate(FINDINGS):
                prob = gated[i]
                truth = ph.masks.get(f, np.zeros(prob.shape, bool))
                labels, comps = components(prob, spacing_ijk, array_axis, DEFAULT_PRESENCE["threshold"])
                overlaps = np.bincount(labels[truth], minlength=len(comps) + 1)
                cases.setdefault(gate, []).append((f, int(truth.sum()), [(c, int(overlaps[c.label])) for c in comps],
                                                   extent))
        progress.update("calibration volumes", v + 1, n_volumes)
    return cases


def _table(cases) -> SimpleNamespace:
    """The cases' components as arrays (Component fields + overlap, case index, volume extent) for ``keep``."""
    rows = [(i, c, o, ext) for i, (_, _, comps, ext) in enumerate(cases) for c, o in comps]
    col = lambda get: np.array([get(r) for r in rows], float)  # noqa: E731
    return SimpleNamespace(
        peak=col(lambda r: r[1].peak), mean=col(lambda r: r[1].mean), extent_mm=col(lambda r: r[1].extent_mm),
        max_area_mm2=col(lambda r: r[1].max_area_mm2), voxels=col(lambda r: r[1].voxels), overlap=col(lambda r: r[2]),
        volume_extent_mm=col(lambda r: r[3]), case=np.array([r[0] for r in rows], int),
        findings=np.array([f for f, *_ in cases]), truth=np.array([t for _, t, *_ in cases], float))


def _evaluate(table: SimpleNamespace, cfg: dict):
    n = len(table.truth)
    kept = keep(table, cfg, table.volume_extent_mm)
    case = table.case[kept]
    n_kept = np.bincount(case, minlength=n)
    overlap = np.bincount(case, weights=table.overlap[kept], minlength=n)
    voxels = np.bincount(case, weights=table.voxels[kept], minlength=n)
    absent = table.truth == 0
    empty = float(np.mean(n_kept[absent] == 0)) if absent.any() else 1.0
    dice = 2 * overlap / np.maximum(voxels + table.truth, 1)
    return empty, {f: float(dice[(table.findings == f) & ~absent].mean()) if ((table.findings == f) & ~absent).any()
                   else float("nan") for f in FINDINGS}


def evaluate_rule(cases, cfg: dict):
    """-> (fraction of absent findings left empty, {finding: mean Dice over present cases})."""
    return _evaluate(_table(cases), cfg)


def search_rule(cases, gate: float = 1.0) -> dict:
    """Grid search over (min_peak, min_extent_mm, min_area_mm2, min_mean) maximising 2 x absent-empty rate + mean
    Dice; on ties the first (least demanding) rule wins."""
    table = _table(cases)
    best = None
    grid = itertools.product(np.round(np.linspace(0.5, 0.99, 50), 3), (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
                             (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0), MEAN_GRID)
    for min_peak, min_extent, min_area, min_mean in grid:
        cfg = {**DEFAULT_PRESENCE, "min_peak": float(min_peak), "min_mean": min_mean, "min_extent_mm": min_extent,
               "min_area_mm2": min_area, "slice_gate": gate}
        empty, dice = _evaluate(table, cfg)
        mean = float(np.nanmean(list(dice.values())))
        # absence weighs twice as much as Dice; a rule that empties everything still loses its Dice term
        key = 2.0 * empty + mean
        if best is None or key > best[0]:
            best = (key, cfg, empty, dice)
    key, cfg, empty, dice = best
    return {**cfg, "calibration": {"absent_empty_rate": round(empty, 4),
                                   "mean_dice": {f: round(d, 4) for f, d in dice.items()},
                                   "objective": "2 x absent_empty_rate + mean_dice", "score": round(key, 4)}}


def search_gate_and_rule(cases_by_gate: dict, finding: str | None = None) -> dict:
    """The best rule over all candidate gates, for one finding's cases (or all cases if ``finding`` is None)."""
    rules = [search_rule([c for c in cases if finding is None or c[0] == finding], gate)
             for gate, cases in cases_by_gate.items()]
    return max(rules, key=lambda r: r["calibration"]["score"])


def calibrate_presence(net, n_volumes: int = 24, progress: Progress | None = None, device="cpu",
                       seed_base: int = CALIBRATION_SEED_BASE, exclusive=EXCLUSIVE,
                       flip_average: bool = False) -> dict:
    """Calibrated presence rule for a trained CLIPTNSegNet, with the figures it reached on the calibration set.

    ``exclusive``: pairs of findings that never share a voxel; they compete voxel-wise during calibration and in the
    pipeline (stored in the rule as ``exclusive``). ``flip_average``: the model's inference setting (the rule is
    calibrated on the maps the pipeline will see)."""
    import torch

    from .engines.cliptnseg_engine import CLIPTNSegEngine

    engine = CLIPTNSegEngine(net, torch.device(device))
    cases = collect_cases(engine, n_volumes, seed_base, progress, exclusive=exclusive, flip_average=flip_average)
    rule = search_gate_and_rule(cases)
    rule["calibration"].update({"volumes": n_volumes, "seeds": [seed_base, seed_base + n_volumes - 1]})
    # One rule per trained finding (a nodule and a few foci need different size and persistence tests, and the
    # presence head is surer of some findings than of others); a prompt uses the rule of the finding whose phrasings
    # its text embedding is closest to (see pipeline.presence_rules).
    rule["per_finding"] = {}
    for f in FINDINGS:
        sub = search_gate_and_rule(cases, f)
        sub["calibration"] = {"absent_empty_rate": sub["calibration"]["absent_empty_rate"],
                              "mean_dice": sub["calibration"]["mean_dice"][f]}
        rule["per_finding"][f] = {**sub, "phrases": list(PHRASES[f])}
    rule["match_min_cosine"] = MATCH_MIN_COSINE
    rule["exclusive"] = [list(p) for p in exclusive]
    return rule
