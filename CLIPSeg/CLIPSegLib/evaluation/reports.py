"""Evaluation reports: the Markdown summaries ``clipseg evaluate`` prints, and the report files it writes.

``.json`` holds the whole report (strict JSON: NaN becomes null), ``.csv`` one row per case (phantoms: per volume;
your data: per case and prompt), ``.md`` the printed summary.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .metrics import format_mean_ci


def format_summary(s: dict) -> str:
    """The phantom summary: a heading line, a Markdown table (one row per finding type) and the absence and
    prompt-swap lines; printed by ``clipseg evaluate`` and written as its ``.md`` report."""
    nsd_key = next((k for k in s if k.startswith("nsd_")), None)
    nsd_name = nsd_key.replace("_", " ").replace("nsd", "NSD") if nsd_key else "NSD"
    family = f", phantom family {s['family']}" if "family" in s else ""
    lines = [f"held-out phantom volumes: {s['volumes']} (seeds {s['seeds'][0]}..{s['seeds'][1]}){family}", "",
             f"| finding | n | Dice mean [95% CI] | median | HD95 mm | {nsd_name} | n (HD95, NSD) |",
             "|---|---|---|---|---|---|---|"]

    def f(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    for name in s["dice_mean"]:
        d = s["dice"][name]
        if not d["n"]:
            lines.append(f"| {name} | 0 | n/a (never present) | | | | |")
            continue
        hd, ns = s["hd95_mm"][name], s[nsd_key][name]
        lines.append(f"| {name} | {d['n']} | {format_mean_ci(d)} | {f(d['median'])} | {f(hd['mean'], 2)} | "
                     f"{f(ns['mean'])} | {hd['n']} |")
    lines.append("")
    if s["absent_empty_rate"] is not None:
        line = f"absent finding -> empty segment: {s['absent_empty_rate']:.1%} of {s['absent_cases']}"
        if s.get("absent_uncertain_rate") is not None:
            line += (f"; flagged UNCERTAIN: {s['absent_uncertain_rate']:.1%}; confidently found though absent: "
                     f"{s['absent_confident_false_rate']:.1%}")
        lines.append(line)
    if s["swap_dice_mean"] is not None:
        lines.append(swap_line(s).strip())
    return "\n".join(lines).rstrip()


def swap_line(s: dict) -> str:
    """The prompt-swap figures (``evaluator.swap_summary``) in one line."""
    return (f"  prompt swap: Dice with the other finding's truth mean {s['swap_dice_mean']:.3f}, max "
            f"{s['swap_dice_max']:.3f} over {s['swap_pairs']} pairs (the truth itself: max {s['swap_floor_max']:.3f}, "
            f"findings share voxels); outside the shared voxels mean {s['swap_unshared_mean']:.3f}, "
            f"max {s['swap_unshared_max']:.3f}")


def write_report(path: Path, report: dict) -> None:
    """The whole report as strict JSON."""
    from ..progress import json_safe

    # strict JSON: NaN (e.g. the HD95 of an empty mask) becomes null, as bare NaN is not JSON
    Path(path).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def format_dataset_summary(report: dict) -> str:
    """The labelled-data summary: a Markdown table (one row per prompt), the prompt-swap line and the conventions."""
    lines = ["| finding | n | Dice mean [95% CI] | median | IoU | HD95 mm | NSD | absent FP rate (n) |",
             "|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    for prompt, s in report["summary"].items():
        nsd_key = next(k for k in s if k.startswith("nsd_"))
        lines.append(f"| {prompt} | {s['dice']['n']} | {format_mean_ci(s['dice'])} | {f(s['dice']['median'])} | "
                     f"{f(s['iou']['mean'])} | {f(s['hd95_mm']['mean'])} | {f(s[nsd_key]['mean'])} | "
                     f"{f(s['absent_false_positive_rate'])} ({s['absent_cases']}) |")
    sel = report["selectivity"]
    swap = swap_line(sel).strip() + "." if sel["pairs"] else "prompt swap: no image holds two findings."
    lines.append(f"\n{swap}\n\n{report['conventions']}")
    return "\n".join(lines)


def write_any_report(path: Path, report: dict, markdown: str) -> None:
    """.json: everything; .csv: one row per (case, finding); .md: the summary table."""
    import csv

    path = check_report_path(Path(path))
    if path.suffix == ".json":
        write_report(path, report)
    elif path.suffix == ".csv":
        rows = report["cases"]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text(markdown + "\n", encoding="utf-8")


def check_report_path(path: Path) -> Path:
    """Fail before any work if a report cannot be written there: a .json, .csv or .md name in an existing folder."""
    if path.suffix not in (".json", ".csv", ".md"):
        raise InputError(f"--report {path}: use a .json, .csv or .md file name")
    if not path.parent.is_dir():
        raise InputError(f"report folder {path.parent} does not exist; create it first")
    from ..io.outputs import check_writable_folder

    check_writable_folder(path.parent, "--report")  # before the evaluation, not after it
    return path
