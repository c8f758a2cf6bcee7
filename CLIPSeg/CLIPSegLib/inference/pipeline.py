"""The slice/volume pipeline: volume ``[K,J,I]`` + prompts -> one mask per prompt, with a presence decision.

It knows engines only through the contract (``engines.contract``): ``encode_prompts``, ``predict``, ``similarity``,
``preprocessing``, ``default_batch_size`` and the spec's generic entries; it imports no engine module.

1. ``engine.encode_prompts`` once per run: the prompts, the trained findings' phrasings (to match each prompt to the
   finding whose calibrated rule judges it, by ``engine.similarity``) and so the rival phrasings too;
2. normalise the whole volume's intensity and cut it into slices along the slice axis (a voxel axis, ``slice_axis``
   0 = I, 1 = J, 2 = K; ``io.geometry``), each fitted to the engine's input (``engine.preprocessing``), in batches;
3. ``engine.predict`` -> mask probabilities fitted back to the slice grid, and slice presence probabilities;
4. per prompt, mask x gated slice presence (``apply_presence``), voxel-wise competition of mutually exclusive
   findings (``postprocess.suppress_exclusive``), then 3D post-processing and the found / not-found decision
   (``postprocess.decide``) with the prompt's calibrated rule; the result says how the prompt was read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_prompts
from .domain import check_domain, comparable_domain, domain_message, slice_features
from .laterality import SIDE_NAMES, frame_flips, patient_sides_of, side_regions
from ..errors import DeviceError
from ..io.geometry import Geometry, array_axis_of, check_volume
from ..options import check_axis, check_batch_size, check_device
from .postprocess import CRITERIA, DEFAULT_PRESENCE, decide, slice_vote, suppress_exclusive, with_rivals
from .preprocessing import INTENSITIES, fit_slices, unfit_slices, with_neighbours
from ..progress import Progress


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA if present else CPU; 'cuda' without a GPU is an error that says what to do (names checked by
    ``options.check_device``)."""
    name = check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but no CUDA GPU is available to PyTorch "
                              f"(torch {torch.__version__}); use --device cpu or --device auto")
    return torch.device(name)


def choose_axis(shape_kji: tuple[int, int, int], geometry: Geometry, axis: str | int = "auto") -> int:
    """Slice axis as a voxel axis index (0 = I, 1 = J, 2 = K); ``shape_kji`` in voxels, array order (K, J, I).

    'auto': an axis one voxel thick makes the volume a 2D image in the other two axes' plane, so that axis is the
    slice axis (one full slice; K, then J, then I if several are), whatever the spacings. Otherwise the axis with
    the largest spacing (the acquisition direction of thick-slice volumes; more than 1% larger), K on ties."""
    axis = check_axis(axis)
    if axis != "auto":
        return int(axis)
    for a in (2, 1, 0):
        if shape_kji[array_axis_of(a)] == 1:
            return a
    spacing = np.asarray(geometry.spacing)
    best = 2
    for a in (0, 1):
        if spacing[a] > spacing[best] * 1.01:
            best = a
    return best


REASONS = {key: text for _, key, text in CRITERIA}
UNITS = {"min_extent_mm": " mm", "min_area_mm2": " mm²", "min_contrast": " speckle spreads", "min_shadow": " spreads"}


def _miss(misses) -> str:
    """[(rule key, value, required)] -> 'mean probability 0.878 < 0.880, ...'."""
    names = {"min_peak": "peak probability", "min_mean": "mean probability", "min_extent_mm": "extent along the "
             "slice axis", "min_area_mm2": "largest cross-section", "min_contrast": "contrast to its surrounding "
             "tissue", "min_shadow": "acoustic shadow below it"}
    return ", ".join(f"{names[k]} {v:.3g}{UNITS.get(k, '')} < {n:.3g}{UNITS.get(k, '')}" for k, v, n in misses)


@dataclass
class FindingResult:
    """Result for one prompt. mask: bool ``[K,J,I]``; info: see ``postprocess.decide`` plus ``rule`` (the trained
    finding whose calibrated rule judged it, or 'global'), ``rule_cosine`` (text similarity to that finding's
    phrasings), ``competes_with`` (rival findings that took voxels from it) and how the engine read the prompt
    (``engines.contract.PromptReading``): ``tokens``, ``truncated``, ``unseen_words``, ``interpreted_as`` and
    ``prompt_warning`` (None, or what the user should know about the prompt); ``kept_to_side`` when the model's
    ``inference.patient_sides`` kept the map to the side the prompt names (``laterality``): side, midline (LPS x,
    mm), margin; ``flip_average``: whether its maps were averaged with the mirrored slice's (``flip_averages_of``),
    ``flip_by_rule``: its finding's rule chose that against the model's setting (the reading says so)."""

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
        """How the prompt was read: what the model read of it, which calibrated rule, which findings compete."""
        rule = self.info.get("rule", "global")
        if rule == "global":
            text = "read with the model's global rule (no trained finding is close to this text)"
        else:
            text = f"read as the trained finding '{rule}' (text similarity {self.info.get('rule_cosine', 1):.2f})"
        if self.info.get("interpreted_as"):
            text = f"{self.info['interpreted_as']}, {text}"
        rivals = self.info.get("competes_with") or []
        if rivals:
            text += "; competes voxel by voxel with " + ", ".join(f"'{r}'" for r in rivals)
        side = self.info.get("kept_to_side")
        if side:
            text += (f"; kept to the patient's {side['side']} (up to {side['margin_mm']:g} mm past the body's midline "
                     f"at LPS x = {side['midline_lps_x_mm']:g} mm)")
        if self.info.get("flip_by_rule"):  # the finding's rule set it against the model's setting
            text += ("; this finding's rule averages each slice with its mirror" if self.info.get("flip_average")
                     else "; this finding's rule does not average slices with their mirror")
        return text

    def message(self) -> str:
        i = self.info
        if self.status == "found":
            mean = f", mean {i['mean']:.2f}" if i.get("mean") is not None else ""
            grown = (f", {i['grown_voxels']} of them joined at probability > {i['grow_threshold']:.2f}"
                     if i.get("grown_voxels") else "")
            head = (f"found ({i['components']} region(s), {i['voxels']} voxels{grown}, peak probability "
                    f"{i['score']:.2f}{mean})")
        elif self.status == "uncertain":
            head = (f"UNCERTAIN: kept {i['components']} region(s), {i['voxels']} voxels, that narrowly miss the "
                    f"model's rule ({_miss(i.get('closest_miss', []))}); check the segment")
        elif not i.get("dropped_components") and i.get("presence_peak", 1.0) < i.get("min_slice_presence", 0.0):
            head = (f"not found: the model's presence score for this finding stays below its rule on every slice "
                    f"(highest {i['presence_peak']:.2f} < {i['min_slice_presence']:.2f}); the segment is empty")
        elif not i.get("dropped_components"):
            head = (f"not found: no voxel above probability {i.get('threshold', 0.5):.2f} (highest "
                    f"{i['score']:.2f}); the segment is empty")
        else:
            why = "; ".join(f"{REASONS[k]} ({n})" for k, n in sorted(i.get("rejected", {}).items(),
                                                                     key=lambda kv: -kv[1]))
            head = (f"not found: {i['dropped_components']} candidate region(s) rejected by the model's rule: {why}; "
                    f"nearest miss: {_miss(i.get('closest_miss', []))}; the segment is empty")
        text = f"{self.prompt!r}: {head} [{self.reading()}]"
        if i.get("prompt_warning"):
            text += f" [warning: {i['prompt_warning']}]"
        if i.get("out_of_domain"):
            text += " [image outside the model's training domain: do not trust this result]"
        return text

    def event(self) -> dict:
        """The JSON-safe summary of this result (for ``--progress json`` and reports)."""
        keys = ("status", "found", "score", "mean", "components", "voxels", "dropped_components", "rejected",
                "closest_miss", "required", "evidence", "rule", "rule_cosine", "competes_with", "tokens", "truncated",
                "unseen_words", "prompt_warning", "out_of_domain", "presence_peak", "min_slice_presence",
                "kept_to_side", "flip_average", "grow_threshold", "grown_voxels")
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
    return bool(((engine.spec or {}).get("inference") or {}).get("flip_average", False))


def _flipped_rows(engine, flip_average, n: int) -> list[int]:
    """The prompts (of ``n``) to average with the mirror: ``flip_average`` None (the model's setting), one bool for
    all, or one per prompt."""
    if flip_average is None or isinstance(flip_average, (bool, np.bool_)):
        use = flip_average_of(engine) if flip_average is None else bool(flip_average)
        return list(range(n)) if use else []
    flags = [bool(f) for f in flip_average]
    if len(flags) != n:
        raise ValueError(f"flip_average has {len(flags)} flags for {n} prompts")
    return [i for i, f in enumerate(flags) if f]


def flip_averages_of(engine, rules) -> list[bool]:
    """Per rule (a prompt's found / not-found rule, ``presence_rules``) whether its maps are flip averaged: the rule's
    own ``flip_average`` (report calibration chooses it per finding: ``calibration.calibrate_rules(flip_choice=)``),
    else the model's (``flip_average_of``)."""
    default = flip_average_of(engine)
    return [bool(r.get("flip_average", default)) for r in rules]


def slice_vote_of(engine) -> int:
    """The model's slice vote window (spec ``inference.slice_vote``, odd, in slices; 1: off)."""
    window = int(((engine.spec or {}).get("inference") or {}).get("slice_vote", 1))
    if window < 1 or window % 2 == 0:
        from ..errors import ModelError

        raise ModelError(f"model {(engine.spec or {}).get('id')!r}: inference.slice_vote {window} must be an odd "
                         f"number of slices (1: off, 3: each slice and its two neighbours)")
    return window


def side_regions_of(engine, volume: np.ndarray, geometry: Geometry, state):
    """(per prompt of ``state`` (a ``PromptState``) the region its map is kept within, or None; the body's midline in
    LPS mm, or None): the model's ``inference.patient_sides`` applied to the side each reading names
    (``laterality``)."""
    margin = patient_sides_of(engine.spec)
    if margin is None:
        return [None] * len(state), None
    return side_regions(volume, geometry, [r.side for r in state.readings], margin)


def predict_patient_frame(engine, volume: np.ndarray, geometry: Geometry, prompts, slice_axis: int,
                          **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    """``predict_maps`` with the slices in the patient's frame when the model reads the patient's sides
    (``laterality.frame_flips``: columns toward the patient's left, rows toward the feet; reversed before the
    network, the maps reversed back); as ``predict_maps`` otherwise."""
    axes = frame_flips(geometry, slice_axis) if patient_sides_of(engine.spec) is not None else ()
    if not axes:
        return predict_maps(engine, volume, prompts, slice_axis, **kwargs)
    volume = np.ascontiguousarray(np.flip(volume, axes))  # in-plane axes: the slices and `only` are unchanged
    masks, presence = predict_maps(engine, volume, prompts, slice_axis, **kwargs)
    return np.ascontiguousarray(np.flip(masks, tuple(1 + a for a in axes))), presence


def predict_maps(engine, volume: np.ndarray, prompts, slice_axis: int, batch_size: int | None = None,
                 progress: Progress | None = None, cancel=None,
                 flip_average: bool | Sequence[bool] | None = None, on_slices=None,
                 only=None) -> tuple[np.ndarray, np.ndarray | None]:
    """volume ``[K,J,I]`` (raw intensities) -> (mask probabilities ``[P,K,J,I]``, slice presence probabilities
    ``[P,N]`` or None if the engine has no presence estimate), float32; N = slices along ``slice_axis``.

    ``prompts``: P texts, or the engine's ``PromptState`` of them (``engine.encode_prompts``). The volume is
    normalised as the engine's ``preprocessing.intensity`` says; slices along ``slice_axis`` (voxel axis 0=I, 1=J,
    2=K) are fitted to its input size (``preprocessing.fit_slices``: padded or squashed) and predicted in batches
    (``batch_size`` slices, default: the engine's for its device), the maps fitted back; constant slices (no signal)
    are skipped and get probability 0; an engine that reads neighbouring slices (``preprocessing.context``) gets each
    slice between them as input channels (``with_neighbours``). ``cancel()`` returning True stops. ``flip_average``
    (default: the model's setting) also predicts each slice mirrored left-right and averages the two, mirrored back:
    twice the compute, fewer stray responses to speckle. The mirrored slice is asked ``engine.mirror_prompts`` (for a
    model reading the patient's sides, "left" and "right" swapped: a line the mirror does not confirm loses
    probability and presence). ``flip_average`` may also be one bool per prompt (a report model's rule says it per
    finding, ``flip_averages_of``): only those prompts are asked of the mirror; a prompt given twice (e.g. once
    with and once without the mirror, ``calibration.collect_flip_variants``) is predicted once. ``on_slices(x)`` is
    called with each
    batch of network input ``[B,1,S,S]`` (the slices, not their neighbours; e.g. to measure what the network sees,
    ``domain.slice_features``). ``only``: the indices of the slices to predict (along ``slice_axis``; the volume is
    still normalised as a whole), the others get probability 0 (e.g. the labelled slices a calibration
    judges)."""
    progress = progress or Progress("none")
    batch_size = check_batch_size(batch_size) or engine.default_batch_size
    state = engine.encode_prompts(list(prompts)) if isinstance(prompts, (list, tuple)) else prompts
    flipped = _flipped_rows(engine, flip_average, len(state))
    prep = engine.preprocessing
    array_axis = array_axis_of(slice_axis)
    slices = INTENSITIES[prep.intensity](volume).movedim(array_axis, 0)  # [N, a, b]
    n, a, b = slices.shape
    probs = torch.zeros((len(state.prompts), n, a, b), dtype=torch.float32)
    presence = torch.zeros((len(state.prompts), n), dtype=torch.float32)
    has_presence = False
    active = (slices.flatten(1).amax(1) - slices.flatten(1).amin(1)) > 1e-6
    if only is not None:
        active &= torch.isin(torch.arange(n), torch.as_tensor(list(only), dtype=torch.long))
    todo = active.nonzero().flatten()
    mirrored = engine.mirror_prompts(state.rows(flipped)) if flipped and len(todo) else None
    unique = list(dict.fromkeys(state.prompts))  # each text predicted once, then spread to its rows
    own = state if len(unique) == len(state) else state.rows([state.prompts.index(t) for t in unique])
    spread = None if own is state else [unique.index(t) for t in state.prompts]
    with torch.inference_mode():
        for start in range(0, len(todo), batch_size):
            if cancel is not None and cancel():
                from ..errors import Cancelled

                raise Cancelled("cancelled by the user; nothing was written")
            idx = todo[start:start + batch_size]
            x = fit_slices(slices[with_neighbours(idx, n, prep.context)], prep.input_size, prep.fit)
            if on_slices is not None:
                on_slices(x[:, prep.context:prep.context + 1])
            p, s = engine.predict(x, own)  # [B,P,S,S], [B,P] or None
            if spread is not None:
                p, s = p[:, spread], None if s is None else s[:, spread]
            if mirrored is not None:
                pf, sf = engine.predict(x.flip(-1), mirrored)
                if spread is None:  # p[:, spread] above is already a copy
                    p, s = p.clone(), None if s is None else s.clone()
                p[:, flipped] = (p[:, flipped] + pf.flip(-1)) / 2
                if s is not None:
                    s[:, flipped] = (s[:, flipped] + sf) / 2
            probs[:, idx] = unfit_slices(p.float().cpu(), (a, b), prep.fit).clamp_(0, 1).transpose(0, 1)
            if s is not None:
                has_presence = True
                presence[:, idx] = s.float().cpu().t()
            progress.update("segmenting slices", min(start + batch_size, len(todo)), len(todo))
    return probs.movedim(1, 1 + array_axis).numpy(), presence.numpy() if has_presence else None


def apply_presence(mask: np.ndarray, presence: np.ndarray | None, slice_axis: int, gate: float = 1.0,
                   floor: float = 0.0) -> np.ndarray:
    """One prompt's mask probabilities ``[K,J,I]`` x its slice presence ``[N]`` -> probabilities ``[K,J,I]``.

    Each slice is scaled by ``min(presence / gate, 1)``: gate 1 is the joint probability (mask x presence); a lower
    gate trusts every slice whose presence exceeds it fully (the gate is calibrated per finding: a head that is
    unsure of a finding's slices should not erase them); gate <= 0 leaves the mask unscaled. A slice whose presence
    is below ``floor`` (the rule's ``min_slice_presence``) is emptied. ``presence`` None: the mask unchanged."""
    if presence is None or (gate <= 0 and floor <= 0):
        return mask
    shape = [1, 1, 1]
    shape[array_axis_of(slice_axis)] = -1
    scale = np.minimum(presence / gate, 1.0) if gate > 0 else np.ones_like(presence)
    scale = np.where(presence < floor, 0.0, scale)
    return mask * scale.astype(np.float32).reshape(shape)


def combine_maps(masks: np.ndarray, presence: np.ndarray | None, slice_axis: int, gates, findings,
                 exclusive, judges=None, floors=None, vote: int = 1, regions=None) -> np.ndarray:
    """``predict_maps``' outputs -> the probabilities the found / not-found rule judges, ``[P,K,J,I]``, in place.

    Prompt i's mask is scaled by its slice presence through ``gates[i]`` (``apply_presence``) and set to 0 outside
    ``regions[i]`` (bool ``[K,J,I]``, or None: everywhere; ``side_regions_of``), then the prompts
    compete as their matched ``findings`` (None: no match) and the ``exclusive`` pairs say, against the ``judges``
    maps (``postprocess.suppress_exclusive``); ``floors[i]``: prompt i's ``min_slice_presence`` (None: 0). Last,
    ``vote`` neighbouring slices vote (``postprocess.slice_vote``; 1: off). The pipeline and the calibration both
    call this, so a rule is calibrated on the maps it will judge."""
    floors = [0.0] * len(gates) if floors is None else floors
    for i, (gate, floor) in enumerate(zip(gates, floors)):
        masks[i] = apply_presence(masks[i], None if presence is None else presence[i], slice_axis, gate, floor)
        if regions is not None and regions[i] is not None:
            masks[i] = np.where(regions[i], masks[i], np.float32(0.0))
    masks = suppress_exclusive(masks, findings, exclusive, judges)
    if vote > 1:
        for i in range(len(masks)):
            masks[i] = slice_vote(masks[i], array_axis_of(slice_axis), vote)
    return masks


def predict_probabilities(engine, volume: np.ndarray, prompts, slice_axis: int,
                          batch_size: int | None = None, progress: Progress | None = None, cancel=None) -> np.ndarray:
    """volume ``[K,J,I]`` -> probabilities ``[P,K,J,I]`` float32: ``predict_maps`` combined by ``apply_presence``
    at gate 1 (mask x slice presence), no competition between prompts; in the array's own frame, without the
    patient's sides a model may read (``segment_volume`` applies them: ``predict_patient_frame``), flip averaged as
    the model says for all prompts (not per finding: ``flip_averages_of``)."""
    probs, presence = predict_maps(engine, volume, prompts, slice_axis, batch_size, progress, cancel)
    return combine_maps(probs, presence, slice_axis, [1.0] * len(probs), [None] * len(probs), ())


def finding_phrases(presence: dict) -> list[str]:
    """Every phrasing of the model's trained findings (``presence.per_finding[*].phrases``), once each."""
    per = presence.get("per_finding") or {}
    return list(dict.fromkeys(p for rule in per.values() for p in rule.get("phrases", [])))


def presence_rules(engine, asked, phrases, presence: dict) -> list[tuple[dict, str, float | None]]:
    """The found / not-found rule for each prompt of ``asked`` (a ``PromptState``): the calibrated rule of the
    trained finding whose knowledge entry the engine read in the prompt (``PromptReading.knowledge``, TGC-Net's DATE:
    exactly one such finding), else of the finding whose phrasings (``phrases``: the state of ``finding_phrases``)
    are closest by ``engine.similarity`` (cosine >= ``match_min_cosine``), else the model's global rule. One (rule,
    name of the finding used or 'global', best cosine or None when there is nothing to match) per prompt."""
    per = {f: r for f, r in (presence.get("per_finding") or {}).items() if r.get("phrases")}
    if not per or phrases is None:
        return [(presence, "global", None)] * len(asked.prompts)
    cosine = engine.similarity(asked, phrases)  # [P, Q]
    column = {p: j for j, p in enumerate(phrases.prompts)}
    by_finding = {f: cosine[:, [column[p] for p in r["phrases"]]].amax(1) for f, r in per.items()}
    rules = []
    for i in range(len(asked.prompts)):
        named = [k for k in asked.readings[i].knowledge if k in per]
        if len(named) == 1:
            rules.append((per[named[0]], named[0], float(by_finding[named[0]][i])))
            continue
        best, best_cos = "global", -1.0
        for finding, cos in by_finding.items():
            if float(cos[i]) > best_cos:
                best, best_cos = finding, float(cos[i])
        rules.append((presence, "global", best_cos) if best_cos < presence.get("match_min_cosine", 1.0)
                     else (per[best], best, best_cos))
    return rules


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
    spec = engine.spec or {}
    model_presence = spec.get("presence") or {}
    per = model_presence.get("per_finding") or {}
    exclusive = model_presence.get("exclusive") or []
    phrases = finding_phrases(model_presence)
    state = engine.encode_prompts(prompts + phrases)  # the only encoding of the run: the rivals are phrasings
    asked = state.take(prompts)
    found_rules = presence_rules(engine, asked, state.take(phrases) if phrases else None, model_presence)
    # a threshold the user sets bounds the mask: the rule's growth below its own threshold goes with it
    override = {**({"grow_threshold": None} if "threshold" in (presence or {}) else {}), **(presence or {})}
    rules = [({k: v for k, v in {**rule, **override}.items()
               if k in DEFAULT_PRESENCE or k in ("uncertain_margin", "min_slice_presence")}, rule_name, cosine)
             for rule, rule_name, cosine in found_rules]
    matched = [name if name != "global" else None for _, name, _ in rules]
    canonical = {f: r["phrases"][0] for f, r in per.items() if r.get("phrases")}
    all_prompts, all_findings, judges = with_rivals(prompts, matched, canonical, exclusive)
    gates = [cfg.get("slice_gate", DEFAULT_PRESENCE["slice_gate"]) for cfg, _, _ in rules]
    gates += [per[g].get("slice_gate", DEFAULT_PRESENCE["slice_gate"]) for g in all_findings[len(prompts):]]
    flips = flip_averages_of(engine, [r for r, _, _ in found_rules] + [per[g] for g in all_findings[len(prompts):]])
    seen = []
    run = state.take(all_prompts)
    masks, slice_presence = predict_patient_frame(engine, volume, geometry, run, slice_axis, batch_size=batch_size,
                                                  progress=progress, cancel=cancel, flip_average=flips,
                                                  on_slices=lambda x: seen.append(slice_features(x)))
    domain = comparable_domain(spec.get("domain"), engine.preprocessing)
    features = {k: float(np.median(np.concatenate([f[k] for f in seen]))) for k in seen[0]} if seen else {}
    domain_warnings = check_domain(features, domain)
    floors = [float(cfg.get("min_slice_presence", 0.0)) for cfg, _, _ in rules]
    floors += [float(per[g].get("min_slice_presence", 0.0)) for g in all_findings[len(prompts):]]
    regions, midline = side_regions_of(engine, volume, geometry, run)
    combine_maps(masks, slice_presence, slice_axis, gates, all_findings, exclusive, judges, floors,
                 slice_vote_of(engine), regions)
    masks = masks[:len(prompts)]
    findings = []
    for i, (prompt, (cfg, rule_name, cosine)) in enumerate(zip(prompts, rules)):
        mask, info = decide(masks[i], geometry.spacing, array_axis_of(slice_axis), cfg, volume)
        info["rule"] = rule_name
        info["rule_cosine"] = None if cosine is None else round(cosine, 4)
        info["out_of_domain"] = bool(domain_warnings)
        info["flip_average"] = flips[i]
        info["flip_by_rule"] = flips[i] != flip_average_of(engine)
        if regions[i] is not None:
            info["kept_to_side"] = {"side": SIDE_NAMES[run.readings[i].side], "midline_lps_x_mm": round(midline, 2),
                                    "margin_mm": patient_sides_of(spec)}
        if slice_presence is not None:
            info["presence_peak"] = round(float(slice_presence[i].max(initial=0.0)), 4)
            info["min_slice_presence"] = floors[i]
        reading = asked.readings[i]
        info.update(tokens=list(reading.tokens), truncated=reading.truncated, unseen_words=list(reading.unseen_words),
                    interpreted_as=reading.interpretation(), prompt_warning=reading.warning())
        info["competes_with"] = sorted({all_findings[j] for j in judges
                                        if matched[i] is not None and all_findings[j] is not None
                                        and {matched[i], all_findings[j]} in [set(p) for p in exclusive]})
        findings.append(FindingResult(prompt, mask, info))
    return SegmentationResult(findings, slice_axis, masks if keep_probabilities else None,
                              domain_message(domain_warnings, domain) if domain_warnings else None, features)
