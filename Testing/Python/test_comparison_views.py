"""The comparison layout's views (scene.layouts.show_comparison) on a real run's nodes, in real MRML (slicer-core).

The views are made as in Slicer: the layout logic creates the slice nodes of the comparison layout, one
vtkMRMLSliceLogic per view its slice composite node; the application's part (the layout manager switch, fitting
the slice widgets, the chart and table) is left to MedAdvRobustnessLogic.showComparison.
"""

import numpy as np
import pytest
import slicer
from slicer import util
from vtk.util import numpy_support

from MedAdvRobustnessLib.module import logic as module_logic
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME
from MedAdvRobustnessLib.scene.layouts import (ATTACKED_VIEW, CLEAN_VIEW, COMPARISON_LAYOUT, COMPARISON_LAYOUT_ID,
                                               show_comparison, view_nodes)
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

EPSILONS = (0.01, 0.02)
SHORT_PGD = '{"pgd": {"steps": "1", "seed": "3"}}'
VIEWS = (CLEAN_VIEW, ATTACKED_VIEW)


@pytest.fixture(scope="module")
def run_nodes():
    """The nodes of a short PGD run (two epsilons) of the demo network on the embedded sample, as the module's run
    adds them (ProbeRun: read_inputs, compute, add_run_nodes, the input volume), computed in this process; the
    worker process the widget starts is tested in test_module_logic.py."""
    slicer_scene = SlicerScene.standalone()
    volume = slicer_scene.load_volume(SAMPLE_VOLUME)
    labels = slicer_scene.load_volume(SAMPLE_LABELS, label_map=True)
    settings = module_logic.ProbeSettings(inputVolume=volume, referenceNode=labels, probe="pgd",
                                          probeParameters=SHORT_PGD, epsilons=" ".join(map(str, EPSILONS)))
    result = module_logic.compute(module_logic.read_inputs(slicer_scene, settings))
    nodes = module_logic.add_run_nodes(slicer_scene, result)
    nodes["input"] = volume
    return slicer_scene.scene, nodes


def comparison_views(scene):
    """The comparison layout's slice views as Slicer makes them: their slice logics by layout name."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout_node = layout_logic.GetLayoutNode()
    if not layout_node.IsLayoutDescription(COMPARISON_LAYOUT_ID):
        layout_node.AddLayoutDescription(COMPARISON_LAYOUT_ID, COMPARISON_LAYOUT)
    layout_node.SetViewArrangement(COMPARISON_LAYOUT_ID)
    logics = {}
    for name, slice_node in zip(VIEWS, view_nodes(scene, "vtkMRMLSliceNode", VIEWS)):
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(slice_node)  # finds or adds the view's slice composite node
        logics[name] = logic
    return logics


@pytest.fixture(scope="module")
def shown(run_nodes):
    """show_comparison on the run's nodes, the clean view turned sagittal before; the slice logics and the views
    fitted (in call order)."""
    scene, nodes = run_nodes
    logics = comparison_views(scene)
    logics[CLEAN_VIEW].GetSliceNode().SetOrientation("Sagittal")
    fitted = []

    def fit_view(name):
        fitted.append(name)
        logics[name].FitSliceToAll()

    show_comparison(scene, nodes, fit_view=fit_view)
    return logics, fitted


def composite(logics, name):
    return logics[name].GetSliceCompositeNode()


def test_the_clean_view_shows_the_fragility_map_over_the_input(run_nodes, shown):
    _, nodes = run_nodes
    logics, _ = shown
    clean = composite(logics, CLEAN_VIEW)
    assert clean.GetBackgroundVolumeID() == nodes["input"].GetID()
    assert clean.GetForegroundVolumeID() == nodes["fragility"].GetID()
    assert clean.GetForegroundOpacity() == pytest.approx(0.7)


def test_the_attacked_view_shows_the_strongest_perturbation_over_its_probed_volume(run_nodes, shown):
    _, nodes = run_nodes
    logics, _ = shown
    attacked = composite(logics, ATTACKED_VIEW)
    assert attacked.GetBackgroundVolumeID() == nodes["probed"][max(EPSILONS)].GetID()
    assert attacked.GetForegroundVolumeID() == nodes["perturbation"][max(EPSILONS)].GetID()
    assert attacked.GetForegroundOpacity() == pytest.approx(0.4)


def test_the_views_are_linked_in_the_clean_view_s_orientation(shown):
    logics, _ = shown
    assert all(composite(logics, name).GetLinkedControl() for name in VIEWS)
    assert [logics[name].GetSliceNode().GetOrientation() for name in VIEWS] == ["Sagittal", "Sagittal"]


def test_each_view_outlines_its_segmentation_and_the_others_are_hidden(run_nodes, shown):
    _, nodes = run_nodes
    logics, _ = shown
    slice_ids = {name: logics[name].GetSliceNode().GetID() for name in VIEWS}
    for name, strength in ((CLEAN_VIEW, 0.0), (ATTACKED_VIEW, max(EPSILONS))):
        display = nodes["segmentation"][strength].GetDisplayNode()
        assert display.GetVisibility() and display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
        assert [display.IsDisplayableInView(slice_ids[view]) for view in VIEWS] == [view == name for view in VIEWS]
    assert not nodes["segmentation"][min(EPSILONS)].GetDisplayNode().GetVisibility()


def test_the_unstable_segmentation_is_outlined_in_the_clean_view_only(run_nodes, shown):
    _, nodes = run_nodes
    logics, _ = shown
    display = nodes["unstable"].GetDisplayNode()
    assert not display.GetVisibility2DFill()
    assert display.IsDisplayableInView(logics[CLEAN_VIEW].GetSliceNode().GetID())
    assert not display.IsDisplayableInView(logics[ATTACKED_VIEW].GetSliceNode().GetID())


def test_the_views_are_fitted_then_centred_on_the_largest_unstable_cluster(run_nodes, shown):
    """Fitting centres a view on its volume; the centring on the focus comes after it and stays."""
    scene, nodes = run_nodes
    logics, fitted = shown
    assert fitted == list(VIEWS)
    bounds = np.zeros(6)
    nodes["input"].GetRASBounds(bounds)
    volume_centre = (bounds[0::2] + bounds[1::2]) / 2.0
    assert np.linalg.norm(np.asarray(nodes["focus"]) - volume_centre) > 1.0  # the fit alone would not get there
    for name in VIEWS:
        slice_to_ras = util.arrayFromVTKMatrix(logics[name].GetSliceNode().GetSliceToRAS())
        np.testing.assert_allclose(slice_to_ras[:3, 3], nodes["focus"], atol=1e-3)


def test_never_changed_voxels_are_transparent_in_the_fragility_map(run_nodes):
    """Through the display node's own pipeline (as a slice layer draws it): alpha 0 where the label never changes
    (fragility 0), opaque where it does."""
    _, nodes = run_nodes
    fragility = nodes["fragility"]
    display = fragility.GetDisplayNode()
    assert display.GetColorNodeID() == nodes["fragility_colors"].GetID()
    display.SetInputImageDataConnection(fragility.GetImageDataConnection())
    display.GetOutputImageDataConnection().GetProducer().Update()
    rgba = numpy_support.vtk_to_numpy(display.GetOutputImageData().GetPointData().GetScalars())
    values = util.arrayFromVolume(fragility).ravel()  # (k, j, i) order, as the image's points
    assert rgba.shape == (values.size, 4)
    assert (values == 0).any() and (values > 0).any()
    assert (rgba[values == 0, 3] == 0).all()
    assert (rgba[values > 0, 3] == 255).all()


def test_a_scene_without_the_comparison_views_is_named_in_the_error(run_nodes):
    _, nodes = run_nodes
    with pytest.raises(ValueError, match="vtkMRMLSliceNode for the view 'MedAdvClean'"):
        show_comparison(slicer.vtkMRMLScene(), nodes)
