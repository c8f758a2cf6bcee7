"""CLIP-TNseg (Sun et al., IEEE SPL 2025): frozen CLIP coarse branch + U-Net residual fine branch, fused by a head.

Coarse branch (CLIPSeg-style): activations of the frozen CLIP image tower at several depths are projected to
``reduce_dim``, the deepest one is FiLM-conditioned on the prompt's CLIP text embedding, and a small transformer
decoder adds the shallower ones in turn; two transposed convolutions upsample the ``h x w`` token grid by the patch
size back to the input size. Fine branch: a MONAI residual U-Net on the raw grey image. Head: the two feature maps
concatenated, FiLM-conditioned on the text once more (our choice, so fine detail is also selected by the prompt),
then convolutions to one logit per pixel.

``coarse_style`` "clipseg" makes the coarse branch CLIPSeg's own decoder (Lüddecke & Ecker, CVPR 2022; transformers'
``CLIPSegDecoder``), so its public weights load into it and reproduce its logits (``convert.py``): the class token
goes through the decoder with the patch tokens and is dropped only before upsampling, FiLM is ``x * scale(t) +
shift(t)`` on the unnormalised projected text embedding (``text_normalize: false``), the decoder layers are post-norm
with a ReLU MLP of ``decoder_ff`` channels, and the upsampler is CLIPSeg's ``transposed_conv``: "complex" (3x3 conv,
then two transposed convolutions of stride patch/4; patch 16 only) or "simple" (one transposed convolution of stride
patch). ``coarse_only`` returns the coarse branch's one-channel logits as the mask (the fine branch and head are not
run); ``residual_head`` adds the head's output to them, so a head whose last convolution is zero starts as the coarse
branch alone and fine-tuning only has to learn a correction.

Presence head (our addition, not in the paper): one logit per (slice, prompt) pair, "is this finding in this slice",
from the text-conditioned decoder tokens (mean and max over tokens) and the head features (max over pixels). The
pipeline multiplies the mask probability by the slice presence probability (``pipeline.apply_presence``, with a
per-finding calibrated gate), so a slice the head calls empty cannot carry a confident blob.

Shapes: images ``[B,1,H,W]`` in [0,1] with ``H = W = input size``; tokens ``[P,T]``; mask logits ``[B,P,H,W]``,
presence logits ``[B,P]``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...errors import ModelError
from ...inference.preprocessing import slice_channels
from ...options import CONTEXT_SLICES
from ..clip_backbone import CLIP_MEAN, CLIP_STD, FrozenCLIPNet, build_clip, clip_image_size, to_clip_input

DEFAULT_NETWORK = {
    "extract_layers": [3, 6, 9],  # 1-based depths of the CLIP image tower whose activations feed the decoder
    "reduce_dim": 64,
    "decoder_heads": 4,
    "coarse_channels": 8,
    "fine_channels": [8, 16, 32, 64],
    "head_channels": 16,
    "presence_head": False,  # opt-in: measured worse on nodules for the embedded model (README)
    "coarse_style": "cliptnseg",  # or "clipseg": CLIPSeg's decoder (module docstring)
    "decoder_ff": None,  # decoder MLP channels; None: 2 x reduce_dim
    "film_layer": 0,  # the decoder step (0 = deepest activation) whose sum is FiLM-conditioned
    "transposed_conv": "complex",  # clipseg style only: "complex" or "simple"
    "layer_norm_eps": 1e-5,
    "text_normalize": True,  # L2-normalise the text embedding (CLIPSeg uses it unnormalised)
    "image_mean": None,  # RGB statistics the image tower expects; None: OpenAI CLIP's (clip_backbone.CLIP_MEAN/STD)
    "image_std": None,
    "coarse_only": False,
    "residual_head": False,
    # slice size (pixels) of the fine branch and head; None: the CLIP tower's. Larger: CLIP sees the slice resized
    # to its own size, its coarse map is upsampled, and the fine branch resolves the finer detail
    "input_size": None,
    # neighbouring slices on each side the fine branch also reads, as input channels (our addition, not in the
    # paper): speckle that changes from slice to slice averages out where a faint finding persists. The CLIP coarse
    # branch reads the middle slice only. 0: the slice alone (the paper's network)
    "context_slices": 0,
}
COARSE_STYLES = ("cliptnseg", "clipseg")
TRANSPOSED_CONVS = ("complex", "simple")


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``x * (1 + scale(t)) + shift(t)``, or ``x * scale(t) + shift(t)`` when
    ``around_one`` is False (CLIPSeg's form).

    t ``[N,D]``; x ``[N,C,...]`` or ``[N,L,C]``.
    """

    def __init__(self, text_dim: int, channels: int, channels_last: bool, around_one: bool = True):
        super().__init__()
        self.scale = nn.Linear(text_dim, channels)
        self.shift = nn.Linear(text_dim, channels)
        self.channels_last = channels_last
        self.around_one = around_one

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, b = self.scale(t), self.shift(t)
        shape = (x.shape[0], 1, x.shape[2]) if self.channels_last else (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        s, b = s.view(shape), b.view(shape)
        return x * ((1 + s) if self.around_one else s) + b


class CoarseBranch(nn.Module):
    """Text-conditioned decoder over CLIP token activations -> ``[N, coarse_channels, H, W]``.

    ``cfg``: the network entries ``reduce_dim``, ``decoder_heads``, ``decoder_ff``, ``film_layer``,
    ``layer_norm_eps``, ``coarse_style`` and ``transposed_conv`` (module docstring)."""

    def __init__(self, clip_width: int, text_dim: int, n_layers: int, out_channels: int, patch_size: int, cfg: dict):
        super().__init__()
        rd = cfg["reduce_dim"]
        self.keeps_class_token = cfg["coarse_style"] == "clipseg"
        self.film_layer = cfg["film_layer"]
        self.reduces = nn.ModuleList(nn.Linear(clip_width, rd) for _ in range(n_layers))
        self.film = FiLM(text_dim, rd, channels_last=True, around_one=not self.keeps_class_token)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(rd, cfg["decoder_heads"], dim_feedforward=cfg["decoder_ff"] or 2 * rd,
                                       batch_first=True, dropout=0.0, layer_norm_eps=cfg["layer_norm_eps"])
            for _ in range(n_layers)
        )
        self.upsample = _upsampler(cfg, out_channels, patch_size)

    def forward(self, activations: list[torch.Tensor], text: torch.Tensor, grid: tuple[int, int]):
        """activations: per depth ``[N, T, clip_width]``, shallow to deep (T = h*w patch tokens, after the class
        token when ``keeps_class_token``); text: ``[N, text_dim]``. -> (features ``[N, out_channels, H, W]``, decoded
        patch tokens ``[N, h*w, reduce_dim]``)."""
        a = None
        for i, (act, reduce, block) in enumerate(zip(reversed(activations), self.reduces, self.blocks)):
            a = reduce(act) if a is None else a + reduce(act)
            if i == self.film_layer:
                a = self.film(a, text)
            a = block(a)
        if self.keeps_class_token:
            a = a[:, 1:]
        n, _, c = a.shape
        return self.upsample(a.transpose(1, 2).reshape(n, c, grid[0], grid[1])), a


def _upsampler(cfg: dict, out_channels: int, patch: int) -> nn.Sequential:
    """Transposed convolutions from the token grid ``[N, reduce_dim, h, w]`` to ``[N, out_channels, h*patch,
    w*patch]``: this project's two stages (stride 2, then patch/2), or CLIPSeg's (module docstring)."""
    rd = cfg["reduce_dim"]
    if cfg["coarse_style"] == "cliptnseg":
        if patch % 2:
            raise ValueError(f"patch size must be even for the 2-stage upsampler, got {patch}")
        return nn.Sequential(nn.ConvTranspose2d(rd, rd // 2, kernel_size=2, stride=2), nn.ReLU(),
                             nn.ConvTranspose2d(rd // 2, out_channels, kernel_size=patch // 2, stride=patch // 2))
    if cfg["transposed_conv"] == "simple":
        return nn.Sequential(nn.ConvTranspose2d(rd, out_channels, kernel_size=patch, stride=patch))
    k = patch // 4
    if k * k != patch:
        raise ModelError(f"CLIPSeg's complex transposed convolution upsamples by (patch/4)^2 = {k * k}, not by the "
                         f"patch size {patch}: it needs patch 16; set network.transposed_conv to \"simple\"")
    return nn.Sequential(nn.Conv2d(rd, rd, kernel_size=3, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(rd, rd // 2, kernel_size=k, stride=k), nn.ReLU(),
                         nn.ConvTranspose2d(rd // 2, out_channels, kernel_size=k, stride=k))


def check_network(cfg: dict) -> None:
    """Raise ModelError naming the first network entry (``DEFAULT_NETWORK``) with a value it cannot take."""
    fix = "correct the model spec's network entry"
    unknown = sorted(set(cfg) - set(DEFAULT_NETWORK))
    if unknown:
        raise ModelError(f"network entries {unknown} are not understood (known: {', '.join(DEFAULT_NETWORK)}); {fix}")
    for key, allowed in (("coarse_style", COARSE_STYLES), ("transposed_conv", TRANSPOSED_CONVS)):
        if cfg[key] not in allowed:
            raise ModelError(f"network {key} {cfg[key]!r} is not one of {', '.join(allowed)}; {fix}")
    if not 0 <= cfg["film_layer"] < len(cfg["extract_layers"]):
        raise ModelError(f"network film_layer {cfg['film_layer']} must index one of the {len(cfg['extract_layers'])} "
                         f"decoder steps (0 = the deepest extracted layer); {fix}")
    if (cfg["coarse_only"] or cfg["residual_head"]) and cfg["coarse_channels"] != 1:
        raise ModelError(f"coarse_only and residual_head read the coarse branch as one logit per pixel, but "
                         f"coarse_channels is {cfg['coarse_channels']}; set it to 1 or drop those entries; {fix}")
    if cfg["coarse_only"] and cfg["presence_head"]:
        raise ModelError(f"the presence head reads the head's features, which coarse_only does not compute; turn "
                         f"one of them off; {fix}")
    context = cfg["context_slices"]
    if not isinstance(context, int) or isinstance(context, bool) or context not in CONTEXT_SLICES:
        raise ModelError(f"network context_slices {context!r} must be 0 (the slice alone) to {CONTEXT_SLICES[-1]} "
                         f"neighbouring slices on each side; {fix}")
    fc = cfg["fine_channels"]
    if (not isinstance(fc, (list, tuple)) or len(fc) < 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in fc)):
        raise ModelError(f"network fine_channels {fc!r} must list the fine branch's channels per level, at least two "
                         f"positive whole numbers (e.g. [8, 16, 32, 64]); {fix}")
    stride = 2 ** (len(fc) - 1)
    size = cfg["input_size"]
    if size is not None and (not isinstance(size, int) or size < stride or size % stride):
        raise ModelError(f"network input_size {size!r} must be a multiple of {stride} pixels (the fine branch's "
                         f"stride), e.g. {max(stride, round(size / stride) * stride) if isinstance(size, int) else 256}"
                         f"; {fix}")


class CLIPTNSegNet(FrozenCLIPNet):
    """The full network. ``clip`` is an open_clip CLIP model; it is frozen (no gradients, eval mode)."""

    def __init__(self, clip: nn.Module, network: dict | None = None):
        super().__init__()
        cfg = {**DEFAULT_NETWORK, **(network or {})}
        check_network(cfg)
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
        self.clip_size = clip_image_size(clip)
        self.input_size = cfg["input_size"] or self.clip_size
        self.context = cfg["context_slices"]
        self.channels = slice_channels(self.context)  # input channels: the slice between its neighbours
        width = visual.transformer.width
        text_dim = clip.text_projection.shape[1] if isinstance(clip.text_projection, torch.Tensor) else \
            clip.text_projection.out_features
        self.coarse = CoarseBranch(width, text_dim, len(self.extract), cfg["coarse_channels"], self.patch, cfg)
        self.image_mean = tuple(cfg["image_mean"] or CLIP_MEAN)
        self.image_std = tuple(cfg["image_std"] or CLIP_STD)
        from monai.networks.nets import UNet

        fc = list(cfg["fine_channels"])
        self.fine = UNet(spatial_dims=2, in_channels=self.channels, out_channels=fc[0], channels=fc,
                         strides=[2] * (len(fc) - 1), num_res_units=1)
        hc = cfg["head_channels"]
        self.fuse = nn.Conv2d(cfg["coarse_channels"] + fc[0], hc, 3, padding=1)
        self.head_film = FiLM(text_dim, hc, channels_last=False)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hc, hc, 3, padding=1), nn.ReLU(), nn.Conv2d(hc, 1, 1))
        rd = cfg["reduce_dim"]
        self.presence = (nn.Sequential(nn.Linear(2 * rd + hc, rd), nn.ReLU(), nn.Linear(rd, 1))
                         if cfg["presence_head"] else None)

    def trainable_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[P,T]`` -> text embeddings ``[P,D]``, L2-normalised unless ``text_normalize`` is False."""
        return self.clip.encode_text(tokens, normalize=self.cfg["text_normalize"])

    @torch.no_grad()
    def clip_activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images ``[B,1,S,S]`` in [0,1] (resized to the tower's own size when S differs) -> per extracted depth
        ``[B, T, width]``: the h*w patch tokens, after the class token when the coarse branch keeps it. The blocks
        after the deepest extracted one are not run."""
        if images.shape[-1] != self.clip_size:
            from ...inference.preprocessing import resize_slices

            images = resize_slices(images, self.clip_size)
        x = to_clip_input(images, self.image_mean, self.image_std)
        keep = self.coarse.keeps_class_token
        out = self.frozen_visual().forward_intermediates(x, indices=self.extract, stop_early=True,
                                                         intermediates_only=True, output_fmt="NLC",
                                                         output_extra_tokens=keep)
        if not keep:
            return out["image_intermediates"]
        return [torch.cat([c, a], dim=1) for c, a in zip(out["image_intermediates_prefix"],
                                                          out["image_intermediates"])]

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
        """images ``[B,C,S,S]`` in [0,1] (S = input size; C = 1 + 2 x ``context_slices``, the slice in the middle
        channel between its neighbours); text embeddings ``[P,D]``.
        -> (mask logits, presence logits or None when the network has no presence head).

        Without ``pair_index`` every image is paired with every prompt -> mask ``[B,P,S,S]``, presence ``[B,P]``.
        With ``pair_index`` ``[P]`` (long, values in 0..B-1), prompt n is paired with image ``pair_index[n]``
        -> mask ``[P,S,S]``, presence ``[P]``. CLIP and the fine branch run once per image either way."""
        b, p = images.shape[0], text.shape[0]
        c = self.channels
        if images.ndim != 4 or images.shape[1] != c or images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"images must be [B,{c},{self.input_size},{self.input_size}], got {tuple(images.shape)}")
        per_image = p if pair_index is None else None  # every image with every prompt, image-major
        if pair_index is None:
            pair_index = torch.arange(b, device=images.device).repeat_interleave(p)
            t = text.repeat(b, 1)  # prompt index fastest
            out_shape = (b, p, self.input_size, self.input_size)
        else:
            t = text
            out_shape = (p, self.input_size, self.input_size)
        grid = (self.clip_size // self.patch, self.clip_size // self.patch)
        middle = images[:, self.context:self.context + 1]
        acts = [a[pair_index] for a in self.clip_activations(middle)]
        coarse, tokens = self.coarse(acts, t, grid)
        if self.input_size != self.clip_size:  # the coarse map at the fine branch's size
            coarse = nn.functional.interpolate(coarse, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.cfg["coarse_only"]:
            return coarse.view(out_shape), None
        x = self.head_film(self.fused(coarse, self.fine(images), pair_index, per_image), t)
        mask = self.head(x)
        if self.cfg["residual_head"]:
            mask = mask + coarse
        mask = mask.view(out_shape)
        if self.presence is None:
            return mask, None
        presence = self.presence(torch.cat([tokens.mean(1), tokens.amax(1), torch.relu(x).amax(dim=(2, 3))], dim=1))
        return mask, presence.view(out_shape[:-2])


def build_network(spec: dict) -> CLIPTNSegNet:
    """Random-weight network from a model spec's ``clip`` and ``network`` entries."""
    return CLIPTNSegNet(build_clip(spec["clip"]), spec.get("network"))


def network_at_input_size(net: CLIPTNSegNet, size: int) -> CLIPTNSegNet:
    """``net`` with its weights, taking ``size`` x ``size`` slices (pixels): the fine branch and head work at that
    size, the CLIP tower at its own (``network.input_size``); every weight is size-free, so all are kept."""
    new = CLIPTNSegNet(copy.deepcopy(net.clip), {**net.cfg, "input_size": None if size == net.clip_size else int(size)})
    new.load_state_dict(net.state_dict())
    return new


def widen_from(state: dict, net: CLIPTNSegNet, parent_network: dict) -> dict:
    """A state dict of a narrower network (``parent_network``: its spec ``network`` entry) made to fit ``net``, so
    that ``net`` starts as exactly that network and training decides what the new inputs and channels add:

    - a fine branch that read the slice alone, where ``net`` reads ``context_slices`` c > 0 neighbours: each weight
      reading the input image gets the old kernel on the middle channel and zeros on the neighbours';
    - a wider fine branch (``fine_channels``, the same depth, no level narrower): each old output channel keeps its
      old kernel on the old inputs and reads the new channels with zeros; the new channels keep ``net``'s own random
      initialisation. Inputs joined at a skip connection (a transposed convolution reads [skip, deeper]) are mapped
      part by part; the head's fuse convolution reads the new fine channels with zeros.

    Entries whose shapes already fit are returned as they are. Norms (instance, no weights) and PReLU (one shared
    weight) work per channel, so an old channel's value is unchanged. Weight layouts: ``[out, in, k, k]``,
    transposed convolutions ``[in, out, k, k]``."""
    old_fc = list(parent_network.get("fine_channels", DEFAULT_NETWORK["fine_channels"]))
    new_fc = list(net.cfg["fine_channels"])
    own = net.state_dict()
    out = dict(state)
    for key, value in state.items():
        target = own.get(key)
        if target is None or target.shape == value.shape or not narrower(key, value, target):
            continue  # fits already, or is not a narrower version of the entry (the caller compares shapes)
        transposed = isinstance(net.get_submodule(key.rsplit(".", 1)[0]), nn.ConvTranspose2d)
        wide = target.detach().clone().to(value.dtype)
        if value.ndim == 1:  # a bias: the new output channels follow the old ones
            wide[:value.shape[0]] = value
        else:
            new_w, old_w = (wide.transpose(0, 1), value.transpose(0, 1)) if transposed else (wide, value)
            rows = old_w.shape[0]
            new_w[:rows] = 0
            new_w[:rows, _old_inputs(key, old_w.shape[1], new_w.shape[1], transposed, old_fc, new_fc,
                                     net.channels)] = old_w
        out[key] = wide
    return out


def narrower(key: str, old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether state entry ``key``'s tensor ``old`` is a narrower version of the same entry's tensor ``new`` that
    ``widen_from`` can widen: a fine-branch weight or bias, or the head's fuse weight, of the same rank and kernel,
    no dimension larger."""
    return ((key.startswith("fine.") or key == "fuse.weight") and old.ndim == new.ndim
            and old.shape[2:] == new.shape[2:] and all(a <= b for a, b in zip(old.shape, new.shape)))


INPUT_LAYER = "fine.model.0."  # the fine branch's first residual unit (convolution and residual): reads the image


def _old_inputs(key: str, old_in: int, new_in: int, transposed: bool, old_fc: list, new_fc: list,
                channels: int) -> torch.Tensor:
    """Where a narrower layer's input channels sit among the widened layer's (``widen_from``): in the layer reading
    the image (``INPUT_LAYER``), its one channel in the middle of its neighbours; in a transposed convolution, the
    [skip, deeper] halves apart, the skip part being ``fine_channels`` of its level (the number of nested
    ``submodule`` s in MONAI's UNet key); else a prefix."""
    if old_in == new_in:
        return torch.arange(old_in)
    if key.startswith(INPUT_LAYER) and old_in == 1 and new_in == channels:  # ``channels``: the net's input
        return torch.tensor([channels // 2])
    if transposed:
        level = key.count("submodule")
        skip_old, skip_new = old_fc[level], new_fc[level]
        return torch.cat([torch.arange(skip_old), skip_new + torch.arange(old_in - skip_old)])
    return torch.arange(old_in)
