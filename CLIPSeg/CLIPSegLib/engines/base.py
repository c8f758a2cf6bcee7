"""The one interface every engine implements.

``predict(images [B,1,S,S] float in [0,1], prompts [P]) -> (mask probabilities [B,P,S,S], slice presence
probabilities [B,P] or None)`` where ``S = input_size``. An engine without a presence estimate returns None; the
pipeline combines the two per prompt (``pipeline.apply_presence``).
Slices come already normalised and resized by the pipeline; text is embedded once per prompt list and cached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


# Slices per forward pass when the caller gives none. On CPU small batches are faster per slice (the full-resolution
# head is memory-bound; see benchmarks/latency.py's batch sweep); a GPU wants larger ones.
CPU_BATCH_SIZE = 4
CUDA_BATCH_SIZE = 16


class Engine(ABC):
    name: str = ""
    input_size: int = 0

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def default_batch_size(self) -> int:
        return CUDA_BATCH_SIZE if self.device.type == "cuda" else CPU_BATCH_SIZE

    @abstractmethod
    def predict(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images ``[B,1,S,S]`` in [0,1] on any device -> (mask probabilities ``[B,P,S,S]``, slice presence
        probabilities ``[B,P]`` or None), float32 on ``self.device``."""
