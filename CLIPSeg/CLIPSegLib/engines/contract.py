"""The engine contract: all the pipeline (``pipeline.py``) and the calibration ask of a segmentation engine.

An engine is built from a model spec by ``engines.create_engine`` and offers:

- ``spec``: the model spec (dict). Its generic entries, read by the pipeline whatever the engine: ``presence`` (the
  calibrated found / not-found rules, each trained finding's ``phrases``, the ``exclusive`` pairs: ``postprocess``),
  ``inference`` (``flip_average``: ``pipeline.predict_maps``, the mirrored slice asked ``mirror_prompts``),
  ``domain`` (``domain.check_domain``),
  ``training.phrases`` (with the findings' phrases, the words a prompt is checked against: ``unseen_words``) and
  ``preprocessing`` (``fit`` / ``intensity`` overriding the engine's defaults: ``Preprocessing.from_spec``).
- ``device``, ``precision`` (``checks.PRECISIONS``), ``default_batch_size`` (slices per ``predict`` call).
- ``preprocessing``: ``Preprocessing``, how the pipeline turns a volume's slices into the engine's input.
- ``encode_prompts(texts) -> PromptState``: each text embedded once per engine (cached) and read back: tokens kept,
  truncation, words no training phrase holds, domain knowledge added, which network answers it.
- ``predict(slices [B,C,S,S] float32 in [0,1], state) -> (probabilities [B,P,S,S], presence [B,P] or None)``, float32
  on ``device``; P = the state's prompts, S = ``preprocessing.input_size``, C = ``preprocessing.channels`` (1, or
  the slice between its neighbours for an engine that reads them: ``Preprocessing.context``). Presence is the
  probability that the finding is in the slice at all; None when the engine has no such estimate.
- ``similarity(a, b) -> [Pa,Pb]``: cosine of two states' prompts (a prompt is matched to a trained finding by it).
- ``mirror_prompts(state) -> PromptState``: the prompts as they read on the slices mirrored left-right (flip
  averaging asks the mirror these; the same prompts unless the model reads the patient's sides).
- optional, when ``supports_refine``: ``embed(slices)`` (an image embedding reused across prompts) and
  ``refine(embedding, points, boxes)`` (interactive correction after a text result); otherwise both raise
  ``errors.UnsupportedError`` naming the engine.

A new engine is its own module: a subclass implementing ``encode_texts`` and ``infer`` whose ``__init__(spec, device,
precision)`` passes its ``Preprocessing`` here, plus one line registering its builder in ``engines.ENGINES``
(``Testing/test_engine_contract.py`` shows one).
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..checks import PRECISIONS, check_precision  # noqa: F401  (one list, torch-free)
from ..errors import InputError, ModelError, UnsupportedError
from ..inference.preprocessing import FITS, INTENSITIES, slice_channels

# Slices per forward pass when the caller gives none. On CPU small batches are faster per slice (the full-resolution
# head is memory-bound; see benchmarks/latency.py's batch sweep: 4 is best at 128 px, 1 at 352 px), so the CPU batch
# holds about CPU_BATCH_PIXELS input pixels; a GPU wants larger ones.
CPU_BATCH_PIXELS = 4 * 128 * 128
CUDA_BATCH_SIZE = 16
# A prompt takes a trained finding's rule (calibration, pipeline.presence_rules) only if its text embedding is this
# close (cosine) to one of the finding's phrasings.
MATCH_MIN_COSINE = 0.95
# fp32: exact. bf16: autocast matrix products and convolutions to bfloat16 (1.8x faster at paper size on a CPU with
# AMX, masks within Dice 0.986 of fp32 on held-out phantoms; benchmarks/RESULTS.md; slower without AMX).


@dataclass(frozen=True)
class Preprocessing:
    """How the pipeline prepares an engine's input: ``intensity`` (``preprocessing.INTENSITIES``, applied to the
    whole volume), then each H x W slice made ``input_size`` x ``input_size`` pixels by ``fit``
    (``preprocessing.FITS``: "pad" keeps the aspect ratio, "squash" does not; the maps come back the same way).
    ``context``: neighbouring slices on each side the engine also takes, as input channels (``channels`` = 1 + 2 x
    context, the slice itself in the middle; at the volume's ends the nearest slice repeats); 0: the slice alone."""

    input_size: int
    fit: str = "pad"
    intensity: str = "percentile"
    context: int = 0

    @property
    def channels(self) -> int:
        """Input channels per slice: the slice and ``context`` neighbours on each side."""
        return slice_channels(self.context)

    def __post_init__(self):
        fix = "set the model spec's preprocessing entry to one of them"
        if self.fit not in FITS:
            raise ModelError(f"preprocessing fit {self.fit!r} is not one of {', '.join(FITS)}; {fix}")
        if self.intensity not in INTENSITIES:
            raise ModelError(f"preprocessing intensity {self.intensity!r} is not one of {', '.join(INTENSITIES)}; "
                             f"{fix}")
        if not isinstance(self.input_size, int) or self.input_size < 1:
            raise ModelError(f"input size {self.input_size!r} must be a positive number of pixels")
        if not isinstance(self.context, int) or isinstance(self.context, bool) or self.context < 0:
            raise ModelError(f"context {self.context!r} must be a number of neighbouring slices, 0 or more")

    @classmethod
    def from_spec(cls, spec: dict, input_size: int, fit: str = "pad", intensity: str = "percentile",
                  context: int = 0):
        """The engine's defaults, overridden by the spec's ``preprocessing`` entry (``fit``, ``intensity``);
        ``context`` is the network's own (not a spec choice: the weights fix it)."""
        given = (spec or {}).get("preprocessing") or {}
        unknown = sorted(set(given) - {"fit", "intensity"}) if isinstance(given, dict) else [given]
        if unknown:
            raise ModelError(f"model {(spec or {}).get('id')!r}: preprocessing {unknown!r} is not understood; the "
                             f"entry is an object that may hold fit ({' or '.join(FITS)}) and intensity "
                             f"({', '.join(INTENSITIES)})")
        return cls(int(input_size), given.get("fit", fit), given.get("intensity", intensity), int(context))


def prompt_words(text: str) -> list[str]:
    """The words of a prompt or phrase, lower case, in order (punctuation and spacing dropped)."""
    return re.findall(r"\w+", text.lower())


def training_vocabulary(spec: dict) -> set[str]:
    """The words of every phrase a model was trained or calibrated with: its spec's ``training.phrases`` and
    ``presence.per_finding[*].phrases`` (empty when the spec lists none)."""
    spec = spec or {}
    phrases = list((spec.get("training") or {}).get("phrases") or [])
    per = (spec.get("presence") or {}).get("per_finding") or {}
    phrases += [p for rule in per.values() for p in rule.get("phrases", [])]
    return {w for p in phrases for w in prompt_words(p)}


def unseen_words(text: str, vocabulary: set[str]) -> list[str]:
    """Words of ``text`` (lower case, in order, once each) not in ``vocabulary``; [] when the vocabulary is empty
    (nothing to judge by)."""
    return [w for w in dict.fromkeys(prompt_words(text)) if w not in vocabulary] if vocabulary else []


@dataclass(frozen=True)
class PromptReading:
    """How an engine read one prompt: the ``tokens`` it kept (token strings, e.g. BPE pieces), the text they spell
    (``read_as``; None: the text as given), whether the prompt was ``truncated`` (longer than the engine reads), the
    ``unseen_words`` no training phrase of the model holds, the domain ``knowledge`` entries added (TGC-Net), the
    trained ``finding`` a fixed-vocabulary network chose (``engines.unet``) and, in a fine-tuned model that keeps its
    parent's network, which of the two ``answered`` (``engines.cliptnseg``), and the patient ``side`` it names (+1
    left, -1 right, 0 none or both; engines that read location words, TGC-Net: ``inference.laterality``)."""

    text: str
    tokens: tuple[str, ...] = ()
    truncated: bool = False
    read_as: str | None = None
    unseen_words: tuple[str, ...] = ()
    knowledge: tuple[str, ...] = ()
    finding: str | None = None
    answered: str | None = None
    side: int = 0

    def interpretation(self) -> str:
        """'interpreted as '...' (N tokens)[, with knowledge of: ...][, as the finding '...'][, answered by ...]':
        what the model actually read (``finding``: the trained output a fixed-vocabulary network chose for it;
        ``answered``: the network of a fine-tuned model that answered it)."""
        read = self.text if self.read_as is None else self.read_as
        count = f" ({len(self.tokens)} tokens{', cut' if self.truncated else ''})" if self.tokens else ""
        known = f", with knowledge of: {', '.join(self.knowledge)}" if self.knowledge else ""
        chosen = f", as the finding '{self.finding}'" if self.finding else ""
        by = f", answered by {self.answered}" if self.answered else ""
        return f"interpreted as '{read}'{count}{known}{chosen}{by}"

    def warning(self) -> str | None:
        """None, or what the user should know: words the model never saw in training, a prompt cut short."""
        parts = []
        if self.unseen_words:
            parts.append("words the model never saw in training: " + ", ".join(f"'{w}'" for w in self.unseen_words)
                         + " (the result leans on the words it knows; prefer the phrasing of a trained finding)")
        if self.truncated:
            read = self.text if self.read_as is None else self.read_as
            parts.append(f"the prompt is longer than the model reads and was cut after {len(self.tokens)} tokens: "
                         f"only '{read}' was read; shorten it")
        return "; ".join(parts) or None


@dataclass
class PromptState:
    """Prompts encoded by one engine: ``prompts`` (P texts), ``embeddings`` (``[P,D]`` on the engine's device, or None
    for an engine without text embeddings) and ``readings`` (one ``PromptReading`` each)."""

    prompts: list[str]
    embeddings: torch.Tensor | None
    readings: list[PromptReading] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, prompts: list[str]) -> "PromptState":
        """The state of ``prompts`` (each one of this state's), in that order; nothing is encoded again."""
        index = {}
        for i, p in enumerate(self.prompts):
            index.setdefault(p, i)
        missing = [p for p in prompts if p not in index]
        if missing:
            raise InputError(f"prompts {missing} are not in this prompt state; encode them with "
                             f"engine.encode_prompts first")
        return self.rows([index[p] for p in prompts])

    def rows(self, rows: list[int]) -> "PromptState":
        """The state of the prompts at positions ``rows`` (repeats allowed), in that order; nothing is encoded
        again."""
        emb = None if self.embeddings is None else self.embeddings[list(rows)]
        return PromptState([self.prompts[i] for i in rows], emb, [self.readings[i] for i in rows])


def _check_texts(texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise InputError("no prompt to encode: give at least one finding, e.g. \"thyroid nodule\"")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"prompt {t!r} is empty or not text: each prompt must name a finding, e.g. \"cyst\"")
    return texts


class Engine(ABC):
    """Base of every engine (see the module docstring). Subclasses implement ``encode_texts`` and ``infer``."""

    name: str = ""  # the registry key (engines.ENGINES)
    supports_refine: bool = False  # True: embed and refine are implemented

    def __init__(self, spec: dict | None, device: torch.device | str, precision: str, preprocessing: Preprocessing):
        self.spec = spec if spec is not None else {}
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.preprocessing = preprocessing
        self._encoded: dict[str, tuple[torch.Tensor | None, PromptReading]] = {}

    def runner(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` as this engine's forward passes run it at its precision (``inference_copy``: itself for fp32, its
        bfloat16 copy for bf16; an engine's weights do not change after)."""
        return inference_copy(net, self.precision)

    @property
    def default_batch_size(self) -> int:
        if self.device.type == "cuda":
            return CUDA_BATCH_SIZE
        return max(1, round(CPU_BATCH_PIXELS / self.preprocessing.input_size ** 2))

    def autocast(self):
        """Context for the forward pass: bf16 autocast on the engine's device, or nothing for fp32."""
        return autocast(self.precision, self.device.type)

    def encode_prompts(self, texts: list[str]) -> PromptState:
        """Prompts (P texts, repeats allowed) -> their ``PromptState``. A text is encoded once per engine (later calls
        reuse it); unseen words are judged against the spec's current training phrases. The embeddings carry no
        gradient."""
        texts = _check_texts(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self._encoded]
        if new:
            with torch.no_grad():
                embeddings, readings = self.encode_texts(new)
            for i, (text, reading) in enumerate(zip(new, readings)):
                self._encoded[text] = (None if embeddings is None else embeddings[i], reading)
        vocabulary = training_vocabulary(self.spec)
        encoded = [self._encoded[t] for t in texts]
        readings = [replace(r, unseen_words=tuple(unseen_words(r.text, vocabulary))) for _, r in encoded]
        embeddings = None if any(e is None for e, _ in encoded) else torch.stack([e for e, _ in encoded])
        return PromptState(texts, embeddings, readings)

    def mirror_prompts(self, state: PromptState) -> PromptState:
        """The prompts as they read on the slices mirrored left-right (flip averaging asks the mirror these): the
        same ``state`` for a model that does not read the patient's sides (a mirrored nodule is still a nodule).
        A model that reads them (spec ``inference.patient_sides``) needs an engine that swaps the side words
        (TGC-Net's); any other raises ModelError."""
        from ..inference.laterality import patient_sides_of

        if patient_sides_of(self.spec) is None:
            return state
        raise ModelError(f"model {self.spec.get('id')!r} reads the patient's sides and asks for flip averaging, but "
                         f"the {self.name} engine cannot swap a prompt's side words for the mirrored slice; set "
                         f"inference.flip_average to false in its spec")

    def clear_prompt_cache(self) -> None:
        """Forget every encoded prompt: the next ``encode_prompts`` encodes again (benchmarks time it this way)."""
        self._encoded.clear()

    @abstractmethod
    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor | None, list[PromptReading]]:
        """Distinct new texts (N) -> (embeddings ``[N,D]`` on ``device`` or None, one ``PromptReading`` each, its
        ``unseen_words`` left empty). Called by ``encode_prompts``; call that instead."""

    def predict(self, slices: torch.Tensor, state: PromptState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """slices ``[B,C,S,S]`` float in [0,1] (any device; C = ``preprocessing.channels``, the slice in the middle
        channel), ``state`` from ``encode_prompts`` -> (probabilities ``[B,P,S,S]``, presence ``[B,P]`` or None),
        float32 on ``device``, without gradients."""
        if not isinstance(state, PromptState):
            raise InputError(f"predict takes the PromptState that encode_prompts returns, not a "
                             f"{type(state).__name__}; call engine.encode_prompts(texts) once and pass its result")
        s, c = self.preprocessing.input_size, self.preprocessing.channels
        if slices.ndim != 4 or slices.shape[1] != c or tuple(slices.shape[-2:]) != (s, s):
            raise InputError(f"{self.name} takes slices [B,{c},{s},{s}], got {list(slices.shape)}; fit them with "
                             f"preprocessing.fit_slices{' and stack each with its neighbours' if c > 1 else ''} (the "
                             f"pipeline does)")
        with torch.inference_mode():
            return self.infer(slices, state)

    @abstractmethod
    def infer(self, slices: torch.Tensor, state: PromptState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``predict`` once its input is checked (same arguments and results; runs in inference mode)."""

    def similarity(self, a: PromptState, b: PromptState) -> torch.Tensor:
        """Cosine similarity ``[Pa,Pb]`` (float32, CPU) of two states' prompts, from their embeddings; an engine
        without embeddings has 1 for the same text (case and spacing aside) and 0 otherwise."""
        if a.embeddings is None or b.embeddings is None:
            same = [[float(prompt_words(p) == prompt_words(q)) for q in b.prompts] for p in a.prompts]
            return torch.tensor(same, dtype=torch.float32).reshape(len(a), len(b))
        ea = F.normalize(a.embeddings.float(), dim=-1)
        eb = F.normalize(b.embeddings.float(), dim=-1)
        return (ea @ eb.T).cpu()

    def _unsupported(self, step: str) -> UnsupportedError:
        why = ("declares supports_refine but does not implement it" if self.supports_refine
               else "segments from text only; supports_refine is False")
        return UnsupportedError(f"engine {self.name!r} has no {step} step (it {why}): correct its mask by hand, "
                                f"e.g. in Slicer's Segment Editor, or use an engine that supports refinement with "
                                f"points and boxes")

    def embed(self, slices: torch.Tensor):
        """Optional: slices ``[B,C,S,S]`` (as ``predict``) -> an image embedding reused across prompts and by
        ``refine``."""
        raise self._unsupported("image-embedding")

    def refine(self, embedding, points=None, boxes=None):
        """Optional: an ``embed`` result + points ``[N,2]`` / boxes ``[N,4]`` (input pixels) -> refined
        probabilities."""
        raise self._unsupported("interactive refinement")


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether bf16 pays on this CPU: x86 with AMX bf16 tiles (flag ``amx_bf16``) or Arm with ``bf16``; None when it
    cannot be told (no ``/proc/cpuinfo``, e.g. macOS or Windows). ``avx512_bf16`` alone does not count: on such a CPU
    (2 cores, AVX-512 BF16, no AMX; torch 2.14.1) open_clip ViT-B/16 at 224 took 8.4 s for 32 images with bfloat16
    weights against 6.8 s in fp32, and a training step (batch 8, autocast) 7.2 s against 4.5 s; with AMX the same
    inference took 0.86 s against 4.7 s. The Arm case is not measured here."""
    try:
        with open(cpuinfo) as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
    except OSError:
        return None
    return bool(flags & {"amx_bf16", "bf16"})


def effective_precision(precision: str, device: torch.device, notify=None) -> str:
    """The precision a run on ``device`` uses when ``precision`` (``PRECISIONS``) is asked: bf16 on a CPU where it
    does not pay (``native_bf16`` False) becomes fp32, said through ``notify(text)`` if given."""
    check_precision(precision)
    if precision == "bf16" and torch.device(device).type == "cpu" and native_bf16() is False:
        if notify is not None:
            notify("--precision bf16 ignored: this CPU has no bf16 matrix units (x86 AMX, Arm bf16), where bf16 "
                   "measured 1.2-2x slower than fp32 (AVX-512 BF16 alone does not make it pay); running in fp32")
        return "fp32"
    return precision


COPY_KEY = "_bf16_inference_copy"  # where ``inference_copy`` keeps a module's copy (its ``__dict__``)


def inference_copy(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The module a frozen network's inference passes run: ``module`` itself for fp32; for bf16 a copy in eval mode
    with bfloat16 weights and no gradients, to run under ``autocast`` (which still casts float32 inputs). Why: on a
    CPU, autocast keeps a cast copy of a weight only while the weight requires gradients, so frozen float32 weights
    are cast again at every op; measured (open_clip ViT-B/16 at 224, 32 images, 2 cores, AMX): 5.4 s under autocast
    with frozen float32 weights, 4.7 s in fp32, 0.86 s with bfloat16 weights. Costs the copy's memory (half the
    module's). The copy is made once and kept on ``module`` (outside its submodules, so not in its state dict; made
    again if the module moved to another device): ``module``'s weights must not change after the first call."""
    if precision != "bf16":
        return module
    import copy

    weight = next(module.parameters())
    fast = module.__dict__.pop(COPY_KEY, None)
    if fast is None or next(fast.parameters()).device != weight.device:
        # copies already kept inside ``module`` (a CLIP tower's, say) are left out of this one, not copied twice
        held = [(m, m.__dict__.pop(COPY_KEY)) for m in module.modules() if COPY_KEY in m.__dict__]
        try:
            fast = copy.deepcopy(module).to(torch.bfloat16).eval()
        finally:
            for m, kept in held:
                m.__dict__[COPY_KEY] = kept
        for p in fast.parameters():
            p.requires_grad_(False)
    module.__dict__[COPY_KEY] = fast
    return fast


def autocast(precision: str, device_type: str):
    """Context for a forward pass (inference, or a training step's forward and loss): bf16 autocast on
    ``device_type`` ("cpu", "cuda") for precision bf16, nothing for fp32 (weights and gradients stay float32)."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
