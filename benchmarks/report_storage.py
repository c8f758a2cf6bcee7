"""Does a report model give the same answer when a chest is stored the other way round?

NIfTI files usually keep a volume in RAS order (its columns run toward the patient's right), DICOM radiographs in
the standard display (columns toward the patient's left). The held-out report phantoms (seeds 1000..) are segmented
twice with every line: as drawn, and with the same pixels stored mirrored (direction x = -1, origin at the other
end: the same voxels in physical space), their truth mirrored likewise. Printed per model and storage: Dice over the
lines that describe opacities, and the share left empty of the absent and wrong-side lines (as ``clipseg evaluate
--family report`` counts them). A model whose spec has ``inference.patient_sides`` (``inference/laterality.py``) reads
both storages in the patient's frame; one without it reads the array as it comes.

Run:  .venv/bin/python benchmarks/report_storage.py --phantoms 100 --models tgcnet-report-small,build/models/X.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLIPSeg"))

from CLIPSegLib.evaluation.metrics import dice  # noqa: E402
from CLIPSegLib.evaluation.report_cases import ReportCases  # noqa: E402
from CLIPSegLib.inference.laterality import mirrored_along_i  # noqa: E402
from CLIPSegLib.inference.pipeline import segment_volume  # noqa: E402
from CLIPSegLib.inference.segment_file import load_engine  # noqa: E402


def score(engine, n: int, seed: int, flip: bool) -> dict:
    """-> {"describes": [Dice], "absent": [empty?], "wrong-side": [empty?]} over ``n`` report phantoms."""
    out = {"describes": [], "absent": [], "wrong-side": []}
    cases = ReportCases(n, seed)
    for case in cases:
        image, geometry, truth = case.image, case.geometry, case.truth
        if flip:
            image, geometry = np.ascontiguousarray(image[:, :, ::-1]), mirrored_along_i(geometry, image.shape[2])
            truth = {k: np.ascontiguousarray(v[:, :, ::-1]) for k, v in truth.items()}
        names = list(case.prompts)
        result = segment_volume(engine, image, geometry, [case.prompts[k] for k in names])
        for name, found in zip(names, result.findings):
            role = cases._queries[case.info["seed"]][name].role
            out[role].append(dice(found.mask, truth[name]) if role == "describes" else not found.mask.any())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tgcnet-report-small", help="comma-separated model ids or spec paths")
    ap.add_argument("--phantoms", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--without-sides", action="store_true",
                    help="also run each model with its spec's inference.patient_sides removed")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    print(f"report phantoms {a.seed}..{a.seed + a.phantoms - 1}\n")
    print("| model | storage | Dice, described | absent -> empty | wrong side -> empty |")
    print("|---|---|---|---|---|")
    for model in a.models.split(","):
        engine = load_engine(model, device="cpu")
        variants = [(model, engine)]
        if a.without_sides:
            bare = load_engine(model, device="cpu")
            bare.spec = copy.deepcopy(bare.spec)
            bare.spec.get("inference", {}).pop("patient_sides", None)
            variants.append((f"{model} without inference.patient_sides", bare))
        for name, eng in variants:
            for flip in (False, True):
                s = score(eng, a.phantoms, a.seed, flip)
                print(f"| {name} | {'mirrored (columns to the right)' if flip else 'as drawn'} | "
                      f"{np.mean(s['describes']):.3f} ({len(s['describes'])}) | "
                      f"{100 * np.mean(s['absent']):.1f}% ({len(s['absent'])}) | "
                      f"{100 * np.mean(s['wrong-side']):.1f}% ({len(s['wrong-side'])}) |", flush=True)


if __name__ == "__main__":
    main()
