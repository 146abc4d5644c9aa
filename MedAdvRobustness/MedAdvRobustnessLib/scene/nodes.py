"""Adapters between MRML nodes and arrays in the network convention, keeping the node's exact geometry."""
import math

import numpy as np
from slicer import util

from ..errors import InputError
from ..networks.volume import GridOrientation, Volume

GRID_TOLERANCE = 1e-4


def volume_from_node(node):
    """Read a scalar volume node as a :class:`Volume`, or a vector volume node (a colour image as Slicer loads it)
    as a channel-first one, a channel per component (copies the voxels; the node is not modified)."""
    check_volume_node(node)
    array_kji = util.arrayFromVolume(node)  # (k, j, i), or (k, j, i, components) for a vector volume
    check_finite_voxels(node, array_kji)
    ijk_to_ras = ijk_to_ras_of(node)
    check_geometry(node.GetName(), ijk_to_ras)
    orientation = GridOrientation.from_ijk_to_ras(ijk_to_ras, array_kji.shape[:3])
    if array_kji.ndim == 4 and array_kji.shape[3] == 1:
        array_kji = array_kji[..., 0]
    if array_kji.ndim == 3:
        array = orientation.to_network(array_kji)
    else:
        array = np.stack([orientation.to_network(array_kji[..., channel]) for channel in range(array_kji.shape[3])])
    return Volume(node.GetName(), array.astype(np.float32), ijk_to_ras, orientation, node.GetTransformNodeID())


NOT_IMAGES = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLDiffusionTensorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode")


def check_volume_node(node):
    """Refuse what is not a scalar or vector (colour) volume with voxels: nothing, a label map, a tensor or
    diffusion-weighted volume."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or any(node.IsA(kind) for kind in NOT_IMAGES) or (
            node.IsA("vtkMRMLTensorVolumeNode") and not node.IsA("vtkMRMLVectorVolumeNode")):
        kind = node.GetClassName() if node is not None else "nothing"
        raise InputError("the input must be a scalar volume or a colour (vector) volume, got {}".format(kind))
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError("volume {} has no voxels".format(node.GetName()))
    if image.GetNumberOfScalarComponents() > 1 and not node.IsA("vtkMRMLVectorVolumeNode"):
        raise InputError("volume {} has {} components per voxel but is no vector volume; only scalar and colour "
                         "(vector) volumes can be attacked".format(node.GetName(),
                                                                  image.GetNumberOfScalarComponents()))


FARTHEST_MM = 1e9  # a position or voxel size beyond this (1000 km) is a damaged header, not a scanner's


def check_geometry(name, ijk_to_ras):
    """Refuse an IJK-to-RAS matrix with NaN or infinite entries, or a position or voxel size beyond
    :data:`FARTHEST_MM` (a damaged header: its geometry, and every distance in mm, would be meaningless)."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)[:3]
    if not np.all(np.isfinite(matrix)):
        raise InputError("volume {} has a NaN or infinite position or direction in its geometry (IJK-to-RAS); the "
                         "file's header is damaged: set its origin, spacing and directions".format(name))
    if np.abs(matrix).max() > FARTHEST_MM:
        raise InputError("volume {} has a position or voxel size of {:.3g} mm in its geometry, beyond any scanner; "
                         "the file's header is damaged: set its origin and spacing".format(
                             name, float(np.abs(matrix).max())))


def check_finite_voxels(node, array_kji):
    """Refuse NaN or infinite voxels, and voxels beyond the float32 range."""
    bad = ~np.isfinite(array_kji)
    if bad.any():
        first = tuple(int(v) for v in np.argwhere(bad)[0][:3][::-1])
        raise InputError("volume {} has {:,} NaN or infinite voxel(s), the first at (i, j, k) = {}; replace them "
                         "(the probes and metrics need finite voxels)".format(node.GetName(), int(bad.sum()), first))
    if np.abs(array_kji).max() > np.finfo(np.float32).max:
        raise InputError("volume {} has voxels beyond the float32 range (up to {:.3g}), which the network's float32 "
                         "arithmetic turns into infinity; rescale the volume".format(
                             node.GetName(), float(np.abs(array_kji).max())))


def labels_from_node(node, like, role="reference"):
    """Integer labels (X, Y, Z) of a label map node that must lie on the grid of the volume ``like``; ``role``
    (``reference``, ``region``) names it in the errors."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("the {} must be a label map volume".format(role))
    array_kji = util.arrayFromVolume(node)
    if array_kji.shape != like.orientation.shape_kji:
        raise InputError("{} {} is on another grid than volume {} (shape {} vs {}); resample it onto the volume "
                         "first".format(role, node.GetName(), like.name, array_kji.shape[::-1],
                                        like.orientation.shape_kji[::-1]))
    differences = grid_differences(ijk_to_ras_of(node), like.ijk_to_ras)
    if differences:
        raise InputError("{} {} is on another grid than volume {}: {} ({} vs volume); resample it onto the volume "
                         "first".format(role, node.GetName(), like.name, "; ".join(differences), role))
    if not np.all(np.isfinite(array_kji)) or not np.all(np.equal(np.mod(array_kji, 1), 0)) or array_kji.min() < 0:
        raise InputError("{} {} must hold non-negative integer labels".format(role, node.GetName()))
    return like.orientation.to_network(array_kji).astype(np.int64)


def grid_differences(ijk_to_ras, other):
    """What differs between two voxel-to-RAS matrices, each with both values: spacing (mm), origin (RAS, mm),
    direction (the i, j and k axes in RAS, one after the other)."""
    def parts(matrix):
        matrix = np.asarray(matrix, dtype=np.float64)
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        return {"spacing": spacing, "origin": matrix[:3, 3], "direction": (matrix[:3, :3] / spacing).T}  # i, j, k

    def text(values):
        return "(" + ", ".join("{:.6g}".format(v + 0.0) for v in np.ravel(values)) + ")"

    mine, theirs = parts(ijk_to_ras), parts(other)
    return ["{} {} vs {}".format(name, text(mine[name]), text(theirs[name])) for name in mine
            if not np.allclose(mine[name], theirs[name], atol=GRID_TOLERANCE)]


def ijk_to_ras_of(node):
    import vtk
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return util.arrayFromVTKMatrix(matrix)


def add_volume_node(scene, array_xyz, like, name, node_class="vtkMRMLScalarVolumeNode", display=True):
    """A new volume node holding a network-convention array on the grid (and transform) of ``like``: a vector
    volume node, a component per channel, for a channel-first (C, X, Y, Z) array."""
    array_xyz = np.asarray(array_xyz)
    if array_xyz.ndim == 4 and node_class == "vtkMRMLScalarVolumeNode":
        node_class = "vtkMRMLVectorVolumeNode"
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    util.updateVolumeFromArray(node, slicer_array(array_xyz, like.orientation))
    node.SetIJKToRASMatrix(util.vtkMatrixFromArray(like.ijk_to_ras))
    node.SetAndObserveTransformNodeID(like.transform_node_id)
    if display:
        node.CreateDefaultDisplayNodes()
    return node


def slicer_array(array_xyz, orientation):
    """A network-convention (X, Y, Z) array as Slicer's (k, j, i) one; (C, X, Y, Z) as (k, j, i, C)."""
    if array_xyz.ndim == 3:
        return orientation.to_slicer(array_xyz)
    return np.stack([orientation.to_slicer(channel) for channel in array_xyz], axis=-1)


def add_color_table(scene, labels, name):
    """A colour table node with the labels' names and colours (background transparent)."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", scene.GenerateUniqueName(name))
    table.SetTypeToUser()
    table.SetNumberOfColors(max(label.value for label in labels) + 1)
    for label in labels:
        table.SetColor(label.value, label.name, *label.color, 0.0 if label.value == 0 else 1.0)
    return table


def add_label_map_node(scene, labels_xyz, like, name, labels, color_table=None):
    """A label map node whose display uses the labels' colour table."""
    node = add_volume_node(scene, np.asarray(labels_xyz).astype(np.int16), like, name,
                           "vtkMRMLLabelMapVolumeNode")
    color_table = color_table or add_color_table(scene, labels, name + " colors")
    node.GetDisplayNode().SetAndObserveColorNodeID(color_table.GetID())
    return node


def add_segmentation_node(slicer_scene, label_map_node, name):
    """A segmentation node with one named, coloured segment per label present in the label map."""
    scene = slicer_scene.scene
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    # Under the label map's transform before importing: otherwise the import hardens the transform into the
    # segments and the transform would then apply twice.
    node.SetAndObserveTransformNodeID(label_map_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(label_map_node)
    if not slicer_scene.segmentations_logic.ImportLabelmapToSegmentationNode(label_map_node, node, ""):
        scene.RemoveNode(node)
        raise RuntimeError("cannot convert label map {} to segments".format(label_map_node.GetName()))
    return node


def add_table_node(scene, rows, columns, name):
    """A table node; numeric columns hold numbers (NaN where empty), others text."""
    import vtk
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    for column in columns:
        values = [row.get(column) for row in rows]
        numeric = all(value is None or isinstance(value, (int, float)) for value in values)
        array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        array.SetName(column)
        for value in values:
            if numeric:
                array.InsertNextValue(math.nan if value is None else float(value))
            else:
                array.InsertNextValue("" if value is None else str(value))
        table.AddColumn(array)
    return table


def add_line_chart(scene, table, x_column, series, name, x_title, y_title):
    """A chart node with one line series per (column, colour) of ``series`` against ``x_column``."""
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
    for column, color in series:
        plot = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(column))
        plot.SetAndObserveTableNodeID(table.GetID())
        plot.SetXColumnName(x_column)
        plot.SetYColumnName(column)
        plot.SetPlotType(plot.PlotTypeScatter)
        plot.SetMarkerStyle(plot.MarkerStyleCircle)
        plot.SetColor(*color)
        chart.AddAndObservePlotSeriesNodeID(plot.GetID())
    chart.SetTitle(name)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    return chart


def node_ids(scene):
    """The IDs of every node in ``scene`` (to tell later which nodes are new)."""
    return {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}


def remove_nodes_added_since(scene, before):
    """Remove every node whose ID is not in ``before`` (a :func:`node_ids` set), newest first."""
    for index in reversed(range(scene.GetNumberOfNodes())):
        node = scene.GetNthNode(index)
        if node is not None and node.GetID() not in before:
            scene.RemoveNode(node)
