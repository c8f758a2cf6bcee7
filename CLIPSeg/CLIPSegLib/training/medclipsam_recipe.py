"""MedCLIP-SAM's embedded phantom model: a small SAM (``segment_anything``'s own classes at ``SAM_SMALL`` sizes)
trained on phantom box -> mask pairs through the one training loop (``training.loop.run_loop``), the CLIP reused
frozen from a cliptnseg model (its ``clip.`` tensors, listed among the spec's files with their SHA-256, not copied),
the presence rule calibrated on phantom volumes (``medclipsam_calibration``), then export.

A box is the bounding box of a finding's mask (all its components: a few foci make one box, as one saliency blob
would) with each side moved at random by up to ``JITTER`` of the box's size (saliency boxes are loose), plus per
image one negative box that touches no finding, whose target is the empty mask and whose IoU target is 0, so SAM's
IoU head learns to say "nothing here" (the engine's ``min_sam_iou`` drops such boxes). Loss: MONAI DiceCE on the
masks (sigmoid) + the mean squared error of SAM's IoU head against the IoU its mask really reached, as SAM is
trained. The SAM sees only phantom masks; the text side (CLIP, saliency) never sees a mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..progress import Progress
from .loop import Recipe, check_stage_list, run_loop, staged_presence

# 128 px input (the phantom CLIP's), 8 px patches: a 16 x 16 embedding grid; about 0.6 M parameters
SAM_SMALL = {"embed_dim": 64, "depth": 4, "num_heads": 4, "global_attn_indexes": [1, 3], "image_size": 128,
             "patch_size": 8, "prompt_dim": 64, "window_size": 8, "mlp_dim": 256, "decoder_heads": 4}
JITTER = 0.3  # each box side moves by up to this fraction of the box's width / height (uniform): saliency boxes of
# 8-px patches miss a 20-px finding by a quarter of its size
CLIP_FROM = "cliptnseg-phantom-small"
STAGES = ("sam", "calibrate", "export")
# 4 images a step, phantoms not augmented (box jitter and the phantoms' own variety only): MONAI's augmentation cost
# ~0.1 s a sample, more than the SAM step itself, on the 2 CPU cores the embedded model is trained on
BATCH, AUGMENT = 4, False
BOXES = 3  # boxes per slice and prompt the occlusion choice picks from


def embedded_spec(model_id: str = "medclipsam-phantom-small", clip_from: str = CLIP_FROM) -> dict:
    """The spec of the embedded MedCLIP-SAM model (without presence rule and files): the ``clip_from`` model's CLIP
    config (and its presence_clip, if any), the small SAM, the ``clip_from`` model's saliency settings if it is a
    medclipsam model (e.g. one made by ``clipseg finetune-clip``: patch_similarity, slice presence from the patches
    or the presence CLIP) over gradcam (gScoreCAM costs ~300 image passes per slice and prompt and localised no better
    on phantoms: README), up to ``BOXES`` boxes per slice and prompt of which the occlusion choice keeps one
    (``saliency.occlusion``: the one whose region holds the slice's presence; README, fiftieth session), a 3-slice
    vote."""
    from ..models import load_spec

    source = load_spec(clip_from)
    clip = source["clip"]
    saliency = {"method": "gradcam", "occlusion": True,
                **((source.get("saliency") or {}) if source["engine"] == "medclipsam" else {})}
    return {
        "id": model_id,
        "engine": "medclipsam",
        "description": f"MedCLIP-SAM zero-shot: the CLIP of {source['id']} gives text saliency -> box"
                       + (f", the CLIP of {source['presence_clip']['model']} whether a slice holds the finding"
                          if (source.get("presence_clip") or {}).get("model") else "")
                       + "; a small SAM trained on phantom box -> mask pairs segments it. For demos and tests, not "
                         "for clinical use.",
        "license": "Apache-2.0",
        "citation": "Koleilat et al., MedCLIP-SAM, MICCAI 2024",
        "clip": dict(clip),
        **({"presence_clip": dict(source["presence_clip"])} if source.get("presence_clip") else {}),
        "sam": {"type": dict(SAM_SMALL), "normalize": "sam"},
        "saliency": saliency,
        "boxes": {"split": "otsu", "min_area": 16, "max_boxes": BOXES},
        "inference": {"slice_vote": 3},
    }


def box_of(mask: torch.Tensor, jitter: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask ``[H,W]`` (non-empty) -> its bounding box XYXY in pixels (inclusive), each side moved by a uniform
    fraction in [-jitter, jitter] of the box's width (x) or height (y), clipped to the slice. ``[4]`` float32."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if not len(ys):
        raise InputError("box_of: the mask is empty; a box needs at least one foreground pixel")
    box = torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float32)
    size = torch.stack([box[2] - box[0] + 1, box[3] - box[1] + 1]).repeat(2)
    box = box + (torch.rand(4, generator=generator) * 2 - 1) * jitter * size
    h, w = mask.shape
    box = torch.stack([box[0].clamp(0, w - 1), box[1].clamp(0, h - 1), box[2].clamp(0, w - 1), box[3].clamp(0, h - 1)])
    return torch.stack([torch.minimum(box[0], box[2]), torch.minimum(box[1], box[3]),
                        torch.maximum(box[0], box[2]), torch.maximum(box[1], box[3])])


def negative_box(masks: torch.Tensor, generator: torch.Generator | None = None, tries: int = 20):
    """A random box ``[4]`` XYXY (8..S/3 px a side) that touches none of ``masks`` ``[N,H,W]``, or None."""
    h, w = masks.shape[-2:]
    anything = masks.amax(0) > 0.5 if len(masks) else torch.zeros(h, w, dtype=torch.bool)
    for _ in range(tries):
        bw, bh = (torch.randint(8, max(9, w // 3), (2,), generator=generator)).tolist()
        x0 = int(torch.randint(0, w - bw, (), generator=generator))
        y0 = int(torch.randint(0, h - bh, (), generator=generator))
        if not anything[y0:y0 + bh, x0:x0 + bw].any():
            return torch.tensor([x0, y0, x0 + bw - 1, y0 + bh - 1], dtype=torch.float32)
    return None


def sam_loss_fn(sam, jitter: float = JITTER, device="cpu"):
    """-> ``loss(batch)`` for ``run_loop``: the SAM's masks for jittered truth boxes (and a negative box per image)
    of a ``datasets.collate`` batch, scored with MONAI DiceCE + MSE of the IoU head (module docstring)."""
    from monai.losses import DiceCELoss

    from ..engines.medclipsam.sam import SamSegmenter

    dice_ce = DiceCELoss(sigmoid=True)
    front = SamSegmenter(sam)  # its ``prepare``: the same resizing and normalisation as at run time

    def loss(batch):
        images, _, masks, pair_index = batch
        size = tuple(images.shape[-2:])
        embeddings = sam.image_encoder(front.prepare(images.to(device)))
        logits, ious, targets = [], [], []
        for i in range(images.shape[0]):
            own = masks[pair_index == i]
            present = own[own.flatten(1).amax(1) > 0]
            boxes = [box_of(m, jitter) for m in present]
            target = list(present)
            neg = negative_box(own)
            if neg is not None:
                boxes.append(neg)
                target.append(torch.zeros(size))
            if not boxes:
                continue
            boxes = torch.stack(boxes).to(device)
            sparse, dense = sam.prompt_encoder(points=None, boxes=front.resize.apply_boxes_torch(boxes, size),
                                               masks=None)
            low, iou = sam.mask_decoder(image_embeddings=embeddings[i:i + 1],
                                        image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=False)
            logits.append(sam.postprocess_masks(low, front.resize.get_preprocess_shape(*size, front.image_size),
                                                size))
            ious.append(iou[:, 0])
            targets.append(torch.stack(target).to(device))
        logits, ious, target = torch.cat(logits), torch.cat(ious), torch.cat(targets)[:, None]
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & (target > 0.5)).flatten(1).sum(1)
            union = (pred | (target > 0.5)).flatten(1).sum(1)
            reached = torch.where(target.flatten(1).amax(1) > 0, inter / union.clamp_min(1), torch.zeros_like(ious))
        return dice_ce(logits, target) + F.mse_loss(ious, reached)

    return loss


def train_sam(sam, dataset, steps: int, ckpt: Path, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
              resume: bool = True, ckpt_every: int = 100, progress: Progress | None = None, device="cpu",
              stop_after: int | None = None, jitter: float = JITTER, precision: str = "fp32") -> list[float]:
    """Train every part of the SAM (image encoder, prompt encoder, mask decoder) on ``dataset`` (``datasets``
    samples; boxes made from its masks) through ``run_loop`` (``precision``: fp32 or bf16 autocast). Returns the loss
    of every step run in this call."""
    sam.to(device)
    recipe = Recipe("SAM box -> mask", [{"params": list(sam.parameters()), "lr": lr}], sam_loss_fn(sam, jitter, device),
                    sam.state_dict, sam.load_state_dict, sam.train, weight_decay=1e-4,
                    fingerprint={"lr": lr, "jitter": jitter, "parameters": sum(p.numel() for p in sam.parameters())})
    return run_loop(recipe, dataset, steps, ckpt, batch_size, seed, resume, ckpt_every, progress, stop_after,
                    precision=precision)


def check_stages(stages) -> tuple:
    return check_stage_list(stages, STAGES, "medclipsam")


def run_medclipsam_training(out_dir: Path, work_dir: Path, model_id: str = "medclipsam-phantom-small",
                            n_phantoms: int = 1000, n_volumes: int = 20, steps: int = 1500, seed: int = 0,
                            stages=STAGES, resume: bool = True, calibration_volumes: int = 24,
                            progress: Progress | None = None, device="cpu", command: str = "", force: bool = False,
                            clip_from: str = CLIP_FROM, family: str = "A", precision: str = "fp32") -> Path | None:
    """The embedded MedCLIP-SAM model's recipe: SAM on phantom box -> mask pairs (``n_phantoms`` 2D phantoms plus
    the slices of ``n_volumes`` volumes, of ``family``) -> calibration of the presence rule on
    ``calibration_volumes`` phantom volumes (calibration seeds) -> export of ``out_dir/<model_id>.{json,safetensors}``
    (the SAM's tensors under ``sam.``; the CLIP stays in ``clip_from``'s file, listed with its SHA-256, when that
    model is in ``out_dir``, and is copied in from another folder). Stages read
    and write checkpoints in ``work_dir``; ``precision``: fp32 or bf16 autocast of the SAM's training steps. Returns
    the spec path if exported."""
    from ..engines.medclipsam.sam import build_sam, sam_sizes
    from ..models import load_spec
    from .cliptnseg_recipe import _checkpoint, start_staged_run
    from .datasets import PhantomBank

    stages = check_stages(stages)
    work_dir, progress = start_staged_run(stages, out_dir, model_id, force, work_dir, seed, progress)
    clip_spec = load_spec(clip_from)
    spec = embedded_spec(model_id, clip_from)
    size = SAM_SMALL["image_size"]
    sam = build_sam(sam_sizes(SAM_SMALL))
    sam_ckpt = work_dir / "sam.pt"
    if "sam" in stages:
        bank = PhantomBank(n_phantoms, size, volumes=n_volumes, family=family, augment=AUGMENT,
                           progress=lambda d, t: progress.update("phantoms", d, t))
        train_sam(sam, bank, steps, sam_ckpt, BATCH, seed=seed, resume=resume, progress=progress, device=device,
                  precision=precision)
    sam.load_state_dict(_checkpoint(sam_ckpt, "sam"))
    sam.eval()
    weights = {f"sam.{k}": v for k, v in sam.state_dict().items()}
    def calibrate():
        from .medclipsam_calibration import calibrate_medclipsam

        return calibrate_medclipsam(_engine(spec, clip_spec, weights, device), calibration_volumes,
                                    progress=progress, family=family)

    presence = staged_presence(work_dir, stages, calibrate)
    if presence is None:
        return None
    spec["presence"] = presence
    spec["training"] = {"command": command, "n_phantoms": n_phantoms, "n_volumes": n_volumes, "sam_steps": steps,
                        "seed": seed, "family": family, "jitter": JITTER, "precision": precision,
                        "batch_size": BATCH, "augment": AUGMENT, "clip_from": clip_from,
                        "phrases": clip_spec.get("training", {}).get("phrases", [])}
    made = clip_spec.get("training") or {}
    if clip_spec["engine"] == "medclipsam" and (made.get("clip_command") or made.get("command")):
        # how the CLIP it carries was made: a model of this recipe passes its own clip_command on
        spec["training"]["clip_command"] = made.get("clip_command") or made["command"]
    return write_with_clip(spec, weights, clip_spec, Path(out_dir))


def write_with_clip(spec: dict, weights: dict, clip_spec: dict, out_dir: Path) -> Path:
    """Write ``out_dir/<id>.{json,safetensors}`` with ``weights`` (the SAM's) and the CLIP of ``clip_spec``: that
    model's file listed (name, SHA-256, size) as one of this model when it lies in ``out_dir`` (hashed before it
    loads; the CLIP not stored twice), else its CLIP tensors (``clip.*``, and ``presence_clip.*`` if it stores a
    presence CLIP) copied in, so the model does not depend on that folder (a presence CLIP it references by model
    stays a reference)."""
    from ..models import load_weights, write_spec

    if Path(clip_spec["_dir"]).resolve() != out_dir.resolve():
        prefixes = (clip_spec["clip"].get("weights_prefix", "clip."), "presence_clip.")
        return write_spec(spec, {**{k: v for k, v in load_weights(clip_spec).items() if k.startswith(prefixes)},
                                 **weights}, out_dir)
    return write_spec(spec, weights, out_dir, extra_files=clip_spec["files"])


def _engine(spec: dict, clip_spec: dict, sam_weights: dict, device):
    """The MedCLIP-SAM engine of ``spec`` before export: CLIP from ``clip_spec``'s files, SAM from ``sam_weights``."""
    from ..engines.medclipsam.clip_model import load_clip, load_presence_clip
    from ..engines.medclipsam.engine import MedCLIPSAMEngine
    from ..engines.medclipsam.sam import sam_from_state
    from ..models import load_weights

    device = torch.device(device)
    state = load_weights(clip_spec)
    clip = load_clip(spec, state, device)
    sam = sam_from_state({k[4:]: v for k, v in sam_weights.items()}, spec["sam"]["type"], device)
    return MedCLIPSAMEngine(clip, sam, device, spec, presence_clip=load_presence_clip(spec, state, device))


__all__ = ["SAM_SMALL", "JITTER", "STAGES", "embedded_spec", "box_of", "negative_box", "sam_loss_fn", "train_sam",
           "run_medclipsam_training", "write_with_clip"]
