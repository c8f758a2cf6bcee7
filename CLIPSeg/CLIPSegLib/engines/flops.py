"""Forward FLOPs of a model call, attention included: the numerator of the benchmarks' FLOP limit.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions, but on CPU it misses attention twice:
``nn.MultiheadAttention``'s fused inference fast path (``_native_multi_head_attention``, which also hides the q/k/v
and output projections) and the CPU flash kernel behind ``scaled_dot_product_attention``. Here the fast path is off
while counting (same arithmetic, decomposed into counted ops) and the CPU flash kernel gets torch's own SDPA formula.
A multiply-add counts as 2 FLOPs, as in torch.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn) -> int:
    """Run ``fn()`` once and return its forward FLOPs (convolutions, matmuls and attention)."""
    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _cpu_flash_flops
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops())
