"""The Slicer panel and console Logic of CLIPSeg.py, driven on slicer-core with stand-ins for Qt and the Slicer app
(Testing/slicer_fakes.py): opening the panel with only what Slicer's Python ships, the findings box, the one model
selector (the catalogue's list, engine shown, choice kept in the parameter node), the dependency installer, and the
console's ``logic.segment``."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make test`; CI always has it")

import slicer_fakes  # noqa: E402
from CLIPSegLib.slicer import dependencies  # noqa: E402
from CLIPSegLib.errors import InputError, ModelError  # noqa: E402
from CLIPSegLib.models import DEFAULT_MODEL, ModelRef  # noqa: E402

# models.store tries jsonschema and, where it is absent (Slicer), checks the registry's required keys itself.
OPTIONAL_IN_PANEL = {"jsonschema"}


def test_opening_the_panel_needs_nothing_slicer_lacks():
    """The whole setup path (module import, Widget.setup, Logic calls), and the scene-run module Apply uses, in a
    fresh process where torch, monai, jsonschema & co. cannot be imported, as in Slicer before the first Apply."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{str(slicer_fakes.ROOT / "Testing")!r}, {str(slicer_fakes.MODULE_DIR)!r}]
        import slicer_fakes
        guard = slicer_fakes.ImportGuard()
        sys.meta_path.insert(0, guard)
        dialogs = slicer_fakes.install()
        module = slicer_fakes.load_module()
        widget = module.CLIPSegWidget()
        widget.setup()
        logic = widget.logic
        import CLIPSegLib.slicer.scene_run  # what Apply imports in the Slicer process once packages are installed
        print(json.dumps({{"models": [[m.id, m.present] for m in logic.availableModels()],
                          "labels": [text for text, _ in widget.ui.modelComboBox.items],
                          "device": logic.deviceDescription(),
                          "missing": logic.missingPackages(), "model": widget._parameterNode.model,
                          "deviceLabel": widget.ui.deviceInfoLabel.text, "errors": dialogs.errors,
                          "imported": guard.imported,
                          "loaded": [m for m in sys.modules if m.split(".")[0] in slicer_fakes.NOT_IN_SLICER]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["imported"]) <= OPTIONAL_IN_PANEL, f"the panel imports {out['imported']}, which Slicer lacks"
    assert out["loaded"] == []
    assert [DEFAULT_MODEL, True] in out["models"] and out["model"] == DEFAULT_MODEL
    assert f"{DEFAULT_MODEL} (CLIP-TNseg, embedded)" in out["labels"]
    assert out["device"] == out["deviceLabel"] == "PyTorch not installed yet (installed at first Apply)"
    assert "torch==2.14.1" in out["missing"] and "monai==1.6.1" in out["missing"]
    assert out["errors"] == []


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """The fakes installed for one test (undone after it); CLIPSeg.py loaded fresh; no GPU probe process."""
    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path / "home"))
    dialogs = slicer_fakes.install(monkeypatch.setitem, lambda o, k, v: monkeypatch.setattr(o, k, v, raising=False))
    module = slicer_fakes.load_module()
    monkeypatch.setattr(module.CLIPSegLogic, "startDeviceProbe", lambda self: None)
    widgets = []
    module.widgets = widgets
    yield dialogs, module
    for widget in widgets:
        widget.cleanup()  # as Slicer does on exit: no scene observer outlives the test


def _widget(module):
    widget = module.CLIPSegWidget()
    module.widgets.append(widget)
    widget.setup()
    return widget


def test_typing_in_the_findings_box_never_rewrites_it(fakes):
    _, module = fakes
    widget = _widget(module)
    box, p = widget.ui.promptsTextEdit, widget._parameterNode
    assert box.toPlainText() == p.prompts  # shown when the panel opens
    box.setPlainTextCalls.clear()
    for text in ("t", "thyroid nod", "thyroid nodule\n", "thyroid nodule\nanechoic cyst"):
        box.type(text)
        assert p.prompts == text
    assert box.setPlainTextCalls == [], "the box was rewritten while typing: the cursor would jump to the end"
    assert widget.ui.applyButton.enabled is False  # no input volume yet
    p.prompts = "cyst"  # changed elsewhere (scene loaded, script): shown once
    assert box.toPlainText() == "cyst" and box.setPlainTextCalls == ["cyst"]


def test_the_model_choice_is_kept_in_the_parameter_node(fakes, monkeypatch):
    _, module = fakes
    models = [ModelRef(DEFAULT_MODEL, "cliptnseg", "segmenter", "embedded", True),
              ModelRef("another-model", "cliptnseg", "segmenter", "registry", False)]
    monkeypatch.setattr(module.CLIPSegLogic, "availableModels", lambda self: models)
    widget = _widget(module)
    combo, p = widget.ui.modelComboBox, widget._parameterNode
    assert p.model == DEFAULT_MODEL and combo.itemData(combo.currentIndex) == DEFAULT_MODEL
    combo.currentIndex = 1  # the user picks a model
    assert p.parameterNode.GetParameter("model") == "another-model"
    combo.currentIndex = 0
    p.parameterNode.SetParameter("model", "another-model")  # a saved scene is loaded
    assert combo.itemData(combo.currentIndex) == "another-model"
    widget.exit()
    widget.enter()  # the panel opened again on the same scene
    assert combo.itemData(combo.currentIndex) == "another-model"


def test_one_model_selector_lists_what_models_list_prints_with_each_engine(fakes, registry_model, tiny_model,
                                                                        capsys):
    """The panel and `clipseg models list` show one list: embedded, registry (downloaded or not), imported."""
    from CLIPSegLib.cli import main

    _, module = fakes
    assert main(["models", "import", str(tiny_model)]) == 0  # a model of one's own, known by its id from now on
    assert main(["models", "list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:] if not line.startswith("(")]
    listed = [row[0] for row in rows if row[2] == "segmenter"]
    assert {DEFAULT_MODEL, registry_model[0], "tiny-random"} <= set(listed)
    widget = _widget(module)
    combo = widget.ui.modelComboBox
    assert [combo.itemData(i) for i in range(combo.count)] == listed
    assert [m.id for m in widget.logic.availableModels()] == listed
    texts = [text for text, _ in combo.items]
    assert texts[listed.index(DEFAULT_MODEL)] == f"{DEFAULT_MODEL} (CLIP-TNseg, embedded)"
    assert texts[listed.index("tiny-registry")] == "tiny-registry (CLIP-TNseg, not downloaded)"
    assert texts[listed.index("tiny-random")] == "tiny-random (CLIP-TNseg, imported)"
    assert not [name for name in vars(widget.ui) if "engine" in name.lower()]  # no engine selector
    assert "engine" not in widget._parameterNode.parameterNode.GetParameterNames()


def _installed(monkeypatch, present):
    """Pretend only ``present`` modules are installed; returns the set, which the fake installers fill."""
    present = set(present)
    monkeypatch.setattr(dependencies, "is_installed", lambda module: module in present)
    return present


def test_the_installer_installs_the_declared_pins_with_torch_through_the_pytorch_extension(fakes, monkeypatch):
    dialogs, module = fakes
    present = _installed(monkeypatch, {"numpy", "scipy", "SimpleITK"})  # what Slicer ships
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            present.update({"torch", "torchvision"})
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", type(sys)("PyTorchUtils"))
    sys.modules["PyTorchUtils"].PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setattr(slicer.util, "pip_install",
                        lambda reqs: (dialogs.pip_installs.append(reqs),
                                      present.update(dependencies.module_name(r) for r in reqs)))
    logic = module.CLIPSegLogic()
    declared = dependencies.requirements()
    assert logic.missingPackages() == [r for r in declared if dependencies.distribution(r) not in
                                       ("numpy", "scipy", "SimpleITK")]
    assert logic.ensureDependencies(ask=True) is True
    assert "torch==2.14.1" in dialogs.confirmations[0]
    assert calls == [(False, "==2.14.1")]
    assert dialogs.pip_installs == [[r for r in declared if dependencies.distribution(r) not in
                                     ("torch", "torchvision", "numpy", "scipy", "SimpleITK")]]
    assert logic.missingPackages() == []


def test_without_the_pytorch_extension_torch_comes_from_pip_at_the_declared_pins(fakes, monkeypatch):
    dialogs, module = fakes
    present = _installed(monkeypatch, {"numpy", "scipy", "SimpleITK", "monai"})
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import PyTorchUtils -> ImportError
    monkeypatch.setattr(slicer.util, "pip_install",
                        lambda reqs: (dialogs.pip_installs.append(reqs),
                                      present.update(dependencies.module_name(r) for r in reqs)))
    assert module.CLIPSegLogic().ensureDependencies(ask=False) is True
    assert dialogs.confirmations == []
    assert dialogs.pip_installs[0] == ["torch==2.14.1", "torchvision==0.29.1"]
    assert "monai==1.6.1" not in dialogs.pip_installs[1]


def test_a_slicer_with_python_3_9_is_told_which_slicer_to_install(fakes, monkeypatch):
    _, module = fakes
    _installed(monkeypatch, set())
    monkeypatch.setattr(dependencies, "sys", type(sys)("sys"))  # the Python of Slicer 5.8
    dependencies.sys.version_info = (3, 9, 13, "final", 0)
    with pytest.raises(dependencies.DependencyError) as e:
        module.CLIPSegLogic().ensureDependencies(ask=False)
    message = str(e.value)
    assert "Slicer 5.10 or later" in message and "Python 3.9" in message and "torch==2.14.1" in message
    assert _widget(module).ui.statusLabel.text == message  # said as soon as the panel opens


class FakeSceneRun:
    """Records how the Logic builds a run; never starts a process."""

    made = []

    def __init__(self, volume, prompts, segmentation=None, **kwargs):
        self.kwargs = dict(kwargs, prompts=prompts)
        FakeSceneRun.made.append(self)

    def start(self):
        return self

    @property
    def running(self):
        return False

    def cancel(self):
        pass


@pytest.fixture
def volume():
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "us")
    slicer.util.updateVolumeFromArray(node, np.zeros((2, 4, 4), np.float32))
    return node


def test_console_segment_installs_first_and_names_what_is_missing_when_declined(fakes, monkeypatch, volume):
    dialogs, module = fakes
    import CLIPSegLib.slicer.scene_run

    _installed(monkeypatch, {"numpy", "scipy", "SimpleITK", "monai"})
    monkeypatch.setattr(CLIPSegLib.slicer.scene_run, "SceneRun", FakeSceneRun)
    FakeSceneRun.made = []
    dialogs.confirm_answer = False  # the user declines the installation
    with pytest.raises(dependencies.DependencyError, match=r"missing: torch==2\.14\.1, torchvision==0\.29\.1"):
        module.CLIPSegLogic().segment(volume, ["cyst"], wait=False)
    assert len(dialogs.confirmations) == 1 and FakeSceneRun.made == []  # asked, and nothing was started


@pytest.fixture
def no_runs(fakes, monkeypatch):
    """Nothing to install; the Logic's runs are FakeSceneRuns (recorded, never started)."""
    import CLIPSegLib.slicer.scene_run

    monkeypatch.setattr(dependencies, "missing", lambda reqs=None: [])
    monkeypatch.setattr(CLIPSegLib.slicer.scene_run, "SceneRun", FakeSceneRun)
    FakeSceneRun.made = []
    return fakes[1]


def test_console_segment_takes_every_option_as_a_keyword(no_runs, volume, monkeypatch):
    """Each SegmentOptions field is a keyword of logic.segment / logic.start, by its Logic (camelCase) name or its
    snake_case name, and reaches the run unchanged (the random model names are not resolved here: the catalogue has
    tests of its own)."""
    from CLIPSegLib.models import catalogue
    from CLIPSegLib.options import LOGIC_KEYWORDS, SegmentOptions

    monkeypatch.setattr(catalogue, "resolve", lambda model, engine=None: None)
    monkeypatch.setattr(no_runs.CLIPSegLogic, "ensureModel", lambda self, model, ask=True: True)

    from conftest import random_options

    module = no_runs
    r = np.random.default_rng(3)
    for n in range(20):
        expected = random_options(r)
        values = {f: getattr(expected, f) for f in vars(expected)}
        keywords = dict(zip(LOGIC_KEYWORDS, values.values())) if n % 2 else values
        run = module.CLIPSegLogic().segment(volume, ["cyst"], wait=False, **keywords)
        assert run is FakeSceneRun.made[-1] and run.kwargs["options"] == expected
    # the console call of the README, as before options were declared in one place
    run = module.CLIPSegLogic().segment(volume, ["cyst"], engine="cliptnseg", model=DEFAULT_MODEL, device="cpu",
                                        axis="auto", threshold=0.3, precision="bf16", keepProbabilities=True,
                                        wait=False)
    assert run.kwargs["options"] == SegmentOptions(engine="cliptnseg", model=DEFAULT_MODEL, device="cpu",
                                                   threshold=0.3, precision="bf16", keep_probabilities=True)
    options = SegmentOptions(device="cpu", batch_size=2)  # or a whole options object, with changes
    run = module.CLIPSegLogic().start(volume, ["cyst"], options=options, axis=2)
    assert run.kwargs["options"] == SegmentOptions(device="cpu", batch_size=2, axis="2")


def test_a_bad_or_misspelled_option_is_refused_before_anything_is_installed_or_started(fakes, monkeypatch, volume):
    from CLIPSegLib.errors import InputError

    dialogs, module = fakes
    import CLIPSegLib.slicer.scene_run

    _installed(monkeypatch, set())
    monkeypatch.setattr(CLIPSegLib.slicer.scene_run, "SceneRun", FakeSceneRun)
    FakeSceneRun.made = []
    logic = module.CLIPSegLogic()
    with pytest.raises(InputError, match=r"unknown option 'keep_probabilites' \(did you mean 'keep_probabilities'"):
        logic.segment(volume, ["cyst"], keep_probabilites=True, wait=False)
    with pytest.raises(InputError, match="precision 'fp16' is not one of fp32, bf16"):
        logic.segment(volume, ["cyst"], precision="fp16", wait=False)
    assert dialogs.confirmations == [] and FakeSceneRun.made == []
    with pytest.raises(TypeError):  # migration: options are keyword arguments (engine was the third positional)
        logic.segment(volume, ["cyst"], "cliptnseg")


def test_the_panels_lists_are_the_options_modules(fakes):
    import typing

    from CLIPSegLib import options

    _, module = fakes
    choices = {name: next(m.choices for m in typing.get_args(hint)[1:] if hasattr(m, "choices"))
               for name, hint in module.CLIPSegParameterNode.hints.items()
               if typing.get_origin(hint) is typing.Annotated and any(hasattr(m, "choices")
                                                                      for m in typing.get_args(hint)[1:])}
    assert choices == {"device": list(options.DEVICES),
                       "precision": list(options.PRECISIONS), "axis": list(options.AXES)}
    for name in module.PANEL_OPTIONS:  # each option the panel shows is a parameter and a Logic keyword
        assert name in module.CLIPSegParameterNode.hints and name in options.LOGIC_KEYWORDS


def test_apply_runs_with_the_options_set_in_the_panel(no_runs, volume):
    from CLIPSegLib.options import SegmentOptions

    widget = _widget(no_runs)
    p = widget._parameterNode
    p.inputVolume = volume
    p.device, p.precision, p.axis, p.threshold, p.keepProbabilities = "cpu", "bf16", "1", 0.35, True
    widget.onApplyButton()
    assert len(FakeSceneRun.made) == 1 and widget.ui.applyButton.text == "Cancel"
    assert FakeSceneRun.made[0].kwargs["options"] == SegmentOptions(  # the model decides the engine
        model=DEFAULT_MODEL, device="cpu", precision="bf16", axis="1", threshold=0.35,
        keep_probabilities=True)


def test_the_device_line_comes_from_the_background_probe(fakes, monkeypatch):
    _, module = fakes
    from CLIPSegLib.slicer.background import BackgroundRun

    _installed(monkeypatch, {"torch"})
    logic = module.CLIPSegLogic()
    probe = BackgroundRun([sys.executable, "-c",
                           "import json; print(json.dumps({'event': 'done', 'cuda': True, 'name': 'Fake GPU'}))"])
    probe.wait(30)
    assert logic.deviceDescription(probe) == "GPU: Fake GPU"
    assert logic.deviceDescription(None) == "Checking for a CUDA GPU..."
    failed = BackgroundRun([sys.executable, "-c", "import sys; sys.exit('no torch here')"])
    failed.wait(30)
    assert "GPU check failed" in logic.deviceDescription(failed) and "no torch here" in logic.deviceDescription(failed)


def test_console_engine_keyword_must_match_the_model(fakes, monkeypatch, volume):
    _, module = fakes
    import CLIPSegLib.slicer.scene_run

    monkeypatch.setattr(dependencies, "missing", lambda reqs=None: [])
    monkeypatch.setattr(CLIPSegLib.slicer.scene_run, "SceneRun", FakeSceneRun)
    FakeSceneRun.made = []
    logic = module.CLIPSegLogic()
    run = logic.segment(volume, ["cyst"], engine="cliptnseg", wait=False)  # scripts written for the engine choice
    assert run.kwargs["options"].engine == "cliptnseg" and run.kwargs["options"].model is None
    with pytest.raises(InputError, match="engine 'tgcnet' does not match the model 'cliptnseg-phantom-small'"):
        logic.segment(volume, ["cyst"], engine="tgcnet", wait=False)
    assert len(FakeSceneRun.made) == 1


def test_a_registry_model_not_downloaded_is_offered_for_download_first(fakes, monkeypatch, volume, registry_model):
    dialogs, module = fakes
    import CLIPSegLib.slicer.scene_run
    from CLIPSegLib.models import store

    model_id, files = registry_model
    monkeypatch.setattr(dependencies, "missing", lambda reqs=None: [])
    monkeypatch.setattr(CLIPSegLib.slicer.scene_run, "SceneRun", FakeSceneRun)
    FakeSceneRun.made = []
    logic = module.CLIPSegLogic()
    dialogs.confirm_answer = False
    with pytest.raises(ModelError, match=f"clipseg models fetch {model_id}"):
        logic.segment(volume, ["cyst"], model=model_id, wait=False)
    assert model_id in dialogs.confirmations[0] and "MB" in dialogs.confirmations[0] and FakeSceneRun.made == []
    dialogs.confirm_answer = True
    fetched = []
    monkeypatch.setattr(store, "fetch", lambda mid, *a, **k: (fetched.append(mid), store.import_files(mid, files)))
    run = logic.segment(volume, ["cyst"], model=model_id, wait=False)
    assert fetched == [model_id] and run.kwargs["options"].model == model_id
    assert logic.ensureModel(model_id) is True and len(dialogs.confirmations) == 2  # here now: not asked again
