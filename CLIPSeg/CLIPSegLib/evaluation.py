"""Held-out phantom evaluation through the real command line path (``clipseg segment`` on files).

For each volume (seeds ``seed .. seed+n-1``, ``phantoms.random_volume_phantom``), one prompt per finding type is
asked (a random phrasing), whether the finding is present or not. Reported:
  - Dice per finding type over the volumes where it is present (foreground Dice, MONAI): mean, median, 95% bootstrap
    CI (none below ``metrics.MIN_CI_CASES`` cases: the report says "n too small for an interval"); HD95 and NSD in
    mm likewise (over the volumes where something was segmented: both need two surfaces);
  - absent-finding empty rate: fraction of (volume, absent finding) whose segment is empty;
  - prompt swap: for volumes with two or more findings, Dice of finding A's segment with finding B's truth; beside
    it the same for A's truth (what a perfect segment scores: findings may share voxels) and A's segment against the
    voxels of B that are not A's (``metrics.swap_dice``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError
from .imageio import Geometry, read_segment_masks, write_volume
from .metrics import MIN_CI_CASES, format_mean_ci, swap_dice
from .phantoms import FINDINGS, PHRASES, random_volume_phantom
from .progress import Progress


def check_evaluate_args(n_phantoms: int | None = None, tolerance_mm: float | None = None) -> None:
    """InputError for a phantom count below 1 or a tolerance that is not positive (before any work)."""
    if n_phantoms is not None and n_phantoms < 1:
        raise InputError(f"--phantoms {n_phantoms}: give the number of phantom volumes to evaluate, at least 1 "
                         f"(e.g. --phantoms 40)")
    if tolerance_mm is not None and not tolerance_mm > 0:
        raise InputError(f"--tolerance-mm {tolerance_mm}: the NSD tolerance must be a positive distance in mm "
                         f"(e.g. 2)")


def _segment_quietly(args: list[str], what: str) -> dict:
    """Run ``clipseg segment`` (``cli.main``, ``--progress json``) with its stdout and stderr captured: an evaluation
    prints only its report. Returns the run's ``done`` event (each prompt's status). On failure the captured output
    is shown and the error re-raised with the same exit code."""
    import contextlib
    import io
    import sys

    from . import errors
    from .cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(args + ["--progress", "json"])
    if code == 0:
        events = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
        return next((e for e in events if e.get("event") == "done"), {})
    sys.stderr.write(err.getvalue())
    kinds = {c.exit_code: c for c in (errors.ClipSegError, errors.InputError, errors.ModelError, errors.DeviceError,
                                      errors.Cancelled)}
    if code not in kinds:  # a bug: its traceback was just shown
        raise RuntimeError(f"clipseg segment failed with exit code {code} on {what}")
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    detail = lines[-1].removeprefix("clipseg: error: ") if lines else f"exit code {code}"
    raise kinds[code](f"segmenting {what} failed: {detail}")


def evaluate_phantoms(n: int, seed: int, model=None, device="auto", progress: Progress | None = None,
                      tolerance_mm: float = 2.0) -> dict:
    from .metrics import case_metrics, summarize

    check_evaluate_args(n, tolerance_mm)
    progress = progress or Progress("bar")
    rng = np.random.default_rng(seed)
    per_case, empties, uncertain, swaps = [], [], [], []
    scores: dict[str, list[dict]] = {f: [] for f in FINDINGS}
    nsd_key = f"nsd_{tolerance_mm:g}mm"
    with tempfile.TemporaryDirectory() as tmp:
        for v in range(n):
            ph = random_volume_phantom(seed + v)
            geometry = Geometry.axis_aligned(ph.spacing)
            vol = write_volume(Path(tmp) / "case.nrrd", ph.image, geometry)
            prompts = [str(rng.choice(PHRASES[f])) for f in FINDINGS]
            out = Path(tmp) / "case.seg.nrrd"
            args = ["segment", str(vol), "--output", str(out), "--device", device]
            for p in prompts:
                args += ["--prompt", p]
            if model:
                args += ["--model", str(model)]
            status = _segment_quietly(args, f"phantom seed {seed + v}").get("status", {})
            by_prompt = read_segment_masks(out, prompts)
            pred = {f: by_prompt[p] for f, p in zip(FINDINGS, prompts)}
            case = {"seed": seed + v, "present": ph.findings, "prompts": dict(zip(FINDINGS, prompts))}
            for f in FINDINGS:
                if f in ph.masks:
                    m = case_metrics(pred[f], ph.masks[f], ph.spacing, tolerance_mm)
                    scores[f].append(m)
                    case.update({f"dice_{f}": m["dice"], f"hd95_mm_{f}": m["hd95_mm"], f"{nsd_key}_{f}": m[nsd_key]})
                else:
                    empties.append(not pred[f].any())
                    case[f"empty_{f}"] = bool(not pred[f].any())
                    case[f"status_{f}"] = status.get(prompts[FINDINGS.index(f)])
                    uncertain.append(case[f"status_{f}"] == "uncertain")
            for a in ph.findings:
                for b in ph.findings:
                    if a != b:
                        swaps.append(swap_dice(pred[a], ph.masks[a], ph.masks[b]))
            per_case.append(case)
            progress.update("evaluating phantom volumes", v + 1, n)
    summary = {
        "volumes": n, "seeds": [seed, seed + n - 1],
        "dice_mean": {f: float(np.mean([m["dice"] for m in s])) if s else None for f, s in scores.items()},
        "dice_cases": {f: len(s) for f, s in scores.items()},
        "dice": {f: summarize([m["dice"] for m in s]) for f, s in scores.items()},
        "hd95_mm": {f: summarize([m["hd95_mm"] for m in s]) for f, s in scores.items()},
        nsd_key: {f: summarize([m[nsd_key] for m in s]) for f, s in scores.items()},
        "absent_empty_rate": float(np.mean(empties)) if empties else None,
        "absent_cases": len(empties),
        # absent findings given a segment flagged UNCERTAIN (the user is told to check it), and the confident ones
        "absent_uncertain_rate": float(np.mean(uncertain)) if uncertain else None,
        "absent_confident_false_rate": float(np.mean([not e and not u for e, u in zip(empties, uncertain)]))
        if empties else None,
        **swap_summary(swaps),
    }
    return {"summary": summary, "cases": per_case}


def format_summary(s: dict) -> str:
    """The phantom summary: a heading line, a Markdown table (one row per finding type) and the absence and
    prompt-swap lines; printed by ``clipseg evaluate`` and written as its ``.md`` report."""
    nsd_key = next((k for k in s if k.startswith("nsd_")), None)
    nsd_name = nsd_key.replace("_", " ").replace("nsd", "NSD") if nsd_key else "NSD"
    lines = [f"held-out phantom volumes: {s['volumes']} (seeds {s['seeds'][0]}..{s['seeds'][1]})", "",
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


def swap_summary(swaps: list[dict]) -> dict:
    """``metrics.swap_dice`` results of all (A, B) pairs -> mean and max of each figure, and the pair count."""
    out = {"swap_pairs": len(swaps)}
    for key, name in (("dice", "swap_dice"), ("floor", "swap_floor"), ("unshared", "swap_unshared")):
        values = [w[key] for w in swaps]
        out[f"{name}_mean"] = float(np.mean(values)) if values else None
        out[f"{name}_max"] = float(np.max(values)) if values else None
    return out


def swap_line(s: dict) -> str:
    return (f"  prompt swap: Dice with the other finding's truth mean {s['swap_dice_mean']:.3f}, max "
            f"{s['swap_dice_max']:.3f} over {s['swap_pairs']} pairs (the truth itself: max {s['swap_floor_max']:.3f}, "
            f"findings share voxels); outside the shared voxels mean {s['swap_unshared_mean']:.3f}, "
            f"max {s['swap_unshared_max']:.3f}")


def write_report(path: Path, report: dict) -> None:
    from .progress import json_safe

    # strict JSON: NaN (e.g. the HD95 of an empty mask) becomes null, as bare NaN is not JSON
    Path(path).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")


# --- your own labelled data -----------------------------------------------------------------------------------------

CONVENTIONS = ("Foreground Dice and IoU per (case, finding), background never averaged in; HD95 and NSD in mm from the "
               "image spacing (NSD tolerance stated in its name); empty-truth cases scored by false-positive volume "
               "(mm^3) and counted in the absent-finding false-positive rate, never dropped; 95% CI = BCa bootstrap "
               f"of the mean (2000 resamples), none with fewer than {MIN_CI_CASES} cases; metrics from MONAI.")


PROMPT_MAP_EXAMPLE = '{"1": "thyroid nodule", "2": "cyst"}'


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except OSError:  # e.g. a name too long to be a path: it is JSON text
        return False


def parse_prompt_map(arg: str) -> dict[str, str]:
    """``--prompt-map``: JSON text, or the path of a .json file, mapping label values to prompts -> {"1": "nodule"}.

    Raises InputError with the JSON error's position, or naming the bad entry, and an example."""
    example = f"e.g. --prompt-map '{PROMPT_MAP_EXAMPLE}'"
    source = "--prompt-map"
    text = arg
    if not arg.lstrip().startswith("{") and (arg.lower().endswith(".json") or _is_file(arg)):
        path = Path(arg)
        if path.is_dir():
            raise InputError(f"--prompt-map {path} is a folder; give a file, not a folder (a .json mapping label "
                             f"values to prompts), or the JSON itself, {example}")
        if not path.is_file():
            raise InputError(f"--prompt-map file {path} does not exist; give the file's path or the JSON itself, "
                             f"{example}")
        source, text = f"--prompt-map file {path}", path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (character "
                         f"{e.pos}); it must map label values to prompts, {example} (quote keys and prompts with \", "
                         f"and the whole argument with ' in a shell)") from e
    if not isinstance(data, dict) or not data:
        raise InputError(f"{source} must be a non-empty JSON object mapping label values to prompts, not {data!r}; "
                         f"{example}")
    seen: dict[str, str] = {}
    for value, prompt in data.items():
        try:
            int(value)
        except ValueError:
            raise InputError(f"{source}: key {value!r} is not a label value (an integer such as \"1\"); {example}") \
                from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{source}: label {value} maps to {prompt!r}, not a prompt text; {example}")
        if prompt.strip() in seen:
            raise InputError(f"{source}: labels {seen[prompt.strip()]} and {value} both map to {prompt.strip()!r}; "
                             f"give each label value its own prompt")
        seen[prompt.strip()] = value
    return {value: prompt.strip() for value, prompt in data.items()}


def load_cases(data: Path, prompt_map: dict | None = None) -> list[dict]:
    """-> [{"id", "image", "truth": {prompt: ("mask", path) | ("label", path, value)}}].

    ``data`` is a CSV (columns image,mask,phrase; one binary mask per phrase) or a folder with ``images/`` and
    ``labels/`` holding label maps of the same file names, whose values ``prompt_map`` names ({"1": "nodule"})."""
    import csv

    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        with open(data, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"image", "mask", "phrase"} <= set(rows[0]):
            raise InputError(f"{data} needs a header with columns image,mask,phrase and at least one row")
        cases: dict[str, dict] = {}
        for r in rows:
            c = cases.setdefault(r["image"], {"id": Path(r["image"]).name, "image": data.parent / r["image"],
                                              "truth": {}})
            c["truth"][r["phrase"].strip()] = ("mask", data.parent / r["mask"])
        return list(cases.values())
    if data.is_dir():
        images, labels = data / "images", data / "labels"
        if not images.is_dir() or not labels.is_dir():
            raise InputError(f"{data} must hold images/ and labels/ folders (same file names), or pass a CSV")
        if not prompt_map:
            raise InputError("a folder of label maps needs --prompt-map, e.g. '{\"1\": \"thyroid nodule\"}'")
        out = []
        for img in sorted(p for p in images.iterdir() if not p.name.startswith(".")):
            lab = labels / img.name
            if not lab.exists():
                raise InputError(f"no label map {lab} for image {img}")
            out.append({"id": img.name, "image": img,
                        "truth": {prompt: ("label", lab, int(value)) for value, prompt in prompt_map.items()}})
        if not out:
            raise InputError(f"{images} holds no images")
        return out
    raise InputError(f"--data {data} is neither a CSV nor a folder")


def evaluate_dataset(cases: list[dict], engine, tolerance_mm: float = 2.0, progress: Progress | None = None) -> dict:
    """Segment every case with every prompt of the dataset and score it (see CONVENTIONS)."""
    from .imageio import check_same_grid, read_image
    from .metrics import case_metrics, summarize
    from .pipeline import segment_volume

    progress = progress or Progress("none")
    prompts = sorted({p for c in cases for p in c["truth"]})
    rows, swaps = [], []
    for n, case in enumerate(cases):
        volume, geometry = read_image(case["image"])
        spacing_kji = tuple(geometry.spacing[::-1])
        truths, files = {}, {}
        for prompt in prompts:
            t = case["truth"].get(prompt)
            if t is None:
                truths[prompt] = np.zeros(volume.shape, bool)
                continue
            if t[1] not in files:  # a label map names several findings: read it once
                files[t[1]] = read_image(t[1])
                check_same_grid(*files[t[1]], volume, geometry, t[1], case["image"])
            arr = files[t[1]][0]
            truths[prompt] = arr > 0 if t[0] == "mask" else np.rint(arr) == t[2]
        result = segment_volume(engine, volume, geometry, prompts)
        for f in result.findings:
            rows.append({"case": case["id"], "prompt": f.prompt, "present": bool(truths[f.prompt].any()),
                         **case_metrics(f.mask, truths[f.prompt], spacing_kji, tolerance_mm)})
        present = [p for p in prompts if truths[p].any()]
        for f in result.findings:
            if f.prompt in present:
                swaps += [swap_dice(f.mask, truths[f.prompt], truths[other]) for other in present if other != f.prompt]
        progress.update("evaluating cases", n + 1, len(cases))
    nsd_key = f"nsd_{tolerance_mm:g}mm"
    summary = {}
    for prompt in prompts:
        pr = [r for r in rows if r["prompt"] == prompt and r["present"]]
        ab = [r for r in rows if r["prompt"] == prompt and not r["present"]]
        summary[prompt] = {
            "dice": summarize([r["dice"] for r in pr]), "iou": summarize([r["iou"] for r in pr]),
            "hd95_mm": summarize([r["hd95_mm"] for r in pr]), nsd_key: summarize([r[nsd_key] for r in pr]),
            "absent_cases": len(ab),
            "absent_false_positive_rate": float(np.mean([r["pred_voxels"] > 0 for r in ab])) if ab else None,
            "absent_false_positive_mm3_mean": float(np.mean([r["false_positive_mm3"] for r in ab])) if ab else None,
        }
    selectivity = {"prompt_swap_dice": summarize([w["dice"] for w in swaps]), "pairs": len(swaps),
                   **swap_summary(swaps)}
    return {"conventions": CONVENTIONS, "summary": summary, "selectivity": selectivity, "cases": rows}


def format_dataset_summary(report: dict) -> str:
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
    from .imageio import check_writable_folder

    check_writable_folder(path.parent, "--report")  # before the evaluation, not after it
    return path
