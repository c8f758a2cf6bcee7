"""Which rule each calibration objective picks, and what it does on validation and held-out phantoms (issue 20).

The maps of a model are collected once (``calibration.collect_cases``: the calibration volumes of both families and
``--phantoms`` volumes of each family from the validation and held-out seeds, each finding asked in one random
phrasing) and cached; then each finding's rule is searched under each objective (``calibration.objective`` swapped
for the search) and applied to the collected validation and held-out maps. The figures follow ``clipseg evaluate``
only roughly (other phrasings, no "uncertain" outcome); they compare objectives on the same maps.

    .venv/bin/python benchmarks/calibration_objectives.py --model cliptnseg-phantom-ab-small \
        --cache build/objectives-default.pkl
"""

from __future__ import annotations

import argparse
import pickle
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLIPSeg"))

from CLIPSegLib.synthetic.phantoms import EXCLUSIVE, FINDINGS, PHRASES  # noqa: E402
from CLIPSegLib.training import calibration  # noqa: E402


def _floor(rate: float):
    """Mean Dice among rules leaving at least ``rate`` of absent cases empty (below it: the rate alone, lower)."""
    return lambda a, d: float(d if a >= rate else a - 1.0)


OBJECTIVES = {
    "2a+d": lambda a, d: 2.0 * a + d,  # the package's
    "3a+d": lambda a, d: 3.0 * a + d,
    "a+d": lambda a, d: a + d,
    "d|a>=0.99": _floor(0.99),
    "d|a>=0.98": _floor(0.98),
    "d|a>=0.97": _floor(0.97),
}
# (name, first seed, family): the calibration volumes first, then what the rules are judged on
SPLITS = (("cal", calibration.CALIBRATION_SEED_BASE, "A+B"), ("validation A", 40_000_000, "A"),
          ("validation B", 40_000_000, "B"), ("held out A", 1000, "A"), ("held out B", 1000, "B"))


@contextmanager
def objective(fn):
    """``calibration.objective`` replaced by ``fn`` (absent-empty rate, mean Dice) -> score, for one search."""
    kept = calibration.objective
    calibration.objective = fn
    try:
        yield
    finally:
        calibration.objective = kept


def collect(model: str, calibration_volumes: int, phantoms: int) -> dict:
    """{split: {gate: entries}} of ``model`` at threshold 0.5 (``calibration.collect_cases``)."""
    from CLIPSegLib.inference.segment_file import load_engine

    engine = load_engine(model)
    phrasings = {f: list(PHRASES[f]) for f in FINDINGS}
    out = {}
    for name, seed, family in SPLITS:
        n = calibration_volumes if name == "cal" else phantoms
        out[name] = calibration.collect_cases(engine, calibration.phantom_cases(n, seed, family), phrasings,
                                              exclusive=[tuple(p) for p in EXCLUSIVE])[0.5]
        print(f"{name}: {n} volumes collected", flush=True)
    return out


def apply(rules: dict, by_gate: dict) -> dict:
    """finding -> (mean Dice over present cases, present cases left empty, absent left empty, absent cases)."""
    out = {}
    for f, rule in rules.items():
        table = calibration.case_table([e for e in by_gate[rule["slice_gate"]] if e[0] == f])
        empty, dice = calibration.case_outcomes(table, rule)
        absent = table.truth == 0
        out[f] = (float(dice[~absent].mean()), int((empty & ~absent).sum()), int(empty[absent].sum()),
                  int(absent.sum()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cliptnseg-phantom-ab-small", help="model id or spec path")
    p.add_argument("--cache", type=Path, required=True, help="the collected maps (written on the first run)")
    p.add_argument("--calibration-volumes", type=int, default=240)
    p.add_argument("--phantoms", type=int, default=40, help="volumes per family and seed set")
    p.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    a = p.parse_args()
    if not a.cache.exists():
        data = collect(a.model, a.calibration_volumes, a.phantoms)
        a.cache.parent.mkdir(parents=True, exist_ok=True)
        a.cache.write_bytes(pickle.dumps(data))
    data = pickle.loads(a.cache.read_bytes())
    for name in a.objectives:
        with objective(OBJECTIVES[name]):
            rules = {f: calibration.search_threshold_gate_and_rule({0.5: data["cal"]}, f) for f in FINDINGS}
        print(f"== {name}")
        for f, r in rules.items():
            print(f"   {f} rule: " + ", ".join(f"{k} {r[k]}" for k in ("min_peak", "min_mean", "min_extent_mm",
                                                                          "min_area_mm2", "min_contrast")))
        for split, *_ in SPLITS[1:]:
            r = apply(rules, data[split])
            kept, absent = sum(v[2] for v in r.values()), sum(v[3] for v in r.values())
            print(f"   {split:<13}" + "  ".join(f"{f} {v[0]:.3f} (left empty {v[1]})" for f, v in r.items())
                  + f"  absent -> empty {kept}/{absent} = {100 * kept / absent:.1f}%")


if __name__ == "__main__":
    main()
