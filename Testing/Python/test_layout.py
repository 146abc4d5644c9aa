"""The library's shape: torch-only layers, the public API, one probe registry behind every surface, the README's
layout table."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import MedAdvRobustnessLib
from MedAdvRobustnessLib import cli
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.evaluation.sweep import run_sweep
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.networks.volume import Volume
from MedAdvRobustnessLib.probes.attacks import ATTACKS
from MedAdvRobustnessLib.probes.base import Probe
from MedAdvRobustnessLib.probes.registry import make_probe, probe_names, probe_parameters

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "MedAdvRobustness" / "MedAdvRobustnessLib"
TORCH_ONLY = ("networks", "probes", "evaluation")
GUI_AND_SCENE = ("vtk", "vtkmodules", "slicer", "trame", "trame_slicer", "trame_vuetify", "PySide6", "PyQt5", "qt",
                 "ctk", "matplotlib")

# Run in a fresh interpreter that cannot import any of GUI_AND_SCENE: every torch-only module and every public name
# import, and a sweep runs on a plain torch module (MONAI itself imports matplotlib only where it is installed).
WITHOUT_GUI = """
import importlib, pkgutil, sys, warnings
import numpy as np, torch
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError("blocked for this test: " + name)
sys.meta_path.insert(0, Refuse())
import MedAdvRobustnessLib as lib
for package in {packages!r}:
    module = importlib.import_module("MedAdvRobustnessLib." + package)
    for info in pkgutil.iter_modules(module.__path__):
        importlib.import_module(module.__name__ + "." + info.name)
for name in lib.__all__:
    getattr(lib, name)
torch.manual_seed(0)
network = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1))
volume = lib.Volume.from_array(np.random.default_rng(0).random((9, 8, 7)).astype(np.float32) * 100)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = lib.run_sweep(network, volume, lib.make_probe("fgsm"), [0.05])
assert any("plain torch.nn.Module" in str(w.message) for w in caught)
print("ok", len(result.rows), sorted(set(sys.modules) & {blocked!r}))
"""


def test_torch_layers_and_public_api_import_without_scene_gui_or_plots():
    code = WITHOUT_GUI.format(blocked=set(GUI_AND_SCENE), packages=TORCH_ONLY)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["ok", "6", "[]"]  # (clean, 0.05) x (2 labels + mean)


def test_torch_only_layers_import_nothing_of_the_scene_layers():
    """Read the sources: no networks/probes/evaluation module imports scene, study, module, viewer or a GUI."""
    pattern = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.M)
    for package in TORCH_ONLY:
        for path in (LIBRARY / package).glob("*.py"):
            for target in pattern.findall(path.read_text()):
                top = target.lstrip(".").split(".")[0]
                assert top not in GUI_AND_SCENE, (path.name, target)
                assert not (target.startswith("..") and top in ("scene", "study", "module", "viewer", "pipeline",
                                                               "report", "cli")), (path.name, target)


def test_public_api_names_what_the_readme_shows():
    assert {"load_model", "make_probe", "run_sweep", "ATTACKS", "CORRUPTIONS", "Volume", "run_study",
            "RobustnessResult", "Outcome", "Probe"} <= set(MedAdvRobustnessLib.__all__)
    with pytest.raises(AttributeError):
        MedAdvRobustnessLib.no_such_name


@pytest.mark.parametrize("name", probe_names())
def test_every_registered_probe_is_a_probe_with_its_parameters_on_the_command_line(name):
    probe = make_probe(name)
    assert isinstance(probe, Probe) and probe.name == name and probe.summary
    assert probe.strength_name in ("epsilon", "severity")
    options = {action.dest for action in cli.build_parser()._subparsers._group_actions[0].choices["run"]._actions}
    for parameter in probe_parameters(name):
        assert "param_" + parameter.name in options
    assert set(probe.settings()) == {parameter.name for parameter in probe_parameters(name)}


def test_parameters_refuse_values_that_are_not_finite():
    for bad in ("nan", "inf", float("nan")):
        with pytest.raises(InputError, match="finite"):
            make_probe("pgd", step_size=bad)
    with pytest.raises(InputError, match="finite"):
        make_probe("dag", gamma="nan")


def test_a_plain_module_is_attacked_as_logits_with_a_warning_and_anything_else_is_refused():
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 3, 3, padding=1)
    volume = torch.rand(1, 1, 6, 5, 4) * 100
    labels = torch.zeros(1, 6, 5, 4, dtype=torch.int64)
    with pytest.warns(UserWarning, match="Conv3d is a plain torch.nn.Module: taken as logits"):
        adversarial, _ = ATTACKS["fgsm"]()(network, volume, labels, 2.0, (0.0, 100.0))
    assert float((adversarial - volume).abs().max()) == pytest.approx(2.0)
    with pytest.raises(InputError, match="must be a torch.nn.Module"):
        run_sweep(lambda x: x, Volume.from_array(volume[0, 0].numpy()), make_probe("fgsm"), [0.1])
    with pytest.warns(UserWarning, match="plain torch.nn.Module"):
        assert load_model(network).activation == "logits"


def test_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    section = section.split("\n## ")[0]
    listed = set(re.findall(r"^\| `(\w+)/` \| [^|]+ \| [^|]+ \|$", section, re.M))  # the subpackage table
    packages = {path.parent.name for path in LIBRARY.glob("*/__init__.py")}
    assert listed == packages
    modules = set(re.findall(r"`(\w+)\.py`", section))
    on_disk = {path.stem for path in LIBRARY.glob("*/*.py") if path.stem != "__init__"}
    on_disk |= {path.stem for path in LIBRARY.glob("*.py") if path.stem != "__init__"}
    assert on_disk <= modules, sorted(on_disk - modules)


def python39_problems(path):
    """What in ``path`` Python 3.9 (the Python of Slicer 5.8) cannot run: syntax newer than 3.9, ``X | Y``
    annotations evaluated at definition time (no ``from __future__ import annotations``), ``zip(strict=...)`` and
    ``dataclass(slots=..., kw_only=...)``."""
    import ast
    source = path.read_text()
    try:
        tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    except SyntaxError as error:
        return ["{}:{}: syntax newer than Python 3.9: {}".format(path.name, error.lineno, error.msg)]
    postponed = "from __future__ import annotations" in source
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            annotations += [a.annotation for a in arguments if a.annotation] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    problems = []
    if not postponed:
        problems += ["{}:{}: an X | Y annotation".format(path.name, item.lineno) for annotation in annotations
                     if annotation is not None for item in ast.walk(annotation)
                     if isinstance(item, ast.BinOp) and isinstance(item.op, ast.BitOr)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            newer = {"zip": {"strict"}, "dataclass": {"slots", "kw_only"}}.get(name, set())
            problems += ["{}:{}: {}({}=...) needs Python 3.10".format(path.name, node.lineno, name, keyword.arg)
                         for keyword in node.keywords if keyword.arg in newer]
    return problems


def test_the_library_and_the_module_run_on_slicer_5_8_s_python_3_9(tmp_path):
    files = sorted(LIBRARY.rglob("*.py")) + [LIBRARY.parent / "MedAdvRobustness.py"]
    problems = [problem for path in files for problem in python39_problems(path)]
    assert not problems, problems
    found = []
    for index, text in enumerate(("def f(x: int | None): pass\n", "match x:\n    case 1: pass\n",
                                  "zip(a, b, strict=True)\n")):
        sample = tmp_path / "sample{}.py".format(index)
        sample.write_text(text)
        found.append(python39_problems(sample))
    assert all(len(problems) == 1 for problems in found), found
