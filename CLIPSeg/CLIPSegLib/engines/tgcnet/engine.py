"""TGC-Net behind the engine contract (``engines.contract``): a verified model spec -> the network with its weights;
prompts encoded once each through DATE (``text``), read back with the knowledge entries they named; masks and
slice presence predicted.

The spec's ``knowledge.file`` names the findings file DATE reads (``knowledge``); when that file's SHA-256 is not the
one the model was trained with, the prompt reading says so (the model reads the edited knowledge, which it never saw
in training). A network with the location cue (``location``) reads the side and zone words of ``locations.file``;
the reading names the location it read ("location: patient's left, lower zone"), and an edit of that file since
training is said the same way.

Location support (spec ``inference.location_support``, off unless the spec sets it): a line that names a side or a
zone is also asked without them, as the kind alone ("<kind> present", the kind being the one knowledge entry the line
names), and its map is the voxel-wise minimum of the two: the located map says where the line points, the kind's
own map whether that kind is seen there. A line asked on the wrong side, painted where it points, is then held to
what the image shows."""

from __future__ import annotations

import torch

from ...errors import ModelError
from ...inference.laterality import patient_sides_of
from ...models import load_weights
from ..clip_backbone import read_prompt
from ..contract import Engine, Preprocessing, PromptReading, PromptState
from .location import load_locations
from .network import TGCNet, build_network
from .text import TextBatch


def _edited(spec: dict | None, key: str, read) -> bool:
    """Whether the file the network ``read`` (a ``Knowledge`` or ``Locations``, or None) is not the one the spec's
    ``key`` entry recorded at training (its SHA-256 differs)."""
    trained = ((spec or {}).get(key) or {}).get("sha256")
    return bool(trained and read is not None and trained != read.sha256)


class TGCNetEngine(Engine):
    name = "tgcnet"

    def __init__(self, net: TGCNet, device: torch.device, spec: dict | None = None, precision: str = "fp32"):
        super().__init__(spec, device, precision, Preprocessing.from_spec(spec or {}, net.input_size, fit="squash"))
        self.net = net.to(self.device).eval()
        self._text: dict[str, TextBatch] = {}  # text -> its one-row TextBatch (VLCM reads the tokens)
        self.knowledge_edited = _edited(spec, "knowledge", net.knowledge)
        self.locations_edited = _edited(spec, "locations", net.locations)
        self.location_support = bool(((spec or {}).get("inference") or {}).get("location_support"))
        if self.location_support and (net.locations is None or not net.cfg["date"]):
            raise ModelError(f"model {(spec or {}).get('id')!r} asks for inference.location_support, which needs a "
                             f"network with the location cue and DATE; remove the entry from its spec")
        self._support: dict[str, str | None] = {}  # text -> its kind-only line (location support) or None
        # the side each prompt names (PromptReading.side): the network's location words, else the default file when
        # the model reads the patient's sides (inference.laterality)
        self.side_words = net.locations or (load_locations() if patient_sides_of(spec) is not None else None)

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, precision: str = "fp32") -> "TGCNetEngine":
        net = build_network(spec)
        missing, unexpected = net.load_state_dict(load_weights(spec), strict=False)
        if missing or unexpected:
            raise ModelError(f"model {spec['id']!r} weights do not fit its architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the spec and weights come from different exports")
        return cls(net, device, spec, precision)

    def support_text(self, text: str) -> str | None:
        """The kind-only line that backs ``text`` under location support (module docstring), or None: support off,
        no side or zone named, or not exactly one knowledge entry named."""
        if not self.location_support or self.net.locations.cue(text) == (0, 0):
            return None
        named = self.net.knowledge.names(text)
        return f"{named[0]} present" if len(named) == 1 else None

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[PromptReading]]:
        """``[N,D]`` fused (DATE) embeddings; each reading names the tokens kept and the knowledge entries used (and
        the kind-only line backing it under location support). The backing lines are encoded with the texts."""
        clip = self.net.clip
        supports = {t: self.support_text(t) for t in texts}
        extra = [s for s in dict.fromkeys(supports.values()) if s and s not in texts and s not in self._text]
        batch = self.net.encode_text(list(texts) + extra)
        for j, s in enumerate(extra):
            self._text[s] = batch.rows([len(texts) + j])
        self._support.update(supports)
        readings = []
        for i, text in enumerate(texts):
            self._text[text] = batch.rows([i])
            tokens, read_as, truncated = read_prompt(text, clip.context_length)
            named = self.net.knowledge.names(text) if self.net.cfg["date"] else []
            if named and self.knowledge_edited:
                named[-1] += f" (the knowledge file {self.net.knowledge.path} was edited since training)"
            if self.net.locations is not None:
                named.append(f"location: {self.net.locations.describe(text)}" + (
                    f" (the location words file {self.net.locations.path} was edited since training)"
                    if self.locations_edited else ""))
            if supports[text]:
                named.append(f"location backed by the map of '{supports[text]}'")
            side = self.side_words.cue(text)[0] if self.side_words is not None else 0
            readings.append(PromptReading(text, tokens, truncated, read_as, knowledge=tuple(named), side=side))
        return batch.pooled[:len(texts)], readings

    def mirror_prompts(self, state: PromptState) -> PromptState:
        """The prompts with their side words swapped (``Locations.mirrored``: "left" <-> "right"), encoded once
        each: a line about the patient's left asks the mirrored slice about its right. A model that does not read
        the patient's sides (a thyroid model: its flips were trained with the same words): as the contract's."""
        if self.side_words is None or patient_sides_of(self.spec) is None:
            return super().mirror_prompts(state)
        return self.encode_prompts([self.side_words.mirrored(p) for p in state.prompts])

    def clear_prompt_cache(self) -> None:
        super().clear_prompt_cache()
        self._text.clear()
        self._support.clear()

    def infer(self, slices: torch.Tensor, state: PromptState):
        """Masks of the P prompts; under location support a located prompt's mask is the minimum of its own and
        its kind-only line's (predicted in the same batch, columns after the P)."""
        prompts = list(state.prompts)
        support = [self._support.get(p) for p in prompts]
        extra = [s for s in dict.fromkeys(support) if s and s not in prompts]
        text = TextBatch.stack([self._text[p] for p in prompts + extra])
        with self.autocast():
            mask, presence, _ = self.runner(self.net)(slices.to(self.device, torch.float32), text)
        mask = torch.sigmoid(mask.float())
        p = len(prompts)
        own = mask.clone() if any(support) else mask  # the unbacked maps (a backing line may be a prompt too)
        for i, s in enumerate(support):
            if s:
                mask[:, i] = torch.minimum(own[:, i], own[:, prompts.index(s) if s in prompts else p + extra.index(s)])
        return mask[:, :p], None if presence is None else torch.sigmoid(presence[:, :p].float())
