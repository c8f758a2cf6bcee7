"""Score a model on labelled cases: one evaluator (``evaluate``) over two case sources.

A ``Case`` is an image ``[K,J,I]`` with its geometry, the prompt asked for each finding, each finding's truth mask
and which findings are absent. Sources: ``PhantomCases`` (held-out phantom volumes by seed, one random phrasing per
finding type, asked whether present or not) and ``LabelledCases`` (your data: a folder of images + label maps, or a
CSV of binary masks). The caller loads the engine once; each case is segmented in memory by
``pipeline.segment_volume`` with the run's ``SegmentOptions``, as ``clipseg segment`` does on a file (a test checks
that the masks are the same as a ``clipseg segment`` file round trip).

Scored per (case, finding) with ``metrics.case_metrics`` (foreground Dice, IoU, HD95 and NSD in mm, false-positive
volume) and the finding's status (found / uncertain / not found); per case the prompt swap (``metrics.swap_dice``:
finding A's segment against finding B's truth, beside what A's truth scores there and the same outside the voxels
A's truth holds). Each source summarises the rows in its report (``reports`` formats and writes them):
  - phantoms: per finding type Dice mean, median, 95% bootstrap CI (none below ``metrics.MIN_CI_CASES`` cases),
    HD95 and NSD over the volumes where it is present; over all absent (volume, finding) pairs the share left empty,
    flagged UNCERTAIN, and found with confidence though absent; the prompt-swap figures; one row per volume;
  - labelled data: the same figures per prompt, with IoU and the absent false-positive rate and volume; one row
    per (case, prompt) (see ``CONVENTIONS``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ClipSegError, InputError
from ..io.geometry import Geometry
from .metrics import MIN_CI_CASES, swap_dice
from ..options import SegmentOptions
from ..synthetic.families import FAMILIES, random_volume_phantom
from ..synthetic.phantoms import FINDINGS, PHRASES
from ..progress import Progress
from .reports import format_dataset_summary, format_summary


def check_evaluate_args(n_phantoms: int | None = None, tolerance_mm: float | None = None) -> None:
    """InputError for a phantom count below 1 or a tolerance that is not positive (before any work)."""
    if n_phantoms is not None and n_phantoms < 1:
        raise InputError(f"--phantoms {n_phantoms}: give the number of phantom volumes to evaluate, at least 1 "
                         f"(e.g. --phantoms 40)")
    if tolerance_mm is not None and not tolerance_mm > 0:
        raise InputError(f"--tolerance-mm {tolerance_mm}: the NSD tolerance must be a positive distance in mm "
                         f"(e.g. 2)")


@dataclass
class Case:
    """One labelled image. ``image``: ``[K,J,I]`` intensities; ``prompts``: finding name (the report's key) -> the
    text asked, in the order asked; ``truth``: finding name -> bool ``[K,J,I]`` (all False where absent);
    ``absent``: the findings not in the image; ``info``: what the source's per-case report row starts with."""

    id: str
    image: np.ndarray
    geometry: Geometry
    prompts: dict[str, str]
    truth: dict[str, np.ndarray]
    absent: frozenset[str]
    info: dict = field(default_factory=dict)


@dataclass
class Scored:
    """A case after segmentation: ``rows``: finding name -> {"prompt", "present", "status", ``case_metrics``...};
    ``swaps``: ``metrics.swap_dice`` of each ordered pair of present findings."""

    id: str
    info: dict
    rows: dict[str, dict]
    swaps: list[dict]


def score_case(case: Case, engine, options: SegmentOptions, tolerance_mm: float) -> Scored:
    """Segment ``case`` (every prompt in one ``segment_volume`` call) and score each finding against its truth."""
    from .metrics import case_metrics
    from ..inference.pipeline import segment_volume

    names = list(case.prompts)
    try:
        result = segment_volume(engine, case.image, case.geometry, [case.prompts[f] for f in names],
                                **options.pipeline_arguments())
    except ClipSegError as e:
        raise type(e)(f"segmenting {case.id} failed: {e}") from e
    spacing_kji = tuple(case.geometry.spacing[::-1])
    masks = {name: finding.mask for name, finding in zip(names, result.findings)}
    rows = {name: {"prompt": case.prompts[name], "present": name not in case.absent, "status": finding.status,
                   **case_metrics(finding.mask, case.truth[name], spacing_kji, tolerance_mm)}
            for name, finding in zip(names, result.findings)}
    present = [f for f in names if f not in case.absent]
    swaps = [swap_dice(masks[a], case.truth[a], case.truth[b]) for a in present for b in present if a != b]
    return Scored(case.id, dict(case.info), rows, swaps)


def evaluate(source, engine, options: SegmentOptions | None = None, tolerance_mm: float = 2.0,
             progress: Progress | None = None) -> dict:
    """Segment and score every case of ``source`` (``PhantomCases`` or ``LabelledCases``) with ``engine`` (loaded
    once by the caller) and ``options``; -> the source's report."""
    check_evaluate_args(tolerance_mm=tolerance_mm)
    options = options or SegmentOptions()
    progress = progress or Progress("none")
    scored = []
    for n, case in enumerate(source):
        scored.append(score_case(case, engine, options, tolerance_mm))
        progress.update(source.stage, n + 1, len(source))
    return source.report(scored, tolerance_mm)


# --- summaries ------------------------------------------------------------------------------------------------------

def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def finding_summary(rows: list[dict], nsd_key: str) -> dict:
    """The rows of one finding -> bootstrap summaries (``metrics.summarize``) of Dice, IoU, HD95 and NSD over the
    rows where it is present, and the absence figures (``absent_summary``) over the others."""
    from .metrics import summarize

    present = [r for r in rows if r["present"]]
    return {"dice": summarize([r["dice"] for r in present]), "iou": summarize([r["iou"] for r in present]),
            "hd95_mm": summarize([r["hd95_mm"] for r in present]),
            nsd_key: summarize([r[nsd_key] for r in present]),
            **absent_summary([r for r in rows if not r["present"]])}


def absent_summary(rows: list[dict]) -> dict:
    """Rows of absent findings -> how many; the share left empty and its complement with the mean false-positive
    volume; the share flagged UNCERTAIN (kept but the user is told to check it) and the share found with confidence
    though absent (None without rows)."""
    empty = [r["pred_voxels"] == 0 for r in rows]
    uncertain = [r["status"] == "uncertain" for r in rows]
    return {"absent_cases": len(rows), "absent_empty_rate": _mean(empty),
            "absent_false_positive_rate": _mean([not e for e in empty]),
            "absent_false_positive_mm3_mean": _mean([r["false_positive_mm3"] for r in rows]),
            "absent_uncertain_rate": _mean(uncertain),
            "absent_confident_false_rate": _mean([not e and not u for e, u in zip(empty, uncertain)])}


def swap_summary(swaps: list[dict]) -> dict:
    """``metrics.swap_dice`` results of all (A, B) pairs -> mean and max of each figure, and the pair count."""
    out = {"swap_pairs": len(swaps)}
    for key, name in (("dice", "swap_dice"), ("floor", "swap_floor"), ("unshared", "swap_unshared")):
        values = [w[key] for w in swaps]
        out[f"{name}_mean"] = _mean(values)
        out[f"{name}_max"] = float(np.max(values)) if values else None
    return out


# --- held-out phantom volumes ---------------------------------------------------------------------------------------

class PhantomCases:
    """Phantom volumes of seeds ``seed .. seed+n-1`` of phantom ``family`` ("A": ``phantoms.random_volume_phantom``,
    "B": ``scatter_phantoms.random_scatter_volume``), each asked one random phrasing (seeded by ``seed``) of every
    finding type, present or not. The same seeds and phrasings in either family; the report names the family."""

    stage = "evaluating phantom volumes"

    def __init__(self, n: int, seed: int, family: str = "A"):
        check_evaluate_args(n)
        if family not in FAMILIES:
            raise InputError(f"--family {family!r}: the phantom families are {', '.join(FAMILIES)}")
        self.n, self.seed, self.family = n, seed, family

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for seed in range(self.seed, self.seed + self.n):
            ph = random_volume_phantom(seed, self.family)
            prompts = {f: str(rng.choice(PHRASES[f])) for f in FINDINGS}
            empty = np.zeros(ph.image.shape, bool)
            name = f"phantom seed {seed}" if self.family == "A" else f"phantom {self.family} seed {seed}"
            yield Case(name, ph.image, Geometry.axis_aligned(ph.spacing), prompts,
                       {f: ph.masks.get(f, empty) for f in FINDINGS}, frozenset(FINDINGS) - set(ph.masks),
                       {"seed": seed, "present": ph.findings, "prompts": prompts})

    def report(self, scored: list[Scored], tolerance_mm: float) -> dict:
        """-> {"summary": figures per finding type and over all volumes, "cases": one row per volume}."""
        nsd_key = f"nsd_{tolerance_mm:g}mm"
        cases = []
        for s in scored:
            row = dict(s.info)
            for f, r in s.rows.items():
                if r["present"]:
                    row.update({f"dice_{f}": r["dice"], f"hd95_mm_{f}": r["hd95_mm"], f"{nsd_key}_{f}": r[nsd_key]})
                else:
                    row.update({f"empty_{f}": r["pred_voxels"] == 0, f"status_{f}": r["status"]})
            cases.append(row)
        per = {f: finding_summary([s.rows[f] for s in scored], nsd_key) for f in FINDINGS}
        dice = {f: [s.rows[f]["dice"] for s in scored if s.rows[f]["present"]] for f in FINDINGS}
        absent = absent_summary([r for s in scored for r in s.rows.values() if not r["present"]])
        summary = {
            "volumes": self.n, "seeds": [self.seed, self.seed + self.n - 1],
            "family": self.family, "family_model": FAMILIES[self.family],
            "dice_mean": {f: _mean(d) for f, d in dice.items()},
            "dice_cases": {f: len(d) for f, d in dice.items()},
            **{key: {f: per[f][key] for f in FINDINGS} for key in ("dice", "hd95_mm", nsd_key)},
            **{key: absent[key] for key in ("absent_empty_rate", "absent_cases", "absent_uncertain_rate",
                                            "absent_confident_false_rate")},
            **swap_summary([w for s in scored for w in s.swaps]),
        }
        return {"summary": summary, "cases": cases}

    @staticmethod
    def format(report: dict) -> str:
        return format_summary(report["summary"])


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
    ``labels/`` holding label maps of the same file names, whose values ``prompt_map`` names ({"1": "nodule"}).
    A CSV is read with ``io.tables.read_table`` (paths relative to the CSV; every file checked to exist)."""
    from ..io.tables import read_table

    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        cases: dict[Path, dict] = {}
        for r in read_table(data, files=("image", "mask")):
            image = r.path("image")
            c = cases.setdefault(image, {"id": image.name, "image": image, "truth": {}})
            if r["phrase"] in c["truth"]:
                raise InputError(f"{r.where}: {r['phrase']!r} is given twice for {r['image']}; merge the two masks "
                                 f"into one")
            c["truth"][r["phrase"]] = ("mask", r.path("mask"))
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


class LabelledCases:
    """Your labelled images (``load_cases``: a folder with a prompt map, or a CSV), read one at a time. Every case
    is asked every prompt of the data set (sorted); a prompt without truth in a case is absent there."""

    stage = "evaluating cases"

    def __init__(self, data: Path, prompt_map: dict | None = None):
        self.cases = load_cases(data, prompt_map)
        self.prompts = sorted({p for c in self.cases for p in c["truth"]})

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self):
        from ..io.geometry import check_same_grid
        from ..io.read import read_image

        for case in self.cases:
            volume, geometry = read_image(case["image"])
            truth, files = {}, {}
            for prompt in self.prompts:
                t = case["truth"].get(prompt)
                if t is None:
                    truth[prompt] = np.zeros(volume.shape, bool)
                    continue
                if t[1] not in files:  # a label map names several findings: read it once
                    files[t[1]] = read_image(t[1])
                    check_same_grid(*files[t[1]], volume, geometry, t[1], case["image"])
                arr = files[t[1]][0]
                truth[prompt] = arr > 0 if t[0] == "mask" else np.rint(arr) == t[2]
            yield Case(case["id"], volume, geometry, {p: p for p in self.prompts}, truth,
                       frozenset(p for p in self.prompts if not truth[p].any()), {"case": case["id"]})

    def report(self, scored: list[Scored], tolerance_mm: float) -> dict:
        """-> {"conventions", "summary": figures per prompt, "selectivity": prompt swap, "cases": one row per (case,
        prompt)}."""
        from .metrics import summarize

        nsd_key = f"nsd_{tolerance_mm:g}mm"
        rows = [{**s.info, **r} for s in scored for r in s.rows.values()]
        keys = ("dice", "iou", "hd95_mm", nsd_key, "absent_cases", "absent_false_positive_rate",
                "absent_false_positive_mm3_mean", "absent_uncertain_rate", "absent_confident_false_rate")
        summary = {}
        for prompt in self.prompts:
            s = finding_summary([r for r in rows if r["prompt"] == prompt], nsd_key)
            summary[prompt] = {k: s[k] for k in keys}
        swaps = [w for s in scored for w in s.swaps]
        selectivity = {"prompt_swap_dice": summarize([w["dice"] for w in swaps]), "pairs": len(swaps),
                       **swap_summary(swaps)}
        return {"conventions": CONVENTIONS, "summary": summary, "selectivity": selectivity, "cases": rows}

    @staticmethod
    def format(report: dict) -> str:
        return format_dataset_summary(report)
