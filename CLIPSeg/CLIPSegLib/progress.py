"""Progress reporting for long work: a terminal bar, JSON lines (for the Slicer panel), or nothing.

JSON lines go to stdout, one object per line: ``{"event": "progress", "stage": str, "done": int, "total": int}``,
``{"event": "message", "text": str}``, ``{"event": "done", "output": str}``. Messages and bars go to stderr.
"""

from __future__ import annotations

import json
import sys

MODES = ("bar", "json", "none")


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
            print(json.dumps({"event": "progress", "stage": stage, "done": done, "total": total, "info": info}),
                  flush=True)
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
            print(json.dumps({"event": "message", "text": text}), flush=True)
        else:  # bar and none: messages still matter (e.g. "not found"), only the bar is dropped
            self.close()
            print(text, file=sys.stderr, flush=True)

    def done(self, **fields) -> None:
        self.close()
        if self.mode == "json":
            print(json.dumps({"event": "done", **fields}), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None
