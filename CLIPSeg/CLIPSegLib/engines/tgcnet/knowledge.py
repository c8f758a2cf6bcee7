"""DATE's domain knowledge: the versioned findings file (``Resources/Knowledge/findings.json``) and which of its
entries a prompt names.

The file maps each finding (its canonical name) to ``synonyms``, a ``definition`` and its imaging ``appearance``. A
prompt names an entry when the entry's name or one of its synonyms occurs in it as whole words (case, hyphens and a
plural "s" aside); longer names win over the shorter ones they contain ("pleural effusion" over "effusion"). The
engine encodes each named entry's ``knowledge_text`` beside the prompt (``text.DateText``). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import ModelError

KNOWLEDGE_DIR = Path(__file__).resolve().parents[3] / "Resources" / "Knowledge"
DEFAULT_KNOWLEDGE = "findings.json"


def _norm(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower().replace("-", " "))
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words)


@dataclass(frozen=True)
class Knowledge:
    """The findings file read: ``entries`` name -> {synonyms, definition, appearance}; ``version``; ``sha256`` of the
    file's bytes (recorded in a model's spec so a later edit can be told)."""

    entries: dict
    version: str
    sha256: str
    path: str

    def names(self, text: str) -> list[str]:
        """The entries ``text`` names, in the order they occur in it (each once)."""
        norm = f" {_norm(text)} "
        terms = sorted(((f" {_norm(t)} ", name) for name, e in self.entries.items()
                        for t in [name, *e.get("synonyms", [])] if _norm(t)), key=lambda x: -len(x[0]))
        found, taken = [], []
        for term, name in terms:
            start = norm.find(term)
            while start >= 0:
                span = (start, start + len(term))
                if not any(a < span[1] and span[0] < b for a, b in taken):
                    taken.append(span)
                    found.append((start, name))
                start = norm.find(term, start + 1)
        return list(dict.fromkeys(name for _, name in sorted(found)))

    def knowledge_text(self, name: str) -> str:
        """What is encoded for an entry: its canonical name and its imaging appearance."""
        return f"{name}: {self.entries[name]['appearance']}"


def read_json(path: str | Path, what: str, fix: str) -> tuple[Path, bytes, object]:
    """(the file, its bytes, its JSON) of ``path``, a bare name being looked up in ``KNOWLEDGE_DIR``; ModelError
    naming ``what``, the file and ``fix`` when it cannot be read or parsed."""
    path = Path(path)
    if not path.is_absolute() and not path.is_file():
        path = KNOWLEDGE_DIR / path
    try:
        raw = path.read_bytes()
        return path, raw, json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise ModelError(f"{what} {path} cannot be read ({e.strerror}); {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{what} {path} is not valid JSON ({e}); {fix}") from None


def load_knowledge(path: str | Path | None = None) -> Knowledge:
    """Read a findings file (default ``Resources/Knowledge/findings.json``; a bare file name is looked up there).
    ModelError naming the file and the fix when it is missing or malformed."""
    fix = "restore it from the CLIPSeg release, or point the model spec's knowledge.file at a valid findings file"
    path, raw, data = read_json(path or DEFAULT_KNOWLEDGE, "knowledge file", fix)
    entries = data.get("findings") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ModelError(f"knowledge file {path} has no 'findings' object (finding -> synonyms, definition, "
                         f"appearance); {fix}")
    for name, e in entries.items():
        if not isinstance(e, dict) or not isinstance(e.get("appearance"), str) or not e["appearance"].strip():
            raise ModelError(f"knowledge file {path}: finding {name!r} needs an 'appearance' text; {fix}")
        if not isinstance(e.get("synonyms", []), list):
            raise ModelError(f"knowledge file {path}: finding {name!r}: 'synonyms' must be a list of texts; {fix}")
    return Knowledge(entries, str(data.get("version", "")), hashlib.sha256(raw).hexdigest(), str(path))
