"""TGC-Net (Lin et al., 2025) built from the paper's design: a frozen CLIP adapted with few parameters, and three
modules around it.

- **SSE** (Semantic-Structural Synergy Encoder): a light CNN branch (MONAI residual units: a stem at full resolution,
  then one stage per halving down to the ViT's patch stride) beside the frozen CLIP ViT. At each extracted ViT depth
  the tokens are summed with a CNN stage's features pooled to the token grid (deepest depth with the deepest stage),
  and the decoder upsamples the grid back through the CNN stages (skip connections), so structure finer than a patch
  survives. ``sse: false``: no CNN branch, the decoder upsamples the tokens alone.
- **DATE** (Domain-Augmented Text Encoder, ``text.DateText``): the prompt's CLIP text embedding fused with the
  embedding of the domain knowledge it names (``knowledge``). ``date: false``: the raw prompt only.
- **VLCM** (Vision-Language Calibration Module): image tokens attend to the prompt's text tokens (cross-attention),
  the text attends back to the image tokens, and their cosine similarity over the token grid is an extra decoder
  channel and the target of an alignment loss (the mask pooled to the grid; ``alignment_loss``). ``vlcm: false``:
  the tokens are FiLM-conditioned on the text only (as CLIPSeg does).

A location cue (``location``, not in the paper; ``location.py``): the side and zone words of the prompt become two
coordinate maps over the token grid, added to the tokens (a learned projection) before the decoder's first block and
given to the decoder as two more channels, so "left" and "right" differ even where the text tower hardly tells them
apart. ``location: false`` (models trained before it): no cue.

A presence head (``presence_head``) gives one logit per (image, prompt) pair: "what the prompt describes is in this
slice", from the calibrated text and the tokens.

Shapes: images ``[B,1,S,S]`` in [0,1] (S = the CLIP tower's input size); prompts a ``text.TextBatch`` of P; mask
logits ``[B,P,S,S]``, presence ``[B,P]``, similarity ``[B,P,h,w]`` (h = w = S / patch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ModelError
from ..clip_backbone import CLIP_MEAN, CLIP_STD, FrozenCLIPNet, build_clip, clip_image_size, to_clip_input
from ..cliptnseg.network import FiLM
from .knowledge import load_knowledge
from .location import cue_maps, load_locations
from .text import DateText, TextBatch

DEFAULT_NETWORK = {
    "extract_layers": [2, 4, 6],  # 1-based ViT depths whose tokens the decoder reads
    "dim": 64,  # token width of the decoder and VLCM
    "heads": 4,
    "cnn_channels": [8, 16, 32, 64],  # SSE: stem (stride 1) then one stage per halving; len = log2(patch) + 1
    "sse": True,
    "date": True,
    "vlcm": True,
    "presence_head": True,
    "location": False,  # the side/zone cue (module docstring); new report models are trained with it
    "image_mean": None,  # the image tower's RGB statistics; None: OpenAI CLIP's
    "image_std": None,
}
MODULES = ("sse", "date", "vlcm")  # the paper's modules, each with an ablation switch


def check_network(cfg: dict, patch: int, depth: int) -> None:
    """ModelError naming the first network entry that cannot be built with a ViT of ``patch`` pixels and
    ``depth`` blocks."""
    fix = "correct the model spec's network entry"
    unknown = sorted(set(cfg) - set(DEFAULT_NETWORK))
    if unknown:
        raise ModelError(f"network entries {unknown} are not understood (known: {', '.join(DEFAULT_NETWORK)}); {fix}")
    halvings = int(round(math.log2(patch))) if patch > 0 else -1
    if 2 ** halvings != patch or len(cfg["cnn_channels"]) != halvings + 1:
        raise ModelError(f"network cnn_channels has {len(cfg['cnn_channels'])} entries but a ViT patch of {patch} px "
                         f"needs log2(patch) + 1 = {halvings + 1} (a stem, then one stage per halving); {fix}")
    bad = [d for d in cfg["extract_layers"] if not 1 <= d <= depth]
    if bad or not cfg["extract_layers"]:
        raise ModelError(f"network extract_layers {cfg['extract_layers']} must be depths in 1..{depth} (the CLIP "
                         f"image tower's blocks); {fix}")
    if cfg["dim"] % cfg["heads"]:
        raise ModelError(f"network dim {cfg['dim']} must be a multiple of heads {cfg['heads']}; {fix}")


class CNNBranch(nn.Module):
    """SSE's CNN branch: ``[B,1,S,S]`` -> features at strides 1, 2, 4, ..., patch: ``[B, channels[j], S/2^j, S/2^j]``."""

    def __init__(self, channels: list[int]):
        super().__init__()
        from monai.networks.blocks import ResidualUnit

        ins = [1, *channels[:-1]]
        self.stages = nn.ModuleList(ResidualUnit(2, i, o, strides=1 if j == 0 else 2, subunits=1)
                                    for j, (i, o) in enumerate(zip(ins, channels)))

    def forward(self, x):
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class VLCM(nn.Module):
    """Vision-language calibration: tokens ``[N,T,d]``, text tokens ``[N,L,D]`` (``valid [N,L]``) and the pooled text
    ``[N,D]`` -> (calibrated tokens ``[N,T,d]``, calibrated text ``[N,d]``, similarity logits ``[N,T]``)."""

    def __init__(self, dim: int, text_dim: int, heads: int):
        super().__init__()
        self.text_in = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim))
        self.norm_q, self.norm_t = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.image_from_text = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm_i = nn.LayerNorm(dim)
        self.text_from_image = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, tokens, text_tokens, valid, pooled):
        w = self.text_in(text_tokens)
        tokens = tokens + self.image_from_text(self.norm_q(tokens), w, w, key_padding_mask=~valid,
                                               need_weights=False)[0]
        tokens = tokens + self.mlp(tokens)
        t = self.text_in(pooled)[:, None]
        kv = self.norm_i(tokens)
        t = (t + self.text_from_image(self.norm_t(t), kv, kv, need_weights=False)[0])[:, 0]
        sim = nn.functional.normalize(tokens, dim=-1) @ nn.functional.normalize(t, dim=-1)[:, :, None]
        return tokens, t, sim[..., 0] * self.log_scale.exp() + self.bias


class UpStage(nn.Module):
    """One decoder stage: x2 transposed convolution to ``out`` channels, concatenated with the CNN skip of that
    stride when there is one (SSE), then a 3x3 convolution."""

    def __init__(self, cin: int, out: int, skip: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, out, 2, stride=2)
        self.conv = nn.Sequential(nn.Conv2d(2 * out if skip else out, out, 3, padding=1), nn.ReLU())

    def forward(self, x, skip=None):
        x = torch.relu(self.up(x))
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))


class TGCNet(FrozenCLIPNet):
    """The network (module docstring). ``clip``: an open_clip CLIP, frozen here (adapters are added by training);
    ``knowledge``: the ``knowledge.Knowledge`` DATE reads; ``locations``: the ``location.Locations`` the cue reads
    (the default word list when None and the network has the ``location`` entry)."""

    def __init__(self, clip: nn.Module, network: dict | None = None, knowledge=None, locations=None):
        super().__init__()
        cfg = {**DEFAULT_NETWORK, **(network or {})}
        visual = clip.visual
        patch = visual.patch_size
        self.patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        check_network(cfg, self.patch, len(visual.transformer.resblocks))
        self.cfg, self.clip, self.knowledge = cfg, clip, knowledge
        self.locations = (locations or load_locations()) if cfg["location"] else None
        self.freeze_clip()
        self.input_size = clip_image_size(clip)
        self.extract = [d - 1 for d in cfg["extract_layers"]]
        width = visual.transformer.width
        proj = clip.text_projection
        text_dim = proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
        d, cc = cfg["dim"], list(cfg["cnn_channels"])
        self.text = DateText(text_dim, cfg["date"])
        self.reduces = nn.ModuleList(nn.Linear(width, d) for _ in self.extract)
        self.cnn = CNNBranch(cc) if cfg["sse"] else None
        # the CNN stage summed with each extracted depth: deepest depth <- deepest stage, shallower <- shallower
        n = len(cc) - 1
        self.cnn_stage = [max(1, n - (len(self.extract) - 1 - i)) for i in range(len(self.extract))]
        self.cnn_proj = nn.ModuleList(nn.Conv2d(cc[j], d, 1) for j in self.cnn_stage) if cfg["sse"] else None
        self.film = FiLM(text_dim, d, channels_last=True)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, cfg["heads"], dim_feedforward=2 * d, dropout=0.0,
                                                               batch_first=True) for _ in self.extract)
        self.vlcm = VLCM(d, text_dim, cfg["heads"]) if cfg["vlcm"] else None
        self.where = nn.Linear(2, d) if cfg["location"] else None
        grid_in = d + (1 if cfg["vlcm"] else 0) + (2 if cfg["location"] else 0)
        self.ups = nn.ModuleList(UpStage(grid_in if j == n - 1 else cc[j + 1], cc[j], cfg["sse"])
                                 for j in reversed(range(n)))
        self.head = nn.Conv2d(cc[0], 1, 1)
        self.text_out = nn.Identity() if cfg["vlcm"] else nn.Linear(text_dim, d)
        self.presence = (nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, 1))
                         if cfg["presence_head"] else None)
        self.image_mean = tuple(cfg["image_mean"] or CLIP_MEAN)
        self.image_std = tuple(cfg["image_std"] or CLIP_STD)

    def encode_text(self, texts: list[str]) -> TextBatch:
        """P texts -> ``TextBatch`` (DATE; with gradient when the text tower has trainable adapters; ``where`` the
        location cues when the network reads them)."""
        batch = self.text.encode(self.clip, self.knowledge, texts)
        if self.locations is not None:
            batch.where = torch.tensor([self.locations.cue(t) for t in texts], dtype=batch.pooled.dtype,
                                       device=batch.pooled.device)
        return batch

    @torch.no_grad()
    def clip_activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images ``[B,1,S,S]`` -> per extracted depth the patch tokens ``[B, h*w, width]`` (frozen tower)."""
        x = to_clip_input(images, self.image_mean, self.image_std)
        return self.frozen_visual().forward_intermediates(x, indices=self.extract, stop_early=True,
                                                          intermediates_only=True,
                                                          output_fmt="NLC")["image_intermediates"]

    def forward(self, images: torch.Tensor, text: TextBatch, pair_index: torch.Tensor | None = None):
        """images ``[B,1,S,S]``, ``text`` of P prompts -> (mask logits, presence logits or None, similarity logits
        or None). Without ``pair_index`` every image meets every prompt: ``[B,P,S,S]``, ``[B,P]``, ``[B,P,h,w]``;
        with ``pair_index [P]`` prompt n meets image ``pair_index[n]``: ``[P,S,S]``, ``[P]``, ``[P,h,w]``. CLIP and
        the CNN branch run once per image."""
        b, p, s = images.shape[0], len(text), self.input_size
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[-2:] != (s, s):
            raise ValueError(f"images must be [B,1,{s},{s}], got {tuple(images.shape)}")
        if pair_index is None:
            pair_index = torch.arange(b, device=images.device).repeat_interleave(p)
            text = text.rows(torch.arange(p, device=images.device).repeat(b))
            lead = (b, p)
        else:
            lead = (p,)
        h = s // self.patch
        acts = self.clip_activations(images)
        feats = self.cnn(images) if self.cnn is not None else None
        cue = None
        if self.where is not None:
            if text.where is None:
                raise ValueError("this network reads location cues: encode the prompts with encode_text")
            cue = cue_maps(text.where.to(images.dtype), h)  # [N,2,h,h]
        a = None
        for i in reversed(range(len(self.extract))):  # deep to shallow, as CLIPSeg's decoder
            x = self.reduces[i](acts[i])
            if feats is not None:
                g = nn.functional.adaptive_avg_pool2d(feats[self.cnn_stage[i]], h)
                x = x + self.cnn_proj[i](g).flatten(2).transpose(1, 2)
            x = x[pair_index]
            if a is None:
                a = self.film(x, text.pooled)
                if cue is not None:
                    a = a + self.where(cue.flatten(2).transpose(1, 2))
            else:
                a = a + x
            a = self.blocks[len(self.extract) - 1 - i](a)
        sim = None
        if self.vlcm is not None:
            a, t, sim = self.vlcm(a, text.tokens, text.valid, text.pooled)
        else:
            t = self.text_out(text.pooled)
        grid = a.transpose(1, 2).reshape(a.shape[0], -1, h, h)
        if sim is not None:
            grid = torch.cat([grid, sim.view(-1, 1, h, h)], dim=1)
        if cue is not None:
            grid = torch.cat([grid, cue], dim=1)
        x = grid
        for k, up in enumerate(self.ups):
            j = len(self.ups) - 1 - k  # the stride 2^j this stage reaches
            x = up(x, None if feats is None else feats[j][pair_index])
        mask = self.head(x).view(*lead, s, s)
        presence = None
        if self.presence is not None:
            presence = self.presence(torch.cat([t, a.mean(1), a.amax(1)], dim=1)).view(lead)
        return mask, presence, None if sim is None else sim.view(*lead, h, h)


def alignment_loss(sim: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """VLCM's alignment term: BCE of the similarity logits ``[N,h,w]`` against each mask ``[N,S,S]`` pooled to the
    token grid (the share of each patch the mask covers)."""
    target = nn.functional.adaptive_avg_pool2d(masks[:, None].float(), sim.shape[-2:])[:, 0]
    return nn.functional.binary_cross_entropy_with_logits(sim, target)


def build_network(spec: dict) -> TGCNet:
    """Random-weight network from a spec's ``clip``, ``network``, ``knowledge`` and ``locations`` (each
    ``{"file": ...}``) entries."""
    network = spec.get("network") or {}
    return TGCNet(build_clip(spec["clip"]), network, load_knowledge((spec.get("knowledge") or {}).get("file")),
                  load_locations((spec.get("locations") or {}).get("file")) if network.get("location") else None)


def parameter_counts(net: TGCNet) -> dict:
    """{"trainable": ..., "total": ...} parameter counts (the frozen CLIP counted in the total)."""
    params = list(net.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
