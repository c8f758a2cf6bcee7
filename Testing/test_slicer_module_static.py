"""Static checks of the Slicer module (CI has no Slicer app): names, bindings and build lists must agree."""

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "CLIPSeg"
SOURCE = (MODULE / "CLIPSeg.py").read_text(encoding="utf-8")
UI = ET.parse(MODULE / "Resources" / "UI" / "CLIPSeg.ui").getroot()

# Widget class expected from the name suffix used in the code (Slicer's naming habit).
SUFFIX_CLASS = {"Button": ("QPushButton",), "ComboBox": ("QComboBox",), "Selector": ("qMRMLNodeComboBox",),
                "Label": ("QLabel",), "TextEdit": ("QTextEdit",), "CheckBox": ("QCheckBox",),
                "SliderWidget": ("ctkSliderWidget",), "progressBar": ("QProgressBar",),
                "CollapsibleButton": ("ctkCollapsibleButton",), "ProgressBar": ("QProgressBar",),
                "LineEdit": ("QLineEdit",), "ListWidget": ("QListWidget",)}
# Parameter type -> widget classes the parameterNodeWrapper can bind it to.
TYPE_WIDGETS = {"vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"}, "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox"},
                "str": {"QTextEdit", "QLineEdit"}, "str+Choice": {"QComboBox"}, "float": {"ctkSliderWidget",
                                                                                          "QDoubleSpinBox"},
                "bool": {"QCheckBox"}}
# Bound by hand in the widget code, not through SlicerParameterName: the model list comes from the catalogue, and the
# app's QTextEdit connector rewrites the whole findings text on every parameter change (the cursor jumps).
UNBOUND_FIELDS = {"model", "prompts"}


def ui_widgets():
    return {w.get("name"): w.get("class") for w in UI.iter("widget")}


def parameter_fields():
    tree = ast.parse(SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CLIPSegParameterNode")
    fields = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign):
            ann = ast.unparse(stmt.annotation)
            base = re.sub(r"Annotated\[(\w+),.*", r"\1", ann)
            fields[stmt.target.id] = base + ("+Choice" if "Choice(" in ann else "")
    return fields


def test_every_widget_the_code_uses_exists_with_the_right_class():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used, "the widget code uses no UI widgets?"
    for name in sorted(used):
        assert name in widgets, f"CLIPSeg.py uses self.ui.{name}, which is not in CLIPSeg.ui"
        expected = next((cls for suffix, cls in SUFFIX_CLASS.items() if name.endswith(suffix)), None)
        assert expected is not None, f"no naming rule for widget {name}"
        assert widgets[name] in expected, f"{name} is a {widgets[name]}, expected {expected}"


def test_every_binding_matches_a_parameter_of_a_compatible_type():
    fields = parameter_fields()
    bound = {}
    for w in UI.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = w.get("class")
    assert bound
    for param, widget_class in bound.items():
        assert param in fields, f"SlicerParameterName {param!r} is not a field of CLIPSegParameterNode"
        assert widget_class in TYPE_WIDGETS[fields[param]], f"{param} ({fields[param]}) bound to {widget_class}"
    assert set(fields) - set(bound) == UNBOUND_FIELDS


def test_one_model_selector_and_no_engine_choice():
    """A model determines its engine: the panel offers models (each shown with its engine), never an engine apart."""
    assert not [name for name in ui_widgets() if "engine" in name.lower()]
    assert "engine" not in parameter_fields() and "model" in parameter_fields()
    assert ui_widgets()["modelComboBox"] == "QComboBox"
    populate = next(n for n in ast.walk(_class("CLIPSegWidget")) if isinstance(n, ast.FunctionDef)
                    and n.name == "populateModels")
    assert "engine_name" in ast.unparse(populate)


def _cmake_list(var):
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    body = re.search(rf"set\({var}\s+(.*?)\)", text, re.S).group(1)
    return {line.strip().replace("${MODULE_NAME}", "CLIPSeg") for line in body.splitlines() if line.strip()}


def test_every_python_file_is_listed_in_scripts():
    listed = _cmake_list("MODULE_PYTHON_SCRIPTS")
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk == listed


def test_every_resource_file_is_listed():
    listed = _cmake_list("MODULE_PYTHON_RESOURCES")
    on_disk = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*")
               if p.is_file() and not p.name.startswith(".")}
    assert on_disk == listed


def test_catalog_entry_is_named_after_the_cmake_project_and_has_only_schema_fields():
    project = re.search(r"^project\((\w+)\)", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"), re.M).group(1)
    assert (ROOT / f"{project}.json").is_file() and not (ROOT / "extension.json").exists()
    entry = json.loads((ROOT / f"{project}.json").read_text(encoding="utf-8"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert "v1.0.1" in entry["$schema"] and entry["build_dependencies"] == ["PyTorch"]


def test_extension_cmake_has_the_required_metadata():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "project(CLIPSeg)" in text
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "add_subdirectory(CLIPSeg)",
                "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert key in text, key
    assert re.search(r"EXTENSION_DEPENDS\s+\"?PyTorch", text)


def test_module_file_parses_and_keeps_to_the_template():
    tree = ast.parse(SOURCE)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"CLIPSeg", "CLIPSegParameterNode", "CLIPSegWidget", "CLIPSegLogic", "CLIPSegTest"} <= classes
    assert "def segment(self, volumeNode, prompts" in SOURCE and "wait=True" in SOURCE


def _class(name):
    return next(n for n in ast.parse(SOURCE).body if isinstance(n, ast.ClassDef) and n.name == name)


def _calls(node, attribute):
    return [c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
            and c.func.attr == attribute]


def test_the_findings_box_is_bound_by_hand_and_written_only_when_its_text_differs():
    box = next(w for w in UI.iter("widget") if w.get("name") == "promptsTextEdit")
    assert not [p for p in box.findall("property") if p.get("name") == "SlicerParameterName"]
    widget = _class("CLIPSegWidget")
    writes = _calls(widget, "setPlainText")
    assert writes, "the widget never shows the parameter node's findings"
    parents = {child: node for node in ast.walk(widget) for child in ast.iter_child_nodes(node)}
    for call in writes:
        guard = parents[call]
        while not isinstance(guard, ast.If):
            guard = parents[guard]
        test = guard.test
        assert isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.NotEq), ast.unparse(guard.test)
        assert "promptsTextEdit.toPlainText()" in ast.unparse(test), ast.unparse(test)
    assert 'promptsTextEdit.connect("textChanged()"' in SOURCE
    assert "modelComboBox.findData(p.model)" in SOURCE  # the model is shown from the parameter node too


def test_the_module_self_test_is_registered_and_installs_before_segmenting():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"if\(BUILD_TESTING\)\s*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)\s*endif\(\)",
                     text)
    test = _class("CLIPSegTest")
    ensure = _calls(test, "ensureDependencies")
    assert ensure and any(k.arg == "ask" and ast.literal_eval(k.value) is False for k in ensure[0].keywords)
    segment = _calls(test, "segment")
    assert segment and any(k.arg == "wait" and ast.literal_eval(k.value) is True for k in segment[0].keywords)
    assert ensure[0].lineno < segment[0].lineno


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    for line in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND "
                 "DISTRIBUTION", "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS"):
        assert line in text, line
    assert len(text) > 10000 and 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _help_texts():
    """helpText and acknowledgementText of the module class, as the user reads them."""
    texts = {}
    for node in ast.walk(_class("CLIPSeg")):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            if node.targets[0].attr in ("helpText", "acknowledgementText"):
                texts[node.targets[0].attr] = ast.literal_eval(node.value.args[0])
    return texts


def _cmake_value(key):
    return re.search(rf'set\({key} "(.*)"\)', (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")).group(1)


def test_every_url_of_the_project_names_the_same_repository():
    homepage = _cmake_value("EXTENSION_HOMEPAGE")
    repo = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", homepage).group(1)
    found = []
    for name in ("CLIPSeg.json", "CMakeLists.txt", "CLIPSeg/CLIPSeg.py", "README.md"):
        for host, owner_repo in re.findall(r"https://(github\.com|raw\.githubusercontent\.com)/([\w.-]+/[\w-]+)",
                                           (ROOT / name).read_text(encoding="utf-8")):
            if "clipseg" in owner_repo.lower():
                found.append((name, owner_repo))
    assert {n for n, _ in found} == {"CLIPSeg.json", "CMakeLists.txt", "CLIPSeg/CLIPSeg.py", "README.md"}
    assert {r for _, r in found} == {repo}, found
    assert json.loads((ROOT / "CLIPSeg.json").read_text(encoding="utf-8"))["scm_url"] == homepage + ".git"
    assert homepage in _help_texts()["helpText"]
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):  # the files exist on the published branch
        url = _cmake_value(key)
        assert url.startswith(f"https://raw.githubusercontent.com/{repo}/main/")
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url


METHODS = {"CLIP-TNseg": "cliptnseg", "TGC-Net": "tgcnet", "MedCLIP-SAM": "medclipsam"}


def test_help_and_description_name_only_engines_and_models_that_exist():
    from CLIPSegLib.models import store as model_store
    from CLIPSegLib.engines import ENGINES

    texts = dict(_help_texts(), description=_cmake_value("EXTENSION_DESCRIPTION"))
    for where, text in texts.items():
        for sentence in re.split(r"<br>|\.\s+(?=[A-Z])", text):
            for method, engine in METHODS.items():
                if method in sentence and engine not in ENGINES:
                    assert "planned" in sentence.lower(), f"{where}: {method} does not run yet: {sentence!r}"
        for model_id in re.findall(r"\b[a-z0-9]+(?:-[a-z0-9]+){2,}\b", text):
            assert model_id in model_store.load_registry(), f"{where} names the model {model_id!r}, not in the registry"
    assert "cliptnseg" in ENGINES and "CLIP-TNseg" in texts["helpText"]


def test_the_minimum_slicer_version_is_stated_everywhere():
    from CLIPSegLib.slicer.dependencies import MIN_SLICER

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    slicer_section = readme[readme.index("## Use in 3D Slicer"):readme.index("### From Slicer's Python console")]
    for where, text in (("help", _help_texts()["helpText"]), ("description", _cmake_value("EXTENSION_DESCRIPTION")),
                        ("README", slicer_section)):
        assert f"Slicer {MIN_SLICER} or later" in text.replace("\n", " ") or \
            f"Slicer {MIN_SLICER} and later" in text.replace("\n", " "), where
        assert "Python 3.12" in text, where

