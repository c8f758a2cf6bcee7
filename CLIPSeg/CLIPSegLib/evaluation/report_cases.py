"""Held-out report phantoms as an evaluation source (``clipseg evaluate --family report``): each chest-radiograph
phantom (seeds ``seed .. seed+n-1``) asked its report lines (``training.report_data.report_case``) in the training
wording or rephrased, scored by ``evaluator.evaluate`` like any other source.

Summary: Dice over the lines that describe opacities (overall and per kind), and the share left empty of the lines
that describe nothing there: "absent" (a kind not in the image) and "wrong side" (a kind that is only on the other
side: the location test). The same seeds give the same content in both wordings, so their Dice compare directly.
"""

from __future__ import annotations

from .evaluator import Case, Scored, _mean, absent_summary, check_evaluate_args
from .metrics import summarize
from .reports import format_mean_ci
from ..io.geometry import Geometry

WORDINGS = ("train", "rephrased")


class ReportCases:
    stage = "evaluating report phantoms"

    def __init__(self, n: int, seed: int, wording: str = "train"):
        from ..errors import InputError

        check_evaluate_args(n)
        if wording not in WORDINGS:
            raise InputError(f"--wording {wording!r} is not one of {', '.join(WORDINGS)}")
        self.n, self.seed, self.wording = n, seed, wording
        self._queries: dict = {}  # seed -> line name -> its Query (the report reads roles and kinds from here)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from ..training.report_data import report_case

        for seed in range(self.seed, self.seed + self.n):
            image, spacing, queries = report_case(seed, self.wording)
            names = [f"line {i + 1}" for i in range(len(queries))]
            info = {"seed": seed, **{f"{n} ({q.role})": q.text for n, q in zip(names, queries)}}
            self._queries[seed] = dict(zip(names, queries))
            yield Case(f"report phantom seed {seed}", image[None], Geometry.axis_aligned((1.0, *spacing)),
                       {n: q.text for n, q in zip(names, queries)}, {n: q.mask[None] for n, q in zip(names, queries)},
                       frozenset(n for n, q in zip(names, queries) if q.role != "describes"), info)

    def report(self, scored: list[Scored], tolerance_mm: float) -> dict:
        """-> {"summary": Dice of the describing lines (all, per kind), empty rates of absent and wrong-side lines,
        "cases": one row per (phantom, line)}."""
        rows = []
        for s in scored:
            for name, r in s.rows.items():
                q = self._queries[s.info["seed"]][name]
                rows.append({"seed": s.info["seed"], "line": name, "text": q.text, "role": q.role, "kind": q.kind,
                             "status": r["status"], "dice": r["dice"] if q.role == "describes" else None,
                             "pred_voxels": r["pred_voxels"], "false_positive_mm3": r["false_positive_mm3"],
                             "empty": r["pred_voxels"] == 0})
        describes = [r for r in rows if r["role"] == "describes"]
        kinds = sorted({r["kind"] for r in describes})
        summary = {"phantoms": self.n, "seeds": [self.seed, self.seed + self.n - 1], "wording": self.wording,
                   "dice": summarize([r["dice"] for r in describes]),
                   "dice_by_kind": {k: _mean([r["dice"] for r in describes if r["kind"] == k]) for k in kinds},
                   "lines_by_kind": {k: sum(r["kind"] == k for r in describes) for k in kinds}}
        for role in ("absent", "wrong-side"):
            part = absent_summary([r for r in rows if r["role"] == role])
            summary[role] = {"lines": part["absent_cases"], "empty_rate": part["absent_empty_rate"],
                             "uncertain_rate": part["absent_uncertain_rate"],
                             "confident_false_rate": part["absent_confident_false_rate"]}
        both = absent_summary([r for r in rows if r["role"] != "describes"])
        summary["nothing_described_empty_rate"] = both["absent_empty_rate"]
        return {"summary": summary, "cases": rows}

    @staticmethod
    def format(report: dict) -> str:
        s = report["summary"]

        def rate(part):
            return "n/a (no such line)" if part["empty_rate"] is None else f"{part['empty_rate']:.1%} of {part['lines']}"

        lines = [f"held-out report phantoms: {s['phantoms']} (seeds {s['seeds'][0]}..{s['seeds'][1]}), "
                 f"{s['wording']} wording", "",
                 f"lines describing opacities: Dice {format_mean_ci(s['dice'])} over {s['dice']['n']} lines",
                 "| kind | lines | Dice mean |", "|---|---|---|"]
        for k, d in s["dice_by_kind"].items():
            lines.append(f"| {k} | {s['lines_by_kind'][k]} | {'n/a' if d is None else f'{d:.3f}'} |")
        lines += ["", f"absent kind -> empty: {rate(s['absent'])}",
                  f"wrong side (the kind is only on the other side) -> empty: {rate(s['wrong-side'])}"]
        if s["nothing_described_empty_rate"] is not None:
            lines.append(f"every line describing nothing -> empty: {s['nothing_described_empty_rate']:.1%}")
        return "\n".join(lines)


