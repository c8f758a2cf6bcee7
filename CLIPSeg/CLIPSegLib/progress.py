"""Progress reporting for long work: a terminal bar, JSON lines (for the Slicer panel), or nothing.

JSON lines go to stdout, one object per line: ``{"event": "progress", "stage": str, "done": int, "total": int}``,
``{"event": "message", "text": str}``, ``{"event": "done", "output": str}``, ``{"event": "error", "message": str,
"exit_code": int}``. Strict JSON: NaN and infinities become null, non-ASCII text is escaped. Messages and bars go to
stderr.
"""

from __future__ import annotations

import json
import math
import sys

MODES = ("bar", "json", "none")


def json_safe(value):
    """``value`` with every NaN or infinite float (also numpy scalars and arrays) replaced by None, tuples as lists:
    what ``json.dumps(..., allow_nan=False)`` accepts (bare ``NaN`` / ``Infinity`` are not JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar or array, torch tensor
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value, **kwargs) -> str:
    """Strict JSON text of ``value`` (``json_safe``; ``kwargs`` go to ``json.dumps``, e.g. ``indent``)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


class Progress:
    def __init__(self, mode: str = "bar"):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} not in {MODES}")
        self.mode = mode
        self._bar = None
        self._stage = None

    def update(self, stage: str, done: int, total: int, info: str = "") -> None:
        """``done`` of ``total`` units of ``stage`` finished; ``info`` is a short status (e.g. the current loss)."""
        if self.mode == "json":
            self.event("progress", stage=stage, done=done, total=total, info=info)
        elif self.mode == "bar":
            from tqdm import tqdm

            if self._stage != stage or self._bar is None:
                self.close()
                self._bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
                self._stage = stage
            if info:
                self._bar.set_postfix_str(info, refresh=False)
            self._bar.update(done - self._bar.n)
            if done >= total:
                self.close()

    def message(self, text: str) -> None:
        if self.mode == "json":
            self.event("message", text=text)
        else:  # bar and none: messages still matter (e.g. "not found"), only the bar is dropped
            self.close()
            print(text, file=sys.stderr, flush=True)

    def done(self, **fields) -> None:
        self.close()
        if self.mode == "json":
            self.event("done", **fields)

    def event(self, kind: str, **fields) -> None:
        """One JSON line ``{"event": kind, **fields}`` on stdout, flushed (whatever the mode)."""
        print(to_json({"event": kind, **fields}), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None
