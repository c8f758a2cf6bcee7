"""Location words of a report line as a spatial cue for TGC-Net: "left"/"right" (the patient's) and "upper"/"lower"
read from the prompt through an editable word list (``Resources/Knowledge/locations.json``), then turned into
coordinate maps over the slice that the network adds to its tokens and decoder (``network.TGCNet``, entry
``location``).

Why: a small CLIP gives "... in the left lung" and "... in the right lung" nearly the same embedding (cosine 0.994
on the embedded report model), so the network cannot learn from the text alone which half it is asked about. The
cue says it explicitly, in the slice's own frame, and the network learns where each direction ends (midline, zone
boundary) from the image.

Cue of a prompt: ``(side, zone)``, each in {-1, 0, +1}: side +1 = the patient's left, -1 = right; zone +1 = lower
(toward the feet), -1 = upper; 0 = no cue (neither direction named, both named, or a "both" word). Slice frame: the
array order the pipeline hands the engine, columns (I) toward the patient's left and rows (J) toward the feet, as in
a chest radiograph in the standard display and as CLIPSeg's report phantoms are drawn (their geometry: identity LPS
directions, so +I is +x = left). Standard library for reading; torch only in ``cue_maps``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ...errors import ModelError
from .knowledge import _norm, read_json

DEFAULT_LOCATIONS = "locations.json"
AXES = {"side": {"left": 1, "right": -1}, "zone": {"lower": 1, "upper": -1}}  # axis -> direction -> sign


@dataclass(frozen=True)
class Locations:
    """The location words read: ``terms`` axis -> direction (a key of ``AXES[axis]`` or "both") -> normalised
    terms; ``version``; ``sha256`` of the file's bytes; ``path``."""

    terms: dict
    version: str
    sha256: str
    path: str

    def cue(self, text: str) -> tuple[int, int]:
        """``(side, zone)`` of ``text`` (module docstring)."""
        norm = f" {_norm(text)} "
        out = []
        for axis, signs in AXES.items():
            named = {d for d, terms in self.terms[axis].items() if any(f" {t} " in norm for t in terms)}
            out.append(signs[next(iter(named))] if len(named) == 1 and "both" not in named else 0)
        return out[0], out[1]

    @cached_property
    def _side_swap(self):
        """(side term -> its counterpart, the pattern that finds any of them), built once; None without side
        terms."""
        sides = {d: self.terms["side"][d] for d in AXES["side"]}
        swap = {}
        for d, terms in sides.items():
            other = next(o for o in sides if o != d)
            for i, t in enumerate(terms):
                swap.setdefault(t, sides[other][i] if i < len(sides[other]) else sides[other][0])
        if not swap:
            return None
        words = sorted(swap, key=len, reverse=True)
        return swap, re.compile(r"(?<![a-z0-9])(" + "|".join(r"[\s-]+".join(map(re.escape, w.split())) for w in words)
                                + r")(s?)(?![a-z0-9])", re.IGNORECASE)

    def mirrored(self, text: str) -> str:
        """``text`` with each side word swapped for its counterpart ("left" <-> "right", "left-sided" <->
        "right-sided"; the i-th term of one side for the i-th of the other, else its first): what the line says of
        the slice mirrored left-right. Whole words, any case (a capital first letter or all capitals kept), hyphen or
        space between words, plural or not; zone and "both" words and the rest of the line kept as written."""
        if self._side_swap is None:
            return text
        swap, pattern = self._side_swap

        def repl(m):
            said, plural = m.group(1), m.group(2)
            out = swap[" ".join(said.lower().replace("-", " ").split())]  # group 1 is one of the terms
            out = out.replace(" ", "-") if "-" in said else out
            out = out.upper() if said.isupper() and len(said) > 1 else (
                out[:1].upper() + out[1:] if said[:1].isupper() else out)
            return out + plural

        return pattern.sub(repl, text)

    def describe(self, text: str) -> str:
        """The cue in words, for the prompt reading: "patient's left, lower zone", or "no side or zone"."""
        side, zone = self.cue(text)
        parts = ([f"patient's {'left' if side > 0 else 'right'}"] if side else []) + \
                ([f"{'lower' if zone > 0 else 'upper'} zone"] if zone else [])
        return ", ".join(parts) or "no side or zone"


def load_locations(path: str | Path | None = None) -> Locations:
    """Read a location-words file (default ``Resources/Knowledge/locations.json``; a bare name is looked up there).
    ModelError naming the file, the entry and the fix when it is missing or malformed."""
    fix = "restore it from the CLIPSeg release, or point the model spec's locations.file at a valid file"
    path, raw, data = read_json(path or DEFAULT_LOCATIONS, "location words file", fix)
    terms = {}
    for axis, signs in AXES.items():
        entry = data.get(axis) if isinstance(data, dict) else None
        wanted = [*signs, "both"]
        if not isinstance(entry, dict) or set(entry) - set(wanted) or not all(
                isinstance(entry.get(d, []), list) and all(isinstance(t, str) for t in entry.get(d, []))
                for d in wanted):
            raise ModelError(f"location words file {path}: '{axis}' must map {', '.join(wanted)} to lists of words; "
                             f"{fix}")
        terms[axis] = {d: tuple(n for n in (_norm(t) for t in entry.get(d, [])) if n) for d in wanted}
    return Locations(terms, str(data.get("version", "")), hashlib.sha256(raw).hexdigest(), str(path))


def cue_maps(cues, h: int):
    """Cues ``[N,2]`` (side, zone; float tensor) -> coordinate maps ``[N,2,h,h]`` over an h x h grid of cell centres:
    channel 0 = side x column coordinate (-1 at the first column, +1 at the last: toward the patient's left), channel
    1 = zone x row coordinate (toward the feet). Positive where the prompt points, negative on the other side, zero
    everywhere for an axis without a cue."""
    import torch

    c = (torch.arange(h, dtype=cues.dtype, device=cues.device) + 0.5) * (2.0 / h) - 1.0
    grid = torch.stack([c[None, :].expand(h, h), c[:, None].expand(h, h)])  # [2,h,h]: column, row coordinate
    return cues[:, :, None, None] * grid[None]


__all__ = ["AXES", "DEFAULT_LOCATIONS", "Locations", "cue_maps", "load_locations"]
