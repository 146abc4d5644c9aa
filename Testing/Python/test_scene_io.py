"""Tables, charts and the .mrb bundle: what results put into a scene is all there after saving and reading it."""
import math
import zipfile

import numpy as np
import pytest
import vtk
from slicer import util

from geometry_cases import add_node, assert_same_voxels_in_space, ijk_to_ras_matrix, random_ijk_to_ras
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import Label
from MedAdvRobustnessLib.scene.nodes import (add_label_map_node, add_line_chart, add_segmentation_node, add_table_node,
                                       add_volume_node, labels_from_node, volume_from_node)
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

COLOR_TOLERANCE = 1.0 / 255  # colour tables keep 8 bits per channel
LABELS = [Label(0, "background", (0.0, 0.0, 0.0)), Label(1, "CSF", (0.2, 0.4, 1.0)),
          Label(2, "grey matter", (0.6, 0.6, 0.6)), Label(3, "white matter", (1.0, 0.9, 0.5))]
ROWS = [
    {"epsilon": 0.0, "label": "CSF", "dice": 1.0, "count": 3, "note": None, "mixed": 1.5},
    {"epsilon": 0.01, "label": "CSF", "dice": None, "count": 4, "note": "empty", "mixed": "n/a"},
    {"epsilon": 0.02, "label": "mean", "dice": 0.25, "count": None, "note": "x", "mixed": None},
]
COLUMNS = ["epsilon", "label", "dice", "count", "note", "mixed", "missing"]
NUMERIC = {"epsilon": [0.0, 0.01, 0.02], "dice": [1.0, math.nan, 0.25], "count": [3.0, 4.0, math.nan],
           "missing": [math.nan] * 3}
TEXT = {"label": ["CSF", "CSF", "mean"], "note": ["", "empty", "x"], "mixed": ["1.5", "n/a", ""]}


def column_values(table_node, name):
    column = table_node.GetTable().GetColumnByName(name)
    assert column is not None, name
    return [column.GetValue(row) for row in range(column.GetNumberOfValues())]


def assert_table_contents(table_node):
    assert table_node.GetNumberOfColumns() == len(COLUMNS)
    assert [table_node.GetColumnName(index) for index in range(len(COLUMNS))] == COLUMNS
    assert table_node.GetNumberOfRows() == len(ROWS)
    for name, expected in NUMERIC.items():
        assert table_node.GetTable().GetColumnByName(name).IsNumeric(), name
        np.testing.assert_array_equal(column_values(table_node, name), expected)  # NaN equals NaN here
    for name, expected in TEXT.items():
        assert table_node.GetTable().GetColumnByName(name).IsA("vtkStringArray"), name
        assert column_values(table_node, name) == expected, name


def test_table_numeric_and_text_columns(slicer_scene):
    table = add_table_node(slicer_scene.scene, ROWS, COLUMNS, "metrics")
    assert table.GetClassName() == "vtkMRMLTableNode" and table.GetName() == "metrics"
    for name in NUMERIC:
        assert table.GetTable().GetColumnByName(name).IsA("vtkDoubleArray"), name
    assert_table_contents(table)
    np.testing.assert_array_equal(util.arrayFromTableColumn(table, "dice"), [1.0, math.nan, 0.25])
    # a second table of the same name gets its own name
    assert add_table_node(slicer_scene.scene, ROWS, COLUMNS, "metrics").GetName() != "metrics"


def test_table_without_rows_has_its_columns(slicer_scene):
    table = add_table_node(slicer_scene.scene, [], ["a", "b"], "empty")
    assert table.GetNumberOfColumns() == 2 and table.GetNumberOfRows() == 0


SERIES = [("CSF", (0.2, 0.4, 1.0)), ("grey matter", (0.6, 0.6, 0.6)), ("mean", (0.1, 0.1, 0.1))]


def curve_table(scene):
    rows = [{"epsilon": eps, "CSF": 1.0 - eps, "grey matter": 1.0 - 2 * eps, "mean": 1.0 - 1.5 * eps}
            for eps in (0.0, 0.01, 0.02)]
    return add_table_node(scene, rows, ["epsilon"] + [column for column, _ in SERIES], "Dice vs epsilon")


def assert_chart(scene, chart, table, title="Dice curve"):
    assert chart.GetClassName() == "vtkMRMLPlotChartNode"
    assert chart.GetTitle() == title
    assert chart.GetXAxisTitle() == "epsilon" and chart.GetYAxisTitle() == "Dice"
    assert chart.GetNumberOfPlotSeriesNodes() == len(SERIES)
    for index, (column, color) in enumerate(SERIES):
        series = chart.GetNthPlotSeriesNode(index)
        assert series.GetClassName() == "vtkMRMLPlotSeriesNode"
        assert series.GetTableNodeID() == table.GetID()
        assert scene.GetNodeByID(series.GetTableNodeID()) is table
        assert series.GetXColumnName() == "epsilon"
        assert series.GetYColumnName() == column
        assert series.GetPlotType() == series.PlotTypeScatter
        np.testing.assert_allclose(series.GetColor(), color, atol=1e-6)


def test_line_chart(slicer_scene):
    scene = slicer_scene.scene
    table = curve_table(scene)
    chart = add_line_chart(scene, table, "epsilon", SERIES, "Dice curve", "epsilon", "Dice")
    assert chart.GetName() == "Dice curve"
    assert_chart(scene, chart, table)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == len(SERIES)


# --- .mrb round trip ------------------------------------------------------------------------------------------

def nodes_by_name(scene, node_class):
    """Nodes of exactly this class (not subclasses), by name, leaving out Slicer's default ones."""
    nodes = {}
    for index in range(scene.GetNumberOfNodesByClass(node_class)):
        node = scene.GetNthNodeByClass(index, node_class)
        if node.GetClassName() == node_class and node.GetSingletonTag() is None and node.GetSaveWithScene():
            nodes.setdefault(node.GetName(), []).append(node)
    return nodes


def segments(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return {segmentation.GetNthSegment(index).GetName(): tuple(segmentation.GetNthSegment(index).GetColor())
            for index in range(segmentation.GetNumberOfSegments())}


def assert_same_segments(segmentation_node, expected_node):
    found, expected = segments(segmentation_node), segments(expected_node)
    assert sorted(found) == sorted(expected)
    for name, color in found.items():
        np.testing.assert_allclose(color, expected[name], atol=1e-6)  # the file keeps 6 decimals


def segment_label_map(slicer_scene, segmentation_node, reference_node):
    """The segmentation exported as one label map on the reference grid: segment name → boolean mask."""
    segmentation = segmentation_node.GetSegmentation()
    masks = {}
    for index in range(segmentation.GetNumberOfSegments()):
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentation.GetNthSegmentID(index))
        exported = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
        assert slicer_scene.segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, exported,
                                                                             reference_node)
        masks[segmentation.GetNthSegment(index).GetName()] = util.arrayFromVolume(exported) > 0
        slicer_scene.scene.RemoveNode(exported)
    return masks


def fill_scene(slicer_scene, right_handed=True):
    """A scene as results leave it: oblique volume (under a transform), label map with colours, segments,
    metrics table and a chart."""
    scene = slicer_scene.scene
    rng = np.random.default_rng(42)
    ijk_to_ras = random_ijk_to_ras(rng, "oblique", right_handed=right_handed)
    shape_kji = (7, 9, 11)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = np.eye(4)
    shift[:3, 3] = (1.0, -2.0, 3.0)
    transform.SetMatrixTransformToParent(util.vtkMatrixFromArray(shift))
    source = add_node(scene, rng.uniform(0.0, 255.0, size=shape_kji).astype(np.float32), ijk_to_ras, name="T1")
    source.SetAndObserveTransformNodeID(transform.GetID())
    volume = volume_from_node(source)
    adversarial = add_volume_node(scene, volume.array + 1.0, volume, "T1 adversarial")
    labels_kji = rng.choice([0, 1, 3], size=shape_kji).astype(np.int16)
    label_node = add_node(scene, labels_kji, ijk_to_ras, "vtkMRMLLabelMapVolumeNode", "reference")
    labels = labels_from_node(label_node, volume)
    prediction = add_label_map_node(scene, labels, volume, "T1 prediction", LABELS)
    segmentation = add_segmentation_node(slicer_scene, prediction, "T1 segmentation")
    table = add_table_node(scene, ROWS, COLUMNS, "T1 metrics")
    chart = add_line_chart(scene, curve_table(scene), "epsilon", SERIES, "Dice curve", "epsilon", "Dice")
    return dict(volume=source, adversarial=adversarial, prediction=prediction, segmentation=segmentation,
                table=table, chart=chart, transform=transform, labels_kji=labels_kji)


@pytest.fixture
def filled_scene(slicer_scene):
    return fill_scene(slicer_scene)


EXPECTED_NODES = {
    "vtkMRMLScalarVolumeNode": {"T1", "T1 adversarial"},
    "vtkMRMLLabelMapVolumeNode": {"reference", "T1 prediction"},
    "vtkMRMLSegmentationNode": {"T1 segmentation"},
    "vtkMRMLTableNode": {"T1 metrics", "Dice vs epsilon"},
    "vtkMRMLPlotChartNode": {"Dice curve"},
    "vtkMRMLPlotSeriesNode": {"CSF", "grey matter", "mean"},
    "vtkMRMLColorTableNode": {"T1 prediction colors"},
    "vtkMRMLLinearTransformNode": {"registration"},
}


def test_mrb_round_trip(slicer_scene, filled_scene, tmp_path):
    original = filled_scene
    for node_class, names in EXPECTED_NODES.items():  # the scene holds what this test expects back
        assert names <= set(nodes_by_name(slicer_scene.scene, node_class)), node_class
    path = tmp_path / "results.mrb"
    slicer_scene.write_mrb(path)
    assert zipfile.is_zipfile(str(path))

    loaded = SlicerScene.read_mrb(path)
    scene = loaded.scene
    for node_class, names in EXPECTED_NODES.items():
        found = nodes_by_name(scene, node_class)
        assert names <= set(found), (node_class, sorted(found))
        assert all(len(found[name]) == 1 for name in names), node_class

    def one(node_class, name):
        return nodes_by_name(scene, node_class)[name][0]

    for node_class, name, key in (("vtkMRMLScalarVolumeNode", "T1", "volume"),
                                  ("vtkMRMLScalarVolumeNode", "T1 adversarial", "adversarial"),
                                  ("vtkMRMLLabelMapVolumeNode", "T1 prediction", "prediction")):
        node, before = one(node_class, name), original[key]
        assert node.GetImageData() is not None, name
        assert np.array_equal(util.arrayFromVolume(node), util.arrayFromVolume(before)), name
        np.testing.assert_allclose(ijk_to_ras_matrix(node), ijk_to_ras_matrix(before), atol=1e-6)
    assert np.array_equal(util.arrayFromVolume(one("vtkMRMLLabelMapVolumeNode", "T1 prediction")),
                          original["labels_kji"])

    # the volume and its results stay under the transform, which keeps its matrix
    transform = one("vtkMRMLLinearTransformNode", "registration")
    for name in ("T1", "T1 adversarial"):
        assert one("vtkMRMLScalarVolumeNode", name).GetTransformNodeID() == transform.GetID()
    np.testing.assert_allclose(util.arrayFromTransformMatrix(transform),
                               util.arrayFromTransformMatrix(original["transform"]), atol=1e-9)

    # the label map still shows the label colours
    colors = one("vtkMRMLLabelMapVolumeNode", "T1 prediction").GetDisplayNode().GetColorNode()
    assert colors.GetName() == "T1 prediction colors"
    for label in LABELS:
        assert colors.GetColorName(label.value) == label.name
        rgba = [0.0] * 4
        colors.GetColor(label.value, rgba)
        np.testing.assert_allclose(rgba[:3], label.color, atol=COLOR_TOLERANCE)

    # segments: same names, colours and voxels
    segmentation = one("vtkMRMLSegmentationNode", "T1 segmentation")
    assert_same_segments(segmentation, original["segmentation"])
    assert sorted(segments(segmentation)) == ["CSF", "white matter"]
    for name, color in segments(segmentation).items():
        label = next(label for label in LABELS if label.name == name)
        np.testing.assert_allclose(color, label.color, atol=COLOR_TOLERANCE)
    masks = segment_label_map(loaded, segmentation, one("vtkMRMLLabelMapVolumeNode", "T1 prediction"))
    assert np.array_equal(masks["CSF"], original["labels_kji"] == 1)
    assert np.array_equal(masks["white matter"], original["labels_kji"] == 3)

    assert_table_contents(one("vtkMRMLTableNode", "T1 metrics"))
    curve = one("vtkMRMLTableNode", "Dice vs epsilon")
    np.testing.assert_allclose(util.arrayFromTableColumn(curve, "mean"), [1.0, 0.985, 0.97])
    assert_chart(scene, one("vtkMRMLPlotChartNode", "Dice curve"), curve)


def test_mrb_can_be_read_twice_and_written_again(slicer_scene, filled_scene, tmp_path):
    slicer_scene.write_mrb(tmp_path / "first.mrb")
    again = SlicerScene.read_mrb(tmp_path / "first.mrb")
    again.write_mrb(tmp_path / "second.mrb")
    final = SlicerScene.read_mrb(tmp_path / "second.mrb")
    node = nodes_by_name(final.scene, "vtkMRMLScalarVolumeNode")["T1"][0]
    assert np.array_equal(util.arrayFromVolume(node), util.arrayFromVolume(filled_scene["volume"]))
    assert_table_contents(nodes_by_name(final.scene, "vtkMRMLTableNode")["T1 metrics"][0])


def test_mrb_keeps_a_left_handed_grid_in_place(slicer_scene, tmp_path):
    """Slicer's reader gives a left-handed grid a right-handed voxel order (k reversed) when it reads the bundle:
    every voxel must still be where it was, and the network input must be the same."""
    original = fill_scene(slicer_scene, right_handed=False)
    assert np.linalg.det(ijk_to_ras_matrix(original["volume"])[:3, :3]) < 0
    slicer_scene.write_mrb(tmp_path / "left.mrb")
    loaded = SlicerScene.read_mrb(tmp_path / "left.mrb")
    for node_class, name, key in (("vtkMRMLScalarVolumeNode", "T1", "volume"),
                                  ("vtkMRMLScalarVolumeNode", "T1 adversarial", "adversarial"),
                                  ("vtkMRMLLabelMapVolumeNode", "T1 prediction", "prediction")):
        node, before = nodes_by_name(loaded.scene, node_class)[name][0], original[key]
        assert_same_voxels_in_space(util.arrayFromVolume(node), ijk_to_ras_matrix(node),
                                    util.arrayFromVolume(before), ijk_to_ras_matrix(before))
    volume = volume_from_node(nodes_by_name(loaded.scene, "vtkMRMLScalarVolumeNode")["T1"][0])
    assert np.array_equal(volume.array, volume_from_node(original["volume"]).array)
    segmentation = nodes_by_name(loaded.scene, "vtkMRMLSegmentationNode")["T1 segmentation"][0]
    assert_same_segments(segmentation, original["segmentation"])
    masks = segment_label_map(slicer_scene, segmentation, original["prediction"])
    assert np.array_equal(masks["CSF"], original["labels_kji"] == 1)
    assert np.array_equal(masks["white matter"], original["labels_kji"] == 3)


def test_read_mrb_refuses_a_bundle_without_scene(tmp_path):
    path = tmp_path / "not-a-scene.mrb"
    with zipfile.ZipFile(str(path), "w") as bundle:
        bundle.writestr("notes.txt", "no scene here")
    with pytest.raises(InputError, match="no .mrml scene"):
        SlicerScene.read_mrb(path)


@pytest.mark.parametrize("label_map", [False, True])
def test_a_file_named_like_a_numbered_series_is_read_alone(tmp_path, label_map):
    """Slicer's archetype reader takes scan_1, scan_2, ... as one series unless told to read a single file."""
    import nibabel as nib
    for index in (1, 2, 3):
        array = np.full((6, 5, 1), index, dtype=np.int16)
        nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / "scan_{}.nii.gz".format(index)))
    node = SlicerScene.standalone().load_volume(tmp_path / "scan_2.nii.gz", label_map=label_map)
    array = util.arrayFromVolume(node)  # (k, j, i)
    assert array.shape == (1, 5, 6) and np.all(array == 2)
