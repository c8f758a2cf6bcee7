"""One model catalogue: embedded ids, registry segmenters in the cache, models imported from their spec and spec
paths all resolve through ``models.catalogue.resolve``, and every command takes them by id. No network."""

import json

import pytest

from CLIPSegLib.cli import main
from CLIPSegLib.errors import InputError, ModelError
from CLIPSegLib.models import DEFAULT_MODEL, load_spec
from CLIPSegLib.models import catalogue, store


def _segment(phantom_file, tmp_path, model, *extra):
    return main(["segment", str(phantom_file[0]), "--prompt", "nodule", "--output", str(tmp_path / "out.seg.nrrd"),
                 "--model", str(model), "--device", "cpu", "--progress", "none", *extra])


def _listed(capsys):
    """(id, role, status) of each row of `clipseg models list`, in order."""
    assert main(["models", "list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:] if not line.startswith("(")]
    return [(r[0], r[2], r[3] if r[3] != "not" else "not downloaded") for r in rows]


def test_a_registry_segmenter_in_the_cache_resolves_by_id_and_segments(registry_model, phantom_file, tmp_path, capsys):
    model_id, files = registry_model
    assert main(["models", "import", model_id, *map(str, files)]) == 0
    ref = catalogue.resolve(model_id)
    assert (ref.source, ref.engine, ref.present) == ("registry", "cliptnseg", True)
    assert (ref.engine_name, ref.status) == ("CLIP-TNseg", "present")
    spec = load_spec(model_id)
    assert spec["id"] == "tiny-random" and spec["_dir"] == str(store.cache_dir() / model_id)
    capsys.readouterr()
    assert _segment(phantom_file, tmp_path, model_id) == 0
    assert (tmp_path / "out.seg.nrrd").is_file()
    assert (model_id, "segmenter", "present") in _listed(capsys)


def test_a_registry_segmenter_not_downloaded_names_the_fetch_command(registry_model, phantom_file, tmp_path, capsys):
    model_id, _ = registry_model
    with pytest.raises(ModelError, match=f"not on this computer; download it with `clipseg models fetch {model_id}`"):
        catalogue.resolve(model_id)
    assert _segment(phantom_file, tmp_path, model_id) == 3
    err = capsys.readouterr().err
    assert f"clipseg models fetch {model_id}" in err and "Traceback" not in err
    assert (model_id, "segmenter", "not downloaded") in _listed(capsys)


def test_clip_and_sam_checkpoints_are_parts_not_segmentation_models(phantom_file, tmp_path, capsys):
    with pytest.raises(ModelError, match="sam-vit-b is a SAM checkpoint that the MedCLIP-SAM engine builds on: a part"):
        catalogue.resolve("sam-vit-b")
    assert _segment(phantom_file, tmp_path, "biomedclip-vit-b16") == 3
    assert "a CLIP checkpoint" in capsys.readouterr().err
    rows = _listed(capsys)
    roles = [role for _, role, _ in rows]
    assert roles == sorted(roles, key=lambda role: role != "segmenter")  # segmentation models first
    assert [i for i, role, _ in rows if role == "segmenter"] == [r.id for r in catalogue.segmentation_models()]


def test_a_model_of_your_own_is_imported_from_its_spec_and_known_by_id(tiny_model, phantom_file, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path / "home"))
    assert main(["models", "import", str(tiny_model)]) == 0
    assert "use it with --model tiny-random" in capsys.readouterr().out
    ref = catalogue.resolve("tiny-random")
    assert (ref.source, ref.status, ref.spec_path) == ("imported", "imported",
                                                       tmp_path / "home" / "tiny-random" / "tiny-random.json")
    assert ("tiny-random", "segmenter", "imported") in _listed(capsys)
    assert _segment(phantom_file, tmp_path, "tiny-random") == 0
    assert main(["models", "verify", "tiny-random"]) == 0
    assert "tiny-random/tiny-random.safetensors: present" in capsys.readouterr().out
    # another model under the same id is refused until the first is removed
    other = tmp_path / "other" / tiny_model.name
    other.parent.mkdir()
    spec = json.loads(tiny_model.read_text(encoding="utf-8"))
    other.write_text(json.dumps({**spec, "description": "retrained"}), encoding="utf-8")
    other.with_suffix(".safetensors").write_bytes(tiny_model.with_suffix(".safetensors").read_bytes())
    assert main(["models", "import", str(other)]) == 3
    assert "`clipseg models remove tiny-random` first" in capsys.readouterr().err
    assert main(["models", "remove", "tiny-random"]) == 0
    with pytest.raises(ModelError, match="unknown model 'tiny-random'"):
        catalogue.resolve("tiny-random")


def test_importing_a_spec_under_a_taken_id_or_without_its_weights_is_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path / "home"))
    spec = json.loads(tiny_model.read_text(encoding="utf-8"))
    taken = tmp_path / "taken.json"
    taken.write_text(json.dumps({**spec, "id": DEFAULT_MODEL}), encoding="utf-8")
    with pytest.raises(ModelError, match=f"the id '{DEFAULT_MODEL}' is already embedded in CLIPSeg"):
        store.import_spec(taken)
    lone = tmp_path / "lone.json"
    lone.write_text(json.dumps({**spec, "id": "lone"}), encoding="utf-8")
    with pytest.raises(ModelError, match="names the weight file tiny-random.safetensors, which is not beside it"):
        store.import_spec(lone)
    assert not (tmp_path / "home" / "lone" / "lone.json").exists()


def test_every_kind_of_name_resolves_through_the_one_function(tiny_model):
    assert catalogue.resolve(None).id == catalogue.resolve(DEFAULT_MODEL).id == DEFAULT_MODEL
    assert catalogue.resolve(DEFAULT_MODEL).source == "embedded"
    by_path = catalogue.resolve(str(tiny_model))
    assert (by_path.id, by_path.source, by_path.spec_path) == ("tiny-random", "file", tiny_model)
    with pytest.raises(ModelError, match="did you mean 'cliptnseg-phantom-small'"):
        catalogue.resolve("cliptnseg-phantom-smal")


def test_an_engine_named_with_the_model_must_be_its_engine():
    assert catalogue.resolve(DEFAULT_MODEL, engine="cliptnseg").engine == "cliptnseg"
    with pytest.raises(InputError, match=f"engine 'tgcnet' does not match the model '{DEFAULT_MODEL}', a "
                                         "cliptnseg \\(CLIP-TNseg\\) model"):
        catalogue.resolve(DEFAULT_MODEL, engine="tgcnet")


def test_a_missing_spec_is_named_missing_and_an_unreadable_one_is_not_present(tmp_path, capsys):
    from CLIPSegLib.cli import main
    from CLIPSegLib.models import store

    assert main(["models", "import", str(tmp_path / "nothere.json")]) == 3
    err = capsys.readouterr().err
    assert "does not exist" in err and "not valid JSON" not in err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    entry = store.spec_entry(broken, imported=True)
    assert entry["unreadable"] and not store.is_present(entry)
