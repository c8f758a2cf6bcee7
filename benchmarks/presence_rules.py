"""How the found / not-found rule is chosen, measured on volumes it was not chosen on, family by family.

A model's rule (``inference.postprocess``: per finding a slice gate, min peak, mean probability, extent, area,
contrast) is picked by a grid search on calibration volumes (``training.calibration``). Picked on one set, it meets
another set, or another scanner, less well than its calibration figures say. This script compares ways of picking
it, all from the same components:

1. the network's maps are computed once: on ``--calibration`` volumes of the A+B mixture (calibration seeds, as
   ``clipseg train --family A+B`` and ``clipseg calibrate`` use them) and on ``--heldout`` volumes of each family
   (seeds 1000.., the volumes and phrasings of ``clipseg evaluate --phantoms N --seed 1000 --family A|B``); their
   connected components are cached under ``--cache`` (keyed by the model's weight digests);
2. every strategy picks, per finding, one rule from the calibration components only;
3. the table gives what each strategy's rules do on the held-out components: Dice per finding (mean over the
   volumes holding it, misses count 0), and the share of absent findings left empty.

Strategies (per finding, over one candidate grid: gates x peak x extent x area x mean x (contrast or shadow)):
- ``model``: the rules in the model's spec (for reference: ``clipseg evaluate`` measures these);
- ``objective``: the calibration's own criterion, max 2 x absent-empty rate + mean Dice;
- ``absent>=T``: the best mean Dice among rules that leave at least T of the absent cases empty;
- ``worst-family``: max over rules of the smaller of the two families' 2 x absent-empty + Dice (a rule must hold on
  both families, not on their average);
- ``bagged``: the ``objective`` rule of each of 31 bootstrap resamples of the calibration volumes, then the median
  of each threshold (the pick is less at the mercy of a few volumes);
- ``oracle``: the ``objective`` rule picked on the held-out volumes themselves (both families): not a strategy, the
  most any rule of the grid can do with this network's maps, so what is left beyond it is the network's.

Run:  .venv/bin/python benchmarks/presence_rules.py --model build/models/X.json [--calibration 120] [--heldout 40]
The emulation judges every map at one gate, rivals included, as calibration does (the pipeline gates a rival at its
own gate), and it scores every rule without growth (a rule's ``grow_threshold`` changes Dice, never what is left
empty): the ``model`` row can differ from ``clipseg evaluate``, by the growth's change of Dice for the findings it grows.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLIPSeg"))

from CLIPSegLib.inference.postprocess import CRITERIA  # noqa: E402  (numpy and scipy only)

HELDOUT_SEED = 1000
PEAKS = tuple(np.round(np.linspace(0.5, 0.98, 25), 3))  # half the calibration's peak grid, for time
BOOTSTRAPS = 31
RULE_KEYS = ("slice_gate", *(key for _, key, _ in CRITERIA))  # what a strategy sets in a rule


def cache_prefix(spec: dict) -> str:
    """Start of the cache file names of a model's components: its id and a digest of its weight files."""
    digest = hashlib.sha256(json.dumps([f["sha256"] for f in spec["files"]]).encode()).hexdigest()[:12]
    return f"{spec['id']}-{digest}"


def collect(model: str, label: str, n: int, seed_base: int, family: str, cache: Path):
    """-> ({gate: calibration entries}, family of each case in entry order): the components of each (volume,
    finding) map, from the cache when this model's maps of this set were collected before."""
    from CLIPSegLib.inference.segment_file import load_engine
    from CLIPSegLib.inference.postprocess import DEFAULT_PRESENCE
    from CLIPSegLib.models import load_spec
    from CLIPSegLib.progress import Progress
    from CLIPSegLib.synthetic.families import family_of
    from CLIPSegLib.synthetic.phantoms import EXCLUSIVE, FINDINGS, PHRASES
    from CLIPSegLib.training.calibration import collect_cases, phantom_cases

    spec = load_spec(model)
    stem = f"{cache_prefix(spec)}-{label}-{family}-{seed_base}"
    path = cache / f"{stem}-{n}.pkl"
    families = [family_of(seed_base + v, family) for v in range(n) for _ in FINDINGS]
    for bigger in sorted(cache.glob(f"{stem}-*.pkl"), key=lambda q: int(q.stem.rsplit("-", 1)[1])):
        if int(bigger.stem.rsplit("-", 1)[1]) >= n:  # the first n volumes of a larger set are these n volumes
            entries = pickle.loads(bigger.read_bytes())
            return {g: cases[:n * len(FINDINGS)] for g, cases in entries.items()}, families
    t0 = time.time()
    engine = load_engine(model, device="cpu")
    exclusive = [tuple(p) for p in (spec.get("presence") or {}).get("exclusive", EXCLUSIVE)]
    entries = collect_cases(engine, phantom_cases(n, seed_base, family), {f: list(PHRASES[f]) for f in FINDINGS},
                            Progress("bar"), exclusive=exclusive, total=n)[DEFAULT_PRESENCE["threshold"]]
    print(f"{label}: {n} volumes of {family} collected in {time.time() - t0:.0f} s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(entries))
    return entries, families


def candidates(gates):
    """Every candidate rule, least demanding first within a gate (ties go to the first)."""
    from CLIPSegLib.inference.postprocess import DEFAULT_PRESENCE
    from CLIPSegLib.training.calibration import AREA_GRID, CONTRAST_GRID, EXTENT_GRID, MEAN_GRID, SHADOW_GRID

    # contrast and shadow one at a time (as the calibration searches them), not their product, for time
    image_tests = [(c, 0.0) for c in CONTRAST_GRID] + [(0.0, s) for s in SHADOW_GRID[1:]]
    return [{**DEFAULT_PRESENCE, "slice_gate": g, "min_peak": float(p), "min_extent_mm": e, "min_area_mm2": a,
             "min_mean": m, "min_contrast": c, "min_shadow": s}
            for g in gates for p, e, a, m, (c, s) in itertools.product(PEAKS, EXTENT_GRID, AREA_GRID, MEAN_GRID,
                                                                         image_tests)]


def outcomes(by_gate: dict, finding: str, rules: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (left empty [rules, cases] bool, Dice [rules, cases], absent [cases] bool) of ``finding``'s cases."""
    from CLIPSegLib.training.calibration import case_outcomes, case_table

    tables = {g: case_table([c for c in cases if c[0] == finding]) for g, cases in by_gate.items()}
    empty, dice = zip(*(case_outcomes(tables[r["slice_gate"]], r) for r in rules))
    return np.array(empty), np.array(dice, np.float32), next(iter(tables.values())).truth == 0


def scores(empty, dice, absent, weights=None):
    """(calibration ``objective``, absent-empty rate, mean Dice) of every rule (rows), cases weighted by
    ``weights`` ([cases] or [resamples, cases]; default 1)."""
    from CLIPSegLib.training.calibration import objective

    w = np.ones(absent.shape) if weights is None else weights
    w_abs, w_pre = w * absent, w * ~absent
    rate = (empty @ w_abs.T) / np.maximum(w_abs.sum(-1), 1e-9)
    mean = (dice @ w_pre.T) / np.maximum(w_pre.sum(-1), 1e-9)
    return objective(rate, mean), rate, mean


def pick(strategy: str, rules, empty, dice, absent, families, rng) -> dict:
    """The rule ``strategy`` picks from the calibration outcomes of one finding."""
    if strategy == "objective":
        return rules[int(np.argmax(scores(empty, dice, absent)[0]))]
    if strategy.startswith("absent>="):
        _, rate, mean = scores(empty, dice, absent)
        ok = rate >= float(strategy.split(">=")[1]) - 1e-9
        return rules[int(np.argmax(np.where(ok, mean, -1.0)))] if ok.any() else rules[int(np.argmax(rate))]
    if strategy == "worst-family":
        worst = np.min([scores(empty, dice, absent, (families == f).astype(float))[0]
                        for f in np.unique(families)], axis=0)
        return rules[int(np.argmax(worst))]
    if strategy == "bagged":
        n = len(absent)
        weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(BOOTSTRAPS)]).astype(float)
        best = np.argmax(scores(empty, dice, absent, weights)[0], axis=0)  # [resamples]
        chosen = [rules[i] for i in best]
        return {**chosen[0], **{k: float(np.median([r[k] for r in chosen])) for k in RULE_KEYS}}
    raise ValueError(strategy)


def held_out(rule_of: dict, held: dict) -> dict:
    """Per family: Dice per finding and the absent-empty rate pooled over findings, of the rules ``rule_of``."""
    out = {}
    for fam, by_gate in held.items():
        empties, row = [], {}
        for f, rule in rule_of.items():
            empty, dice, absent = outcomes(by_gate, f, [rule])
            row[f] = float(dice[0][~absent].mean())
            empties.extend(empty[0][absent].tolist())
        row["absent_empty"] = float(np.mean(empties))
        row["absent_cases"] = len(empties)
        out[fam] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a cliptnseg model (id or .json)")
    ap.add_argument("--calibration", type=int, default=120, help="A+B calibration volumes (calibration seeds)")
    ap.add_argument("--heldout", type=int, default=40, help="held-out volumes per family (seeds 1000..)")
    ap.add_argument("--strategies", default="model,objective,absent>=0.97,absent>=0.99,worst-family,bagged,oracle")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "presence_rules")
    ap.add_argument("--json", type=Path, help="also write the figures and the picked rules here")
    a = ap.parse_args(argv)

    from CLIPSegLib.models import load_spec
    from CLIPSegLib.synthetic.phantoms import FINDINGS
    from CLIPSegLib.training.datasets import CALIBRATION_SEED_BASE

    spec = load_spec(a.model)
    cal, fams = collect(a.model, "calibration", a.calibration, CALIBRATION_SEED_BASE, "A+B", a.cache)
    held = {f: collect(a.model, "heldout", a.heldout, HELDOUT_SEED, f, a.cache)[0] for f in ("A", "B")}
    rules = candidates(sorted(cal))
    t0 = time.time()
    per_finding = {}
    for f in FINDINGS:
        empty, dice, absent = outcomes(cal, f, rules)
        fam = np.array([x for x, c in zip(fams, cal[sorted(cal)[0]]) if c[0] == f])  # entries align across gates
        per_finding[f] = (empty, dice, absent, fam)
    print(f"{len(rules)} candidate rules per finding judged on the calibration volumes in {time.time() - t0:.0f} s",
          file=sys.stderr)
    rng = np.random.default_rng(0)
    presence = spec.get("presence") or {}
    model_rules = presence.get("per_finding") or {}
    results = {}
    for strategy in a.strategies.split(","):
        if strategy == "model":
            rule_of = {f: {**presence, **model_rules.get(f, {})} for f in FINDINGS}  # no rule of its own: global
        elif strategy == "oracle":
            both = {g: held["A"][g] + held["B"][g] for g in held["A"]}
            rule_of = {f: pick("objective", rules, *outcomes(both, f, rules), None, rng) for f in FINDINGS}
        else:
            rule_of = {f: pick(strategy, rules, *per_finding[f], rng) for f in FINDINGS}
        results[strategy] = {"heldout": held_out(rule_of, held), "rules": rule_of}
    print(f"model {spec['id']}; rules picked on {a.calibration} A+B calibration volumes, judged on {a.heldout} held-out"
          f" volumes per family (seeds {HELDOUT_SEED}..{HELDOUT_SEED + a.heldout - 1})\n")
    print("| strategy | A nodule | A cyst | A calcification | A absent -> empty | B nodule | B cyst | B calcification "
          "| B absent -> empty |")
    print("|---" * 9 + "|")
    for strategy, r in results.items():
        cells = []
        for fam in ("A", "B"):
            h = r["heldout"][fam]
            cells += [f"{h[f]:.3f}" for f in FINDINGS] + [f"{100 * h['absent_empty']:.1f}% of {h['absent_cases']}"]
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    print()
    for strategy, r in results.items():
        short = {f: {k.replace("min_", ""): round(float(v), 3) for k, v in rule.items() if k in RULE_KEYS}
                 for f, rule in r["rules"].items()}
        print(f"- {strategy}: {json.dumps(short)}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
