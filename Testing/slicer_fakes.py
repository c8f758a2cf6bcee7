"""Stand-ins for what the Slicer app adds to the `slicer-core` wheel, so CLIPSeg.py can be imported and its Widget and
Logic driven in tests: `qt`, `ctk`, `slicer.i18n`, `slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper`,
the dialogs of `slicer.util`, and the widgets of CLIPSeg.ui (built from the .ui file, so names and classes are real).
Each fake does only what CLIPSeg.py uses. MRML (scene, parameter node) is real, from slicer-core.

``ImportGuard`` refuses the packages Slicer's own Python does not ship and records every attempt to import one
(asking whether one is installed, with ``importlib.util.find_spec``, is allowed and answers "not installed").
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
import time
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "CLIPSeg"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CLIPSeg.ui"
# Not in Slicer's Python (numpy, scipy, SimpleITK, vtk, qt, ctk and slicer are).
NOT_IN_SLICER = ("torch", "torchvision", "monai", "open_clip", "safetensors", "jsonschema", "transformers",
                 "segment_anything", "tqdm", "PIL", "timm", "slicerio")


class ImportGuard(importlib.abc.MetaPathFinder):
    """A sys.meta_path finder: importing one of ``names`` raises ModuleNotFoundError and is recorded in
    ``self.imported``; ``importlib.util.find_spec`` probes of them also raise (read as "not installed") unrecorded."""

    def __init__(self, names=NOT_IN_SLICER):
        self.names = set(names)
        self.imported: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in self.names:
            return None
        caller = sys._getframe(1)
        while caller is not None and caller.f_code.co_name == "_find_spec":
            caller = caller.f_back
        if caller is not None and caller.f_code.co_name.startswith("_find_and_load"):  # an import, not a probe
            self.imported.append(name)
        raise ModuleNotFoundError(f"No module named {name!r} (not in Slicer's Python)", name=name)


# --- Qt ------------------------------------------------------------------------------------------------------------

class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, *args):
        for slot in list(self.slots):
            slot(*args)


class Widget:
    """A widget of the .ui file: Qt properties as attributes, PythonQt's ``connect("signal(args)", slot)``."""

    def __init__(self, name="", cls="QWidget", parameter=None):
        self.name, self.cls, self.parameter = name, cls, parameter  # parameter: its SlicerParameterName
        self.enabled, self.text, self.toolTip, self.value, self.maximum = True, "", "", 0, 100
        self.signals: dict[str, Signal] = {}

    def signal(self, name) -> Signal:
        return self.signals.setdefault(name.split("(")[0], Signal())

    def connect(self, signal, slot):
        self.signal(signal).connect(slot)

    def setMRMLScene(self, scene):
        self.mrmlScene = scene

    def addWidget(self, widget):
        pass


class TextEdit(Widget):
    """QTextEdit: ``setPlainText`` calls are logged (each one moves the cursor to the end); ``type`` is the user
    typing (changes the text and emits textChanged, as Qt does for both)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._text = ""
        self.setPlainTextCalls: list[str] = []

    def toPlainText(self):
        return self._text

    def setPlainText(self, text):
        self.setPlainTextCalls.append(text)
        self._text = text
        self.signal("textChanged").emit()

    def type(self, text):
        self._text = text
        self.signal("textChanged").emit()


class ComboBox(Widget):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.items: list[tuple[str, object]] = []
        self._current = -1

    def clear(self):
        self.items = []
        self.currentIndex = -1

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self._current < 0:
            self.currentIndex = 0

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    @property
    def count(self):
        return len(self.items)

    @property
    def currentIndex(self):
        return self._current

    @currentIndex.setter
    def currentIndex(self, index):
        if index != self._current:
            self._current = index
            self.signal("currentIndexChanged").emit(index)


class LineEdit(Widget):
    """QLineEdit: ``text``; ``type`` is the user typing (changes the text and emits textChanged)."""

    def type(self, text):
        self.text = text
        self.signal("textChanged").emit()


class ListWidget(Widget):
    """QListWidget of text rows: ``addItem``, ``takeItem``, ``clear``, ``count``, ``currentRow`` (-1: none)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.items: list[str] = []
        self.currentRow = -1

    def addItem(self, text):
        self.items.append(text)

    def takeItem(self, row):
        return self.items.pop(row) if 0 <= row < len(self.items) else None

    def clear(self):
        self.items, self.currentRow = [], -1

    @property
    def count(self):
        return len(self.items)


WIDGET_CLASSES = {"QTextEdit": TextEdit, "QComboBox": ComboBox, "QListWidget": ListWidget, "QLineEdit": LineEdit}


def ui_widgets(path=UI_FILE) -> dict[str, Widget]:
    """One fake per widget of the .ui file, by name."""
    widgets = {}
    for w in ET.parse(path).getroot().iter("widget"):
        parameter = next((p.find("string").text for p in w.findall("property")
                          if p.get("name") == "SlicerParameterName"), None)
        widgets[w.get("name")] = WIDGET_CLASSES.get(w.get("class"), Widget)(w.get("name"), w.get("class"), parameter)
    return widgets


class QTimer:
    def __init__(self):
        self.timeout = Signal()
        self.interval, self.active = 0, False

    def setInterval(self, msec):
        self.interval = msec

    def start(self, *args):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


class QThread:
    @staticmethod
    def msleep(msec):
        time.sleep(msec / 1000)


# --- slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper ------------------------------------------------------

class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent or types.SimpleNamespace(isEntered=True)
        self.moduleName = type(self).__name__.removesuffix("Widget")

    def setup(self):
        self.layout = Widget("layout")

    def resourcePath(self, filename):
        return str(MODULE_DIR / "Resources" / filename)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        """The module's singleton vtkMRMLScriptedModuleNode in slicer.mrmlScene, as the app's logic does."""
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        pass


class Choice:
    def __init__(self, choices):
        self.choices = choices


class WithinRange:
    def __init__(self, low, high):
        self.low, self.high = low, high


def parameterNodeWrapper(cls):
    """Typed fields stored in the MRML node as the app's wrapper stores them (strings as parameters, nodes as
    references), defaults written on first use, other attributes (AddObserver, ...) forwarded to the node.
    ``connectGui`` emulates the app's QTextEdit and QLineEdit connectors only: on every parameter change it rewrites
    the whole text of a QTextEdit (``setPlainText``) or QLineEdit (``text``) bound with SlicerParameterName, as
    Slicer does; a QLineEdit's ``textChanged`` writes the parameter."""
    import slicer

    hints = typing.get_type_hints(cls, include_extras=True)
    types_ = {name: typing.get_args(h)[0] if typing.get_origin(h) is typing.Annotated else h
              for name, h in hints.items()}
    defaults = {name: getattr(cls, name, None) for name in hints}

    def is_node(t):
        return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)

    class Wrapper:
        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_guis", {})
            for name, t in types_.items():
                if not is_node(t) and name not in node.GetParameterNames():
                    node.SetParameter(name, str(defaults[name]))

        def __getattr__(self, name):
            node = object.__getattribute__(self, "parameterNode")
            if name not in types_:
                return getattr(node, name)
            t = types_[name]
            if is_node(t):
                return node.GetNodeReference(name)
            raw = node.GetParameter(name)
            return raw == "True" if t is bool else t(raw)

        def __setattr__(self, name, value):
            node = object.__getattribute__(self, "parameterNode")
            if is_node(types_[name]):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                node.Modified()
            else:
                node.SetParameter(name, str(value))

        def connectGui(self, ui):
            import vtk

            bound = [(w, w.parameter) for w in vars(ui).values()
                     if isinstance(w, (TextEdit, LineEdit)) and w.parameter in types_]

            def write(caller=None, event=None):
                for widget, name in bound:
                    if isinstance(widget, TextEdit):
                        widget.setPlainText(getattr(self, name))
                    else:
                        widget.text = getattr(self, name)

            for widget, name in bound:
                read = widget.toPlainText if isinstance(widget, TextEdit) else lambda w=widget: w.text
                widget.connect("textChanged()", lambda r=read, n=name: setattr(self, n, r()))
            tag = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, write)
            write()
            self._guis[tag] = bound
            return tag

        def disconnectGui(self, tag):
            if tag in self._guis:
                self.parameterNode.RemoveObserver(tag)
                del self._guis[tag]

    Wrapper.__name__ = cls.__name__
    Wrapper.hints = hints  # for tests: each field's annotation, with its Choice / WithinRange
    return Wrapper


# --- installing the fakes ------------------------------------------------------------------------------------------

class Dialogs:
    """What slicer.util's dialogs were asked, and the answer confirmations get."""

    def __init__(self):
        self.confirm_answer = True
        self.confirmations: list[str] = []
        self.errors: list[str] = []
        self.pip_installs: list = []

    def confirmOkCancelDisplay(self, text, windowTitle=None, **kwargs):
        self.confirmations.append(text)
        return self.confirm_answer

    def errorDisplay(self, text, windowTitle=None, **kwargs):
        self.errors.append(text)

    @contextlib.contextmanager
    def tryWithErrorDisplay(self, message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as e:  # the app shows it in a dialog and carries on
            self.errors.append(f"{message} {e}")

    @contextlib.contextmanager
    def WaitCursor(self):
        yield

    def pip_install(self, requirements, **kwargs):
        self.pip_installs.append(requirements)

    def loadUI(self, path):
        widget = Widget("CLIPSeg", "qMRMLWidget")
        widget.uiPath = path
        return widget

    def childWidgetVariables(self, widget):
        return types.SimpleNamespace(**ui_widgets(widget.uiPath))


def fake_modules() -> dict[str, types.ModuleType]:
    qt = types.ModuleType("qt")
    qt.QTimer, qt.QThread = QTimer, QThread
    ctk = types.ModuleType("ctk")
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
              ScriptedLoadableModuleTest):
        setattr(slm, c.__name__, c)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper, pnw.Choice, pnw.WithinRange = parameterNodeWrapper, Choice, WithinRange
    return {"qt": qt, "ctk": ctk, "slicer.i18n": i18n, "slicer.ScriptedLoadableModule": slm,
            "slicer.parameterNodeWrapper": pnw}


def install(setitem=None, setattr_=None) -> Dialogs:
    """Put the fakes in place (with pytest's ``monkeypatch.setitem``/``setattr`` to undo them after a test, or for
    good in a child process) and give slicer a fresh ``mrmlScene``. Returns the Dialogs record."""
    import slicer
    import slicer.util

    setitem = setitem or (lambda d, k, v: d.__setitem__(k, v))
    setattr_ = setattr_ or (lambda o, k, v: setattr(o, k, v))
    for name, module in fake_modules().items():
        setitem(sys.modules, name, module)
        if name.startswith("slicer."):
            setattr_(slicer, name.rpartition(".")[2], module)
    dialogs = Dialogs()
    for name in ("confirmOkCancelDisplay", "errorDisplay", "tryWithErrorDisplay", "WaitCursor", "pip_install",
                 "loadUI", "childWidgetVariables"):
        setattr_(slicer.util, name, getattr(dialogs, name))
    setattr_(slicer, "mrmlScene", slicer.vtkMRMLScene())
    setattr_(slicer, "app", None)
    return dialogs


def load_module(name="CLIPSeg_under_test"):
    """Import CLIPSeg/CLIPSeg.py (after ``install``) as a fresh module."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    spec = importlib.util.spec_from_file_location(name, MODULE_DIR / "CLIPSeg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- a stand-in for `clipseg finetune` -------------------------------------------------------------------------------

FAKE_FINETUNE = r'''#!@PYTHON@
"""Stands in for `python -m CLIPSegLib.cli finetune` (its contract): keeps what it was given in @RECORD@, checks the
data table, then writes the tiny model under the asked id into --output-dir and prints JSON progress and the done
event. Mode @MODE@: ok, fail (an error event), hang (progress, then sleeps until killed)."""
import argparse, csv, json, os, shutil, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("-m", dest="module", required=True)
parser.add_argument("command")
for flag in ("--data", "--output-dir", "--model-id", "--progress"):
    parser.add_argument(flag, required=True)
parser.add_argument("--from", dest="from_model")
parser.add_argument("--device", default="auto")
parser.add_argument("--steps", type=int)
parser.add_argument("--input-size", type=int)
parser.add_argument("--force", action="store_true")
args = parser.parse_args()


def say(**event):
    print(json.dumps(event), flush=True)


def fail(message):
    say(event="error", message=message, exit_code=2)
    sys.exit(2)


record = Path(@RECORD@)
shutil.copytree(Path(args.data).parent, record / "data", dirs_exist_ok=True)
(record / "argv.json").write_text(json.dumps(sys.argv[1:]))
if (args.module, args.command, args.progress) != ("CLIPSegLib.cli", "finetune", "json"):
    fail(f"not the finetune command: {sys.argv}")
with open(args.data, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
if reader.fieldnames != ["image", "mask", "phrase", "slices"] or not rows:
    fail(f"the table needs the columns image,mask,phrase,slices and rows, got {reader.fieldnames}")
for row in rows:
    if not (Path(row["image"]).is_file() and Path(row["mask"]).is_file()) or not row["slices"]:
        fail(f"a row names a missing file or no slice: {row}")
if @MODE@ == "fail":
    fail("phrase 'white matter' has only empty masks on its labelled slices")
for i in (1, 2, 3):
    say(event="progress", stage="fine-tuning", done=i, total=3)
    if @MODE@ == "hang":
        (record / "pid").write_text(str(os.getpid()))
        time.sleep(300)
source = Path(@SPEC@)
spec = json.loads(source.read_text(encoding="utf-8"))
out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
shutil.copyfile(source.with_suffix(".safetensors"), out / f"{args.model_id}.safetensors")
spec["id"] = args.model_id
spec["files"][0]["name"] = f"{args.model_id}.safetensors"
(out / f"{args.model_id}.json").write_text(json.dumps(spec), encoding="utf-8")
say(event="message", text=f"trained on {len(rows)} masks")
say(event="done", model=str(out / f"{args.model_id}.json"))
'''


def fake_finetune(folder, spec, mode="ok") -> tuple[str, Path]:
    """An executable stand-in for the Python that runs `-m CLIPSegLib.cli finetune` (pass it as ``python``): it
    answers as the command's contract says, copying the model ``spec`` (+ its .safetensors) under the asked id.
    Returns (its path, the folder where it keeps the arguments and data it was given)."""
    import os
    import stat

    folder = Path(folder)
    record = folder / f"fake-finetune-{mode}"
    record.mkdir(parents=True, exist_ok=True)
    script = folder / f"fake-finetune-{mode}.py"
    script.write_text(FAKE_FINETUNE.replace("@PYTHON@", sys.executable).replace("@RECORD@", repr(str(record)))
                      .replace("@MODE@", repr(mode)).replace("@SPEC@", repr(str(spec))), encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return os.fspath(script), record
