"""CLIP-TNseg (Sun et al., IEEE SPL 2025): frozen CLIP coarse branch + U-Net residual fine branch, fused by a head.

Coarse branch (CLIPSeg-style): activations of the frozen CLIP image tower at several depths are projected to
``reduce_dim``, the deepest one is FiLM-conditioned on the prompt's CLIP text embedding, and a small transformer
decoder adds the shallower ones in turn; two transposed convolutions upsample the ``h x w`` token grid by the patch
size back to the input size. Fine branch: a MONAI residual U-Net on the raw grey image. Head: the two feature maps
concatenated, FiLM-conditioned on the text once more (our choice, so fine detail is also selected by the prompt),
then convolutions to one logit per pixel.

Presence head (our addition, not in the paper): one logit per (slice, prompt) pair, "is this finding in this slice",
from the text-conditioned decoder tokens (mean and max over tokens) and the head features (max over pixels). The
pipeline multiplies the mask probability by the slice presence probability (``pipeline.apply_presence``, with a
per-finding calibrated gate), so a slice the head calls empty cannot carry a confident blob.

Shapes: images ``[B,1,H,W]`` in [0,1] with ``H = W = input size``; tokens ``[P,T]``; mask logits ``[B,P,H,W]``,
presence logits ``[B,P]``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..clip_backbone import build_clip, clip_image_size, to_clip_input

DEFAULT_NETWORK = {
    "extract_layers": [3, 6, 9],  # 1-based depths of the CLIP image tower whose activations feed the decoder
    "reduce_dim": 64,
    "decoder_heads": 4,
    "coarse_channels": 8,
    "fine_channels": [8, 16, 32, 64],
    "head_channels": 16,
    "presence_head": False,  # opt-in: measured worse on nodules for the embedded model (README)
}


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``x * (1 + scale(t)) + shift(t)``.

    t ``[N,D]``; x ``[N,C,...]`` or ``[N,L,C]``.
    """

    def __init__(self, text_dim: int, channels: int, channels_last: bool):
        super().__init__()
        self.scale = nn.Linear(text_dim, channels)
        self.shift = nn.Linear(text_dim, channels)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, b = self.scale(t), self.shift(t)
        if self.channels_last:  # [N,L,C]
            return x * (1 + s[:, None, :]) + b[:, None, :]
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return x * (1 + s.view(shape)) + b.view(shape)


class CoarseBranch(nn.Module):
    """Text-conditioned decoder over CLIP token activations -> ``[N, coarse_channels, H, W]``."""

    def __init__(self, clip_width, text_dim, n_layers, reduce_dim, heads, out_channels, patch_size):
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"patch size must be even for the 2-stage upsampler, got {patch_size}")
        self.reduces = nn.ModuleList(nn.Linear(clip_width, reduce_dim) for _ in range(n_layers))
        self.film = FiLM(text_dim, reduce_dim, channels_last=True)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(reduce_dim, heads, dim_feedforward=2 * reduce_dim, batch_first=True,
                                       dropout=0.0)
            for _ in range(n_layers)
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(reduce_dim, reduce_dim // 2, kernel_size=2, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(reduce_dim // 2, out_channels, kernel_size=patch_size // 2, stride=patch_size // 2),
        )

    def forward(self, activations: list[torch.Tensor], text: torch.Tensor, grid: tuple[int, int]):
        """activations: per depth ``[N, L, clip_width]`` (L = h*w tokens, no class token), shallow to deep;
        text: ``[N, text_dim]``. -> (features ``[N, out_channels, H, W]``, decoded tokens ``[N, L, reduce_dim]``)."""
        a = None
        for i, (act, reduce, block) in enumerate(zip(reversed(activations), self.reduces, self.blocks)):
            a = reduce(act) if a is None else a + reduce(act)
            if i == 0:
                a = self.film(a, text)
            a = block(a)
        n, _, c = a.shape
        return self.upsample(a.transpose(1, 2).reshape(n, c, grid[0], grid[1])), a


class CLIPTNSegNet(nn.Module):
    """The full network. ``clip`` is an open_clip CLIP model; it is frozen (no gradients, eval mode)."""

    def __init__(self, clip: nn.Module, network: dict | None = None):
        super().__init__()
        cfg = {**DEFAULT_NETWORK, **(network or {})}
        self.cfg = cfg
        self.clip = clip
        self.freeze_clip()
        visual = clip.visual
        n_blocks = len(visual.transformer.resblocks)
        bad = [d for d in cfg["extract_layers"] if not 1 <= d <= n_blocks]
        if bad:
            raise ValueError(f"extract_layers {bad} outside 1..{n_blocks} (the CLIP image tower's depth)")
        self.extract = [d - 1 for d in cfg["extract_layers"]]
        patch = visual.patch_size
        self.patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.input_size = clip_image_size(clip)
        width = visual.transformer.width
        text_dim = clip.text_projection.shape[1] if isinstance(clip.text_projection, torch.Tensor) else \
            clip.text_projection.out_features
        self.coarse = CoarseBranch(width, text_dim, len(self.extract), cfg["reduce_dim"], cfg["decoder_heads"],
                                   cfg["coarse_channels"], self.patch)
        from monai.networks.nets import UNet

        fc = list(cfg["fine_channels"])
        self.fine = UNet(spatial_dims=2, in_channels=1, out_channels=fc[0], channels=fc,
                         strides=[2] * (len(fc) - 1), num_res_units=1)
        hc = cfg["head_channels"]
        self.fuse = nn.Conv2d(cfg["coarse_channels"] + fc[0], hc, 3, padding=1)
        self.head_film = FiLM(text_dim, hc, channels_last=False)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hc, hc, 3, padding=1), nn.ReLU(), nn.Conv2d(hc, 1, 1))
        rd = cfg["reduce_dim"]
        self.presence = (nn.Sequential(nn.Linear(2 * rd + hc, rd), nn.ReLU(), nn.Linear(rd, 1))
                         if cfg["presence_head"] else None)

    def freeze_clip(self):
        self.clip.eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen tower stays in eval mode
        return self

    def trainable_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[P,T]`` -> L2-normalised text embeddings ``[P,D]``."""
        return self.clip.encode_text(tokens, normalize=True)

    @torch.no_grad()
    def clip_activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images ``[B,1,S,S]`` in [0,1] -> per extracted depth ``[B, h*w, width]``."""
        out = self.clip.visual.forward_intermediates(to_clip_input(images), indices=self.extract,
                                                     intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"]

    def fused(self, coarse: torch.Tensor, fine: torch.Tensor, pair_index: torch.Tensor, prompts: int | None):
        """``fuse(cat[coarse, fine[pair_index]])`` computed without repeating the fine half per prompt.

        The fuse convolution is linear, so it splits into a coarse part (per pair) and a fine part (per image, summed
        in by broadcasting when ``prompts`` pairs per image are laid out image-major, else by ``pair_index``): the
        same result as the paper's concatenation, with the fine half's convolution run once per image instead of
        once per prompt. coarse ``[N,Cc,S,S]``, fine ``[B,Cf,S,S]`` -> ``[N,head_channels,S,S]``."""
        cc = coarse.shape[1]
        w = self.fuse.weight
        xc = nn.functional.conv2d(coarse, w[:, :cc], self.fuse.bias, padding=self.fuse.padding)
        xf = nn.functional.conv2d(fine, w[:, cc:], None, padding=self.fuse.padding)
        if prompts is None:
            return xc + xf[pair_index]
        n, c, h, ww = xc.shape
        return (xc.view(-1, prompts, c, h, ww) + xf[:, None]).view(n, c, h, ww)

    def forward(self, images: torch.Tensor, text: torch.Tensor, pair_index: torch.Tensor | None = None):
        """images ``[B,1,S,S]`` in [0,1] (S = input size); text embeddings ``[P,D]``.
        -> (mask logits, presence logits or None when the network has no presence head).

        Without ``pair_index`` every image is paired with every prompt -> mask ``[B,P,S,S]``, presence ``[B,P]``.
        With ``pair_index`` ``[P]`` (long, values in 0..B-1), prompt n is paired with image ``pair_index[n]``
        -> mask ``[P,S,S]``, presence ``[P]``. CLIP and the fine branch run once per image either way."""
        b, p = images.shape[0], text.shape[0]
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"images must be [B,1,{self.input_size},{self.input_size}], got {tuple(images.shape)}")
        per_image = p if pair_index is None else None  # every image with every prompt, image-major
        if pair_index is None:
            pair_index = torch.arange(b, device=images.device).repeat_interleave(p)
            t = text.repeat(b, 1)  # prompt index fastest
            out_shape = (b, p, self.input_size, self.input_size)
        else:
            t = text
            out_shape = (p, self.input_size, self.input_size)
        grid = (self.input_size // self.patch, self.input_size // self.patch)
        acts = [a[pair_index] for a in self.clip_activations(images)]
        coarse, tokens = self.coarse(acts, t, grid)
        x = self.head_film(self.fused(coarse, self.fine(images), pair_index, per_image), t)
        mask = self.head(x).view(out_shape)
        if self.presence is None:
            return mask, None
        presence = self.presence(torch.cat([tokens.mean(1), tokens.amax(1), torch.relu(x).amax(dim=(2, 3))], dim=1))
        return mask, presence.view(out_shape[:-2])


def build_network(spec: dict) -> CLIPTNSegNet:
    """Random-weight network from a model spec's ``clip`` and ``network`` entries."""
    return CLIPTNSegNet(build_clip(spec["clip"]), spec.get("network"))
