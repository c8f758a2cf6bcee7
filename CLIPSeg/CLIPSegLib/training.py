"""Training: contrastive CLIP fine-tuning on image-phrase pairs, then the CLIP-TNseg segmenter on a frozen CLIP.

Both stages use AdamW with a cosine schedule, save a checkpoint every ``ckpt_every`` steps (atomic rename) and resume
from it. Checkpoints are plain dicts of tensors and numbers, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .clip_backbone import build_clip, to_clip_input, tokenize
from .datasets import NORMAL_PHRASES, collate
from .errors import InputError
from .phantoms import FINDINGS, PHRASES
from .progress import Progress


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


def _cosine(opt, steps):
    # 5% warm-up; short runs warm up for 30% (OneCycleLR divides by zero when the warm-up is exactly one step)
    pct = 0.05 if steps >= 60 else 0.3
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps,
                                               pct_start=pct, anneal_strategy="cos")


def _save(path: Path, **state):
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: Path, model, opt, sched, resume: bool, load_model) -> int:
    if not (resume and path.is_file()):
        return 0
    ck = torch.load(path, map_location="cpu", weights_only=True)
    load_model(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    return int(ck["step"])


def _batches(dataset, batch_size: int, seed: int):
    """Endless shuffled batches; shuffling seeded so a run is repeatable. Only full batches are used, so a dataset
    smaller than one batch is an error (it would otherwise wait forever for a batch)."""
    if len(dataset) < batch_size:
        raise InputError(f"the training data has {len(dataset)} samples, fewer than one batch of {batch_size}; "
                         f"add images (or phantoms with --phantoms) or lower the batch size")
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(dataset), generator=g).split(batch_size):
            if len(idx) == batch_size:
                yield collate([dataset[int(i)] for i in idx])


def train_clip(clip, dataset, steps: int, ckpt: Path, batch_size: int = 32, lr: float = 5e-4, seed: int = 0,
               resume: bool = True, ckpt_every: int = 100, progress: Progress | None = None, device="cpu") -> None:
    """Contrastive training of both CLIP towers on (image, phrase) pairs from a PhantomBank-like dataset.

    Each image is paired with one phrase of a finding it contains ("normal thyroid tissue" if none). Several images
    share a finding, so the target of each row/column is uniform over all matching pairs (multi-positive InfoNCE)."""
    progress = progress or Progress("none")
    clip.to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.05)
    sched = _cosine(opt, steps)
    step = _resume(ckpt, clip, opt, sched, resume, clip.load_state_dict)
    torch.manual_seed(seed + step)
    batches = _batches(dataset, batch_size, seed + step)
    ctx = clip.context_length
    while step < steps:
        images, phrases, masks, pair_index = next(batches)
        b = images.shape[0]
        if len(phrases) != b * len(FINDINGS):
            raise ValueError("train_clip needs every finding's mask per image (PhantomBank with n_prompts=3)")
        present = masks.flatten(1).amax(1).view(b, len(FINDINGS)) > 0  # [B, F]
        labels, texts = [], []
        for i in range(b):
            found = present[i].nonzero().flatten().tolist()
            if found:
                f = found[int(torch.randint(len(found), ()))]
                texts.append(PHRASES[FINDINGS[f]][int(torch.randint(len(PHRASES[FINDINGS[f]]), ()))])
                labels.append(f)
            else:
                texts.append(NORMAL_PHRASES[int(torch.randint(len(NORMAL_PHRASES), ()))])
                labels.append(-1)
        labels = torch.tensor(labels)
        # pos[i, j]: image i contains the finding named by text j (or both are normal)
        present_n = torch.cat([present, ~present.any(1, keepdim=True)], 1)  # normal as last column
        lab_col = torch.where(labels < 0, torch.full_like(labels, len(FINDINGS)), labels)
        pos = present_n[:, lab_col].float().to(device)
        img_f = clip.encode_image(to_clip_input(images.to(device)), normalize=True)
        txt_f = clip.encode_text(tokenize(texts, ctx).to(device), normalize=True)
        logits = clip.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
        loss_i = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(pos.t() / pos.t().sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        progress.update("CLIP contrastive", step, steps, f"loss {loss.item():.3f}")
        if step % ckpt_every == 0 or step == steps:
            _save(ckpt, step=step, model=clip.state_dict(), opt=opt.state_dict(), sched=sched.state_dict())
    clip.eval()


def train_segmenter(net, dataset, steps: int, ckpt: Path, batch_size: int = 12, lr: float = 2e-3, seed: int = 0,
                    resume: bool = True, ckpt_every: int = 100, progress: Progress | None = None,
                    device="cpu", stop_after: int | None = None) -> list[float]:
    """Train the decoder, fine branch and head of a CLIPTNSegNet (CLIP frozen): MONAI Dice on pairs whose finding is
    present + pixel BCE on all pairs + BCE of the presence head against "the finding is in this slice".

    ``steps`` is the length of the schedule; ``stop_after`` ends this call early (a checkpoint is written), e.g. to
    split a long run. Returns the loss of every step run in this call."""
    from monai.losses import DiceLoss

    progress = progress or Progress("none")
    net.to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = _cosine(opt, steps)
    step = _resume(ckpt, net, opt, sched, resume, lambda sd: net.load_state_dict(sd, strict=False))
    torch.manual_seed(seed + step)
    batches = _batches(dataset, batch_size, seed + step)
    # Dice per (image, prompt) pair over the pairs whose finding is present, so a few small foci weigh as much as a
    # large nodule (a batch-wide Dice let calcifications be ignored); absent pairs are taught by the pixel BCE alone
    # (Dice of an empty target either saturates or, smoothed, rewards predicting nothing for the hard findings).
    dice_fn = DiceLoss(sigmoid=True, reduction="none")
    bce_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0, device=device))

    def loss_fn(logits, presence_logits, target):
        present = target.flatten(1).amax(1) > 0
        loss = bce_fn(logits, target)
        if present.any():
            loss = loss + dice_fn(logits[present][:, None], target[present][:, None]).mean()
        if presence_logits is not None:
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(presence_logits, present.float())
        return loss

    ctx = net.clip.context_length
    text_cache: dict[str, torch.Tensor] = {}
    losses = []
    end = steps if stop_after is None else min(steps, step + stop_after)
    while step < end:
        images, phrases, masks, pair_index = next(batches)
        new = sorted(set(phrases) - set(text_cache))
        if new:
            for p, e in zip(new, net.encode_text(tokenize(new, ctx).to(device))):
                text_cache[p] = e
        text = torch.stack([text_cache[p] for p in phrases])
        logits, presence_logits = net(images.to(device), text, pair_index.to(device))
        loss = loss_fn(logits, presence_logits, masks.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        progress.update("segmenter", step, end, f"loss {loss.item():.3f}")
        if step % ckpt_every == 0 or step == end:
            _save(ckpt, step=step, model=net.trainable_state_dict(), opt=opt.state_dict(), sched=sched.state_dict())
    net.eval()
    return losses


def check_output_free(out_dir: Path, model_id: str, force: bool = False) -> None:
    """Refuse (InputError) before any training if exporting ``model_id`` to ``out_dir`` would overwrite a file, unless
    ``force``; a model shipped with CLIPSeg (``Resources/Models``) is named as such. ``model_id`` must be a plain name
    the models folder would list as a spec (no folder, not starting with '.', '_' or 'registry')."""
    from .models import MODELS_DIR

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


def training_phrases(data_csv: Path | None = None) -> list[str]:
    """Every phrase the recipe trains on (phantom phrasings, normal-tissue phrases, a CSV's phrases): the model's
    vocabulary, recorded in its spec so a prompt's unseen words can be named (``pipeline.unseen_words``)."""
    import csv

    phrases = {p for ps in PHRASES.values() for p in ps} | set(NORMAL_PHRASES)
    if data_csv is not None:
        with open(data_csv, newline="") as f:
            phrases |= {r["phrase"].strip() for r in csv.DictReader(f) if r.get("phrase")}
    return sorted(phrases)


def run_training(out_dir: Path, work_dir: Path, model_id: str = "cliptnseg-phantom-small", n_phantoms: int = 2000,
                 clip_steps: int = 300, seg_steps: int = 3000, data_csv: Path | None = None, seed: int = 0,
                 stages=("clip", "segmenter", "calibrate", "export"), resume: bool = True,
                 calibration_volumes: int = 24, progress: Progress | None = None, device="cpu",
                 command: str = "", presence_head: bool = False, n_volumes: int = 0,
                 force: bool = False) -> Path | None:
    """The whole recipe of a model: phantom bank -> CLIP contrastive -> segmenter -> presence calibration -> export.

    CLIP is trained on the ``n_phantoms`` 2D phantoms; the segmenter on those plus the slices of ``n_volumes`` 3D
    phantoms. Stages read and write checkpoints in ``work_dir`` so each can be re-run alone. Returns the spec path
    if exported. An export that would overwrite ``out_dir/<model_id>.{json,safetensors}`` is refused before any work
    unless ``force`` (``check_output_free``)."""
    import json

    from monai.utils import set_determinism

    from .datasets import FolderTriples, PhantomBank
    from .engines.cliptnseg import CLIPTNSegNet

    if "export" in stages:
        check_output_free(out_dir, model_id, force)
    progress = progress or Progress("bar")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    spec = embedded_spec(model_id, presence_head)
    size = spec["clip"]["vision_cfg"]["image_size"]
    bank = None
    if {"clip", "segmenter"} & set(stages):
        bank = PhantomBank(n_phantoms, size, n_prompts=3, progress=lambda d, t: progress.update("phantoms", d, t))
    clip = build_clip(spec["clip"])
    clip_ckpt = work_dir / "clip.pt"
    if "clip" in stages:
        train_clip(clip, bank, clip_steps, clip_ckpt, seed=seed, resume=resume, progress=progress, device=device)
    clip.load_state_dict(torch.load(clip_ckpt, map_location="cpu", weights_only=True)["model"])
    net = CLIPTNSegNet(clip, spec["network"])
    seg_ckpt = work_dir / "segmenter.pt"
    if "segmenter" in stages:
        bank.n_prompts = 2  # two of the three findings per image: 3 would cost ~1.9x per step on CPU
        parts = [bank]
        if n_volumes:  # the 2D bank is reused; only the volume slices are generated here
            parts.append(PhantomBank(0, size, n_prompts=2, volumes=n_volumes,
                                     progress=lambda d, t: progress.update("volume phantoms", d, t)))
        if data_csv is not None:
            parts.append(FolderTriples(data_csv, size))
        data = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        train_segmenter(net, data, seg_steps, seg_ckpt, seed=seed, resume=resume, progress=progress, device=device)
    net.load_state_dict(torch.load(seg_ckpt, map_location="cpu", weights_only=True)["model"], strict=False)
    net.eval()
    presence_path = work_dir / "presence.json"
    if "calibrate" in stages:
        from .calibration import calibrate_presence

        presence = calibrate_presence(net, n_volumes=calibration_volumes, progress=progress, device=device,
                                      flip_average=spec["inference"]["flip_average"])
        presence_path.write_text(json.dumps(presence, indent=2), encoding="utf-8")
    if "export" not in stages:
        return None
    from .models import write_spec

    spec["presence"] = json.loads(presence_path.read_text(encoding="utf-8"))
    if data_csv is None:  # a model trained on phantoms only says so; with a user's data its domain is not known here
        from .domain import phantom_domain

        spec["domain"] = phantom_domain(size)
    spec["training"] = {"command": command, "n_phantoms": n_phantoms, "n_volumes": n_volumes, "clip_steps": clip_steps,
                        "segmenter_steps": seg_steps, "seed": seed, "data_csv": str(data_csv) if data_csv else None,
                        "phrases": training_phrases(data_csv)}
    return write_spec(spec, net.state_dict(), out_dir)
