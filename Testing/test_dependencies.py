"""The one list of pinned packages: what pip installs for the package is what the Slicer installer installs."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from setuptools.config.pyprojecttoml import read_configuration

from CLIPSegLib.slicer import dependencies
from CLIPSegLib.slicer.dependencies import DependencyError, check_python

ROOT = Path(__file__).resolve().parents[1]


def test_the_installer_list_is_the_package_declared_dependencies():
    project = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]
    declared = dependencies.requirements()
    assert project["dependencies"] == declared  # pip reads the same file
    assert "torch==2.14.1" in declared and "monai==1.6.1" in declared


def test_missing_lists_the_declared_pins_whose_module_is_absent(monkeypatch):
    assert dependencies.is_installed("json") and not dependencies.is_installed("no_such_module_clipseg")
    assert not dependencies.is_installed("no_such_package_clipseg.sub")  # a probe, never an ImportError
    monkeypatch.setattr(dependencies, "is_installed", lambda module: module in {"numpy", "torch"})
    assert dependencies.missing() == [r for r in dependencies.requirements()
                                      if dependencies.distribution(r) not in ("numpy", "torch")]


def test_every_requirement_maps_to_the_module_it_installs():
    # every declared package is installed in the test environment, so each module name must be found
    for r in dependencies.requirements():
        assert importlib.util.find_spec(dependencies.module_name(r)) is not None, r
    assert dependencies.module_name("open_clip_torch==3.3.0") == "open_clip"
    assert dependencies.module_name("pillow>=10") == "PIL"
    assert dependencies.specifier("torch==2.14.1") == "==2.14.1" and dependencies.specifier("tqdm") == ""
    assert dependencies.split_torch(["monai==1.6.1", "torchvision==0.29.1", "torch==2.14.1"]) == \
        (["torchvision==0.29.1", "torch==2.14.1"], ["monai==1.6.1"])


def test_python_of_slicer_5_10_and_later_is_allowed():
    requires = SpecifierSet(read_configuration(ROOT / "pyproject.toml")["project"]["requires-python"])
    assert "3.11" in requires and "3.12" in requires and "3.9" not in requires
    check_python((3, 12, 0))
    check_python((3, 11, 7))


def test_python_3_9_names_the_slicer_version_needed():
    with pytest.raises(DependencyError) as e:
        check_python((3, 9, 13))
    message = str(e.value)
    assert "3D Slicer 5.10 or later (Python 3.12)" in message and "Python 3.9" in message
    assert "torch==2.14.1" in message and "https://download.slicer.org" in message


def test_the_running_python_is_the_one_checked(monkeypatch):
    monkeypatch.setattr(dependencies, "sys", type(sys)("sys"))
    dependencies.sys.version_info = (3, 9, 13, "final", 0)
    with pytest.raises(DependencyError, match="Python 3.9"):
        check_python()


def test_dependencies_module_imports_only_what_slicer_ships():
    tree = ast.parse(Path(dependencies.__file__).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_the_slicer_python_check_is_the_package_minimum():
    import re
    import tomllib

    from CLIPSegLib.slicer import dependencies

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    low = re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"])
    assert (int(low.group(1)), int(low.group(2))) == dependencies.MIN_PYTHON
