"""CLIP-TNseg behind the Engine interface: load a verified model spec, cache text embeddings, predict."""

from __future__ import annotations

import torch

from ..clip_backbone import tokenize
from ..errors import ModelError
from ..models import load_weights
from .base import Engine
from .cliptnseg import CLIPTNSegNet, build_network


class CLIPTNSegEngine(Engine):
    name = "cliptnseg"

    def __init__(self, net: CLIPTNSegNet, device: torch.device, spec: dict | None = None, precision: str = "fp32"):
        super().__init__(device, precision)
        self.net = net.to(device).eval()
        self.spec = spec or {}
        self.input_size = net.input_size
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, spec: dict, device: torch.device, precision: str = "fp32") -> "CLIPTNSegEngine":
        net = build_network(spec)
        state = load_weights(spec)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"model {spec['id']!r} weights do not fit its architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the spec and weights come from different exports")
        return cls(net, device, spec, precision)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """``[P,D]`` L2-normalised CLIP text embeddings; each prompt is encoded once per engine."""
        todo = [p for p in prompts if p not in self._text_cache]
        if todo:
            tokens = tokenize(todo, self.net.clip.context_length).to(self.device)
            for p, e in zip(todo, self.net.encode_text(tokens)):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, prompts: list[str]):
        text = self.text_embeddings(prompts)
        with self.autocast():
            mask, presence = self.net(images.to(self.device, torch.float32), text)
        return torch.sigmoid(mask.float()), None if presence is None else torch.sigmoid(presence.float())
