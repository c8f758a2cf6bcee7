"""Moved to ``CLIPSegLib.models.store``; this name stays for scripts (and the structure check) that import it."""

from .models.store import *  # noqa: F401,F403
