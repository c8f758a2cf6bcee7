"""``clipseg calibrate``: re-calibrate an existing model's found / not-found rule on phantom volumes, its weights
unchanged. A cliptnseg or tgcnet model goes through ``calibration.calibrate_phantom_rules`` (a model trained on
report lines on report phantoms: ``report_data.calibrate_report_rules``), a medclipsam model through
``medclipsam_calibration.calibrate_medclipsam`` (its slice-presence and SAM IoU floors searched with the rule)."""

from __future__ import annotations

from ..errors import InputError
from ..progress import Progress
from ..synthetic.phantoms import EXCLUSIVE, FINDINGS
from .calibration import calibrate_phantom_rules, merged_presence
from .datasets import CALIBRATION_SEED_BASE
from .medclipsam_calibration import calibrate_medclipsam
from .report_data import REPORT_CALIBRATION_SEED_BASE, calibrate_report_rules


def calibrate_command(model: str | None, output, n_volumes: int, seed_base: int, family: str | None,
                      thresholds=None, flip_choice: bool = False) -> str:
    """The ``clipseg calibrate`` command line that re-runs a calibration (``family`` None: a report model's, which
    takes none)."""
    import shlex

    argv = ["clipseg", "calibrate", "--output", str(output), "--phantoms", str(n_volumes), "--seed", str(seed_base)]
    argv += (["--family", family] if family is not None else []) + (["--model", str(model)] if model else [])
    argv += ["--thresholds", ",".join(repr(t) for t in thresholds)] if thresholds else []
    argv += ["--flip-choice"] if flip_choice else []
    return shlex.join(argv + ["--force"])


def recalibrate_model(model: str | None, output, n_volumes: int, seed_base: int | None = None,
                      family: str | None = None, device: str = "cpu", force: bool = False,
                      progress: Progress | None = None, command: str | None = None, thresholds=None,
                      flip_choice: bool = False):
    """Re-calibrate the presence rule of an existing model (id or spec path; None: the default model) on
    ``n_volumes`` phantom volumes of ``family`` ("A", "B" or the mixture "A+B"; None: "A+B") from ``seed_base``
    (None: ``CALIBRATION_SEED_BASE``), its weights unchanged (the rules of phrases a fine-tuned model learnt from a
    user's slices are kept); a report model calibrates on report phantoms from ``REPORT_CALIBRATION_SEED_BASE``
    (``seed_base`` None) and refuses a ``family``. Write the spec with the new ``presence`` to ``output`` (a .json;
    the weight files are copied beside it when it is in another folder). The rule's ``calibration`` entry says how
    (family, seeds, volumes, ``command``: given, else the ``clipseg calibrate`` line of the settings used,
    ``calibrate_command``). ``thresholds``: the probability thresholds a phantom rule is searched at (``clipseg
    calibrate --thresholds``; None: the engine's); refused for report and medclipsam models, which search their own.
    ``flip_choice``: each finding's rule may take the other flip-averaging setting (``calibrate_rules``; refused for
    medclipsam models). -> the written path."""
    import json
    import shutil
    from pathlib import Path

    from ..inference.segment_file import load_engine
    from ..models import load_spec
    from ..synthetic.families import check_family

    output = Path(output)
    if output.suffix.lower() != ".json":
        raise InputError(f"--output {output}: give the path of the new model spec, ending in .json")
    if output.exists() and not force:
        raise InputError(f"{output} exists; pass --force to replace it, or choose another --output")
    try:
        check_family(family or "A+B")
    except ValueError as e:
        raise InputError(f"--family: {e}") from e
    thresholds = check_thresholds(thresholds) if thresholds is not None else None
    spec = load_spec(model)
    report = (spec.get("training") or {}).get("dataset") == "report"  # a tgcnet model of report lines
    own_search = spec["engine"] == "medclipsam" or report
    if family is not None and report:
        raise InputError(f"--family {family}: {spec['id']!r} is a report model, calibrated on report phantoms "
                         f"(drop --family)")
    if seed_base is None:
        seed_base = REPORT_CALIBRATION_SEED_BASE if report else CALIBRATION_SEED_BASE
    family = "report" if report else family or "A+B"
    if command is None:
        command = calibrate_command(model, output, n_volumes, seed_base, None if report else family, thresholds,
                                    flip_choice)
    if thresholds and own_search:
        raise InputError(f"--thresholds applies to the phantom rules of cliptnseg and thyroid tgcnet models; "
                         f"{spec['id']!r} searches its own (drop --thresholds)")
    if flip_choice and spec["engine"] == "medclipsam":
        raise InputError(f"--flip-choice applies to cliptnseg and tgcnet models; {spec['id']!r} is a MedCLIP-SAM "
                         f"model, whose saliency is not flip averaged (drop --flip-choice)")
    from ..inference.laterality import patient_sides_of

    if flip_choice and spec["engine"] != "tgcnet" and patient_sides_of(spec) is not None:
        raise InputError(f"--flip-choice: {spec['id']!r} reads the patient's sides, and only the tgcnet engine asks "
                         f"a mirrored slice the line with its sides swapped (drop --flip-choice)")
    engine = load_engine(model, device=device)
    if spec["engine"] == "medclipsam":  # its slice floors and SAM IoU floor are searched with the component rule
        rule = calibrate_medclipsam(engine, n_volumes, seed_base, progress, family)
    elif report:  # report lines, on report phantoms
        rule = calibrate_report_rules(engine, n_volumes, progress, seed_base, flip_choice)
    else:
        exclusive = (spec.get("presence") or {}).get("exclusive", [list(p) for p in EXCLUSIVE])
        rule = calibrate_phantom_rules(engine, n_volumes, seed_base, family, exclusive, progress, thresholds,
                                       flip_choice)
    rule["calibration"].update({"volumes": n_volumes, "seeds": [seed_base, seed_base + n_volumes - 1],
                                "family": family, "command": command})
    source_dir = Path(spec["_dir"])
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.parent.resolve() != source_dir.resolve():
        for f in spec.get("files", []):
            shutil.copy2(source_dir / f["name"], output.parent / f["name"])
    new = {k: v for k, v in spec.items() if not k.startswith("_")}
    # a fine-tuned model's own phrases (rules calibrated on the user's slices) are kept as they were
    own = {k: r for k, r in ((spec.get("presence") or {}).get("per_finding") or {}).items()
           if k not in FINDINGS and k not in rule.get("per_finding", {})}
    if own:
        rule = merged_presence({"presence": rule}, own)
    new["presence"] = rule
    tmp = output.parent / f".{output.name}.partial"
    tmp.write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    tmp.replace(output)
    return output


__all__ = ["recalibrate_model", "calibrate_command", "parse_thresholds", "check_thresholds"]


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``--thresholds`` "0.5,0.6,0.7" -> (0.5, 0.6, 0.7) (``check_thresholds``); InputError naming a bad entry."""
    parts = [part.strip() for part in text.split(",")]
    values = []
    for part in parts:
        try:
            values.append(float(part))
        except ValueError:
            values.append(part)
    return check_thresholds(values, text, parts)


def check_thresholds(values, given: str | None = None, spelled=None) -> tuple[float, ...]:
    """``values`` -> a tuple of distinct probabilities strictly between 0 and 1, the first the default; else
    InputError naming the bad entry (``given`` / ``spelled``: the option and its entries as the user wrote them)."""
    if isinstance(values, str) or not len(values):
        raise InputError(f"--thresholds {values if given is None else given}: give one or more probabilities "
                         f"separated by commas, the default first, e.g. 0.5,0.6,0.7")
    given = ",".join(map(str, values)) if given is None else given
    seen = []
    for i, t in enumerate(values):
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t < 1 or t in seen:
            raise InputError(f"--thresholds {given}: {str(spelled[i] if spelled else t)!r} is not a new probability "
                             f"between 0 and 1; give distinct ones separated by commas, the default first, e.g. "
                             f"0.5,0.6,0.7")
        seen.append(float(t))
    return tuple(seen)
