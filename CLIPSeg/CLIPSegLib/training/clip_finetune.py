"""``clipseg finetune-clip``: fine-tune the CLIP of a MedCLIP-SAM model with the DHN-NCE loss on image-caption pairs.

What the paper does (MedCLIP-SAM, Koleilat et al. 2024): BiomedCLIP, every weight trainable, fine-tuned on
image-caption pairs with DHN-NCE (``engines.medclipsam.dhn_nce``: decoupled InfoNCE whose negatives are weighted by
hardness) on the pooled image embedding only. Nothing in that loss asks a patch token to mean anything, so a
text-conditioned map read from the tower (gradient saliency, or the patch-text similarity of ``saliency``) follows
the finding only as far as it happens to.

What is added here (``dense_weight`` > 0, on the phantoms, whose slices say which findings they hold): a patch-level
term on the patch logits ``PATCH_SCALE`` x ``saliency.patch_similarity`` (cos(patch, finding phrase) - mean
cos(patch, neutral texts)), the map the engine reads. Two kinds of labels (``DENSE_LABELS``):

- ``caption`` (default; no mask anywhere, so the path stays zero-shot): multiple-instance learning from what the
  caption says (``mil_loss``). A slice's score for a finding is the mean of its ``PATCH_TOP`` highest patch logits,
  a positive where the slice holds the finding and a negative where it does not; every patch of a slice without it
  and the lowest ``MIL_BACKGROUND`` share of a slice with it are negatives too (a size prior: no finding covers half
  a slice). The patches that differ between slices
  with and without the finding are the ones pushed up, which is where the finding is. That mean is also the
  slice presence the exported model reads (``saliency.slice_presence`` "patches"). With ``presence_from`` (another
  model's CLIP, frozen, referenced by the exported model as its ``presence_clip``, whose image-text score then
  gives the slice presence) the slices without the finding are not scored on their top patches: this CLIP only has
  to say where, and that term, measured, costs the nodule boxes (RESULTS, eighteenth session).
- ``mask``: a class-balanced binary cross-entropy per patch against "the patch lies mostly in that finding's mask"
  (positives and negatives averaged separately). Mask supervision: the model is then no longer zero-shot.

A caption CSV names no finding per slice: the dense term is then off.

Data (``datasets.collate`` samples ``(image [1,S,S], [caption, phrase...], masks [1+F,S,S])``; the first text of a
sample is its caption, its mask unused):

- ``CaptionTable``: a CSV ``image,caption[,slice]`` (paths relative to the CSV; ``slice`` the 0-based K index of a
  volume; 2D images need none), read with the project's readers and intensity normalisation;
- ``PhantomCaptions``: phantom slices (``datasets.PhantomBank``, family A or A+B), captioned with a phrasing of each
  finding present (``synthetic.phantoms.PHRASES``) or a normal phrase, plus every finding's phrase with its mask.

Trainable (``TRAINABLE``): ``all``; ``last`` (the last ``blocks`` blocks of both towers, the final norms and the
projections); ``lora`` (peft LoRA, rank ``lora_rank``, on the attention and MLP layers of every block of both towers,
merged at export). Training runs through ``training.loop.run_loop`` (seeded, resumable, progress); export writes a
medclipsam spec (``models.write_spec``) whose ``clip.*`` tensors are the fine-tuned CLIP, its SAM and box settings
from the template model, its saliency ``patch_similarity`` by default, with the lineage and the command.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelError
from ..progress import Progress
from .loop import Recipe, run_loop

TRAINABLE = ("all", "last", "lora")
DENSE_LABELS = ("caption", "mask")
MIL_BACKGROUND = 0.5  # caption labels: this share of a slice's patches, the lowest, are negatives even when it holds
# the finding (no finding covers half a slice); without it a ViT, whose tokens all see the whole slice, may light up
# the tissue around a finding instead of the finding
DEFAULT_TEMPLATE = "medclipsam-phantom-small"  # where the SAM and box settings of a new model come from by default
# a parameter inside block i of a tower: open_clip (resblocks), timm (blocks), Hugging Face BERT (layer)
BLOCK = re.compile(r"^(?P<tower>.*?\.(?:resblocks|blocks|layer))\.(?P<index>\d+)\.")
# what follows the blocks: final norms and projections of both towers (open_clip, timm, Hugging Face text)
HEADS = re.compile(r"^(visual\.(ln_post|proj|head|trunk\.(norm|fc_norm))|ln_final|text_projection|text\.proj)")


# ----------------------------------------------------------------------------------------------------------- data
def phantom_caption(present: list[str], generator: torch.Generator | None = None) -> str:
    """Findings present (``FINDINGS`` names) -> a caption: a random phrasing of each, joined by "and"; a normal
    phrase when there is none."""
    from ..synthetic.phantoms import PHRASES
    from .datasets import NORMAL_PHRASES

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=generator))]

    if not present:
        return pick(NORMAL_PHRASES)
    return " and ".join(pick(PHRASES[f]) for f in present)


class PhantomCaptions(torch.utils.data.Dataset):
    """Phantom slices of ``family`` (``n`` 2D phantoms and the slices of ``volumes`` volumes, ``PhantomBank``) ->
    ``(image [1,S,S] in [0,1], [caption, phrase of each finding], masks [1+F,S,S])``: masks[0] is the union of the
    findings, masks[1+f] finding f's mask (empty if absent). Phrasings drawn at random on each access; ``augment``:
    the segmenter's strong augmentation (``datasets.make_augmentation``: gamma, gain, speckle-like noise, blur, bias
    field, rotation, scale, shear, flips) on each access, else the slice as generated."""

    def __init__(self, n: int, size: int, volumes: int = 0, family: str = "A", progress=None, augment: bool = False):
        from .datasets import PhantomBank

        self.bank = PhantomBank(n, size, augment=augment, volumes=volumes, family=family, progress=progress)

    def __len__(self):
        return len(self.bank)

    def __getitem__(self, i):
        from ..synthetic.phantoms import FINDINGS, PHRASES
        from .datasets import apply_augmentation

        image, masks = apply_augmentation(self.bank.transform, self.bank.images[i], self.bank.masks[i])
        present = [f for f, m in zip(FINDINGS, masks) if m.any()]
        phrases = [PHRASES[f][int(torch.randint(len(PHRASES[f]), ()))] for f in FINDINGS]
        return image, [phantom_caption(present)] + phrases, torch.cat([masks.amax(0, keepdim=True), masks])


class CaptionTable(torch.utils.data.Dataset):
    """Image-caption pairs of a CSV ``image,caption[,slice]`` (module docstring), resized to ``size`` ->
    ``(image [1,S,S] in [0,1], [caption], zeros [1,S,S])``."""

    def __init__(self, csv_path: Path, size: int):
        from ..inference.preprocessing import normalize_intensity, resize_slices
        from ..io.read import read_image

        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise InputError(f"caption table {csv_path} does not exist; give a CSV with columns image,caption (and "
                             f"slice for volumes)")
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        columns = set(rows[0]) if rows else set()
        if not rows or not {"image", "caption"} <= columns:
            raise InputError(f"{csv_path} must have a header row with columns image,caption[,slice] and at least one "
                             f"row; it has columns {sorted(c for c in columns if c)} and {len(rows)} row(s)")
        self.items, cache = [], {}
        for n, r in enumerate(rows, start=2):  # row 1 is the header
            caption = (r.get("caption") or "").strip()
            if not caption:
                raise InputError(f"{csv_path} line {n}: the caption is empty; every image needs a caption")
            if not (r.get("image") or "").strip():
                raise InputError(f"{csv_path} line {n}: the image path is empty")
            path = csv_path.parent / r["image"].strip()
            if path not in cache:
                image, _ = read_image(path)
                cache = {path: normalize_intensity(image)}  # one volume in memory at a time
            volume = cache[path]
            k_text = (r.get("slice") or "").strip()
            if not k_text and volume.shape[0] > 1:
                raise InputError(f"{csv_path} line {n}: {r['image']} is a volume of {volume.shape[0]} slices; say "
                                 f"which slice the caption describes in the slice column (0-based K index)")
            try:
                k = int(k_text or 0)
            except ValueError:
                raise InputError(f"{csv_path} line {n}: slice {k_text!r} is not a whole number") from None
            if not 0 <= k < volume.shape[0]:
                raise InputError(f"{csv_path} line {n}: slice {k} is outside {r['image']} (0..{volume.shape[0] - 1})")
            self.items.append((resize_slices(volume[k][None, None], size)[0], caption))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, caption = self.items[i]
        return image, [caption], torch.zeros(1, *image.shape[-2:])


# ----------------------------------------------------------------------------------------------------------- model
def trainable_names(model: nn.Module, mode: str, blocks: int = 2) -> list[str]:
    """Names of the parameters ``mode`` trains (``TRAINABLE``; ``last``: the last ``blocks`` of each tower's block
    list and the ``HEADS``). ``logit_scale`` never: DHN-NCE has its own temperature."""
    names = [n for n, _ in model.named_parameters() if n != "logit_scale"]
    if mode == "all":
        return names
    last = {}
    for n in names:
        m = BLOCK.match(n)
        if m:
            last[m["tower"]] = max(last.get(m["tower"], -1), int(m["index"]))
    keep = []
    for n in names:
        m = BLOCK.match(n)
        if (m and int(m["index"]) > last[m["tower"]] - blocks) or HEADS.match(n):
            keep.append(n)
    return keep


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the attention (``nn.MultiheadAttention`` as a whole, or its q/k/v/qkv Linear) and MLP Linear
    layers inside every block of both towers: peft's ``target_modules``."""
    targets = []
    for name, module in model.named_modules():
        if not BLOCK.match(name + ".") or not isinstance(module, (nn.Linear, nn.MultiheadAttention)):
            continue
        if any(name.startswith(t + ".") for t in targets):  # a Linear inside a targeted MultiheadAttention
            continue
        targets.append(name)
    return targets


class Tuner:
    """A CLIP (``clip_model.CLIPModel``) with its trainable parameters chosen by ``mode``; ``lora`` wraps it in
    peft. ``state()`` / ``load()``: the trainable tensors by name (a checkpoint); ``merged()``: the plain open_clip
    model with LoRA folded in."""

    def __init__(self, clip, mode: str = "last", blocks: int = 2, lora_rank: int = 8):
        if mode not in TRAINABLE:
            raise InputError(f"--trainable {mode!r} is not one of {', '.join(TRAINABLE)}")
        if blocks < 1:
            raise InputError(f"--blocks {blocks}: give at least 1 (the last blocks of each tower trained)")
        self.clip, self.mode = clip, mode
        model = clip.model
        for p in model.parameters():
            p.requires_grad_(False)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            self.peft = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                         target_modules=lora_targets(model)))
            self.module = self.peft
            names = [n for n, p in self.peft.named_parameters() if "lora_" in n]
        else:
            self.peft, self.module = None, model
            names = trainable_names(model, mode, blocks)
        params = dict(self.module.named_parameters())
        for n in names:
            params[n].requires_grad_(True)
        self.names = names
        self.params = [params[n] for n in names]

    def state(self) -> dict:
        return {n: p.detach().clone() for n, p in zip(self.names, self.params)}

    def load(self, state: dict) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise InputError(f"the checkpoint lacks {len(missing)} trained tensors (e.g. {sorted(missing)[0]}); it "
                             f"was made with other --trainable settings: start over with --no-resume")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(state[n])

    def train(self, mode: bool) -> None:
        self.clip.model.train(mode)

    def merged(self) -> nn.Module:
        model = self.peft.merge_and_unload() if self.peft is not None else self.clip.model
        return model.eval()


def check_dense_labels(dense_labels: str) -> None:
    """An ``InputError`` naming the choices unless ``dense_labels`` is one of ``DENSE_LABELS``."""
    if dense_labels not in DENSE_LABELS:
        raise InputError(f"--dense-labels {dense_labels!r} is not one of {', '.join(DENSE_LABELS)}")


def clip_loss_fn(clip, neutral: list[str], dense_weight: float = 1.0, temperature: float = 0.6, beta1: float = 0.15,
                 beta2: float = 0.15, device="cpu", dense_labels: str = "caption", absent_bag: bool = True,
                 presence_weight: float = 0.0, mil_top: int | None = None):
    """-> ``loss(batch)`` for ``run_loop``: DHN-NCE of the images against their captions (the first text of each
    sample) + ``dense_weight`` x the dense term (module docstring) on the other texts, labelled by ``dense_labels``:
    whether each text's finding is in the slice (``caption``; ``absent_bag``, ``mil_top``: ``mil_loss``'s) or its mask
    (``mask``) + ``presence_weight`` x the slice presence term: binary cross-entropy of the image-text presence
    logit the engine reads (``engine.presence_logits``: the finding's phrase against the neutral texts, on the whole
    slice's embedding) against whether the slice holds the finding (its caption's label; present and absent pairs
    averaged separately)."""
    check_dense_labels(dense_labels)
    from ..engines.medclipsam.dhn_nce import dhn_nce_loss
    from ..engines.medclipsam.engine import presence_logits
    from ..engines.medclipsam.saliency import PATCH_SCALE, dense_features, patch_similarity

    def loss(batch):
        images, phrases, masks, pair_index = batch
        x = clip.normalize(images.to(device))
        first = torch.ones(len(phrases), dtype=torch.bool)
        first[1:] = pair_index[1:] != pair_index[:-1]
        if dense_weight > 0 and not first.all():
            pooled, dense = dense_features(clip.model, x)  # [B,D], [B,D,h,w]
        else:
            pooled, dense = clip.model.encode_image(x), None
        per_finding = (dense is not None or presence_weight > 0) and not first.all()
        unique = list(dict.fromkeys(list(phrases) + (list(neutral) if per_finding else [])))
        emb = clip.model.encode_text(clip.tokenizer(unique).to(device))
        idx = torch.tensor([unique.index(p) for p in phrases], device=device)
        total = dhn_nce_loss(pooled, emb[idx[first.to(device)]], temperature, beta1, beta2)
        if not per_finding:
            return total
        rest = (~first).nonzero().flatten()
        present = masks[rest].flatten(1).any(1).to(device)  # [M] the slice holds the text's finding
        rows, texts = pair_index[rest].to(device), idx[rest.to(device)]
        neutral_emb = emb[[unique.index(n) for n in neutral]]
        if presence_weight > 0:
            logit = presence_logits(pooled, emb, neutral_emb, clip.model.logit_scale.exp())[rows, texts]  # [M]
            total = total + presence_weight * balanced_bce(logit, present)
        if dense is None:
            return total
        logits = PATCH_SCALE * patch_similarity(dense, emb, neutral_emb)[rows, texts]  # [M,h,w]
        if dense_labels == "caption":
            return total + dense_weight * mil_loss(logits, present, mil_top, absent_bag=absent_bag)
        frac = F.adaptive_avg_pool2d(masks[rest][:, None].float().to(device), logits.shape[-2:])[:, 0]  # [M,h,w]
        top = frac.flatten(1).amax(1).clamp(max=0.5)[:, None, None]
        target = (frac >= top) & (frac > 0)  # mostly inside; a finding smaller than a patch: its best patch
        return total + dense_weight * balanced_bce(logits, target)

    return loss


def mil_loss(logits: torch.Tensor, present: torch.Tensor, top: int | None = None,
             background: float = MIL_BACKGROUND, absent_bag: bool = True) -> torch.Tensor:
    """Multiple-instance loss from slice-level labels: ``logits`` [M,h,w] patch logits of M (slice, finding) pairs,
    ``present`` [M] bool (the slice holds the finding). A pair's slice logit is the mean of its ``top`` highest patch
    logits (default ``saliency.PATCH_TOP``: what the engine's patch presence reads): BCE against ``present``, present
    and absent pairs averaged separately. Patches: every patch of an absent pair and the lowest ``background`` share
    of a present pair's patches, mean BCE against 0. The three terms added (``absent_bag`` False: the absent pairs'
    slice logits are left out, their patches stay negatives)."""
    from ..engines.medclipsam.saliency import PATCH_TOP

    top = PATCH_TOP if top is None else top
    flat = logits.flatten(1)
    ranked = flat.sort(dim=1).values  # [M, h*w] ascending
    bag = ranked[:, -min(top, flat.shape[1]):].mean(1)
    negatives = torch.cat([flat[~present].flatten(), ranked[present, :int(background * flat.shape[1])].flatten()])
    loss = balanced_bce(negatives, torch.zeros_like(negatives, dtype=torch.bool))
    for side in (True, False) if absent_bag else (True,):  # each side its own mean, added in this order
        loss = loss + balanced_bce(bag, present, (side,))
    return loss


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, sides: tuple = (True, False)) -> torch.Tensor:
    """Binary cross-entropy of ``logits`` against the bool ``target`` (same shape), the positives' mean plus the
    negatives' mean, so the rarer side weighs as much as the other; a side with no element adds nothing (0 when
    neither has any). ``sides``: which sides count (``(True,)``: the positives only)."""
    bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    return sum((bce[target == side].mean() for side in sides if (target == side).any()), logits.new_zeros(()))


# ---------------------------------------------------------------------------------------------------------- source
def load_source(source: str | None, device, template: str | None = None):
    """(CLIPModel, its spec ``clip`` entry, the template medclipsam spec, the template's tensors, the parent's
    lineage dict). ``source``: a model id or spec .json (a medclipsam model: its CLIP, itself the template; a
    cliptnseg model: its CLIP) or a BiomedCLIP folder; default the embedded MedCLIP-SAM model. ``template``: the
    medclipsam model the SAM and box settings come from when the source is not one (default ``DEFAULT_TEMPLATE``)."""
    from ..engines.medclipsam.clip_model import load_clip
    from ..models import load_spec, load_weights

    source = source or DEFAULT_TEMPLATE
    if Path(source).is_dir():
        folder = str(Path(source).resolve())
        cfg, spec, state = {"folder": folder}, {"id": Path(folder).name, "clip": {"folder": folder}}, {}
        lineage = {"folder": folder}
    else:
        spec = load_spec(source)
        if spec["engine"] not in ("medclipsam", "cliptnseg"):
            raise ModelError(f"--from {source}: a {spec['engine']} model has no open_clip CLIP this command tunes; "
                             f"give a medclipsam or cliptnseg model, or a BiomedCLIP folder")
        state = load_weights(spec) if spec.get("files") else {}
        cfg = {k: v for k, v in spec["clip"].items()}
        if "folder" in cfg:
            cfg["folder"] = str((Path(spec["_dir"]) / cfg["folder"]).resolve())
        lineage = {"id": spec["id"], "files": [{k: f[k] for k in ("name", "sha256")} for f in spec["files"]]}
    clip = load_clip(spec if "_dir" in spec else {**spec, "_dir": "."}, state, device)
    if spec.get("engine") == "medclipsam":
        tspec, tstate = spec, state
    else:
        tspec = load_spec(template or DEFAULT_TEMPLATE)
        if tspec["engine"] != "medclipsam":
            raise ModelError(f"--sam-from {template}: a {tspec['engine']} model, not a medclipsam one")
        tstate = load_weights(tspec) if tspec.get("files") else {}
    return clip, cfg, tspec, tstate, lineage


def export(clip_model: nn.Module, clip_cfg: dict, template: dict, template_state: dict, out_dir: Path, model_id: str,
           training: dict, saliency: str | None = "patch_similarity",
           presence: tuple[dict, dict] | None = None) -> Path:
    """Write ``out_dir/<model_id>.{json,safetensors}``: the template's spec with this CLIP (``clip.*`` tensors; a
    folder CLIP keeps its folder for config and tokenizer, ``weights_prefix`` ``clip.``), the template's SAM (its
    ``sam.*`` tensors copied, or its checkpoint / part reference kept), ``saliency`` method (and its slice presence:
    the patch map's when the multiple-instance term trained it), ``training``. ``presence``: (the model's
    ``presence_clip`` entry, the state dict written under ``presence_clip.`` or None for a reference to another
    model) of the CLIP whose image-text score is then the slice presence; a template's own presence_clip is not
    carried over."""
    from ..models import write_spec

    spec = {k: v for k, v in template.items() if not k.startswith("_") and k not in ("files", "training")}
    spec["id"] = model_id
    spec["clip"] = {**clip_cfg, "weights_prefix": "clip."}
    spec.pop("presence_clip", None)
    if "checkpoint" in spec.get("sam", {}):
        spec["sam"] = {**spec["sam"], "checkpoint": str((Path(template["_dir"]) / spec["sam"]["checkpoint"]).resolve())}
    if saliency:  # slice presence from the patch map where the multiple-instance term trained it
        patches = (saliency == "patch_similarity" and bool(training.get("dense_weight"))
                   and training.get("dense_labels") == "caption" and "phantoms" in training.get("data", {}))
        spec["saliency"] = {**(spec.get("saliency") or {}), "method": saliency,
                            "slice_presence": "patches" if patches else "image"}
    weights = {f"clip.{k}": v.detach().cpu() for k, v in clip_model.state_dict().items()}
    if presence is not None:
        spec["presence_clip"] = dict(presence[0])
        spec["saliency"] = {**(spec.get("saliency") or {}), "slice_presence": "presence_clip"}
        if presence[1] is not None:
            weights.update({f"presence_clip.{k}": v.detach().cpu() for k, v in presence[1].items()})
    elif (spec.get("saliency") or {}).get("slice_presence") == "presence_clip":
        spec["saliency"] = {**spec["saliency"], "slice_presence": "image"}
    spec["description"] = (f"MedCLIP-SAM with its CLIP fine-tuned by `clipseg finetune-clip` ("
                           f"{training.get('loss', 'DHN-NCE')}) from "
                           f"{training['parent'].get('id') or training['parent'].get('folder')}; SAM and presence rule "
                           f"of {template['id']} (re-calibrate the rule for this CLIP).")
    spec["training"] = training
    weights.update({k: v for k, v in template_state.items() if k.startswith("sam.")})
    return write_spec(spec, weights, out_dir)


def finetune_clip(out_dir: Path, work_dir: Path, source: str | None = None, model_id: str | None = None,
                  data_csv: Path | None = None, n_phantoms: int = 400, n_volumes: int = 0, family: str = "A",
                  steps: int = 300, batch_size: int = 16, lr: float = 1e-5, trainable: str = "last", blocks: int = 2,
                  lora_rank: int = 8, dense_weight: float = 1.0, temperature: float = 0.6, beta1: float = 0.15,
                  beta2: float = 0.15, seed: int = 0, resume: bool = True, template: str | None = None,
                  saliency: str | None = "patch_similarity", progress: Progress | None = None, device="cpu",
                  command: str = "", force: bool = False, stop_after: int | None = None,
                  dense_labels: str = "caption", augment: bool = False, precision: str = "fp32",
                  presence_from: str | None = None, presence_weight: float = 0.0,
                  mil_top: int | None = None) -> Path | None:
    """The whole command: checks, source CLIP, data, ``run_loop`` (checkpoint ``work_dir/clip.pt``), export.
    ``augment``: phantom captions augmented (``PhantomCaptions``); ``precision``: fp32 or bf16 autocast of the
    training steps; ``presence_from``: the model (id or spec; or a BiomedCLIP folder) whose CLIP, frozen, becomes
    the exported model's ``presence_clip`` (module docstring); ``presence_weight``: the slice presence term
    (``clip_loss_fn``; phantom captions only); ``mil_top``: patches in a slice's caption-label score (``mil_loss``'s
    ``top``; None: ``saliency.PATCH_TOP``). Returns the spec path (None when ``stop_after``
    ended the call before the last step)."""
    from monai.utils import set_determinism

    from .cliptnseg_recipe import check_output_free

    if batch_size < 2:
        raise InputError(f"--batch-size {batch_size}: DHN-NCE needs at least 2 image-caption pairs per batch (the "
                         f"other pairs are each pair's negatives); give 2 or more")
    if steps < 1 or lr <= 0 or dense_weight < 0 or presence_weight < 0:
        raise InputError(f"--steps {steps}, --lr {lr}, --dense-weight {dense_weight}, --presence-weight "
                         f"{presence_weight}: steps >= 1, lr > 0 and weights >= 0")
    if mil_top is not None and (mil_top < 1 or dense_labels != "caption" or not dense_weight or data_csv is not None
                                or presence_from is None):
        from ..engines.medclipsam.saliency import PATCH_TOP

        raise InputError(f"--mil-top {mil_top}: the number of top patches in the patch term learnt from phantom "
                         f"captions, so at least 1, with --dense-labels caption, a --dense-weight above 0, no --data "
                         f"(a caption table turns the patch term off) and --presence-from (a model without a presence "
                         f"CLIP reads slice presence from its {PATCH_TOP} highest patches)")
    if family not in ("A", "B", "A+B"):
        raise InputError(f"--family {family!r} is not A, B or A+B")
    check_dense_labels(dense_labels)
    if data_csv is not None and augment:
        raise InputError("--augment applies to phantom captions; with --data your own images are used as they are")
    if data_csv is not None and presence_weight:
        raise InputError("--presence-weight needs to know which findings each slice holds, which phantom captions "
                         "say and a caption table does not; leave it out with --data")
    progress = progress or Progress("none")
    device = torch.device(device)
    clip, clip_cfg, tspec, tstate, lineage = load_source(source, device, template)
    presence = presence_source(presence_from, template) if presence_from is not None else None
    model_id = model_id or f"{lineage.get('id') or Path(lineage['folder']).name}-dhn"
    check_output_free(Path(out_dir), model_id, force)
    set_determinism(seed)
    if data_csv is not None:
        dataset = CaptionTable(Path(data_csv), clip.image_size)
        data = {"csv": str(data_csv), "pairs": len(dataset)}
    else:
        dataset = PhantomCaptions(n_phantoms, clip.image_size, n_volumes, family,
                                  progress=lambda d, t: progress.update("phantoms", d, t), augment=augment)
        data = {"phantoms": n_phantoms, "volumes": n_volumes, "family": family, "slices": len(dataset)}
    neutral = list((tspec.get("presence") or {}).get("neutral") or _neutral())
    tuner = Tuner(clip, trainable, blocks, lora_rank)
    settings = {"lr": lr, "trainable": trainable, "blocks": blocks, "lora_rank": lora_rank, "dense_weight": dense_weight,
                "dense_labels": dense_labels, "temperature": temperature, "beta1": beta1, "beta2": beta2,
                "tensors": len(tuner.names), **({"augment": True} if augment else {}),
                **({"presence_from": presence_from} if presence is not None else {}),
                **({"presence_weight": presence_weight} if presence_weight else {}),
                **({"mil_top": mil_top} if mil_top is not None else {})}
    recipe = Recipe("CLIP DHN-NCE", [{"params": tuner.params, "lr": lr}],
                    clip_loss_fn(clip, neutral, dense_weight, temperature, beta1, beta2, device, dense_labels,
                                 absent_bag=presence is None, presence_weight=presence_weight, mil_top=mil_top),
                    tuner.state, tuner.load, tuner.train, weight_decay=0.01, fingerprint=settings)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / "clip.pt"
    losses = run_loop(recipe, dataset, steps, ckpt, batch_size, seed, resume, ckpt_every=50, progress=progress,
                      stop_after=stop_after, precision=precision)
    done = int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])
    if done < steps:
        return None
    terms = ["DHN-NCE"] + ([" + patch MIL from captions" if dense_labels == "caption" else " + dense patch BCE on masks"]
                           if dense_weight and data_csv is None else []) + (
        [" + slice presence from captions"] if presence_weight else [])
    training = {"command": command, "parent": lineage, "template": tspec["id"], "data": data, "steps": steps,
                "batch_size": batch_size, "seed": seed, "precision": precision, "neutral": neutral,
                "loss": "".join(terms),
                "last_loss": round(losses[-1], 4) if losses else None, **settings,
                # the phrases the source CLIP's model was trained on, else its template's (the medclipsam recipe and
                # the unseen-word check read them)
                **({"phrases": phrases} if (phrases := _phrases(source, tspec)) else {})}
    return export(tuner.merged(), clip_cfg, tspec, tstate, Path(out_dir), model_id, training, saliency, presence)


def presence_source(source: str, template: str | None = None) -> tuple[dict, dict | None]:
    """``--presence-from``: (the ``presence_clip`` entry, tensors to store or None). A model (id, or spec path made
    absolute) is referenced with its files' SHA-256, not copied; a BiomedCLIP folder's CLIP is stored. A model that
    carries a presence CLIP of its own is refused (which of its two CLIPs was meant would be a guess)."""
    from ..models import load_spec

    if Path(source).is_dir():
        clip, cfg, _, _, _ = load_source(source, torch.device("cpu"), template)
        return {**cfg, "weights_prefix": "presence_clip."}, clip.model.state_dict()
    spec = load_spec(source)
    if spec["engine"] not in ("medclipsam", "cliptnseg"):
        raise ModelError(f"--presence-from {source}: a {spec['engine']} model has no open_clip CLIP to say whether a "
                         f"slice holds the finding; give a medclipsam or cliptnseg model, or a BiomedCLIP folder")
    if spec.get("presence_clip") is not None:
        entry = spec["presence_clip"] if isinstance(spec["presence_clip"], dict) else {}
        own = entry.get("model") or entry.get("folder")
        raise ModelError(f"--presence-from {source}: that model says whether with a second CLIP of its own "
                         f"(presence_clip), not its 'clip'; give the model that CLIP comes from"
                         + (f" ({own})" if own else "") + ", or a model with one CLIP")
    name = str(Path(source).resolve()) if str(source).lower().endswith(".json") else str(source)
    return {"model": name, "files": [{"name": f["name"], "sha256": f["sha256"]} for f in spec["files"]]}, None


def _phrases(source: str | None, template: dict) -> list:
    """The training phrases of the ``--from`` model (none for a folder), else of the template model."""
    from ..models import load_spec

    own = None if source is None or Path(source).is_dir() else (load_spec(source).get("training") or {}).get("phrases")
    return list((template.get("training") or {}).get("phrases") or [] if own is None else own)


def _neutral():
    from ..engines.medclipsam.engine import NEUTRAL

    return NEUTRAL


__all__ = ["TRAINABLE", "PhantomCaptions", "CaptionTable", "Tuner", "balanced_bce", "check_dense_labels",
           "clip_loss_fn", "finetune_clip", "load_source", "presence_source", "lora_targets", "phantom_caption",
           "trainable_names", "export"]
