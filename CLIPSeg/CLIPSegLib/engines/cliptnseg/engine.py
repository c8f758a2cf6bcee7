"""CLIP-TNseg behind the engine contract (``engines.contract``): load a verified model spec, encode prompts with the
model's own CLIP text tower (once each), predict mask and slice presence probabilities."""

from __future__ import annotations

import torch

from ..clip_backbone import read_prompt, tokenize
from ...errors import ModelError
from ...models import load_weights
from .network import CLIPTNSegNet, build_network
from ..contract import Engine, Preprocessing, PromptReading, PromptState


class CLIPTNSegEngine(Engine):
    name = "cliptnseg"

    def __init__(self, net: CLIPTNSegNet, device: torch.device, spec: dict | None = None, precision: str = "fp32"):
        spec = spec or {}
        # The models were trained on slices resized to S x S whatever their aspect (datasets.raw_phantom_slice,
        # FolderTriples): they are run the same way unless their spec says otherwise.
        super().__init__(spec, device, precision, Preprocessing.from_spec(spec, net.input_size, fit="squash"))
        self.net = net.to(self.device).eval()

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, precision: str = "fp32") -> "CLIPTNSegEngine":
        net = build_network(spec)
        state = load_weights(spec)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"model {spec['id']!r} weights do not fit its architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the spec and weights come from different exports")
        return cls(net, device, spec, precision)

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[PromptReading]]:
        """``[N,D]`` L2-normalised CLIP text embeddings, and how the tokenizer read each text (the embedded model's
        text tower holds 16 tokens: a longer prompt is cut, and said to be)."""
        context = self.net.clip.context_length
        readings = []
        for text in texts:
            tokens, read_as, truncated = read_prompt(text, context)
            readings.append(PromptReading(text, tokens, truncated, read_as))
        return self.net.encode_text(tokenize(texts, context).to(self.device)), readings

    def infer(self, slices: torch.Tensor, state: PromptState):
        with self.autocast():
            mask, presence = self.net(slices.to(self.device, torch.float32), state.embeddings)
        return torch.sigmoid(mask.float()), None if presence is None else torch.sigmoid(presence.float())
