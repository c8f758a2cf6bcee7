"""MedCLIP-SAM behind the engine contract (``engines.contract``): per slice, CLIP saliency of each prompt -> boxes
from its largest component(s) -> SAM masks; slice presence from CLIP's image-text score (or the patch map's).

A model spec of engine ``medclipsam`` holds

- ``clip``: which CLIP (``clip_model``: a BiomedCLIP folder or registry part, or an open_clip config whose tensors
  are the spec files' ``clip.*``, e.g. the embedded cliptnseg model's phantom CLIP);
- ``sam``: ``{"type": "vit_b" | {SamSizes fields}, "normalize": "sam" | "unit"}`` with the weights from
  ``"checkpoint": PATH`` (relative to the spec), ``"part": ID`` (registry: sam-vit-b, medsam-vit-b, ...) or else
  the spec files' ``sam.*`` tensors;
- ``saliency`` (``SALIENCY``: method gscorecam | gradcam | patch_similarity, topk, batch_size, block, fill black |
  mean, slice_presence image | patches | presence_clip (below), occlusion true | false (below); patch_similarity reads
  the neutral texts below and needs only the one image pass presence makes) and ``boxes`` (``BOXES``: ``prompts.saliency_to_prompts``
  arguments);
- ``presence``: the pipeline's found / not-found rule (its ``min_slice_presence`` empties slices whose presence is
  below it) plus this engine's ``neutral`` texts and ``min_sam_iou`` (a box whose mask SAM scores lower is dropped);
- ``inference.slice_vote`` (odd, slices; the pipeline's vote along the slice axis), ``input_size`` (pixels; default
  the CLIP's image size).

Slice presence ``[B,P]`` is CLIP's softmax probability of the prompt against the neutral texts on the whole slice
(grad-cam rescales every map to [0,1], so the map alone cannot say "absent"), or, with ``saliency.slice_presence``
"patches" (patch_similarity only; what ``clipseg finetune-clip --dense-labels caption`` trains and writes), the
slice-level probability read from the patch map (``saliency.patch_presence``), or with "presence_clip" the same
image-text probability from the spec's second CLIP (``clip_model.load_presence_clip``; ``clipseg finetune-clip
--presence-from`` writes it): the saliency CLIP says where, the presence CLIP whether. Saliency and SAM run only where
that presence reaches the lowest ``min_slice_presence`` of the spec's rules (below it the pipeline empties the slice
anyway; a run-time ``presence`` override with a lower floor does not bring those slices back); SAM embeds each slice
with a box once, whatever the number of prompts, and never a slice without one.

With ``saliency.occlusion`` true, a prompt with several boxes on a slice (``boxes.max_boxes``) keeps one mask: the
one whose region, filled with the tissue around it, leaves the prompt's presence lowest (``occlusion.
choose_by_occlusion``; one more presence pass per candidate), so a box on another object than the one the presence
score saw gives way to the box on it. The slice's presence is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ModelError
from ...models import load_weights
from ..contract import Engine, Preprocessing, PromptReading, PromptState
from .clip_model import CLIPModel, _local, _part_folder, load_clip, load_presence_clip
from .occlusion import choose_by_occlusion
from .prompts import SPLITS, saliency_to_prompts
from .saliency import METHODS, dense_features, patch_maps, patch_presence, patch_similarity, saliency
from .sam import SamSegmenter, load_sam, sam_from_state

NEUTRAL = ("a medical image", "normal tissue")  # what a slice without the finding is scored against by default
SALIENCY = {"method": "gscorecam", "topk": 300, "batch_size": 32, "block": -1, "fill": "black",
            "slice_presence": "image", "occlusion": False}
SLICE_PRESENCE = ("image", "patches", "presence_clip")
BOXES = {"split": "otsu", "threshold": 0.5, "min_area": 16, "max_boxes": 1, "margin": 0}


def _settings(spec: dict, key: str, defaults: dict) -> dict:
    given = spec.get(key) or {}
    unknown = sorted(set(given) - set(defaults)) if isinstance(given, dict) else [given]
    if unknown:
        raise ModelError(f"model {spec.get('id')!r}: {key} {unknown!r} is not understood; it may hold "
                         f"{', '.join(defaults)}")
    return {**defaults, **given}


def lowest_floor(presence: dict) -> float:
    """The lowest ``min_slice_presence`` of a spec's ``presence`` rules (global and per finding; absent = 0)."""
    rules = [presence] + list((presence.get("per_finding") or {}).values())
    return min(float(r.get("min_slice_presence", 0.0)) for r in rules)


def load_sam_of(spec: dict, state: dict, device) -> SamSegmenter:
    """The SAM of a medclipsam ``spec`` (module docstring); ``state``: the spec files' tensors."""
    cfg = spec.get("sam") or {}
    sam_type, normalize = cfg.get("type", "vit_b"), cfg.get("normalize", "sam")
    if "checkpoint" in cfg:
        return load_sam(_local(spec, cfg["checkpoint"]), sam_type, device, normalize)
    if "part" in cfg:
        from ...models import store

        folder = _part_folder(cfg["part"])
        return load_sam(folder / store.entry(cfg["part"])["files"][0]["name"], sam_type, device, normalize)
    own = {k[4:]: v for k, v in state.items() if k.startswith("sam.")}
    if not own:
        raise ModelError(f"model {spec['id']!r}: sam names no checkpoint or part and its files hold no 'sam.' "
                         f"tensors; give sam.checkpoint, sam.part (e.g. sam-vit-b) or export the SAM with the model")
    return sam_from_state(own, sam_type, device, normalize, f"model {spec['id']!r} SAM weights")


class MedCLIPSAMEngine(Engine):
    name = "medclipsam"

    def __init__(self, clip: CLIPModel, sam: SamSegmenter, device, spec: dict | None = None,
                 precision: str = "fp32", presence_clip: CLIPModel | None = None):
        spec = spec or {}
        size = int(spec.get("input_size", clip.image_size))
        super().__init__(spec, device, precision, Preprocessing.from_spec(spec, size, fit="pad"))
        self.clip, self.sam, self.presence_clip = clip, sam, presence_clip
        self.saliency = _settings(spec, "saliency", SALIENCY)
        self.boxes = _settings(spec, "boxes", BOXES)
        if self.saliency["method"] not in METHODS or self.saliency["fill"] not in ("black", "mean"):
            raise ModelError(f"model {spec.get('id')!r}: saliency method {self.saliency['method']!r} / fill "
                             f"{self.saliency['fill']!r}: method is one of {', '.join(METHODS)}, fill black or mean")
        if self.saliency["slice_presence"] not in SLICE_PRESENCE or (
                self.saliency["slice_presence"] == "patches" and self.saliency["method"] != "patch_similarity"):
            raise ModelError(f"model {spec.get('id')!r}: saliency slice_presence "
                             f"{self.saliency['slice_presence']!r} is image, or patches with the patch_similarity "
                             f"method")
        if not isinstance(self.saliency["occlusion"], bool):
            raise ModelError(f"model {spec.get('id')!r}: saliency occlusion {self.saliency['occlusion']!r} is true "
                             f"or false (whether a mask's slice is scored again with the mask filled)")
        if (self.saliency["slice_presence"] == "presence_clip") != (presence_clip is not None):
            raise ModelError(f"model {spec.get('id')!r}: saliency slice_presence {self.saliency['slice_presence']!r} "
                             f"{'has no presence_clip' if presence_clip is None else 'beside a presence_clip'}: a "
                             f"presence_clip entry and slice_presence 'presence_clip' go together")
        if self.boxes["split"] not in SPLITS:
            raise ModelError(f"model {spec.get('id')!r}: boxes split {self.boxes['split']!r} is not one of "
                             f"{', '.join(SPLITS)}")
        presence = spec.get("presence") or {}
        self.neutral = list(presence.get("neutral") or NEUTRAL)
        self.min_sam_iou = float(presence.get("min_sam_iou", 0.0))
        self.skip_below = lowest_floor(presence)
        self._neutral_emb = None
        self._presence_text: dict = {}  # prompt or neutral text -> its presence-CLIP embedding [D] (computed once)
        # calibration hook (``training.medclipsam_calibration``): called with each batch's best SAM IoU [B,P] (0 where
        # no box), before boxes below ``min_sam_iou`` are dropped
        self.on_iou = None

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, precision: str = "fp32") -> "MedCLIPSAMEngine":
        state = load_weights(spec) if spec.get("files") else {}
        return cls(load_clip(spec, state, device), load_sam_of(spec, state, device), device, spec, precision,
                   load_presence_clip(spec, state, device))

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[PromptReading]]:
        """``[N,D]`` L2-normalised CLIP text embeddings and how the CLIP's own tokenizer read each text."""
        readings = []
        for text in texts:
            tokens, read_as, truncated = self.clip.read(text)
            readings.append(PromptReading(text, tokens, truncated, read_as))
        with torch.inference_mode():
            return self.clip.encode_text(texts, self.device), readings

    def clear_prompt_cache(self) -> None:
        super().clear_prompt_cache()
        self._presence_text.clear()

    def neutral_embeddings(self) -> torch.Tensor:
        """The neutral texts' embeddings ``[N,D]`` (computed once)."""
        if self._neutral_emb is None:
            self._neutral_emb = self.clip.encode_text(self.neutral, self.device)
        return self._neutral_emb

    def presence_texts(self, texts: list[str]) -> torch.Tensor:
        """The presence CLIP's embeddings ``[N,D']`` of ``texts`` (each computed once per engine)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._presence_text]
        if new:
            with torch.inference_mode():
                self._presence_text.update(zip(new, self.presence_clip.encode_text(new, self.device)))
        return torch.stack([self._presence_text[t] for t in texts])

    @property
    def fast_clip(self) -> torch.nn.Module:
        """The CLIP the costly image-tower passes run (``Engine.runner``: itself for fp32, a bfloat16 copy for
        bf16, made on first use)."""
        return self.runner(self.clip.model)

    def slice_presence(self, images: torch.Tensor, text: torch.Tensor,
                       image: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP-normalised slices ``[B,3,C,C]``, prompt embeddings ``[P,D]`` -> ``[B,P]``: softmax probability (at
        CLIP's logit scale) of each prompt against the neutral texts alone. ``image``: the slices' image embeddings
        ``[B,D]`` if already computed (then ``images`` is not read)."""
        image = self.clip.encode_image(images) if image is None else F.normalize(image.float(), dim=-1)  # [B,D]
        return _presence(self.clip, image, text, self.neutral_embeddings())

    def presence_of(self, slices: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Slices ``[B,1,S,S]`` in [0,1] -> ``[B,P]``: the presence CLIP's ``slice_presence`` of ``prompts``."""
        c = self.presence_clip
        with self.autocast():
            image = self.runner(c.model).encode_image(c.normalize(slices))
        return _presence(c, F.normalize(image.float(), dim=-1), self.presence_texts(prompts),
                         self.presence_texts(self.neutral))

    def _presence_by_setting(self, x, prompts, images, text, image=None, sim=None) -> torch.Tensor:
        """Slice presence ``[B,P]`` as ``saliency.slice_presence`` says: the patch map's (``sim``: patch_similarity's
        ``[B,P,h,w]``, computed from ``images`` if None), the presence CLIP's (slices ``x`` ``[B,1,S,S]``), or this
        CLIP's (``images``, ``image``: their embeddings ``[B,D]``, computed if None)."""
        how = self.saliency["slice_presence"]
        if how == "patches":
            if sim is None:
                with self.autocast():
                    _, dense = dense_features(self.fast_clip, images)
                sim = patch_similarity(dense.float(), text, self.neutral_embeddings())
            return patch_presence(sim)
        if how == "presence_clip":
            return self.presence_of(x, prompts)
        return self.slice_presence(images, text, image)

    def boxes_of(self, images: torch.Tensor, text: torch.Tensor, wanted: torch.Tensor, size: int,
                 maps: torch.Tensor | None = None) -> list[list]:
        """Per slice, the (prompt index, box XYXY in ``size`` px) pairs, prompt by prompt in index order: saliency of
        prompt p on the slices where ``wanted[:, p]`` ([B,P] bool), its map resized to ``size`` and cut into boxes
        (``prompts``). The saliency is asked once per set of wanted prompts, for the slices that want exactly that
        set (gScoreCAM scores a channel in several prompts' top-k once; the maps are those of one call per prompt,
        up to rounding). ``maps``: every slice's saliency ``[B,P,size,size]`` if already computed
        (patch_similarity)."""
        s = self.saliency
        if maps is not None:
            found = [[] for _ in range(images.shape[0])]
            for b, p in wanted.nonzero().tolist():
                found[b] += [(p, box) for box in saliency_to_prompts(maps[b, p].cpu().numpy(), **self.boxes).boxes]
            return found
        fill = self.clip.black() if s["fill"] == "black" else None
        groups: dict[tuple, list] = {}  # the prompts wanted on a slice -> the slices that want exactly those
        for b in range(images.shape[0]):
            prompts = tuple(wanted[b].nonzero().flatten().tolist())
            if prompts:
                groups.setdefault(prompts, []).append(b)
        found = [[] for _ in range(images.shape[0])]
        for prompts, idx in groups.items():
            # one call for all of a slice's prompts: gScoreCAM scores a channel in several prompts' top-k once
            maps = saliency(self.clip.model, images[idx], text[list(prompts)], s["method"], s["topk"],
                            s["batch_size"], s["block"], fill, precision=self.precision, fast=self.fast_clip)
            if maps.shape[-1] != size:  # [n,p,C,C]
                maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
            for b, row in zip(idx, maps.cpu().numpy()):
                for p, m in zip(prompts, row):
                    found[b] += [(p, box) for box in saliency_to_prompts(m, **self.boxes).boxes]
        return found

    def infer(self, slices: torch.Tensor, state: PromptState):
        """Slices ``[B,1,S,S]`` -> (SAM mask probabilities ``[B,P,S,S]``, 0 where no box; presence ``[B,P]``). With
        precision bf16 only the passes that cost run under bf16 autocast (CLIP's image tower for the saliency, SAM's
        image encoder), their outputs made float32; maps, boxes, mask decoding and thresholds stay float32."""
        x = slices.to(self.device, torch.float32)
        b, size, p = x.shape[0], x.shape[-1], len(state.prompts)
        images = self.clip.normalize(x)
        text = state.embeddings.to(self.device)
        if self.saliency["method"] == "patch_similarity":  # one image pass gives presence and every prompt's map
            with self.autocast():
                image, dense = dense_features(self.fast_clip, images)
            image, dense = image.float(), dense.float()
            sim = patch_similarity(dense, text, self.neutral_embeddings())  # [B,P,h,w]
            presence = self._presence_by_setting(x, state.prompts, images, text, image, sim)
            maps = patch_maps(sim, size)
            found = self.boxes_of(images, text, presence >= self.skip_below, size, maps)
        else:
            presence = self._presence_by_setting(x, state.prompts, images, text)
            found = self.boxes_of(images, text, presence >= self.skip_below, size)
        probs = torch.zeros(b, p, size, size, device=self.device)
        boxes = [torch.from_numpy(np.asarray([box for _, box in f], dtype=np.float32).reshape(-1, 4)) for f in found]
        outs = self.sam.segment(x, boxes, precision=self.precision)
        chosen = None
        if self.saliency["occlusion"]:
            candidates = [(i, prompt, k, mask) for i, (f, out) in enumerate(zip(found, outs))
                          for k, ((prompt, _), mask) in enumerate(zip(f, out.probabilities))]
            chosen = choose_by_occlusion(x, candidates, lambda filled: self._presence_by_setting(
                filled, state.prompts, self.clip.normalize(filled), text))
        best = torch.zeros(b, p)
        for i, (f, out) in enumerate(zip(found, outs)):
            for k, ((prompt, _), mask, iou) in enumerate(zip(f, out.probabilities, out.iou)):
                if chosen is not None and chosen[i, prompt] != k:
                    continue  # another of this prompt's boxes holds what the presence saw
                best[i, prompt] = max(float(best[i, prompt]), float(iou))
                if float(iou) >= self.min_sam_iou:
                    probs[i, prompt] = torch.maximum(probs[i, prompt], mask.to(self.device))
        if self.on_iou is not None:
            self.on_iou(best)
        return probs, presence


def _presence(clip: CLIPModel, image: torch.Tensor, text: torch.Tensor, neutral: torch.Tensor) -> torch.Tensor:
    """Unit image embeddings ``[B,D]``, prompt ``[P,D]`` and neutral ``[N,D]`` embeddings of one CLIP -> ``[B,P]``
    = exp(own) / (exp(own) + sum exp(neutral)) at the CLIP's logit scale."""
    return torch.sigmoid(presence_logits(image, text, neutral, float(clip.model.logit_scale.exp())))


def presence_logits(image: torch.Tensor, text: torch.Tensor, neutral: torch.Tensor, scale) -> torch.Tensor:
    """Image embeddings ``[B,D]``, prompt ``[P,D]`` and neutral ``[N,D]`` embeddings (each made unit here) at logit
    scale ``scale`` -> ``[B,P]`` logits whose sigmoid is the slice presence: scale x cos(image, prompt) minus the
    log-sum-exp of scale x cos(image, neutral). ``clipseg finetune-clip --presence-weight`` trains this same logit."""
    image, neutral = F.normalize(image.float(), dim=-1), F.normalize(neutral.float(), dim=-1)
    own = scale * image @ F.normalize(text.float(), dim=-1).T  # [B,P]
    return own - torch.logsumexp(scale * image @ neutral.T, dim=1, keepdim=True)  # [B,P] - [B,1]


__all__ = ["MedCLIPSAMEngine", "NEUTRAL", "SALIENCY", "BOXES", "load_sam_of", "lowest_floor", "presence_logits"]
