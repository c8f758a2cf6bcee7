"""TGC-Net's training recipe (``clipseg train --engine tgcnet``): the network's modules (SSE, DATE, VLCM, decoder,
presence head) and LoRA adapters on the frozen CLIP's text tower (peft) trained through ``training.loop.run_loop``
with the segmentation loss + VLCM's alignment term; then presence calibration and export (adapters merged).

Two data sets: ``"report"`` (chest-radiograph phantoms with report sentences, ``training.report_data``; the CLIP is
trained contrastively on them first, with a context of 32 tokens for report lines) and ``"thyroid"`` (CLIPSeg's
ultrasound phantoms, the CLIP of an existing cliptnseg model reused, as the paper starts from a pretrained CLIP).
``ablate`` turns modules off (``network.MODULES``) for the ablation table (README).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..inference.laterality import SIDE_MARGIN_MM
from ..progress import Progress
from .loop import Recipe, check_calibrated_with, run_loop, staged_presence
from .text_lora import TextAdapters

DATASETS = ("report", "thyroid")
STAGES = ("clip", "segmenter", "calibrate", "export")
CLIP_FROM = "cliptnseg-phantom-small"
REPORT_CLIP = {  # the report model's own small CLIP: the embedded cliptnseg's sizes, 32 text tokens
    "embed_dim": 64,
    "vision_cfg": {"layers": 6, "width": 128, "head_width": 32, "patch_size": 8, "image_size": 128},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
NETWORK = {"extract_layers": [2, 4, 6], "dim": 64, "heads": 4, "cnn_channels": [8, 16, 32, 64], "location": True}
ALIGN_WEIGHT = 0.5
LEARNING_RATES = {"modules": 2e-3, "lora": 1e-3}


def tgcnet_spec(model_id: str, clip: dict, data: str, ablate=(), network: dict | None = None) -> dict:
    """The spec of a TGC-Net model (without presence rule, training record and files); ``network``: entries over
    ``NETWORK`` (the location words file is recorded only for a network with the cue)."""
    from ..engines.tgcnet.knowledge import DEFAULT_KNOWLEDGE, load_knowledge
    from ..engines.tgcnet.location import DEFAULT_LOCATIONS, load_locations

    knowledge = load_knowledge(DEFAULT_KNOWLEDGE)
    net = {**NETWORK, **{m: False for m in ablate}, **(network or {})}
    off = ", without " + ", ".join(m.upper() for m in ablate) if ablate else ""
    cue = " with a side/zone location cue" if net.get("location") else ""
    spec = {
        "id": model_id,
        "engine": "tgcnet",
        "description": f"TGC-Net (SSE + DATE + VLCM{off}){cue}, small CLIP with LoRA on its text tower, trained on "
                       f"CLIPSeg's {data} phantoms. For demos and tests, not for clinical use.",
        "license": "Apache-2.0",
        "citation": "Lin et al., TGC-Net: text-guided calibration network for medical image segmentation, 2025",
        "clip": clip,
        "network": net,
        "knowledge": {"file": DEFAULT_KNOWLEDGE, "version": knowledge.version, "sha256": knowledge.sha256},
        # left and right carry meaning in a report: a mirrored slice would answer the other side's question (unless
        # trained with --report-mirror, when the mirror is asked the side-swapped line), so its
        # slices reach the network in the patient's frame and a one-sided line keeps its side (inference.laterality);
        # an ultrasound slice's findings have no side, so its maps average the slice and its mirror, as cliptnseg's
        "inference": ({"flip_average": False, "patient_sides": {"margin_mm": SIDE_MARGIN_MM}} if data == "report"
                      else {"flip_average": True}),
    }
    if cue:
        locations = load_locations(DEFAULT_LOCATIONS)
        spec["locations"] = {"file": DEFAULT_LOCATIONS, "version": locations.version, "sha256": locations.sha256}
    return spec


def encode_pairs(net, phrases: list[str]):
    """The ``TextBatch`` of N phrases, one row per (image, phrase) pair, each distinct phrase encoded once (DATE,
    through the adapted text tower: with gradient while training)."""
    unique = list(dict.fromkeys(phrases))
    index = torch.tensor([unique.index(p) for p in phrases], device=net.clip.positional_embedding.device)
    return net.encode_text(unique).rows(index)


def tgcnet_loss(device="cpu", align_weight: float = ALIGN_WEIGHT):
    """-> ``loss(out, masks [N,S,S])`` for the network's paired output ``out`` (mask logits ``[N,S,S]``, presence
    logits ``[N]`` or None, similarity logits ``[N,h,w]`` or None): ``cliptnseg_recipe.segmentation_loss`` (Dice on
    present pairs + pixel BCE + presence BCE) + ``align_weight`` x VLCM's ``alignment_loss``."""
    from ..engines.tgcnet.network import alignment_loss
    from .cliptnseg_recipe import segmentation_loss

    mask_loss = segmentation_loss(device)

    def loss(out, masks):
        logits, presence, sim = out
        value = mask_loss(logits, masks, presence)
        if sim is not None and align_weight:
            value = value + align_weight * alignment_loss(sim, masks)
        return value

    return loss


def module_parameters(net) -> list:
    """The trainable parameters of the network's own modules (SSE, DATE, VLCM, decoder, presence head): not CLIP's,
    nor its adapters'."""
    return [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("clip.")]


def trained_state(net) -> dict:
    """What training changes: every tensor outside the CLIP, and the CLIP's LoRA adapters (a checkpoint)."""
    return {k: v for k, v in net.state_dict().items() if not k.startswith("clip.") or "lora_" in k}


def segmenter_recipe(net, adapters: TextAdapters, device="cpu", align_weight: float = ALIGN_WEIGHT,
                     start: dict | None = None, wording: str = "train", mirror: bool = False,
                     focus: str | None = None) -> Recipe:
    """``run_loop``'s recipe: ``tgcnet_loss`` on each batch, every phrase through the adapted text tower
    (``encode_pairs``). Two parameter groups: the modules and the LoRA adapters (``LEARNING_RATES``). ``start``: the
    lineage of the model the weights started from (``warm_start``; None: random), in the checkpoint's fingerprint, as
    is a report ``wording`` other than "train", report mirroring (``mirror``) and the kind drawn twice as often
    (``focus``)."""
    pair_loss = tgcnet_loss(device, align_weight)

    def loss(batch):
        images, phrases, masks, pair_index = batch
        return pair_loss(net(images.to(device), encode_pairs(net, phrases), pair_index.to(device)), masks.to(device))

    return Recipe("tgcnet segmenter", [{"params": module_parameters(net), "lr": LEARNING_RATES["modules"]},
                                       {"params": adapters.params, "lr": LEARNING_RATES["lora"]}],
                  loss, lambda: trained_state(net), lambda sd: net.load_state_dict(sd, strict=False), net.train,
                  weight_decay=1e-4, fingerprint={"network": net.cfg, "align_weight": align_weight,
                                                  "lr": LEARNING_RATES, "lora": len(adapters.params),
                                                  **({"start": start} if start else {}),
                                                  **({"wording": wording} if wording != "train" else {}),
                                                  **({"mirror": True} if mirror else {}),
                                                  **({"focus": focus} if focus else {})})


def _clip_of(model: str) -> tuple[dict, dict]:
    """(clip config, clip state dict) of an existing cliptnseg model (id or spec path)."""
    from ..models import clip_part, load_spec, load_weights

    spec = load_spec(model)
    if spec["engine"] != "cliptnseg":
        raise InputError(f"--clip-from {model!r} is a {spec['engine']} model; give a cliptnseg model (its CLIP is "
                         f"reused), e.g. {CLIP_FROM}")
    state = load_weights(spec)
    return spec["clip"], clip_part(state)


def warm_start(init_from: str, spec: dict, data: str) -> tuple[dict, dict]:
    """The tgcnet model a run continues (``--init-from``): -> (its verified spec, its weights: ``clip.*`` with the
    text adapters merged, and the modules'). It must be a tgcnet model of the recipe's CLIP and network, trained on
    ``data``; else InputError naming what differs (before any work)."""
    from ..models import load_parent, load_weights

    parent = load_parent(init_from, spec, ("clip", "network"), "the embedded tgcnet-report-small")
    trained_on = (parent.get("training") or {}).get("dataset")
    if trained_on != data:
        raise InputError(f"--init-from {init_from} was trained on --dataset {trained_on}; give --dataset "
                         f"{trained_on} or a model trained on {data}")
    return parent, load_weights(parent)


def run_tgcnet_training(out_dir: Path, work_dir: Path, model_id: str, data: str = "report", n_images: int = 2000,
                        clip_steps: int = 300, steps: int = 2000, seed: int = 0, stages=STAGES, resume: bool = True,
                        calibration_volumes: int = 40, progress: Progress | None = None, device="cpu",
                        command: str = "", force: bool = False, clip_from: str = CLIP_FROM, ablate=(),
                        lora_rank: int = 8, batch_size: int = 12, clip_cfg: dict | None = None,
                        network: dict | None = None, init_from: str | None = None,
                        wording: str = "train", location_support: bool = False,
                        precision: str = "fp32", max_grad_norm: float | None = None, mirror: bool = False,
                        slice_vote: int = 1, focus: str | None = None) -> Path | None:
    """The whole recipe (module docstring); stages read and write checkpoints in ``work_dir``. Returns the spec
    path when exported. ``clip_cfg`` (the report CLIP, default ``REPORT_CLIP``) and ``network`` (entries over
    ``NETWORK``) change the architecture (tests make it tiny).

    ``init_from`` (a tgcnet model id or spec path, ``warm_start``): continue that model: its CLIP (text adapters
    merged) is the start of the "clip" stage if run, else kept; the modules start from its modules, new adapters
    from zero (so step 0 is the parent); the spec records it as the parent. A checkpoint in ``work_dir`` still takes
    precedence (resume).

    ``wording`` (report data only): the lines' wording in both stages, "train" or "varied" (``report_data.ReportBank``).
    ``location_support`` (report data only): the spec's ``inference.location_support`` (``engines.tgcnet.engine``),
    set before calibration so the rules are fitted to the maps it gives. ``precision``: fp32 or bf16 autocast of the
    training steps, ``max_grad_norm``: the segmenter stage's gradient-norm limit (``loop.run_loop``; None: none).
    ``slice_vote`` (thyroid data only): the spec's ``inference.slice_vote`` (odd; 1: off), set before calibration.
    ``mirror`` (report data only): train on mirrored images with their lines' sides swapped (``ReportBank``) and set
    the spec's ``inference.flip_average`` before calibration (each slice averaged with its mirror asked the swapped
    line). ``focus`` (report data only): an opacity kind whose phantoms the training draws twice as often
    (``ReportBank``), recorded in the spec's training entry.
    """
    from ..engines.clip_backbone import build_clip
    from ..engines.tgcnet.engine import TGCNetEngine
    from ..engines.tgcnet.network import MODULES, TGCNet, parameter_counts
    from ..engines.tgcnet.knowledge import load_knowledge
    from ..models import clip_part, lineage
    from .cliptnseg_recipe import _checkpoint, check_train_shape, start_staged_run, train_clip

    if data not in DATASETS:
        raise InputError(f"--dataset {data!r} is not one of {', '.join(DATASETS)}")
    bad = [m for m in ablate if m not in MODULES]
    if bad:
        raise InputError(f"--ablate {bad[0]!r} is not a TGC-Net module; give some of {', '.join(MODULES)}")
    refused = InputError("--location-support needs --dataset report and a network with the location cue and DATE "
                         "(it reads the kind a line names); drop it")
    if location_support and data != "report":
        raise refused  # before --clip-from's CLIP is read
    if mirror and data != "report":
        raise InputError("--report-mirror needs --dataset report: thyroid models always flip (no side to swap); "
                         "drop it")
    if focus is not None:
        from ..synthetic.report_phantoms import KINDS

        if data != "report":
            raise InputError("--report-focus needs --dataset report (it names an opacity kind); drop it")
        if focus not in KINDS:
            raise InputError(f"--report-focus {focus!r} is not an opacity kind of the report phantoms; give one of "
                             f"{', '.join(repr(k) for k in KINDS)}")
        if "segmenter" not in stages:
            raise InputError(f"--report-focus changes what the segmenter stage draws; --stages {','.join(stages)} "
                             f"trains no segmenter (the spec would record a focus its weights never had): drop it")
    check_train_shape(None, slice_vote)
    if slice_vote != 1 and data == "report":
        raise InputError("--slice-vote needs volumes: --dataset report is single radiographs; drop it")
    if data == "report":
        clip_cfg, clip_state = clip_cfg or REPORT_CLIP, None
    else:
        clip_cfg, clip_state = _clip_of(clip_from)
    spec = tgcnet_spec(model_id, clip_cfg, data, ablate, network)
    net_cfg = spec["network"]
    if location_support and (not net_cfg.get("location") or not net_cfg.get("date", True)):
        raise refused
    if location_support:
        spec["inference"]["location_support"] = True
    if mirror:
        spec["inference"]["flip_average"] = True  # trained on mirrors with their sides swapped: ask it both
    if slice_vote != 1:
        spec["inference"]["slice_vote"] = int(slice_vote)
    parent, parent_state = warm_start(init_from, spec, data) if init_from else (None, None)
    start = lineage(parent) if parent is not None else None
    work_dir, progress = start_staged_run(stages, out_dir, model_id, force, work_dir, seed, progress)
    if parent_state is not None:
        clip_state = clip_part(parent_state)
    size = clip_cfg["vision_cfg"]["image_size"]
    clip = build_clip(clip_cfg)
    bank = None
    if {"clip", "segmenter"} & set(stages):
        if data == "report":
            from .report_data import ReportBank

            bank = ReportBank(n_images, size, progress=lambda d, t: progress.update("report phantoms", d, t),
                              wording=wording, mirror=mirror, focus=focus)
        else:
            from .datasets import PhantomBank

            bank = PhantomBank(n_images, size, n_prompts=2,
                               progress=lambda d, t: progress.update("phantoms", d, t))
    clip_ckpt = work_dir / "clip.pt"
    if clip_state is not None:  # --clip-from's or the parent's CLIP (which then starts the clip stage)
        clip.load_state_dict(clip_state)
    if data == "report":
        if "clip" in stages:
            once = bank.drawn_once()  # --report-focus is the segmenter's: the CLIP sees each phantom once an epoch
            train_clip(clip, once, clip_steps, clip_ckpt, batch_size=min(32, len(once)), seed=seed, resume=resume,
                       progress=progress, device=device, start=start, precision=precision)
        if parent is None or clip_ckpt.is_file():
            clip.load_state_dict(_checkpoint(clip_ckpt, "clip"))
    net = TGCNet(clip, spec["network"], load_knowledge(spec["knowledge"]["file"])).to(device)
    if parent_state is not None:  # before the adapters wrap the text tower (their keys differ)
        net.load_state_dict({k: v for k, v in parent_state.items() if not k.startswith("clip.")}, strict=False)
    adapters = TextAdapters(net, lora_rank)
    counts = parameter_counts(net)
    progress.message(f"TGC-Net: {counts['trainable']:,} trainable parameters of {counts['total']:,} "
                     f"({100 * counts['trainable'] / counts['total']:.1f}%; the CLIP frozen, LoRA rank {lora_rank} "
                     f"on its text tower)")
    seg_ckpt = work_dir / "segmenter.pt"
    recipe = segmenter_recipe(net, adapters, device, start=start, wording=wording, mirror=mirror,
                              focus=getattr(bank, "focus", None))  # what the bank draws (None without the stage)
    if "segmenter" in stages:
        run_loop(recipe, bank, steps, seg_ckpt, batch_size, seed, resume, progress=progress, precision=precision,
                 max_grad_norm=max_grad_norm)
    if not {"calibrate", "export"} & set(stages):  # e.g. --stages clip: nothing reads the segmenter here
        return None
    saved = None  # a segmenter trained by an earlier run, read once for its fingerprint and its weights
    if "segmenter" not in stages and seg_ckpt.is_file():
        saved = torch.load(seg_ckpt, map_location="cpu", weights_only=True)
    if "segmenter" not in stages and data == "report" and (saved is not None or parent is not None) \
            and _trained_on_mirrors(saved, parent) != mirror:
        raise InputError(f"the segmenter this run exports was trained {'with' if not mirror else 'without'} "
                         f"--report-mirror, this run asks {'with' if mirror else 'without'} it: its flip averaging "
                         f"would not be what it learnt; give the same setting, or train it again (--stages "
                         f"segmenter,calibrate,export)")
    if parent is None or seg_ckpt.is_file():
        recipe.load(saved["model"] if saved is not None else _checkpoint(seg_ckpt, "segmenter"))
    adapters.merge()
    net.eval()
    engine = TGCNetEngine(net, torch.device(device), spec)

    def calibrate():
        if data == "report":
            from .report_data import calibrate_report_rules

            return calibrate_report_rules(engine, calibration_volumes, progress)
        from .calibration import calibrate_phantom_rules

        return calibrate_phantom_rules(engine, calibration_volumes, progress=progress)  # flips: the spec's setting

    presence = staged_presence(work_dir, stages, calibrate)
    if presence is None:
        return None
    if data == "report":
        check_calibrated_with(presence, "location_support", location_support, False, work_dir,
                              lambda v: f"{'with' if v else 'without'} --location-support")
        check_calibrated_with(presence, "patient_sides", SIDE_MARGIN_MM, None, work_dir,
                              lambda v: "without the patient's sides" if v is None else
                              f"with one-sided lines kept to their side ({v:g} mm margin)")
        check_calibrated_with(presence, "flip_average", mirror, False, work_dir,
                              lambda v: "with flip averaging (--report-mirror)" if v else "without flip averaging")
    check_calibrated_with(presence, "slice_vote", slice_vote, 1, work_dir, lambda v: f"with --slice-vote {v}")
    from ..models import write_spec

    spec["presence"] = presence
    spec["training"] = {"command": command, "precision": precision, "dataset": data, "n_images": n_images,
                        "clip_steps": clip_steps,
                        "steps": steps, "seed": seed, "batch_size": batch_size, "lora_rank": lora_rank,
                        "ablate": list(ablate), "clip_from": None if data == "report" else clip_from,
                        "parameters": counts, "phrases": training_phrases(data, wording)}
    if data == "report":
        spec["training"]["wording"] = wording
        if mirror:
            spec["training"]["mirror"] = True
        if focus:
            spec["training"]["focus"] = focus
    if max_grad_norm is not None:
        spec["training"]["max_grad_norm"] = max_grad_norm
    if parent is not None:
        spec["training"]["clip_steps"] = clip_steps if clip_ckpt.is_file() else 0  # 0: the parent's CLIP kept
        spec["training"]["parent"] = {**start, "training": parent.get("training") or {}}
    return write_spec(spec, net.state_dict(), out_dir)


def _trained_on_mirrors(saved: dict | None, parent: dict | None) -> bool:
    """Whether the segmenter a run without the segmenter stage calibrates learnt on mirrors (``--report-mirror``):
    its checkpoint's fingerprint says (``saved``: the checkpoint as loaded), else (no checkpoint: the parent's
    weights) the parent's training record."""
    import json

    if saved is not None:
        return bool(json.loads(saved.get("fingerprint") or "{}").get("mirror"))
    return bool(((parent or {}).get("training") or {}).get("mirror"))


def training_phrases(data: str, wording: str = "train") -> list[str]:
    """The words the model was trained with, as phrases (``engines.contract.unseen_words`` reads their words)."""
    if data == "report":
        from ..synthetic.report_text import NORMAL_REPORTS, train_vocabulary

        return sorted(train_vocabulary(wording) | set(NORMAL_REPORTS))
    from .cliptnseg_recipe import training_phrases as thyroid

    return thyroid()
