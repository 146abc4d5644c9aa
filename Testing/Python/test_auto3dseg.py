"""MONAI Auto3DSeg SegResNet models (``model.pt`` with ``config`` and ``state_dict``, as the MONAIAuto3DSeg extension
keeps them): medadv's outputs against the extension's pipeline run with MONAI's own transforms, inferer and Invertd
(as its Scripts/auto3dseg_segresnet_inference.py runs them), on a 1 mm T1 stored axis-permuted and flipped."""
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInfererAdapt
from monai.networks.nets import SegResNetDS
from monai.transforms import (Compose, CropForegroundd, EnsureTyped, Invertd, Lambdad, LoadImaged,
                              NormalizeIntensityd, Orientationd, ScaleIntensityRanged, Spacingd)

from conftest import stored
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.networks.volume import GridOrientation
from MedAdvRobustnessLib.scene.nodes import volume_from_node
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

NETWORK = {"_target_": "SegResNetDS", "init_filters": 4, "blocks_down": [1, 1], "in_channels": 1, "out_channels": 3,
           "spatial_dims": 3}
CONFIGS = {
    "mri-2mm": {"normalize_mode": "meanstd", "resample_resolution": [2.0, 2.0, 2.0]},
    "range-within-25-percent": {"normalize_mode": "range", "intensity_bounds": [20.0, 90.0],
                                "resample_resolution": [1.2, 0.9, 1.1]},
    "tanh-no-crop": {"normalize_mode": "meanstdtanh", "crop_foreground": False, "resample_resolution": [1.5, 1.5, 2.0]},
}


def write_checkpoint(folder, overrides):
    """A model folder as MONAIAuto3DSeg keeps it: model.pt holding the training config and the weights."""
    torch.manual_seed(0)
    network = SegResNetDS(**{k: v for k, v in NETWORK.items() if k != "_target_"}).eval()
    config = dict({"network": NETWORK, "orientation_ras": True, "roi_size": [32, 32, 32], "sigmoid": False,
                   "name": "tiny segresnet"}, **overrides)
    folder.mkdir()
    torch.save({"config": config, "state_dict": network.state_dict(), "epoch": 3, "best_metric": 0.5},
               str(folder / "model.pt"))
    return folder, network, config


def extension_pipeline(config):
    """The transforms the extension's inference script composes for ``config``."""
    transforms = [LoadImaged(keys="image", ensure_channel_first=True, dtype=None, image_only=False),
                  EnsureTyped(keys="image", data_type="tensor", dtype=torch.float),
                  Orientationd(keys="image", axcodes="RAS")]
    if config.get("crop_foreground", True):
        transforms.append(CropForegroundd(keys="image", source_key="image", margin=10, allow_smaller=True))
    pixdim = np.asarray(config["resample_resolution"])
    transforms.append(Spacingd(keys="image", pixdim=list(pixdim), mode="bilinear", dtype=torch.float,
                               min_pixdim=pixdim * 0.75, max_pixdim=pixdim * 1.25))
    mode = config["normalize_mode"]
    if mode == "range":
        low, high = config["intensity_bounds"]
        transforms += [ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=-1, b_max=1, clip=False),
                       Lambdad(keys="image", func=torch.sigmoid)]
    else:
        transforms.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
        if mode == "meanstdtanh":
            transforms.append(Lambdad(keys="image", func=lambda x: 3 * torch.tanh(x / 3)))
    return Compose(transforms)


def extension_probabilities(config, network, path):
    """Softmax probabilities on the file's grid (C, i, j, k) as the extension computes them."""
    pipeline = extension_pipeline(config)
    data = pipeline({"image": str(path)})
    inferer = SlidingWindowInfererAdapt(roi_size=config["roi_size"], sw_batch_size=1, overlap=0.625, mode="gaussian")
    with torch.no_grad():
        logits = inferer(inputs=data["image"][None].as_tensor(), network=network)
    probabilities = torch.softmax(logits, dim=1, dtype=torch.double).float()[0]
    data["pred"] = type(data["image"])(probabilities, meta=data["image"].meta,
                                       applied_operations=data["image"].applied_operations)
    inverted = Invertd(keys="pred", orig_keys="image", transform=pipeline, nearest_interp=False)(data)["pred"]
    return np.asarray(inverted, dtype=np.float64), tuple(data["image"].shape[1:])


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_auto3dseg_model_equals_the_extension_s_pipeline(tmp_path, t1_crop, case):
    folder, network, config = write_checkpoint(tmp_path / "model", CONFIGS[case])
    array, affine = t1_crop
    array = array.copy()
    array[:14], array[:, -9:] = 0.0, 0.0  # background for the foreground crop to remove
    path = stored((array, affine), "LPS-permuted", tmp_path / "t1.nii.gz")
    expected, monai_size = extension_probabilities(config, network, path)
    model = load_model(folder)
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    with torch.no_grad(), model.on_grid(volume):
        inputs, _ = model.prepare(volume.as_tensor())
        ours = model(volume.as_tensor())[0].double().numpy()
    assert tuple(inputs.shape[2:]) == monai_size
    file_grid = GridOrientation.from_ijk_to_ras(nib.load(str(path)).affine, expected.shape[1:][::-1])
    expected = np.stack([file_grid.to_network(np.transpose(channel, (2, 1, 0))) for channel in expected])
    inside = expected.sum(axis=0) > 0.5  # Invertd pads the crop with zero probabilities; medadv with background
    difference = float(np.abs(ours - expected)[:, inside].max())
    agreement = float((ours.argmax(0) == expected.argmax(0)).mean())
    print("{}: network input {}, labels agree on {:.5f} of the voxels, largest probability difference inside the "
          "crop {:.2e}".format(case, monai_size, agreement, difference))
    assert difference < 1e-4 and agreement >= 0.999


def test_auto3dseg_settings_that_are_not_reproduced_are_refused(tmp_path):
    folder, _, _ = write_checkpoint(tmp_path / "native", {"normalize_mode": "meanstd", "orientation_ras": False})
    with pytest.raises(InputError, match="without orientation_ras"):
        load_model(folder)
    folder, _, _ = write_checkpoint(tmp_path / "pet", {"normalize_mode": "pet"})
    with pytest.raises(InputError, match="normalize_mode 'pet' is not reproduced"):
        load_model(folder)
    folder, _, _ = write_checkpoint(tmp_path / "code", {"normalize_mode": "meanstd",
                                                        "network": dict(NETWORK, init_filters="$4")})
    with pytest.raises(InputError, match="--trust-checkpoint"):
        load_model(folder)


def test_an_auto3dseg_model_is_attacked_through_its_pipeline(tmp_path, t1_crop):
    from MedAdvRobustnessLib.evaluation.sweep import run_sweep
    from MedAdvRobustnessLib.probes.registry import make_probe
    folder, _, _ = write_checkpoint(tmp_path / "model", CONFIGS["mri-2mm"])
    volume = volume_from_node(SlicerScene.standalone().load_volume(
        str(stored(t1_crop, "LPS-permuted", tmp_path / "t1.nii.gz"))))
    model = load_model(folder)
    with model.on_grid(volume):
        result = run_sweep(model, volume, make_probe("pgd", steps=2), [0.02])
    low, high = volume.intensity_range
    delta = result.outcomes[1].probed.astype(np.float64) - volume.array
    assert 0 < np.abs(delta).max() <= 0.02 * (high - low) * (1 + 1e-6)
    assert result.mean_dice(0.02, "clean") < 1.0
