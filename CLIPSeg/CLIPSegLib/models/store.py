"""The model registry and the local weight cache: list, fetch (verified, resumable), verify, import, remove.

Registry: ``Resources/Models/registry.json`` (schema: ``registry.schema.json`` beside it). Each model has an id, an
engine, a role (clip / clipseg / sam / segmenter), files with URL, size and SHA-256 (``null`` where the publisher gives none)
and, where the size is unknown, a plausible range (``min_size``/``max_size`` in bytes), licence, citation and
description. Embedded models' files live in ``Resources/Models`` and are always present. A segmenter's files include
its model spec (``spec``, default ``<id>.json``). Beside the registry, ``entries`` knows the specs shipped in
``Resources/Models`` that it does not list and the models imported into the cache from their spec (``import_spec``).

Cache: ``$CLIPSEG_HOME`` (default ``~/.cache/clipseg``; the Slicer module points it into Slicer's settings folder),
one folder per model id. A download streams to ``<file>.part`` (resumed with an HTTP Range request after a dropped
connection), is checked for size and SHA-256, and only then renamed to its final name, so a half or wrong file is
never taken as good. A lock file serialises concurrent fetches of the same model (two Slicer instances, a batch
script). Files without a published SHA-256 are pinned on first download or import: the digest is recorded in
``<id>/checksums.json`` and checked from then on. Before a digest is pinned the file must be within its size range
and loadable as what its name says (``check_weight_kind``), so a junk or truncated file is never pinned. Nothing here
opens a connection unless a fetch is asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ModelError
from .spec import MODELS_DIR, is_spec_name, read_spec
from .weights import check_weight_kind, sha256_file

REGISTRY = MODELS_DIR / "registry.json"
SCHEMA = MODELS_DIR / "registry.schema.json"
CHUNK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPSEG_HOME") or Path.home() / ".cache" / "clipseg")


def load_registry(path: Path | None = None) -> dict[str, dict]:
    """Registry entries by id (``path`` default: ``REGISTRY``), validated against the JSON schema (with jsonschema
    where it is installed; Slicer's Python lacks it, and the panel lists models before anything is installed: then
    the keys the schema requires)."""
    path = REGISTRY if path is None else path
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    try:
        import jsonschema
    except ImportError:
        _check_required_keys(data, schema, path)
    else:
        try:
            jsonschema.validate(data, schema)
        except jsonschema.ValidationError as e:
            raise ModelError(f"model registry {path} is invalid: {e.message} (at {list(e.absolute_path)})") from e
    for m in data["models"]:
        if m.get("embedded"):  # the files and their checksums are those of the model's own spec
            spec_path = MODELS_DIR / m["spec"]
            if not spec_path.is_file():
                raise ModelError(f"embedded model {m['id']}: its spec {spec_path} is missing; restore it")
            m["files"] = _spec_files(json.loads(spec_path.read_text(encoding="utf-8")))
    return {m["id"]: m for m in data["models"]}


def _spec_files(spec: dict) -> list[dict]:
    """A spec's weight files as store file entries (no URL: they are beside the spec)."""
    return [{"name": f["name"], "url": None, "size": f.get("size"), "sha256": f["sha256"]} for f in spec["files"]]


def spec_entry(path: Path, **kind) -> dict:
    """A store entry for a model known only by its spec file: shipped in ``Resources/Models`` without a registry entry
    (``embedded=True``) or imported into the cache (``imported=True``; the spec is one of its files, its digest
    pinned at import). A spec that cannot be read is listed all the same; loading it names the problem."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        files = _spec_files(spec)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        spec, files = {}, []
        kind = {**kind, "unreadable": True}  # never listed as present: loading it names the problem
    if kind.get("imported"):
        files.append({"name": path.name, "url": None, "size": path.stat().st_size, "sha256": None})
    return {"id": path.stem, "engine": str(spec.get("engine", "unknown")), "role": "segmenter", "spec": path.name,
            "license": str(spec.get("license", "")), "citation": str(spec.get("citation", "")),
            "description": str(spec.get("description", "")), "files": files, **kind}


def entries(registry: dict | None = None) -> dict[str, dict]:
    """Every model by id: the registry's (``registry`` default: ``load_registry()``), then the specs shipped in
    ``Resources/Models`` that it does not list, then the models imported into the cache from their spec."""
    found = dict(load_registry() if registry is None else registry)
    for path in sorted(MODELS_DIR.glob("*.json")):
        if is_spec_name(path) and path.stem not in found:
            found[path.stem] = spec_entry(path, embedded=True)
    if cache_dir().is_dir():
        for folder in sorted(cache_dir().iterdir()):
            spec = folder / f"{folder.name}.json"
            if folder.name not in found and spec.is_file():
                found[folder.name] = spec_entry(spec, imported=True)
    return found


def spec_name(m: dict) -> str | None:
    """The file name of a segmenter's model spec (in ``model_dir(m)``); None for a part (a CLIP or SAM checkpoint)."""
    if m["role"] != "segmenter":
        return None
    return m.get("spec") or f"{m['id']}.json"


def _check_required_keys(data, schema: dict, path) -> None:
    """The schema's required keys of the registry, its models and their files; raises ModelError like jsonschema."""
    model_schema = schema["properties"]["models"]["items"]
    file_required = model_schema["properties"]["files"]["items"]["required"]

    def require(obj, keys, where):
        if not isinstance(obj, dict):
            raise ModelError(f"model registry {path} is invalid: {obj!r} is not an object (at {where})")
        for key in keys:
            if key not in obj:
                raise ModelError(f"model registry {path} is invalid: {key!r} is a required property (at {where})")

    require(data, schema["required"], [])
    if not isinstance(data["models"], list):
        raise ModelError(f"model registry {path} is invalid: 'models' is not a list (at ['models'])")
    for i, m in enumerate(data["models"]):
        require(m, model_schema["required"] + (["spec"] if isinstance(m, dict) and m.get("embedded") else ["files"]),
                ["models", i])
        for j, f in enumerate(m.get("files", [])):
            require(f, file_required, ["models", i, "files", j])


def entry(model_id: str, registry: dict | None = None) -> dict:
    """The entry of ``model_id`` among ``entries(registry)``; ModelError with the closest id if there is none."""
    known = entries(registry)
    if model_id not in known:
        import difflib

        close = difflib.get_close_matches(model_id, list(known), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelError(f"unknown model {model_id!r}.{hint} See `clipseg models list`.")
    return known[model_id]


def model_dir(m: dict) -> Path:
    return MODELS_DIR if m.get("embedded") else cache_dir() / m["id"]


def _pins(folder: Path) -> dict:
    p = folder / "checksums.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def _expected_sha(m: dict, f: dict) -> str | None:
    return f.get("sha256") or _pins(model_dir(m)).get(f["name"])


def size_problem(f: dict, size: int) -> str | None:
    """Why ``size`` bytes cannot be registry file ``f`` (its exact size, or its plausible range), or None."""
    if f.get("size") is not None:
        return None if size == f["size"] else f"expected {f['size']}"
    if f.get("min_size") is not None and size < f["min_size"]:
        return f"expected at least {format_size(f['min_size'])} for this file"
    if f.get("max_size") is not None and size > f["max_size"]:
        return f"expected at most {format_size(f['max_size'])} for this file"
    return None


def file_status(m: dict, f: dict, check_hash: bool = False) -> str:
    """'present', 'missing', 'partial' (a .part exists) or 'corrupt' (wrong size; with check_hash, wrong SHA-256)."""
    path = model_dir(m) / f["name"]
    if not path.is_file():
        return "partial" if path.with_name(path.name + ".part").is_file() else "missing"
    if size_problem(f, path.stat().st_size):
        return "corrupt"
    if check_hash:
        expected = _expected_sha(m, f)
        if expected and sha256_file(path) != expected:
            return "corrupt"
    return "present"


def is_present(m: dict) -> bool:
    """Every file of ``m`` is in place (an entry whose spec cannot be read is not present, whatever its files)."""
    return not m.get("unreadable") and all(file_status(m, f) == "present" for f in m["files"])


@contextlib.contextmanager
def _lock(folder: Path):
    """Exclusive lock on ``folder/.lock`` (blocks until the other fetch is done)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as fh:
        if os.name == "posix":
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)


def _download(url: str, part: Path, progress, label: str, timeout: float = 30.0) -> None:
    """Append the rest of ``url`` to ``part`` (Range request when part has bytes). Raises ModelError."""
    start = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # already complete
            return
        raise ModelError(f"download of {label} failed: the server answered HTTP {e.code} ({e.reason}) for {url}; "
                         f"check the URL or download it by hand and use `clipseg models import`") from e
    except (urllib.error.URLError, OSError) as e:
        raise ModelError(f"download of {label} failed: cannot reach {url} ({e}); check the network or proxy, or "
                         f"download the file elsewhere and use `clipseg models import`") from e
    with resp:
        if start and resp.status != 206:  # server ignored the Range: start over
            start = 0
            part.unlink(missing_ok=True)
        total = resp.headers.get("Content-Length")
        total = start + int(total) if total is not None else 0
        done = start
        with open(part, "ab") as out:
            try:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress.update(f"downloading {label}", done, max(total, done))
            except (OSError, urllib.error.URLError) as e:
                raise ModelError(f"download of {label} was interrupted after {done} bytes ({e}); run the same "
                                 f"command again to resume") from e
    if total and done < total:
        raise ModelError(f"download of {label} stopped after {done} of {total} bytes; run the same command again "
                         f"to resume")


def fetch(model_id: str, progress=None, registry: dict | None = None, retries: int = 2) -> Path:
    """Make every file of ``model_id`` present and verified in the cache; returns the model's folder.

    Files already present and matching their size and SHA-256 are not downloaded again (no network touched)."""
    m = entry(model_id, registry)
    folder = model_dir(m)
    if m.get("embedded") or m.get("imported"):  # nothing to download: check what is here
        bad = {name: status for name, status in verify(model_id, registry).items() if status != "present"}
        if bad:
            raise ModelError(f"{model_id} has no download (it is {_origin(m)}) and its files are not intact: "
                             f"{', '.join(f'{n} {s}' for n, s in bad.items())}; {_restore(m)}")
        return folder
    with _lock(folder):
        for f in m["files"]:
            final = folder / f["name"]
            if file_status(m, f, check_hash=True) == "present":
                continue
            if not f.get("url"):
                raise ModelError(f"{model_id}: {f['name']} has no download URL ({m.get('source', 'see its licence')});"
                                 f" download it by hand and run `clipseg models import {model_id} PATH`")
            part = final.with_name(final.name + ".part")
            for attempt in range(retries + 1):
                try:
                    _download(f["url"], part, progress, f"{model_id}/{f['name']}")
                    break
                except ModelError:
                    if attempt == retries:
                        raise
            _accept(m, f, part, final)
    return folder


def _accept(m: dict, f: dict, candidate: Path, final: Path, keep_candidate: bool = False) -> None:
    """Check size, then SHA-256 (published or pinned) or, for a file seen the first time, its kind; then move (or
    copy) ``candidate`` to ``final`` atomically and pin the digest of a file that had none."""
    label = f"{m['id']}/{f['name']}"

    def refuse(message: str):
        if not keep_candidate:
            candidate.unlink()
        raise ModelError(message)

    size = candidate.stat().st_size
    problem = size_problem(f, size)
    if problem:
        refuse(f"{label}: got {size} bytes ({format_size(size)}), {problem}; the file was not kept (a truncated "
               f"download, or not this model's file)")
    digest = sha256_file(candidate)
    pinned = _pins(final.parent).get(f["name"])
    expected = f.get("sha256") or pinned
    if expected and digest != expected:
        if f.get("sha256"):
            refuse(f"{label}: SHA-256 {digest} does not match the expected {expected}; the file was not kept "
                   f"(corrupt download, or not this model's file)")
        refuse(f"{label}: SHA-256 {digest} does not match the digest pinned when this file was first downloaded or "
               f"imported ({expected}); the file was not kept. If that earlier file was the wrong one, run "
               f"`clipseg models remove {m['id']}` first, then fetch or import again")
    if not expected:  # never pin a digest of something that is not a weight file of this kind
        try:
            check_weight_kind(candidate, f["name"])
        except ModelError:
            if not keep_candidate:
                candidate.unlink()
            raise
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".importing")
    if keep_candidate:
        shutil.copyfile(candidate, tmp)
    else:
        os.replace(candidate, tmp)
    os.replace(tmp, final)
    if not expected:  # pin on first use
        pins = _pins(final.parent)
        pins[f["name"]] = digest
        (final.parent / "checksums.json").write_text(json.dumps(pins, indent=2) + "\n", encoding="utf-8")


def verify(model_id: str, registry: dict | None = None) -> dict[str, str]:
    """File name -> status ('present', 'missing', 'partial', 'corrupt'), hashing every present file."""
    m = entry(model_id, registry)
    return {f["name"]: file_status(m, f, check_hash=True) for f in m["files"]}


def import_files(model_id: str, paths: list[Path], registry: dict | None = None) -> Path:
    """Register files copied by hand (air-gapped sites): each is matched to a registry file by name, checked, copied."""
    m = entry(model_id, registry)
    if m.get("embedded") or m.get("imported"):
        raise ModelError(f"{model_id} is {_origin(m)}; there is nothing to import into it ({_restore(m)})")
    by_name = {f["name"]: f for f in m["files"]}
    folder = model_dir(m)
    with _lock(folder):
        for p in map(Path, paths):
            if not p.is_file():
                raise ModelError(f"{p} does not exist")
            f = by_name.get(p.name)
            if f is None:
                raise ModelError(f"{p.name} is not a file of {model_id}; expected one of {sorted(by_name)}")
            _accept(m, f, p, folder / f["name"], keep_candidate=True)
    return folder


def _origin(m: dict) -> str:
    return "embedded in CLIPSeg" if m.get("embedded") else "imported from its spec file"


def _restore(m: dict) -> str:
    if m.get("embedded"):
        return "restore the files from the CLIPSeg release"
    return (f"import it again: `clipseg models remove {m['id']}`, then `clipseg models import SPEC.json` with the "
            f"model's spec")


def import_spec(path: Path, registry: dict | None = None) -> Path:
    """Copy a segmentation model, its spec and the weight files it names (each checked against the spec's size and
    SHA-256), into the cache as ``<id>/``: from then on every command and the Slicer panel know it by its id.
    The spec is copied last, so a failed import leaves no model behind. Returns the model's folder."""
    path = Path(path)
    spec = read_spec(path)
    mid = spec["id"]
    if Path(mid).name != mid or mid.startswith((".", "_")) or mid.startswith("registry"):
        raise ModelError(f"model spec {path}: its id {mid!r} must be a plain name such as 'my-model' (no folder, not "
                         f"starting with '.', '_' or 'registry'); change its 'id' field")
    other = entries(registry).get(mid)
    if other is not None and not other.get("imported"):
        where = "embedded in CLIPSeg" if other.get("embedded") else "in the model registry"
        raise ModelError(f"model spec {path}: a model with the id {mid!r} is already {where}; give this model another "
                         f"id (its 'id' field) to import it")
    for f in spec["files"]:
        if not (Path(spec["_dir"]) / f["name"]).is_file():
            raise ModelError(f"model spec {path} names the weight file {f['name']}, which is not beside it; copy it "
                             f"there (the spec and its weights travel together) and import again")
    m = {"id": mid, "role": "segmenter", "imported": True}
    folder = model_dir(m)
    spec_file = {"name": f"{mid}.json", "url": None, "size": None, "sha256": None}
    with _lock(folder):
        pinned = _pins(folder).get(spec_file["name"])
        if pinned and sha256_file(path) != pinned:
            raise ModelError(f"another model with the id {mid!r} was imported before; run `clipseg models remove "
                             f"{mid}` first, or give this one another id (its 'id' field)")
        for f in _spec_files(spec):
            _accept(m, f, Path(spec["_dir"]) / f["name"], folder / f["name"], keep_candidate=True)
        _accept(m, spec_file, path, folder / spec_file["name"], keep_candidate=True)
    return folder


def remove(model_id: str, registry: dict | None = None) -> bool:
    """Delete a model's cache folder (files, partial downloads, pinned digests). False if it was never downloaded."""
    m = entry(model_id, registry)
    if m.get("embedded"):
        raise ModelError(f"{model_id} is embedded in CLIPSeg and cannot be removed")
    folder = model_dir(m)
    had_files = folder.is_dir() and any(p.name != ".lock" for p in folder.iterdir())
    if folder.is_dir():
        shutil.rmtree(folder)
    return had_files


def display_size(m: dict) -> str:
    """Total size of a model's files, or the publisher's approximate size (``~358 MB``) where sizes are unknown."""
    sizes = [f["size"] for f in m["files"]]
    return format_size(sum(sizes)) if all(sizes) else "~" + m.get("approx_size", "?")


def format_size(n: int | None) -> str:
    if n is None:
        return "size n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""
