"""Static checks of the Slicer extension files: module classes, lazy imports, CMake lists and the .ui file.

Slicer's GUI is not available here, so these checks read the files (``ast``, XML, CMake text) instead of
importing the module; the logic itself is exercised inside Slicer by ``MedAdvRobustnessTest``.
"""
import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MedAdvRobustness"
MODULE_FILE = MODULE_DIR / "MedAdvRobustness.py"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
EXTENSION_CMAKE = ROOT / "CMakeLists.txt"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedAdvRobustness.ui"
RESOURCE_DIRS = (MODULE_DIR / "MedAdvRobustnessLib" / "Resources", MODULE_DIR / "Resources")
HEAVY_MODULES = ("torch", "monai", "MedAdvRobustnessLib")
EXPECTED_CLASSES = {
    "MedAdvRobustness": "ScriptedLoadableModule",
    "MedAdvRobustnessWidget": "ScriptedLoadableModuleWidget",
    "MedAdvRobustnessLogic": "ScriptedLoadableModuleLogic",
    "MedAdvRobustnessTest": "ScriptedLoadableModuleTest",
}
PARAMETERS = {"inputVolume", "referenceVolume", "model", "attack", "epsilons", "steps", "seed"}
EXTENSION_VARIABLES = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS",
                       "DEPENDS")


def module_tree():
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE), feature_version=(3, 9))


def top_level_classes(tree):
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def base_names(class_node):
    return {base.id if isinstance(base, ast.Name) else getattr(base, "attr", None) for base in class_node.bases}


def decorator_names(class_node):
    return {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in class_node.decorator_list}


def parameter_fields():
    """Annotated fields of the @parameterNodeWrapper class."""
    wrapper = top_level_classes(module_tree())["MedAdvRobustnessParameterNode"]
    return {item.target.id for item in wrapper.body
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}


def imported_modules(statements):
    """Top-level package names imported by ``statements`` (not descending into functions or classes)."""
    names = set()
    for statement in statements:
        if isinstance(statement, ast.Import):
            names.update(alias.name.split(".")[0] for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom) and statement.module:
            names.add(statement.module.split(".")[0])
        elif isinstance(statement, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            children = [child for child in ast.iter_child_nodes(statement) if isinstance(child, ast.stmt)]
            names.update(imported_modules(children))
            for handler in getattr(statement, "handlers", []):
                names.update(imported_modules(handler.body))
    return names


def cmake_text(path):
    """A CMake file without its comments (``#`` outside quoted strings)."""
    return re.sub(r'("[^"]*")|#[^\n]*', lambda match: match.group(1) or "", Path(path).read_text())


def cmake_list(text, variable, module_name):
    """Entries of ``set(variable ...)``, with ``${MODULE_NAME}`` substituted."""
    match = re.search(r"set\(\s*{}\s+(.*?)\)".format(variable), text, re.S)
    assert match, "{} is not set".format(variable)
    entries = [line.strip() for line in match.group(1).splitlines()]
    return [entry.replace("${MODULE_NAME}", module_name) for entry in entries if entry]


def module_cmake_lists():
    text = cmake_text(MODULE_CMAKE)
    module_name = re.search(r"set\(\s*MODULE_NAME\s+(\S+)\s*\)", text).group(1)
    return (module_name, cmake_list(text, "MODULE_PYTHON_SCRIPTS", module_name),
            cmake_list(text, "MODULE_PYTHON_RESOURCES", module_name))


def shipped_files(paths):
    """Relative paths (to the module folder) of files that must ship, skipping caches and hidden files."""
    return {path.relative_to(MODULE_DIR).as_posix() for path in paths
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
            and not any(part.startswith(".") for part in path.relative_to(MODULE_DIR).parts)}


def ui_root():
    return ElementTree.parse(str(UI_FILE)).getroot()


def ui_widget_names():
    return {widget.get("name") for widget in ui_root().iter("widget")}


def ui_parameter_names():
    """Widget name -> SlicerParameterName dynamic property."""
    names = {}
    for widget in ui_root().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[widget.get("name")] = prop.findtext("string")
    return names


def test_module_parses_as_python_3_9():
    assert module_tree() is not None


def test_module_defines_the_classes_slicer_expects():
    classes = top_level_classes(module_tree())
    for name, base in EXPECTED_CLASSES.items():
        assert name in classes, "missing class {}".format(name)
        assert base in base_names(classes[name]), "{} must derive from {}".format(name, base)
    assert "VTKObservationMixin" in base_names(classes["MedAdvRobustnessWidget"])


def test_parameter_node_wrapper_declares_the_parameters():
    wrapper = top_level_classes(module_tree()).get("MedAdvRobustnessParameterNode")
    assert wrapper is not None, "missing MedAdvRobustnessParameterNode"
    assert "parameterNodeWrapper" in decorator_names(wrapper)
    assert parameter_fields() == PARAMETERS


def test_module_does_not_import_torch_monai_or_the_library_at_module_level():
    heavy = imported_modules(module_tree().body) & set(HEAVY_MODULES)
    assert not heavy, "imported at module level: {}".format(sorted(heavy))


def test_logic_imports_the_library_and_calls_run_on_nodes():
    logic = top_level_classes(module_tree())["MedAdvRobustnessLogic"]
    source = ast.get_source_segment(MODULE_FILE.read_text(), logic)
    assert "from MedAdvRobustnessLib.pipeline import run_on_nodes" in source
    assert "SlicerScene.current()" in source


def test_every_python_file_is_listed_and_every_listed_script_exists():
    _, scripts, _ = module_cmake_lists()
    on_disk = shipped_files(MODULE_DIR.rglob("*.py"))
    assert sorted(on_disk - set(scripts)) == [], "not listed in MODULE_PYTHON_SCRIPTS"
    assert [path for path in scripts if not (MODULE_DIR / path).is_file()] == [], "listed but missing"
    assert len(scripts) == len(set(scripts)), "listed twice"


def test_every_resource_is_listed_and_every_listed_resource_exists():
    _, _, resources = module_cmake_lists()
    on_disk = shipped_files(path for folder in RESOURCE_DIRS for path in folder.rglob("*"))
    assert sorted(on_disk - set(resources)) == [], "not listed in MODULE_PYTHON_RESOURCES"
    assert [path for path in resources if not (MODULE_DIR / path).is_file()] == [], "listed but missing"
    for expected in ("Resources/Icons/MedAdvRobustness.png", "Resources/UI/MedAdvRobustness.ui",
                     "MedAdvRobustnessLib/Resources/Models/demo-unet/model.json",
                     "MedAdvRobustnessLib/Resources/Models/demo-unet/model.pt",
                     "MedAdvRobustnessLib/Resources/Models/demo-unet/training.json"):
        assert expected in resources


def test_module_cmake_builds_the_scripted_module_and_its_test():
    text = cmake_text(MODULE_CMAKE)
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\).*endif\(\)",
                     text, re.S)
    assert module_cmake_lists()[0] == "MedAdvRobustness"


@pytest.mark.parametrize("variable", EXTENSION_VARIABLES)
def test_extension_variable_is_set(variable):
    match = re.search(r'set\(\s*EXTENSION_{}\s+"([^"]*)"\s*\)'.format(variable), cmake_text(EXTENSION_CMAKE))
    assert match and match.group(1).strip(), "EXTENSION_{} is empty or missing".format(variable)


def test_extension_cmake_structure():
    text = cmake_text(EXTENSION_CMAKE)
    for needed in ("cmake_minimum_required(", "project(MedAdvRobustness)", "find_package(Slicer REQUIRED)",
                   "include(${Slicer_USE_FILE})", "add_subdirectory(MedAdvRobustness)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text, needed
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"[^"]*PyTorch', text)
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Segmentation"\)', text)


def test_extension_icon_exists_where_the_icon_url_points():
    url = re.search(r'set\(EXTENSION_ICONURL\s+"([^"]+)"\)', cmake_text(EXTENSION_CMAKE)).group(1)
    relative = url.split("/main/", 1)[1]
    icon = ROOT / relative
    assert icon.is_file(), icon
    assert icon.read_bytes() == (MODULE_DIR / "Resources" / "Icons" / "MedAdvRobustness.png").read_bytes()
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ui_is_well_formed_with_custom_widgets_and_scene_connections():
    root = ui_root()
    assert root.tag == "ui"
    custom = {item.findtext("class") for item in root.iter("customwidget")}
    assert {"qMRMLWidget", "qMRMLNodeComboBox", "ctkCollapsibleButton"} <= custom
    used = {widget.get("class") for widget in root.iter("widget")}
    assert used - custom <= {"QLabel", "QLineEdit", "QComboBox", "QSpinBox", "QPushButton", "QToolButton",
                             "QProgressBar"}, "custom widget classes must be declared in <customwidgets>"
    connected = {(connection.findtext("signal"), connection.findtext("receiver"), connection.findtext("slot"))
                 for connection in root.iter("connection")}
    for widget in root.iter("widget"):
        if widget.get("class") == "qMRMLNodeComboBox":
            assert ("mrmlSceneChanged(vtkMRMLScene*)", widget.get("name"), "setMRMLScene(vtkMRMLScene*)") \
                in connected, "{} is not connected to the scene".format(widget.get("name"))


def test_ui_has_the_widgets_of_the_module():
    assert {"inputsCollapsibleButton", "inputVolumeSelector", "referenceSelector", "modelLineEdit", "attackComboBox",
            "epsilonsLineEdit", "stepsSpinBox", "seedSpinBox", "applyButton", "cancelButton", "progressBar",
            "statusLabel"} <= ui_widget_names()
    reference = next(w for w in ui_root().iter("widget") if w.get("name") == "referenceSelector")
    none_enabled = [p.findtext("bool") for p in reference.findall("property") if p.get("name") == "noneEnabled"]
    assert none_enabled == ["true"]


def test_every_ui_widget_the_module_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the module uses no self.ui widgets"
    assert sorted(used - ui_widget_names()) == []


def test_every_slicer_parameter_name_is_a_parameter_node_field():
    names = ui_parameter_names()
    assert set(names.values()) == PARAMETERS, "every parameter is bound to one widget"
    assert sorted(set(names.values()) - parameter_fields()) == []
