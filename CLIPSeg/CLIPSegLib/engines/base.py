"""The one interface every engine implements.

``predict(images [B,1,S,S] float in [0,1], prompts [P]) -> probabilities [B,P,S,S]`` where ``S = input_size``.
Slices come already normalised and resized by the pipeline; text is embedded once per prompt list and cached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Engine(ABC):
    name: str = ""
    input_size: int = 0

    def __init__(self, device: torch.device):
        self.device = device

    @abstractmethod
    def predict(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images ``[B,1,S,S]`` in [0,1] on any device -> probabilities ``[B,P,S,S]`` (float32, on ``self.device``)."""
