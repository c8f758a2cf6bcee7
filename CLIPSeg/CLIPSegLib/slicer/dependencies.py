"""What the background process needs installed, read from the one list the package declares.

``Resources/requirements.txt`` is that list: pyproject.toml reads it (dynamic dependencies) and the Slicer module's
installer reads it here, so every version pin lives in one file. This module imports nothing outside Slicer's own
Python (stdlib only): the panel checks what is missing before anything heavy is installed, and never imports it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from ..errors import ClipSegError

REQUIREMENTS = Path(__file__).resolve().parents[2] / "Resources" / "requirements.txt"
MIN_PYTHON = (3, 11)  # pyproject.toml's requires-python (a test keeps the two equal); Slicer 5.10+ ships 3.12
MIN_SLICER = "5.10"  # the first Slicer release whose Python (3.12) is new enough; Slicer 5.8 ships Python 3.9
TORCH_DISTRIBUTIONS = ("torch", "torchvision")  # installed through the PyTorch extension when it is there
# distribution name (normalised: lower case, runs of -_. as "-") -> the module it installs, where the two differ
IMPORT_NAMES = {"open-clip-torch": "open_clip", "segment-anything": "segment_anything", "pillow": "PIL",
                "simpleitk": "SimpleITK", "grad-cam": "pytorch_grad_cam"}


class DependencyError(ClipSegError):
    """Python packages are missing, or this Slicer's Python is too old to install them."""


def requirements(path: Path = REQUIREMENTS) -> list[str]:
    """The declared requirement strings in file order, e.g. ``["torch==2.14.1", ..., "jsonschema>=4"]``."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def distribution(requirement: str) -> str:
    """``"open_clip_torch==3.3.0"`` -> ``"open_clip_torch"``."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if match is None:
        raise DependencyError(f"requirement {requirement!r} in {REQUIREMENTS} has no package name; fix that line")
    return match.group(0)


def specifier(requirement: str) -> str:
    """The version part: ``"torch==2.14.1"`` -> ``"==2.14.1"`` (``""`` when unpinned)."""
    return requirement.strip()[len(distribution(requirement)):].strip()


def module_name(requirement: str) -> str:
    """The top-level module a requirement installs: ``"open_clip_torch==3.3.0"`` -> ``"open_clip"``."""
    dist = distribution(requirement)
    return IMPORT_NAMES.get(re.sub(r"[-_.]+", "-", dist).lower(), dist.replace("-", "_"))


def is_installed(module: str) -> bool:
    """True if ``module`` can be imported; found without importing it, so nothing heavy enters this process."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(reqs: list[str] | None = None) -> list[str]:
    """The requirements whose module is not installed. Presence only: a torch of another build (e.g. the CUDA one
    the PyTorch extension chose) is kept, not replaced."""
    return [r for r in (requirements() if reqs is None else reqs) if not is_installed(module_name(r))]


def split_torch(reqs: list[str]) -> tuple[list[str], list[str]]:
    """(torch and torchvision requirements, the others)."""
    torch = [r for r in reqs if distribution(r).lower() in TORCH_DISTRIBUTIONS]
    return torch, [r for r in reqs if r not in torch]


def check_python(version=None) -> None:
    """Raise DependencyError, naming the Slicer version needed, when this Python (default: the running one) is too
    old for the declared packages."""
    major, minor = tuple(sys.version_info if version is None else version)[:2]
    if (major, minor) < MIN_PYTHON:
        pins = ", ".join(r for r in requirements() if distribution(r).lower() in ("torch", "monai"))
        raise DependencyError(
            f"CLIPSeg needs 3D Slicer {MIN_SLICER} or later (Python 3.12); this Slicer runs Python {major}.{minor}, "
            f"for which {pins} cannot be installed. Install Slicer {MIN_SLICER} or later from "
            f"https://download.slicer.org, then install CLIPSeg there.")


def missing_message(reqs: list[str]) -> str:
    """What to tell a user whose run cannot start because ``reqs`` are not installed."""
    return (f"CLIPSeg cannot run: these Python packages are missing: {', '.join(reqs)}. Install them with "
            f"logic.ensureDependencies() in Slicer's Python console (or the first Apply in the CLIPSeg panel), "
            f"then run again.")
