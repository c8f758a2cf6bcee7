"""Calibrate the found / not-found rule (``postprocess``) on labelled volumes the model was not trained on: phantom
volumes (``phantom_cases``) or a user's own labelled images (``data_cases``, phrases taken from the data).

Seeds come from ``CALIBRATION_SEED_BASE`` (training uses ``TRAIN_SEED_BASE``, evaluation its own seeds). For every
volume and finding, the mask and slice presence maps are predicted once and, for each candidate slice gate
(``pipeline.apply_presence``), the connected components of the gated probability map are measured once; a grid search
then picks the gate and rule (peak, mean probability, extent, area) that maximise 2 x (fraction of absent findings
left empty) + mean Dice over present findings: absence weighs double, but a rule that empties everything still pays
with its Dice. A finding's rule may also be searched at other probability thresholds than 0.5 (``THRESHOLDS``:
report lines, fine-tuned phrases), kept only when clearly better (``THRESHOLD_MARGIN``) on enough cases holding the
finding (``THRESHOLD_MIN_PRESENT``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from .datasets import CALIBRATION_SEED_BASE
from ..engines.contract import MATCH_MIN_COSINE
from ..io.geometry import Geometry, array_axis_of
from ..synthetic.families import random_volume_phantom
from ..synthetic.phantoms import EXCLUSIVE, FINDINGS, PHRASES
from ..inference.pipeline import (combine_maps, flip_average_of, predict_maps, predict_patient_frame,
                                  side_regions_of, slice_vote_of)
from ..inference.postprocess import (DEFAULT_PRESENCE, components, growth_cells, keep, volume_extent_mm,
                                    with_rivals)
from ..progress import Progress

SLICE_GATES = (1.0, 0.7, 0.5, 0.3)  # candidate pipeline.apply_presence gates
MEAN_GRID = (0.0, 0.8, 0.85, 0.88, 0.9, 0.92, 0.93, 0.94, 0.95)  # candidate min_mean (component mean probability)
# candidate min_contrast (|region - surround| in units of the surround's speckle spread, postprocess.region_contrast)
CONTRAST_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
# candidate min_shadow (darkening below the region in spreads of the tissue beside it, acoustic_shadow; 0: off)
SHADOW_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
SLICE_AXIS = 2  # phantoms are sliced along K, as they are acquired
# probability thresholds a per-finding rule may be calibrated at (``calibrate_rules(thresholds=...)``, fine-tuned
# phrases); the first is the default the others must beat
THRESHOLDS = (0.5, 0.3, 0.4, 0.6, 0.7)
# the thresholds a phantom model's rules are searched at: tgcnet's, as its report rules (its thyroid calcifications:
# Dice 0.587 -> 0.683 at 0.3, the other findings and absence unchanged, twenty-fourth session); cliptnseg's stay at
# 0.5 (the search raised family-A calcification but left fewer absent findings empty on both families)
PHANTOM_THRESHOLDS = {"tgcnet": THRESHOLDS}
# another threshold replaces the first only if its calibration score is higher by this much: a few held-out cases
# cannot tell smaller differences from noise (the fourth ventricle: 0.3 won by 0.0014 on one present slice, then
# rejected the whole 3D structure that 0.5 found with Dice 0.895)
THRESHOLD_MARGIN = 0.02
# ... and only when at least this many calibration cases hold the finding: a fine-tune's held-out quarter of a few
# labelled slices holds about one slice of each structure, and what a threshold does on one slice says nothing of
# the 3D structure (the MNI fourth ventricle: 0.3 won on its one held-out slice with 4 of 5 seeds, then let the map
# run on along the midline CSF, Dice 0.47-0.84; the same seeds at 0.5: 0.58-0.87, benchmarks/RESULTS.md)
THRESHOLD_MIN_PRESENT = 5
# probability thresholds a finding's found mask may grow to (the rule's ``grow_threshold``,
# ``postprocess.growth_cells``): the map's soft edge the decision left out. Taken only if it raises the finding's
# mean Dice over its present calibration cases by ``GROW_MARGIN`` (growth never changes which findings are found, so
# absence is unaffected)
GROW_THRESHOLDS = (0.2, 0.3, 0.4)
GROW_MARGIN = 0.005


@dataclass
class CalibrationCase:
    """One labelled volume for calibration. image: ``[K,J,I]`` raw intensities; spacing: mm along (I, J, K);
    truths: finding -> bool ``[K,J,I]`` for every finding asked of this volume (all False: the finding is absent);
    prompts: finding -> the phrase asked for it; geometry: the volume's (None: axis-aligned at ``spacing``, as
    phantoms are), which a model that reads the patient's sides needs (``inference.laterality``)."""

    image: np.ndarray
    spacing: tuple
    truths: dict
    prompts: dict
    geometry: Geometry | None = None


def phantom_cases(n_volumes: int, seed_base: int = CALIBRATION_SEED_BASE, family: str = "A"):
    """``n_volumes`` phantom volumes of ``family`` ("A", "B" or "A+B", ``synthetic.families``; seeds from
    ``seed_base``), each asked every finding in a random phrasing."""
    rng = np.random.default_rng(seed_base)
    for v in range(n_volumes):
        ph = random_volume_phantom(seed_base + v, family)
        yield CalibrationCase(ph.image, tuple(ph.spacing[::-1]),
                              {f: ph.masks.get(f, np.zeros(ph.image.shape, bool)) for f in FINDINGS},
                              {f: str(rng.choice(PHRASES[f])) for f in FINDINGS})


def data_cases(table_csv):
    """A user's labelled images (a CSV ``image,mask,phrase``, as for training) as calibration cases: each phrase is a
    finding of its own, asked as written; an image's mask that is empty says the finding is absent there. Returns
    (cases, phrasings: finding -> [phrase])."""
    from ..io.geometry import check_same_grid
    from ..io.read import read_image
    from ..io.tables import read_table

    by_image: dict = {}
    for r in read_table(table_csv, files=("image", "mask")):
        by_image.setdefault(r.path("image"), []).append(r)
    cases = []
    for image_path, image_rows in by_image.items():
        image, geometry = read_image(image_path)
        truths, prompts = {}, {}
        for r in image_rows:
            mask, mask_geometry = read_image(r.path("mask"))
            check_same_grid(mask, mask_geometry, image, geometry, r["mask"], r["image"])
            phrase = " ".join(r["phrase"].split())
            truths[phrase], prompts[phrase] = mask > 0, phrase
        cases.append(CalibrationCase(image, geometry.spacing, truths, prompts, geometry))
    phrasings = {p: [p] for c in cases for p in c.prompts}
    return cases, phrasings


def collect_cases(engine, cases, phrasings: dict, progress: Progress | None = None, gates=SLICE_GATES,
                  exclusive=(), flip_average: bool | None = None, total: int | None = None,
                  thresholds=(DEFAULT_PRESENCE["threshold"],)) -> dict:
    """-> {threshold: {gate: list of (finding, truth voxel count, [(Component, overlap voxels)], volume extent along
    the slice axis in mm)}}, one entry per case x finding for each probability threshold of ``thresholds`` and each
    gate (engines without slice presence: gate 1.0 only); the maps are predicted once for all of them.

    ``cases``: ``CalibrationCase`` s (``phantom_cases``, ``data_cases``); ``phrasings``: finding -> its phrasings, the
    first standing for the finding when it is a rival. The engine is used through its contract
    (``engines.contract``: ``encode_prompts``, then ``predict`` via ``pipeline.predict_maps``), slicing along K. The
    maps are gated and compete as in the pipeline (``pipeline.combine_maps`` over ``exclusive`` pairs, against each
    rival finding's first phrasing: ``postprocess.with_rivals``) and neighbouring slices vote as the model's
    ``inference.slice_vote`` says, in the patient's frame and each map kept to the side its prompt names when the
    model reads the patient's sides (``pipeline.predict_patient_frame``, ``side_regions_of``); ``flip_average`` as
    in ``pipeline.predict_maps`` (default: the engine's model setting)."""
    flip = flip_average_of(engine) if flip_average is None else bool(flip_average)
    return collect_flip_variants(engine, cases, phrasings, (flip,), progress, gates, exclusive, total,
                                 thresholds)[flip]


def collect_flip_variants(engine, cases, phrasings: dict, variants=(False, True), progress: Progress | None = None,
                          gates=SLICE_GATES, exclusive=(), total: int | None = None,
                          thresholds=(DEFAULT_PRESENCE["threshold"],)) -> dict:
    """``collect_cases`` for each flip-averaging setting of ``variants`` -> {flip: {threshold: {gate: entries}}}: the
    slice's own maps (False) and their average with the mirror's (True) from one prediction per case (each prompt
    given twice, once of the mirror too; ``predict_maps`` computes its own maps once), so a rule can choose per
    finding (``calibrate_rules(flip_choice=True)``)."""
    progress = progress or Progress("none")
    variants = tuple(dict.fromkeys(bool(v) for v in variants))
    out: dict[bool, dict[float, dict[float, list]]] = {v: {} for v in variants}
    array_axis = array_axis_of(SLICE_AXIS)
    vote = slice_vote_of(engine)
    for v, case in enumerate(cases):
        asked = list(case.prompts)
        prompts, findings, judges = with_rivals([case.prompts[f] for f in asked], asked,
                                                {f: p[0] for f, p in phrasings.items()}, exclusive)
        state = engine.encode_prompts(prompts)
        n = len(prompts)
        geometry = case.geometry or Geometry.axis_aligned(tuple(case.spacing)[::-1])
        run, flips = ((state, variants[0]) if len(variants) == 1 else
                      (state.rows(list(range(n)) * len(variants)), [f for f in variants for _ in range(n)]))
        masks, presence = predict_patient_frame(engine, case.image, geometry, run, SLICE_AXIS, flip_average=flips)
        regions, _ = side_regions_of(engine, case.image, geometry, state)
        for b, flip in enumerate(variants):
            rows = slice(b * n, (b + 1) * n)
            for gate in (gates if presence is not None else (1.0,)):
                gated = combine_maps(masks[rows].copy(), None if presence is None else presence[rows], SLICE_AXIS,
                                     [gate] * n, findings, exclusive, judges, vote=vote, regions=regions)
                for i, f in enumerate(asked):
                    for t in thresholds:
                        out[flip].setdefault(t, {}).setdefault(gate, []).append(
                            _entry(f, gated[i], case.truths[f], case.spacing, array_axis, t, image=case.image,
                                   grow=GROW_THRESHOLDS))
        progress.update("calibration volumes", v + 1, total or v + 1)
    return out


def _entry(finding: str, prob: np.ndarray, truth: np.ndarray, spacing, array_axis: int,
           threshold: float = DEFAULT_PRESENCE["threshold"], image: np.ndarray | None = None, grow=()) -> tuple:
    """One calibration entry: (finding, truth voxel count, [(Component, overlap voxels)], extent of the array along
    the slice axis in mm, growth) from a probability map and its truth (``[K,J,I]``), components of ``prob >
    threshold`` (with their contrast to the surrounding tissue when ``image``, the ``[K,J,I]`` intensities, is
    given). growth: {low: (voxels ``[n components]`` and truth overlap ``[n components]`` of each component's cell
    of ``prob > low``, ``postprocess.growth_cells``, in order)} for each ``grow`` threshold below ``threshold``."""
    labels, comps = components(prob, spacing, array_axis, threshold, image)
    overlaps = np.bincount(labels[truth], minlength=len(comps) + 1)
    growth = {}
    for low in (g for g in grow if g < threshold):
        cells = growth_cells(labels, prob, float(low), spacing)
        growth[float(low)] = (np.bincount(cells.ravel(), minlength=len(comps) + 1)[1:],
                              np.bincount(cells[truth], minlength=len(comps) + 1)[1:])
    return (finding, int(truth.sum()), [(c, int(overlaps[c.label])) for c in comps],
            volume_extent_mm(prob.shape, spacing, array_axis), growth)


def collect_slices(engine, volumes, held, progress: Progress | None = None, gates=SLICE_GATES,
                   thresholds=(DEFAULT_PRESENCE["threshold"],), exclusive=()) -> dict:
    """``collect_cases`` for single labelled slices, at each probability threshold of ``thresholds``: -> {threshold:
    {gate: [entry per (held-out slice, phrase labelled on it)]}}.

    ``volumes``: ``labelled_slices.LabelledVolume`` s; ``held``: their (volume index, K index) slices to judge. Each
    volume is normalised as a whole and only its held-out slices are predicted (``pipeline.predict_maps(only=...)``);
    each slice is one case of its own (a 2D map, one slice thick), so a slice that is not labelled for a phrase is
    never judged for it, and a labelled slice with an empty mask is an absent case. Phrases of an ``exclusive`` pair
    compete voxel-wise (``pipeline.combine_maps``; each phrase is its rival's phrasing, predicted on a slice even
    where it is not labelled; unlike the pipeline, the rival's map is gated by the candidate gate, not its own, and
    a model's ``inference.slice_vote`` is not applied: a slice's neighbours are not predicted). A model that reads
    the patient's sides gets volumes already in its frame (``labelled_slices.in_patient_frame``); a phrase naming a
    side is kept to it as in the pipeline (``pipeline.side_regions_of``)."""
    progress = progress or Progress("none")
    by_volume: dict[int, list[int]] = {}
    for v, k in held:
        by_volume.setdefault(v, []).append(k)
    out: dict[float, dict[float, list]] = {}
    for n, (v, ks) in enumerate(sorted(by_volume.items())):
        vol = volumes[v]
        phrases = [p for p, labelled in vol.slices.items() if set(ks) & set(labelled)]
        prompts, findings, judges = with_rivals(phrases, phrases, {p: p for pair in exclusive for p in pair},
                                                exclusive)
        state = engine.encode_prompts(prompts)
        masks, presence = predict_maps(engine, vol.image, state, slice_axis=SLICE_AXIS, only=ks)
        regions, _ = side_regions_of(engine, vol.image, vol.geometry, state)
        spacing = vol.geometry.spacing
        for gate in (gates if presence is not None else (1.0,)):
            gated = combine_maps(masks.copy(), presence, SLICE_AXIS, [gate] * len(prompts), findings, exclusive,
                                 judges, regions=regions)
            for i, p in enumerate(phrases):
                for k in sorted(set(ks) & set(vol.slices[p])):
                    for t in thresholds:
                        out.setdefault(t, {}).setdefault(gate, []).append(
                            _entry(p, gated[i, k:k + 1], vol.truth[p][k:k + 1], spacing, 0, t,
                                   vol.image[k:k + 1]))
        progress.update("calibration slices", n + 1, len(by_volume))
    return out


def case_table(cases) -> SimpleNamespace:
    """The cases' components as arrays (Component fields + overlap, case index, volume extent) for ``keep``."""
    rows = [(i, c, o, ext) for i, (_, _, comps, ext, *_) in enumerate(cases) for c, o in comps]
    col = lambda get: np.array([get(r) for r in rows], float)  # noqa: E731
    return SimpleNamespace(
        peak=col(lambda r: r[1].peak), mean=col(lambda r: r[1].mean), extent_mm=col(lambda r: r[1].extent_mm),
        max_area_mm2=col(lambda r: r[1].max_area_mm2), contrast=col(lambda r: r[1].contrast),
        shadow=col(lambda r: r[1].shadow),  # components pickled before the shadow existed read the default, inf
        voxels=col(lambda r: r[1].voxels), overlap=col(lambda r: r[2]),
        volume_extent_mm=col(lambda r: r[3]), case=np.array([r[0] for r in rows], int),
        findings=np.array([f for f, *_ in cases]), truth=np.array([t for _, t, *_ in cases], float))


def case_outcomes(table: SimpleNamespace, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """What rule ``cfg`` does to each case of ``table`` (``case_table``): (left empty: bool per case, Dice per case).
    The first counts for absent cases (truth 0), the second for present ones."""
    return kept_outcomes(table, keep(table, cfg, table.volume_extent_mm))


def kept_outcomes(table: SimpleNamespace, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``case_outcomes`` for a given choice of components: ``kept`` bool per component of ``table``."""
    n = len(table.truth)
    case = table.case[kept]
    n_kept = np.bincount(case, minlength=n)
    overlap = np.bincount(case, weights=table.overlap[kept], minlength=n)
    voxels = np.bincount(case, weights=table.voxels[kept], minlength=n)
    return n_kept == 0, 2 * overlap / np.maximum(voxels + table.truth, 1)


def _evaluate(table: SimpleNamespace, cfg: dict):
    left_empty, dice = case_outcomes(table, cfg)
    absent = table.truth == 0
    empty = float(np.mean(left_empty[absent])) if absent.any() else 1.0
    return empty, {f: float(dice[(table.findings == f) & ~absent].mean()) if ((table.findings == f) & ~absent).any()
                   else float("nan") for f in dict.fromkeys(table.findings.tolist())}


def evaluate_rule(cases, cfg: dict):
    """-> (fraction of absent findings left empty, {finding: mean Dice over present cases})."""
    return _evaluate(case_table(cases), cfg)


def grown_dice(cases, cfg: dict, low: float, table: SimpleNamespace | None = None) -> np.ndarray:
    """Dice per present case of ``cases`` (entries with growth at ``low``) when the components rule ``cfg`` keeps
    grow to their cells of ``prob > low``, as ``postprocess.decide`` grows a found mask (holes not filled, as in the
    rule's own Dice, ``kept_outcomes``). ``table``: ``case_table(cases)`` if already built."""
    table = case_table(cases) if table is None else table
    kept = keep(table, cfg, table.volume_extent_mm)
    out = []
    for i, (_, truth, _, _, growth) in enumerate(cases):
        if truth == 0:
            continue
        voxels, overlap = growth[low]
        mine = kept[table.case == i]
        out.append(2 * overlap[mine].sum() / max(voxels[mine].sum() + truth, 1) if mine.any() else 0.0)
    return np.array(out, float)


def with_growth(rule: dict, cases, finding: str) -> dict:
    """``rule`` (a finding's, fitted on ``cases``: its entries at the rule's threshold and gate) with the
    ``grow_threshold`` of ``GROW_THRESHOLDS`` that most raises its mean Dice over the finding's present cases, if by
    ``GROW_MARGIN`` and at least ``THRESHOLD_MIN_PRESENT`` cases hold it; else None. Its calibration records the mean
    Dice at each (``grow``) and its ``mean_dice`` (the finding's, a number) becomes the chosen one's."""
    cases = [c for c in cases if c[0] == finding]
    lows = ([g for g in GROW_THRESHOLDS if all(g in c[4] for c in cases)]
            if cases and all(len(c) > 4 for c in cases) else [])
    present = sum(1 for c in cases if c[1] > 0)
    if not lows or not searches_thresholds(present):
        return {**rule, "grow_threshold": None}
    table = case_table(cases)
    _, dice = case_outcomes(table, rule)
    base = float(dice[np.array([c[1] > 0 for c in cases])].mean())
    tried = {"none": round(base, 4),
             **{str(g): round(float(grown_dice(cases, rule, g, table).mean()), 4) for g in lows}}
    best = max(lows, key=lambda g: (tried[str(g)], g))  # on a tie the least growth
    chosen = best if tried[str(best)] >= base + GROW_MARGIN else None
    mean = tried[str(chosen)] if chosen is not None else base
    calibration = {**rule["calibration"], "grow": tried, "mean_dice": round(mean, 4)}
    return {**rule, "grow_threshold": chosen, "calibration": calibration}


PEAK_GRID = tuple(np.round(np.linspace(0.5, 0.99, 50), 3))
EXTENT_GRID = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
AREA_GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def objective(absent_empty_rate, mean_dice):
    """What the search maximises (numbers or arrays): 2 x absent-empty rate + mean Dice. Absence weighs twice as
    much as Dice; a rule that empties everything still loses its Dice term."""
    return 2.0 * absent_empty_rate + mean_dice


def search_rule(cases, gate: float = 1.0, contrast_grid=CONTRAST_GRID, shadow_grid=SHADOW_GRID) -> dict:
    """Grid search over (min_peak, min_extent_mm, min_area_mm2, min_mean) maximising 2 x absent-empty rate + mean
    Dice, then over (min_contrast, min_peak, min_mean) at the best extent and area, then over (min_shadow, min_peak,
    min_mean) at the best extent, area and contrast (a full grid would cost 50x the time); on ties the first (least
    demanding) rule wins. ``min_contrast`` and ``min_shadow`` are searched only when every component's contrast was
    measured (cases built with their image)."""
    table = case_table(cases)
    if not len(table.contrast) or not np.isfinite(table.contrast).all():
        contrast_grid = shadow_grid = (0.0,)
    best = None

    def consider(min_peak, min_extent, min_area, min_mean, min_contrast, min_shadow=0.0):
        nonlocal best
        cfg = {**DEFAULT_PRESENCE, "min_peak": float(min_peak), "min_mean": min_mean, "min_extent_mm": min_extent,
               "min_area_mm2": min_area, "min_contrast": min_contrast, "min_shadow": min_shadow, "slice_gate": gate}
        empty, dice = _evaluate(table, cfg)
        present = [d for d in dice.values() if np.isfinite(d)]
        # no present case (e.g. a finding no calibration volume holds): absence alone decides (NaN would make every
        # rule compare as no better than the first, the least demanding one)
        mean = float(np.mean(present)) if present else 0.0
        key = objective(empty, mean)
        if best is None or key > best[0]:
            best = (key, cfg, empty, dice)

    for values in itertools.product(PEAK_GRID, EXTENT_GRID, AREA_GRID, MEAN_GRID, (0.0,)):
        consider(*values)
    extent, area = best[1]["min_extent_mm"], best[1]["min_area_mm2"]
    for min_peak, min_mean, min_contrast in itertools.product(PEAK_GRID, MEAN_GRID, contrast_grid[1:]):
        consider(min_peak, extent, area, min_mean, min_contrast)
    contrast = best[1]["min_contrast"]
    for min_peak, min_mean, min_shadow in itertools.product(PEAK_GRID, MEAN_GRID, shadow_grid[1:]):
        consider(min_peak, extent, area, min_mean, contrast, min_shadow)
    key, cfg, empty, dice = best
    return {**cfg, "calibration": {"absent_empty_rate": round(empty, 4),
                                   "mean_dice": {f: round(d, 4) if np.isfinite(d) else None  # None: no present case
                                                 for f, d in dice.items()},
                                   "objective": "2 x absent_empty_rate + mean_dice", "score": round(key, 4)}}


def search_gate_and_rule(cases_by_gate: dict, finding: str | None = None) -> dict:
    """The best rule over all candidate gates, for one finding's cases (or all cases if ``finding`` is None)."""
    rules = [search_rule([c for c in cases if finding is None or c[0] == finding], gate)
             for gate, cases in cases_by_gate.items()]
    return max(rules, key=lambda r: r["calibration"]["score"])


def present_cases(by_gate: dict, finding: str | None = None) -> int:
    """How many cases of ``by_gate`` ({gate: cases}, every gate the same cases) hold ``finding`` (any when None)."""
    return sum(1 for c in next(iter(by_gate.values())) if (finding is None or c[0] == finding) and c[1] > 0)


def searches_thresholds(present: int) -> bool:
    """Whether a finding held by ``present`` calibration cases may take another probability threshold than the
    first (at least ``THRESHOLD_MIN_PRESENT``: fewer cannot tell a better threshold from luck)."""
    return present >= THRESHOLD_MIN_PRESENT


def search_threshold_gate_and_rule(by_threshold: dict, finding: str | None = None) -> dict:
    """``search_gate_and_rule`` at each probability threshold of ``by_threshold`` ({threshold: {gate: cases}}, the
    first threshold the default): another threshold's rule is kept only if its score beats the first's by
    ``THRESHOLD_MARGIN`` and enough cases hold the finding (``searches_thresholds``; else only the first is
    searched); the rule carries its ``threshold``."""
    if not searches_thresholds(present_cases(next(iter(by_threshold.values())), finding)):
        by_threshold = dict([next(iter(by_threshold.items()))])
    candidates = [dict(search_gate_and_rule(by_gate, finding), threshold=float(t))
                  for t, by_gate in by_threshold.items()]
    best = max(candidates, key=lambda r: r["calibration"]["score"])
    return best if best["calibration"]["score"] >= candidates[0]["calibration"]["score"] + THRESHOLD_MARGIN \
        else candidates[0]


def calibrate_rules(engine, cases, phrasings: dict, exclusive=(), progress: Progress | None = None,
                    flip_average: bool | None = None, total: int | None = None, finding_of=None,
                    thresholds=(DEFAULT_PRESENCE["threshold"],), flip_choice: bool = False) -> dict:
    """The calibrated presence rule of ``engine`` on labelled ``cases`` (any source: ``phantom_cases``,
    ``data_cases``): a global rule plus one per finding with its ``phrasings`` (a prompt takes the rule of the finding
    whose phrasings its text is closest to, or whose knowledge entry it names: ``pipeline.presence_rules``), each with
    the figures it reached. ``finding_of``: case key -> the finding whose rule that entry calibrates (cases whose
    prompts are keyed per line, e.g. report lines ``"consolidation|3|0"``); None: the keys are the findings.
    ``thresholds``: the probability thresholds a finding's rule may take (``search_threshold_gate_and_rule``; the
    global rule keeps the first). ``flip_choice``: each finding's rule is also searched on the maps with the other
    flip-averaging setting than ``flip_average`` (default: the model's) and takes it (its ``flip_average`` entry,
    which the pipeline follows: ``pipeline.flip_averages_of``) when its score beats the default's by
    ``THRESHOLD_MARGIN``: a mirror's second opinion may keep a one-sided finding off the other side and blur a hazy
    one. Only a finding held by enough cases (``searches_thresholds``) and in no ``exclusive`` pair (its rivals' maps
    are judged with their own setting) may choose; the others keep the default. The rule's ``calibration`` records
    the slice vote its maps were combined with."""
    flip = flip_average_of(engine) if flip_average is None else bool(flip_average)
    variants = collect_flip_variants(engine, cases, phrasings, (flip, not flip) if flip_choice else (flip,),
                                     progress, exclusive=exclusive, total=total, thresholds=thresholds)
    if finding_of is not None:
        variants = {v: {t: {g: [(finding_of(c[0]), *c[1:]) for c in entries] for g, entries in by_gate.items()}
                        for t, by_gate in by_threshold.items()} for v, by_threshold in variants.items()}
    by_gate = variants[flip][thresholds[0]]
    rule = {**search_gate_and_rule(by_gate), "threshold": float(thresholds[0])}
    rule["calibration"]["slice_vote"] = slice_vote_of(engine)  # the maps judged: a run checks it (check_calibrated_with)
    # One rule per finding (a nodule and a few foci need different size and persistence tests, and the presence head
    # is surer of some findings than of others; a hazy map may need a lower threshold).
    rule["per_finding"] = {}
    for f in phrasings:
        if not any(c[0] == f for cases_ in by_gate.values() for c in cases_):
            continue
        sub = search_threshold_gate_and_rule(variants[flip], f)
        tried = {}
        # a finding that competes voxel-wise keeps the model's setting: its rivals' maps are judged with theirs
        if flip_choice and searches_thresholds(present_cases(by_gate, f)) and not any(f in p for p in exclusive):
            other = search_threshold_gate_and_rule(variants[not flip], f)
            tried = {("with_mirror" if v else "without_mirror"): {
                "score": round(r["calibration"]["score"], 4),
                "absent_empty_rate": r["calibration"]["absent_empty_rate"],
                "mean_dice": r["calibration"]["mean_dice"][f]} for v, r in ((flip, sub), (not flip, other))}
            if other["calibration"]["score"] >= sub["calibration"]["score"] + THRESHOLD_MARGIN:
                sub = {**other, "flip_average": not flip}
        if flip_choice:
            sub.setdefault("flip_average", flip)
        sub["calibration"] = {"absent_empty_rate": sub["calibration"]["absent_empty_rate"],
                              "mean_dice": sub["calibration"]["mean_dice"][f],
                              **({"flip_choice": tried} if tried else {})}
        sub = with_growth(sub, variants[sub.get("flip_average", flip)][sub["threshold"]][sub["slice_gate"]], f)
        rule["per_finding"][f] = {**sub, "phrases": list(phrasings[f])}
    rule["match_min_cosine"] = MATCH_MIN_COSINE
    rule["exclusive"] = [list(p) for p in exclusive]
    return rule


def calibrate_presence(net, n_volumes: int = 24, progress: Progress | None = None, device="cpu",
                       seed_base: int = CALIBRATION_SEED_BASE, exclusive=EXCLUSIVE,
                       inference: dict | None = None, table_csv=None, family: str = "A") -> dict:
    """Calibrated presence rule for a trained CLIPTNSegNet on ``n_volumes`` phantom volumes, or, with
    ``table_csv``, on a user's labelled images (``data_cases``: the phrases come from the data; no phantom finding
    is assumed). ``family``: the phantom family of the volumes (``synthetic.families``). ``exclusive``: pairs of
    findings that never share a voxel (phantoms only); they compete voxel-wise during calibration and in the
    pipeline (stored in the rule). ``inference``: the model spec's ``inference`` entry (``flip_average``,
    ``slice_vote``; None: neither), so the rule is calibrated on the maps the pipeline will judge."""
    import torch

    from ..engines.cliptnseg.engine import CLIPTNSegEngine

    engine = CLIPTNSegEngine(net, torch.device(device), spec={"inference": dict(inference or {})})
    if table_csv is not None:
        cases, phrasings = data_cases(table_csv)
        rule = calibrate_rules(engine, cases, phrasings, (), progress, total=len(cases))
        rule["calibration"].update({"volumes": len(cases), "data": str(table_csv)})
        return rule
    return calibrate_phantom_rules(engine, n_volumes, seed_base, family, exclusive, progress)


def calibrate_phantom_rules(engine, n_volumes: int, seed_base: int = CALIBRATION_SEED_BASE, family: str = "A",
                            exclusive=EXCLUSIVE, progress: Progress | None = None, thresholds=None,
                            flip_choice: bool = False) -> dict:
    """``calibrate_rules`` on ``n_volumes`` phantom volumes of ``family`` from ``seed_base``, every phantom finding
    with its phrasings, at the probability ``thresholds`` (the first is the default the others must beat; None: the
    engine's, ``PHANTOM_THRESHOLDS``, default 0.5 only); flip averaging (each finding may take the other setting
    with ``flip_choice``) and the slice vote as the engine's spec says. The rule's ``calibration`` records the
    volumes, seeds, family, thresholds searched and the flip choice."""
    thresholds = tuple(thresholds or PHANTOM_THRESHOLDS.get(engine.name, THRESHOLDS[:1]))
    rule = calibrate_rules(engine, phantom_cases(n_volumes, seed_base, family), {f: list(PHRASES[f]) for f in FINDINGS},
                           [tuple(p) for p in exclusive], progress, total=n_volumes, thresholds=thresholds,
                           flip_choice=flip_choice)
    rule["calibration"].update({"volumes": n_volumes, "seeds": [seed_base, seed_base + n_volumes - 1],
                                "family": family, "thresholds": list(thresholds), "flip_choice": flip_choice})
    return rule


def merged_presence(parent: dict, rules: dict, exclusive=()) -> dict:
    """The parent's ``presence`` with the new phrases' rules added (a new phrase leaves the finding that listed it
    among its phrasings: its own rule wins) and the new ``exclusive`` pairs of phrases (a parent's pair naming a
    finding of the parent whose rule a new one replaces is dropped; the others are kept)."""
    from ..engines.cliptnseg.engine import phrase_key

    presence = copy.deepcopy(parent.get("presence") or {})
    per = presence.setdefault("per_finding", {})
    replaced = set(per) & set(rules)
    new = {phrase_key(p) for p in rules}
    for rule in per.values():
        rule["phrases"] = [p for p in rule.get("phrases", []) if phrase_key(p) not in new]
    per.update(rules)
    presence.setdefault("match_min_cosine", MATCH_MIN_COSINE)
    pairs = [list(p) for p in presence.get("exclusive", []) if not set(p) & replaced]
    presence["exclusive"] = pairs + [list(p) for p in exclusive if set(p) not in [set(q) for q in pairs]]
    return presence
