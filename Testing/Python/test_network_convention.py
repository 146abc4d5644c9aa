"""Through Slicer, the network gets exactly the array and affine MONAI's usual loading gives for the same file."""
import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation
from scipy.spatial.transform import Rotation

from MedAdvRobustnessLib.scene.nodes import labels_from_node, volume_from_node
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

SHAPE_IJK = (7, 9, 11)
pytestmark = pytest.mark.filterwarnings("ignore:.*Orientation.__init__.labels.*:FutureWarning")


def affine(directions, spacings, origin):
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions, dtype=np.float64) @ np.diag(spacings)
    matrix[:3, 3] = origin
    return matrix


AFFINES = {
    "RAS": affine(np.eye(3), (1.0, 1.5, 2.0), (-10.0, 20.0, 5.5)),
    "LPS flipped": affine(np.diag([-1.0, -1.0, 1.0]), (0.8, 0.8, 3.0), (40.0, 35.0, -12.0)),
    # i → S, j → L (-R), k → A: permuted, mixed signs, unequal spacings
    "permuted": affine([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], (2.5, 0.7, 1.2), (3.0, -4.0, 60.0)),
    # i → -A, j → -S, k → R, each tilted by some degrees
    "oblique": affine(Rotation.from_euler("xyz", (9.0, -14.0, 6.0), degrees=True).as_matrix()
                      @ [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], (1.1, 0.9, 1.9), (-7.0, 8.0, 9.0)),
}
HEADERS = ("nibabel default", "qform and sform", "qform only")


def write_nifti(path, data, matrix, header):
    image = nib.Nifti1Image(data, matrix)
    if header == "qform and sform":
        image.set_qform(matrix, code=1)
        image.set_sform(matrix, code=1)
    elif header == "qform only":
        image.set_qform(matrix, code=1)
        image.set_sform(None, code=0)
    nib.save(image, str(path))
    return path


def monai_input(path):
    """The network input as a MONAI pipeline loads it: channel first, reoriented to RAS."""
    image = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS")])(str(path))
    return image.numpy(), np.asarray(image.affine, dtype=np.float64)


def slicer_volume(path):
    return volume_from_node(SlicerScene.standalone().load_volume(path))


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_slicer_input_is_monai_input(tmp_path, name, header):
    matrix = AFFINES[name]
    data = np.random.default_rng(sorted(AFFINES).index(name)).normal(100.0, 30.0, size=SHAPE_IJK).astype(np.float32)
    path = write_nifti(tmp_path / "volume.nii.gz", data, matrix, header)
    assert np.allclose(nib.load(str(path)).affine, matrix, atol=1e-5)

    expected, expected_affine = monai_input(path)
    volume = slicer_volume(path)
    network = volume.as_tensor()[0].numpy()
    assert network.shape == expected.shape
    assert network.dtype == expected.dtype == np.float32
    assert np.array_equal(network, expected)
    np.testing.assert_allclose(volume.affine, expected_affine, atol=1e-4)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_node_puts_every_file_voxel_where_the_file_does(tmp_path, name):
    """Slicer's reader may store another voxel order (it flips k of a left-handed file, as "permuted" is), but
    each voxel of the node lies at the RAS point the file gives it."""
    matrix = AFFINES[name]
    data = np.arange(np.prod(SHAPE_IJK), dtype=np.float32).reshape(SHAPE_IJK)
    path = write_nifti(tmp_path / "indices.nii.gz", data, matrix, "nibabel default")
    volume = slicer_volume(path)
    xyz = np.stack(np.meshgrid(*[np.arange(n) for n in volume.array.shape], indexing="ij"), -1).reshape(-1, 3)
    file_ijk = np.stack(np.unravel_index(volume.array.reshape(-1).astype(np.int64), SHAPE_IJK), -1)
    through_node = xyz @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    through_file = file_ijk @ matrix[:3, :3].T + matrix[:3, 3]
    np.testing.assert_allclose(through_node, through_file, atol=1e-4)
    if np.linalg.det(matrix[:3, :3]) > 0:
        np.testing.assert_allclose(volume.ijk_to_ras, matrix, atol=1e-4)


def test_non_ras_files_are_really_reoriented(tmp_path):
    """The cases above are not trivial: the network array differs from the file array except for RAS."""
    for name, matrix in AFFINES.items():
        data = np.arange(np.prod(SHAPE_IJK), dtype=np.float32).reshape(SHAPE_IJK)
        path = write_nifti(tmp_path / "{}.nii.gz".format(name.replace(" ", "_")), data, matrix, "nibabel default")
        network = slicer_volume(path).array
        same = network.shape == data.shape and np.array_equal(network, data)
        assert same == (name == "RAS"), name
    assert slicer_volume(tmp_path / "permuted.nii.gz").array.shape == (9, 11, 7)
    assert slicer_volume(tmp_path / "oblique.nii.gz").array.shape == (11, 7, 9)


@pytest.fixture(scope="module")
def sample_monai():
    return monai_input(SAMPLE_VOLUME), monai_input(SAMPLE_LABELS)


def test_sample_volume_matches_monai(sample_nodes, sample_monai):
    (expected, expected_affine), _ = sample_monai
    volume = volume_from_node(sample_nodes[0])
    network = volume.as_tensor()[0].numpy()
    assert network.shape == expected.shape == (1, 80, 96, 80)
    assert np.array_equal(network, expected)
    np.testing.assert_allclose(volume.affine, expected_affine, atol=1e-4)


def test_sample_labels_match_monai(sample_nodes, sample_monai):
    _, (expected, expected_affine) = sample_monai
    volume = volume_from_node(sample_nodes[0])
    labels = labels_from_node(sample_nodes[1], volume)
    assert labels.shape == expected.shape[1:]
    assert np.array_equal(labels, expected[0].astype(np.int64))
    assert np.array_equal(expected[0], np.rint(expected[0]))
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    np.testing.assert_allclose(volume.affine, expected_affine, atol=1e-4)
