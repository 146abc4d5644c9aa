"""A model-zoo-style MONAI bundle (Orientation RAS, Spacing 2 mm, NormalizeIntensity nonzero after it, sliding
window, softmax and Invertd) reproduced step by step: medadv's outputs on the input's grid against MONAI's own
preprocessing, inferer and Invertd, on a 1 mm T1 with odd sizes stored in non-RAS and oblique orientations."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from conftest import GEOMETRIES, monai_bundle_run, stored, write_bundle as shared_write_bundle
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.networks.steps import spacing_grid
from MedAdvRobustnessLib.networks.volume import GridOrientation
from MedAdvRobustnessLib.scene.nodes import volume_from_node
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
        "num_res_units": 0}


def write_bundle(root, network, nonzero=True, margin=3, select_fn=None):
    """A model-zoo-style bundle: crop, Spacing 2 mm, z-score after it, padding, 24^3 windows, softmax, Invertd."""
    crop = {"_target_": "CropForegroundd", "source_key": "image", "margin": margin}
    if select_fn:
        crop.update(select_fn=select_fn, channel_indices=0)
    transforms = [crop,
                  {"_target_": "Spacingd", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
                  {"_target_": "NormalizeIntensityd", "nonzero": nonzero}, {"_target_": "DivisiblePadd", "k": 8}]
    postprocessing = [{"_target_": "Activationsd", "softmax": True},
                      {"_target_": "Invertd", "transform": "@preprocessing", "orig_keys": "image",
                       "nearest_interp": False, "to_tensor": True}]
    return shared_write_bundle(root, network, UNET, transforms, (24, 24, 24), postprocessing,
                               {"0": "background", "1": "dark", "2": "bright"})


def monai_probabilities(root, network, image_path):
    """MONAI's own pipeline: preprocessing, inferer, postprocessing (softmax, Invertd back to the file's grid);
    (C, i, j, k) in the file's voxel order, and the network input's size."""
    data = monai_bundle_run(root, network, image_path)
    return np.asarray(data["pred"], dtype=np.float64), tuple(data["image"].shape[1:])


# (NormalizeIntensity nonzero, crop margin, background borders, select_fn). Where resampling meets zero voxels
# (background or padding), MONAI's resampler leaves values of about 1e-13 there, which a later nonzero mask counts:
# medadv's forward values are MONAI's own resampling (its gradient the twin's), so a zero background is taken as
# MONAI takes it. Past the edges the grown box leaves the grid: MONAI pads (allow_smaller=False).
CROPS = {"nonzero after spacing": (True, 0, "none", None),
         "nonzero after spacing, zeros inside": (True, 0, "zero slab inside", None),
         "crop inside the grid, x > 150": (False, 3, "every side", "$lambda x: x > 150"),
         "crop past the edges": (False, 3, "one side", None)}


@pytest.mark.parametrize("crop", sorted(CROPS))
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_bundle_outputs_equal_monai_s_pipeline_and_invertd(tmp_path, t1_crop, geometry, crop):
    torch.manual_seed(0)
    network = UNet(**UNET).eval()
    nonzero, margin, borders, select_fn = CROPS[crop]
    root = write_bundle(tmp_path / "bundle", network, nonzero=nonzero, margin=margin, select_fn=select_fn)
    array, affine = t1_crop
    array = array.copy()
    if borders == "zero slab inside":
        array[:, :, 20:27] = 0.0  # zeros the crop keeps: resampling meets them, the nonzero mask leaves them out
    elif borders != "none":
        array[:12] = 0.0  # background the crop removes
    if borders == "every side":
        array[-12:], array[:, :8], array[:, -8:], array[:, :, :8], array[:, :, -8:] = 0.0, 0.0, 0.0, 0.0, 0.0
    path = stored((array, affine), geometry, tmp_path / "t1.nii.gz")
    expected, monai_network_size = monai_probabilities(root, network, path)

    model = load_model(root)
    assert [list(step)[0] for step in model.description.preprocessing] == ["crop", "spacing", "intensity",
                                                                          "pad_divisible"]
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    with torch.no_grad(), model.on_grid(volume):
        inputs, _ = model.prepare(volume.as_tensor())
        probabilities = model(volume.as_tensor())[0].double().numpy()
    assert model.activation == "softmax"  # the softmax before Invertd is part of the network: probabilities go back
    assert tuple(inputs.shape[2:]) == monai_network_size  # MONAI's crop (padded past the edges), grid and padding
    # MONAI's Invertd gives the file's voxel order; Slicer's reader may store an oblique file with an axis
    # flipped (same anatomy): compare both in the network convention (RAS), where the inputs already agree
    file_grid = GridOrientation.from_ijk_to_ras(nib.load(str(path)).affine, expected.shape[1:][::-1])
    expected = np.stack([file_grid.to_network(np.transpose(channel, (2, 1, 0))) for channel in expected])
    ours = probabilities
    assert ours.shape == expected.shape
    inside = expected.sum(axis=0) > 0.5  # Invertd pads the crop with zero probabilities, and so does medadv
    difference = float(np.abs(ours - expected).max())  # on the whole grid
    agreement = float((ours.argmax(0) == expected.argmax(0)).mean())
    print("{}: network input {}, {:.3f} of the voxels inside the crop, labels agree on {:.5f} of the voxels, "
          "largest probability difference {:.2e}".format(geometry, monai_network_size,
                                                                          inside.mean(), agreement, difference))
    assert (inside.mean() == 1.0) == (borders in ("none", "zero slab inside")) and difference < 1e-4
    assert agreement >= 0.999


def test_spacing_grid_is_monai_s():
    """197 voxels of 1 mm are 99 of 2 mm (the corner voxel centres kept), not 98; halves round to even."""
    assert len(spacing_grid(np.eye(4), (197, 10, 10), (2.0, 1.0, 1.0))[1][0]) == 99
    assert len(spacing_grid(np.eye(4), (98, 10, 10), (2.0, 1.0, 1.0))[1][0]) == 50  # 97 / 2 + 1 = 49.5: even
    assert len(spacing_grid(np.eye(4), (96, 10, 10), (2.0, 1.0, 1.0))[1][0]) == 48  # 95 / 2 + 1 = 48.5: even
    _, forward, backward = spacing_grid(np.eye(4), (5, 4, 4), (2.0, 1.0, 1.0))
    assert list(forward[0]) == [0.0, 2.0, 4.0] and list(backward[0]) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert spacing_grid(np.diag([2.0, 2.0, 2.0, 1.0]), (10, 10, 10), (2.0001, 2.0, 2.0)) is None
    assert spacing_grid(np.diag([2.0, 2.0, 2.0, 1.0]), (10, 10, 10), (2.01, 2.0, 2.0)) is not None


def test_a_transform_without_a_twin_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    root = write_bundle(tmp_path / "bundle", UNet(**UNET).eval())
    config_path = root / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["preprocessing"]["transforms"].insert(3, {"_target_": "RandGaussianNoised", "keys": "image", "prob": 1.0})
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="preprocessing transform RandGaussianNoised has no differentiable twin"):
        load_model(root)
    config["preprocessing"]["transforms"][3] = {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"Orientation\(axcodes=LPS\) is not reproduced"):
        load_model(root)
    transforms = config["preprocessing"]["transforms"]
    del transforms[3]
    spacing = next(index for index, item in enumerate(transforms) if item["_target_"] == "Spacingd")
    orientation = next(index for index, item in enumerate(transforms) if item["_target_"] == "Orientationd")
    transforms.insert(orientation, transforms.pop(spacing))  # older tutorials: Spacingd before Orientationd
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"runs Spacing before Orientation\(d\), in the file's"):
        load_model(root)


@pytest.mark.parametrize("fields, message", [
    ({"spacing": [0, 0, 0]}, "spacing must be three positive numbers"),
    ({"preprocessing": [{"blur": 1.0}]}, "a preprocessing step is one of intensity, crop, spacing, pad_divisible"),
    ({"preprocessing": [{"spacing": [2, 2, 2], "mode": "bicubic"}]}, "spacing mode must be one of bilinear, nearest"),
])
def test_a_model_description_with_steps_that_cannot_run_is_refused(fields, message):
    from MedAdvRobustnessLib.networks.models import ModelDescription
    with pytest.raises(InputError, match="model.json: " + message):
        ModelDescription.from_dict(dict({"name": "tiny"}, **fields), "model.json")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[4].pop("pixdim"), r"transform Spacing has arguments that cannot be read \(no 'pixdim'\)"),
    (lambda t: t[5].update(_target_="ScaleIntensityRanged", a_max=100.0),
     r"transform ScaleIntensityRange has arguments that cannot be read \(no 'a_min'\)"),
    (lambda t: t[5].update(_target_="ScaleIntensityRanged", a_min=0.0, a_max=100.0, b_min=1.0, b_max=0.0,
                           clip=True), r"ScaleIntensityRange\(b_min=1.0 > b_max=0.0 with clip=True\) is not reproduced"),
])
def test_transform_arguments_that_cannot_be_read_are_one_line(tmp_path, edit, message):
    torch.manual_seed(0)
    root = write_bundle(tmp_path / "bundle", UNet(**UNET).eval())
    config_path = root / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    transforms = config["preprocessing"]["transforms"]
    assert [item["_target_"] for item in transforms[3:6]] == ["CropForegroundd", "Spacingd", "NormalizeIntensityd"]
    edit(transforms)
    if transforms[5]["_target_"] == "ScaleIntensityRanged":
        transforms[5].pop("nonzero", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=message):
        load_model(root)


def test_the_module_and_bench_take_a_bundle_and_an_auto3dseg_model(tmp_path, t1_crop, slicer_scene):
    """The module's logic (as the widget drives it) and ``medadv bench`` run a MONAI bundle folder and an Auto3DSeg
    model folder like any other network: segments named by the model's labels, Dice rows per strength."""
    import csv
    from conftest import drive_as_widget
    from test_auto3dseg import CONFIGS, write_checkpoint
    from MedAdvRobustnessLib.module import logic as module_logic
    from MedAdvRobustnessLib.study import execution
    torch.manual_seed(0)
    bundle = write_bundle(tmp_path / "bundle", UNet(**UNET).eval(), nonzero=False)
    auto3dseg, _, _ = write_checkpoint(tmp_path / "auto3dseg", CONFIGS["mri-2mm"][1])
    (auto3dseg / "labels.csv").write_text("LabelValue,Name\n1,csf\n2,grey\n")
    (tmp_path / "cases").mkdir()
    path = stored(t1_crop, "LPS-permuted", tmp_path / "cases" / "case.nii.gz")
    volume = slicer_scene.load_volume(str(path))
    for kind, source, names in (("bundle", bundle, {"dark", "bright"}), ("description", auto3dseg, {"csf", "grey"})):
        settings = module_logic.ProbeSettings(inputVolume=volume, networkKind=kind, networkPath=str(source),
                                              probe="fgsm", epsilons="0.02")
        run, _ = drive_as_widget(slicer_scene, settings, module_logic.start_run)
        segmentation = run.finish()["segmentation"][0.0].GetSegmentation()
        found = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
        assert found and found <= names, (kind, found)
    study = {"networks": [{"name": "bundle", "source": str(bundle)}, {"name": "auto3dseg", "source": str(auto3dseg)}],
             "cases": [str(tmp_path / "cases")], "probes": [{"attack": "fgsm", "epsilons": [0.02]}]}
    execution.run_study(study, tmp_path / "bench")
    with open(str(tmp_path / "bench" / "results.csv")) as stream:
        rows = list(csv.DictReader(stream))
    for network in ("bundle", "auto3dseg"):
        mean = {float(row["strength"]): float(row["dice_clean"]) for row in rows
                if row["network"] == network and row["label"] == "mean"}
        assert mean[0.0] == 1.0 and mean[0.02] <= 1.0, (network, mean)


def test_oblique_zero_background_nonzero_after_spacing_equals_monai(tmp_path, t1_crop):
    """The review's case: an oblique, left-handed 1 mm T1 with zero background, Spacing 2 mm then NormalizeIntensity
    nonzero=True, no crop. Which voxels MONAI's resampler leaves at ~1e-12 (and its nonzero mask counts) depends on
    the last bits of the matrix: medadv takes the file's as nibabel (MONAI) reads it, as ``medadv run`` does."""
    from MedAdvRobustnessLib.pipeline import nifti_voxel_to_ras
    torch.manual_seed(0)
    network = UNet(**UNET).eval()
    transforms = [{"_target_": "Spacingd", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
                  {"_target_": "NormalizeIntensityd", "nonzero": True}]
    postprocessing = [{"_target_": "Activationsd", "softmax": True},
                      {"_target_": "Invertd", "transform": "@preprocessing", "orig_keys": "image",
                       "nearest_interp": False, "to_tensor": True}]
    root = shared_write_bundle(tmp_path / "bundle", network, UNET, transforms, (24, 24, 24), postprocessing,
                               {"0": "background", "1": "dark", "2": "bright"})
    array, affine = t1_crop
    array = np.pad(array, 9)  # zero background around the head, on every side
    path = stored((array, affine), "oblique", tmp_path / "t1.nii.gz")
    image = nib.load(str(path))
    image.set_qform(image.affine, code=1)  # with a qform too, as ITK and Slicer write: its float32 quaternion is
    nib.save(image, str(path))  # what Slicer's reader takes, ~1e-6 from the sform that nibabel (MONAI) takes
    assert np.linalg.det(nib.load(str(path)).affine[:3, :3]) < 0  # left-handed
    expected, _ = monai_probabilities(root, network, path)
    file_grid = GridOrientation.from_ijk_to_ras(nib.load(str(path)).affine, expected.shape[1:][::-1])
    expected = np.stack([file_grid.to_network(np.transpose(channel, (2, 1, 0))) for channel in expected])

    model = load_model(root)
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    model.file_ijk_to_ras = nifti_voxel_to_ras(path)
    with torch.no_grad(), model.on_grid(volume):
        ours = model(volume.as_tensor())[0].double().numpy()
        voxel_map = np.linalg.solve(nib.load(str(path)).affine, model.input_affine)  # network ijk -> file ijk
    assert np.abs(voxel_map - np.round(voxel_map)).max() < 1e-12  # nibabel's matrix, to the last bits
    assert ours.shape == expected.shape
    difference = float(np.abs(ours - expected).max())
    agreement = float((ours.argmax(0) == expected.argmax(0)).mean())
    print("oblique zero background: labels agree on {:.5f} of the voxels, largest probability difference "
          "{:.2e}".format(agreement, difference))
    assert difference < 1e-4 and agreement >= 0.999
