"""CLIP-TNseg behind the engine contract (``engines.contract``): load a verified model spec, encode prompts with the
model's own CLIP text tower (once each), predict mask and slice presence probabilities.

A fine-tuned model may hold learned phrases (``training.finetune``): the spec's ``learned_phrases`` lists them and
its weights hold their embeddings (``LEARNED_KEY``, ``[Q,D]``); a prompt that is one of them (case and spacing aside)
takes its learned embedding, any other prompt the CLIP text embedding.

A fine-tuned model may also keep its parent's network for the parent's findings (``PARENT_KEY``): the spec's
``parent_network`` holds the parent's own spec entries (network, learned phrases, presence, and its own kept parent),
``new_phrases`` the phrases this model was fine-tuned on, and the weights the parent's tensors under ``parent.``
(only those that differ from this model's: the frozen CLIP image tower is stored once). A prompt goes to the
fine-tuned network when its text embedding is closer to a new phrase (its learned or its CLIP embedding) than to any
of the parent's finding phrasings, and at least the spec's ``presence.match_min_cosine`` (the rule matching's own
bound); every other prompt is answered by the parent, unchanged, at the parent's slice size. So what the parent knew
is not touched by fine-tuning."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..clip_backbone import read_prompt, tokenize
from ...errors import ModelError
from ...inference.preprocessing import resize_slices
from ...models import load_weights
from .network import CLIPTNSegNet, build_network
from ..contract import MATCH_MIN_COSINE, Engine, Preprocessing, PromptReading, PromptState

LEARNED_KEY = "learned_phrases.embeddings"  # weights entry [Q,D]: one embedding per spec["learned_phrases"] item
PARENT_KEY = "parent_network"  # spec entry: the kept parent's spec entries (PARENT_SPEC_KEYS)
PARENT_PREFIX = "parent."  # weights of the kept parent that differ from the model's own
PARENT_SPEC_KEYS = ("id", "engine", "clip", "network", "learned_phrases", "presence", "preprocessing", PARENT_KEY,
                    "new_phrases")


def phrase_key(text: str) -> str:
    """How a prompt is matched to a learned phrase: lower case, runs of white space as one space."""
    return " ".join(text.lower().split())


def learned_table(spec: dict, state: dict) -> dict[str, torch.Tensor]:
    """Pop the learned phrase embeddings from a weights ``state`` -> {phrase_key: ``[D]``}, L2-normalised unless the
    network takes unnormalised text embeddings (``text_normalize`` false: a converted CLIPSeg model), as trained."""
    phrases = list(spec.get("learned_phrases") or [])
    table = state.pop(LEARNED_KEY, None)
    if table is None and not phrases:
        return {}
    if table is None or table.ndim != 2 or table.shape[0] != len(phrases):
        raise ModelError(f"model {spec['id']!r} lists {len(phrases)} learned phrases but its weights hold "
                         f"{None if table is None else tuple(table.shape)} as {LEARNED_KEY!r}; the spec and weights "
                         f"come from different exports")
    table = table.float()
    if (spec.get("network") or {}).get("text_normalize", True):
        table = torch.nn.functional.normalize(table, dim=-1)
    return {phrase_key(p): table[i] for i, p in enumerate(phrases)}


class CLIPTNSegEngine(Engine):
    name = "cliptnseg"

    def __init__(self, net: CLIPTNSegNet, device: torch.device, spec: dict | None = None, precision: str = "fp32",
                 learned: dict[str, torch.Tensor] | None = None, parent: "CLIPTNSegEngine | None" = None):
        spec = spec or {}
        self.learned = dict(learned or {})  # phrase_key -> [D] (learned_table)
        # the kept parent (module docstring): answers every prompt not routed to this network
        self.parent = parent
        self._to_parent: dict[str, bool] = {}
        # (new phrases, learned and CLIP's [2Q,D]; parent finding phrasings [R,D]), in this model's text space
        self._route_table = None
        # The models were trained on slices resized to S x S whatever their aspect (datasets.raw_phantom_slice,
        # FolderTriples): they are run the same way unless their spec says otherwise.
        super().__init__(spec, device, precision, Preprocessing.from_spec(spec, net.input_size, fit="squash",
                                                                          context=net.context))
        self.net = net.to(self.device).eval()

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, precision: str = "fp32", state: dict | None = None,
                  shared: dict | None = None, child: CLIPTNSegNet | None = None) -> "CLIPTNSegEngine":
        """The engine of a verified spec; ``state`` (its weights, else read from its files), ``shared`` (a
        child's weights, filling the tensors a kept parent did not store) and ``child`` (that child's network, whose
        CLIP image tower a kept parent that stored none of its own uses: one copy in memory) build a kept parent."""
        net = build_network(spec)
        state = load_weights(spec) if state is None else dict(state)
        parent_state = {k[len(PARENT_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(PARENT_PREFIX)}
        learned = learned_table(spec, state)
        own_visual = any(k.startswith("clip.visual.") for k in state)
        expected = net.state_dict()
        state.update({k: v for k, v in (shared or {}).items() if k in expected and k not in state})
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"model {spec['id']!r} weights do not fit its architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the spec and weights come from different exports")
        if child is not None and not own_visual:
            net.clip.visual = child.clip.visual  # the same frozen tensors: share them
        parent = None
        if spec.get(PARENT_KEY):
            kept = {**spec[PARENT_KEY], "files": [], "_dir": spec.get("_dir")}
            lacking = [k for k in ("id", "clip", "network") if k not in kept]
            if lacking or not parent_state:
                raise ModelError(f"model {spec['id']!r} keeps a parent network ({PARENT_KEY!r}) but "
                                 f"{'its entry lacks ' + ', '.join(lacking) if lacking else 'its weights hold none'}"
                                 f" ({PARENT_PREFIX}*); the spec and weights come from different exports")
            parent = cls.from_spec(kept, device, precision, parent_state, shared=state, child=net)
        elif parent_state:
            raise ModelError(f"model {spec['id']!r} weights hold a kept parent network ({PARENT_PREFIX}*) but its "
                             f"spec has no {PARENT_KEY!r} entry; the spec and weights come from different exports")
        return cls(net, device, spec, precision, learned, parent)

    def _embed(self, texts: list[str], learned: bool = True) -> torch.Tensor:
        """``[N,D]`` text embeddings: the learned one of a learned phrase (unless not ``learned``), else the CLIP text
        tower's."""
        embeddings = self.net.encode_text(tokenize(texts, self.net.clip.context_length).to(self.device))
        for i, text in enumerate(texts):
            if learned and phrase_key(text) in self.learned:
                embeddings[i] = self.learned[phrase_key(text)].to(embeddings)
        return embeddings

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[PromptReading]]:
        """``[N,D]`` L2-normalised CLIP text embeddings, and how the tokenizer read each text (the embedded model's
        text tower holds 16 tokens: a longer prompt is cut, and said to be). With a kept parent, each text is also
        routed (module docstring); the embeddings stay this model's (rule matching compares them)."""
        readings = []
        for text in texts:
            tokens, read_as, truncated = read_prompt(text, self.net.clip.context_length)
            readings.append(PromptReading(text, tokens, truncated, read_as))
        embeddings = self._embed(texts)
        if self.parent is not None:
            routes = self._routes_to_parent(embeddings)
            self._to_parent.update(zip(texts, routes))
            theirs = [t for t, to_parent in zip(texts, routes) if to_parent]
            if theirs:
                self.parent.encode_prompts(theirs)  # routes them in the parent too (cached for infer)
            readings = [replace(r, answered=f"the kept network of '{self.parent.answering_model(t)}'" if to_parent
                                else "the fine-tuned network") for t, r, to_parent in zip(texts, readings, routes)]
        return embeddings, readings

    def answering_model(self, text: str) -> str:
        """The id of the model whose own network answers an encoded ``text`` (this one, or a kept parent's)."""
        if self.parent is None or not self._to_parent.get(text):
            return self.spec.get("id")
        return self.parent.answering_model(text)

    def to_device(self, device) -> "CLIPTNSegEngine":
        """Move this engine and its kept parents to ``device`` (their encoded prompts are forgotten); -> itself."""
        self.device = torch.device(device)
        self.net.to(self.device)
        self.learned = {k: v.to(self.device) for k, v in self.learned.items()}
        self.clear_prompt_cache()
        self._route_table = None
        if self.parent is not None:
            self.parent.to_device(device)
        return self

    def _routes_to_parent(self, embeddings: torch.Tensor) -> list[bool]:
        """For text embeddings ``[N,D]``: whether each goes to the kept parent (module docstring). A new phrase is
        represented by its learned embedding and by its CLIP text embedding (a rewording that is not the exact
        phrase takes CLIP's, which the learned one has drifted from); the bound is the spec's
        ``presence.match_min_cosine`` (the rule matching's own)."""
        if self._route_table is None:
            from ...inference.pipeline import finding_phrases

            new = list(self.spec.get("new_phrases") or [])
            old = [p for p in finding_phrases(self.parent.spec.get("presence") or {})
                   if phrase_key(p) not in {phrase_key(q) for q in new}]
            both = torch.cat([self._embed(new), self._embed(new, learned=False)]) if new else None
            self._route_table = (None if both is None else F.normalize(both.float(), dim=-1),
                                 F.normalize(self._embed(old).float(), dim=-1) if old else None)
        new, old = self._route_table
        if new is None:
            return [True] * len(embeddings)
        bound = (self.spec.get("presence") or {}).get("match_min_cosine", MATCH_MIN_COSINE)
        e = F.normalize(embeddings.float(), dim=-1)
        to_new = (e @ new.T).amax(1)
        to_old = (e @ old.T).amax(1) if old is not None else torch.full_like(to_new, -1.0)
        return [bool(n < bound or n < o) for n, o in zip(to_new, to_old)]

    def _run(self, slices: torch.Tensor, embeddings: torch.Tensor):
        with self.autocast():
            mask, presence = self.runner(self.net)(slices.to(self.device, torch.float32), embeddings)
        return torch.sigmoid(mask.float()), None if presence is None else torch.sigmoid(presence.float())

    def infer(self, slices: torch.Tensor, state: PromptState):
        if self.parent is None:
            return self._run(slices, state.embeddings)
        to_parent = [self._to_parent[p] for p in state.prompts]
        mine = [i for i, t in enumerate(to_parent) if not t]
        theirs = [i for i, t in enumerate(to_parent) if t]
        parts = []
        if mine:
            parts.append((mine, *self._run(slices, state.embeddings[mine])))
        if theirs:
            size = self.preprocessing.input_size
            kept = self.parent.encode_prompts([state.prompts[i] for i in theirs])  # the parent's own embeddings
            if self.parent.preprocessing.context != self.preprocessing.context:  # fine-tuning keeps the parent's
                raise ModelError(f"model {self.spec.get('id')!r} reads {self.preprocessing.context} neighbouring "
                                 f"slice(s) on each side but its kept parent reads "
                                 f"{self.parent.preprocessing.context}; the spec and weights come from different "
                                 f"exports")
            probs, presence = self.parent.infer(resize_slices(slices, self.parent.preprocessing.input_size), kept)
            parts.append((theirs, resize_slices(probs.to(self.device), size),
                          None if presence is None else presence.to(self.device)))
        if len(parts) == 1:
            return parts[0][1:]
        probs = torch.empty(slices.shape[0], len(state.prompts), *slices.shape[-2:], device=self.device)
        presence = None if all(p is None for _, _, p in parts) else torch.ones(probs.shape[:2], device=self.device)
        for index, p, pres in parts:
            probs[:, index] = p
            if presence is not None and pres is not None:
                presence[:, index] = pres
        return probs, presence
