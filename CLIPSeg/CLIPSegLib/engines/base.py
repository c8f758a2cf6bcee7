"""The one interface every engine implements.

``predict(images [B,1,S,S] float in [0,1], prompts [P]) -> (mask probabilities [B,P,S,S], slice presence
probabilities [B,P] or None)`` where ``S = input_size``. An engine without a presence estimate returns None; the
pipeline combines the two per prompt (``pipeline.apply_presence``).
Slices come already normalised and resized by the pipeline; text is embedded once per prompt list and cached.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch

from ..checks import PRECISIONS, check_precision  # noqa: F401  (one list, torch-free)


# Slices per forward pass when the caller gives none. On CPU small batches are faster per slice (the full-resolution
# head is memory-bound; see benchmarks/latency.py's batch sweep: 4 is best at 128 px, 1 at 352 px), so the CPU batch
# holds about CPU_BATCH_PIXELS input pixels; a GPU wants larger ones.
CPU_BATCH_PIXELS = 4 * 128 * 128
CUDA_BATCH_SIZE = 16
# fp32: exact. bf16: autocast matrix products and convolutions to bfloat16 (1.8x faster at paper size on a CPU with
# AVX-512 BF16, masks within Dice 0.986 of fp32 on held-out phantoms; benchmarks/RESULTS.md).


class Engine(ABC):
    name: str = ""
    input_size: int = 0

    def __init__(self, device: torch.device, precision: str = "fp32"):
        self.device = device
        self.precision = check_precision(precision)

    def autocast(self):
        """Context for the forward pass: bf16 autocast on the engine's device, or nothing for fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def default_batch_size(self) -> int:
        if self.device.type == "cuda":
            return CUDA_BATCH_SIZE
        return max(1, round(CPU_BATCH_PIXELS / max(self.input_size, 1) ** 2))

    @abstractmethod
    def predict(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images ``[B,1,S,S]`` in [0,1] on any device -> (mask probabilities ``[B,P,S,S]``, slice presence
        probabilities ``[B,P]`` or None), float32 on ``self.device``."""


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bf16 natively (x86 flags ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``); None when
    it cannot be told (no ``/proc/cpuinfo``, e.g. macOS or Windows)."""
    try:
        with open(cpuinfo) as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
