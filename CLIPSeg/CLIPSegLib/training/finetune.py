"""Fine-tune an existing model on a user's labelled slices: ``clipseg finetune`` and ``finetune``.

Engines (``TUNINGS``: one small ``Tuning`` per engine holds what differs): cliptnseg (CLIP-TNseg) and tgcnet
(TGC-Net). From a parent model (any catalogue id or model ``.json``; the default model by default):

1. the data (``labelled_slices``): only labelled slices, a quarter of them held out to calibrate (one holding each
   phrase, the rest slices holding none where there are such), never trained on by the model calibrated there (the
   refit, step 3, trains on them too); phrases that never share a voxel on the slices labelled for both are
   exclusive (``labelled_slices.exclusive_pairs``);
2. the ``finetune`` recipe of the one training loop (``loop.run_loop``): the segmenter (cliptnseg: decoder, fine
   branch, head; tgcnet: SSE's CNN, DATE's fusion, VLCM, decoder, presence head; CLIP's image tower frozen) and the
   text side are trained on the user's slices (the engine's training loss, tgcnet's with VLCM's alignment term,
   plus ``losses.rival_negative_loss``: another phrase's pixels on the same slice as hard negatives) mixed with a
   replay of the parent's own training images (cliptnseg: ``datasets.PhantomBank``; tgcnet: its
   ``training.dataset``, report -> ``report_data.ReportBank``, thyroid -> ``datasets.PhantomBank``), whose pairs
   are distilled from a frozen copy of the parent (``Teacher``), so its old findings keep their maps. A cliptnseg
   model instead keeps its parent's network for the parent's findings by default (``keep_parent``: stored in the
   new model, ``engines.cliptnseg.engine``), so they are answered exactly as before and nothing is replayed. Text side
   (``TEXT_ADAPTATIONS``): cliptnseg "embeddings" (the default), one learned embedding per new phrase initialised
   from its CLIP text embedding, spread apart as far as the parent's findings are (``spread_apart``; stored in the
   model: the engine uses it for that phrase, any other wording falls back to CLIP), or "lora", LoRA adapters
   (peft) on the CLIP text tower, merged into it at export; tgcnet "lora" only (``text_lora.TextAdapters``: every
   prompt goes through DATE, so the tower itself is adapted), at the parent's slice size (``--input-size`` is
   cliptnseg's);
3. the found / not-found rule of each new phrase calibrated on the held-out slices (``calibration.collect_slices``,
   exclusive phrases competing voxel-wise as in the pipeline), merged with the parent's rules; then (``refit``, the
   default) the same training run again on all the labelled slices, held-out ones included, keeping those rules
   unless it fits the slices both trained on worse under them (``check_refit``);
4. the model written with ``models.write_spec`` (a spec of the parent's engine), its lineage in ``training``: parent
   id and weights SHA-256, data summary, command, and how it segments the labelled slices it trained on
   (``fit_on_slices``; a warning when it does not reproduce them, ``poor_fit``). Checkpoints in
   ``<output-dir>/.<model-id>.finetune/`` resume an interrupted run of the same data and settings; the folder is
   removed once the model is written.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..inference.laterality import patient_sides_of
from ..options import INPUT_SIZES
from ..progress import Progress
from . import labelled_slices as ls
from .losses import rival_negative_loss
from .loop import Recipe, run_loop

TEXT_ADAPTATIONS = ("embeddings", "lora")
CALIBRATION_SHARE = 0.25  # share of the labelled slices held out to calibrate the new phrases' rules
DEFAULT_STEPS = 600
DEFAULT_BATCH = 4  # the user's slices per step; replay adds REPLAY_SHARE / (1 - REPLAY_SHARE) of that on average
REPLAY_SHARE = 1 / 3
REPLAY_PHANTOMS = 400  # the first phantoms of the parent's own training bank
LEARNING_RATES = {"segmenter": 5e-4, "embeddings": 1e-2, "lora": 1e-3}
# the refit model is written unless, on the slices both models trained on, some phrase's calibration objective is
# this much lower than the first model's (``check_refit``)
REFIT_MARGIN = 0.05
FIT_DICE, FIT_EMPTY = 0.8, 0.9  # below these on its own training slices, a model is said to fit them poorly
RIVAL_WEIGHT = 1.0  # weight of rival_negative_loss (the user's pairs) beside the engine's own loss
DISTILL_WEIGHT = 2.0  # weight of the replayed pairs' distillation loss against the user's pairs' loss


@dataclass
class FinetuneResult:
    """``spec_path``: the written model ``.json``; ``spec``: its contents; ``losses``: per step of this call."""

    spec_path: Path
    spec: dict
    losses: list


class LearnedPhrases(nn.Module):
    """Text side "embeddings": ``[Q,D]`` free embeddings of the new ``phrases``, initialised from ``fixed`` (phrase
    key -> ``[D]``: the parent's learned ones) or their CLIP text embedding, those from CLIP spread apart to mean
    pairwise cosine ``spread_to`` (``spread_apart``; None: not spread); ``forward(phrases (N)) -> [N,D]``
    L2-normalised, a phrase not learned here takes ``fixed`` or CLIP's, without gradient."""

    def __init__(self, net, phrases: list[str], fixed: dict, spread_to: float | None = None):
        from ..engines.cliptnseg.engine import phrase_key

        super().__init__()
        self.key, self.net, self.fixed = phrase_key, [net], dict(fixed)  # net in a list: not a submodule
        self.phrases = list(phrases)
        self.index = {phrase_key(p): i for i, p in enumerate(phrases)}
        from_clip = [i for i, p in enumerate(phrases) if phrase_key(p) not in self.fixed]  # the parent's stay
        start = torch.stack([self._fixed(p) for p in phrases]).clone()
        if spread_to is not None and from_clip:
            start[from_clip] = spread_apart(start[from_clip], spread_to)
        self.weight = nn.Parameter(start)

    def _fixed(self, phrase: str) -> torch.Tensor:
        from ..engines.clip_backbone import tokenize

        key = self.key(phrase)
        if key not in self.fixed:
            net = self.net[0]
            self.fixed[key] = net.encode_text(tokenize([phrase], net.clip.context_length))[0].cpu()
        return self.fixed[key]

    def _normalised(self, weight: torch.Tensor) -> torch.Tensor:
        """L2-normalised as the network's own text embeddings are (not for CLIPSeg-style FiLM: text_normalize)."""
        return nn.functional.normalize(weight, dim=-1) if self.net[0].cfg["text_normalize"] else weight

    def forward(self, phrases: list[str]) -> torch.Tensor:
        weight = self._normalised(self.weight)
        return torch.stack([weight[self.index[self.key(p)]] if self.key(p) in self.index
                            else self._fixed(p).to(weight) for p in phrases])

    def export(self, parent_phrases: list[str]) -> tuple[list[str], dict]:
        """-> (the model's learned phrases: the parent's not retrained, then the new ones; weights entries)."""
        from ..engines.cliptnseg.engine import LEARNED_KEY

        kept = [p for p in parent_phrases if self.key(p) not in self.index]
        table = [self.fixed[self.key(p)] for p in kept] + list(self._normalised(self.weight.detach()))
        return kept + self.phrases, {LEARNED_KEY: torch.stack(table).cpu()}


def mean_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of ``[Q,D]`` embeddings (Q >= 2)."""
    unit = nn.functional.normalize(embeddings, dim=-1)
    cos = unit @ unit.T
    q = len(unit)
    return float((cos.sum() - cos.diagonal().sum()) / (q * (q - 1)))


def spread_apart(start: torch.Tensor, target: float) -> torch.Tensor:
    """``[Q,D]`` start embeddings spread around their mean direction until their mean pairwise cosine is ``target``
    (or as near as it can get: deviations at most 1e6 times the unit length); each keeps its length; unchanged if
    Q < 2 or they are already that far apart.

    The deviations from the mean direction are first whitened within their span (their Gram matrix made a
    projector), so the phrases sit at equal distances from each other, however close two of them started (a
    cluster of near-synonyms does not stay together while the rest spread); then scaled (bisection) to the target.
    Why: a small CLIP gives new words nearly the same embedding, and the decoder then draws one map for all of
    them (``benchmarks/RESULTS.md``, thirteenth session)."""
    if len(start) < 2 or mean_cosine(start) <= target:
        return start
    unit = nn.functional.normalize(start, dim=-1)
    centre = unit.mean(0, keepdim=True)
    dev = unit - centre
    values, vectors = torch.linalg.eigh(dev @ dev.T)  # Gram [Q,Q]; rank <= Q - 1 (the deviations sum to 0)
    keep = values > values.max() * 1e-6
    if not keep.any():  # identical embeddings: no direction to spread them along
        return start
    dev = vectors[:, keep] @ torch.diag(values[keep].rsqrt()) @ vectors[:, keep].T @ dev

    def cosine_at(scale: float) -> float:
        return mean_cosine(centre + scale * dev)

    lo, hi = 0.0, 1.0
    while cosine_at(hi) > target and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(60):  # bisection: the mean cosine falls as the deviations grow
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cosine_at(mid) > target else (lo, mid)
    spread = nn.functional.normalize(centre + hi * dev, dim=-1)
    return spread * start.norm(dim=-1, keepdim=True)


class LoraText(nn.Module):
    """Text side "lora": LoRA adapters (``text_lora.TextAdapters``, rank ``rank``) on the attention and MLP layers of
    the CLIP text tower; every phrase goes through the adapted tower, with gradient. ``merge()`` folds them into the
    tower's weights."""

    def __init__(self, net, rank: int = 8):
        from .text_lora import TextAdapters

        super().__init__()
        self.net = [net]
        self.lora = [TextAdapters(net, rank)]  # in lists: not submodules of this text side
        self.adapters = nn.ParameterList(self.lora[0].params)

    def forward(self, phrases: list[str]) -> torch.Tensor:
        from ..engines.clip_backbone import tokenize

        clip = self.net[0].clip
        unique = list(dict.fromkeys(phrases))
        emb = clip.encode_text(tokenize(unique, clip.context_length).to(self.adapters[0].device),
                               normalize=self.net[0].cfg["text_normalize"])
        return emb[[unique.index(p) for p in phrases]]

    def merge(self) -> None:
        self.lora[0].merge()


def _recipe(tuning, device, phrases, teacher=None, name: str = "fine-tuning") -> Recipe:
    """The ``finetune`` recipe: the engine's own training loss (``tuning.loss``) against the masks on the pairs of
    the user's ``phrases``, plus ``RIVAL_WEIGHT`` x ``losses.rival_negative_loss`` on them; on the other pairs (the
    replayed phantoms' findings), with a ``teacher`` (a frozen copy of the parent: ``Teacher``), pixel BCE against
    the teacher's probabilities (distillation: the old findings keep the parent's maps, which its calibrated rules
    judge), else the engine's loss against their masks. Parameters, state and train mode are the engine's
    (``tuning``)."""
    mine = set(phrases)

    def loss(batch):
        images, names, masks, pair_index = batch
        images, masks, pair_index = images.to(device), masks.to(device), pair_index.to(device)
        out = tuning.forward(images, names, pair_index)
        new = torch.tensor([n in mine for n in names], device=device)
        rival = RIVAL_WEIGHT * rival_negative_loss(out[0][new], masks[new], pair_index[new])  # 0 without new pairs
        if teacher is None or new.all():
            return tuning.loss(out, masks) + rival
        old = ~new
        logits, presence = out[0], out[1]
        value = DISTILL_WEIGHT * teacher.loss(images, [n for n, o in zip(names, old) if o], pair_index[old],
                                              logits[old], None if presence is None else presence[old])
        if new.any():
            value = value + tuning.loss(tuple(None if o is None else o[new] for o in out), masks[new])
        return value + rival

    return Recipe(name, tuning.param_groups(), loss, tuning.state, tuning.load, tuning.train, weight_decay=1e-4)


def _used_images(images, pair_index):
    """Only the images some pair reads: (images ``[U,1,S,S]``, pair_index renumbered into them ``[N]``)."""
    used = torch.unique(pair_index)
    remap = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    remap[used] = torch.arange(len(used), device=images.device)
    return images[used], remap[pair_index]


class Teacher:
    """A frozen copy of the parent model, answering as the parent's engine does (its text embeddings: CLIP's or its
    learned ones; a prompt of a kept parent's findings by that kept network): ``loss(images [B,C,S,S], phrases (N),
    pair_index [N], logits [N,S,S], presence [N] or None)`` is the BCE of the student's logits against the teacher's
    probabilities for the same pairs (and of its slice presence). This one is cliptnseg's; ``TGCNetTeacher`` is
    TGC-Net's."""

    def __init__(self, engine, device):
        from ..engines.cliptnseg.engine import CLIPTNSegEngine

        net = copy.deepcopy(engine.net)
        for p in net.parameters():
            p.requires_grad_(False)
        # its encode_prompts: the parent's embeddings, cached; its kept parents (never trained here) moved along
        parent = None if engine.parent is None else engine.parent.to_device(device)
        self.engine = CLIPTNSegEngine(net, device, engine.spec, learned=engine.learned, parent=parent)
        self.net = self.engine.net

    @torch.no_grad()
    def _targets(self, images, phrases, pair_index):
        """The teacher's (mask probabilities ``[N,S,S]``, presence probabilities ``[N]`` or None), one engine call
        per distinct phrase on the images of its pairs; images of another size than the teacher's input are resized
        to it and its maps back (bilinear)."""
        from ..inference.preprocessing import resize_slices

        size = images.shape[-1]
        probs = torch.empty(len(phrases), size, size, device=images.device)
        presence = None
        for phrase in dict.fromkeys(phrases):
            rows = torch.tensor([i for i, p in enumerate(phrases) if p == phrase], device=images.device)
            slices = resize_slices(images[pair_index[rows]], self.engine.preprocessing.input_size)
            p, pres = self.engine.predict(slices, self.engine.encode_prompts([phrase]))
            probs[rows] = resize_slices(p, size)[:, 0].to(probs)
            if pres is not None:
                presence = torch.ones(len(phrases), device=images.device) if presence is None else presence
                presence[rows] = pres[:, 0].to(presence)
        return probs, presence

    def loss(self, images, phrases, pair_index, logits, presence):
        t_probs, t_presence = self._targets(images, phrases, pair_index)
        bce = nn.functional.binary_cross_entropy_with_logits
        value = bce(logits, t_probs)
        if presence is not None and t_presence is not None:
            value = value + bce(presence, t_presence)
        return value


class TGCNetTeacher(Teacher):
    """``Teacher`` for a TGC-Net parent: a frozen copy of its network (its text tower without adapters); the
    student works at the parent's size, so nothing is resized."""

    def __init__(self, net, device):
        self.net = copy.deepcopy(net).to(device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _targets(self, images, phrases, pair_index):
        used, index = _used_images(images, pair_index)
        from .tgcnet_recipe import encode_pairs

        logits, presence, _ = self.net(used, encode_pairs(self.net, phrases), index)
        return torch.sigmoid(logits), None if presence is None else torch.sigmoid(presence)


def _root_training(spec: dict) -> dict:
    """The ``training`` entry of the model at the root of a spec's lineage (the one trained from scratch)."""
    training = spec.get("training") or {}
    while (training.get("parent") or {}).get("training"):
        training = training["parent"]["training"]
    return training


class Tuning:
    """One engine's pieces of fine-tuning, called by ``finetune`` in this order: ``check`` (before any work),
    ``Tuning(spec, input_size, progress)`` (the parent's network: attributes ``net``, ``size`` in pixels, ``prep``
    the engine's ``Preprocessing``), ``replays_by_default`` / ``replay_bank`` (the parent's own training data),
    ``teacher``, ``adapt_text`` (the trained text side, moved to the device), then per batch ``forward`` and
    ``loss`` with ``param_groups`` / ``state`` / ``load`` / ``train`` for ``loop.run_loop``, and ``export``."""

    text_adaptations: tuple = ()  # the first is the default
    spread_to = None  # the mean cosine the new phrases' learned embeddings start at (``spread_apart``; None: not)
    can_keep_parent = False  # whether the new model can keep the parent's network for the parent's findings

    @classmethod
    def check(cls, spec: dict, text_adaptation: str | None, input_size: int | None) -> str:
        """-> the text adaptation to use (None: the default); InputError for settings this engine cannot do."""
        text_adaptation = text_adaptation or cls.text_adaptations[0]
        if text_adaptation not in TEXT_ADAPTATIONS:
            raise InputError(f"text adaptation {text_adaptation!r} is not one of {', '.join(TEXT_ADAPTATIONS)}")
        return text_adaptation

    def adapt_text(self, text_adaptation: str, phrases: list[str], device) -> None:
        """Add the trained text side (``text_adaptation`` for the new ``phrases``); network, text side and loss
        on ``device``."""
        from .cliptnseg_recipe import segmentation_loss

        self.mask_loss = segmentation_loss(device)

    def loss(self, out, masks):
        """``cliptnseg_recipe.segmentation_loss`` of ``forward``'s (mask logits, presence logits, ...) and the
        masks ``[N,S,S]``."""
        return self.mask_loss(out[0], masks, out[1])


class CLIPTNSegTuning(Tuning):
    """cliptnseg's ``Tuning``: the parent's network (at ``input_size`` if given: ``network.network_at_input_size``),
    replay of ``datasets.PhantomBank``, ``Teacher``, text side ``TEXT_ADAPTATIONS`` (``LearnedPhrases`` or
    ``LoraText``), export with the learned phrases' table (or LoRA merged)."""

    text_adaptations = TEXT_ADAPTATIONS
    can_keep_parent = True

    @classmethod
    def check(cls, spec: dict, text_adaptation: str | None, input_size: int | None) -> str:
        """The base check plus an ``input_size`` the fine branch can take (else InputError before any work)."""
        if input_size is not None and input_size not in INPUT_SIZES:
            raise InputError(f"--input-size {input_size}: give a multiple of 32 pixels from 32 to 1024 (e.g. 256), "
                             f"or leave it out to fine-tune at the parent's own slice size")
        return super().check(spec, text_adaptation, input_size)

    def __init__(self, spec: dict, input_size: int | None, progress: Progress):
        from ..engines.cliptnseg.engine import CLIPTNSegEngine

        self.spec = spec
        self.engine = CLIPTNSegEngine.from_spec(spec, torch.device("cpu"))
        self.net, self.prep = self.engine.net, self.engine.preprocessing
        self.size = self.prep.input_size
        if input_size and input_size != self.size:
            from ..engines.cliptnseg.network import network_at_input_size

            self.net = network_at_input_size(self.net, input_size)
            self.size = input_size
            progress.message(f"fine-tuning at {self.size} x {self.size} pixels per slice (the parent takes "
                             f"{self.engine.preprocessing.input_size})")
        self.net.cfg["coarse_only"] = False  # a converted CLIPSeg model segments coarse-only; all of it is trained

    def replays_by_default(self) -> bool:
        """Whether the parent's lineage was trained on phantoms (then they are replayed by default)."""
        return bool(_root_training(self.spec).get("n_phantoms"))

    def replay_bank(self, n: int, progress: Progress):
        from .datasets import PhantomBank

        return PhantomBank(n, self.size, n_prompts=2, progress=lambda d, t: progress.update("replay phantoms", d, t),
                           context=self.prep.context)

    def teacher(self, device) -> Teacher:
        return Teacher(self.engine, device)  # the parent's own net and size

    def adapt_text(self, text_adaptation: str, phrases: list[str], device) -> None:
        super().adapt_text(text_adaptation, phrases, device)
        self.phrases = list(phrases)
        self.kind = text_adaptation
        self.spread_to = None if text_adaptation == "lora" else self.findings_spread()
        self.text = (LoraText(self.net) if text_adaptation == "lora"
                     else LearnedPhrases(self.net, phrases, self.engine.learned, self.spread_to))
        self.net.to(device)
        self.text.to(device)

    def findings_spread(self) -> float | None:
        """Mean pairwise cosine of the embeddings the parent answers its own findings with (first phrasing of each
        calibrated finding, as the parent engine encodes it: its learned embedding or CLIP's); None if it has fewer
        than two."""
        per = (self.spec.get("presence") or {}).get("per_finding") or {}
        first = [r["phrases"][0] for r in per.values() if r.get("phrases")]
        if len(first) < 2:
            return None
        with torch.no_grad():
            return round(mean_cosine(self.engine.encode_prompts(first).embeddings.cpu()), 4)

    def forward(self, images, phrases, pair_index):
        """-> (mask logits ``[N,S,S]``, presence logits ``[N]`` or None)."""
        return self.net(images, self.text(phrases), pair_index)

    def param_groups(self) -> list:
        segmenter = [p for n, p in self.net.named_parameters() if p.requires_grad and not n.startswith("clip.")]
        return [{"params": segmenter, "lr": LEARNING_RATES["segmenter"]},
                {"params": list(self.text.parameters()), "lr": LEARNING_RATES[self.kind]}]

    def state(self) -> dict:
        return {**self.net.trainable_state_dict(), **{f"text.{k}": v for k, v in self.text.state_dict().items()}}

    def load(self, sd: dict) -> None:
        self.net.load_state_dict({k: v for k, v in sd.items() if not k.startswith("text.")}, strict=False)
        self.text.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("text.")})

    def train(self, mode: bool) -> None:
        self.net.train(mode)
        self.text.train(mode)

    def export(self, spec: dict, device, keep_parent: bool = False):
        """The trained model: sets ``spec``'s network and learned phrases (and with ``keep_parent`` the kept
        parent: ``keep_parent_network``); -> (an engine of it on ``device``, to calibrate with; its weights)."""
        from ..engines.cliptnseg.engine import LEARNED_KEY, CLIPTNSegEngine, phrase_key

        net = self.net.cpu().eval()
        learned_phrases, extra = list(self.spec.get("learned_phrases") or []), {}
        if isinstance(self.text, LoraText):
            self.text.merge()
            table = self.engine.learned
            if learned_phrases:  # the parent's learned phrases stay as they were
                extra = {LEARNED_KEY: torch.stack([table[phrase_key(p)] for p in learned_phrases])}
        else:
            learned_phrases, extra = self.text.export(learned_phrases)
            table = {self.text.key(p): t for p, t in zip(learned_phrases, extra[next(iter(extra))])}
        weights, parent = {**net.state_dict(), **extra}, None
        if keep_parent:
            parent = CLIPTNSegEngine.from_spec(self.spec, device)  # the parent as written (self.net was trained)
            weights.update(keep_parent_network(spec, self.spec, weights, self.phrases))
        engine = CLIPTNSegEngine(net, device, {**self.spec, "learned_phrases": learned_phrases,
                                               "new_phrases": spec.get("new_phrases")}, learned=table, parent=parent)
        spec["network"] = {**spec.get("network", {}), "coarse_only": False, "input_size": net.cfg["input_size"]}
        if spec["network"]["input_size"] is None:
            spec["network"].pop("input_size")
        spec["learned_phrases"] = learned_phrases
        if not learned_phrases:
            spec.pop("learned_phrases")
        return engine, weights


def keep_parent_network(spec: dict, parent_spec: dict, weights: dict, phrases: list[str]) -> dict:
    """Make the new model's ``spec`` keep its cliptnseg parent for the parent's findings
    (``engines.cliptnseg.engine``): its ``PARENT_KEY`` entry (the parent's own spec entries) and ``new_phrases``
    (``phrases``); -> the weights to add: the parent's stored tensors that differ from the new ``weights``, under
    ``PARENT_PREFIX`` (the frozen CLIP image tower is stored once)."""
    from ..engines.cliptnseg.engine import LEARNED_KEY, PARENT_KEY, PARENT_PREFIX, PARENT_SPEC_KEYS
    from ..models import load_weights

    spec[PARENT_KEY] = {k: copy.deepcopy(parent_spec[k]) for k in PARENT_SPEC_KEYS if k in parent_spec}
    spec["new_phrases"] = list(phrases)
    # the learned phrase table is always the parent's own (it is read before anything is filled in from the child)
    return {PARENT_PREFIX + k: v for k, v in load_weights(parent_spec).items()
            if k == LEARNED_KEY or k not in weights or weights[k].shape != v.shape or not torch.equal(weights[k], v)}


class TGCNetTuning(Tuning):
    """TGC-Net's ``Tuning``: the text side is LoRA on the text tower
    (``text_lora.TextAdapters``, merged at export); the loss on the user's pairs is TGC-Net's training loss
    (segmentation + ``ALIGN_WEIGHT`` x VLCM alignment); the replay bank is of the parent's own training data
    (``training.dataset``: "report" -> ``report_data.ReportBank``, "thyroid" -> ``datasets.PhantomBank``); the
    slice size is the parent's (its CNN branch and decoder run at the CLIP size)."""

    text_adaptations = ("lora",)

    @classmethod
    def check(cls, spec: dict, text_adaptation: str | None, input_size: int | None) -> str:
        size = spec["clip"]["vision_cfg"]["image_size"]
        if input_size and input_size != size:
            raise InputError(f"model {spec['id']!r} is a tgcnet model: it works at its CLIP's input size ({size} px; "
                             f"its CNN branch and decoder run at that size), so --input-size {input_size} is not "
                             f"supported; leave --input-size out")
        if text_adaptation not in (None, "lora"):
            raise InputError(f"model {spec['id']!r} is a tgcnet model: it adapts its text tower with LoRA, so text "
                             f"adaptation {text_adaptation!r} is not available; leave --text-adaptation out or give "
                             f"lora")
        return "lora"

    def __init__(self, spec: dict, input_size: int | None, progress: Progress):
        from ..engines.tgcnet.engine import TGCNetEngine

        self.spec = spec
        engine = TGCNetEngine.from_spec(spec, torch.device("cpu"))
        self.net, self.size, self.prep = engine.net, engine.preprocessing.input_size, engine.preprocessing

    def replays_by_default(self) -> bool:
        from .tgcnet_recipe import DATASETS

        return _root_training(self.spec).get("dataset") in DATASETS

    def replay_bank(self, n: int, progress: Progress):
        data = _root_training(self.spec).get("dataset")
        report = lambda d, t: progress.update("replay phantoms", d, t)  # noqa: E731
        if data == "report":
            from .report_data import ReportBank

            # replayed as the model was trained: a model trained on mirrors (--report-mirror) sees its phantoms
            # mirrored half the time with their lines' sides swapped; one that only averages some findings with the
            # mirror at inference (clipseg calibrate --flip-choice) learnt no mirrors and replays none
            mirror = bool(_root_training(self.spec).get("mirror"))
            return ReportBank(n, self.size, progress=report, mirror=mirror)
        if data == "thyroid":
            from .datasets import PhantomBank

            return PhantomBank(n, self.size, n_prompts=2, progress=report)
        raise InputError(f"model {self.spec['id']!r} has no record of the data it was trained on (training.dataset "
                         f"report or thyroid), so there is nothing to replay; fine-tune it without replay (replay=0)")

    def teacher(self, device) -> Teacher:
        return TGCNetTeacher(self.net, device)

    def adapt_text(self, text_adaptation: str, phrases: list[str], device) -> None:
        from .text_lora import TextAdapters
        from .tgcnet_recipe import tgcnet_loss

        self.tgcnet_loss = tgcnet_loss(device)
        self.adapters = TextAdapters(self.net)
        self.net.to(device)

    def forward(self, images, phrases, pair_index):
        """-> (mask logits ``[N,S,S]``, presence logits ``[N]`` or None, similarity logits ``[N,h,w]`` or None)."""
        from .tgcnet_recipe import encode_pairs

        return self.net(images, encode_pairs(self.net, phrases), pair_index)

    def loss(self, out, masks):
        """TGC-Net's training loss (``tgcnet_recipe.tgcnet_loss``)."""
        return self.tgcnet_loss(out, masks)

    def param_groups(self) -> list:
        from .tgcnet_recipe import module_parameters

        return [{"params": module_parameters(self.net), "lr": LEARNING_RATES["segmenter"]},
                {"params": self.adapters.params, "lr": LEARNING_RATES["lora"]}]

    def state(self) -> dict:
        from .tgcnet_recipe import trained_state

        return trained_state(self.net)

    def load(self, sd: dict) -> None:
        self.net.load_state_dict(sd, strict=False)

    def train(self, mode: bool) -> None:
        self.net.train(mode)

    def export(self, spec: dict, device, keep_parent: bool = False):
        from ..engines.tgcnet.engine import TGCNetEngine

        self.adapters.merge()
        net = self.net.cpu().eval()
        return TGCNetEngine(net, device, self.spec), net.state_dict()


TUNINGS = {"cliptnseg": CLIPTNSegTuning, "tgcnet": TGCNetTuning}  # engine -> its fine-tuning pieces


def calibrate_new_phrases(engine, volumes, held, phrases, progress=None, exclusive=()) -> dict:
    """{phrase: found / not-found rule} calibrated on the held-out labelled slices (``calibration.collect_slices``,
    the phrases of ``exclusive`` pairs competing as they will in the pipeline): the grid search of the parent's
    rules at each probability threshold of ``calibration.THRESHOLDS``
    (``calibration.search_threshold_gate_and_rule``: another threshold than 0.5 only if it scores higher by
    ``calibration.THRESHOLD_MARGIN`` on at least ``calibration.THRESHOLD_MIN_PRESENT`` held-out slices holding the
    phrase); each rule with its figures and how it was calibrated."""
    from .calibration import (THRESHOLD_MIN_PRESENT, THRESHOLDS, collect_slices, search_threshold_gate_and_rule,
                              searches_thresholds)

    by_threshold = collect_slices(engine, volumes, held, progress, thresholds=THRESHOLDS, exclusive=exclusive)
    rules = {}
    for p in phrases:
        cases = [c for c in next(iter(by_threshold[THRESHOLDS[0]].values())) if c[0] == p]
        rule = search_threshold_gate_and_rule(by_threshold, p)
        absent = sum(1 for c in cases if c[1] == 0)
        few = not searches_thresholds(len(cases) - absent)
        rule["calibration"] = {
            "method": f"held-out split: {len(cases)} labelled slice(s) the calibrated model never trained on, each "
                      f"judged as a 2D case (so the rule's extent along the slice axis is not calibrated)"
                      + (f"; probability threshold {THRESHOLDS[0]} kept: trying others needs at least "
                         f"{THRESHOLD_MIN_PRESENT} held-out slices holding the phrase, {len(cases) - absent} here"
                         if few else ""),
            "slices": len(cases), "absent_slices": absent,
            "absent_empty_rate": rule["calibration"]["absent_empty_rate"] if absent else None,
            "mean_dice": rule["calibration"]["mean_dice"][p]}
        rules[p] = {**rule, "phrases": [p]}
    return rules


def fit_on_slices(engine, volumes, units, rules: dict, exclusive=()) -> dict:
    """How ``engine`` segments the labelled slices ``units`` (``(volume index, K index)``) under the calibrated
    ``rules``, each slice a 2D case as ``calibrate_new_phrases`` judges them: -> {phrase: {"dice": Dice of all the
    slices pooled (their voxels summed, as a volume's Dice: parts kept on slices without it count against it; None:
    none holds it), "empty": share of the slices without it left empty (None: none), "slices": how many, "score":
    the calibration's objective, ``calibration.objective``, out of 3 (with the mean of per-slice Dice, as the
    calibration scores)}}."""
    from ..inference.postprocess import keep
    from .calibration import case_table, collect_slices, evaluate_rule, objective

    thresholds = tuple(sorted({float(r["threshold"]) for r in rules.values()}))
    by_threshold = collect_slices(engine, volumes, units, thresholds=thresholds, exclusive=exclusive)
    out = {}
    for p, rule in rules.items():
        cases = [c for c in by_threshold[float(rule["threshold"])][float(rule["slice_gate"])] if c[0] == p]
        if not cases:
            continue
        empty, dice = evaluate_rule(cases, rule)
        truth, absent = sum(c[1] for c in cases), sum(1 for c in cases if not c[1])
        table = case_table(cases)
        kept = keep(table, rule, table.volume_extent_mm)
        pooled = 2 * table.overlap[kept].sum() / (table.voxels[kept].sum() + truth) if truth else None
        out[p] = {"dice": None if pooled is None else round(float(pooled), 4),
                  "empty": round(empty, 4) if absent else None, "slices": len(cases),
                  "score": round(objective(empty, dice[p] if truth else 0.0), 4)}
    return out


def check_refit(first, refit, volumes, units, rules: dict, exclusive=()) -> dict:
    """Each model's ``fit_on_slices`` of the labelled slices ``units`` that both trained on: -> {phrase: {"first":
    fit, "refit": fit}}. A refit that scores clearly lower there did not learn what the first model did (e.g. it
    stayed on the loss plateau of two phrases that start alike) and its rules were calibrated for another map."""
    fits = {name: fit_on_slices(engine, volumes, units, rules, exclusive)
            for name, engine in (("first", first), ("refit", refit))}
    return {p: {name: fits[name][p] for name in fits} for p in fits["first"]}


def poor_fit(fit: dict) -> list[str]:
    """The phrases of a ``fit_on_slices`` result that the model does not reproduce on the very slices it trained on
    (Dice under ``FIT_DICE`` or fewer than ``FIT_EMPTY`` of the slices without it left empty), each said in words."""
    said = []
    for p, f in fit.items():
        short = ([f"Dice {f['dice']:.2f}"] if f["dice"] is not None and f["dice"] < FIT_DICE else []) + (
            [f"{f['empty']:.0%} of the slices without it left empty"]
            if f["empty"] is not None and f["empty"] < FIT_EMPTY else [])
        if short:
            said.append(f"{p!r}: {' and '.join(short)}")
    return said


def merged_domain(parent: dict, volumes, size: int) -> dict | None:
    """The parent's ``domain`` widened to the fine-tuning images (each a run: ``domain.volume_features``)."""
    import numpy as np

    from ..inference.domain import pipeline_slices, reference_ranges, volume_features

    domain = parent.get("domain")
    if not domain:
        return None
    runs = [volume_features(pipeline_slices(v.image, 0, size)) for v in volumes]
    mine = reference_ranges({k: np.array([r[k] for r in runs]) for k in runs[0]}) if runs and runs[0] else {}
    features = {k: [min(lo, mine.get(k, (lo, hi))[0]), max(hi, mine.get(k, (lo, hi))[1])]
                for k, (lo, hi) in domain.get("features", {}).items()}
    return {"modality": f"{domain.get('modality', 'the parent model’s images')}, and the images it was fine-tuned on "
                        f"({len(volumes)} volume(s))",
            "features": features, "source": f"{domain.get('source', '')}; widened to the fine-tuning volumes"}


def finetune(data, output_dir, parent=None, model_id: str | None = None, prompt_map: dict | None = None,
             steps: int = DEFAULT_STEPS, seed: int = 0, force: bool = False, device="cpu",
             progress: Progress | None = None, batch_size: int = DEFAULT_BATCH, text_adaptation: str | None = None,
             replay: int | None = None, command: str = "", stop_after: int | None = None,
             distill: bool = True, input_size: int | None = None,
             keep_parent: bool | None = None, refit: bool = True, precision: str = "fp32") -> FinetuneResult | None:
    """Fine-tune ``parent`` (model id or spec path of an engine of ``TUNINGS``; default: the default model) on DATA
    (``labelled_slices``) and write ``output_dir/<model_id>.{json,safetensors}`` (refused before any work if they
    exist, unless ``force``).

    ``steps`` of ``batch_size`` of the user's slices plus replayed phantoms (``replay`` of them; None: the parent's
    own first ``REPLAY_PHANTOMS`` when its training data is known, else none), seeded by ``seed``; ``stop_after``
    ends this call early with a checkpoint (returns None). ``text_adaptation``: None for the engine's default
    (cliptnseg "embeddings", tgcnet "lora", its only one). ``input_size`` (pixels; None: the parent's; cliptnseg
    only) trains and writes the model at another slice size (``network.network_at_input_size``: the fine branch and
    head at that size, CLIP at its own): finer for large slices, slower. ``keep_parent`` (None: whether the engine
    can, cliptnseg yes) keeps the parent's network in the new model for the parent's findings, which are then
    answered as before; the default replay is then none (False: one network, the old findings kept by replay).
    ``refit``: once the rules are calibrated on the held-out slices, the same training (same seed, from the parent)
    is run again on all the labelled slices and that model is written with those rules: the held-out slices are
    often the only labelled ones near a structure's ends, and a model that never saw them draws it where it ends
    (twice the training time; False: the calibrated model itself is written).
    ``precision``: fp32 or bf16 autocast of the training steps (``loop.run_loop``; the caller checks the CPU can).
    Raises InputError for bad data (see
    ``labelled_slices``), for fewer training slices than ``batch_size``, and for settings the engine cannot do."""
    from monai.utils import set_determinism

    from ..engines.cliptnseg.engine import PARENT_KEY
    from ..inference.pipeline import resolve_device
    from ..models import lineage, load_spec, write_spec
    from .calibration import merged_presence
    from .cliptnseg_recipe import check_output_free
    from .datasets import make_augmentation

    progress = progress or Progress("none")
    parent_spec = load_spec(parent)
    model_id = model_id or f"{parent_spec['id']}-finetuned"
    check_output_free(Path(output_dir), model_id, force)
    if parent_spec["engine"] not in TUNINGS:
        raise InputError(f"model {parent_spec['id']!r} is a {parent_spec['engine']} model; fine-tuning works on "
                         f"{' and '.join(TUNINGS)} models")
    tuning_of = TUNINGS[parent_spec["engine"]]
    text_adaptation = tuning_of.check(parent_spec, text_adaptation, input_size)
    if keep_parent and not tuning_of.can_keep_parent:
        raise InputError(f"model {parent_spec['id']!r} is a {parent_spec['engine']} model: its fine-tuned models "
                         f"cannot keep the parent's network; fine-tune it without keep_parent (its old findings "
                         f"are then kept by replay of its training data)")
    keep_parent = tuning_of.can_keep_parent if keep_parent is None else keep_parent
    if steps < 1 or batch_size < 1:
        raise InputError(f"steps ({steps}) and batch size ({batch_size}) must be at least 1")
    progress.message(f"reading {data}")
    volumes = ls.read_data(data, prompt_map)
    reads_sides = patient_sides_of(parent_spec) is not None
    if reads_sides:  # trained and calibrated in the frame its pipeline predicts in; the user's slices are never
        # mirrored (their phrases' sides would have to swap with them), its replayed phantoms as the parent's were
        volumes = ls.in_patient_frame(volumes)
    train, held = ls.split_slices(volumes, CALIBRATION_SHARE)
    if len(train) < batch_size:
        raise InputError(f"{len(train)} labelled slice(s) are left to train on ({len(held)} of "
                         f"{len(train) + len(held)} are held out to calibrate), fewer than one batch of {batch_size}: "
                         f"label at least {batch_size - len(train)} more slice(s), or lower the batch size "
                         f"(--batch-size)")
    phrases = ls.phrases_of(volumes)
    dev = resolve_device(device)
    set_determinism(seed)
    tuning = tuning_of(parent_spec, input_size, progress)
    size, prep = tuning.size, tuning.prep
    _warn_axes(volumes, progress)
    n_replay = replay if replay is not None else (
        REPLAY_PHANTOMS if tuning.replays_by_default() and not keep_parent else 0)
    if not keep_parent and not n_replay and parent_spec.get(PARENT_KEY):
        progress.message(f"note: {parent_spec['id']!r} keeps its parent's network for that model's findings, and "
                         f"nothing of its lineage's training data can be replayed: the single network made here "
                         f"answers them without either, so they may drift (drop --single-network to keep them)")
    bank = tuning.replay_bank(n_replay, progress) if n_replay else None
    teacher = tuning.teacher(dev) if bank is not None and distill else None
    tuning.adapt_text(text_adaptation, phrases, dev)
    work = Path(output_dir) / f".{model_id}.finetune"
    run = {"parent": parent_spec["id"], "parent_sha256": [f["sha256"] for f in parent_spec["files"]],
           "data": ls.fingerprint(volumes), "steps": steps, "seed": seed, "batch_size": batch_size,
           "text_adaptation": text_adaptation, "replay": n_replay, "distill": distill, "input_size": size,
           "keep_parent": keep_parent, "held": [list(u) for u in held], "rival_weight": RIVAL_WEIGHT,
           "refit": refit}
    resume = _prepare_work(work, run, progress)
    share = REPLAY_SHARE if bank is not None else 0.0
    loader_batch = batch_size if bank is None else round(batch_size / (1 - share))

    def fit(tuning, units, ckpt: Path, name: str, budget: int | None) -> list | None:
        """Train ``tuning`` on the slices ``units`` (plus replay) for ``steps``, at most ``budget`` of them in this
        call; -> the losses, or None when the budget ran out first (the checkpoint resumes it)."""
        augmentation = make_augmentation(mild=True, flip=not reads_sides)
        augmentation.set_random_state(seed)
        user = ls.SliceSamples(volumes, units, size, prep.fit, prep.intensity, augmentation, prep.context)
        done = run_loop(_recipe(tuning, dev, phrases, teacher, name), ls.Mixed(user, bank, share), steps, ckpt,
                        loader_batch, seed, resume, 50, progress, budget, precision=precision)
        finished = torch.load(ckpt, map_location="cpu", weights_only=True)["step"] >= steps  # run_loop wrote it
        return done if finished else None

    losses = fit(tuning, train, work / "finetune.pt", "fine-tuning", stop_after)
    if losses is None:
        return None  # stopped early (stop_after): the checkpoint resumes it
    spec = {k: v for k, v in parent_spec.items()
            if not k.startswith("_") and k not in ("files", PARENT_KEY, "new_phrases")}
    engine, weights = tuning.export(spec, dev, keep_parent)
    exclusive = ls.exclusive_pairs(volumes)
    if exclusive:
        progress.message("never sharing a voxel on the slices labelled for both, so competing voxel-wise: "
                         + "; ".join(f"{a!r} and {b!r}" for a, b in exclusive))
    rules = calibrate_new_phrases(engine, volumes, held, phrases, progress, exclusive)
    refit_check = {}
    if refit:
        progress.message(f"refit: the same training again on all {len(train) + len(held)} labelled slices (the "
                         f"{len(held)} held out above too), from the parent; the rules just calibrated are kept")
        set_determinism(seed)
        tuning = tuning_of(parent_spec, input_size, Progress("none"))
        tuning.adapt_text(text_adaptation, phrases, dev)
        budget = None if stop_after is None else stop_after - len(losses)
        more = fit(tuning, sorted(train + held), work / "refit.pt", "refit on all labelled slices", budget)
        if more is None:
            return None
        losses += more
        first = engine, weights, copy.deepcopy(spec)
        engine, weights = tuning.export(spec, dev, keep_parent)
        refit_check = check_refit(first[0], engine, volumes, train, rules, exclusive)
        short = {p: c for p, c in refit_check.items() if c["refit"]["score"] < c["first"]["score"] - REFIT_MARGIN}
        if short:
            progress.message("refit not kept: on the labelled slices both models trained on, under the calibrated "
                             "rules, " + "; ".join(f"{p!r} scores {c['refit']['score']:.3f} (the first model "
                                                   f"{c['first']['score']:.3f})" for p, c in short.items())
                             + ": the model the rules were calibrated with is written")
            engine, weights, spec = first
            refit = False
    fit = ({p: c["refit" if refit else "first"] for p, c in refit_check.items()} if refit_check
           else fit_on_slices(engine, volumes, train, rules, exclusive))
    poor = poor_fit(fit)
    if poor:
        progress.message("warning: the model does not reproduce the labelled slices it trained on, under its rules: "
                         + "; ".join(poor) + ". Expect worse on the other slices: label more slices, above all "
                         "where it goes wrong, or train longer (--steps)")
    if refit:
        for rule in rules.values():
            rule["calibration"]["method"] += ("; the model written is that training refit on all labelled slices, "
                                              "these too, so its figures are the calibrated model's")
    spec.update(id=model_id, presence=merged_presence(parent_spec, rules, exclusive),
                description=f"{parent_spec['id']} fine-tuned on {', '.join(repr(p) for p in phrases)} "
                            f"({len(train) + len(held)} labelled slices of {len(volumes)} volume(s)).")
    domain = merged_domain(parent_spec, volumes, size)
    if domain:
        spec["domain"] = domain
    parent_training = parent_spec.get("training") or {}
    spec["training"] = {
        "command": command, "method": "finetune", "steps": steps, "seed": seed, "batch_size": batch_size,
        "precision": precision,
        "input_size": size, "text_adaptation": text_adaptation, "replay_phantoms": n_replay,
        "start_mean_cosine": tuning.spread_to,
        "keeps_parent_network": keep_parent,
        "replay_share": round(share, 4),
        "calibration": f"held-out split: {len(held)} of {len(train) + len(held)} labelled slices never trained on"
                       + (" by the model the rules were calibrated with; this model is the same training refit on "
                          "all of them" if refit else ""),
        "refit": refit,
        **({"refit_check": refit_check} if refit_check else {}),
        "fit_on_labelled": {"on": "the labelled slices the first training used (not those held out)", "phrases": fit},
        "phrases": sorted(set(parent_training.get("phrases") or []) | set(phrases)),
        "data": {"source": str(data), **ls.summary(volumes, train, held)},
        "parent": {**lineage(parent_spec), "training": parent_training}}
    path = write_spec(spec, weights, Path(output_dir))
    shutil.rmtree(work, ignore_errors=True)
    return FinetuneResult(path, json.loads(path.read_text(encoding="utf-8")), losses)


def _prepare_work(work: Path, run: dict, progress: Progress) -> bool:
    """Make the checkpoint folder; -> whether its checkpoint is of this run (same data and settings) to resume."""
    work.mkdir(parents=True, exist_ok=True)
    record, ckpt = work / "run.json", work / "finetune.pt"
    same = record.is_file() and json.loads(record.read_text(encoding="utf-8")) == run
    if ckpt.is_file() and not same:
        progress.message(f"{work}: its checkpoint is of another run (other data or settings); starting over")
        for old in (ckpt, work / "refit.pt"):
            old.unlink(missing_ok=True)
    elif ckpt.is_file():
        where = [f"{name} step {torch.load(f, map_location='cpu', weights_only=True)['step']} of {run['steps']}"
                 for name, f in (("fine-tuning", ckpt), ("refit", work / "refit.pt")) if f.is_file()]
        progress.message(f"resuming from the checkpoints in {work} ({', '.join(where)})")
    record.write_text(json.dumps(run, indent=2), encoding="utf-8")
    return same


def _warn_axes(volumes, progress: Progress) -> None:
    """Say when ``clipseg segment --axis auto`` would slice a volume along another axis than the K it trains on."""
    from ..inference.pipeline import choose_axis

    for v in volumes:
        axis = choose_axis(v.image.shape, v.geometry, "auto")
        if axis != 2:
            progress.message(f"note: {v.source['image']} is trained on along K, but `clipseg segment` would slice "
                             f"it along voxel axis {axis} (its thickest spacing); segment it with --axis 2")
