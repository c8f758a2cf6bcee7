"""Weight files: SHA-256, verified loading (safetensors, ``torch.load(weights_only=True)``), kind checks, export.

Weights are safetensors only when a model is built, read after their size and SHA-256 match the spec; a checkpoint
to convert loads as safetensors or a PyTorch pickle restricted to tensors. Nothing here touches the network; torch
and safetensors are imported inside the functions (the Slicer panel imports this package before they exist).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import ModelError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, sha256: str, size: int | None = None) -> None:
    """Raise ModelError unless ``path`` exists with the expected size and SHA-256."""
    if not path.is_file():
        raise ModelError(f"weight file {path} is missing; restore it, or re-create it with the command in the model's "
                         f"spec ('training.command')")
    if size is not None and path.stat().st_size != size:
        raise ModelError(f"weight file {path} has {path.stat().st_size} bytes, expected {size}: it is truncated or "
                         f"replaced; restore the original file")
    digest = sha256_file(path)
    if digest != sha256:
        raise ModelError(f"weight file {path} has SHA-256 {digest}, expected {sha256}: the file is corrupt or not this "
                         f"model's; restore the original file")


def load_weights(spec: dict) -> dict:
    """Verified state dict (name -> tensor, float32) from the spec's safetensors files. A tensor name in more than one
    file is read from the first that has it: a model's own file (listed first by ``write_spec``) wins over the files
    of another model it lists after (e.g. a MedCLIP-SAM model's new SAM over the SAM its CLIP's file also carries)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for entry in spec["files"]:
        path = Path(spec["_dir"]) / entry["name"]
        if path.suffix != ".safetensors":
            raise ModelError(f"{path}: only .safetensors weights are loaded (pickled checkpoints can run arbitrary "
                             f"code); convert it with `clipseg` export tools")
        verify_file(path, entry["sha256"], entry.get("size"))
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"weight file {path} cannot be read as safetensors ({e}); "
                             "restore the original file") from e
        state.update({k: v.float() for k, v in part.items() if k not in state})
    return state


def clip_part(state: dict) -> dict:
    """The CLIP's own state dict out of a model's weights (its ``clip.*`` entries, the prefix dropped)."""
    return {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}


def load_checkpoint(path: Path) -> dict:
    """Tensors of a checkpoint file, loaded safely: safetensors, or a PyTorch pickle restricted to tensors and plain
    containers (``torch.load(weights_only=True)``). A pickle that needs arbitrary code is refused."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(f"checkpoint {path} needs arbitrary code to load (it pickles objects other than tensors), "
                         f"so it is refused for safety; convert it to safetensors with a trusted tool first") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"checkpoint {path} is not a readable PyTorch file ({e}); download it again") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of tensors")
    return state


def check_weight_kind(path: Path, name: str) -> None:
    """Raise ModelError unless ``path`` loads as the kind of file ``name`` says (kind from its suffix).

    ``.safetensors``: a readable header listing at least one tensor; ``.pth``/``.pt``/``.bin``: ``torch.load(
    weights_only=True)`` (memory-mapped, nothing read in full) gives a dict of tensors or a dict holding a state dict;
    ``.json``: a JSON object (open_clip / BiomedCLIP configs). Other suffixes are not checked."""
    suffix = Path(name).suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                n = len(list(fh.keys()))
        except Exception as e:  # noqa: BLE001 - any failure to parse means "not a safetensors file"
            raise ModelError(f"{name}: not a safetensors file ({e}); the file was not kept. Check that you have the "
                             f"right file (a complete download)") from e
        if not n:
            raise ModelError(f"{name}: the safetensors file holds no tensors; the file was not kept")
    elif suffix in (".pth", ".pt", ".bin"):
        import zipfile

        import torch

        try:  # the zip format (torch >= 1.6) is memory-mapped; a legacy pickle has to be read
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # noqa: BLE001 - unpickling untrusted bytes can fail in many ways
            raise ModelError(f"{name}: not a loadable PyTorch weight file ({type(e).__name__}: {e}); the file was "
                             f"not kept. Check that you have the right file (a complete download)") from e
        if isinstance(state, dict):
            inner = [v for k, v in state.items() if k in ("state_dict", "model") and isinstance(v, dict)]
            tensors = [v for d in [state, *inner] for v in d.values() if isinstance(v, torch.Tensor)]
        else:
            tensors = []
        if not tensors:
            raise ModelError(f"{name}: the PyTorch file holds a {type(state).__name__} without tensors, not weights; "
                             f"the file was not kept")
    elif suffix == ".json":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{name}: not valid JSON ({e}); the file was not kept") from e
        if not isinstance(data, dict):
            raise ModelError(f"{name}: expected a JSON object (a model configuration), got a "
                             f"{type(data).__name__}; the file was not kept")


def write_spec(spec: dict, weights: dict, out_dir: Path, half: bool = True, extra_files=()) -> Path:
    """Write ``<id>.safetensors`` (fp16 unless ``half=False``) and ``<id>.json`` with size and SHA-256;
    ``extra_files``: entries (name, sha256, size) of other files in ``out_dir`` the model also loads, listed after
    (``load_weights`` reads a tensor these share with ``weights`` from ``weights``' file).

    Files are written under temporary names and renamed, so a crash never leaves a spec pointing at a half file."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mid = spec["id"]
    wpath = out_dir / f"{mid}.safetensors"
    tmp = out_dir / f".{mid}.partial.safetensors"
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(tensors, str(tmp))
    # safetensors writes through a private temporary file (mode 0600): give the model the mode any new file gets, so
    # other users of a shared models folder can read it
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, wpath)
    spec = {k: v for k, v in spec.items() if not k.startswith("_")}
    spec["files"] = [{"name": wpath.name, "sha256": sha256_file(wpath), "size": wpath.stat().st_size}]
    spec["files"] += [f for f in extra_files if f["name"] != wpath.name]
    spath = out_dir / f"{mid}.json"
    tmp = out_dir / f".{mid}.partial.json"
    tmp.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, spath)
    return spath
