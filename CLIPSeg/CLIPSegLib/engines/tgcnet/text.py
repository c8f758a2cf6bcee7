"""DATE (Domain-Augmented Text Encoder) of TGC-Net: a prompt encoded by the CLIP text tower token by token, beside the
domain knowledge it names (``knowledge``), and the two fused by a learned layer.

For P prompts the encoding is a ``TextBatch``: ``pooled [P,D]`` (the fused sentence embedding, L2-normalised: what
FiLM, the presence head and prompt matching read) and ``tokens [P,L+2,D]`` with ``valid [P,L+2]`` (every token the
tower read, then the knowledge embedding, then the fused embedding: what VLCM's cross-attention reads; a prompt naming
no knowledge entry has its knowledge token marked invalid). D is the CLIP embedding width, L its context length.
``where [P,2]`` (float): each prompt's location cue (side, zone; ``location``), None when the network reads none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..clip_backbone import tokenize


@dataclass
class TextBatch:
    """Encoded prompts (module docstring): ``pooled [P,D]``, ``tokens [P,L+2,D]``, ``valid [P,L+2]`` (bool),
    ``where [P,2]`` or None."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    valid: torch.Tensor
    where: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def rows(self, index) -> "TextBatch":
        """The prompts at ``index`` (a list or long tensor), in that order."""
        return TextBatch(self.pooled[index], self.tokens[index], self.valid[index],
                         None if self.where is None else self.where[index])

    @staticmethod
    def stack(items: list["TextBatch"]) -> "TextBatch":
        where = [i.where for i in items]
        return TextBatch(torch.cat([i.pooled for i in items]), torch.cat([i.tokens for i in items]),
                         torch.cat([i.valid for i in items]),
                         None if any(w is None for w in where) else torch.cat(where))


def text_tokens(clip: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An open_clip text tower run on token ids ``[P,L]`` without pooling -> (projected token features ``[P,L,D]``,
    the end-of-text token's ``[P,D]`` (open_clip's ``encode_text``), ``valid [P,L]``: the tokens up to and including
    the end of text)."""
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(ids).to(cast) + clip.positional_embedding.to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    proj = clip.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    eot = ids.argmax(dim=-1)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    valid = torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]
    return x, pooled, valid


class DateText(nn.Module):
    """The learned fusion of a prompt's embedding with its knowledge embedding: ``fused = raw + mlp([raw, know])``
    (the MLP's last layer starts at zero, so training starts from the raw prompt). ``use_knowledge`` False (the
    "without DATE" ablation): the knowledge is neither encoded nor fused, ``fused = raw``."""

    def __init__(self, dim: int, use_knowledge: bool = True):
        super().__init__()
        self.use_knowledge = use_knowledge
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim)) if use_knowledge else None
        if self.mlp is not None:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def encode(self, clip: nn.Module, knowledge, texts: list[str]) -> TextBatch:
        """P texts -> their ``TextBatch`` through ``clip``'s text tower (with gradient when it has trainable
        adapters); ``knowledge``: a ``knowledge.Knowledge`` (each named entry's ``knowledge_text`` encoded, their mean
        taken)."""
        device = clip.positional_embedding.device
        ctx = clip.context_length
        tokens, raw, valid = text_tokens(clip, tokenize(texts, ctx).to(device))
        raw = nn.functional.normalize(raw, dim=-1)
        know = torch.zeros_like(raw)
        has = torch.zeros(len(texts), dtype=torch.bool, device=device)
        if self.use_knowledge:
            named = [knowledge.names(t) for t in texts]
            entries = sorted({n for ns in named for n in ns})
            if entries:
                _, emb, _ = text_tokens(clip, tokenize([knowledge.knowledge_text(n) for n in entries], ctx).to(device))
                emb = nn.functional.normalize(emb, dim=-1)
                rows = [torch.stack([emb[entries.index(n)] for n in ns]).mean(0) if ns else know[i]
                        for i, ns in enumerate(named)]
                know = torch.stack(rows)
                has = torch.tensor([bool(ns) for ns in named], device=device)
            fused = nn.functional.normalize(raw + self.mlp(torch.cat([raw, know], dim=-1)), dim=-1)
        else:
            fused = raw
        all_tokens = torch.cat([tokens, know[:, None], fused[:, None]], dim=1)
        all_valid = torch.cat([valid, has[:, None], torch.ones_like(has)[:, None]], dim=1)
        return TextBatch(fused, all_tokens, all_valid)
