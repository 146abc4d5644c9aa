"""A classifier run from the module's logic as the widget drives it: the demo classifier on a shipped held-out
one-slice image, FGSM at two epsilons, its results in the run's folder, the predicted class in the status, and the
true class refused with one line where it does not apply.

Real MRML (slicer-core), the real worker process, the shipped demo classifier and slice.
"""
import numpy as np
import pytest
from slicer import util

from conftest import drive_as_widget
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.evaluation.records import ClassificationResult
from MedAdvRobustnessLib.evaluation.sweep import run_sweep
from MedAdvRobustnessLib.module import logic as module_logic
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.probes.registry import make_probe
from MedAdvRobustnessLib.sample import SAMPLE_SLICE, SAMPLE_SLICE_CLASS
from MedAdvRobustnessLib.scene.nodes import add_volume_node, ijk_to_ras_of, node_ids, volume_from_node
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
from test_module_logic import folders, hierarchy_of

EPSILONS = (0.01, 0.05)


def classifier_settings(volume, **changes):
    settings = dict(inputVolume=volume, builtinNetwork="demo-classifier", probe="fgsm",
                    epsilons=" ".join(str(e) for e in EPSILONS), trueClass=str(SAMPLE_SLICE_CLASS))
    settings.update(changes)
    return module_logic.ProbeSettings(**settings)


@pytest.fixture(scope="module")
def slice_scene():
    slicer_scene = SlicerScene.standalone()
    return slicer_scene, slicer_scene.load_volume(SAMPLE_SLICE)


@pytest.fixture(scope="module")
def classifier_run(slice_scene):
    slicer_scene, volume = slice_scene
    original = util.arrayFromVolume(volume).copy()
    run, messages = drive_as_widget(slicer_scene, classifier_settings(volume), module_logic.start_run)
    return run.finish(), messages, original


@pytest.fixture(scope="module")
def library_result(slice_scene):
    """The same sweep through the library on the same node's volume, as ``medadv run`` computes it."""
    _, volume_node = slice_scene
    volume, model = volume_from_node(volume_node), load_model("demo-classifier")
    with model.on_grid(volume):
        return run_sweep(model, volume, make_probe("fgsm"), list(EPSILONS), reference=SAMPLE_SLICE_CLASS)


def table_column(table_node, name):
    column = table_node.GetTable().GetColumnByName(name)
    assert column is not None, name
    return [column.GetValue(row) for row in range(column.GetNumberOfTuples())]


def test_the_classifier_s_nodes_are_in_the_run_s_folder_on_the_slice_s_grid(slice_scene, classifier_run):
    slicer_scene, volume = slice_scene
    nodes, _, original = classifier_run
    hierarchy = hierarchy_of(slicer_scene.scene)
    assert hierarchy.GetItemName(nodes["folder"]) == "{} demo-classifier fgsm".format(volume.GetName())
    in_folder = module_logic.folder_nodes(hierarchy, nodes["folder"])
    expected = [nodes["probed"][e] for e in EPSILONS] + [nodes["perturbation"][e] for e in EPSILONS] + [
        nodes["saliency"], nodes["metrics"], nodes["curve"], nodes["chart"]]
    for node in expected:
        assert node in in_folder, node.GetName()
    assert volume not in in_folder and nodes["input"] is volume
    for node in [nodes["probed"][e] for e in EPSILONS] + [nodes["saliency"]]:
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions() == (40, 48, 1)
        np.testing.assert_array_equal(ijk_to_ras_of(node), ijk_to_ras_of(volume))
    np.testing.assert_array_equal(util.arrayFromVolume(volume), original)
    budget = max(EPSILONS) * float(original.max() - original.min())
    change = np.abs(util.arrayFromVolume(nodes["probed"][max(EPSILONS)]) - original).max()
    assert 0 < change <= budget * (1 + 1e-6)


def test_the_table_s_predicted_classes_are_the_library_s_on_the_same_volume(classifier_run, library_result):
    nodes, messages, _ = classifier_run
    assert isinstance(library_result, ClassificationResult)
    table = nodes["metrics"]
    assert table_column(table, "epsilon") == [0.0] + list(EPSILONS)
    assert table_column(table, "predicted") == [row["predicted"] for row in library_result.rows]
    assert table_column(table, "predicted_name") == [row["predicted_name"] for row in library_result.rows]
    np.testing.assert_allclose(table_column(table, "confidence"),
                               [row["confidence"] for row in library_result.rows], rtol=1e-5)
    assert table_column(table, "label") == [SAMPLE_SLICE_CLASS] * 3
    assert any(" accuracy " in text for _, text in messages)  # a classifier's progress, not a Dice


def test_the_status_names_the_class_clean_and_under_the_strongest_attack(classifier_run, library_result):
    nodes, _, _ = classifier_run
    clean, strongest = library_result.rows[0], library_result.rows[-1]
    status = nodes["status"]
    assert status.startswith("clean: {} (p {:.2f})".format(clean["predicted_name"], clean["confidence"]))
    assert "fgsm epsilon {:g}: {} (p {:.2f})".format(max(EPSILONS), strongest["predicted_name"],
                                                      strongest["confidence"]) in status
    assert ("flipped" in status) == strongest["flipped"]


def finish_refused(slicer_scene, settings, message):
    """Start the run, let the worker refuse it: one InputError line, no node and no folder added."""
    scene = slicer_scene.scene
    before, folders_before = node_ids(scene), folders(scene)
    run, _ = drive_as_widget(slicer_scene, settings, module_logic.start_run)
    with pytest.raises(InputError, match=message) as refused:
        run.finish()
    assert "\n" not in str(refused.value)
    assert node_ids(scene) == before and folders(scene) == folders_before


def test_a_true_class_beyond_the_classes_is_refused_with_one_line(slice_scene, classifier_run):
    slicer_scene, volume = slice_scene
    finish_refused(slicer_scene, classifier_settings(volume, trueClass="3"),
                   r"true class 3 is beyond the classes of demo-classifier: 0\.\.2 \(0 below the lateral ventricles, "
                   r"1 lateral ventricles, 2 above the lateral ventricles\)")


def test_a_reference_segmentation_to_a_classifier_and_a_true_class_to_a_segmenter_are_refused(slice_scene,
                                                                                               classifier_run):
    slicer_scene, volume = slice_scene
    grid = volume_from_node(volume)
    labels = add_volume_node(slicer_scene.scene, np.ones(grid.array.shape, np.int16), grid, "slice labels",
                             "vtkMRMLLabelMapVolumeNode", display=False)
    try:
        finish_refused(slicer_scene, classifier_settings(volume, referenceNode=labels),
                       "demo-classifier is a classifier: it takes the true class")
    finally:
        slicer_scene.scene.RemoveNode(labels)
    finish_refused(slicer_scene, classifier_settings(volume, builtinNetwork="demo-slicewise2d"),
                   "the true class is for classifiers; demo-slicewise2d is a segmentation network")


def test_a_true_class_that_is_no_index_is_refused_before_anything_runs(slice_scene):
    slicer_scene, volume = slice_scene
    node = module_logic.parameter_node(slicer_scene.scene)
    before = node_ids(slicer_scene.scene)
    for text in ("lateral ventricles", "-1", "1.5"):
        module_logic.write_settings(node, classifier_settings(volume, trueClass=text))
        with pytest.raises(InputError, match=r"true class: expected a class index \(0, 1, 2\.\.\.\), got"):
            module_logic.start_run(slicer_scene, node)
    assert node_ids(slicer_scene.scene) == before


def test_the_true_class_survives_the_parameter_node(slice_scene):
    slicer_scene, volume = slice_scene
    node = module_logic.parameter_node(slicer_scene.scene)
    module_logic.write_settings(node, classifier_settings(volume, trueClass="2"))
    restored = module_logic.read_settings(node)
    assert restored.trueClass == "2" and restored.builtinNetwork == "demo-classifier"
