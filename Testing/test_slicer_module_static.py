"""Static checks of the Slicer module (CI has no Slicer app): names, bindings and build lists must agree."""

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "CLIPSeg"
SOURCE = (MODULE / "CLIPSeg.py").read_text()
UI = ET.parse(MODULE / "Resources" / "UI" / "CLIPSeg.ui").getroot()

# Widget class expected from the name suffix used in the code (Slicer's naming habit).
SUFFIX_CLASS = {"Button": ("QPushButton",), "ComboBox": ("QComboBox",), "Selector": ("qMRMLNodeComboBox",),
                "Label": ("QLabel",), "TextEdit": ("QTextEdit",), "CheckBox": ("QCheckBox",),
                "SliderWidget": ("ctkSliderWidget",), "progressBar": ("QProgressBar",),
                "CollapsibleButton": ("ctkCollapsibleButton",)}
# Parameter type -> widget classes the parameterNodeWrapper can bind it to.
TYPE_WIDGETS = {"vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"}, "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox"},
                "str": {"QTextEdit", "QLineEdit"}, "str+Choice": {"QComboBox"}, "float": {"ctkSliderWidget",
                                                                                          "QDoubleSpinBox"},
                "bool": {"QCheckBox"}}
UNBOUND_FIELDS = {"model"}  # filled from the model registry by the widget code, not by a binding


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


def _cmake_list(var):
    text = (MODULE / "CMakeLists.txt").read_text()
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


def test_extension_json_has_only_catalog_schema_fields():
    entry = json.loads((ROOT / "extension.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert "v1.0.1" in entry["$schema"] and entry["build_dependencies"] == ["PyTorch"]


def test_extension_cmake_has_the_required_metadata():
    text = (ROOT / "CMakeLists.txt").read_text()
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
