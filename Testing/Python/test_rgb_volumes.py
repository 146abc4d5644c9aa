"""Colour images in the scene: an RGB vector volume node (as Slicer loads a PNG or JPG: one slice, three unsigned
char components) read as a three-channel volume and written back with its geometry and channels, a three-channel
classifier attacked on it, and a colour image refused by a one-channel network in one line.

Real MRML (slicer-core), a real torch network built here and the shipped demo classifier.
"""
import numpy as np
import pytest
import torch
from slicer import util

from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.evaluation.sweep import run_sweep
from MedAdvRobustnessLib.networks.models import describe, load_model
from MedAdvRobustnessLib.pipeline import add_nodes_or_nothing
from MedAdvRobustnessLib.probes.registry import make_probe
from MedAdvRobustnessLib.scene.nodes import add_volume_node, ijk_to_ras_of, volume_from_node

SIZE_IJ = (30, 20)  # i (columns), j (rows) of the image
# Slicer's matrix for a PNG (LPS directions, spacing 1) and an oblique one with unequal spacings
PNG_MATRIX = np.diag([-1.0, -1.0, 1.0, 1.0])
OBLIQUE_MATRIX = np.array([[0.0, -0.7, 0.1, 12.0], [0.9, 0.0, 0.0, -30.5], [0.0, 0.05, 1.0, 4.0],
                           [0.0, 0.0, 0.0, 1.0]])


def colour_pixels(seed=0):
    """(k, j, i, RGB) unsigned char pixels of a one-slice colour image, as Slicer's arrayFromVolume gives them."""
    return np.random.default_rng(seed).integers(0, 256, (1, SIZE_IJ[1], SIZE_IJ[0], 3), dtype=np.uint8)


def add_colour_node(scene, pixels, matrix, name="colour image"):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    util.updateVolumeFromArray(node, pixels)
    node.SetIJKToRASMatrix(util.vtkMatrixFromArray(matrix))
    node.CreateDefaultDisplayNodes()
    return node


def add_scalar_node(scene, pixels_kji, matrix, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    util.updateVolumeFromArray(node, pixels_kji)
    node.SetIJKToRASMatrix(util.vtkMatrixFromArray(matrix))
    return node


@pytest.mark.parametrize("matrix", [PNG_MATRIX, OBLIQUE_MATRIX], ids=["png", "oblique"])
def test_a_colour_node_reads_as_three_channels_and_writes_back_exactly(slicer_scene, matrix):
    scene, pixels = slicer_scene.scene, colour_pixels()
    node = add_colour_node(scene, pixels, matrix)
    volume = volume_from_node(node)
    assert volume.channels == 3 and volume.array.dtype == np.float32
    for channel in range(3):  # each channel as that component alone would read as a scalar volume
        alone = volume_from_node(add_scalar_node(scene, pixels[..., channel], matrix, "channel {}".format(channel)))
        np.testing.assert_array_equal(volume.array[channel], alone.array)
    np.testing.assert_array_equal(util.arrayFromVolume(node), pixels)  # the input is not modified

    back = add_volume_node(scene, volume.array, volume, "colour image back")
    assert back.IsA("vtkMRMLVectorVolumeNode") and back.GetImageData().GetNumberOfScalarComponents() == 3
    assert back.GetImageData().GetDimensions() == node.GetImageData().GetDimensions() == SIZE_IJ + (1,)
    np.testing.assert_array_equal(ijk_to_ras_of(back), ijk_to_ras_of(node))
    np.testing.assert_array_equal(util.arrayFromVolume(back), pixels.astype(np.float32))


def three_channel_classifier(classes=3, seed=0):
    """A tiny RGB classifier on one-slice volumes: a (3, 3, 1) convolution, pooling and a linear layer."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(3, 4, (3, 3, 1), padding=(1, 1, 0)), torch.nn.Tanh(),
                               torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(4, classes)).eval()


def test_a_three_channel_classifier_attacked_on_a_colour_image_writes_colour_nodes_on_its_grid(slicer_scene):
    node = add_colour_node(slicer_scene.scene, colour_pixels(seed=1), OBLIQUE_MATRIX)
    volume = volume_from_node(node)
    with pytest.warns(UserWarning, match="plain torch.nn.Module"):
        model = load_model(three_channel_classifier())
    assert model.description.in_channels == 3  # the network's own first convolution, not the default 1
    epsilon = 0.05
    result = run_sweep(model, volume, make_probe("fgsm"), [epsilon])
    assert result.task == "classification"
    nodes = add_nodes_or_nothing(slicer_scene, result)

    adversarial, perturbation = nodes["probed"][epsilon], nodes["perturbation"][epsilon]
    for written in (adversarial, perturbation):
        assert written.IsA("vtkMRMLVectorVolumeNode"), written.GetClassName()
        assert written.GetImageData().GetNumberOfScalarComponents() == 3
        assert written.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
        np.testing.assert_array_equal(ijk_to_ras_of(written), ijk_to_ras_of(node))
    np.testing.assert_array_equal(volume_from_node(adversarial).array, result.outcomes[1].probed)
    change = util.arrayFromVolume(adversarial) - util.arrayFromVolume(node).astype(np.float32)
    budget = epsilon * 255.0 * (1 + 1e-6)
    assert 0 < np.abs(change).max() <= budget
    np.testing.assert_allclose(util.arrayFromVolume(perturbation), change, atol=1e-3)
    assert all(np.abs(change[..., channel]).max() > 0 for channel in range(3))  # every channel is attacked
    saliency = nodes["saliency"]
    assert not saliency.IsA("vtkMRMLVectorVolumeNode") and saliency.GetImageData().GetNumberOfScalarComponents() == 1
    np.testing.assert_array_equal(ijk_to_ras_of(saliency), ijk_to_ras_of(node))


def test_a_colour_image_given_to_a_one_channel_network_is_one_line_naming_both_counts(slicer_scene):
    volume = volume_from_node(add_colour_node(slicer_scene.scene, colour_pixels(seed=2), PNG_MATRIX))
    model = load_model("demo-classifier")
    with model.on_grid(volume), pytest.raises(InputError) as refused:
        describe(model, volume)
    assert str(refused.value) == "the network takes 1 input channel(s) but the volume has 3"


def test_a_diffusion_or_tensor_volume_is_no_colour_image(slicer_scene):
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "tensors")
    with pytest.raises(InputError, match="must be a scalar volume or a colour \\(vector\\) volume, got "
                                         "vtkMRMLDiffusionTensorVolumeNode"):
        volume_from_node(node)


def test_the_module_runs_a_torchscript_colour_classifier_on_a_colour_node(slicer_scene, tmp_path):
    from conftest import drive_as_widget
    from MedAdvRobustnessLib.module import logic as module_logic
    path = tmp_path / "rgb-classifier.pt"
    torch.jit.save(torch.jit.script(three_channel_classifier(seed=2)), str(path))
    node = add_colour_node(slicer_scene.scene, colour_pixels(seed=3), PNG_MATRIX)
    settings = module_logic.ProbeSettings(inputVolume=node, networkKind="torchscript", networkPath=str(path),
                                          probe="fgsm", epsilons="0.02", trueClass="1")
    run, _ = drive_as_widget(slicer_scene, settings, module_logic.start_run)
    nodes = run.finish()
    adversarial = nodes["probed"][0.02]
    assert adversarial.IsA("vtkMRMLVectorVolumeNode") and adversarial.GetImageData().GetNumberOfScalarComponents() == 3
    np.testing.assert_array_equal(ijk_to_ras_of(adversarial), PNG_MATRIX)
    table = nodes["metrics"].GetTable()
    assert table.GetColumnByName("label").GetValue(0) == 1
    assert nodes["status"].startswith("clean: {} (p ".format(table.GetColumnByName("predicted_name").GetValue(0)))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_medadv_run_attacks_a_colour_file_and_writes_colour_files_on_its_grid(slicer_scene, tmp_path, suffix):
    import subprocess
    import nibabel as nib
    from conftest import MEDADV
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
    model = tmp_path / "rgb-classifier.pt"
    torch.jit.save(torch.jit.script(three_channel_classifier(seed=4)), str(model))
    image = tmp_path / ("colour" + suffix)
    angle = np.radians(12.0)  # an oblique grid with orthogonal axes, as scanners and files store them
    matrix = np.array([[-np.cos(angle) * 0.8, np.sin(angle) * 0.5, 0.0, 12.0],
                       [-np.sin(angle) * 0.8, -np.cos(angle) * 0.5, 0.0, -30.5], [0.0, 0.0, 2.0, 4.0], [0, 0, 0, 1.0]])
    slicer_scene.save_node(add_colour_node(slicer_scene.scene, colour_pixels(seed=5), matrix), image)
    before = image.read_bytes()
    out = tmp_path / "run"
    completed = subprocess.run([MEDADV, "run", "--volume", str(image), "--model", str(model), "--label", "2",
                                "--attack", "fgsm", "--epsilon", "0.05", "--out", str(out), "--quiet"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert image.read_bytes() == before
    read = SlicerScene.standalone()
    original = volume_from_node(read.load_volume(str(image)))
    written = volume_from_node(read.load_volume(str(out / "adversarial_0.05.nrrd")))  # colour results: NRRD
    assert written.channels == 3 and written.array.shape == original.array.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
    change = np.abs(written.array - original.array)
    assert 0 < change.max() <= 0.05 * 255.0 * (1 + 1e-5)
    assert nib.load(str(out / "saliency.nii.gz")).shape[:3] == (SIZE_IJ[0], SIZE_IJ[1], 1)
