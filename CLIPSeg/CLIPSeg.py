"""CLIPSeg scripted module: type a finding, get a segment.

Thin by design: everything that works without Qt lives in CLIPSegLib (pipeline, CLI, MRML bridge, background runs)
and is tested in CI on slicer-core. This file holds the Module, the parameter node, the Widget, the Logic that
the Python console uses, and the self-test that runs inside Slicer.
"""

import logging
import os
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

sys.path.insert(0, os.path.dirname(__file__))  # CLIPSegLib beside this file

from CLIPSegLib.options import AXES, DEVICES, PRECISIONS, TRAIN_INPUT_SIZES  # noqa: E402  (the one copy; torch-free)

# The run options the panel shows (parameter node fields named as the Logic keywords); the others keep defaults.
# The model determines the engine, so there is no engine choice.
PANEL_OPTIONS = ("model", "device", "precision", "axis", "threshold", "keepProbabilities")


class CLIPSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CLIPSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CLIPSeg developers"]
        self.parent.helpText = _("""
Text-guided segmentation. Pick a volume, type one finding per line (for example "hypoechoic thyroid nodule" or
"anechoic cyst"), press Apply. Each finding becomes a segment named by its text; a finding that is not in the image
gives an empty segment and a note in the status line. Segments you already have are kept; running a finding again
replaces only its own segment. Processing runs in a background process: the panel stays responsive and Cancel stops
it at once.<br><br>
Train on my segments: paint a structure on a few slices, name the segment with its finding, press Train; the new model
appears in the model list (see the README, "Teach it your own finding").<br><br>
Needs 3D Slicer 5.10 or later (Python 3.12). The first Apply installs PyTorch (through the PyTorch extension when it
is installed), MONAI and open_clip once, after asking.<br><br>
Engines, chosen by the model: CLIP-TNseg (Sun et al., IEEE Signal Processing Letters 2025), TGC-Net (Lin et al.,
2025) and MedCLIP-SAM (Koleilat et al., MICCAI 2024; Medical Image Analysis 2025).<br>
The embedded models (default: cliptnseg-phantom-ab-small) are trained on phantoms only: for demos and teaching, not for
clinical use. See <a href="https://github.com/clipseg/SlicerCLIPSeg">the project page</a>.
""")
        self.parent.acknowledgementText = _("""
Built on open_clip, MONAI, SimpleITK and slicerio. CLIP-TNseg, TGC-Net and MedCLIP-SAM are the work of their authors
(Sun et al.; Lin et al.; Koleilat et al.); please cite them when you publish results.
""")


@parameterNodeWrapper
class CLIPSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    prompts: str = "hypoechoic thyroid nodule\nanechoic cyst"
    model: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    precision: Annotated[str, Choice(list(PRECISIONS))] = "fp32"
    axis: Annotated[str, Choice(list(AXES))] = "auto"
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    overrideThreshold: bool = False  # off: the model's calibrated threshold (the run gets threshold None)
    keepProbabilities: bool = False
    trainVolume: vtkMRMLScalarVolumeNode
    trainSegmentation: vtkMRMLSegmentationNode
    trainModelName: str = ""
    trainInputSize: Annotated[str, Choice(list(TRAIN_INPUT_SIZES))] = next(iter(TRAIN_INPUT_SIZES))


def showReady(button, text: str, ok: bool, whatItDoes: str, whatIsMissing: str) -> None:
    """A run button at rest (not Cancel): enabled when ``ok``, its tooltip saying what it does or what is missing."""
    button.enabled = ok
    button.text = text
    button.toolTip = whatItDoes if ok else whatIsMissing


def promptsFromText(text: str) -> list:
    """One finding per line; blank lines ignored."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class CLIPSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onPoll)
        self._deviceProbe = None
        self._deviceTimer = qt.QTimer()
        self._deviceTimer.setInterval(500)
        self._deviceTimer.timeout.connect(self.onDeviceProbePoll)
        self._training = None
        self._trainTimer = qt.QTimer()
        self._trainTimer.setInterval(500)
        self._trainTimer.timeout.connect(self.onTrainPoll)
        self._trainPairs = []  # (volume node ID, segmentation node ID) added beside the selectors' pair
        self._populating = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CLIPSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CLIPSegLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        # Bound by hand, not through SlicerParameterName: the QTextEdit connector rewrites the whole text on every
        # parameter change (the cursor jumps while typing); the model list comes from the model catalogue, and the
        # model determines the engine.
        self.ui.promptsTextEdit.connect("textChanged()", self.onPromptsEdited)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.addTrainPairButton.connect("clicked(bool)", self.onAddTrainPair)
        self.ui.removeTrainPairButton.connect("clicked(bool)", self.onRemoveTrainPair)
        self.populateModels()
        self.ui.deviceInfoLabel.text = self.logic.deviceDescription()
        self.ui.statusLabel.text = self.logic.pythonProblem()
        self.startDeviceProbe()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelRun()
        self.cancelTraining()
        self._deviceTimer.stop()
        if self._deviceProbe is not None:
            self._deviceProbe.cancel()
            self._deviceProbe = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRun()  # the background process must not outlive the scene it would write into
        self.cancelTraining()
        self._trainPairs = []
        self.ui.trainPairsListWidget.clear()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first
        if not self._parameterNode.model:
            self._parameterNode.model = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or ""

    def setParameterNode(self, inputParameterNode: Optional[CLIPSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Show the hand-bound fields (prompts, model), writing a widget only where its value differs: rewriting the
        findings box while the user types in it would move the cursor. Then update the Apply button."""
        p = self._parameterNode
        if p:
            if self.ui.promptsTextEdit.toPlainText() != p.prompts:
                self.ui.promptsTextEdit.setPlainText(p.prompts)
            index = self.ui.modelComboBox.findData(p.model) if p.model else -1
            if index >= 0 and index != self.ui.modelComboBox.currentIndex:
                self.ui.modelComboBox.currentIndex = index
        self._checkCanApply()
        self._checkCanTrain()

    def onPromptsEdited(self) -> None:
        text = self.ui.promptsTextEdit.toPlainText()
        if self._parameterNode and self._parameterNode.prompts != text:
            self._parameterNode.prompts = text

    def populateModels(self, select: str = "") -> None:
        """One entry per segmentation model, with its engine: "cliptnseg-phantom-ab-small (CLIP-TNseg, embedded)".
        Then the model ``select`` is chosen, else the parameter node's, else the default model."""
        from CLIPSegLib.models import DEFAULT_MODEL

        status = {"embedded": _("embedded"), "imported": _("imported"), "present": _("downloaded"),
                  "not downloaded": _("not downloaded")}
        combo = self.ui.modelComboBox
        self._populating = True  # the emptied list must not clear the model choice
        try:
            combo.clear()
            for model in self.logic.availableModels():
                combo.addItem(f"{model.id} ({model.engine_name}, {status.get(model.status, model.status)})", model.id)
        finally:
            self._populating = False
        wanted = [select, self._parameterNode.model if self._parameterNode else "", DEFAULT_MODEL]
        combo.currentIndex = next((i for i in (combo.findData(m) for m in wanted if m) if i >= 0), 0)
        self.onModelChanged(combo.currentIndex)

    def onModelChanged(self, index) -> None:
        if self._populating:
            return
        model = self.ui.modelComboBox.itemData(index) or ""
        if self._parameterNode and self._parameterNode.model != model:
            self._parameterNode.model = model

    def startDeviceProbe(self) -> None:
        """Ask a background process which device torch sees (this process never imports torch); once."""
        if self._deviceProbe is not None or self._deviceTimer.isActive():
            return
        self._deviceProbe = self.logic.startDeviceProbe()
        if self._deviceProbe is not None:
            self.ui.deviceInfoLabel.text = self.logic.deviceDescription(self._deviceProbe)
            self._deviceTimer.start()

    def onDeviceProbePoll(self) -> None:
        probe = self._deviceProbe
        if probe is None or probe.returncode is not None:
            self._deviceTimer.stop()
        if probe is not None and probe.returncode is not None:
            probe.wait()
            self.ui.deviceInfoLabel.text = self.logic.deviceDescription(probe)

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._run is not None:
            return
        p = self._parameterNode
        ok = bool(p and p.inputVolume and promptsFromText(p.prompts))
        showReady(self.ui.applyButton, _("Apply"), ok, _("Segment each finding"),
                  _("Select an input volume and type at least one finding"))

    def onApplyButton(self) -> None:
        if self._run is not None:
            self.cancelRun()
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies(ask=True):
                return
            self.startDeviceProbe()  # torch may have just been installed
            p = self._parameterNode
            if not self.logic.ensureModel(p.model, ask=True):
                return
            options = {name: getattr(p, name) for name in PANEL_OPTIONS}
            options["threshold"] = p.threshold if p.overrideThreshold else None
            self._run = self.logic.start(p.inputVolume, promptsFromText(p.prompts), p.outputSegmentation, **options)
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.enabled = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()

    def onPoll(self) -> None:
        self._followRun("_run", self._timer, self.ui.progressBar, self.ui.statusLabel, self._onSegmented,
                        _("Segmentation failed:"))

    def _onSegmented(self, run, node) -> None:
        if self._parameterNode:
            self._parameterNode.outputSegmentation = node
        self.ui.statusLabel.text = "\n".join(run.messages) or _("Done.")

    def _followRun(self, name, timer, progressBar, statusLabel, onDone, failure) -> None:
        """Poll the background run held in ``self.<name>`` (a SceneRun or TrainRun) and show its progress; once it
        has ended, pass its result to ``onDone(run, result)`` or show why it failed."""
        run = getattr(self, name)
        if run is None:
            timer.stop()
            return
        run.poll()
        state = run.run.state
        if state.total:
            progressBar.maximum = state.total
            progressBar.value = state.done
            statusLabel.text = f"{state.stage}: {state.done}/{state.total}"
        if run.running:
            return
        timer.stop()
        setattr(self, name, None)
        try:
            onDone(run, run.finish())
            progressBar.value = progressBar.maximum
        except Exception as e:
            statusLabel.text = _("Failed: ") + str(e)
            slicer.util.errorDisplay(failure + f"\n{e}")
        finally:
            self._checkCanApply()
            self._checkCanTrain()

    def _stopRun(self, name, timer) -> None:
        timer.stop()
        run = getattr(self, name)
        setattr(self, name, None)
        if run is not None:
            run.cancel()
        if self._parameterNode:
            self._checkCanApply()
            self._checkCanTrain()

    def cancelRun(self) -> None:
        self._stopRun("_run", self._timer)

    def cancelTraining(self) -> None:
        self._stopRun("_training", self._trainTimer)

    def trainingPairs(self) -> list:
        """The (volume, segmentation) nodes to train on: the pairs added to the list, then the selectors' pair; each
        once."""
        pairs = [(slicer.mrmlScene.GetNodeByID(v), slicer.mrmlScene.GetNodeByID(s)) for v, s in self._trainPairs]
        p = self._parameterNode
        if p and p.trainVolume and p.trainSegmentation:
            pairs.append((p.trainVolume, p.trainSegmentation))
        return [pair for i, pair in enumerate(pairs) if all(pair) and pair not in pairs[:i]]

    def onAddTrainPair(self) -> None:
        p = self._parameterNode
        if p and p.trainVolume and p.trainSegmentation:
            pair = (p.trainVolume.GetID(), p.trainSegmentation.GetID())
            if pair not in self._trainPairs:
                self._trainPairs.append(pair)
        self._showTrainPairs()

    def onRemoveTrainPair(self) -> None:
        row = self.ui.trainPairsListWidget.currentRow
        if 0 <= row < len(self._trainPairs):
            del self._trainPairs[row]
        self._showTrainPairs()

    def _showTrainPairs(self) -> None:
        """List the added pairs ("volume: segmentation"), dropping those whose nodes left the scene."""
        scene = slicer.mrmlScene
        self._trainPairs = [(v, s) for v, s in self._trainPairs if scene.GetNodeByID(v) and scene.GetNodeByID(s)]
        self.ui.trainPairsListWidget.clear()
        for v, s in self._trainPairs:
            self.ui.trainPairsListWidget.addItem(f"{scene.GetNodeByID(v).GetName()}: {scene.GetNodeByID(s).GetName()}")
        self._checkCanTrain()

    def _checkCanTrain(self) -> None:
        if self._training is not None:
            return
        n = len(self.trainingPairs())
        showReady(self.ui.trainButton, _("Train"), n > 0, _(
            "Fine-tune the selected model on the painted slices of {n} segmentation(s); the new model joins the model "
            "list").format(n=n), _("Select a volume and the segmentation you painted on it"))

    def onTrainButton(self) -> None:
        if self._training is not None:
            self.cancelTraining()
            self.ui.trainStatusLabel.text = _("Training cancelled; no model was added.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training."), waitCursor=True):
            p = self._parameterNode
            self._training = self.logic.finetune(self.trainingPairs(), wait=False, fromModel=p.model or None,
                                                 modelId=p.trainModelName.strip() or None, ask=True, device=p.device,
                                                 precision=p.precision, inputSize=TRAIN_INPUT_SIZES[p.trainInputSize])
            self.ui.trainButton.text = _("Cancel")
            self.ui.trainButton.enabled = True
            self.ui.trainProgressBar.value = 0
            self.ui.trainStatusLabel.text = self._training.describe()
            self._trainTimer.start()

    def onTrainPoll(self) -> None:
        self._followRun("_training", self._trainTimer, self.ui.trainProgressBar, self.ui.trainStatusLabel,
                        self._onTrained, _("Training failed:"))

    def _onTrained(self, run, modelId) -> None:
        self.populateModels(select=modelId)
        self.ui.trainStatusLabel.text = "\n".join(run.messages + [_(
            "New model {modelId}: selected under Model above, Apply segments with it.").format(modelId=modelId)])


class CLIPSegLogic(ScriptedLoadableModuleLogic):
    """Usable without the GUI, e.g. from the Python console::

        logic = slicer.util.getModuleLogic("CLIPSeg")
        seg = logic.segment(volumeNode, ["thyroid nodule", "cyst"], model="cliptnseg-phantom-ab-small", wait=True)

    ``model`` is a model id of the catalogue (``availableModels``) or the path to a model .json; it determines the
    engine. The ``engine=`` keyword of scripts written when the panel had an engine choice still works: it must name
    the model's engine, else the run stops with an error saying so. Run options are keyword arguments, declared once
    in CLIPSegLib/options.py (``SegmentOptions``): engine, model, device, precision, axis, threshold, batchSize,
    keepProbabilities, spacing.

    CLIPSeg's code never imports torch, MONAI or open_clip in this process (the PyTorch extension's installer does
    load torch, once, when it installs it): it checks they are installed (and installs them, after
    asking) and leaves the work to a background PythonSlicer.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._active = None
        self._training = None
        # Downloaded weights live beside Slicer's settings, shared by the panel and its background processes.
        if hasattr(slicer, "app") and slicer.app is not None:
            os.environ.setdefault("CLIPSEG_HOME", os.path.join(
                os.path.dirname(slicer.app.slicerUserSettingsFilePath), "CLIPSeg"))

    def getParameterNode(self):
        return CLIPSegParameterNode(super().getParameterNode())

    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer of this Slicer (same site-packages as the app), else this interpreter."""
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        candidate = os.path.join(slicer.app.slicerHome, "bin", name) if getattr(slicer, "app", None) else ""
        if candidate and os.path.exists(candidate):
            return candidate
        return shutilWhich("PythonSlicer") or sys.executable

    @staticmethod
    def pythonProblem() -> str:
        """Why this Slicer cannot run CLIPSeg (its Python is too old, naming the Slicer version needed), or ''."""
        from CLIPSegLib.slicer import dependencies

        try:
            dependencies.check_python()
        except dependencies.DependencyError as e:
            return str(e)
        return ""

    def startDeviceProbe(self):
        """Start a background PythonSlicer that reports whether torch sees a CUDA GPU (a BackgroundRun to poll);
        None while torch is not installed."""
        from CLIPSegLib.slicer import dependencies
        from CLIPSegLib.slicer.background import BackgroundRun, device_probe_command

        if not dependencies.is_installed("torch"):
            return None
        return BackgroundRun(device_probe_command(self.pythonExecutable()))

    def deviceDescription(self, probe=None) -> str:
        """One line for the panel: PyTorch missing, the GPU found by ``probe`` (see startDeviceProbe), or still
        checking. Never imports torch."""
        from CLIPSegLib.slicer import dependencies

        if not dependencies.is_installed("torch"):
            return _("PyTorch not installed yet (installed at first Apply)")
        if probe is None or probe.returncode is None:
            return _("Checking for a CUDA GPU...")
        probe.poll()
        result = probe.state.result
        if probe.returncode != 0 or not result:
            return _("GPU check failed (PyTorch does not load?): ") + probe.error_text()[-200:]
        if result.get("cuda"):
            return _("GPU: ") + str(result.get("name", ""))
        return _("No CUDA GPU found: CPU will be used")

    def availableModels(self) -> list:
        """The segmentation models of the catalogue (``CLIPSegLib.models.ModelRef``: id, engine, status), downloaded
        or not: the list ``clipseg models list`` prints."""
        from CLIPSegLib.models import catalogue

        return catalogue.segmentation_models()

    def ensureModel(self, modelId=None, ask: bool = True) -> bool:
        """Download a registry model that is not on this computer, once, after asking with its size (verified,
        resumable). False if the user declined; True when the model is here."""
        from CLIPSegLib.models import catalogue, store

        model = catalogue.find(modelId or None)
        if model.present or model.source != "registry" or not model.runnable:
            return True  # nothing to download (a part is refused when the run resolves the model)
        if ask and not slicer.util.confirmOkCancelDisplay(
                _("The model {modelId} ({size}) is not on this computer. Download it now?").format(
                    modelId=model.id, size=model.size) + "\n" + model.description, _("Download model")):
            return False
        with slicer.util.WaitCursor():
            store.fetch(model.id)
        return True

    def missingPackages(self) -> list:
        """The requirements CLIPSeg declares (Resources/requirements.txt) whose module is not installed."""
        from CLIPSegLib.slicer import dependencies

        return dependencies.missing()

    def ensureDependencies(self, ask: bool = True) -> bool:
        """Install the missing declared packages once, after asking when ``ask``: torch through the PyTorch extension
        when it is installed (it picks the CUDA build), the rest with pip. Returns False if the user declined; raises
        DependencyError on a Slicer too old for them or when the installation fails."""
        import importlib

        from CLIPSegLib.slicer import dependencies

        dependencies.check_python()
        missing = self.missingPackages()
        if not missing:
            return True
        if ask and not slicer.util.confirmOkCancelDisplay(
                _("CLIPSeg needs these Python packages, which will be installed now (a few GB for PyTorch):\n")
                + "\n".join(missing), _("Install dependencies")):
            return False
        torchRequirements, others = dependencies.split_torch(missing)
        try:
            if torchRequirements:
                self._installTorch(torchRequirements)
            if others:
                slicer.util.pip_install(others)
        except Exception as e:
            raise dependencies.DependencyError(
                _("Installing the Python packages failed: ") + f"{e}\n" + _(
                    "Check the network or proxy, or install the PyTorch extension from the Extensions Manager, "
                    "restart Slicer and try again.")) from e
        importlib.invalidate_caches()
        still = self.missingPackages()
        if still:
            raise dependencies.DependencyError(dependencies.missing_message(still) + " " + _(
                "They were installed but cannot be found: restart Slicer and try again."))
        return True

    @staticmethod
    def _installTorch(requirements) -> None:
        """torch (+ torchvision) at the declared version: through the PyTorch extension if present, else pip."""
        from CLIPSegLib.slicer import dependencies

        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.pip_install(requirements)
            return
        pins = {dependencies.distribution(r).lower(): dependencies.specifier(r) for r in requirements}
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=pins.get("torch") or None)
        if torch is None:
            raise RuntimeError(_("the PyTorch extension did not install torch"))

    def requireDependencies(self, ask: bool = True) -> None:
        """ensureDependencies, raising DependencyError that names what is missing when they are still not there."""
        from CLIPSegLib.slicer import dependencies

        if not self.ensureDependencies(ask=ask):
            raise dependencies.DependencyError(dependencies.missing_message(self.missingPackages()))

    def start(self, volumeNode, prompts, segmentationNode=None, *, options=None, ask=True, **keywords):
        """Start a background run; returns a CLIPSegLib.slicer.scene_run.SceneRun (poll it, then finish() or cancel()).

        ``options`` (a CLIPSegLib.options.SegmentOptions; default: all defaults) with ``keywords`` changed: any of
        its options by name, ``engine``, ``model``, ``device``, ``precision``, ``axis``, ``threshold``,
        ``batchSize``, ``keepProbabilities``, ``spacing`` (snake_case works too); checked first (InputError).
        ``model``: a catalogue id or a spec path (default: the default model); a registry model not on this computer
        is downloaded after asking when ``ask``, else the error names `clipseg models fetch`. ``engine``: optional,
        must be the model's engine. ``threshold`` None keeps the model's calibrated probability threshold. Missing
        packages are installed next (asking when ``ask``), else DependencyError names them."""
        if self._active is not None and self._active.running:
            raise RuntimeError(_("A segmentation is already running; wait for it or cancel it first."))
        from CLIPSegLib.models import catalogue
        from CLIPSegLib.options import SegmentOptions

        options = SegmentOptions.from_keywords(options, **keywords)
        # packages first: checking a downloaded weight file's kind needs safetensors/torch (in the background only
        # once installed)
        self.requireDependencies(ask=ask)
        if ask:
            self.ensureModel(options.model, ask=True)
        catalogue.resolve(options.model, engine=options.engine)  # unknown, a part, not downloaded, another engine
        from CLIPSegLib.slicer.scene_run import SceneRun

        run = SceneRun(volumeNode, prompts, segmentationNode, options=options, python=self.pythonExecutable())
        self._active = run.start()
        return run

    def segment(self, volumeNode, prompts, *, segmentationNode=None, wait=True, options=None, ask=True, **keywords):
        """Segment ``prompts`` in ``volumeNode``; with ``wait=True`` returns the segmentation node when done, else
        the running SceneRun. Options as in ``start`` (keyword arguments only). Missing packages are installed first
        (asking when ``ask``)."""
        run = self.start(volumeNode, prompts, segmentationNode, options=options, ask=ask, **keywords)
        return self._waitFor(run) if wait else run

    def finetune(self, pairs, wait=True, fromModel=None, modelId=None, ask=True, **options):
        """Teach a model the structures painted on a few slices; returns the new model's id (``wait=False``: the
        running CLIPSegLib.slicer.train_run.TrainRun, with poll(), finish() -> the id, cancel()).

        ``pairs``: [(volume node, segmentation node)] (or one pair). Segment names are the phrases; the slices that
        hold any segment of a segmentation are its labelled slices (a segment empty there is learnt as absent there);
        other slices are not used. ``fromModel``: a catalogue id or spec path (default: the default model), downloaded
        after asking when ``ask``. ``modelId``: the new model's name (default: finetuned-<segment names>); it joins
        ``availableModels()``. Options: ``device``, ``precision`` (fp32, bf16), ``steps``, ``inputSize`` (pixels, e.g.
        256; None: the model's own), ``force`` (of `clipseg finetune`) and ``replace`` (take the name of a model trained
        before; asked when ``ask``). Inputs are checked first (InputError); missing
        packages are installed next (asking when ``ask``)."""
        if self._training is not None and self._training.running:
            raise RuntimeError(_("A training is already running; wait for it or cancel it first."))
        from CLIPSegLib.models import catalogue
        from CLIPSegLib.slicer import train_run

        run = train_run.TrainRun(pairs, fromModel, modelId, python=self.pythonExecutable(), **options)
        if ask and run.model_id and not run.options["replace"] and \
                train_run.model_origin(run.model_id) == "imported" and slicer.util.confirmOkCancelDisplay(
                    _("A model named {modelId} was trained or imported before. Replace it with the new one?").format(
                        modelId=run.model_id), _("Replace model")):
            run.options["replace"] = True
        self.requireDependencies(ask=ask)  # before a download: checking a weight file needs safetensors/torch
        if ask:
            self.ensureModel(fromModel, ask=True)
        catalogue.resolve(fromModel)  # unknown, a part, not downloaded
        self._training = run.start()
        return self._waitFor(run) if wait else run

    @staticmethod
    def _waitFor(run):
        """Wait for a background run, Slicer kept responsive; its result (its messages logged)."""
        while run.running:
            run.poll()
            slicer.app.processEvents()
            qt.QThread.msleep(50)
        result = run.finish()
        for message in run.messages:
            logging.info(message)
        return result


def shutilWhich(name):
    import shutil

    return shutil.which(name)


class CLIPSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest, or Reload and Test): installs what is missing, then segments a small phantom volume
    with the default model through the background process and checks the segments against the phantom's truth."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom_volume()

    def test_segment_phantom_volume(self):
        self.delayDisplay("Checking the Python packages (installed on the first run)")
        logic = CLIPSegLogic()
        self.assertTrue(logic.ensureDependencies(ask=False))
        self.assertEqual(logic.missingPackages(), [])

        from CLIPSegLib.evaluation.metrics import dice
        from CLIPSegLib.slicer.mrml_bridge import segment_to_array
        from CLIPSegLib.synthetic.phantoms import make_phantom

        self.delayDisplay("Segmenting a phantom volume in the background process")
        ph = make_phantom((16, 256, 256), spacing=(0.8, 0.25, 0.25), seed=501, findings=("nodule", "cyst"))
        volume = slicer.util.addVolumeFromArray(ph.image, name="phantom")
        volume.SetSpacing(0.25, 0.25, 0.8)
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
        seg.GetSegmentation().AddEmptySegment("mine", "my segment")
        out = logic.segment(volume, ["thyroid nodule", "anechoic cyst"], segmentationNode=seg, device="cpu",
                            wait=True, ask=False)
        self.assertIs(out, seg)
        segmentation = out.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        self.assertIsNotNone(segmentation.GetSegment("mine"))
        for name, finding in (("thyroid nodule", "nodule"), ("anechoic cyst", "cyst")):
            mask = segment_to_array(out, segmentation.GetSegmentIdBySegmentName(name), volume)
            self.assertGreater(mask.sum(), 0, name)
            self.assertGreater(dice(mask, ph.masks[finding]), 0.6, name)
        self.delayDisplay("Test passed")
