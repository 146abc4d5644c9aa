"""Helpers for the geometry tests: random IJK-to-RAS matrices and volume nodes built with slicer.util."""
import itertools

import numpy as np
from scipy.spatial.transform import Rotation
from slicer import util

KINDS = ("axis-aligned", "oblique", "random rotation")
SIGNED_PERMUTATIONS = [np.diag(signs)[:, list(order)]
                       for order in itertools.permutations(range(3))
                       for signs in itertools.product((1.0, -1.0), repeat=3)]


def random_ijk_to_ras(rng, kind, max_oblique_degrees=25.0, right_handed=None):
    """A 4×4 IJK-to-RAS matrix: spacings in [0.3, 3] mm, any axis permutation and flips, optionally oblique;
    ``right_handed`` True/False forces the sign of the determinant by flipping i if needed."""
    permutation = SIGNED_PERMUTATIONS[rng.integers(len(SIGNED_PERMUTATIONS))]
    if kind == "axis-aligned":
        rotation = permutation
    elif kind == "oblique":
        tilt = Rotation.from_rotvec(_random_unit(rng) * np.radians(rng.uniform(1.0, max_oblique_degrees)))
        rotation = tilt.as_matrix() @ permutation
    elif kind == "random rotation":
        rotation = Rotation.random(random_state=int(rng.integers(2 ** 31))).as_matrix() @ permutation
    else:
        raise ValueError(kind)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(rng.uniform(0.3, 3.0, size=3))
    matrix[:3, 3] = rng.uniform(-100.0, 100.0, size=3)
    if right_handed is not None and (np.linalg.det(matrix[:3, :3]) > 0) != right_handed:
        matrix[:3, 0] *= -1.0
    return matrix


def random_shape_kji(rng, low=2, high=8):
    """Three distinct sizes, so that any mixed-up axis changes the shape."""
    return tuple(int(n) for n in rng.choice(np.arange(low, high + 1), size=3, replace=False))


def add_node(scene, array_kji, ijk_to_ras, node_class="vtkMRMLScalarVolumeNode", name="volume"):
    """A volume node made the way Slicer scripts make one: updateVolumeFromArray + SetIJKToRASMatrix."""
    node = scene.AddNewNodeByClass(node_class, name)
    util.updateVolumeFromArray(node, array_kji)
    node.SetIJKToRASMatrix(util.vtkMatrixFromArray(ijk_to_ras))
    return node


def ijk_to_ras_matrix(node):
    import vtk
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return util.arrayFromVTKMatrix(matrix)


def network_view(array_kji, ijk_to_ras):
    """The (x, y, z) array and affine the network gets: the same for any two grids that put the same voxels at
    the same RAS points, whatever their voxel order."""
    from MedAdvRobustnessLib.networks.volume import GridOrientation
    orientation = GridOrientation.from_ijk_to_ras(ijk_to_ras, array_kji.shape)
    return orientation.to_network(array_kji), orientation.network_affine(ijk_to_ras)


def assert_same_voxels_in_space(array_kji, ijk_to_ras, expected_kji, expected_ijk_to_ras, atol=1e-6):
    array, affine = network_view(array_kji, ijk_to_ras)
    expected, expected_affine = network_view(expected_kji, expected_ijk_to_ras)
    assert array.shape == expected.shape
    assert np.array_equal(array, expected)
    np.testing.assert_allclose(affine, expected_affine, atol=atol)


def ras_of_network_voxels(volume_array_xyz, affine, shape_kji, ijk_to_ras):
    """For a network array whose voxel values are the flat (k, j, i) indices of a Slicer array: the RAS point of
    every (x, y, z) voxel through ``affine`` and of the same voxel through the node's ``ijk_to_ras``."""
    xyz = np.stack(np.meshgrid(*[np.arange(n) for n in volume_array_xyz.shape], indexing="ij"), -1).reshape(-1, 3)
    flat = np.rint(volume_array_xyz.reshape(-1)).astype(np.int64)
    kji = np.stack(np.unravel_index(flat, shape_kji), -1)
    ijk = kji[:, ::-1]
    through_affine = xyz @ affine[:3, :3].T + affine[:3, 3]
    through_node = ijk @ np.asarray(ijk_to_ras)[:3, :3].T + np.asarray(ijk_to_ras)[:3, 3]
    return through_affine, through_node


def _random_unit(rng):
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)
