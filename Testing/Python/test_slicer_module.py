"""Checks of the Slicer extension files: module classes, lazy imports, CMake lists, packaging and the .ui file.

Slicer's GUI is not available here, so these checks read the files (``ast``, XML, CMake text) and load the .ui
with PySide6's QUiLoader instead of importing the module; the logic behind the widget is driven through real MRML
in test_module_logic.py, and inside Slicer by ``MedAdvRobustnessTest``.
"""
import ast
import dataclasses
import os
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from MedAdvRobustnessLib.module import logic as module_logic

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
# the wrapper's parameters; the node lists (several references under one role) are kept by the widget itself
PARAMETERS = {item.name for item in dataclasses.fields(module_logic.ProbeSettings)} - set(
    module_logic.NODE_LIST_PARAMETERS)
# parameters the widget binds in code (dynamic probe form, segment selectors, reference of two node types)
BOUND_IN_CODE = {"referenceNode", "referenceSegmentIds", "probe", "probeParameters", "regionSegmentation",
                 "regionSegmentId", "compareNetworks"}
# Slicer/CTK widgets used in the .ui -> the Qt class they extend (for QUiLoader) and the members the module uses
SLICER_WIDGETS = {
    "qMRMLWidget": ("QWidget", {"setMRMLScene"}),
    "ctkCollapsibleButton": ("QWidget", {"enabled", "visible", "collapsed"}),
    "ctkCollapsibleGroupBox": ("QGroupBox", {"layout", "enabled", "visible"}),
    "qMRMLNodeComboBox": ("QWidget", {"currentNode", "setCurrentNode", "connect", "enabled", "visible",
                                      "blockSignals"}),
    "qMRMLCheckableNodeComboBox": ("QWidget", {"checkedNodes", "setCheckState", "connect", "blockSignals"}),
    "qMRMLSegmentSelectorWidget": ("QWidget", {"currentNode", "setCurrentNode", "currentSegmentID",
                                               "setCurrentSegmentID", "setSelectedSegmentIDs", "connect", "visible",
                                               "blockSignals"}),
}
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


def test_parameter_node_wrapper_declares_the_parameters_the_logic_reads():
    wrapper = top_level_classes(module_tree()).get("MedAdvRobustnessParameterNode")
    assert wrapper is not None, "missing MedAdvRobustnessParameterNode"
    assert "parameterNodeWrapper" in decorator_names(wrapper)
    assert parameter_fields() == PARAMETERS


def wrapper_defaults():
    """Field -> literal default of the wrapper class (node fields have none)."""
    wrapper = top_level_classes(module_tree())["MedAdvRobustnessParameterNode"]
    return {item.target.id: ast.literal_eval(item.value) for item in wrapper.body
            if isinstance(item, ast.AnnAssign) and item.value is not None}


def module_constant(name):
    assignment = next(node for node in module_tree().body if isinstance(node, ast.Assign)
                      and any(getattr(target, "id", None) == name for target in node.targets))
    return ast.literal_eval(assignment.value)


def test_wrapper_defaults_and_choices_are_the_logic_s():
    defaults = module_logic.default_settings()
    expected = {name: getattr(defaults, name) for name in PARAMETERS - set(module_logic.NODE_PARAMETERS)}
    assert wrapper_defaults() == expected
    assert module_constant("NETWORK_KINDS") == list(module_logic.NETWORK_KINDS)
    assert module_constant("OUTPUT_ACTIVATIONS") == list(module_logic.OUTPUT_ACTIVATIONS)
    from MedAdvRobustnessLib.networks.models import BUILTIN_MODELS
    assert set(module_constant("BUILTIN_NETWORKS")) <= set(BUILTIN_MODELS)
    assert set(module_constant("COMPARE_NETWORKS")) <= set(BUILTIN_MODELS)


def test_widget_keeps_the_node_list_parameters_under_their_role():
    source = MODULE_FILE.read_text()
    for name in module_logic.NODE_LIST_PARAMETERS:
        assert 'AddNodeReferenceID("{}"'.format(name) in source and 'GetNthNodeReferenceID("{}"'.format(name) in source


def test_wrapper_node_fields_are_the_logic_s_node_parameters():
    wrapper = top_level_classes(module_tree())["MedAdvRobustnessParameterNode"]
    node_fields = {item.target.id for item in wrapper.body if isinstance(item, ast.AnnAssign)
                   and isinstance(item.annotation, ast.Name) and item.annotation.id.startswith("vtkMRML")}
    assert node_fields == set(module_logic.NODE_PARAMETERS)


def test_module_does_not_import_torch_monai_or_the_library_at_module_level():
    heavy = imported_modules(module_tree().body) & set(HEAVY_MODULES)
    assert not heavy, "imported at module level: {}".format(sorted(heavy))


def test_logic_is_a_thin_call_into_the_library():
    logic = top_level_classes(module_tree())["MedAdvRobustnessLogic"]
    source = ast.get_source_segment(MODULE_FILE.read_text(), logic)
    assert "from MedAdvRobustnessLib.module.logic import start_run" in source
    assert "start_run(SlicerScene.current(), node)" in source


def test_sample_data_is_registered_only_inside_the_application():
    module_class = top_level_classes(module_tree())["MedAdvRobustness"]
    guarded = [node for node in ast.walk(module_class) if isinstance(node, ast.If)
               and "hasattr(slicer, 'app')" in ast.unparse(node.test)]
    assert guarded and "registerSampleData" in ast.unparse(guarded[0])
    function = module_function("registerSampleData")
    source = ast.unparse(function)
    assert "for name, fileName, fileType, properties, checksum in SAMPLE_DATA" in source
    call = next(node for node in ast.walk(function) if isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "registerCustomSampleDataSource")
    keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords}
    assert set(keywords) <= SAMPLE_DATA_KEYWORDS
    assert keywords["checksums"] == "checksum" and keywords["loadFileTypes"] == "fileType"
    assert keywords["loadFileProperties"] == "properties"


# SampleDataLogic.registerCustomSampleDataSource's keywords in Slicer 5.8.1, 5.10.0 and 5.12 (Slicer's
# Modules/Scripted/SampleData/SampleData.py): loadFileTypes replaced 5.6's loadFileType there.
SAMPLE_DATA_KEYWORDS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                        "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums"}


def module_function(name):
    return next(node for node in module_tree().body if isinstance(node, ast.FunctionDef) and node.name == name)


def test_sample_data_checksums_are_the_sha256_of_the_files_and_the_label_map_loads_as_one():
    import hashlib
    samples = module_constant("SAMPLE_DATA")
    assert [sample[1] for sample in samples] == ["MNI152_T1_2mm.nii.gz", "MNI152_tissue_2mm.nii.gz"]
    for name, file_name, file_type, properties, checksum in samples:
        path = MODULE_DIR / "MedAdvRobustnessLib" / "Resources" / "Sample" / file_name
        assert checksum == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest(), file_name
        assert file_type == "VolumeFile", "the volume reader, never the Segmentations reader"
        assert properties == ({"labelmap": True} if "tissue" in file_name else {}), file_name


def test_the_sample_data_properties_give_a_label_map_volume_through_slicer_s_reader(slicer_scene):
    """The same file and properties through the volumes logic behind Slicer's VolumeFile reader."""
    import slicer
    for name, file_name, file_type, properties, checksum in module_constant("SAMPLE_DATA"):
        path = MODULE_DIR / "MedAdvRobustnessLib" / "Resources" / "Sample" / file_name
        node = slicer_scene.volumes_logic.AddArchetypeVolume(str(path), file_name.split(".")[0],
                                                             1 if properties.get("labelmap") else 0)
        assert node is not None
        assert node.IsA("vtkMRMLLabelMapVolumeNode") == bool(properties.get("labelmap")), file_name
        assert isinstance(node, slicer.vtkMRMLScalarVolumeNode)


def test_dependency_installation_uses_the_pytorch_extension_then_constrained_pip():
    logic = top_level_classes(module_tree())["MedAdvRobustnessLogic"]
    source = ast.get_source_segment(MODULE_FILE.read_text(), logic)
    install = source[source.index("def installDependencies"):source.index("def start(")]
    assert "PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False" in install
    assert "torchVersionRequirement=TORCH_REQUIREMENT" in install
    assert module_constant("TORCH_REQUIREMENT") == ">=2.1"
    assert "dependencies.write_constraints(" in install
    assert 'importlib.import_module("slicer.packaging").pip_ensure' in install  # Slicer 5.12 and later
    assert "pip_ensure(withDependencies, constraints=constraints, prompt_install=False" in install
    assert 'slicer.util.pip_install(["-c", constraints] + withDependencies)' in install  # before 5.12
    assert 'slicer.util.pip_install(["--no-deps", "-c", constraints] + withoutDependencies)' in install
    assert "dependencies.changed_imported(before, dependencies.installed_versions())" in install
    assert "slicer.util.restart()" in install
    assert not re.search(r"pip_install\([^)]*torch", install), "torch comes from the PyTorch extension only"
    widget = ast.get_source_segment(MODULE_FILE.read_text(), top_level_classes(module_tree())["MedAdvRobustnessWidget"])
    install = widget.index("self.logic.installDependencies()")
    assert widget.rfind("confirmOkCancelDisplay", 0, install) != -1, "install only after the user confirms"


def test_pip_ensure_takes_the_keywords_the_module_passes():
    """slicer.packaging.pip_ensure in Slicer 5.12 (Base/Python/slicer/packaging.py): (requirements, constraints,
    skip_packages, prompt_install, prompt_restart, requester, skip_in_testing, show_progress)."""
    call = next(node for node in ast.walk(module_tree()) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "pip_ensure")
    assert {keyword.arg for keyword in call.keywords} <= {
        "constraints", "skip_packages", "prompt_install", "prompt_restart", "requester", "skip_in_testing",
        "show_progress"}
    assert len(call.args) == 1


def test_the_widget_caches_the_dependency_check_and_the_compare_form():
    source = MODULE_FILE.read_text()
    logic = ast.get_source_segment(source, top_level_classes(module_tree())["MedAdvRobustnessLogic"])
    problems = logic[logic.index("def dependencyProblems"):logic.index("def forgetDependencies")]
    assert "return dependencies.problems(feature)" in problems  # cached there until forget()
    assert "metadata" not in problems.split('"""')[-1] and "find_spec" not in source
    widget = top_level_classes(module_tree())["MedAdvRobustnessWidget"]
    form = next(node for node in widget.body if isinstance(node, ast.FunctionDef) and node.name == "_updateCompareForm")
    text = ast.unparse(form)
    assert text.index("if key == self._compareFormKey:\n        return") < text.index("setCheckState")
    assert text.index("return") < text.index("QListWidgetItem")
    install = ast.unparse(next(node for node in widget.body if isinstance(node, ast.FunctionDef)
                               and node.name == "ensureDependencies"))
    assert "self._compareFormKey = None" in install  # an install shows the form afresh


def test_reload_unloads_the_library_before_slicer_reloads_the_module_file():
    widget = top_level_classes(module_tree())["MedAdvRobustnessWidget"]
    reload = next(node for node in widget.body if isinstance(node, ast.FunctionDef) and node.name == "onReload")
    text = ast.unparse(reload)
    assert text.index("unload_library()") < text.index("ScriptedLoadableModuleWidget.onReload(self)")


def test_the_self_test_skips_per_feature_what_it_cannot_run():
    test_class = top_level_classes(module_tree())["MedAdvRobustnessTest"]
    text = ast.get_source_segment(MODULE_FILE.read_text(), test_class)
    assert 'self._sampleParameters("run")' in text and 'self._sampleParameters("compare")' in text
    assert "self.skipTest(" in text and "logic.forgetDependencies()" in text


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
    assert set(SLICER_WIDGETS) == custom
    used = {widget.get("class") for widget in root.iter("widget")}
    assert used - custom <= {"QLabel", "QLineEdit", "QComboBox", "QCheckBox", "QPushButton", "QToolButton",
                             "QProgressBar", "QListWidget"}, "custom widget classes must be declared in <customwidgets>"
    connected = {(connection.findtext("signal"), connection.findtext("receiver"), connection.findtext("slot"))
                 for connection in root.iter("connection")}
    for widget in root.iter("widget"):
        if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qMRMLSegmentSelectorWidget"):
            assert ("mrmlSceneChanged(vtkMRMLScene*)", widget.get("name"), "setMRMLScene(vtkMRMLScene*)") \
                in connected, "{} is not connected to the scene".format(widget.get("name"))


def test_every_slicer_parameter_name_is_a_parameter_and_the_others_are_bound_in_code():
    names = ui_parameter_names()
    assert len(set(names.values())) == len(names), "a parameter is bound to two widgets"
    assert set(names.values()) | BOUND_IN_CODE == PARAMETERS
    assert not set(names.values()) & BOUND_IN_CODE
    source = MODULE_FILE.read_text()
    for name in BOUND_IN_CODE:
        assert re.search(r"(self\._parameterNode|parameters)\.{}\b".format(name), source), name


def test_ui_reference_and_region_accept_none():
    widgets = {w.get("name"): w for w in ui_root().iter("widget")}
    for name in ("referenceSelector", "regionSegmentSelector"):
        none_enabled = [p.findtext("bool") for p in widgets[name].findall("property") if p.get("name") == "noneEnabled"]
        assert none_enabled == ["true"], name


@pytest.fixture(scope="module")
def loaded_ui():
    """The .ui loaded by PySide6's QUiLoader, Slicer's widget classes registered by name."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PySide6.QtCore")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    QtUiTools = pytest.importorskip("PySide6.QtUiTools")
    application = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QtUiTools.QUiLoader()
    # Qt warns that these stand-ins lack mrmlSceneChanged(vtkMRMLScene*): expected outside Slicer
    stand_ins = [type(name, (getattr(QtWidgets, base),), {}) for name, (base, _members) in SLICER_WIDGETS.items()]
    for stand_in in stand_ins:
        loader.registerCustomWidget(stand_in)
    ui_file = QtCore.QFile(str(UI_FILE))
    assert ui_file.open(QtCore.QFile.ReadOnly)
    widget = loader.load(ui_file)
    ui_file.close()
    assert widget is not None, loader.errorString()
    yield {child.objectName(): child for child in widget.findChildren(QtWidgets.QWidget)}, widget
    widget.deleteLater()
    application.processEvents()


def used_ui_members():
    """(widget, member) for every ``self.ui.<widget>.<member>`` in the module, and the widgets used at all."""
    source = MODULE_FILE.read_text()
    return set(re.findall(r"self\.ui\.(\w+)\.(\w+)", source)), set(re.findall(r"self\.ui\.(\w+)", source))


def test_ui_loads_with_quiloader_and_has_every_widget_the_module_uses(loaded_ui):
    children, root = loaded_ui
    assert type(root).__name__ == "qMRMLWidget"
    _, used = used_ui_members()
    assert sorted(used - set(children)) == []
    for name, child in children.items():
        declared = next((w.get("class") for w in ui_root().iter("widget") if w.get("name") == name), None)
        if declared:
            assert type(child).__name__ == declared or child.metaObject().className() == declared, name


def test_every_member_the_module_uses_exists_on_its_widget(loaded_ui):
    children, _ = loaded_ui
    members, _ = used_ui_members()
    missing = []
    for name, member in sorted(members):
        child = children[name]
        custom = SLICER_WIDGETS.get(type(child).__name__)
        if custom is not None:
            ok = member in custom[1]
        else:
            ok = member == "connect" or child.metaObject().indexOfProperty(member) >= 0 or hasattr(child, member)
        if not ok:
            missing.append("{}.{}".format(name, member))
    assert missing == []


def test_ui_properties_survive_loading(loaded_ui):
    children, _ = loaded_ui
    assert children["referenceSelector"].property("nodeTypes") == ["vtkMRMLLabelMapVolumeNode",
                                                                   "vtkMRMLSegmentationNode"]
    assert children["referenceSegmentsSelector"].property("multiSelection") is True
    assert children["networkKindComboBox"].property("SlicerParameterName") == "networkKind"
    assert children["probeParametersGroupBox"].layout() is not None  # the probe form is built into it
    assert children["applyButton"].isEnabled() is False and children["cancelButton"].isEnabled() is False


def test_contributors_are_name_and_organization_in_cmake_and_the_module():
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS\s+"([^"]*)"\)', cmake_text(EXTENSION_CMAKE)).group(1)
    assert re.fullmatch(r"[^,()]+ \([^()]+\)(, [^,()]+ \([^()]+\))*", contributors), contributors
    module_class = ast.unparse(top_level_classes(module_tree())["MedAdvRobustness"])
    assert "self.parent.contributors = [{!r}]".format(contributors) in module_class


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_icon_is_128_pixels_and_the_screenshot_exists():
    assert png_size(MODULE_DIR / "Resources" / "Icons" / "MedAdvRobustness.png") == (128, 128)
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS\s+"([^"]+)"\)', cmake_text(EXTENSION_CMAKE)).group(1).split()
    assert urls
    for url in urls:
        width, height = png_size(ROOT / url.split("/main/", 1)[1])
        assert width >= 640 and height >= 400


def test_extension_catalog_entry_matches_the_cmake_metadata():
    import json

    entry = json.loads((ROOT / "MedAdvRobustness.json").read_text())
    text = cmake_text(EXTENSION_CMAKE)
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY\s+"([^"]*)"\)', text).group(1)
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith(re.search(r'set\(EXTENSION_HOMEPAGE\s+"([^"]*)"\)', text).group(1))


def test_comparison_layout_gives_two_axial_views_and_leaves_the_user_s_views_alone():
    """Through Slicer's own layout logic, after the Conventional layout (whose Yellow view is sagittal): the
    comparison's clean and attacked views are new axial views (linkable), and Red/Yellow keep their settings."""
    import slicer
    from MedAdvRobustnessLib.scene.layouts import ATTACKED_VIEW, CLEAN_VIEW, COMPARISON_LAYOUT, COMPARISON_LAYOUT_ID

    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout_node = layout_logic.GetLayoutNode()
    layout_node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    layout_node.AddLayoutDescription(COMPARISON_LAYOUT_ID, COMPARISON_LAYOUT)
    layout_node.SetViewArrangement(COMPARISON_LAYOUT_ID)

    def slice_views():
        nodes = (scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
                 for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")))
        return {node.GetLayoutName(): (node.GetOrientation(), node.GetLayoutLabel()) for node in nodes}

    views = slice_views()
    assert views[CLEAN_VIEW] == ("Axial", "Clean")
    assert views[ATTACKED_VIEW] == ("Axial", "Attacked")
    assert views["Red"] == ("Axial", "R") and views["Yellow"] == ("Sagittal", "Y")
    layout_node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    assert slice_views()["Yellow"] == ("Sagittal", "Y")
