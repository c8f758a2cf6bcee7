"""The Slicer panel and console Logic of CLIPSeg.py, driven on slicer-core with stand-ins for Qt and the Slicer app
(Testing/slicer_fakes.py): opening the panel with only what Slicer's Python ships, the findings box, the one model
selector (the catalogue's list, engine shown, choice kept in the parameter node), the dependency installer, and the
console's ``logic.segment``; the "Train on my segments" section and the console's ``logic.finetune``."""

import csv
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
    """The whole setup path (module import, Widget.setup, Logic calls), and the scene-run and train-run modules
    Apply and Train use, in a fresh process where torch, monai, jsonschema & co. cannot be imported, as in Slicer
    before the first Apply."""
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
        import CLIPSegLib.slicer.train_run  # and Train
        print(json.dumps({{"models": [[m.id, m.present] for m in logic.availableModels()],
                          "labels": [text for text, _ in widget.ui.modelComboBox.items],
                          "device": logic.deviceDescription(),
                          "missing": logic.missingPackages(), "model": widget._parameterNode.model,
                          "deviceLabel": widget.ui.deviceInfoLabel.text, "errors": dialogs.errors,
                          "train": [widget.ui.trainButton.text, widget.ui.trainButton.enabled],
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
    assert out["train"] == ["Train", False]  # nothing painted selected yet


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
                       "precision": list(options.PRECISIONS), "axis": list(options.AXES),
                       "trainInputSize": list(options.TRAIN_INPUT_SIZES)}
    for name in module.PANEL_OPTIONS:  # each option the panel shows is a parameter and a Logic keyword
        assert name in module.CLIPSegParameterNode.hints and name in options.LOGIC_KEYWORDS


def test_apply_runs_with_the_options_set_in_the_panel(no_runs, volume):
    from CLIPSegLib.options import SegmentOptions

    widget = _widget(no_runs)
    p = widget._parameterNode
    p.inputVolume = volume
    p.threshold = 0.35
    widget.onApplyButton()  # the slider alone does not override the model's calibrated threshold
    assert FakeSceneRun.made[-1].kwargs["options"].threshold is None
    widget.cancelRun()
    FakeSceneRun.made = []
    p.device, p.precision, p.axis, p.overrideThreshold, p.keepProbabilities = "cpu", "bf16", "1", True, True
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
    with pytest.raises(InputError, match=f"engine 'tgcnet' does not match the model '{DEFAULT_MODEL}'"):
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


# --- Train on my segments ------------------------------------------------------------------------------------------

class FakeTrainRun:
    """Records how the Logic builds a training run; never starts a process. ``result``: what finish returns (or
    raises); ``running`` until the test says it ended."""

    made = []

    def __init__(self, pairs, from_model=None, model_id=None, *, python=None, **options):
        from CLIPSegLib.slicer.background import RunState
        from CLIPSegLib.slicer.train_run import train_options

        self.pairs, self.from_model, self.model_id = pairs, from_model, model_id
        self.options = train_options(**options)
        self.run = type("Run", (), {"state": RunState(stage="fine-tuning", done=1, total=4)})()
        self.running, self.cancelled, self.result, self.messages = True, False, model_id, ["trained on 2 masks"]
        FakeTrainRun.made.append(self)

    def start(self):
        return self

    def poll(self):
        return []

    def describe(self):
        return f"Training {self.model_id}"

    def cancel(self):
        self.cancelled, self.running = True, False

    def finish(self, timeout=None):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
def no_training(fakes, monkeypatch):
    """Nothing to install; the Logic's training runs are FakeTrainRuns."""
    import CLIPSegLib.slicer.train_run

    monkeypatch.setattr(dependencies, "missing", lambda reqs=None: [])
    monkeypatch.setattr(CLIPSegLib.slicer.train_run, "TrainRun", FakeTrainRun)
    FakeTrainRun.made = []
    return fakes


def _click(button):
    button.signal("clicked").emit()  # PythonQt calls a slot of no argument without clicked(bool)'s argument


def _pair(name):
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{name} volume")
    return volume, slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} labels")


def test_train_uses_the_panels_pairs_and_turns_into_cancel(no_training):
    dialogs, module = no_training
    widget = _widget(module)
    ui, p = widget.ui, widget._parameterNode
    (v1, s1), (v2, s2) = _pair("first"), _pair("second")
    assert not ui.trainButton.enabled
    p.trainVolume, p.trainSegmentation = v1, s1
    assert ui.trainButton.enabled and widget.trainingPairs() == [(v1, s1)]
    _click(ui.addTrainPairButton)  # keep this pair, pick the next one
    p.trainVolume, p.trainSegmentation = v2, s2
    ui.trainModelNameLineEdit.type("my-finding")
    p.device = "cpu"
    assert p.trainInputSize == "the model's own (fastest)"  # the default: no --input-size
    p.trainInputSize = "256 px (large slices, ~4x slower)"
    assert ui.trainPairsListWidget.items == ["first volume: first labels"]
    _click(ui.trainButton)
    assert dialogs.errors == [] and len(FakeTrainRun.made) == 1
    run = FakeTrainRun.made[0]
    assert run.pairs == [(v1, s1), (v2, s2)] and run.from_model == DEFAULT_MODEL  # from the model selected above
    assert run.model_id == "my-finding" and run.options["device"] == "cpu" and run.options["inputSize"] == 256
    assert ui.trainButton.text == "Cancel" and ui.trainButton.enabled and widget._trainTimer.isActive()
    assert ui.trainStatusLabel.text == "Training my-finding"
    widget.onTrainPoll()
    assert (ui.trainProgressBar.value, ui.trainProgressBar.maximum) == (1, 4)
    _click(ui.trainButton)  # Cancel
    assert run.cancelled and ui.trainButton.text == "Train" and not widget._trainTimer.isActive()
    assert "cancelled" in ui.trainStatusLabel.text
    ui.trainPairsListWidget.currentRow = 0
    _click(ui.removeTrainPairButton)
    assert ui.trainPairsListWidget.items == [] and widget.trainingPairs() == [(v2, s2)]
    slicer.mrmlScene.RemoveNode(s2)  # a node deleted meanwhile is not trained on
    assert widget.trainingPairs() == []


def test_a_trained_model_is_selected_in_the_refreshed_model_list_and_used_by_apply(no_training, monkeypatch,
                                                                                   volume):
    import CLIPSegLib.slicer.scene_run
    from CLIPSegLib.models import catalogue

    dialogs, module = no_training
    models = [ModelRef(DEFAULT_MODEL, "cliptnseg", "segmenter", "embedded", True)]
    monkeypatch.setattr(module.CLIPSegLogic, "availableModels", lambda self: list(models))
    monkeypatch.setattr(module.CLIPSegLogic, "ensureModel", lambda self, model, ask=True: True)
    monkeypatch.setattr(catalogue, "resolve", lambda model, engine=None: None)
    monkeypatch.setattr(CLIPSegLib.slicer.scene_run, "SceneRun", FakeSceneRun)
    FakeSceneRun.made = []
    widget = _widget(module)
    ui, p = widget.ui, widget._parameterNode
    p.trainVolume, p.trainSegmentation = _pair("brain")
    p.trainModelName = "white-matter"
    _click(ui.trainButton)
    run = FakeTrainRun.made[-1]
    widget.onTrainPoll()
    assert ui.trainButton.text == "Cancel"  # still running
    models.append(ModelRef("white-matter", "cliptnseg", "segmenter", "imported", True))  # imported by finish
    run.running = False
    widget.onTrainPoll()
    combo = ui.modelComboBox
    assert [combo.itemData(i) for i in range(combo.count)] == [DEFAULT_MODEL, "white-matter"]
    assert combo.itemData(combo.currentIndex) == "white-matter" and p.model == "white-matter"
    assert "trained on 2 masks" in ui.trainStatusLabel.text and "New model white-matter" in ui.trainStatusLabel.text
    assert ui.trainButton.text == "Train" and ui.trainProgressBar.value == ui.trainProgressBar.maximum
    p.inputVolume = volume
    widget.onApplyButton()
    assert FakeSceneRun.made[-1].kwargs["options"].model == "white-matter"
    # a failed training says why, and the model list stays as it was
    _click(ui.trainButton)
    FakeTrainRun.made[-1].result = InputError("segment 2 of 'brain labels' has no name")
    FakeTrainRun.made[-1].running = False
    widget.onTrainPoll()
    assert ui.trainStatusLabel.text == "Failed: segment 2 of 'brain labels' has no name"
    assert "Training failed:" in dialogs.errors[-1] and p.model == "white-matter"


@pytest.fixture
def painted(fakes, monkeypatch, tiny_model, tmp_path):
    """The scene holds a volume with two segments painted on slices 1 and 4; the Logic's Python is a stand-in for
    `clipseg finetune`; the app's event loop is a no-op; nothing to install. Returns (module, pair, record)."""
    import types

    from CLIPSegLib.slicer.mrml_bridge import ensure_segmentation_support, masks_to_segmentation

    _, module = fakes
    script, record = slicer_fakes.fake_finetune(tmp_path, tiny_model)
    monkeypatch.setattr(module.CLIPSegLogic, "pythonExecutable", staticmethod(lambda: script))
    monkeypatch.setattr(dependencies, "missing", lambda reqs=None: [])
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(  # CLIPSEG_HOME is set already: kept
        processEvents=lambda: None, slicerUserSettingsFilePath=str(tmp_path / "settings" / "Slicer.ini")))
    ensure_segmentation_support(slicer.mrmlScene)
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "t1")
    slicer.util.updateVolumeFromArray(volume, np.ones((6, 8, 10), np.float32))
    white, grey = np.zeros((6, 8, 10), bool), np.zeros((6, 8, 10), bool)
    white[1, 2:4, 2:4] = grey[4, 5:7, 5:7] = True
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    masks_to_segmentation(seg, volume, {"white matter": white, "grey matter": grey})
    return module, (volume, seg), record


def test_console_finetune_waits_and_returns_the_new_model_now_in_the_model_list(painted, fakes):
    dialogs, _ = fakes
    module, pair, record = painted
    logic = module.CLIPSegLogic()
    assert logic.finetune([pair], wait=True, modelId="my-brain", device="cpu") == "my-brain"
    assert "my-brain" in [m.id for m in logic.availableModels()]
    argv = json.loads((record / "argv.json").read_text())
    assert argv[argv.index("--device") + 1] == "cpu"
    with open(record / "data" / "data.csv", newline="", encoding="utf-8") as f:
        assert [(r["phrase"], r["slices"]) for r in csv.DictReader(f)] == [("white matter", "1;4"),
                                                                          ("grey matter", "1;4")]
    # the same name again: asked before it replaces the earlier model; declined, nothing runs
    dialogs.confirm_answer = False
    with pytest.raises(InputError, match="was trained or imported before"):
        logic.finetune(pair, modelId="my-brain")
    dialogs.confirm_answer = True
    run = logic.finetune(pair, wait=False, modelId="my-brain")
    assert run.options["replace"] and run.finish(60) == "my-brain"
    assert len(dialogs.confirmations) == 2 and "my-brain" in dialogs.confirmations[0]


def test_console_finetune_refuses_bad_input_before_installing_or_starting(fakes, monkeypatch):
    dialogs, module = fakes
    _installed(monkeypatch, set())  # everything missing: it would ask to install
    logic = module.CLIPSegLogic()
    volume, seg = _pair("brain")
    with pytest.raises(InputError, match=r"unknown training option 'step' \(did you mean 'steps'"):
        logic.finetune([(volume, seg)], step=3)
    with pytest.raises(InputError, match="no training pair"):
        logic.finetune([])
    assert dialogs.confirmations == [] and logic._training is None
