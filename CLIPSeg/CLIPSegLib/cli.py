"""The ``clipseg`` command line. Heavy imports happen inside the commands, so ``--help`` is instant.

Exit codes: 0 ok, 1 other user-fixable problem (a refused file operation: disk full, permissions; an input file
that cannot be read in full), 2 bad input, 3 model problem, 4 device problem, 5 cancelled, 70 internal error (a bug:
please report it with the traceback), 130 interrupted (Ctrl+C), 141 stdout closed by its reader (``| head``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

from .models.spec import DEFAULT_MODEL
from .options import CONTEXT_SLICES, PRECISIONS, SegmentOptions, add_arguments


def seed(text: str) -> int:
    """argparse type of ``--seed``: a whole number from 0 (numpy's generators refuse negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a seed such as 0 or 1000") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; seeds are whole numbers from 0")
    return value


def _channel_list(text: str) -> list[int]:
    """argparse type of ``--fine-channels``: whole numbers separated by commas (their range is checked with the other
    training shapes, ``cliptnseg_recipe.check_train_shape``)."""
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers; give channels per level "
                                         f"separated by commas, such as 16,32,64,128") from None


def _add_common(p, options=("model", "device")):
    """The run options ``options`` (``options.SegmentOptions`` field names; their flags are declared there) and
    ``--progress``."""
    add_arguments(p, options)
    p.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                   help="progress display: terminal bar, JSON lines on stdout (for Slicer), or none")


def _add_training(p):
    """A training command's run options: ``--device``, ``--precision`` (of the training steps) and ``--progress``."""
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default) or bf16: each training step's forward pass and loss under bf16 autocast "
                        "(weights stay float32); ~1.4x faster fine-tuning on a CPU with AMX, the same Dice on the "
                        "MNI benchmark; on a CPU without AMX (slower there) the run says so and uses fp32")
    _add_common(p, ("device",))


# The run options `clipseg evaluate` takes: how to segment, not where (no spacing, no probabilities).
EVALUATE_OPTIONS = ("model", "engine", "device", "precision", "axis", "threshold", "batch_size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipseg", description="Text-guided segmentation of medical images.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment findings named by text prompts in an image or volume")
    s.add_argument("input", help="NIfTI, NRRD, MHA, a DICOM folder, or PNG/JPEG")
    s.add_argument("--prompt", action="append", required=True, help="a finding, e.g. 'thyroid nodule' (repeatable)")
    s.add_argument("--output", required=True, help="OUT.seg.nrrd (one segment per prompt) or OUT.nii.gz (label map)")
    s.add_argument("--probabilities", default=None, help="also write per-prompt probabilities (NRRD/NIfTI) to this "
                                                         "file")
    _add_common(s, options=None)  # every run option

    d = sub.add_parser("demo", help="segment a phantom volume with the default model; writes .seg.nrrd and a PNG")
    d.add_argument("--output-dir", default="demo_output")
    d.add_argument("--seed", type=seed, default=7)
    _add_common(d)

    e = sub.add_parser("evaluate", help="score a model on labelled data or on held-out phantoms")
    e.add_argument("--data", default=None, help="CSV (image,mask,phrase) or folder with images/ and labels/")
    e.add_argument("--prompt-map", default=None, help="JSON mapping label values to prompts, or a .json file")
    e.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm")
    e.add_argument("--phantoms", type=int, default=40, help="number of phantom volumes (when no --data)")
    e.add_argument("--seed", type=seed, default=1000, help="first seed (training seeds start at 10,000,000)")
    e.add_argument("--wording", default="train", choices=("train", "rephrased"),
                   help="--family report: the report lines in the training wording or rephrased (synonyms, word "
                        "order, extra clinical words; never trained on)")
    e.add_argument("--family", default=None, choices=("A", "B", "report"),
                   help="phantom family (when no --data): A (default; speckle-texture model, the one the embedded "
                        "model was trained on) or B (scatterers, pulse and beam, attenuation: a different physical "
                        "model); report: chest-radiograph phantoms asked report lines (tgcnet models)")
    e.add_argument("--report", default=None, help="write the report: .json (all), .csv (per case) or .md (summary)")
    _add_common(e, EVALUATE_OPTIONS)

    t = sub.add_parser("train", help="train a model: CLIP-TNseg (CLIP contrastive, segmenter, calibration, export) "
                                     "or MedCLIP-SAM (SAM on phantom boxes, calibration, export)",
                       allow_abbrev=False)  # --model would otherwise be read as --model-id
    t.add_argument("--engine", default="cliptnseg", choices=("cliptnseg", "medclipsam", "tgcnet"),
                   help="cliptnseg (default); medclipsam: a small SAM trained on phantom box -> mask pairs, the "
                        "CLIP of --clip-from reused frozen (stages sam,calibrate,export; --steps: SAM steps); tgcnet: "
                        "SSE + DATE + VLCM with LoRA on the frozen CLIP's text tower, on --dataset")
    t.add_argument("--clip-from", default="cliptnseg-phantom-small",
                   help="medclipsam, and tgcnet on thyroid phantoms: the cliptnseg model whose CLIP is reused (id or "
                        ".json)")
    t.add_argument("--dataset", default="report", choices=("report", "thyroid"),
                   help="tgcnet: report (chest-radiograph phantoms with report sentences; its own CLIP trained "
                        "first) or thyroid (CLIPSeg's ultrasound phantoms; the CLIP of --clip-from)")
    t.add_argument("--ablate", default="",
                   help="tgcnet: modules to turn off for an ablation, comma-separated from sse,date,vlcm")
    t.add_argument("--lora-rank", type=int, default=8, help="tgcnet: LoRA rank on the CLIP text tower")
    t.add_argument("--report-wording", default="train", choices=("train", "varied"),
                   help="tgcnet --dataset report: the report lines' wording: train (two templates a scope) or varied "
                        "(the same kind, side and zone words with more word orders, lead-ins and trailers; never the "
                        "evaluation's rephrased words)")
    t.add_argument("--location-support", action="store_true",
                   help="tgcnet --dataset report: a line naming a side or zone is held to the map of its kind alone "
                        "(voxel-wise minimum, spec inference.location_support; calibrated so): a line asked on the "
                        "wrong side is painted only where that kind is seen")
    t.add_argument("--report-focus", default=None, metavar="KIND",
                   help="tgcnet --dataset report: draw the training phantoms holding this opacity kind twice as "
                        "often (e.g. \"ground-glass opacity\", the kind the embedded model misses most)")
    t.add_argument("--report-mirror", action="store_true",
                   help="tgcnet --dataset report: half the training images mirrored left-right with their lines' "
                        "side words swapped; the model then averages each slice with its mirror asked the swapped line "
                        "(spec inference.flip_average; calibrated so)")
    t.add_argument("--pseudo-labels", default=None, metavar="FOLDER",
                   help="medclipsam, weakly supervised stage: the --zero-shot model segments every volume of FOLDER "
                        "(unlabelled .nii.gz/.nrrd/.mha) and a MONAI UNet learns its masks (--steps; stages "
                        "label,unet,calibrate,export; the rule is calibrated on the pseudo masks of a held-out 25%%)")
    t.add_argument("--zero-shot", default=None,
                   help="--pseudo-labels: the model whose masks are the targets (id or .json; default "
                        "medclipsam-phantom-small)")
    t.add_argument("--prompt", action="append", default=None,
                   help="--pseudo-labels: a finding to pseudo-label (repeat; default: the zero-shot model's "
                        "calibrated findings, each with all its phrasings)")
    t.add_argument("--rival-weight", type=float, default=0.0,
                   help="cliptnseg: weight of a loss term that teaches each finding's map to stay off the other "
                        "findings of the same image (their pixels as hard negatives; default 0, the embedded model's "
                        "recipe)")
    t.add_argument("--foreground-weight", type=float, default=0.0,
                   help="cliptnseg: weight of a loss term that weighs each finding's own pixels as a whole (pixel "
                        "BCE averaged over the finding's mask, so a small cluster counts as much as a large nodule); "
                        "measured at 1 the maps swell past the findings (benchmarks/RESULTS.md); default 0, the "
                        "embedded model's recipe")
    t.add_argument("--init-from", default=None, metavar="MODEL",
                   help="cliptnseg and tgcnet: continue MODEL (id or .json of the same engine and architecture, "
                        "e.g. cliptnseg-phantom-small or tgcnet-report-small) instead of starting from random "
                        "weights: the segmenter starts from its segmenter, the clip stage (if run) from its CLIP; "
                        "without the clip stage (--stages segmenter,calibrate,export) its CLIP is kept")
    t.add_argument("--max-grad-norm", type=float, default=None, metavar="NORM",
                   help="cliptnseg and tgcnet: scale each segmenter step's gradients down to this L2 norm when "
                        "larger (default: no limit, the embedded models' recipe); for continuations that diverge at "
                        "the peak learning rate")
    t.add_argument("--family", default="A", choices=("A", "B", "A+B"),
                   help="cliptnseg and medclipsam: the phantom family of the training bank and calibration volumes "
                        "(A: speckle texture, the embedded models'; B: scatterers, pulse and beam; A+B: both)")
    t.add_argument("--output-dir", default="build/models",
                   help="where the model .json/.safetensors go (default build/models; never the shipped models "
                        "folder unless you give it)")
    t.add_argument("--work-dir", default=None,
                   help="checkpoints (resumable; default build/work/<model-id>, one folder per model)")
    t.add_argument("--model-id", default=None, help="default: cliptnseg-phantom-small / medclipsam-phantom-small")
    t.add_argument("--phantoms", type=int, default=2000, help="2D phantom images in the training bank")
    t.add_argument("--volumes", type=int, default=0,
                   help="3D phantom volumes whose slices are added to the segmenter's training bank")
    t.add_argument("--clip-steps", type=int, default=300)
    t.add_argument("--steps", type=int, default=3000, help="segmenter training steps")
    t.add_argument("--data", default=None,
                   help="CSV (image,mask,phrase) of your own labelled images, added to phantoms")
    t.add_argument("--stages", default=None,
                   help="default: clip,segmenter,calibrate,export (cliptnseg) / sam,calibrate,export (medclipsam)")
    t.add_argument("--calibration-volumes", type=int, default=24)
    t.add_argument("--calibration-data", default=None,
                   help="CSV (image,mask,phrase) of labelled images NOT used for training: calibrate the found / "
                        "not-found rule on them, one rule per phrase (default: phantom volumes)")
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    t.add_argument("--force", action="store_true",
                   help="replace <output-dir>/<model-id>.json/.safetensors if they exist (refused before any "
                        "training otherwise)")
    t.add_argument("--presence-head", action="store_true",
                   help="add the slice presence head (off by default: it lowered nodule Dice in our measurements)")
    t.add_argument("--input-size", type=int, default=None, metavar="PIXELS",
                   help="cliptnseg: the slice size the fine branch and head work at, and the training bank's "
                        "(default: the CLIP's own, 128; a multiple of 32 from 32 to 1024); the CLIP sees slices "
                        "resized to its own size. 256 keeps small foci of 256-pixel slices")
    t.add_argument("--context-slices", type=int, default=0, metavar="SLICES",
                   help="cliptnseg: neighbouring slices on each side the fine branch also reads as input channels "
                        f"(0-{CONTEXT_SLICES[-1]}; default 0, the slice alone). With --init-from a model that reads "
                        "none, the new channels start at zero, so training starts from that model's own output")
    t.add_argument("--fine-channels", type=_channel_list, default=None, metavar="C1,C2,...",
                   help="cliptnseg: the fine branch's channels per level (default 8,16,32,64; with --init-from, "
                        "that model's, where --context-slices must be given again). From a narrower model of as "
                        "many levels, its channels keep their weights and read the new ones with zeros, and the head "
                        "reads the new ones with zeros, so training starts from that model's own output")
    t.add_argument("--slice-vote", type=int, default=1, metavar="SLICES",
                   help="cliptnseg and tgcnet --dataset thyroid: the model's inference.slice_vote (odd; each "
                        "voxel's probability the median over this many neighbouring slices; default 1, off), set "
                        "before the calibration so the rule judges the voted maps")
    _add_training(t)  # no --model: train builds its model from scratch (finetune starts from one)

    k = sub.add_parser("calibrate", help="re-calibrate a model's found / not-found rule on phantom volumes it was "
                                         "not trained on (weights unchanged); writes a new model spec",
                       allow_abbrev=False)
    k.add_argument("--output", required=True, help="the new model spec (.json); the weights are copied beside it "
                                                    "when it is in another folder")
    k.add_argument("--phantoms", type=int, default=60, help="calibration phantom volumes")
    k.add_argument("--seed", type=seed, default=None,
                   help="first calibration seed (default 20,000,000: disjoint from training, evaluation 1000.. and "
                        "validation 40,000,000..; a report model's: 50,000,000)")
    k.add_argument("--family", default=None, choices=("A", "B", "A+B"),
                   help="phantom family of the calibration volumes (default A+B: each seed draws A or B; a report "
                        "model calibrates on report phantoms and takes none)")
    k.add_argument("--thresholds", default=None, metavar="P,P,...",
                   help="probability thresholds each finding's rule is searched at, comma-separated, the first the "
                        "default the others must clearly beat (e.g. 0.5,0.6,0.7; default: the engine's: 0.5 for "
                        "cliptnseg, 0.5,0.3,0.4,0.6,0.7 for tgcnet thyroid models; report and MedCLIP-SAM models "
                        "search their own and refuse it)")
    k.add_argument("--flip-choice", action="store_true",
                   help="also fit each finding's rule on the maps with the other flip-averaging setting (each slice "
                        "averaged with its mirror, or not) and keep that setting for the finding when it scores "
                        "clearly better; each prompt is predicted once and once more of the mirror, up to 2x "
                        "the prediction time (MedCLIP-SAM models refuse it)")
    k.add_argument("--force", action="store_true", help="replace --output if it exists")
    _add_common(k)

    f = sub.add_parser("finetune", help="fine-tune an existing model on your labelled slices (new phrases), keeping "
                                        "what it knew; writes a new model", allow_abbrev=False)
    f.add_argument("--data", required=True,
                   help="CSV image,mask,phrase[,slices] (slices: labelled 0-based K indices, e.g. \"3;7;12\"; empty: "
                        "every slice), or a folder with images/ and labels/ (label maps) and --prompt-map")
    f.add_argument("--from", dest="parent", default=None, metavar="MODEL",
                   help="the model to start from: an id of `clipseg models list` or a model .json (default: "
                        f"{DEFAULT_MODEL})")
    f.add_argument("--output-dir", required=True, help="where <model-id>.json/.safetensors are written")
    f.add_argument("--model-id", default=None, help="the new model's id (default: <parent id>-finetuned)")
    f.add_argument("--prompt-map", default=None, help="with a folder: JSON mapping label values to phrases, or a "
                                                      ".json file")
    f.add_argument("--steps", type=int, default=None, help="training steps (default 600)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--force", action="store_true", help="replace <output-dir>/<model-id>.json/.safetensors if they "
                                                        "exist (refused before any work otherwise)")
    f.add_argument("--batch-size", type=int, default=None, help="your labelled slices per step (default 4)")
    f.add_argument("--text-adaptation", default=None, choices=("embeddings", "lora"),
                   help="how new phrases are taught: a learned embedding per phrase (default for cliptnseg models) "
                        "or LoRA on the text tower (tgcnet models: the only one)")
    f.add_argument("--input-size", type=int, default=None, metavar="PIXELS",
                   help="slice size the new model works at (default: the parent's, 128 for the embedded model); "
                        "256 resolves thin structures of large slices better (the fine branch works at that size, "
                        "CLIP at its own). cliptnseg models only")
    f.add_argument("--single-network", action="store_true",
                   help="cliptnseg: one network answers every finding, the parent's findings kept only by replay "
                        "of its training data when its lineage was trained on phantoms (default: the new model keeps "
                        "the parent's network for the parent's findings, which are then answered as before)")
    f.add_argument("--no-refit", action="store_true",
                   help="write the model the found / not-found rules were calibrated with, trained without the "
                        "held-out quarter of the labelled slices (default: once calibrated, the same training is run "
                        "again on all labelled slices and that model is written: twice the time, the structure's "
                        "ends learnt from every labelled slice)")
    _add_training(f)

    g = sub.add_parser("finetune-clip", help="fine-tune the CLIP of a MedCLIP-SAM model with DHN-NCE on image-caption "
                                             "pairs (a CSV, or phantom captions); writes a medclipsam model",
                       allow_abbrev=False)
    g.add_argument("--from", dest="source", default=None, metavar="MODEL|FOLDER",
                   help="a medclipsam or cliptnseg model (id or .json) or a BiomedCLIP folder (default: the embedded "
                        "medclipsam-phantom-small)")
    g.add_argument("--data", default=None, help="CSV image,caption[,slice] (slice: 0-based K index of a volume); "
                                                "default: phantom captions")
    g.add_argument("--phantoms", type=int, default=400, help="2D phantoms (without --data)")
    g.add_argument("--volumes", type=int, default=0, help="phantom volumes whose slices are added (without --data)")
    g.add_argument("--family", default="A", choices=("A", "B", "A+B"), help="phantom family (without --data)")
    g.add_argument("--augment", action="store_true",
                   help="phantom captions (without --data): each slice augmented on access as the segmenter's are "
                        "(contrast, gain, speckle, blur, bias field, rotation, scale, flips)")
    g.add_argument("--output-dir", required=True, help="where <model-id>.json/.safetensors are written")
    g.add_argument("--model-id", default=None, help="default: <source id>-dhn")
    g.add_argument("--work-dir", default=None, help="checkpoint folder (resumable; default build/work/<model-id>)")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=16, help="image-caption pairs per step (at least 2)")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (one-cycle cosine)")
    g.add_argument("--trainable", default="last", choices=("all", "last", "lora"),
                   help="every weight, the last --blocks blocks of each tower and the projections (default), or "
                        "LoRA adapters (merged at export)")
    g.add_argument("--blocks", type=int, default=2, help="with --trainable last: blocks per tower")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--dense-weight", type=float, default=1.0,
                   help="weight of the patch-level term (phantoms: patches of a finding's mask toward its phrase); "
                        "0: DHN-NCE alone, as the paper")
    g.add_argument("--dense-labels", default="caption", choices=("caption", "mask"),
                   help="what the patch term learns from: which findings each slice holds, as its caption says "
                        "(default; no mask, so the model stays zero-shot), or the findings' masks")
    g.add_argument("--presence-weight", type=float, default=0.0,
                   help="weight of a slice presence term (phantoms): the image-text score (the finding's phrase "
                        "against the neutral texts on the whole slice) pushed toward whether the slice holds the "
                        "finding, as its caption says (no mask): what the engine reads as presence when this CLIP is "
                        "a model's presence CLIP (--presence-from it) or the model reads 'image' presence "
                        "(--dense-weight 0); 0: off")
    g.add_argument("--mil-top", type=int, default=None, metavar="K",
                   help="with --dense-labels caption and --presence-from: how many of a slice's highest patch "
                        "logits make its score for a finding (default 4, what the engine's patch presence reads)")
    g.add_argument("--presence-from", default=None, metavar="MODEL|FOLDER",
                   help="a model (id or .json) or BiomedCLIP folder whose CLIP, frozen, the new model carries to say "
                        "whether a slice holds the finding (its image-text score); the tuned CLIP then only learns "
                        "where (its slices without the finding are not scored on their top patches)")
    g.add_argument("--temperature", type=float, default=0.6, help="DHN-NCE temperature (paper: 0.6)")
    g.add_argument("--beta1", type=float, default=0.15, help="DHN-NCE hardness, image -> text (paper: 0.15)")
    g.add_argument("--beta2", type=float, default=0.15, help="DHN-NCE hardness, text -> image (paper: 0.15)")
    g.add_argument("--sam-from", default=None, metavar="MODEL",
                   help="the medclipsam model whose SAM and box settings the new model takes when --from is not a "
                        "medclipsam model (default medclipsam-phantom-small)")
    g.add_argument("--saliency", default="patch_similarity", choices=("patch_similarity", "gradcam", "gscorecam"),
                   help="the new model's saliency method (default patch_similarity, what the dense term trains)")
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    g.add_argument("--force", action="store_true", help="replace <output-dir>/<model-id>.json/.safetensors")
    _add_training(g)

    m = sub.add_parser("models", help="model catalogue and cache: list, fetch, verify, import, remove, convert")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="every model (segmentation models, then engine parts): present or not, size, licence")
    for name, text in (("fetch", "download a model into the cache (verified, resumable)"),
                       ("remove", "delete a downloaded model from the cache")):
        x = msub.add_parser(name, help=text)
        x.add_argument("id")
        x.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    v = msub.add_parser("verify", help="re-hash the files of one model (or all present ones)")
    v.add_argument("id", nargs="?")
    i = msub.add_parser("import", help="ID FILE...: a registry model's files copied by hand (offline sites), hash "
                                       "checked; SPEC.json: a model of your own (its spec and weights), then known "
                                       "by its id everywhere, the Slicer panel included")
    i.add_argument("id", help="a registry id, or a model spec .json to import with the weights it names")
    i.add_argument("paths", nargs="*", help="the files of the registry model ID")
    c = msub.add_parser("convert", help="make a CLIP-TNseg model of a downloaded CLIPSeg checkpoint (no network): "
                                        "CLIPSeg's CLIP and decoder, new fine branch and head, coarse_only")
    c.add_argument("source", help="clipseg-rd64-refined (fetched or imported), or a folder holding config.json, "
                                  "preprocessor_config.json and model.safetensors")
    c.add_argument("--output-dir", required=True, help="where <model-id>.json/.safetensors are written")
    c.add_argument("--model-id", default=None, help="default: cliptnseg-SOURCE")
    c.add_argument("--clip", default=None, help="take the CLIP towers from this open_clip checkpoint "
                                                "(openai-clip-vit-b16, or a file) instead of the CLIPSeg checkpoint's")
    c.add_argument("--force", action="store_true", help="replace the model if it exists")
    return parser


def _cmd_segment(a, progress):
    from .inference.segment_file import segment_file

    result = segment_file(a.input, a.prompt, a.output, SegmentOptions.from_args(a), probabilities=a.probabilities,
                          progress=progress)
    progress.done(output=str(a.output), found={f.prompt: f.found for f in result.findings},
                  status={f.prompt: f.status for f in result.findings},
                  findings=[f.event() for f in result.findings], out_of_domain=result.domain_warning is not None)
    if a.progress != "json":
        print(f"wrote {a.output}")


def _cmd_demo(a, progress):
    from .demo import run_demo

    out = run_demo(Path(a.output_dir), seed=a.seed, options=SegmentOptions.from_args(a), progress=progress)
    print(f"volume:       {out['volume']}\nsegmentation: {out['segmentation']}\noverlay:      {out['overlay']}")
    for prompt, d in out["dice"].items():
        print(f"Dice {prompt!r:30s} {d:.3f}")


def _cmd_evaluate(a, progress):
    from .evaluation import evaluator as ev
    from .evaluation.reports import check_report_path, write_any_report
    from .inference.segment_file import load_engine

    options = SegmentOptions.from_args(a)
    ev.check_evaluate_args(None if a.data else a.phantoms, a.tolerance_mm)
    if a.report:
        check_report_path(Path(a.report))
    if a.data and a.family:
        from .errors import InputError

        raise InputError(f"--family {a.family} chooses phantoms; with --data your own cases are scored, so leave "
                         f"--family out (or --data out to score phantoms)")
    if a.data:
        prompt_map = ev.parse_prompt_map(a.prompt_map) if a.prompt_map else None
        source = ev.LabelledCases(Path(a.data), prompt_map)
    elif a.family == "report":
        from .evaluation.report_cases import ReportCases

        source = ReportCases(a.phantoms, a.seed, a.wording)
    else:
        source = ev.PhantomCases(a.phantoms, a.seed, a.family or "A")
    engine = load_engine(**options.engine_arguments(), notify=progress.message)
    report = ev.evaluate(source, engine, options, a.tolerance_mm, progress)
    text = source.format(report)
    if a.report:
        write_any_report(Path(a.report), report, text)
    print(text)
    if a.report:
        print(f"\nreport: {a.report}")


def _train_setup(a, stages, progress) -> tuple[Path, object]:
    """(the work folder: --work-dir or build/work/<model-id>, the device) of a training command; an export that would
    overwrite a model is refused first, before the device is probed or anything is built. ``a.precision`` becomes
    the one the run uses (``_run_precision``)."""
    from .training.cliptnseg_recipe import check_output_free

    if "export" in stages:
        check_output_free(Path(a.output_dir), a.model_id, a.force)
    return Path(a.work_dir) if a.work_dir else Path("build") / "work" / a.model_id, _run_precision(a, progress)


def _run_precision(a, progress):
    """The device of a training command (``--device``); sets ``a.precision`` to what runs there (bf16 on a CPU
    without AMX: fp32, said through ``progress``)."""
    from .engines.contract import effective_precision
    from .inference.pipeline import resolve_device

    device = resolve_device(a.device)
    a.precision = effective_precision(a.precision, device, progress.message)
    return device


def _grad_norm_flag(a) -> str:
    """`` --max-grad-norm NORM`` for a recorded training command that ran with a gradient-norm limit, else nothing."""
    return f" --max-grad-norm {a.max_grad_norm!r}" if a.max_grad_norm is not None else ""


def _precision_flag(a) -> str:
    """`` --precision bf16`` for a recorded training command that ran in bf16, else nothing (fp32 is the default)."""
    return " --precision bf16" if a.precision == "bf16" else ""


def _cmd_train_medclipsam(a, progress):
    from .training.cliptnseg_recipe import check_train_args
    from .training.medclipsam_recipe import check_stages, run_medclipsam_training

    a.model_id = a.model_id or "medclipsam-phantom-small"
    stages = check_stages((a.stages or "sam,calibrate,export").split(","))
    check_train_args(["export"], {"--phantoms": (a.phantoms, 0), "--volumes": (a.volumes, 0), "--steps": (a.steps, 1),
                                  "--calibration-volumes": (a.calibration_volumes, 1)}, {})
    _refuse_given(a, CLIPTNSEG_ONLY + VOLUME_ONLY + ("--init-from",) + REPORT_ONLY + SEGMENTER_ONLY,
                  "--engine medclipsam trains on phantoms only")
    work_dir, device = _train_setup(a, stages, progress)
    cmd = (f"clipseg train --engine medclipsam --output-dir {a.output_dir} --model-id {a.model_id} "
           f"--clip-from {a.clip_from} --phantoms {a.phantoms} --volumes {a.volumes} --steps {a.steps} "
           f"--calibration-volumes {a.calibration_volumes} --family {a.family} --seed {a.seed} --no-resume --force"
           + _precision_flag(a))
    path = run_medclipsam_training(Path(a.output_dir), work_dir, a.model_id, a.phantoms, a.volumes, a.steps, a.seed,
                                   stages, not a.no_resume, a.calibration_volumes, progress, device, cmd, a.force,
                                   a.clip_from, a.family, precision=a.precision)
    if path:
        print(f"wrote {path}")


#: ``clipseg train`` options only the cliptnseg recipe reads; the other training branches refuse them when given
#: (``--init-from``, which the tgcnet recipe reads too, is refused by the medclipsam branches)
CLIPTNSEG_ONLY = ("--data", "--calibration-data", "--rival-weight", "--foreground-weight", "--presence-head",
                  "--input-size", "--context-slices", "--fine-channels")
#: options of the recipes that segment phantom volumes slice by slice (cliptnseg, tgcnet --dataset thyroid) only
VOLUME_ONLY = ("--slice-vote",)
#: options of the segmenter recipes (cliptnseg, tgcnet) only
SEGMENTER_ONLY = ("--max-grad-norm",)
#: options of ``clipseg train --engine tgcnet --dataset report`` only
REPORT_ONLY = ("--report-wording", "--location-support", "--report-mirror", "--report-focus")


def _check_grad_norm(a, stages) -> None:
    """Refuse, before any work, a ``--max-grad-norm`` that is not a finite number above 0, or one given to a run
    without the segmenter stage (the spec would record a limit its weights were not trained with)."""
    from .training.loop import check_grad_norm

    check_grad_norm(a.max_grad_norm)
    if a.max_grad_norm is not None and "segmenter" not in stages:
        _refuse_given(a, SEGMENTER_ONLY, f"--stages {','.join(stages)} trains no segmenter")


def _given(a, command: str, flags) -> list[str]:
    """The ``flags`` (e.g. "--family") of ``command`` whose value in ``a`` is not the parser's default: the options a
    user gave (so a branch that would ignore them can refuse them)."""
    defaults = vars(build_parser().parse_args([command]))
    return [flag for flag in flags if getattr(a, flag[2:].replace("-", "_")) != defaults[flag[2:].replace("-", "_")]]


def _refuse_given(a, flags, why: str) -> None:
    """InputError naming those of the ``train`` ``flags`` the user gave, after ``why`` (what the branch does
    instead), before any work; nothing when none was given."""
    from .errors import InputError

    given = _given(a, "train", flags)
    if given:
        raise InputError(f"{why}: {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply; "
                         f"drop {'it' if len(given) == 1 else 'them'}")


def _cmd_train_pseudo_labels(a, progress):
    from .training.cliptnseg_recipe import check_train_args
    from .training.pseudo_labels import check_stages, run_pseudo_label_training, unlabelled_volumes

    a.model_id = a.model_id or "medclipsam-weak-unet"
    stages = check_stages((a.stages or "label,unet,calibrate,export").split(","))
    check_train_args(["export"], {"--steps": (a.steps, 1)}, {})
    _refuse_given(a, ("--volumes", "--family", "--calibration-volumes", "--clip-from", "--init-from")
                  + REPORT_ONLY + CLIPTNSEG_ONLY + VOLUME_ONLY + SEGMENTER_ONLY,
                  "--pseudo-labels trains on the zero-shot masks of its folder and calibrates on a held-out quarter "
                  "of it")
    a.zero_shot = a.zero_shot or "medclipsam-phantom-small"
    unlabelled_volumes(Path(a.pseudo_labels))  # refuse a bad folder before anything is built
    work_dir, device = _train_setup(a, stages, progress)
    cmd = shlex.join(["clipseg", "train", "--engine", "medclipsam", "--pseudo-labels", a.pseudo_labels, "--zero-shot",
                      a.zero_shot, *[x for p in a.prompt or () for x in ("--prompt", p)], "--output-dir",
                      a.output_dir, "--model-id", a.model_id, "--steps", str(a.steps), "--seed", str(a.seed),
                      "--no-resume", "--force"]) + _precision_flag(a)
    path = run_pseudo_label_training(Path(a.pseudo_labels), Path(a.output_dir), work_dir, a.model_id, a.zero_shot,
                                     a.prompt, a.steps, a.seed, stages, not a.no_resume, progress, device, cmd,
                                     a.force, precision=a.precision)
    if path:
        print(f"wrote {path}")


def _cmd_train_tgcnet(a, progress):
    from .training.cliptnseg_recipe import check_train_args, check_train_shape
    from .training.tgcnet_recipe import STAGES, run_tgcnet_training

    a.model_id = a.model_id or f"tgcnet-{a.dataset}-small"
    stages = check_train_args((a.stages or ",".join(STAGES)).split(","),
                              {"--phantoms": (a.phantoms, 32), "--clip-steps": (a.clip_steps, 1),
                               "--steps": (a.steps, 1), "--calibration-volumes": (a.calibration_volumes, 1),
                               "--lora-rank": (a.lora_rank, 1)}, {})
    _refuse_given(a, ("--volumes", "--family") + CLIPTNSEG_ONLY,
                  "--engine tgcnet trains on --dataset report or thyroid and always has its presence head")
    if a.dataset != "report":
        _refuse_given(a, REPORT_ONLY, f"--dataset {a.dataset} has no report lines")
    else:
        _refuse_given(a, VOLUME_ONLY, "--dataset report is single radiographs, with no neighbouring slices to vote")
    check_train_shape(None, a.slice_vote)
    _check_grad_norm(a, stages)
    ablate = tuple(m.strip() for m in a.ablate.split(",") if m.strip())
    work_dir, device = _train_setup(a, stages, progress)
    cmd = (f"clipseg train --engine tgcnet --dataset {a.dataset} --output-dir {a.output_dir} --model-id {a.model_id} "
           f"--phantoms {a.phantoms} --clip-steps {a.clip_steps} --steps {a.steps} --calibration-volumes "
           f"{a.calibration_volumes} --lora-rank {a.lora_rank} --seed {a.seed} --no-resume --force"
           + (f" --ablate {','.join(ablate)}" if ablate else "")
           + (f" --report-wording {a.report_wording}" if a.report_wording != "train" else "")
           + (" --location-support" if a.location_support else "")
           + (" --report-mirror" if a.report_mirror else "")
           + (f" --report-focus {shlex.quote(a.report_focus)}" if a.report_focus else "")
           + (f" --clip-from {a.clip_from}" if a.dataset == "thyroid" else "")
           + (f" --init-from {a.init_from}" if a.init_from else "")
           + (f" --stages {','.join(stages)}" if a.init_from and "clip" not in stages else "")
           + (f" --slice-vote {a.slice_vote}" if a.slice_vote != 1 else "")
           + _grad_norm_flag(a) + _precision_flag(a))
    path = run_tgcnet_training(Path(a.output_dir), work_dir, a.model_id, a.dataset, a.phantoms, a.clip_steps,
                               a.steps, a.seed, stages, not a.no_resume, a.calibration_volumes, progress, device,
                               cmd, a.force, a.clip_from, ablate, a.lora_rank, init_from=a.init_from,
                               wording=a.report_wording, location_support=a.location_support, mirror=a.report_mirror,
                               precision=a.precision, max_grad_norm=a.max_grad_norm, slice_vote=a.slice_vote,
                               focus=a.report_focus)
    if path:
        print(f"wrote {path}")


def _cmd_train(a, progress):
    from .training.cliptnseg_recipe import check_train_args, check_train_shape, run_training

    if a.pseudo_labels is not None or a.prompt or a.zero_shot:
        if a.engine != "medclipsam" or a.pseudo_labels is None:
            from .errors import InputError

            raise InputError("--pseudo-labels FOLDER (with optional --prompt and --zero-shot) is the weakly "
                             "supervised stage of --engine medclipsam: give both")
        return _cmd_train_pseudo_labels(a, progress)
    if a.engine == "medclipsam":
        return _cmd_train_medclipsam(a, progress)
    if a.engine == "tgcnet":
        return _cmd_train_tgcnet(a, progress)
    a.model_id = a.model_id or "cliptnseg-phantom-small"
    _refuse_given(a, REPORT_ONLY, "--engine cliptnseg trains on phantoms or --data, not report lines")
    stages = check_train_args((a.stages or "clip,segmenter,calibrate,export").split(","),
                              {"--phantoms": (a.phantoms, 0), "--volumes": (a.volumes, 0),
                               "--clip-steps": (a.clip_steps, 1), "--steps": (a.steps, 1),
                               "--calibration-volumes": (a.calibration_volumes, 1),
                               "--rival-weight": (a.rival_weight, 0),
                               "--foreground-weight": (a.foreground_weight, 0)},
                              {"--data": a.data, "--calibration-data": a.calibration_data})
    _check_grad_norm(a, stages)
    check_train_shape(a.input_size, a.slice_vote, a.context_slices, a.fine_channels)
    work_dir, device = _train_setup(a, stages, progress)
    # the command that re-creates this model where it is written: --force, as the model will be there by then
    cmd = (f"clipseg train --output-dir {a.output_dir} --model-id {a.model_id} --phantoms {a.phantoms} "
           f"--volumes {a.volumes} "
           f"--clip-steps {a.clip_steps} --steps {a.steps} --calibration-volumes {a.calibration_volumes} "
           f"--family {a.family} --seed {a.seed} --no-resume --force" + (" --presence-head" if a.presence_head else "")
           + (f" --rival-weight {a.rival_weight!r}" if a.rival_weight else "")
           + (f" --foreground-weight {a.foreground_weight!r}" if a.foreground_weight else "")
           + (f" --input-size {a.input_size}" if a.input_size else "")
           + (f" --slice-vote {a.slice_vote}" if a.slice_vote != 1 else "")
           + (f" --context-slices {a.context_slices}" if a.context_slices else "")
           + (f" --fine-channels {','.join(map(str, a.fine_channels))}" if a.fine_channels else "")
           + (f" --init-from {a.init_from}" if a.init_from else "")
           + (" --stages segmenter,calibrate,export" if a.init_from and "clip" not in stages else "")
           + (f" --data {a.data}" if a.data else "")
           + (f" --calibration-data {a.calibration_data}" if a.calibration_data else "")
           + _grad_norm_flag(a) + _precision_flag(a))
    path = run_training(Path(a.output_dir), work_dir, a.model_id, a.phantoms, a.clip_steps, a.steps,
                        Path(a.data) if a.data else None, a.seed, stages, not a.no_resume,
                        a.calibration_volumes, progress, device, command=cmd, presence_head=a.presence_head,
                        n_volumes=a.volumes, force=a.force,
                        calibration_csv=Path(a.calibration_data) if a.calibration_data else None, family=a.family,
                        rival_weight=a.rival_weight, init_from=a.init_from,
                        foreground_weight=a.foreground_weight, precision=a.precision,
                        max_grad_norm=a.max_grad_norm, input_size=a.input_size, slice_vote=a.slice_vote,
                        context_slices=a.context_slices, fine_channels=a.fine_channels)
    if path:
        print(f"wrote {path}")


def _cmd_calibrate(a, progress):
    from .evaluation.evaluator import check_evaluate_args
    from .training.recalibrate import parse_thresholds, recalibrate_model

    check_evaluate_args(a.phantoms)
    thresholds = parse_thresholds(a.thresholds) if a.thresholds is not None else None
    path = recalibrate_model(a.model, Path(a.output), a.phantoms, a.seed, a.family, a.device, a.force, progress,
                             thresholds=thresholds, flip_choice=a.flip_choice)
    if a.progress != "json":
        print(f"wrote {path}")


def _cmd_finetune(a, progress):
    import shlex

    from .training import finetune as ft

    prompt_map = None
    if a.prompt_map:
        from .evaluation.evaluator import parse_prompt_map

        prompt_map = parse_prompt_map(a.prompt_map)
    steps = ft.DEFAULT_STEPS if a.steps is None else a.steps
    batch = ft.DEFAULT_BATCH if a.batch_size is None else a.batch_size
    model_id = a.model_id
    # the command that re-creates this model where it is written (--force: the model will be there by then)
    argv = ["clipseg", "finetune", "--data", a.data, "--output-dir", a.output_dir, "--steps", str(steps), "--seed",
            str(a.seed), "--batch-size", str(batch)]
    argv += ["--text-adaptation", a.text_adaptation] if a.text_adaptation else []
    argv += (["--from", a.parent] if a.parent else []) + (["--prompt-map", a.prompt_map] if a.prompt_map else [])
    argv += ["--input-size", str(a.input_size)] if a.input_size else []
    argv += ["--single-network"] if a.single_network else []
    argv += ["--no-refit"] if a.no_refit else []
    device = _run_precision(a, progress)
    argv += _precision_flag(a).split()
    result = ft.finetune(Path(a.data), Path(a.output_dir), a.parent, model_id, prompt_map, steps, a.seed, a.force,
                         str(device), progress, batch, a.text_adaptation, input_size=a.input_size,
                         keep_parent=False if a.single_network else None, precision=a.precision,
                         refit=not a.no_refit,
                         command=shlex.join(argv + ["--model-id", model_id] if model_id else argv) + " --force")
    spec = result.spec
    rules = {p: spec["presence"]["per_finding"][p]["calibration"] for p in spec["training"]["data"]["phrases"]}
    fit = spec["training"]["fit_on_labelled"]["phrases"]
    progress.done(model=str(result.spec_path), model_id=spec["id"], parent=spec["training"]["parent"]["id"],
                  calibration=spec["training"]["calibration"], rules=rules, fit_on_labelled=fit)
    if a.progress != "json":
        shown = lambda x, form: "n/a" if x is None else format(x, form)  # noqa: E731
        for p, c in rules.items():
            print(f"{p!r}: calibrated on {c['slices']} held-out slice(s): Dice {shown(c['mean_dice'], '.3f')}, "
                  f"slices without it left empty {shown(c['absent_empty_rate'], '.2f')} ({c['absent_slices']} such "
                  f"slice(s))")
            if p in fit:
                print(f"{p!r}: on the {fit[p]['slices']} labelled slice(s) it trained on: Dice "
                      f"{shown(fit[p]['dice'], '.3f')}, slices without it left empty {shown(fit[p]['empty'], '.2f')}")
        print(f"wrote {result.spec_path}")


def _cmd_finetune_clip(a, progress):
    import shlex

    from .training.clip_finetune import finetune_clip

    if a.data and (a.volumes or a.family != "A"):
        from .errors import InputError

        raise InputError("--volumes and --family choose phantoms; with --data your own pairs are used, so leave them "
                         "out (or --data out to train on phantom captions)")
    argv = ["clipseg", "finetune-clip", "--output-dir", a.output_dir, "--steps", str(a.steps), "--batch-size",
            str(a.batch_size), "--lr", str(a.lr), "--trainable", a.trainable, "--blocks", str(a.blocks),
            "--lora-rank", str(a.lora_rank), "--dense-weight", str(a.dense_weight), "--dense-labels",
            a.dense_labels, "--temperature",
            str(a.temperature), "--beta1", str(a.beta1), "--beta2", str(a.beta2), "--saliency", a.saliency,
            "--seed", str(a.seed)]
    argv += ["--from", a.source] if a.source else []
    argv += ["--sam-from", a.sam_from] if a.sam_from else []
    argv += ["--presence-from", a.presence_from] if a.presence_from else []
    argv += ["--presence-weight", str(a.presence_weight)] if a.presence_weight else []
    argv += ["--mil-top", str(a.mil_top)] if a.mil_top is not None else []
    argv += (["--data", a.data] if a.data else ["--phantoms", str(a.phantoms), "--volumes", str(a.volumes),
                                                 "--family", a.family] + (["--augment"] if a.augment else []))
    argv += ["--model-id", a.model_id] if a.model_id else []
    device = _run_precision(a, progress)
    argv += _precision_flag(a).split()
    model_key = a.model_id or f"{Path(a.source or 'medclipsam-phantom-small').stem}-dhn"
    work_dir = Path(a.work_dir) if a.work_dir else Path("build") / "work" / model_key
    path = finetune_clip(Path(a.output_dir), work_dir, a.source, a.model_id, Path(a.data) if a.data else None,
                         a.phantoms, a.volumes, a.family, a.steps, a.batch_size, a.lr, a.trainable, a.blocks,
                         a.lora_rank, a.dense_weight, a.temperature, a.beta1, a.beta2, a.seed, not a.no_resume,
                         a.sam_from, a.saliency, progress, device,
                         shlex.join(argv) + " --no-resume --force", a.force, dense_labels=a.dense_labels,
                         augment=a.augment, precision=a.precision, presence_from=a.presence_from,
                         presence_weight=a.presence_weight, mil_top=a.mil_top)
    if a.progress != "json":
        print(f"wrote {path}")


def _cmd_models(a, progress):
    from .errors import ModelError
    from .models import catalogue
    from .models import store as ms

    registry = ms.load_registry()
    if a.action == "list":  # segmentation models (the Slicer panel's list), then the parts engines build on
        refs = catalogue.segmentation_models(registry)
        refs += [r for r in catalogue.entries(registry) if not r.runnable]
        print(f"{'id':26s} {'engine':11s} {'role':9s} {'status':14s} {'size':>9s}  licence   cache: {ms.cache_dir()}")
        for r in refs:
            print(f"{r.id:26s} {r.engine:11s} {r.role:9s} {r.status:14s} {r.size:>9s}  {r.license}")
        print(f"(default model: {DEFAULT_MODEL}; --model and the Slicer panel take the segmenters; clip, clipseg and "
              "sam rows are parts an engine builds on, fetched for it, not models that segment on their own; "
              "`clipseg models convert` makes a model of a clipseg checkpoint)")
    elif a.action == "fetch":
        print(f"{a.id}: present in {ms.fetch(a.id, progress, registry)}")
    elif a.action == "verify":
        ids = [a.id] if a.id else [r.id for r in catalogue.entries(registry) if r.present]
        bad = False
        for mid in ids:
            for name, status in ms.verify(mid, registry).items():
                print(f"{mid}/{name}: {status}")
                bad |= status != "present"
        if bad:
            raise ModelError("some files are missing or corrupt; run `clipseg models fetch ID` or import them again "
                             "(if the file pinned first was the wrong one, `clipseg models remove ID` before that)")
    elif a.action == "import" and not a.paths:
        if Path(a.id).suffix.lower() != ".json":
            raise ModelError(f"give the files of {a.id} to import (`clipseg models import {a.id} FILE...`), or a "
                             f"model spec .json to import a model of your own")
        folder = ms.import_spec(Path(a.id), registry)
        print(f"{folder.name}: imported into {folder}; use it with --model {folder.name} (or pick it in Slicer)")
    elif a.action == "import":
        print(f"{a.id}: imported into {ms.import_files(a.id, a.paths, registry)}")
    elif a.action == "convert":
        from .engines.cliptnseg.convert import convert_command

        print(convert_command(a.source, a.output_dir, a.model_id, a.clip, a.force, registry))
    elif a.action == "remove":
        if ms.remove(a.id, registry):
            print(f"{a.id}: removed from the cache ({ms.cache_dir() / a.id})")
        else:
            print(f"{a.id}: was not downloaded; nothing to remove")


COMMANDS = {"segment": _cmd_segment, "demo": _cmd_demo, "evaluate": _cmd_evaluate, "train": _cmd_train,
            "calibrate": _cmd_calibrate,
            "finetune": _cmd_finetune, "finetune-clip": _cmd_finetune_clip, "models": _cmd_models}


def main(argv=None) -> int:
    from .errors import ClipSegError
    from .progress import Progress

    a = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a file name in any script prints even where stdout is ASCII/Latin-1
        sys.stdout.reconfigure(errors="backslashreplace")
    progress = Progress(getattr(a, "progress", "none"))
    try:
        with _quiet_libraries(a.command):
            COMMANDS[a.command](a, progress)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return 0
    except ClipSegError as e:
        return _fail(a, progress, str(e), e.exit_code)
    except KeyboardInterrupt:
        return _fail(a, progress, "interrupted; no output was written (outputs are only renamed into place once "
                                  "complete)", 130)
    except BrokenPipeError:  # the reader of stdout went away (`clipseg models list | head -3`): stop quietly
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, as a Unix tool killed by the closed pipe
    except OSError as e:  # the system refused a read or write (disk full, permissions, ...): not a bug in clipseg
        return _fail(a, progress, _describe_os_error(e), 1)
    except Exception as e:  # a bug, not a user error: say so, with the traceback to report
        import traceback

        traceback.print_exc()
        return _fail(a, progress, f"internal error {type(e).__name__}: {e} (a bug in clipseg; please report it with "
                                  f"the traceback)", 70)


def _describe_os_error(e: OSError) -> str:
    """What the system refused and what to do about it, by error number."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (your quota is full)",
           errno.EACCES: "fix the permissions or choose another path", errno.EPERM: "fix the permissions or choose "
           "another path", errno.EROFS: "choose a path on a writable disk", errno.ENOENT: "check the path",
           errno.EISDIR: "give a file, not a folder", errno.ENOTDIR: "check the path: a part of it is a file, "
           "not a folder"}.get(e.errno, "free disk space or fix the permissions")
    return (f"the system refused a file operation{where}: {e.strerror or e}; {fix}, then run again (outputs are "
            f"only renamed into place once complete)")


@contextmanager
def _quiet_libraries(command: str):
    """Library noise off while a command runs: Python warnings (MONAI, torch, numpy's 'Mean of empty slice'),
    unless ``python -W`` or ``PYTHONWARNINGS`` asks for them, and ITK's warnings. clipseg's own messages go
    through ``Progress``; problems that matter are errors."""
    import warnings

    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("ignore")
        if command == "models":  # no image work: no need to import SimpleITK
            yield
            return
        from .io.read import quiet_itk

        with quiet_itk():
            yield


def _stdout_to_devnull() -> None:
    """After a broken pipe: send what is left in stdout's buffer (flushed at exit) to /dev/null (Python docs,
    'Note on SIGPIPE')."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests capture it)
        pass


def _fail(a, progress, message: str, exit_code: int) -> int:
    """Report a failure on stderr (and as a JSON ``error`` event with ``--progress json``); returns the exit code."""
    progress.close()
    if getattr(a, "progress", None) == "json":
        try:
            progress.event("error", message=message, exit_code=exit_code)
        except BrokenPipeError:
            _stdout_to_devnull()
    print(f"clipseg: error: {message}", file=sys.stderr)
    return exit_code


def entry_point():  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
