import torch
from torch import nn

from CLIPSegLib.engines.flops import count_flops


def test_attention_layer_flops_match_the_hand_count():
    """One transformer encoder layer, L tokens of width D, feed-forward F, in inference mode (where PyTorch takes
    the fused fast path): q/k/v + output projections 2*L*4*D^2, scores and weighted sum 2*2*L^2*D, MLP 2*2*L*D*F."""
    torch.manual_seed(0)
    n, length, d, f = 2, 10, 16, 32
    layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=f, batch_first=True, dropout=0.0).eval()
    x = torch.rand(n, length, d)
    with torch.inference_mode():
        flops = count_flops(lambda: layer(x))
    expected = n * (2 * length * 4 * d * d + 2 * 2 * length * length * d + 2 * 2 * length * d * f)
    assert flops == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_sdpa_and_convolution_are_counted():
    q = torch.rand(1, 2, 5, 8)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.inference_mode():
        attn = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q))
        conv_flops = count_flops(lambda: conv(torch.rand(1, 3, 6, 6)))
    assert attn == 2 * 2 * 2 * 5 * 5 * 8
    assert conv_flops == 2 * 6 * 6 * 4 * 3 * 9
