"""The network convention (GridOrientation) and the MRML adapters keep every voxel and the exact geometry."""
import hashlib

import nibabel as nib
import numpy as np
import pytest
import vtk
from scipy.spatial.transform import Rotation
from slicer import util

from geometry_cases import (KINDS, add_node, assert_same_voxels_in_space, ijk_to_ras_matrix, random_ijk_to_ras,
                            random_shape_kji, ras_of_network_voxels)
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.volume import GridOrientation, ras_axes
from MedAdvRobustnessLib.networks.models import Label
from MedAdvRobustnessLib.scene.nodes import (add_color_table, add_label_map_node, add_segmentation_node, add_volume_node,
                                       labels_from_node, volume_from_node)
from MedAdvRobustnessLib.scene.results import write_volume_file

MATRICES_PER_KIND = 150
COLOR_TOLERANCE = 1.0 / 255  # colour tables keep 8 bits per channel
LABELS = [Label(0, "background", (0.0, 0.0, 0.0)), Label(1, "liver", (0.9, 0.2, 0.1)),
          Label(2, "spleen", (0.1, 0.8, 0.3)), Label(3, "kidney", (0.2, 0.3, 1.0))]


def random_cases(kind, count=MATRICES_PER_KIND, seed=0):
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    for _ in range(count):
        yield rng, random_ijk_to_ras(rng, kind), random_shape_kji(rng)


def nibabel_ras_transform(ijk_to_ras):
    """What MONAI's Orientation("RAS") applies to an (i, j, k) array with this affine."""
    return nib.orientations.ornt_transform(nib.orientations.io_orientation(ijk_to_ras),
                                           nib.orientations.axcodes2ornt("RAS"))


# --- GridOrientation on its own -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_ras_axes_matches_nibabel_io_orientation(kind):
    for _, ijk_to_ras, _ in random_cases(kind):
        axes, flips = ras_axes(ijk_to_ras)
        ornt = nib.orientations.io_orientation(ijk_to_ras)
        assert not np.isnan(ornt).any()
        expected_axes, expected_flips = [None] * 3, [None] * 3
        for ijk_axis, (ras_axis, sign) in enumerate(ornt):
            expected_axes[int(ras_axis)], expected_flips[int(ras_axis)] = ijk_axis, bool(sign < 0)
        assert (axes, flips) == (tuple(expected_axes), tuple(expected_flips)), ijk_to_ras


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_same_array_as_nibabel_reorientation(kind):
    for rng, ijk_to_ras, shape_kji in random_cases(kind):
        orientation = GridOrientation.from_ijk_to_ras(ijk_to_ras, shape_kji)
        array_kji = rng.normal(size=shape_kji).astype(np.float32)
        network = orientation.to_network(array_kji)
        assert network.shape == orientation.shape_xyz
        assert network.flags.c_contiguous
        assert np.array_equal(orientation.to_slicer(network), array_kji)
        other = rng.normal(size=orientation.shape_xyz)
        assert np.array_equal(orientation.to_network(orientation.to_slicer(other)), other)
        # The same array MONAI gets: nibabel's reorientation of the (i, j, k) array.
        expected = nib.orientations.apply_orientation(array_kji.transpose(2, 1, 0), nibabel_ras_transform(ijk_to_ras))
        assert np.array_equal(network, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_network_affine_maps_each_voxel_to_the_same_ras_point(kind):
    for _, ijk_to_ras, shape_kji in random_cases(kind):
        orientation = GridOrientation.from_ijk_to_ras(ijk_to_ras, shape_kji)
        indices_kji = np.arange(np.prod(shape_kji), dtype=np.float64).reshape(shape_kji)
        affine = orientation.network_affine(ijk_to_ras)
        through_affine, through_node = ras_of_network_voxels(orientation.to_network(indices_kji), affine, shape_kji,
                                                             ijk_to_ras)
        np.testing.assert_allclose(through_affine, through_node, atol=1e-9)
        # and it is the affine nibabel (hence MONAI) gives the reoriented array
        shape_ijk = shape_kji[::-1]
        expected = ijk_to_ras @ nib.orientations.inv_ornt_aff(nibabel_ras_transform(ijk_to_ras), shape_ijk)
        np.testing.assert_allclose(affine, expected, atol=1e-9)


def test_network_axes_point_closest_to_r_a_s():
    """An axis-permuted, flipped grid (i → -A, j → S, k → -R) becomes x → R, y → A, z → S."""
    ijk_to_ras = np.array([[0.0, 0.0, -2.0, 5.0], [-0.5, 0.0, 0.0, 6.0], [0.0, 1.5, 0.0, 7.0], [0, 0, 0, 1]])
    orientation = GridOrientation.from_ijk_to_ras(ijk_to_ras, (4, 5, 6))
    assert orientation.ijk_axes == (2, 0, 1) and orientation.flips == (True, True, False)
    assert orientation.shape_xyz == (4, 6, 5)
    directions = orientation.network_affine(ijk_to_ras)[:3, :3]
    assert np.allclose(directions, np.diag([2.0, 0.5, 1.5]))


def test_shape_mismatch_is_refused():
    orientation = GridOrientation.from_ijk_to_ras(np.eye(4), (3, 4, 5))
    with pytest.raises(ValueError):
        orientation.to_network(np.zeros((5, 4, 3)))
    with pytest.raises(ValueError):
        orientation.to_slicer(np.zeros((3, 4, 5)))


# --- Through real MRML nodes ----------------------------------------------------------------------------------

MRML_CASES = [(kind, seed) for kind in KINDS for seed in range(3)]


def mrml_case(kind, seed):
    rng = np.random.default_rng([100 + seed, KINDS.index(kind)])
    shape_kji = (7, 9, 11)
    return rng, random_ijk_to_ras(rng, kind), shape_kji


@pytest.mark.parametrize("kind,seed", MRML_CASES)
def test_volume_node_round_trip(slicer_scene, kind, seed):
    rng, ijk_to_ras, shape_kji = mrml_case(kind, seed)
    scene = slicer_scene.scene
    array_kji = rng.uniform(-500.0, 1500.0, size=shape_kji).astype(np.float32)
    node = add_node(scene, array_kji, ijk_to_ras)
    volume = volume_from_node(node)
    assert volume.name == "volume"
    assert volume.array.shape == volume.orientation.shape_xyz
    np.testing.assert_allclose(volume.ijk_to_ras, ijk_to_ras, atol=1e-9)

    back = add_volume_node(scene, volume.array, volume, "back")
    assert back.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert back.GetName() == "back"
    assert np.array_equal(util.arrayFromVolume(back), array_kji)
    np.testing.assert_allclose(ijk_to_ras_matrix(back), ijk_to_ras, atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), node.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), node.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), np.linalg.norm(ijk_to_ras[:3, :3], axis=0), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), ijk_to_ras[:3, 3], atol=1e-6)
    assert back.GetDisplayNode() is not None


@pytest.mark.parametrize("kind,seed", MRML_CASES[::2])
def test_network_array_and_affine_locate_every_voxel(slicer_scene, kind, seed):
    """Voxel values are their flat (k, j, i) index: volume.affine must send each to its RAS point in the node."""
    _, ijk_to_ras, shape_kji = mrml_case(kind, seed)
    node = add_node(slicer_scene.scene, np.arange(np.prod(shape_kji), dtype=np.float32).reshape(shape_kji),
                    ijk_to_ras)
    volume = volume_from_node(node)
    through_affine, through_node = ras_of_network_voxels(volume.array, volume.affine, shape_kji, ijk_to_ras)
    np.testing.assert_allclose(through_affine, through_node, atol=1e-6)
    # the tensor the network gets is this array
    tensor = volume.as_tensor()
    assert tuple(tensor.shape) == (1, 1) + volume.array.shape and tensor.dtype.is_floating_point
    assert np.array_equal(tensor[0, 0].numpy(), volume.array)


def test_integer_volume_and_parent_transform_are_kept(slicer_scene):
    rng, ijk_to_ras, shape_kji = mrml_case("oblique", 7)
    scene = slicer_scene.scene
    array_kji = rng.integers(-1000, 3000, size=shape_kji).astype(np.int16)
    node = add_node(scene, array_kji, ijk_to_ras)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetAndObserveTransformNodeID(transform.GetID())
    volume = volume_from_node(node)
    assert volume.array.dtype == np.float32
    assert volume.transform_node_id == transform.GetID()
    back = add_volume_node(scene, volume.array, volume, "back", display=False)
    assert back.GetTransformNodeID() == transform.GetID()
    assert back.GetDisplayNode() is None
    assert np.array_equal(util.arrayFromVolume(back), array_kji)


@pytest.mark.parametrize("kind,seed", MRML_CASES[::2])
def test_label_map_round_trip(slicer_scene, kind, seed):
    rng, ijk_to_ras, shape_kji = mrml_case(kind, seed)
    scene = slicer_scene.scene
    volume = volume_from_node(add_node(scene, rng.normal(size=shape_kji).astype(np.float32), ijk_to_ras))
    labels_kji = rng.integers(0, 4, size=shape_kji).astype(np.uint8)
    label_node = add_node(scene, labels_kji, ijk_to_ras, "vtkMRMLLabelMapVolumeNode", "reference")
    labels_xyz = labels_from_node(label_node, volume)
    assert labels_xyz.dtype == np.int64 and labels_xyz.shape == volume.array.shape
    assert np.array_equal(labels_xyz, volume.orientation.to_network(labels_kji))

    back = add_label_map_node(scene, labels_xyz, volume, "back labels", LABELS)
    assert back.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    back_array = util.arrayFromVolume(back)
    assert np.issubdtype(back_array.dtype, np.integer)
    assert np.array_equal(back_array, labels_kji)
    np.testing.assert_allclose(ijk_to_ras_matrix(back), ijk_to_ras, atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), label_node.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), label_node.GetOrigin(), atol=1e-6)
    colors = back.GetDisplayNode().GetColorNode()
    assert colors.GetName() == "back labels colors"
    assert_color_table(colors, LABELS)

    # a given colour table is used as is, not copied
    shared = add_color_table(scene, LABELS, "shared")
    again = add_label_map_node(scene, labels_xyz, volume, "again", LABELS, shared)
    assert again.GetDisplayNode().GetColorNodeID() == shared.GetID()


def assert_color_table(colors, labels):
    assert colors.GetNumberOfColors() == max(label.value for label in labels) + 1
    for label in labels:
        assert colors.GetColorName(label.value) == label.name
        rgba = [0.0] * 4
        colors.GetColor(label.value, rgba)
        np.testing.assert_allclose(rgba[:3], label.color, atol=COLOR_TOLERANCE)
        assert rgba[3] == (0.0 if label.value == 0 else 1.0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("writer", ["write_volume_file", "save_node"])
@pytest.mark.parametrize("right_handed", [True, False], ids=["right-handed", "left-handed"])
def test_volume_and_labels_through_files(slicer_scene, tmp_path, suffix, writer, right_handed):
    rng = np.random.default_rng(11)
    ijk_to_ras, shape_kji = random_ijk_to_ras(rng, "oblique", right_handed=right_handed), (7, 9, 11)
    scene = slicer_scene.scene
    array_kji = rng.uniform(-10.0, 10.0, size=shape_kji).astype(np.float32)
    labels_kji = rng.integers(0, 4, size=shape_kji).astype(np.int16)
    volume = volume_from_node(add_node(scene, array_kji, ijk_to_ras))
    labels_xyz = labels_from_node(add_node(scene, labels_kji, ijk_to_ras, "vtkMRMLLabelMapVolumeNode", "ref"), volume)
    volume_path, labels_path = tmp_path / ("volume" + suffix), tmp_path / ("labels" + suffix)
    if writer == "write_volume_file":
        write_volume_file(volume.array, volume, volume_path)
        write_volume_file(labels_xyz, volume, labels_path, label_map=True)
    else:
        slicer_scene.save_node(add_volume_node(scene, volume.array, volume, "out"), volume_path)
        slicer_scene.save_node(add_label_map_node(scene, labels_xyz, volume, "out labels", LABELS), labels_path)
    tolerance = 1e-5 if suffix == ".nii.gz" else 1e-9  # NIfTI stores the geometry as float32

    reader = type(slicer_scene).standalone()
    volume_back = reader.load_volume(volume_path)
    labels_back = reader.load_volume(labels_path, label_map=True)
    assert volume_back.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert labels_back.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    for node, expected in ((volume_back, array_kji), (labels_back, labels_kji)):
        if right_handed:
            assert np.array_equal(util.arrayFromVolume(node), expected)
            np.testing.assert_allclose(ijk_to_ras_matrix(node), ijk_to_ras, atol=tolerance)
        else:
            # Slicer's (ITK) readers give a left-handed grid a right-handed voxel order (k reversed): every
            # voxel must still be at its RAS point.
            assert_same_voxels_in_space(util.arrayFromVolume(node), ijk_to_ras_matrix(node), expected, ijk_to_ras,
                                        atol=tolerance * 100)
    # and the network sees the same arrays again
    volume_again = volume_from_node(volume_back)
    assert np.array_equal(volume_again.array, volume.array)
    np.testing.assert_allclose(volume_again.affine, volume.affine, atol=tolerance * 100)
    assert np.array_equal(labels_from_node(labels_back, volume_again), labels_xyz)


def segment_masks(slicer_scene, segmentation_node, reference_node):
    """Segment name → (colour, boolean (k, j, i) mask on the reference grid), via Slicer's export."""
    segmentation = segmentation_node.GetSegmentation()
    masks = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        exported = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
        assert slicer_scene.segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, exported,
                                                                             reference_node)
        segment = segmentation.GetSegment(segment_id)
        masks[segment.GetName()] = (tuple(segment.GetColor()), util.arrayFromVolume(exported) > 0)
        slicer_scene.scene.RemoveNode(exported)
    return masks


def rigid_transform_node(scene):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("zyx", (20.0, -10.0, 5.0), degrees=True).as_matrix()
    matrix[:3, 3] = (4.0, -6.0, 9.0)
    transform.SetMatrixTransformToParent(util.vtkMatrixFromArray(matrix))
    return transform


@pytest.mark.parametrize("transformed", [False, True], ids=["", "under a transform"])
@pytest.mark.parametrize("kind", ["axis-aligned", "oblique"])
def test_segmentation_node_has_one_segment_per_present_label(slicer_scene, kind, transformed):
    rng, ijk_to_ras, shape_kji = mrml_case(kind, 3)
    scene = slicer_scene.scene
    source = add_node(scene, rng.normal(size=shape_kji).astype(np.float32), ijk_to_ras)
    if transformed:
        source.SetAndObserveTransformNodeID(rigid_transform_node(scene).GetID())
    volume = volume_from_node(source)
    labels_kji = rng.choice([0, 1, 3], size=shape_kji).astype(np.int16)  # "spleen" (2) is absent
    label_map = add_label_map_node(scene, volume.orientation.to_network(labels_kji), volume, "label map", LABELS)
    segmentation = add_segmentation_node(slicer_scene, label_map, "prediction")
    assert segmentation.GetClassName() == "vtkMRMLSegmentationNode"
    assert segmentation.GetName() == "prediction"
    assert segmentation.GetDisplayNode() is not None
    assert segmentation.GetTransformNodeID() == source.GetTransformNodeID()
    # the segments lie on the label map's grid, in the same (untransformed) coordinates
    for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        labelmap = segmentation.GetSegmentation().GetNthSegment(index).GetRepresentation("Binary labelmap")
        image_to_world = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(image_to_world)
        np.testing.assert_allclose(util.arrayFromVTKMatrix(image_to_world), ijk_to_ras, atol=1e-6)
    masks = segment_masks(slicer_scene, segmentation, label_map)
    present = [label for label in LABELS if label.value in (1, 3)]
    assert sorted(masks) == sorted(label.name for label in present)
    for label in present:
        color, mask = masks[label.name]
        np.testing.assert_allclose(color, label.color, atol=COLOR_TOLERANCE)
        assert np.array_equal(mask, labels_kji == label.value), label.name


def test_segmentation_of_empty_label_map_has_no_segments(slicer_scene):
    _, ijk_to_ras, shape_kji = mrml_case("axis-aligned", 0)
    scene = slicer_scene.scene
    volume = volume_from_node(add_node(scene, np.ones(shape_kji, np.float32), ijk_to_ras))
    label_map = add_label_map_node(scene, np.zeros(volume.array.shape, np.int64), volume, "empty", LABELS)
    segmentation = add_segmentation_node(slicer_scene, label_map, "empty")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


# --- What the adapters refuse ---------------------------------------------------------------------------------

def test_volume_from_node_refuses_a_label_map(slicer_scene):
    node = add_node(slicer_scene.scene, np.zeros((7, 9, 11), np.int16), np.eye(4), "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="scalar volume"):
        volume_from_node(node)


def test_volume_from_node_refuses_nothing_and_other_nodes(slicer_scene):
    with pytest.raises(InputError):
        volume_from_node(None)
    with pytest.raises(InputError):
        volume_from_node(slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segments"))


def test_volume_from_node_refuses_components_outside_a_vector_volume(slicer_scene):
    """A vector (colour) volume's components are channels (test_rgb_volumes.py); a scalar node holding several
    components per voxel is refused."""
    import vtk
    image = vtk.vtkImageData()
    image.SetDimensions(11, 9, 7)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "three components")
    node.SetAndObserveImageData(image)
    with pytest.raises(InputError, match="3 components per voxel but is no vector volume"):
        volume_from_node(node)


def test_volume_from_node_refuses_an_empty_volume(slicer_scene):
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        volume_from_node(node)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_volume_from_node_refuses_nan_and_inf(slicer_scene, bad):
    array = np.zeros((7, 9, 11), np.float32)
    array[3, 4, 5] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        volume_from_node(add_node(slicer_scene.scene, array, np.eye(4)))


def test_labels_from_node_refuses_another_grid(slicer_scene):
    _, ijk_to_ras, shape_kji = mrml_case("oblique", 5)
    scene = slicer_scene.scene
    volume = volume_from_node(add_node(scene, np.zeros(shape_kji, np.float32), ijk_to_ras))
    labels = np.zeros(shape_kji, np.int16)
    other_shape = add_node(scene, np.zeros((7, 9, 10), np.int16), ijk_to_ras, "vtkMRMLLabelMapVolumeNode", "shape")
    with pytest.raises(InputError, match="another grid"):
        labels_from_node(other_shape, volume)
    other_spacing = ijk_to_ras.copy()
    other_spacing[:3, 1] *= 1.01
    with pytest.raises(InputError, match="another grid"):
        labels_from_node(add_node(scene, labels, other_spacing, "vtkMRMLLabelMapVolumeNode", "spacing"), volume)
    other_origin = ijk_to_ras.copy()
    other_origin[:3, 3] += 0.5
    with pytest.raises(InputError, match="another grid"):
        labels_from_node(add_node(scene, labels, other_origin, "vtkMRMLLabelMapVolumeNode", "origin"), volume)
    # the same grid is accepted
    same = add_node(scene, labels, ijk_to_ras, "vtkMRMLLabelMapVolumeNode", "same")
    assert labels_from_node(same, volume).shape == volume.array.shape


def test_labels_from_node_refuses_non_integer_or_negative_labels(slicer_scene):
    scene = slicer_scene.scene
    volume = volume_from_node(add_node(scene, np.zeros((7, 9, 11), np.float32), np.eye(4)))
    fractional = np.zeros((7, 9, 11), np.float32)
    fractional[1, 2, 3] = 1.5
    negative = np.zeros((7, 9, 11), np.int16)
    negative[1, 2, 3] = -1
    for array in (fractional, negative):
        with pytest.raises(InputError, match="non-negative integer"):
            labels_from_node(add_node(scene, array, np.eye(4), "vtkMRMLLabelMapVolumeNode", "bad"), volume)
    with pytest.raises(InputError):
        labels_from_node(None, volume)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_volume_from_node_leaves_the_node_untouched(slicer_scene, dtype):
    rng, ijk_to_ras, shape_kji = mrml_case("random rotation", 2)
    node = add_node(slicer_scene.scene, (rng.normal(size=shape_kji) * 100).astype(dtype), ijk_to_ras)

    def fingerprint():
        array = util.arrayFromVolume(node)
        return (hashlib.sha256(array.tobytes()).hexdigest(), array.dtype, array.shape,
                ijk_to_ras_matrix(node).tobytes(), node.GetName(), node.GetTransformNodeID())

    before = fingerprint()
    volume = volume_from_node(node)
    assert fingerprint() == before
    volume.array[...] = 0.0  # the volume holds a copy
    assert fingerprint() == before
