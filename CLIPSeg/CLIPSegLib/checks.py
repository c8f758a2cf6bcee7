"""Input checks that need no torch, so the Slicer process can refuse bad input before it starts a background run.

``clip_backbone.check_prompts`` and the engines use the same checks. The run options' lists and checks
(``PRECISIONS``, ``check_precision``, ...) live in ``options``; the two re-exported here are what the engines import.
"""

from __future__ import annotations

import unicodedata

from .errors import InputError
from .options import PRECISIONS, check_precision  # noqa: F401  (re-exported: engines.contract imports them from here)


def check_prompts(prompts) -> list[str]:
    """Validate prompts: a non-empty list of non-blank strings. Returns them stripped."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise InputError("no prompt given: pass at least one finding, e.g. --prompt \"thyroid nodule\"")
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"empty prompt {p!r}: each prompt must name a finding, e.g. \"anechoic cyst\"")
        p = " ".join(p.split())
        bad = [c for c in p if unicodedata.category(c) in ("Cc", "Cs")]
        if bad:
            raise InputError(f"prompt {p!r} holds control or undecodable characters "
                             f"({', '.join(f'U+{ord(c):04X}' for c in bad[:3])}); type the finding as plain text "
                             f"(undecodable bytes come from a terminal whose encoding is not UTF-8)")
        out.append(p)
    if len(set(p.lower() for p in out)) != len(out):
        raise InputError(f"duplicate prompts {out}: each finding may be asked once per run")
    return out

