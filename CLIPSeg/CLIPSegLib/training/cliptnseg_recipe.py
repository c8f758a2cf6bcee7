"""CLIP-TNseg's training recipe: contrastive CLIP training on image-phrase pairs, then the segmenter on the frozen
CLIP (both through ``training.loop.run_loop``), presence calibration and export; ``run_training`` runs the stages
of the embedded phantom model (or of a user's data) with checkpoints in a work folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..engines.clip_backbone import build_clip, to_clip_input, tokenize
from .datasets import NORMAL_PHRASES
from ..errors import InputError
from ..options import CONTEXT_SLICES, INPUT_SIZES
from ..synthetic.phantoms import PHRASES
from ..progress import Progress
from .losses import foreground_loss, rival_negative_loss
from .loop import Recipe, check_calibrated_with, check_stage_list, run_loop, staged_presence


def embedded_spec(model_id: str = "cliptnseg-phantom-small", presence_head: bool = False) -> dict:
    """The small architecture of the embedded default model (CLIP ViT 6x128, patch 8, 128 px; text 3x64)."""
    return {
        "id": model_id,
        "engine": "cliptnseg",
        "description": "CLIP-TNseg, small CLIP trained contrastively on CLIPSeg ultrasound-like phantoms, then the "
                       "segmenter trained on (image, mask, phrase) phantom triples. For demos and tests, "
                       "not for clinical use.",
        "license": "Apache-2.0",
        "citation": "Sun et al., CLIP-TNseg, IEEE Signal Processing Letters 2025",
        "clip": {
            "embed_dim": 64,
            "vision_cfg": {"layers": 6, "width": 128, "head_width": 32, "patch_size": 8, "image_size": 128},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
        },
        "network": {"extract_layers": [2, 4, 6], "reduce_dim": 64, "decoder_heads": 4, "coarse_channels": 8,
                    "fine_channels": [8, 16, 32, 64], "head_channels": 16, "presence_head": presence_head},
        # each slice is also predicted mirrored and the two averaged (pipeline.predict_maps): measured fewer false
        # findings on validation volumes for twice the compute (README)
        "inference": {"flip_average": True},
    }


def train_clip(clip, dataset, steps: int, ckpt: Path, batch_size: int = 32, lr: float = 5e-4, seed: int = 0,
               resume: bool = True, ckpt_every: int = 100, progress: Progress | None = None, device="cpu",
               stop_after: int | None = None, start: dict | None = None, precision: str = "fp32") -> list[float]:
    """Contrastive training of both CLIP towers on (image, phrase) pairs; the phrases come from the data.

    Each image is paired with one of the phrases whose mask it contains (at random), or, if it contains none, with
    one of the dataset's ``normal_phrases`` (a dataset without them: the image sits the step out). An image matches a
    text when it contains the text's concept (the dataset's ``concepts``: phrase -> concept, e.g. each phrasing of a
    phantom finding -> the finding; a phrase it does not list is its own concept), so several images may share a
    text: the target of each row/column is uniform over all matching pairs (multi-positive InfoNCE). ``start``: the
    lineage of the weights ``clip`` starts from (``models.lineage``; None: its own), part of the checkpoint's
    fingerprint. Images of another size than the tower's are resized to it."""
    from ..engines.clip_backbone import clip_image_size
    from ..inference.preprocessing import resize_slices

    clip.to(device)
    size = clip_image_size(clip)
    concepts = dict(getattr(dataset, "concepts", None) or {})
    normal = list(getattr(dataset, "normal_phrases", None) or [])
    ctx = clip.context_length

    def loss(batch):
        images, phrases, masks, pair_index = batch
        b = images.shape[0]
        present = masks.flatten(1).amax(1) > 0
        held = [set() for _ in range(b)]  # the concepts each image contains
        options = [[] for _ in range(b)]  # the phrases it may be paired with
        for n, (p, i) in enumerate(zip(phrases, pair_index.tolist())):
            if present[n]:
                held[i].add(concepts.get(p, p))
                options[i].append(p)
        rows, texts, text_concepts = [], [], []
        for i in range(b):
            if options[i]:
                t = options[i][int(torch.randint(len(options[i]), ()))]
                c = concepts.get(t, t)
            elif normal:
                t, c = normal[int(torch.randint(len(normal), ()))], "\0normal"
                held[i].add(c)
            else:
                continue
            rows.append(i)
            texts.append(t)
            text_concepts.append(c)
        if len(rows) < 2:
            return clip.logit_scale * 0.0  # nothing to contrast in this batch
        pos = torch.tensor([[c in held[i] for c in text_concepts] for i in rows], dtype=torch.float32, device=device)
        img_f = clip.encode_image(to_clip_input(resize_slices(images[rows].to(device), size)), normalize=True)
        txt_f = clip.encode_text(tokenize(texts, ctx).to(device), normalize=True)
        logits = clip.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
        loss_i = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(pos.t() / pos.t().sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1).mean()
        return (loss_i + loss_t) / 2

    recipe = Recipe("CLIP contrastive", [{"params": list(clip.parameters()), "lr": lr}], loss, clip.state_dict,
                    clip.load_state_dict, clip.train, weight_decay=0.05,
                    fingerprint={"lr": lr, "parameters": sum(p.numel() for p in clip.parameters()),
                                 **({"start": start} if start else {}),
                                 **({"wording": dataset.wording} if getattr(dataset, "wording", "train") != "train"
                                    else {}),
                                 **({"mirror": True} if getattr(dataset, "mirror", None) else {})})
    return run_loop(recipe, dataset, steps, ckpt, batch_size, seed, resume, ckpt_every, progress, stop_after,
                    precision=precision)


def segmentation_loss(device="cpu"):
    """-> ``loss(logits [N,S,S], target [N,S,S], presence_logits [N] or None) -> scalar``: MONAI Dice on the pairs
    whose finding is present + pixel BCE (positive weight 2) on all pairs + BCE of the presence head against "the
    finding is in this slice". Dice is per (image, prompt) pair, so a few small foci weigh as much as a large nodule
    (a batch-wide Dice let calcifications be ignored); absent pairs are taught by the pixel BCE alone (Dice of an
    empty target either saturates or, smoothed, rewards predicting nothing for the hard findings)."""
    from monai.losses import DiceLoss

    dice_fn = DiceLoss(sigmoid=True, reduction="none")
    bce_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0, device=device))

    def loss(logits, target, presence_logits=None):
        present = target.flatten(1).amax(1) > 0
        value = bce_fn(logits, target)
        if present.any():
            value = value + dice_fn(logits[present][:, None], target[present][:, None]).mean()
        if presence_logits is not None:
            value = value + torch.nn.functional.binary_cross_entropy_with_logits(presence_logits, present.float())
        return value

    return loss


def train_segmenter(net, dataset, steps: int, ckpt: Path, batch_size: int = 12, lr: float = 2e-3, seed: int = 0,
                    resume: bool = True, ckpt_every: int = 100, progress: Progress | None = None,
                    device="cpu", stop_after: int | None = None, validate=None, patience: int | None = None,
                    validate_every: int = 100, rival_weight: float = 0.0, start: dict | None = None,
                    foreground_weight: float = 0.0, precision: str = "fp32",
                    max_grad_norm: float | None = None) -> list[float]:
    """Train the decoder, fine branch and head of a CLIPTNSegNet (CLIP frozen) with ``segmentation_loss``, plus
    ``rival_weight`` x ``losses.rival_negative_loss`` (another finding's pixels as a finding's hard negatives) and
    ``foreground_weight`` x ``losses.foreground_loss`` (each finding's own pixels weighed as a whole).

    ``steps`` is the length of the schedule; ``stop_after`` ends this call early (a checkpoint is written), e.g. to
    split a long run; ``validate``/``patience``: early stop (``run_loop``); ``start``: the lineage of the weights
    ``net`` starts from (``models.lineage``; None: random), part of the checkpoint's fingerprint; ``precision``: fp32
    or bf16 autocast, ``max_grad_norm``: a gradient-norm limit or None (``run_loop``). Returns the loss of every step
    run in this call."""
    net.to(device)
    mask_loss = segmentation_loss(device)
    ctx = net.clip.context_length
    text_cache: dict[str, torch.Tensor] = {}

    def loss(batch):
        images, phrases, masks, pair_index = batch
        new = sorted(set(phrases) - set(text_cache))
        if new:
            for p, e in zip(new, net.encode_text(tokenize(new, ctx).to(device))):
                text_cache[p] = e
        text = torch.stack([text_cache[p] for p in phrases])
        pair_index, masks = pair_index.to(device), masks.to(device)
        logits, presence_logits = net(images.to(device), text, pair_index)
        value = mask_loss(logits, masks, presence_logits)
        if rival_weight:
            value = value + rival_weight * rival_negative_loss(logits, masks, pair_index)
        if foreground_weight:
            value = value + foreground_weight * foreground_loss(logits, masks)
        return value

    params = [p for p in net.parameters() if p.requires_grad]
    recipe = Recipe("segmenter", [{"params": params, "lr": lr}], loss, net.trainable_state_dict,
                    lambda sd: net.load_state_dict(sd, strict=False), net.train, weight_decay=1e-4,
                    fingerprint={"lr": lr, "network": net.cfg,
                                 **({"rival_weight": rival_weight} if rival_weight else {}),
                                 **({"foreground_weight": foreground_weight} if foreground_weight else {}),
                                 **({"start": start} if start else {})})
    return run_loop(recipe, dataset, steps, ckpt, batch_size, seed, resume, ckpt_every, progress, stop_after,
                    validate, validate_every, patience, precision, max_grad_norm)


def _mixed(parts):
    """Datasets concatenated, keeping what ``train_clip`` reads of them: ``concepts`` and ``normal_phrases``."""
    if len(parts) == 1:
        return parts[0]
    data = torch.utils.data.ConcatDataset(parts)
    data.concepts = {k: v for part in parts for k, v in (getattr(part, "concepts", None) or {}).items()}
    data.normal_phrases = tuple(p for part in parts for p in (getattr(part, "normal_phrases", None) or ()))
    return data


def check_output_free(out_dir: Path, model_id: str, force: bool = False) -> None:
    """Refuse (InputError) before any training if exporting ``model_id`` to ``out_dir`` would overwrite a file, unless
    ``force``; a model shipped with CLIPSeg (``Resources/Models``) is named as such. ``model_id`` must be a plain name
    the models folder would list as a spec (no folder, not starting with '.', '_' or 'registry')."""
    from ..models import MODELS_DIR

    if (not model_id or Path(model_id).name != model_id or model_id in (".", "..")
            or model_id.startswith((".", "_", "registry"))):
        raise InputError(f"--model-id {model_id!r} must be a plain name such as 'my-model' (no folder, not starting "
                         f"with '.', '_' or 'registry'); the model is written as <output-dir>/<model-id>.json")
    if force:
        return
    out_dir = Path(out_dir)
    taken = [p for p in (out_dir / f"{model_id}.json", out_dir / f"{model_id}.safetensors") if p.exists()]
    if taken:
        shipped = out_dir.resolve() == MODELS_DIR.resolve()
        what = "a model shipped with CLIPSeg" if shipped else "an existing model"
        raise InputError(f"{taken[0]} is {what}; training would overwrite it. Choose another --output-dir or "
                         f"--model-id, or add --force to replace it deliberately")


def start_staged_run(stages, out_dir, model_id: str, force: bool, work_dir, seed: int,
                     progress: Progress | None) -> tuple[Path, Progress]:
    """What a staged training run (this recipe's, ``medclipsam_recipe``'s) does before any stage: refuse an export
    that would overwrite a model (``check_output_free``), make ``work_dir``, seed everything (MONAI
    ``set_determinism``). -> (work_dir as a Path, the progress reporter: a bar by default)."""
    from monai.utils import set_determinism

    if "export" in stages:
        check_output_free(out_dir, model_id, force)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    return work_dir, progress or Progress("bar")


def training_phrases(data_csv: Path | None = None) -> list[str]:
    """Every phrase the recipe trains on (phantom phrasings, normal-tissue phrases, a CSV's phrases): the model's
    vocabulary, recorded in its spec so a prompt's unseen words can be named (``engines.contract.unseen_words``)."""
    from ..io.tables import read_table

    phrases = {p for ps in PHRASES.values() for p in ps} | set(NORMAL_PHRASES)
    if data_csv is not None:
        phrases |= {r["phrase"] for r in read_table(data_csv)}
    return sorted(phrases)


STAGES = ("clip", "segmenter", "calibrate", "export")


def check_train_args(stages, counts: dict, tables: dict) -> tuple:
    """Refuse (InputError) before any work: an unknown stage, a count below its minimum or NaN (``counts``: option ->
    (value, minimum)), a table that ``io.tables.read_table`` refuses (missing, without the columns image,mask,phrase,
    an empty cell, a file it names that does not exist; ``tables``: option -> path or None). Returns the stages as a
    tuple."""
    from ..io.tables import read_table

    stages = check_stage_list(stages, STAGES, None, "calibrate,export")
    for option, (value, minimum) in counts.items():
        if value != value:  # NaN passes every comparison
            raise InputError(f"{option} nan: give a number of at least {minimum}")
        if value < minimum:
            raise InputError(f"{option} {value}: must be at least {minimum}")
    for option, path in tables.items():
        if path is None:
            continue
        read_table(path, files=("image", "mask"), name=f"{option} {path}")
    return stages


FINE_LEVELS = range(2, 7)  # levels of the fine branch's U-Net --fine-channels may give
FINE_MAX_CHANNELS = 512


def check_levels(fine_channels: list, input_size: int | None) -> None:
    """InputError when the fine branch's levels (``fine_channels``, given or a parent's) halve an ``input_size``
    slice (None: the recipe's CLIP size) below 2 pixels at the deepest (instance norm needs more than one)."""
    size = input_size or embedded_spec()["clip"]["vision_cfg"]["image_size"]
    if size < 2 ** len(fine_channels):
        raise InputError(f"--fine-channels {','.join(map(str, fine_channels))}: {len(fine_channels)} levels halve a "
                         f"{size}-pixel slice {len(fine_channels) - 1} times, to less than 2 pixels at the deepest; "
                         f"give fewer levels or a larger --input-size")


def check_train_shape(input_size: int | None, slice_vote: int, context_slices: int = 0,
                      fine_channels: list | None = None) -> None:
    """Refuse (InputError) before any work an ``--input-size`` the fine branch cannot take, an even or
    non-positive ``--slice-vote``, a ``--context-slices`` outside ``options.CONTEXT_SLICES`` or ``--fine-channels``
    outside ``FINE_LEVELS`` levels of 1 to ``FINE_MAX_CHANNELS`` channels or with more levels than the slice size
    allows (``check_levels``)."""
    if fine_channels is not None and not (FINE_LEVELS[0] <= len(fine_channels) <= FINE_LEVELS[-1]
                                          and all(1 <= c <= FINE_MAX_CHANNELS for c in fine_channels)):
        raise InputError(f"--fine-channels {','.join(map(str, fine_channels))}: give {FINE_LEVELS[0]} to "
                         f"{FINE_LEVELS[-1]} channel counts of 1 to {FINE_MAX_CHANNELS}, separated by commas, one per "
                         f"level of the fine branch (the embedded models': 8,16,32,64)")
    if fine_channels is not None:
        check_levels(fine_channels, input_size)
    if context_slices not in CONTEXT_SLICES:
        raise InputError(f"--context-slices {context_slices}: give 0 (the slice alone) to {CONTEXT_SLICES[-1]} "
                         f"neighbouring slices on each side; 1 reads each slice with the one before and the one "
                         f"after")
    if input_size is not None and input_size not in INPUT_SIZES:
        raise InputError(f"--input-size {input_size}: give a multiple of 32 pixels from 32 to 1024 (e.g. 256), or "
                         f"leave it out for the CLIP's own 128")
    if slice_vote < 1 or slice_vote % 2 == 0:
        raise InputError(f"--slice-vote {slice_vote}: give an odd number of slices (1: off, 3: each slice and its "
                         f"two neighbours)")


def _checkpoint(path: Path, stage: str) -> dict:
    """The weights of a stage's checkpoint; InputError naming the stage to run when it is missing."""
    if not path.is_file():
        raise InputError(f"no {stage} checkpoint {path}: run the {stage!r} stage first (--stages {stage},...) or give "
                         f"the --work-dir that holds it")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def warm_start(init_from: str, spec: dict, fine_channels: list | None = None, seed: int = 0) -> tuple[dict, dict]:
    """The model a run starts from (``--init-from``): -> (its verified spec, its weights as a state dict of
    ``CLIPTNSegNet``: ``clip.*`` and the segmenter's). It must be a cliptnseg model of the recipe's architecture
    (``spec``'s clip and network) without fine-tuned extras (learned phrases, a kept parent network); else
    InputError naming what differs. A network that reads more (``context_slices`` from 0) or is wider
    (``fine_channels``, as many levels) starts as the parent (``network.widen_from``; the new channels drawn with
    ``seed``). ``fine_channels`` None: the parent's, written into ``spec``."""
    from ..engines.cliptnseg.engine import PARENT_KEY
    from ..engines.cliptnseg.network import DEFAULT_NETWORK, CLIPTNSegNet, narrower, widen_from
    from ..models import load_parent, load_weights

    parent = load_parent(init_from, spec, ("clip",), "the embedded cliptnseg-phantom-small")
    if parent.get("learned_phrases") or parent.get(PARENT_KEY):
        raise InputError(f"--init-from {init_from} is a fine-tuned model (learned phrases or a kept parent network); "
                         f"start from the model it was fine-tuned from, or fine-tune it further with 'clipseg "
                         f"finetune'")
    parent_network = parent.get("network") or {}
    old_fc = list(parent_network.get("fine_channels", DEFAULT_NETWORK["fine_channels"]))
    new_fc = spec["network"]["fine_channels"] = list(old_fc if fine_channels is None else fine_channels)
    check_levels(new_fc, spec["network"].get("input_size"))
    context = spec["network"].get("context_slices", 0)
    if parent_network.get("context_slices", 0) not in (0, context):
        n = parent_network["context_slices"]
        raise InputError(f"--init-from {init_from} reads {n} neighbouring slice{'s' if n > 1 else ''} on each side; "
                         f"give --context-slices {n} (a model that reads none can be widened to read neighbours, "
                         f"not the other way)")
    # as many levels, none narrower; MONAI's U-Net has a residual convolution at the bottom only where its two
    # deepest widths differ, so both networks must have one or neither
    if (len(old_fc) != len(new_fc) or any(n < o for o, n in zip(old_fc, new_fc))
            or (old_fc[-2] == old_fc[-1]) != (new_fc[-2] == new_fc[-1])):
        raise InputError(f"--fine-channels {','.join(map(str, new_fc))}: --init-from {init_from} has fine channels "
                         f"{','.join(map(str, old_fc))}; give as many levels, none narrower, the deepest two equal "
                         f"only where they are equal in it (or leave --fine-channels out to keep its own)")
    state = load_weights(parent)
    torch.manual_seed(seed)  # the new channels' first weights
    net = CLIPTNSegNet(build_clip(spec["clip"]), spec["network"])
    own = net.state_dict()
    differ = sorted(set(own) ^ set(state)) or [k for k, v in state.items()
                                               if v.shape != own[k].shape and not narrower(k, v, own[k])]
    if differ:  # e.g. a presence head on one side only, or other head or coarse channel counts
        raise InputError(f"--init-from {init_from}: its network is not the recipe's {spec['network']} (first "
                         f"difference: {differ[0]}); give --presence-head exactly when it has one, and "
                         f"--context-slices as it has (or more when it reads none)")
    state = widen_from(state, net, parent_network)  # new inputs and channels start at zero
    return parent, state


def run_training(out_dir: Path, work_dir: Path, model_id: str = "cliptnseg-phantom-small", n_phantoms: int = 2000,
                 clip_steps: int = 300, seg_steps: int = 3000, data_csv: Path | None = None, seed: int = 0,
                 stages=("clip", "segmenter", "calibrate", "export"), resume: bool = True,
                 calibration_volumes: int = 24, progress: Progress | None = None, device="cpu",
                 command: str = "", presence_head: bool = False, n_volumes: int = 0,
                 force: bool = False, calibration_csv: Path | None = None, family: str = "A",
                 rival_weight: float = 0.0, init_from: str | None = None,
                 foreground_weight: float = 0.0, precision: str = "fp32",
                 max_grad_norm: float | None = None, input_size: int | None = None,
                 slice_vote: int = 1, context_slices: int = 0,
                 fine_channels: list | None = None) -> Path | None:
    """The whole recipe of a model: phantom bank -> CLIP contrastive -> segmenter -> presence calibration -> export.

    ``init_from`` (a model id or spec path, ``warm_start``): continue that model instead of starting from random
    weights: the "clip" stage, if run, starts from its CLIP (else its CLIP is kept as it is), the "segmenter" stage
    from its segmenter, and the spec records it as the parent (id, weights SHA-256, its training). A checkpoint in
    ``work_dir`` still takes precedence (resume).

    ``family``: the phantom family of the training bank and the calibration volumes ("A", "B" or the mixture "A+B",
    ``synthetic.families``). ``rival_weight``, ``foreground_weight``: ``train_segmenter``'s (0: the embedded model's
    recipe). ``precision``: fp32 or bf16 autocast of the training steps, ``max_grad_norm``: the segmenter stage's
    gradient-norm limit (``loop.run_loop``; None: none). ``input_size``: the slice size in pixels the fine branch and
    head work at (network ``input_size``; None: the CLIP's own, 128), the training bank drawn at it; the CLIP sees
    the slices resized to its own size. ``slice_vote``: the spec's ``inference.slice_vote`` (odd; 1: off), set
    before the calibration so the rule judges the voted maps. ``context_slices``: the network's (neighbouring
    slices on each side the fine branch reads; from a parent that reads none, its weights widened at zero:
    ``network.widen_from``); the CLIP stage still sees single slices. ``fine_channels``: the fine branch's channels
    per level (None: the parent's with ``init_from``, else the embedded model's); from a narrower parent of the same
    depth, its channels keep their weights and read the new ones (drawn with ``seed``) through zeros
    (``network.widen_from``).

    CLIP is trained on the ``n_phantoms`` 2D phantoms; the segmenter on those plus the slices of ``n_volumes`` 3D
    phantoms. Stages read and write checkpoints in ``work_dir`` so each can be re-run alone. Returns the spec path
    if exported. An export that would overwrite ``out_dir/<model_id>.{json,safetensors}`` is refused before any work
    unless ``force`` (``check_output_free``)."""
    from .datasets import FolderTriples, PhantomBank
    from ..engines.cliptnseg.network import CLIPTNSegNet
    from ..models import clip_part, lineage

    check_train_shape(input_size, slice_vote, context_slices, fine_channels)
    spec = embedded_spec(model_id, presence_head)
    if fine_channels is not None:
        spec["network"]["fine_channels"] = [int(c) for c in fine_channels]  # with init_from: warm_start checks them
    if input_size is not None and input_size != spec["clip"]["vision_cfg"]["image_size"]:
        spec["network"]["input_size"] = int(input_size)
    if slice_vote != 1:
        spec["inference"]["slice_vote"] = int(slice_vote)
    if context_slices:
        spec["network"]["context_slices"] = int(context_slices)
    parent, parent_state = warm_start(init_from, spec, fine_channels, seed) if init_from else (None, None)
    start = lineage(parent) if parent is not None else None  # in the checkpoints' fingerprint and the spec
    work_dir, progress = start_staged_run(stages, out_dir, model_id, force, work_dir, seed, progress)
    size = spec["network"].get("input_size") or spec["clip"]["vision_cfg"]["image_size"]
    bank = None
    if {"clip", "segmenter"} & set(stages):
        bank = PhantomBank(n_phantoms, size, n_prompts=3, family=family,
                           progress=lambda d, t: progress.update("phantoms", d, t))
    clip = build_clip(spec["clip"])
    if parent_state is not None:
        clip.load_state_dict(clip_part(parent_state))
    clip_ckpt = work_dir / "clip.pt"
    user = FolderTriples(data_csv, size) if data_csv is not None and {"clip", "segmenter"} & set(stages) else None
    if "clip" in stages:  # the user's phrases are learnt by the text tower too, not only by the segmenter
        clip_data = _mixed([bank, user]) if user is not None else bank
        train_clip(clip, clip_data, clip_steps, clip_ckpt, seed=seed, resume=resume, progress=progress,
                   device=device, start=start, precision=precision)
    if parent is None or clip_ckpt.is_file():
        clip.load_state_dict(_checkpoint(clip_ckpt, "clip"))
    net = CLIPTNSegNet(clip, spec["network"])
    if parent_state is not None:
        net.load_state_dict({k: v for k, v in parent_state.items() if not k.startswith("clip.")}, strict=False)
    seg_ckpt = work_dir / "segmenter.pt"
    if "segmenter" in stages:
        bank.n_prompts = 2  # two of the three findings per image: 3 would cost ~1.9x per step on CPU
        bank.context = context_slices  # the CLIP stage read single slices; the fine branch reads neighbours too
        parts = [bank]
        if n_volumes:  # the 2D bank is reused; only the volume slices are generated here
            parts.append(PhantomBank(0, size, n_prompts=2, volumes=n_volumes, family=family,
                                     progress=lambda d, t: progress.update("volume phantoms", d, t),
                                     context=context_slices))
        if user is not None:
            user.context = context_slices
            parts.append(user)
        data = _mixed(parts)
        train_segmenter(net, data, seg_steps, seg_ckpt, seed=seed, resume=resume, progress=progress, device=device,
                        rival_weight=rival_weight, start=start, foreground_weight=foreground_weight,
                        precision=precision, max_grad_norm=max_grad_norm)
    if not {"calibrate", "export"} & set(stages):  # e.g. --stages clip: nothing reads the segmenter here
        return None
    if parent is None or seg_ckpt.is_file():
        net.load_state_dict(_checkpoint(seg_ckpt, "segmenter"), strict=False)
    net.eval()
    def calibrate():
        from .calibration import calibrate_presence

        return calibrate_presence(net, n_volumes=calibration_volumes, progress=progress, device=device,
                                  inference=spec["inference"], table_csv=calibration_csv,
                                  family=family)

    presence = staged_presence(work_dir, stages, calibrate)
    if presence is None:
        return None
    check_calibrated_with(presence, "slice_vote", slice_vote, 1, work_dir, lambda v: f"with --slice-vote {v}")
    from ..models import write_spec

    spec["presence"] = presence
    if data_csv is None:  # a model trained on phantoms only says so; with a user's data its domain is not known here
        from ..inference.domain import phantom_domain

        spec["domain"] = phantom_domain(size, family=family)
    clip_kept = parent is not None and not clip_ckpt.is_file()  # the parent's CLIP, not trained here
    spec["training"] = {"command": command, "family": family, "n_phantoms": n_phantoms, "n_volumes": n_volumes,
                        "clip_steps": 0 if clip_kept else clip_steps,
                        "segmenter_steps": seg_steps, "rival_weight": rival_weight,
                        "foreground_weight": foreground_weight, "precision": precision,
                        "seed": seed, "data_csv": str(data_csv) if data_csv else None,
                        "phrases": training_phrases(data_csv)}
    if max_grad_norm is not None:
        spec["training"]["max_grad_norm"] = max_grad_norm
    if parent is not None:
        spec["training"]["parent"] = {**start, "training": parent.get("training") or {}}
    return write_spec(spec, net.state_dict(), out_dir)

