"""CLIP-TNseg behind the engine contract (``engines.contract``): load a verified model spec, encode prompts with the
model's own CLIP text tower (once each), predict mask and slice presence probabilities.

A fine-tuned model may hold learned phrases (``training.finetune``): the spec's ``learned_phrases`` lists them and
its weights hold their embeddings (``LEARNED_KEY``, ``[Q,D]``); a prompt that is one of them (case and spacing aside)
takes its learned embedding, any other prompt the CLIP text embedding."""

from __future__ import annotations

import torch

from ..clip_backbone import read_prompt, tokenize
from ...errors import ModelError
from ...models import load_weights
from .network import CLIPTNSegNet, build_network
from ..contract import Engine, Preprocessing, PromptReading, PromptState

LEARNED_KEY = "learned_phrases.embeddings"  # weights entry [Q,D]: one embedding per spec["learned_phrases"] item


def phrase_key(text: str) -> str:
    """How a prompt is matched to a learned phrase: lower case, runs of white space as one space."""
    return " ".join(text.lower().split())


def learned_table(spec: dict, state: dict) -> dict[str, torch.Tensor]:
    """Pop the learned phrase embeddings from a weights ``state`` -> {phrase_key: L2-normalised ``[D]``}."""
    phrases = list(spec.get("learned_phrases") or [])
    table = state.pop(LEARNED_KEY, None)
    if table is None and not phrases:
        return {}
    if table is None or table.ndim != 2 or table.shape[0] != len(phrases):
        raise ModelError(f"model {spec['id']!r} lists {len(phrases)} learned phrases but its weights hold "
                         f"{None if table is None else tuple(table.shape)} as {LEARNED_KEY!r}; the spec and weights "
                         f"come from different exports")
    table = torch.nn.functional.normalize(table.float(), dim=-1)
    return {phrase_key(p): table[i] for i, p in enumerate(phrases)}


class CLIPTNSegEngine(Engine):
    name = "cliptnseg"

    def __init__(self, net: CLIPTNSegNet, device: torch.device, spec: dict | None = None, precision: str = "fp32",
                 learned: dict[str, torch.Tensor] | None = None):
        spec = spec or {}
        self.learned = dict(learned or {})  # phrase_key -> [D] (learned_table)
        # The models were trained on slices resized to S x S whatever their aspect (datasets.raw_phantom_slice,
        # FolderTriples): they are run the same way unless their spec says otherwise.
        super().__init__(spec, device, precision, Preprocessing.from_spec(spec, net.input_size, fit="squash"))
        self.net = net.to(self.device).eval()

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, precision: str = "fp32") -> "CLIPTNSegEngine":
        net = build_network(spec)
        state = load_weights(spec)
        learned = learned_table(spec, state)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"model {spec['id']!r} weights do not fit its architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the spec and weights come from different exports")
        return cls(net, device, spec, precision, learned)

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[PromptReading]]:
        """``[N,D]`` L2-normalised CLIP text embeddings, and how the tokenizer read each text (the embedded model's
        text tower holds 16 tokens: a longer prompt is cut, and said to be)."""
        context = self.net.clip.context_length
        readings = []
        for text in texts:
            tokens, read_as, truncated = read_prompt(text, context)
            readings.append(PromptReading(text, tokens, truncated, read_as))
        embeddings = self.net.encode_text(tokenize(texts, context).to(self.device))
        for i, text in enumerate(texts):
            if phrase_key(text) in self.learned:
                embeddings[i] = self.learned[phrase_key(text)].to(embeddings)
        return embeddings, readings

    def infer(self, slices: torch.Tensor, state: PromptState):
        with self.autocast():
            mask, presence = self.net(slices.to(self.device, torch.float32), state.embeddings)
        return torch.sigmoid(mask.float()), None if presence is None else torch.sigmoid(presence.float())
