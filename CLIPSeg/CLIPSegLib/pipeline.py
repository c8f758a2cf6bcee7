"""The slice/volume pipeline: volume ``[K,J,I]`` + prompts -> one mask per prompt, with a presence decision.

1. normalise the whole volume's intensity (``preprocessing.normalize_intensity``);
2. cut it into slices along the chosen axis, resize each to the engine's input size, batch them;
3. ``engine.predict`` -> mask probabilities resized back to the slice grid, and slice presence probabilities (text is
   embedded once per run);
4. per prompt, mask x gated slice presence (``apply_presence``), voxel-wise competition of mutually exclusive
   findings (``postprocess.suppress_exclusive``), then 3D post-processing and the found / not-found decision
   (``postprocess.decide``) with the prompt's calibrated rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .clip_backbone import check_prompts
from .domain import check_domain, domain_message, slice_features
from .errors import DeviceError, InputError
from .imageio import Geometry, check_volume
from .options import AXES
from .postprocess import CRITERIA, DEFAULT_PRESENCE, decide, suppress_exclusive, with_rivals
from .preprocessing import normalize_intensity, resize_slices
from .progress import Progress


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA if present else CPU; 'cuda' without a GPU is an error that says what to do."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but no CUDA GPU is available to PyTorch "
                              f"(torch {torch.__version__}); use --device cpu or --device auto")
        return torch.device(name)
    raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")


def choose_axis(shape_kji: tuple[int, int, int], geometry: Geometry, axis: str | int = "auto") -> int:
    """Slice axis as a voxel axis index (0 = I, 1 = J, 2 = K); ``shape_kji`` in voxels, array order (K, J, I).

    'auto': an axis one voxel thick makes the volume a 2D image in the other two axes' plane, so that axis is the
    slice axis (one full slice; K, then J, then I if several are), whatever the spacings. Otherwise the axis with
    the largest spacing (the acquisition direction of thick-slice volumes; more than 1% larger), K on ties."""
    axis = str(axis)
    if axis not in AXES:
        raise InputError(f"axis {axis!r} is not one of auto, 0 (I), 1 (J), 2 (K)")
    if axis != "auto":
        return int(axis)
    for a in (2, 1, 0):
        if shape_kji[2 - a] == 1:
            return a
    spacing = np.asarray(geometry.spacing)
    best = 2
    for a in (0, 1):
        if spacing[a] > spacing[best] * 1.01:
            best = a
    return best


REASONS = {key: text for _, key, text in CRITERIA}
UNITS = {"min_extent_mm": " mm", "min_area_mm2": " mm²"}


def _miss(misses) -> str:
    """[(rule key, value, required)] -> 'mean probability 0.878 < 0.880, ...'."""
    names = {"min_peak": "peak probability", "min_mean": "mean probability", "min_extent_mm": "extent along the "
             "slice axis", "min_area_mm2": "largest cross-section"}
    return ", ".join(f"{names[k]} {v:.3g}{UNITS.get(k, '')} < {n:.3g}{UNITS.get(k, '')}" for k, v, n in misses)


@dataclass
class FindingResult:
    """Result for one prompt. mask: bool ``[K,J,I]``; info: see ``postprocess.decide`` plus ``rule`` (the trained
    finding whose calibrated rule judged it, or 'global'), ``rule_cosine`` (text similarity to that finding's
    phrasings) and ``competes_with`` (rival findings that took voxels from it)."""

    prompt: str
    mask: np.ndarray
    info: dict

    @property
    def found(self) -> bool:
        """The mask is not empty (status 'found' or 'uncertain')."""
        return self.info["found"]

    @property
    def status(self) -> str:
        return self.info.get("status", "found" if self.found else "not found")

    def reading(self) -> str:
        """How the prompt was read: which calibrated rule, and which findings compete with it."""
        rule = self.info.get("rule", "global")
        if rule == "global":
            text = "read with the model's global rule (no trained finding is close to this text)"
        else:
            text = f"read as the trained finding '{rule}' (text similarity {self.info.get('rule_cosine', 1):.2f})"
        unseen = self.info.get("unseen_words") or []
        if unseen:
            text += "; words the model never saw in training: " + ", ".join(f"'{w}'" for w in unseen)
        rivals = self.info.get("competes_with") or []
        if rivals:
            text += "; competes voxel by voxel with " + ", ".join(f"'{r}'" for r in rivals)
        return text

    def message(self) -> str:
        i = self.info
        if self.status == "found":
            mean = f", mean {i['mean']:.2f}" if i.get("mean") is not None else ""
            head = (f"found ({i['components']} region(s), {i['voxels']} voxels, peak probability {i['score']:.2f}"
                    f"{mean})")
        elif self.status == "uncertain":
            head = (f"UNCERTAIN: kept {i['components']} region(s), {i['voxels']} voxels, that narrowly miss the "
                    f"model's rule ({_miss(i.get('closest_miss', []))}); check the segment")
        elif not i.get("dropped_components"):
            head = (f"not found: no voxel above probability {i.get('threshold', 0.5):.2f} (highest "
                    f"{i['score']:.2f}); the segment is empty")
        else:
            why = "; ".join(f"{REASONS[k]} ({n})" for k, n in sorted(i.get("rejected", {}).items(),
                                                                     key=lambda kv: -kv[1]))
            head = (f"not found: {i['dropped_components']} candidate region(s) rejected by the model's rule: {why}; "
                    f"nearest miss: {_miss(i.get('closest_miss', []))}; the segment is empty")
        text = f"{self.prompt!r}: {head} [{self.reading()}]"
        if i.get("out_of_domain"):
            text += " [image outside the model's training domain: do not trust this result]"
        return text

    def event(self) -> dict:
        """The JSON-safe summary of this result (for ``--progress json`` and reports)."""
        keys = ("status", "found", "score", "mean", "components", "voxels", "dropped_components", "rejected",
                "closest_miss", "rule", "rule_cosine", "competes_with", "unseen_words", "out_of_domain")
        return {"prompt": self.prompt, **{k: self.info.get(k) for k in keys}, "interpretation": self.reading()}


@dataclass
class SegmentationResult:
    findings: list[FindingResult]
    slice_axis: int  # voxel axis: 0 = I, 1 = J, 2 = K
    probabilities: np.ndarray | None = field(default=None, repr=False)  # [P,K,J,I] float32 when kept
    domain_warning: str | None = None  # set when the image does not look like the model's training data
    domain_features: dict = field(default_factory=dict)  # domain.FEATURES measured on the network's input slices

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return {f.prompt: f.mask for f in self.findings}


def flip_average_of(engine) -> bool:
    """Whether the engine's model asks for left-right flip averaging (spec ``inference.flip_average``)."""
    return bool(((getattr(engine, "spec", None) or {}).get("inference") or {}).get("flip_average", False))


def predict_maps(engine, volume: np.ndarray, prompts: list[str], slice_axis: int, batch_size: int | None = None,
                 progress: Progress | None = None, cancel=None,
                 flip_average: bool | None = None, on_slices=None) -> tuple[np.ndarray, np.ndarray | None]:
    """volume ``[K,J,I]`` (raw intensities) -> (mask probabilities ``[P,K,J,I]``, slice presence probabilities
    ``[P,N]`` or None if the engine has no presence estimate), float32; N = slices along ``slice_axis``.

    Slices along ``slice_axis`` (voxel axis 0=I, 1=J, 2=K) are resized to the engine's input size and predicted in
    batches (``batch_size`` slices, default: the engine's for its device); constant slices (no signal) are skipped and
    get probability 0. ``cancel()`` returning True stops. ``flip_average`` (default: the model's setting) also
    predicts each slice mirrored left-right (a flip the models are trained with) and averages the two, mirrored back:
    twice the compute, fewer stray responses to speckle. ``on_slices(x)`` is called with each batch of network input
    ``[B,1,S,S]`` (e.g. to measure what the network sees, ``domain.slice_features``)."""
    progress = progress or Progress("none")
    flip_average = flip_average_of(engine) if flip_average is None else flip_average
    batch_size = engine.default_batch_size if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise InputError(f"batch size {batch_size} must be at least 1 (slices per forward pass)")
    array_axis = 2 - slice_axis
    norm = normalize_intensity(volume)
    slices = norm.movedim(array_axis, 0)  # [N, a, b]
    n, a, b = slices.shape
    probs = torch.zeros((len(prompts), n, a, b), dtype=torch.float32)
    presence = torch.zeros((len(prompts), n), dtype=torch.float32)
    has_presence = False
    active = (slices.flatten(1).amax(1) - slices.flatten(1).amin(1)) > 1e-6
    todo = active.nonzero().flatten()
    size = engine.input_size
    with torch.inference_mode():
        for start in range(0, len(todo), batch_size):
            if cancel is not None and cancel():
                from .errors import Cancelled

                raise Cancelled("cancelled by the user; nothing was written")
            idx = todo[start:start + batch_size]
            x = resize_slices(slices[idx][:, None], size)
            if on_slices is not None:
                on_slices(x)
            p, s = engine.predict(x, prompts)  # [B,P,S,S], [B,P] or None
            if flip_average:
                pf, sf = engine.predict(x.flip(-1), prompts)
                p, s = (p + pf.flip(-1)) / 2, None if s is None else (s + sf) / 2
            probs[:, idx] = resize_slices(p.float().cpu(), (a, b)).clamp_(0, 1).transpose(0, 1)
            if s is not None:
                has_presence = True
                presence[:, idx] = s.float().cpu().t()
            progress.update("segmenting slices", min(start + batch_size, len(todo)), len(todo))
    return probs.movedim(1, 1 + array_axis).numpy(), presence.numpy() if has_presence else None


def apply_presence(mask: np.ndarray, presence: np.ndarray | None, slice_axis: int, gate: float = 1.0) -> np.ndarray:
    """One prompt's mask probabilities ``[K,J,I]`` x its slice presence ``[N]`` -> probabilities ``[K,J,I]``.

    Each slice is scaled by ``min(presence / gate, 1)``: gate 1 is the joint probability (mask x presence); a lower
    gate trusts every slice whose presence exceeds it fully (the gate is calibrated per finding: a head that is
    unsure of a finding's slices should not erase them). ``presence`` None or gate <= 0: the mask unchanged."""
    if presence is None or gate <= 0:
        return mask
    shape = [1, 1, 1]
    shape[2 - slice_axis] = -1
    return mask * np.minimum(presence / gate, 1.0).astype(np.float32).reshape(shape)


def combine_maps(masks: np.ndarray, presence: np.ndarray | None, slice_axis: int, gates, findings,
                 exclusive, judges=None) -> np.ndarray:
    """``predict_maps``' outputs -> the probabilities the found / not-found rule judges, ``[P,K,J,I]``, in place.

    Prompt i's mask is scaled by its slice presence through ``gates[i]`` (``apply_presence``), then the prompts
    compete as their matched ``findings`` (None: no match) and the ``exclusive`` pairs say, against the ``judges``
    maps (``postprocess.suppress_exclusive``). The pipeline and the calibration both call this, so a rule is
    calibrated on the maps it will judge."""
    for i, gate in enumerate(gates):
        masks[i] = apply_presence(masks[i], None if presence is None else presence[i], slice_axis, gate)
    return suppress_exclusive(masks, findings, exclusive, judges)


def predict_probabilities(engine, volume: np.ndarray, prompts: list[str], slice_axis: int,
                          batch_size: int | None = None, progress: Progress | None = None, cancel=None) -> np.ndarray:
    """volume ``[K,J,I]`` -> probabilities ``[P,K,J,I]`` float32: ``predict_maps`` combined by ``apply_presence``
    at gate 1 (mask x slice presence), no competition between prompts."""
    probs, presence = predict_maps(engine, volume, prompts, slice_axis, batch_size, progress, cancel)
    return combine_maps(probs, presence, slice_axis, [1.0] * len(prompts), [None] * len(prompts), ())


def presence_rule(engine, prompt: str, presence: dict) -> tuple[dict, str, float | None]:
    """The found / not-found rule for ``prompt``: the calibrated rule of the trained finding whose phrasings are
    closest in the engine's text embedding space (cosine >= ``match_min_cosine``), else the model's global rule.
    Returns (rule, name of the finding used or 'global', best cosine or None when there is nothing to match)."""
    per = presence.get("per_finding") or {}
    if not per or not hasattr(engine, "text_embeddings"):
        return presence, "global", None
    t = engine.text_embeddings([prompt])[0]
    best, best_cos = "global", -1.0
    for finding, rule in per.items():
        cos = float((engine.text_embeddings(rule["phrases"]) @ t).max())
        if cos > best_cos:
            best, best_cos = finding, cos
    if best_cos < presence.get("match_min_cosine", 1.0):
        return presence, "global", best_cos
    return per[best], best, best_cos


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def unseen_words(prompt: str, engine) -> list[str]:
    """Words of ``prompt`` that no training phrase of the engine's model holds (its spec's ``training.phrases`` and
    ``presence.per_finding`` phrasings); [] when the spec lists no training phrases."""
    spec = getattr(engine, "spec", {}) or {}
    phrases = list((spec.get("training") or {}).get("phrases") or [])
    phrases += [p for r in ((spec.get("presence") or {}).get("per_finding") or {}).values() for p in r.get("phrases", [])]
    vocabulary = {w for p in phrases for w in _words(p)}
    return [w for w in dict.fromkeys(_words(prompt)) if w not in vocabulary] if vocabulary else []


def segment_volume(engine, volume: np.ndarray, geometry: Geometry, prompts: list[str], axis: str | int = "auto",
                   presence: dict | None = None, batch_size: int | None = None, keep_probabilities: bool = False,
                   progress: Progress | None = None, cancel=None) -> SegmentationResult:
    """Segment each prompt's finding in a ``[K,J,I]`` volume. ``presence`` overrides the model's decision rule.

    A prompt matched to a trained finding competes voxel-wise with the findings exclusive with it
    (``postprocess.suppress_exclusive``), each predicted in the model's own phrasing as an extra, unreported prompt:
    so a prompt's mask is the same whatever other prompts are asked with it."""
    prompts = check_prompts(prompts)
    volume = check_volume(volume)
    progress = progress or Progress("none")
    slice_axis = choose_axis(volume.shape, geometry, axis)
    model_presence = (getattr(engine, "spec", {}) or {}).get("presence", {})
    per = model_presence.get("per_finding") or {}
    exclusive = model_presence.get("exclusive") or []
    rules = []
    for prompt in prompts:
        rule, rule_name, cosine = presence_rule(engine, prompt, model_presence)
        cfg = {k: v for k, v in {**rule, **(presence or {})}.items() if k in DEFAULT_PRESENCE or k == "uncertain_margin"}
        rules.append((cfg, rule_name, cosine))
    matched = [name if name != "global" else None for _, name, _ in rules]
    canonical = {f: r["phrases"][0] for f, r in per.items() if r.get("phrases")}
    all_prompts, all_findings, judges = with_rivals(prompts, matched, canonical, exclusive)
    gates = [cfg.get("slice_gate", DEFAULT_PRESENCE["slice_gate"]) for cfg, _, _ in rules]
    gates += [per[g].get("slice_gate", DEFAULT_PRESENCE["slice_gate"]) for g in all_findings[len(prompts):]]
    seen = []
    masks, slice_presence = predict_maps(engine, volume, all_prompts, slice_axis, batch_size, progress, cancel,
                                         on_slices=lambda x: seen.append(slice_features(x)))
    domain = (getattr(engine, "spec", {}) or {}).get("domain")
    features = {k: float(np.median(np.concatenate([f[k] for f in seen]))) for k in seen[0]} if seen else {}
    domain_warnings = check_domain(features, domain)
    combine_maps(masks, slice_presence, slice_axis, gates, all_findings, exclusive, judges)
    masks = masks[:len(prompts)]
    findings = []
    for i, (prompt, (cfg, rule_name, cosine)) in enumerate(zip(prompts, rules)):
        mask, info = decide(masks[i], geometry.spacing, 2 - slice_axis, cfg)
        info["rule"] = rule_name
        info["rule_cosine"] = None if cosine is None else round(cosine, 4)
        info["out_of_domain"] = bool(domain_warnings)
        info["unseen_words"] = unseen_words(prompt, engine)
        info["competes_with"] = sorted({all_findings[j] for j in judges
                                        if matched[i] is not None and all_findings[j] is not None
                                        and {matched[i], all_findings[j]} in [set(p) for p in exclusive]})
        findings.append(FindingResult(prompt, mask, info))
    return SegmentationResult(findings, slice_axis, masks if keep_probabilities else None,
                              domain_message(domain_warnings, domain) if domain_warnings else None, features)
