"""TGC-Net behind the engine contract (``engines.contract``): a verified model spec -> the network with its weights;
prompts encoded once each through DATE (``text``), read back with the knowledge entries they named; masks and
slice presence predicted.

The spec's ``knowledge.file`` names the findings file DATE reads (``knowledge``); when that file's SHA-256 is not the
one the model was trained with, the prompt reading says so (the model reads the edited knowledge, which it never saw
in training). A network with the location cue (``location``) reads the side and zone words of ``locations.file``;
the reading names the location it read ("location: patient's left, lower zone"), and an edit of that file since
training is said the same way."""

from __future__ import annotations

import torch

from ...errors import ModelError
from ...models import load_weights
from ..clip_backbone import read_prompt
from ..contract import Engine, Preprocessing, PromptReading, PromptState
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

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, precision: str = "fp32") -> "TGCNetEngine":
        net = build_network(spec)
        missing, unexpected = net.load_state_dict(load_weights(spec), strict=False)
        if missing or unexpected:
            raise ModelError(f"model {spec['id']!r} weights do not fit its architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the spec and weights come from different exports")
        return cls(net, device, spec, precision)

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[PromptReading]]:
        """``[N,D]`` fused (DATE) embeddings; each reading names the tokens kept and the knowledge entries used."""
        clip = self.net.clip
        batch = self.net.encode_text(texts)
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
            readings.append(PromptReading(text, tokens, truncated, read_as, knowledge=tuple(named)))
        return batch.pooled, readings

    def clear_prompt_cache(self) -> None:
        super().clear_prompt_cache()
        self._text.clear()

    def infer(self, slices: torch.Tensor, state: PromptState):
        text = TextBatch.stack([self._text[p] for p in state.prompts])
        with self.autocast():
            mask, presence, _ = self.net(slices.to(self.device, torch.float32), text)
        return torch.sigmoid(mask.float()), None if presence is None else torch.sigmoid(presence.float())
