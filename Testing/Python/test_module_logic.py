"""The module's logic driven as the widget drives it: parameter node in, result nodes in one folder out.

Real MRML (slicer-core) on the embedded sample with a short PGD attack (2 steps, one epsilon).
"""

import numpy as np
import pytest
import slicer
import vtk
from slicer import util

from conftest import drive_as_widget
from MedAdvRobustnessLib.module import logic as module_logic
from MedAdvRobustnessLib.probes import registry
from MedAdvRobustnessLib.probes.attacks import AttackCancelled
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import Label, PALETTE
from MedAdvRobustnessLib.scene.nodes import add_color_table, add_segmentation_node, node_ids
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME, TISSUE_LABELS
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

EPSILON = 0.02
SHORT_PGD = '{"pgd": {"steps": "2", "seed": "3"}, "fgsm": {}}'
NETWORK_LABELS = ["CSF", "grey matter", "white matter"]


def hierarchy_of(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def folders(scene):
    hierarchy = hierarchy_of(scene)
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), children, True)
    items = [children.GetId(index) for index in range(children.GetNumberOfIds())]
    return {hierarchy.GetItemName(item): item for item in items
            if hierarchy.GetItemLevel(item) == "Folder" or hierarchy.GetItemDataNode(item) is None}


def tissue_segmentation(slicer_scene, labels_node):
    """The sample's tissue map as a segmentation with named segments."""
    labels = [Label(value, name, PALETTE[value]) for value, name in enumerate(TISSUE_LABELS)]
    colors = add_color_table(slicer_scene.scene, labels, "tissue colors")
    labels_node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return add_segmentation_node(slicer_scene, labels_node, "tissue")


def segment_id(segmentation_node, name):
    segmentation = segmentation_node.GetSegmentation()
    return next(segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                if segmentation.GetNthSegment(i).GetName() == name)


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def apply_as_widget(slicer_scene, settings, cancel_after_step=None):
    """Press Apply as the widget does (see conftest.drive_as_widget)."""
    cancel_on = "step {}/".format(cancel_after_step) if cancel_after_step else None
    return drive_as_widget(slicer_scene, settings, module_logic.start_run, cancel_on)


@pytest.fixture(scope="module")
def scene_with_sample():
    slicer_scene = SlicerScene.standalone()
    volume = slicer_scene.load_volume(SAMPLE_VOLUME)
    labels = slicer_scene.load_volume(SAMPLE_LABELS, label_map=True)
    return slicer_scene, volume, labels


@pytest.fixture(scope="module")
def first_run(scene_with_sample):
    slicer_scene, volume, labels = scene_with_sample
    original = util.arrayFromVolume(volume).copy()
    settings = module_logic.ProbeSettings(inputVolume=volume, referenceNode=labels, probe="pgd",
                                          probeParameters=SHORT_PGD, epsilons=str(EPSILON))
    before = node_ids(slicer_scene.scene)
    run, messages = apply_as_widget(slicer_scene, settings)
    nodes = run.finish()
    return nodes, messages, original, before


def test_run_adds_its_nodes_in_one_folder_named_after_volume_network_and_probe(scene_with_sample, first_run):
    slicer_scene, volume, _ = scene_with_sample
    nodes, _, original, _ = first_run
    hierarchy = hierarchy_of(slicer_scene.scene)
    assert hierarchy.GetItemName(nodes["folder"]) == "MNI152_T1_2mm demo-unet pgd"
    in_folder = module_logic.folder_nodes(hierarchy, nodes["folder"])
    expected = [nodes["probed"][EPSILON], nodes["perturbation"][EPSILON], nodes["segmentation"][0.0],
                nodes["segmentation"][EPSILON], nodes["metrics"], nodes["curve"], nodes["chart"],
                nodes["fragility"], nodes["structures"], nodes["unstable"]]
    for node in expected:
        assert node in in_folder, node.GetName()
    assert volume not in in_folder
    assert nodes["input"] is volume  # what the comparison view shows as the clean side
    np.testing.assert_array_equal(util.arrayFromVolume(volume), original)  # the input is not modified


def test_run_results_are_within_budget_and_carry_the_network_labels(scene_with_sample, first_run):
    _, volume, _ = scene_with_sample
    nodes, _, original, _ = first_run
    adversarial = util.arrayFromVolume(nodes["probed"][EPSILON]).astype(np.float64)
    budget = EPSILON * (original.max() - original.min())
    assert 0 < np.abs(adversarial - original).max() <= budget * (1 + 1e-6)
    np.testing.assert_allclose(util.arrayFromVolume(nodes["perturbation"][EPSILON]), adversarial - original,
                               atol=1e-3)
    for strength in (0.0, EPSILON):
        assert segment_names(nodes["segmentation"][strength]) == NETWORK_LABELS
    assert nodes["metrics"].GetNumberOfRows() == 2 * (len(NETWORK_LABELS) + 1)
    # one epsilon: the fragility is that epsilon where the attacked label differs, else 0
    fragility = util.arrayFromVolume(nodes["fragility"])
    assert set(np.unique(fragility).tolist()) == {0.0, float(np.float32(EPSILON))}
    assert nodes["unstable_at"] == EPSILON and segment_names(nodes["unstable"]) == NETWORK_LABELS
    assert nodes["focus"] is not None


def test_slices_jump_to_the_largest_unstable_cluster(scene_with_sample, first_run):
    """The comparison views (slice nodes with Slicer's layout names) are centred on the run's focus, which is the
    RAS centre of mass of the largest 26-connected cluster of the unstable segmentation's voxels."""
    from scipy import ndimage
    from MedAdvRobustnessLib.scene.layouts import ATTACKED_VIEW, CLEAN_VIEW, jump_slices_to
    slicer_scene, volume, _ = scene_with_sample
    scene = slicer_scene.scene
    nodes = first_run[0]
    views = {}
    for name in ("Red", CLEAN_VIEW, ATTACKED_VIEW):  # as the layout manager makes them
        node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        node.UnRegister(None)
        node.SetLayoutName(name)
        node.SetSingletonTag(name)
        node.SetOrientationToAxial()
        views[name] = scene.AddNode(node)
    label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "unstable voxels")
    try:
        assert slicer_scene.segmentations_logic.ExportAllSegmentsToLabelmapNode(nodes["unstable"], label_map)
        unstable = util.arrayFromVolume(label_map) != 0  # (k, j, i)
        components, count = ndimage.label(unstable, structure=np.ones((3, 3, 3), dtype=bool))
        largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
        k, j, i = ndimage.center_of_mass(components == largest)
        ijk_to_ras = vtk.vtkMatrix4x4()
        label_map.GetIJKToRASMatrix(ijk_to_ras)
        centre = util.arrayFromVTKMatrix(ijk_to_ras) @ np.array([i, j, k, 1.0])
    finally:
        scene.RemoveNode(label_map)
    assert count > 1  # several clusters: the largest one is chosen
    np.testing.assert_allclose(nodes["focus"], centre[:3], atol=1e-3)
    red_before = util.arrayFromVTKMatrix(views["Red"].GetSliceToRAS()).copy()
    assert np.linalg.norm(red_before[:3, 3] - centre[:3]) > 1  # the views start elsewhere
    moved = jump_slices_to(scene, nodes["focus"], (CLEAN_VIEW, ATTACKED_VIEW, "NoSuchView"))
    try:
        assert moved == [views[CLEAN_VIEW], views[ATTACKED_VIEW]]
        for name in (CLEAN_VIEW, ATTACKED_VIEW):
            np.testing.assert_allclose(util.arrayFromVTKMatrix(views[name].GetSliceToRAS())[:3, 3], centre[:3],
                                       atol=1e-3)
        np.testing.assert_array_equal(util.arrayFromVTKMatrix(views["Red"].GetSliceToRAS()), red_before)
    finally:
        for node in views.values():
            scene.RemoveNode(node)


def test_run_reports_progress_per_iteration(first_run):
    _, messages, _, _ = first_run
    texts = [message for _, message in messages]
    assert any("pgd epsilon 0.02: step 1/2" in text for text in texts)
    fractions = [fraction for fraction, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_second_run_keeps_the_first_and_takes_a_segmentation_reference_and_a_region(scene_with_sample, first_run):
    slicer_scene, volume, labels = scene_with_sample
    first_nodes, _, original, _ = first_run
    first_arrays = {key: util.arrayFromVolume(first_nodes[key][EPSILON]).copy()
                    for key in ("probed", "perturbation")}
    tissue = tissue_segmentation(slicer_scene, labels)
    settings = module_logic.ProbeSettings(
        inputVolume=volume, referenceNode=tissue,
        referenceSegmentIds=",".join(segment_id(tissue, name) for name in NETWORK_LABELS),
        probe="pgd", probeParameters=SHORT_PGD, epsilons=str(EPSILON),
        regionSegmentation=tissue, regionSegmentId=segment_id(tissue, "white matter"))
    run, _ = apply_as_widget(slicer_scene, settings)
    second = run.finish()

    hierarchy = hierarchy_of(slicer_scene.scene)
    assert hierarchy.GetItemName(second["folder"]) == "MNI152_T1_2mm demo-unet pgd (2)"
    assert set(module_logic.folder_nodes(hierarchy, second["folder"])).isdisjoint(
        module_logic.folder_nodes(hierarchy, first_nodes["folder"]))
    for key, array in first_arrays.items():  # the first run's nodes are still there, unchanged
        node = first_nodes[key][EPSILON]
        assert slicer_scene.scene.GetNodeByID(node.GetID()) is node
        np.testing.assert_array_equal(util.arrayFromVolume(node), array)
    perturbation = util.arrayFromVolume(second["perturbation"][EPSILON])
    white_matter = util.arrayFromVolume(labels) == TISSUE_LABELS.index("white matter")
    assert np.abs(perturbation[~white_matter]).max() == 0
    assert np.abs(perturbation[white_matter]).max() > 0
    reference_dice = second["metrics"].GetTable().GetColumnByName("dice_reference")
    assert reference_dice is not None and not np.isnan(reference_dice.GetValue(0))


def test_cancel_midway_adds_no_node_and_no_folder(scene_with_sample, first_run):
    slicer_scene, volume, labels = scene_with_sample
    scene = slicer_scene.scene
    settings = module_logic.ProbeSettings(inputVolume=volume, referenceNode=labels, probe="pgd",
                                          probeParameters='{"pgd": {"steps": "50"}}', epsilons="0.01 0.02")
    before, folders_before = node_ids(scene), folders(scene)
    run, messages = apply_as_widget(slicer_scene, settings, cancel_after_step=1)
    assert run.cancelled
    with pytest.raises(AttackCancelled):
        run.finish()
    assert node_ids(scene) == before
    assert folders(scene) == folders_before
    assert not any("step 3/50" in message for _, message in messages)


def test_bad_input_is_refused_before_anything_runs(scene_with_sample):
    slicer_scene, volume, labels = scene_with_sample
    scene = slicer_scene.scene
    tissue = tissue_segmentation(slicer_scene, labels)
    before = node_ids(scene)
    cases = [
        (module_logic.ProbeSettings(), "select an input volume"),
        (module_logic.ProbeSettings(inputVolume=volume, probe="affine", severities="2", regionSegmentation=tissue,
                                    regionSegmentId=segment_id(tissue, "white matter")), "moves the anatomy"),
        (module_logic.ProbeSettings(inputVolume=volume, epsilons="0.01 x"), "epsilons must be numbers"),
        (module_logic.ProbeSettings(inputVolume=volume, epsilons="0.5 1.5"), "0 < epsilon < 1"),
        (module_logic.ProbeSettings(inputVolume=volume, probeParameters='{"pgd": {"stepz": "2"}}'),
         "has no parameter stepz"),
        (module_logic.ProbeSettings(inputVolume=volume, probe="smoothing", severities="7"), "severity"),
        (module_logic.ProbeSettings(inputVolume=volume, networkKind="torchscript"), "select the torchscript"),
        (module_logic.ProbeSettings(inputVolume=labels), "scalar volume"),
        (module_logic.ProbeSettings(inputVolume=volume, unstableAt="half"), "review unstable at: expected a positive"),
    ]
    node = module_logic.parameter_node(scene)
    for settings, message in cases:
        module_logic.write_settings(node, settings)
        with pytest.raises(InputError, match=message):
            module_logic.start_run(slicer_scene, node)
    assert node_ids(scene) == before


def test_settings_survive_a_saved_scene(tmp_path, slicer_scene, sample_nodes):
    volume, labels = sample_nodes
    tissue = tissue_segmentation(slicer_scene, labels)
    settings = module_logic.ProbeSettings(
        inputVolume=volume, referenceNode=tissue, referenceSegmentIds=segment_id(tissue, "CSF"),
        networkKind="torchscript", networkPath="/models/net.ts", outputActivation="softmax", trustCheckpoint=True,
        probe="dag", probeParameters='{"dag": {"gamma": "0.25"}}', epsilons="0.01:0.04:4", severities="2 4",
        regionSegmentation=tissue, regionSegmentId=segment_id(tissue, "white matter"), device="cuda",
        compareVolumes=[volume], compareNetworks="demo-unet, /models/mine", compareFolder="/studies/one",
        compareProbes="pgd, smoothing", compareSeeds="0 1 2")
    module_logic.write_settings(module_logic.parameter_node(slicer_scene.scene), settings)
    slicer_scene.write_mrb(tmp_path / "scene.mrb")

    reloaded = SlicerScene.read_mrb(tmp_path / "scene.mrb")
    restored = module_logic.read_settings(module_logic.parameter_node(reloaded.scene, create=False))
    for name in module_logic.NODE_PARAMETERS:
        assert getattr(restored, name).GetName() == getattr(settings, name).GetName()
        assert getattr(restored, name).GetScene() is reloaded.scene
    for name in module_logic.NODE_LIST_PARAMETERS:
        assert [node.GetName() for node in getattr(restored, name)] == [node.GetName() for node in
                                                                          getattr(settings, name)]
        assert all(node.GetScene() is reloaded.scene for node in getattr(restored, name))
    plain = [name for name in vars(settings)
             if name not in module_logic.NODE_PARAMETERS + module_logic.NODE_LIST_PARAMETERS]
    assert {name: getattr(restored, name) for name in plain} == {name: getattr(settings, name) for name in plain}


def test_parse_strengths_takes_lists_and_sweeps():
    assert module_logic.parse_strengths("0.01, 0.02;0.04") == [0.01, 0.02, 0.04]
    assert module_logic.parse_strengths("0.01:0.04:4") == pytest.approx([0.01, 0.02, 0.03, 0.04])
    with pytest.raises(InputError):
        module_logic.parse_strengths("")


def test_every_probe_has_its_library_parameters():
    names = registry.probe_names()
    assert names[:10] == ["apgd-ce", "apgd-dlr", "cospgd", "dag", "deepfool", "deepfool-linf", "fgsm", "jsma", "pgd",
                          "segpgd"]
    assert "smoothing" in names and "rician_noise" in names
    pgd = {parameter.name: parameter.default for parameter in registry.probe_parameters("pgd")}
    assert pgd["steps"] == 10 and pgd["norm"] == "linf"
    assert [p.name for p in registry.probe_parameters("smoothing")] == ["seed"]


# --- the packages the module needs (MedAdvRobustnessLib.module.dependencies) and Reload ----------------------------

@pytest.fixture
def fresh_dependencies():
    from MedAdvRobustnessLib.module import dependencies
    dependencies.forget()
    yield dependencies
    dependencies.forget()


def test_every_dependency_of_every_feature_is_installed_here(fresh_dependencies):
    """scripts/setup.sh installs what the module lists; the list names what the features import."""
    assert fresh_dependencies.problems("all") == []
    names = {dependency.module for dependency in fresh_dependencies.DEPENDENCIES}
    assert {"torch", "monai", "matplotlib", "yaml", "nibabel", "dynamic_network_architectures"} <= names
    assert {d.distribution for d in fresh_dependencies.missing("run")} <= {"torch", "monai"}
    nnunet = next(d for d in fresh_dependencies.DEPENDENCIES if d.module == "dynamic_network_architectures")
    assert nnunet.no_deps and nnunet.requirement == "dynamic_network_architectures>=0.4"


def test_the_check_reads_the_metadata_once_until_forget(fresh_dependencies, monkeypatch):
    import importlib.metadata
    assert fresh_dependencies.problems("compare") == []
    calls = []

    def gone(name):
        calls.append(name)
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", gone)
    for _ in range(100):  # the widget asks on every change of its parameter node
        assert fresh_dependencies.problems("compare") == []
    assert calls == []
    fresh_dependencies.forget()  # after an install
    problems = fresh_dependencies.problems("compare")
    assert len(problems) == 4 and problems[0] == "torch is not installed (needed for every network)"
    assert sorted(calls) == ["matplotlib", "monai", "nibabel", "torch"]
    assert fresh_dependencies.problems("run") == problems[:2]


def test_an_old_version_is_reported(fresh_dependencies, monkeypatch):
    monkeypatch.setitem(fresh_dependencies._versions, "monai", "1.3.2")
    assert fresh_dependencies.problems("run") == [
        "monai 1.3.2 is older than 1.4 (needed for networks, attacks, corruptions and metrics)"]
    assert [fresh_dependencies.version_tuple(v) for v in ("2.3.1+cu121", "1.4rc1", "10", "0.4.4")] == \
        [(2, 3), (1, 4), (10,), (0, 4)]


def test_constraints_pin_the_installed_torch_and_numpy(fresh_dependencies, tmp_path):
    import importlib.metadata
    import torch
    import numpy
    path = fresh_dependencies.write_constraints(tmp_path / "constraints.txt")
    lines = path.read_text().splitlines()
    assert "torch=={}".format(importlib.metadata.version("torch")) in lines
    assert "torch=={}".format(torch.__version__) in lines  # the local label (+cpu, +cu121) included
    assert "numpy=={}".format(numpy.__version__) in lines
    assert all(line.split("==")[0] in fresh_dependencies.PINNED for line in lines)


def test_an_install_that_changed_an_imported_package_asks_for_a_restart(fresh_dependencies):
    import yaml  # noqa: F401  (imported: its old code stays loaded)
    after = fresh_dependencies.installed_versions()
    assert after["PyYAML"] == yaml.__version__ and "torch" in after
    assert fresh_dependencies.import_names("PyYAML") == {"yaml", "_yaml"}
    assert "dynamic_network_architectures" in fresh_dependencies.import_names("dynamic_network_architectures")
    before = dict(after, PyYAML="5.0")
    del before["nibabel"]  # freshly installed
    assert fresh_dependencies.changed_imported(before, after, {"yaml": yaml}) == [
        ("PyYAML", "5.0", after["PyYAML"])]
    assert fresh_dependencies.changed_imported(before, after, {}) == []  # nothing of them loaded: no restart
    assert fresh_dependencies.changed_imported(before, after, {"nibabel": None}) == [
        ("nibabel", None, after["nibabel"])]
    assert fresh_dependencies.changed_imported(after, after) == []


RELOAD = """
import sys
from MedAdvRobustnessLib.module import logic, unload_library
old = logic
removed = unload_library()
assert "MedAdvRobustnessLib.module.logic" in removed and "MedAdvRobustnessLib" in removed, removed
assert not [name for name in sys.modules if name.startswith("MedAdvRobustnessLib")]
from MedAdvRobustnessLib.module import logic
assert logic is not old and logic.ProbeSettings is not old.ProbeSettings
print("reloaded", len(removed))
"""


def test_unload_library_makes_the_next_import_read_the_library_again():
    import subprocess
    import sys
    completed = subprocess.run([sys.executable, "-c", RELOAD], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("reloaded")
