"""Registry, cache and verified downloads, served from a local HTTP server on 127.0.0.1 (no internet)."""

import hashlib
import http.server
import json
import multiprocessing
import threading

import pytest
import torch

from CLIPSegLib.models import store as ms
from CLIPSegLib.errors import ModelError
from CLIPSegLib.models import load_checkpoint



def _torch_bytes(state) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


PAYLOAD = _torch_bytes({"weight": torch.arange(256 * 1024, dtype=torch.float32)})  # a 1 MiB PyTorch weight file


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; modes: ok, drop (close after half, once), 404, 500, wrong."""

    mode = "ok"
    hits = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        Handler.hits.append((self.path, self.headers.get("Range")))
        if self.mode in ("404", "500"):
            self.send_error(int(self.mode))
            return
        body = PAYLOAD if self.mode != "wrong" else PAYLOAD[::-1]
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        rest = body[start:]
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        if self.mode == "drop":
            Handler.mode = "ok"  # the next request succeeds
            self.wfile.write(rest[: len(rest) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(rest)


@pytest.fixture
def server():
    Handler.mode, Handler.hits = "ok", []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def registry(url, sha=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD)):
    return {"test-model": {"id": "test-model", "engine": "medclipsam", "role": "sam", "license": "MIT",
                           "citation": "", "description": "",
                           "files": [{"name": "w.pth", "url": f"{url}/w.pth", "size": size, "sha256": sha}]}}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_shipped_registry_is_valid_and_lists_embedded_and_public_models():
    reg = ms.load_registry()
    assert ms.is_present(reg["cliptnseg-phantom-small"])
    assert {"biomedclip-vit-b16", "sam-vit-b", "sam-vit-l", "sam-vit-h", "medsam-vit-b"} <= set(reg)
    assert reg["sam-vit-b"]["files"][0]["url"].startswith("https://dl.fbaipublicfiles.com/segment_anything/")
    assert ms.verify("cliptnseg-phantom-small") == {"cliptnseg-phantom-small.safetensors": "present"}


def test_without_jsonschema_the_registry_loads_and_missing_keys_are_refused(monkeypatch, tmp_path):
    """Slicer's Python has no jsonschema, and the panel lists the models when it opens."""
    import sys

    with_schema = ms.load_registry()
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema -> ImportError
    assert ms.load_registry() == with_schema
    def public(d):
        return next(m for m in d["models"] if not m.get("embedded"))

    for broken, message in ((lambda d: d.pop("models"), "'models' is a required property"),
                            (lambda d: public(d).pop("license"), "'license' is a required property"),
                            (lambda d: public(d)["files"][0].pop("sha256"), "'sha256' is a required property"),
                            (lambda d: public(d).pop("files"), "'files' is a required property")):
        bad = json.loads(ms.REGISTRY.read_text(encoding="utf-8"))
        broken(bad)
        path = tmp_path / "registry.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=message):
            ms.load_registry(path)


def test_fresh_download_then_offline_use_touches_no_network(server, home):
    reg = registry(server)
    folder = ms.fetch("test-model", registry=reg)
    assert (folder / "w.pth").read_bytes() == PAYLOAD
    n = len(Handler.hits)
    ms.fetch("test-model", registry=reg)
    assert len(Handler.hits) == n  # already present: no request
    assert ms.verify("test-model", reg) == {"w.pth": "present"}


def test_dropped_connection_resumes_from_the_partial_file(server, home):
    Handler.mode = "drop"
    ms.fetch("test-model", registry=registry(server))
    assert (home / "test-model" / "w.pth").read_bytes() == PAYLOAD
    assert Handler.hits[-1][1] == f"bytes={len(PAYLOAD) // 2}-"  # the retry asked only for the rest


def test_wrong_checksum_is_refused_and_nothing_is_left(server, home):
    Handler.mode = "wrong"
    with pytest.raises(ModelError, match="SHA-256"):
        ms.fetch("test-model", registry=registry(server))
    assert not any(p.name.startswith("w.pth") for p in (home / "test-model").iterdir())


@pytest.mark.parametrize("code", ["404", "500"])
def test_server_errors_give_a_clear_message(server, code):
    Handler.mode = code
    with pytest.raises(ModelError, match=f"HTTP {code}.*models import"):
        ms.fetch("test-model", registry=registry(server))


def test_unpublished_checksum_is_pinned_on_first_download(server, home):
    reg = registry(server, sha=None, size=None)
    ms.fetch("test-model", registry=reg)
    pins = json.loads((home / "test-model" / "checksums.json").read_text(encoding="utf-8"))
    assert pins["w.pth"] == hashlib.sha256(PAYLOAD).hexdigest()
    (home / "test-model" / "w.pth").write_bytes(b"tampered")
    assert ms.verify("test-model", reg) == {"w.pth": "corrupt"}


def test_import_checks_the_hash(tmp_path, home):
    reg = registry("http://127.0.0.1:9")  # nothing listens there: import must not touch the network
    good, bad = tmp_path / "good" / "w.pth", tmp_path / "bad" / "w.pth"
    good.parent.mkdir()
    bad.parent.mkdir()
    good.write_bytes(PAYLOAD)
    bad.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(ModelError, match="SHA-256"):
        ms.import_files("test-model", [bad], reg)
    assert not (home / "test-model" / "w.pth").exists() and bad.exists()
    ms.import_files("test-model", [good], reg)
    assert ms.verify("test-model", reg) == {"w.pth": "present"}
    ms.remove("test-model", reg)
    assert ms.verify("test-model", reg) == {"w.pth": "missing"}


def _fetch_in_process(url, home, queue):
    import os

    os.environ["CLIPSEG_HOME"] = home
    try:
        ms.fetch("test-model", registry=registry(url))
        queue.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        queue.put(repr(e))


def test_two_processes_fetching_at_once_leave_one_good_file(server, home):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_process, args=(server, str(home), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [q.get(timeout=5) for _ in procs] == ["ok", "ok"]
    assert (home / "test-model" / "w.pth").read_bytes() == PAYLOAD
    assert sorted(p.name for p in (home / "test-model").iterdir()) == [".lock", "w.pth"]


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickles_needing_code_are_refused_and_plain_tensors_load(tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pth")["weight"], torch.ones(2))
    torch.save({"weight": torch.ones(2), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="arbitrary code"):
        load_checkpoint(tmp_path / "evil.pth")


def _open_registry(files):
    """A MedSAM-like entry: no URL, size or SHA-256 published for ``files`` (list of registry file dicts)."""
    return {"test-model": {"id": "test-model", "engine": "medclipsam", "role": "sam", "license": "MIT", "citation": "",
                           "description": "", "files": files}}


def _file(name, **kw):
    return {"name": name, "url": None, "size": None, "sha256": None, **kw}


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors", "open_clip_config.json"])
def test_junk_file_is_refused_and_its_hash_is_not_pinned(tmp_path, home, name):
    reg = _open_registry([_file(name)])
    junk = tmp_path / name
    junk.write_bytes(b"junk!")
    with pytest.raises(ModelError, match="not a loadable PyTorch|not a safetensors|not valid JSON"):
        ms.import_files("test-model", [junk], reg)
    assert ms.verify("test-model", reg) == {name: "missing"}
    assert not (home / "test-model" / "checksums.json").exists() and junk.exists()


def test_random_100kb_file_is_refused_for_the_medsam_entry(tmp_path, home, capsys):
    from CLIPSegLib.cli import main

    random_file = tmp_path / "medsam_vit_b.pth"
    random_file.write_bytes(bytes(range(256)) * 400)  # 100 KB, not a checkpoint
    assert main(["models", "import", "medsam-vit-b", str(random_file)]) == 3
    assert "expected at least 300.0 MB" in capsys.readouterr().err
    reg = ms.load_registry()
    assert not ms.is_present(reg["medsam-vit-b"]) and not (home / "medsam-vit-b" / "checksums.json").exists()
    # without a size range the kind check alone refuses it
    with pytest.raises(ModelError, match="not a loadable PyTorch weight file"):
        ms.import_files("test-model", [random_file], _open_registry([_file("medsam_vit_b.pth")]))


def test_valid_weight_files_within_their_size_range_are_imported_and_pinned(tmp_path, home):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "w.pth").write_bytes(_torch_bytes({"state_dict": {"w": torch.ones(3)}, "epoch": 1}))
    (tmp_path / "cfg.json").write_text('{"model_cfg": {"embed_dim": 512}}')
    n = (tmp_path / "w.pth").stat().st_size
    reg = _open_registry([_file("w.safetensors", size=(tmp_path / "w.safetensors").stat().st_size),
                          _file("w.pth", min_size=n - 10, max_size=n + 10), _file("cfg.json")])
    ms.import_files("test-model", [tmp_path / "w.safetensors", tmp_path / "w.pth", tmp_path / "cfg.json"], reg)
    assert ms.verify("test-model", reg) == {"w.safetensors": "present", "w.pth": "present", "cfg.json": "present"}
    pins = json.loads((home / "test-model" / "checksums.json").read_text(encoding="utf-8"))
    assert set(pins) == {"w.safetensors", "w.pth", "cfg.json"}
    small = tmp_path / "small" / "w.pth"
    small.parent.mkdir()
    small.write_bytes(_torch_bytes({"w": torch.ones(1)}))
    with pytest.raises(ModelError, match="expected at least"):  # loadable, but far too small for this entry
        ms.import_files("test-model", [small], reg)


def test_a_file_refused_by_an_earlier_pin_points_to_models_remove(tmp_path, home):
    reg = _open_registry([_file("w.pth")])
    first, second = tmp_path / "a" / "w.pth", tmp_path / "b" / "w.pth"
    for path, value in ((first, 1.0), (second, 2.0)):
        path.parent.mkdir()
        path.write_bytes(_torch_bytes({"w": torch.full((3,), value)}))
    ms.import_files("test-model", [first], reg)  # the wrong file, pinned
    with pytest.raises(ModelError, match="clipseg models remove test-model` first"):
        ms.import_files("test-model", [second], reg)
    assert ms.remove("test-model", reg)
    ms.import_files("test-model", [second], reg)
    assert (home / "test-model" / "w.pth").read_bytes() == second.read_bytes()


def test_removing_a_model_never_downloaded_says_so(home, capsys):
    from CLIPSegLib.cli import main

    assert main(["models", "remove", "sam-vit-b"]) == 0
    out = capsys.readouterr().out
    assert "was not downloaded" in out and "removed" not in out
    (home / "sam-vit-b").mkdir(parents=True)
    (home / "sam-vit-b" / "sam_vit_b_01ec64.pth.part").write_bytes(b"half")
    assert main(["models", "remove", "sam-vit-b"]) == 0
    assert "removed from the cache" in capsys.readouterr().out and not (home / "sam-vit-b").exists()
