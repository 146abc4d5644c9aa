"""The twins of MONAI's SpatialPad, CenterSpatialCrop and Resize, each against MONAI's own transform (output,
affine and the way back as ``Invertd(nearest_interp=False)`` inverts it) on an odd-sized volume with anisotropic
voxels and an oblique, axis-flipped affine; a small bundle with all three against MONAI's own preprocessing,
inferer and Invertd; and ``skip_untwinned``, which loads a bundle without the transforms that have no twin."""
import inspect
import json
from copy import deepcopy

import monai.transforms
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import UNet

from conftest import GEOMETRIES, SOFTMAX_INVERTD, rotation, stored, write_bundle
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.bundles import _twin, load_bundle, transform_name
from MedAdvRobustnessLib.networks.models import ModelDescription, describe, load_model
from MedAdvRobustnessLib.networks.steps import AFFINE_TOL, apply_step, step_text
from MedAdvRobustnessLib.networks.volume import GridOrientation
from MedAdvRobustnessLib.scene.nodes import volume_from_node
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

SHAPE = (13, 10, 7)
UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
        "num_res_units": 0}
LABELS = {"0": "background", "1": "dark", "2": "bright"}


def oblique_affine():
    """Voxels of 1.5 x 0.8 x 2.2 mm, the second axis flipped, rotated 12 degrees about x and -7 about z."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(12.0, 0) @ rotation(-7.0, 2) @ np.diag([1.5, -0.8, 2.2])
    affine[:3, 3] = [-20.0, 31.0, 7.5]
    return affine


def twin_step(target, **settings):
    """The step the bundle reader makes of ``target`` (a dictionary transform) with ``settings``: its arguments
    with the defaults of the transform's signature, as the reader resolves them."""
    args = {name: getattr(parameter.default, "value", parameter.default)
            for name, parameter in inspect.signature(getattr(monai.transforms, target)).parameters.items()
            if parameter.default is not inspect.Parameter.empty}
    args.update(settings, keys="image")
    steps = _twin(transform_name(target), args, "test")
    assert len(steps) == 1
    return steps[0]


CASES = {  # dictionary transform and its settings; the array transform is the same without the d
    "pad symmetric": ("SpatialPadd", {"spatial_size": [16, -1, 10]}),
    "pad end, value": ("SpatialPadd", {"spatial_size": [15, 12, 4], "method": "end", "value": 2.5}),
    "pad one size": ("SpatialPadd", {"spatial_size": 12}),
    "divisible pad": ("DivisiblePadd", {"k": [4, 3, 5]}),
    "divisible pad one k": ("DivisiblePadd", {"k": 8}),
    "centre crop": ("CenterSpatialCropd", {"roi_size": [8, -1, 5]}),
    "centre crop larger than the grid": ("CenterSpatialCropd", {"roi_size": [11, 20, 4]}),
    "centre crop one size": ("CenterSpatialCropd", {"roi_size": 6}),
    "resize trilinear": ("Resized", {"spatial_size": [17, 6, -1], "mode": "trilinear"}),
    "resize trilinear align_corners": ("Resized", {"spatial_size": [17, 6, 9], "mode": "trilinear",
                                                   "align_corners": True}),
    "resize linear to one voxel": ("Resized", {"spatial_size": [5, 1, 9], "mode": "bilinear",
                                               "align_corners": True}),
    "resize area": ("Resized", {"spatial_size": [6, 14, 4]}),  # area: MONAI's default mode
    "resize nearest": ("Resized", {"spatial_size": [9, 13, 5], "mode": "nearest"}),
    "resize nearest-exact": ("Resized", {"spatial_size": [9, 13, 5], "mode": "nearest-exact"}),
    "resize longest": ("Resized", {"spatial_size": 20, "size_mode": "longest", "mode": "trilinear"}),
    # Spacing: 1.5 x 0.8 x 2.2 mm voxels to these; 0.75 x 0.4 x 1.1 puts every other output voxel half-way
    "spacing bilinear": ("Spacingd", {"pixdim": [2.0, 0.5, 1.7]}),
    "spacing nearest": ("Spacingd", {"pixdim": [2.0, 0.5, 1.7], "mode": "nearest"}),
    "spacing nearest, ties": ("Spacingd", {"pixdim": [0.75, 0.4, 1.1], "mode": "nearest"}),
    "spacing nearest float32, ties": ("Spacingd", {"pixdim": [0.75, 0.4, 1.1], "mode": "nearest",
                                                   "dtype": "float32"}),
    "spacing zeros": ("Spacingd", {"pixdim": [2.0, 0.5, 1.7], "padding_mode": "zeros"}),
    "spacing zeros nearest": ("Spacingd", {"pixdim": [2.0, 0.5, 1.7], "padding_mode": "zeros", "mode": "nearest"}),
    # 7 x 4.7 x 5.2 mm: the last output voxel lies 2, 2.75 and 1.1 input voxels past the grid's last
    "spacing reflection": ("Spacingd", {"pixdim": [7.0, 4.7, 5.2], "padding_mode": "reflection"}),
    "spacing reflection align_corners": ("Spacingd", {"pixdim": [7.0, 4.7, 5.2], "padding_mode": "reflection",
                                                      "align_corners": True}),
    "spacing zeros far outside": ("Spacingd", {"pixdim": [7.0, 4.7, 5.2], "padding_mode": "zeros"}),
    "spacing reflection nearest": ("Spacingd", {"pixdim": [7.0, 4.7, 5.2], "padding_mode": "reflection",
                                                "mode": "nearest"}),
    "spacing align_corners": ("Spacingd", {"pixdim": [2.0, 0.5, 1.7], "align_corners": True}),
    "spacing scale_extent": ("Spacingd", {"pixdim": [2.0, 0.5, 1.7], "scale_extent": True,
                                          "align_corners": True}),
    "spacing scale_extent zeros": ("Spacingd", {"pixdim": [2.0, 0.5, 1.7], "scale_extent": True,
                                                "padding_mode": "zeros"}),
    "spacing scale_extent nearest": ("Spacingd", {"pixdim": [0.75, 0.4, 1.1], "scale_extent": True,
                                                  "mode": "nearest", "align_corners": True}),
}


def against_monai(target, settings, shape=SHAPE, affine=None):
    """The twin of transform ``target`` with ``settings`` and MONAI's transform on the same MetaTensor (a seeded
    volume of ``shape``, voxel-to-RAS ``affine``, the oblique one by default), and the way back of three-channel
    outputs against MONAI's inverse with its record: (MONAI's output, the twin's step, whether the twin changed the
    grid, largest differences of affine, values and way back)."""
    affine = oblique_affine() if affine is None else affine
    generator = torch.Generator().manual_seed(0)
    array = torch.rand((1,) + tuple(shape), generator=generator) * 300.0 - 50.0
    image = MetaTensor(array.clone(), affine=torch.as_tensor(affine))
    transform = getattr(monai.transforms, target[:-1])(**settings)
    expected = transform(image)
    step = twin_step(target, **settings)
    # sigmoid outputs: the crop's outputs are padded back with zeros, as Invertd pads (see the bundle test)
    # Spacing resamples in float64 (its dtype) and stores float32: the twin in float64 is within half a float32 step
    double = target == "Spacingd" and settings.get("dtype", "float64") == "float64"
    inputs, new_affine, back, _ = apply_step(step, (array.double() if double else array)[None], affine, "sigmoid")
    assert tuple(inputs.shape[1:]) == tuple(expected.shape)
    affine_difference = float(np.abs(np.asarray(new_affine) - expected.affine.numpy()).max())
    value_difference = float((inputs[0] - expected.as_tensor().to(inputs.dtype)).abs().max())
    outputs = torch.rand((3,) + tuple(expected.shape[1:]), generator=generator)
    recorded = MetaTensor(outputs.clone(), meta=deepcopy(expected.meta),
                          applied_operations=deepcopy(expected.applied_operations))
    monai_back = transform.inverse(recorded)
    ours_back = outputs[None] if back is None else back(outputs[None])
    assert tuple(ours_back.shape[1:]) == tuple(monai_back.shape) == (3,) + tuple(shape)
    back_difference = float((ours_back[0] - monai_back.as_tensor()).abs().max())
    return expected, step, back is not None, (affine_difference, value_difference, back_difference)


@pytest.mark.parametrize("case", list(CASES))
def test_twin_equals_monai_s_transform_and_its_inverse(case):
    target, settings = CASES[case]
    expected, step, _, differences = against_monai(target, settings)
    print("{}: {} -> {}, affine {:.1e}, values {:.1e}, way back {:.1e} ({})".format(
        case, SHAPE, tuple(expected.shape[1:]), *differences, step_text(step)))
    assert differences[0] < 1e-12 and differences[1] < 1e-5 and differences[2] < 1e-5


def voxel_matrix(spacings, angles=(12.0, -7.0)):
    """The second-axis-flipped matrix of :func:`oblique_affine` with other voxel sizes (and rotation angles about
    x and z)."""
    affine = oblique_affine()
    affine[:3, :3] = (rotation(angles[0], 0) @ rotation(angles[1], 2)
                      @ np.diag(np.asarray(spacings) * [1.0, -1.0, 1.0]))
    return affine


NEAR_TARGET = {  # voxel sizes (mm), grid, the target's voxel sizes over these, whether MONAI resamples
    # Spacing keeps an axis's spacing within AFFINE_TOL mm of the target: 0.75, 0.4 and 1.1e-3 mm off here
    "0.05 % off": ((1.5, 0.8, 2.2), SHAPE, (1.0005, 0.9995, 1.0005), False),
    "0.1 % off on 1201 voxels of 1 mm": ((1.5, 0.8, 1.0), (3, 2, 1201), (1.0, 1.0, 1.0009), False),
    # 1.5e-3 mm off, but SpatialResample's voxel map scale 1.001008 is within AFFINE_TOL + 1e-5 of 1
    "0.1008 % off: the voxel map within tolerance": ((1.5, 0.8, 2.2), SHAPE, (1.001008, 1.0, 1.0), False),
    "0.102 % off": ((1.5, 0.8, 2.2), SHAPE, (1.00102, 1.0, 1.0), True),
    "0.2 % off": ((1.5, 0.8, 2.2), SHAPE, (1.002, 0.998, 1.0), True),
    # 1.2e-3 mm off, the map 1.0012, but rotated 45 and 35 degrees no entry of the matrices is 1e-3 off
    "0.12 % off, very oblique: the matrices within tolerance": ((1.0, 1.0, 1.0), SHAPE, (1.0012,) * 3, False),
    "0.3 % off, very oblique": ((1.0, 1.0, 1.0), SHAPE, (1.003,) * 3, True),
    # the voxel map within tolerance, but 1200 x 2.2 mm / 2.202 mm is 1198.9: one voxel fewer, so resampled
    "0.09 % off on 1201 voxels of 2.2 mm": ((1.5, 0.8, 2.2), (3, 2, 1201), (1.0, 1.0, 1.0009), True),
}


@pytest.mark.parametrize("scale_extent", [False, True])
@pytest.mark.parametrize("case", list(NEAR_TARGET))
def test_spacing_resamples_exactly_where_monai_s_does(case, scale_extent):
    """MONAI's SpatialResample keeps the image where the new grid has the same size and its matrix, or the voxel
    map to it, is within allclose(atol=AFFINE_TOL) of the old: the twin keeps it exactly there."""
    spacings, shape, factors, resampled = NEAR_TARGET[case]
    affine = voxel_matrix(spacings, (45.0, 35.0) if "very oblique" in case else (12.0, -7.0))
    settings = {"pixdim": [s * f for s, f in zip(spacings, factors)], "align_corners": scale_extent,
                "scale_extent": scale_extent}
    expected, step, changed, differences = against_monai("Spacingd", settings, shape, affine)
    monai_kept = tuple(expected.shape[1:]) == tuple(shape) and np.array_equal(expected.affine.numpy(), affine)
    print("{}{}: {} -> {}, MONAI {}, affine {:.1e}, values {:.1e}, way back {:.1e}".format(
        case, ", scale_extent" if scale_extent else "", shape, tuple(expected.shape[1:]),
        "keeps the image" if monai_kept else "resamples", *differences))
    assert AFFINE_TOL == monai.data.utils.AFFINE_TOL
    assert monai_kept == (not resampled) and changed == resampled
    assert differences[0] < 1e-12 and differences[1] < 1e-5 and differences[2] < 1e-5


def test_the_twins_are_differentiable():
    volume = torch.rand((1, 1) + SHAPE, dtype=torch.float64, requires_grad=True)
    for case in ("pad end, value", "centre crop", "resize trilinear", "resize area", "spacing zeros",
                 "spacing reflection", "spacing zeros nearest", "spacing scale_extent"):
        step = twin_step(*CASES[case][:1], **CASES[case][1])
        inputs, _, back, _ = apply_step(step, volume, oblique_affine(), "softmax")
        outputs = inputs if back is None else back(torch.cat([inputs, inputs], dim=1))
        gradient, = torch.autograd.grad(outputs.square().sum(), volume)
        assert gradient.abs().sum() > 0, case


@pytest.mark.parametrize("target, settings, refused", [
    ("Resized", {"spatial_size": [8, 8, 8], "mode": "bicubic"}, r"Resize\(mode=bicubic\)"),
    ("Resized", {"spatial_size": [8, 8, 8], "mode": "trilinear", "anti_aliasing": True},
     r"Resize\(anti_aliasing=True\)"),
    ("Resized", {"spatial_size": [8, 8, 8], "mode": "area", "align_corners": True},
     r"Resize\(mode=area, align_corners=True\)"),
    ("Resized", {"spatial_size": [8, 8, 8], "mode": "trilinear", "dtype": "float16"}, r"Resize\(dtype=float16\)"),
    ("Resized", {"spatial_size": [8, 8], "mode": "trilinear"}, r"Resize\(spatial_size=\[8, 8\]\)"),
    ("Resized", {"spatial_size": [8, 8, 8], "size_mode": "longest"}, r"Resize\(size_mode=longest"),
    ("SpatialPadd", {"spatial_size": [16, 16, 16], "mode": "reflect"}, r"SpatialPad\(mode=reflect\)"),
    ("SpatialPadd", {"spatial_size": [16, 16, 16], "constant_values": 3}, r"SpatialPad\(constant_values=3\)"),
    ("SpatialPadd", {"spatial_size": [16, 16, 16], "lazy": True}, r"SpatialPad\(lazy=True\)"),
    ("CenterSpatialCropd", {"roi_size": [8.5, 8, 8]}, r"CenterSpatialCrop\(roi_size=\[8.5, 8, 8\]\)"),
    ("Spacingd", {"pixdim": [2.0, 2.0, 2.0], "mode": 3}, r"Spacing\(mode=3\)"),
    ("Spacingd", {"pixdim": [2.0, 2.0, 2.0], "padding_mode": "reflect"}, r"Spacing\(padding_mode=reflect\)"),
    ("Spacingd", {"pixdim": [2.0, 2.0, 2.0], "diagonal": True}, r"Spacing\(diagonal=True\)"),
    ("Spacingd", {"pixdim": [2.0, 2.0, 2.0], "recompute_affine": True}, r"Spacing\(recompute_affine=True\)"),
    ("Spacingd", {"pixdim": [2.0, 2.0, 2.0], "dtype": "float16"}, r"Spacing\(dtype=float16\)"),
    ("CropForegroundd", {"k_divisible": [4, 0, 4]}, r"CropForeground\(k_divisible=\[4, 0, 4\]\)"),
    ("CropForegroundd", {"select_fn": "$lambda x: x.abs() > 10"},
     r"CropForeground\(select_fn=\$lambda x: x.abs\(\) > 10\)"),
    ("CropForegroundd", {"select_fn": "$lambda x: (x > 1) & (x < 5)"},
     r"CropForeground\(select_fn=\$lambda x: \(x > 1\) & \(x < 5\)\)"),
    ("CropForegroundd", {"select_fn": "$lambda x: y > 1"}, r"CropForeground\(select_fn=\$lambda x: y > 1\)"),
    ("CropForegroundd", {"select_fn": "$lambda x: x > 1 or True"},
     r"CropForeground\(select_fn=\$lambda x: x > 1 or True\)"),
    ("CropForegroundd", {"channel_indices": [0, -1]}, r"CropForeground\(channel_indices=\[0, -1\]\)"),
    ("CropForegroundd", {"mode": "reflect"}, r"CropForeground\(mode=reflect\)"),
    ("NormalizeIntensityd", {"dtype": "float16"}, r"NormalizeIntensity\(dtype=float16\)"),
    ("NormalizeIntensityd", {"subtrahend": [1.0, 2.0]},
     r"NormalizeIntensity\(subtrahend=\[1.0, 2.0\], channel_wise=False\)"),
    ("ScaleIntensityRanged", {"a_min": 5, "a_max": 5}, r"ScaleIntensityRange\(a_min=a_max=5\)"),
])
def test_settings_without_an_exact_twin_are_refused_by_name(target, settings, refused):
    with pytest.raises(InputError, match="bundle test: " + refused + ".* is not reproduced"):
        twin_step(target, **settings)


@pytest.mark.parametrize("fields, message", [
    ({"preprocessing": [{"pad_size": [16, 16]}]}, "pad_size must be three whole numbers"),
    ({"preprocessing": [{"pad_size": 16, "method": "start"}]}, "pad_size method must be one of symmetric, end"),
    ({"preprocessing": [{"center_crop": [8, 8, 8.5]}]}, "center_crop must be three whole numbers"),
    ({"preprocessing": [{"resize": [8, 8, 8], "mode": "bicubic"}]}, "resize mode must be one of trilinear"),
    ({"preprocessing": [{"resize": [8, 8, 8], "size_mode": "longest"}]}, "resize must be one positive"),
    ({"preprocessing": [{"resize": [8, 8, 8], "mode": "area", "align_corners": True}]},
     "resize align_corners is for mode trilinear only"),
    ({"preprocessing": [{"spacing": [2.0, 2.0, 2.0], "padding_mode": "reflect"}]},
     "spacing padding_mode must be one of border, zeros, reflection"),
    ({"preprocessing": [{"spacing": [2.0, 2.0, 2.0], "back": "nearest"}]}, "spacing back must be linear or same"),
])
def test_model_descriptions_with_new_steps_that_cannot_run_are_refused(fields, message):
    with pytest.raises(InputError, match="model.json: " + message):
        ModelDescription.from_dict(dict({"name": "tiny"}, **fields), "model.json")


# ------------------------------------------------------------------------------------------------ whole bundle
BUNDLES = {  # Resized mode, align_corners, SpatialPadd method
    "trilinear": ("trilinear", None, "symmetric"),
    "trilinear align_corners": ("trilinear", True, "end"),
    "area": ("area", None, "symmetric"),
}


def twins_bundle(root, network, resize_mode, align_corners, pad_method, extra=()):
    """Centre crop (x cropped, y and z kept), resize (x up, y down, z kept), pad to a size, z-score, 16^3 windows,
    softmax and Invertd."""
    resize = {"_target_": "Resized", "spatial_size": [22, 18, -1], "mode": resize_mode}
    if align_corners is not None:
        resize["align_corners"] = align_corners
    transforms = [{"_target_": "CenterSpatialCropd", "roi_size": [20, -1, 40]}, resize,
                  {"_target_": "SpatialPadd", "spatial_size": [24, 20, 21], "method": pad_method},
                  {"_target_": "NormalizeIntensityd"}] + list(extra)
    postprocessing = [{"_target_": "Activationsd", "softmax": True},
                      {"_target_": "Invertd", "transform": "@preprocessing", "orig_keys": "image",
                       "nearest_interp": False, "to_tensor": True}]
    return write_bundle(root, network, UNET, transforms, (16, 16, 16), postprocessing, LABELS)


def smooth_volume():
    """A 23x21x17 RAS volume of 1.2 x 0.9 x 2 mm voxels, smooth with some noise and no zeros, as (array, affine)."""
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (23, 21, 17)], indexing="ij")
    noise = np.random.default_rng(0).normal(0.0, 5.0, x.shape)
    array = 100.0 + 50.0 * np.sin(x / 3.0) * np.cos(y / 4.0) + 30.0 * np.sin(z / 2.5) + noise
    return array.astype(np.float32), np.diag([1.2, 0.9, 2.0, 1.0])


@pytest.mark.parametrize("case", list(BUNDLES))
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_bundle_with_the_new_twins_equals_monai_s_pipeline_and_invertd(tmp_path, geometry, case):
    from monai.bundle import ConfigParser
    torch.manual_seed(0)
    network = UNet(**UNET).eval()
    root = twins_bundle(tmp_path / "bundle", network, *BUNDLES[case])
    path = stored(smooth_volume(), geometry, tmp_path / "volume.nii.gz")

    parser = ConfigParser()  # MONAI's own pipeline, item by item as ConfigParser builds it
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    preprocessing = parser.get_parsed_content("preprocessing")
    data = preprocessing({"image": str(path)})
    # MONAI's grid after loading and Orientationd: Slicer's reader gives the oblique matrix to about 1e-7 of it
    # (NIfTI stores it in float32), so the twins' matrices are compared starting from MONAI's own
    oriented = monai.transforms.Compose(preprocessing.transforms[:3])({"image": str(path)})["image"].affine.numpy()
    monai_inputs, monai_affine = data["image"].as_tensor().double().numpy(), data["image"].affine.numpy()
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None].float(), network)[0]
    expected = np.asarray(parser.get_parsed_content("postprocessing")(data)["pred"], dtype=np.float64)

    model = load_model(root)
    assert [list(step)[0] for step in model.description.preprocessing] == ["center_crop", "resize", "pad_size",
                                                                          "intensity"]
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    with torch.no_grad():
        reading_difference = float(np.abs(np.asarray(volume.affine) - oriented).max())
        inputs, affine = volume.as_tensor(), oriented
        for step in model.description.steps():
            inputs, affine, _, _ = apply_step(step, inputs, affine, model.activation)
        with model.on_grid(volume):
            probabilities = model(volume.as_tensor())[0].double().numpy()
    assert inputs.shape[1:] == monai_inputs.shape == (1, 24, 20, 21)
    input_difference = float(np.abs(inputs[0].double().numpy() - monai_inputs).max())
    affine_difference = float(np.abs(np.asarray(affine) - monai_affine).max())

    file_grid = GridOrientation.from_ijk_to_ras(nib.load(str(path)).affine, expected.shape[1:][::-1])
    expected = np.stack([file_grid.to_network(np.transpose(channel, (2, 1, 0))) for channel in expected])
    assert probabilities.shape == expected.shape == (3, 23, 21, 17)
    inside = expected.sum(axis=0) > 0.5  # Invertd pads the centre crop with zero probabilities, and so does medadv
    difference = float(np.abs(probabilities - expected).max())  # on the whole grid
    agreement = float((probabilities.argmax(0) == expected.argmax(0))[inside].mean())
    print("{}, {}: network input {} (difference {:.1e}, affine {:.1e}; read {:.1e}), {:.3f} of the voxels inside "
          "the crop, labels agree on {:.5f} of them, largest probability difference {:.2e}".format(
              geometry, case, tuple(inputs.shape[2:]), input_difference, affine_difference, reading_difference,
              inside.mean(), agreement, difference))
    assert inside.sum() == 20 * 21 * 17  # the centre crop keeps x 1..20 of 23, y and z whole
    assert np.all(probabilities[:, ~inside] == 0.0)
    assert input_difference < 1e-4 and affine_difference < 1e-12 and reading_difference < 1e-6
    assert difference < 1e-4 and agreement >= 0.999


def test_inferer_settings_are_read_and_those_not_reproduced_refused(tmp_path):
    """The SlidingWindowInferer's settings reach the window (the evaluator test runs them against MONAI's); Invertd
    by nearest neighbour (its default) and with_coord are refused by name."""
    root = twins_bundle(tmp_path / "bundle", UNet(**UNET).eval(), "trilinear", None, "symmetric")
    config_path = root / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [16, -1, 12], "overlap": [0.5, 0.3, 0.6],
               "mode": "gaussian", "sigma_scale": [0.2, 0.1, 0.15], "padding_mode": "replicate", "cval": 2.0,
               "sw_batch_size": 3}
    config["inferer"] = inferer
    config_path.write_text(json.dumps(config))
    window = load_model(root).description.window
    assert window == {"roi_size": [16, -1, 12], "overlap": [0.5, 0.3, 0.6], "mode": "gaussian",
                      "sigma_scale": [0.2, 0.1, 0.15], "padding_mode": "replicate", "cval": 2.0, "sw_batch_size": 3}
    config["inferer"]["with_coord"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"SlidingWindowInferer\(with_coord=True\) is not reproduced"):
        load_model(root)
    del config["inferer"]["with_coord"]
    del config["postprocessing"]["transforms"][1]["nearest_interp"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"Invert\(d\) with nearest_interp \(its default\) brings the outputs back "
                                         r"by nearest neighbour, which is not reproduced"):
        load_model(root)


# ------------------------------------------------------------------------------------------------- the opt-in
def test_skip_untwinned_loads_a_bundle_without_the_transforms_that_have_no_twin(tmp_path):
    torch.manual_seed(0)
    network = UNet(**UNET).eval()
    noise = {"_target_": "RandGaussianNoised", "prob": 1.0, "std": 0.1}
    root = twins_bundle(tmp_path / "bundle", network, "trilinear", None, "symmetric",
                        extra=[noise, dict(noise, _target_="RandShiftIntensityd", offsets=0.1)])
    with pytest.raises(InputError, match="preprocessing transform RandGaussianNoised has no differentiable twin.*"
                                         "skip_untwinned=True loads the bundle without it"):
        load_bundle(root)
    model = load_model(root, skip_untwinned=True)  # what --skip-untwinned gives
    plain = load_model(twins_bundle(tmp_path / "plain", network, "trilinear", None, "symmetric"))
    assert model.description.preprocessing == plain.description.preprocessing
    note = ("preprocessing transforms RandGaussianNoised, RandShiftIntensityd skipped (no differentiable twin; "
            "skip_untwinned): the attacked pipeline differs from the bundle's")
    assert model.load_notes == [note]
    assert model.description.notes.endswith("without its preprocessing transforms RandGaussianNoised, "
                                            "RandShiftIntensityd (no twin, skipped)")
    report = describe(model, torch.rand((1, 1, 23, 21, 17)))
    assert "note: " + note in report.lines()
    assert any("1. centre crop 20xsamex40 (MONAI's CenterSpatialCrop); 2. resize to 22x18xsame (trilinear, "
               "align_corners False, MONAI's Resize); 3. pad to 24x20x21 (symmetric, value 0" in line
               for line in report.lines())
    steps = json.loads(json.dumps(model.description.preprocessing))  # as a model.json would hold them
    assert ModelDescription.from_dict({"name": "copy", "preprocessing": steps}).steps() == steps

    # a transform with a twin whose setting is not reproduced is refused even so
    config_path = root / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["preprocessing"]["transforms"][4]["anti_aliasing"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"Resize\(anti_aliasing=True\) is not reproduced"):
        load_bundle(root, skip_untwinned=True)
    # nor is a lazy Compose, which merges the spatial transforms into one resampling
    config["preprocessing"]["transforms"][4]["anti_aliasing"] = False
    config["preprocessing"]["lazy"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"Compose\(lazy=True\) merges the spatial transforms"):
        load_bundle(root, skip_untwinned=True)


@pytest.mark.parametrize("tail, refused", [
    ([{"_target_": "AsDiscreted", "argmax": True}, {"_target_": "SaveImaged", "output_dir": "out"}], None),
    ([{"_target_": "AsDiscreted", "argmax": True}, {"_target_": "KeepLargestConnectedComponentd",
                                                    "applied_labels": [1, 2]}], "KeepLargestConnectedComponent"),
    ([{"_target_": "AsDiscreted", "threshold": 0.3}], r"AsDiscrete\(.*threshold=0.3"),
    ([{"_target_": "FillHolesd"}], "FillHoles"),
])
def test_postprocessing_that_changes_the_labels_is_refused_by_name(tmp_path, tail, refused):
    """Post-processing beyond the activation, Invertd and a plain AsDiscrete would give labels other than the
    bundle's: refused by name; ``skip_untwinned`` loads the bundle without it, and the report says so."""
    torch.manual_seed(0)
    transforms = [{"_target_": "Orientationd", "axcodes": "RAS"}, {"_target_": "NormalizeIntensityd"}]
    root = write_bundle(tmp_path / "bundle", UNet(**UNET).eval(), UNET, transforms, (16, 16, 16),
                        SOFTMAX_INVERTD + tail, LABELS)
    if refused is None:
        assert load_model(root).load_notes == []
        return
    with pytest.raises(InputError, match="its postprocessing runs {}.*which changes the labels and is not "
                                         "reproduced".format(refused)):
        load_bundle(root)
    model = load_model(root, skip_untwinned=True)
    note = [line for line in model.load_notes if line.startswith("postprocessing transform")]
    assert len(note) == 1 and "the labels may differ from the bundle's" in note[0]
    assert "without its postprocessing transform" in model.description.notes
    assert "note: " + note[0] in describe(model, torch.rand((1, 1, 20, 18, 17))).lines()


# ------------------------------------------------------------------------- CropForeground, NormalizeIntensity
@pytest.mark.parametrize("settings", [
    {"k_divisible": 4},  # grown past the grid's edge along x and z
    {"k_divisible": [3, 8, 1], "margin": 1},
    {"k_divisible": [5, 2, 6], "margin": [2, 0, 1], "allow_smaller": True},
    {"k_divisible": 16},  # larger than the grid on every axis
])
def test_crop_foreground_k_divisible_equals_monai_s_and_its_inverse(settings):
    generator = torch.Generator().manual_seed(1)
    array = torch.zeros((1,) + SHAPE)
    array[0, 1:11, 3:8, 0:6] = torch.rand((10, 5, 6), generator=generator) * 100.0 + 1.0
    image = MetaTensor(array.clone(), affine=torch.as_tensor(oblique_affine()))
    transform = monai.transforms.CropForeground(**settings)
    expected = transform(image)
    step = twin_step("CropForegroundd", **settings)
    inputs, affine, back, _ = apply_step(step, array[None], oblique_affine(), "sigmoid")
    assert tuple(inputs.shape[1:]) == tuple(expected.shape)
    assert float(np.abs(np.asarray(affine) - expected.affine.numpy()).max()) < 1e-12
    assert float((inputs[0] - expected.as_tensor()).abs().max()) == 0.0
    outputs = torch.rand((3,) + tuple(expected.shape[1:]), generator=generator)
    monai_back = transform.inverse(MetaTensor(outputs.clone(), meta=deepcopy(expected.meta),
                                              applied_operations=deepcopy(expected.applied_operations)))
    assert float((back(outputs[None])[0] - monai_back.as_tensor()).abs().max()) == 0.0
    print(settings, SHAPE, "->", tuple(expected.shape[1:]), step_text(step))


def spots():
    """Two channels of 5 (so the default x > 0 keeps every voxel) with a few voxels of other values, apart."""
    array = torch.full((2,) + SHAPE, 5.0)
    for channel, values in enumerate([{(2, 3, 1): 7.0, (9, 6, 5): 8.0, (4, 8, 2): 9.0, (1, 1, 4): 1.0,
                                       (11, 2, 6): 2.0, (6, 5, 0): 0.0, (8, 7, 3): 2.5},
                                      {(0, 9, 3): 9.0, (12, 0, 2): 1.0, (7, 4, 6): 7.0, (3, 2, 0): 2.0}]):
        for where, value in values.items():
            array[(channel,) + where] = value
    return array


SELECTIONS = {  # CropForegroundd settings as a bundle config writes them
    "x > 7": {"select_fn": "$lambda x: x > 7"},
    "x >= 7": {"select_fn": "$lambda x: x >= 7"},
    "x < 2": {"select_fn": "$lambda x: x < 2"},
    "x <= 2": {"select_fn": "$lambda x: x <= 2"},
    "x != 5, channel 0": {"select_fn": "$lambda x: x != 5", "channel_indices": 0},
    "x > 2.25": {"select_fn": "$lambda  v :v>2.25e0", "margin": 1},
    "x > 7, channel 1": {"select_fn": "$lambda x: x > 7", "channel_indices": 1},
    "x >= 7, channels [0], margin, k_divisible": {"select_fn": "$lambda x: x >= 7", "channel_indices": [0],
                                                  "margin": [1, 0, 2], "k_divisible": [4, 3, 1]},
    "x < 2, channels [1, 0], allow_smaller": {"select_fn": "$lambda x: x < 2", "channel_indices": [1, 0],
                                              "margin": 2, "allow_smaller": True},
    "x > 0 written out, channel 0": {"select_fn": "$lambda x: x > 0", "channel_indices": 0},  # keeps every voxel
}


def crop_foreground(settings):
    """MONAI's CropForegroundd built from ``settings`` as the bundle's config parser builds it (the select_fn
    evaluated), on the spots; (its transform, its output)."""
    from monai.bundle import ConfigParser
    config = dict({"_target_": "CropForegroundd", "keys": "image", "source_key": "image"}, **settings)
    transform = ConfigParser({"crop": config}).get_parsed_content("crop")
    return transform, transform({"image": MetaTensor(spots(), affine=torch.as_tensor(oblique_affine()))})["image"]


@pytest.mark.parametrize("case", list(SELECTIONS))
def test_crop_foreground_select_fn_and_channel_indices_equal_monai_s_and_its_inverse(case):
    transform, expected = crop_foreground(SELECTIONS[case])
    step = twin_step("CropForegroundd", **SELECTIONS[case])  # the select_fn as written, as the bundle reader reads it
    inputs, affine, back, box = apply_step(step, spots()[None], oblique_affine(), "sigmoid")
    print("{}: {} -> {}, box {} ({})".format(case, SHAPE, tuple(expected.shape[1:]), box, step_text(step)))
    assert (back is None) == case.startswith("x > 0")  # the others crop: x > 0 keeps the whole grid
    assert tuple(inputs.shape[1:]) == tuple(expected.shape)
    assert float(np.abs(np.asarray(affine) - expected.affine.numpy()).max()) < 1e-12
    assert float((inputs[0] - expected.as_tensor()).abs().max()) == 0.0
    outputs = torch.rand((3,) + tuple(expected.shape[1:]), generator=torch.Generator().manual_seed(3))
    recorded = MetaTensor(outputs.clone(), meta=deepcopy(expected.meta),
                          applied_operations=deepcopy(expected.applied_operations))
    monai_back = transform.inverse({"image": recorded})["image"]
    ours_back = outputs[None] if back is None else back(outputs[None])
    assert float((ours_back[0] - monai_back.as_tensor()).abs().max()) == 0.0


def test_crop_foreground_comparisons_differ_at_the_threshold():
    """The spots hold values equal to the thresholds: > and >=, < and <= give other boxes."""
    def box(select_fn):
        return apply_step(twin_step("CropForegroundd", select_fn=select_fn), spots()[None], oblique_affine(),
                          "sigmoid")[3]
    assert box("$lambda x: x > 7") != box("$lambda x: x >= 7")
    assert box("$lambda x: x < 2") != box("$lambda x: x <= 2")
    assert box("$lambda x: x > 0") is None and box("$monai.transforms.utils.is_positive") is None


def test_a_bundle_s_select_fn_is_read_as_written_and_other_code_refused_by_name(tmp_path):
    """The bundle reader takes the select_fn's text from the config (directly or through an @ reference), without
    trust: a lambda comparing x with a number runs nothing else; any other select_fn is refused naming it, with or
    without trust."""
    crop = {"_target_": "CropForegroundd", "source_key": "image", "select_fn": "$lambda x: x >= 1.5",
            "channel_indices": 0, "margin": 2}
    root = twins_bundle(tmp_path / "bundle", UNet(**UNET).eval(), "trilinear", None, "symmetric", extra=[crop])
    assert load_model(root).description.preprocessing[-1] == {"crop": {
        "threshold": 1.5, "compare": ">=", "channels": [0], "margin": 2, "allow_smaller": False, "outside": "zeros"}}
    config_path = root / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["select"] = "$lambda x: x != 0"
    config["preprocessing"]["transforms"][-2]["select_fn"] = "@select"
    config_path.write_text(json.dumps(config))
    assert load_model(root).description.preprocessing[-1]["crop"]["compare"] == "!="
    config["select"] = "$lambda x: x.abs() > 1"
    config_path.write_text(json.dumps(config))
    for trusted in (False, True):
        with pytest.raises(InputError, match=r"CropForeground\(select_fn=\$lambda x: x.abs\(\) > 1\) is not "
                                             r"reproduced \(reproduced are comparisons of x with a number"):
            load_bundle(root, trust_checkpoint=trusted)


@pytest.mark.parametrize("channel_wise", [False, True])
@pytest.mark.parametrize("nonzero", [False, True])
def test_normalize_intensity_channel_wise_on_two_channels_equals_monai_s(channel_wise, nonzero):
    generator = torch.Generator().manual_seed(2)
    array = torch.rand((2,) + SHAPE, generator=generator, dtype=torch.float64) * 100.0
    array[1] = array[1] * 3.0 + 250.0  # another scale and offset in the second channel
    array[:, :4] = 0.0
    settings = {"channel_wise": channel_wise, "nonzero": nonzero}
    expected = monai.transforms.NormalizeIntensity(**settings)(
        MetaTensor(array.clone(), affine=torch.as_tensor(oblique_affine())))
    step = twin_step("NormalizeIntensityd", **settings)
    inputs, _, back, _ = apply_step(step, array[None], oblique_affine(), "sigmoid")
    difference = float((inputs[0] - expected.as_tensor().double()).abs().max())
    print(settings, "difference {:.1e}".format(difference))
    assert back is None and difference < 1e-5


INTENSITY = {  # dictionary transform, settings, channels (two: MONAI's per channel settings)
    "range, clip": ("ScaleIntensityRanged", {"a_min": -20, "a_max": 180, "b_min": 0.0, "b_max": 1.0, "clip": True}, 1),
    "range, reversed output": ("ScaleIntensityRanged", {"a_min": 0.0, "a_max": 200.0, "b_min": 1.0, "b_max": -1.0}, 1),
    "range, no output range": ("ScaleIntensityRanged", {"a_min": 10.0, "a_max": 90.0, "b_min": None, "b_max": None},
                               1),
    "percentiles, clip": ("ScaleIntensityRangePercentilesd", {"lower": 2.0, "upper": 97.5, "b_min": -1.0,
                                                              "b_max": 1.0, "clip": True}, 1),
    "percentiles, channel_wise": ("ScaleIntensityRangePercentilesd", {"lower": 0, "upper": 99, "b_min": 0.0,
                                                                      "b_max": 1.0, "channel_wise": True}, 2),
    "normalize, fixed subtrahend and divisor": ("NormalizeIntensityd", {"subtrahend": 40.0, "divisor": 25.0}, 1),
    "normalize, fixed, nonzero": ("NormalizeIntensityd", {"subtrahend": 40.0, "divisor": 25.0, "nonzero": True}, 1),
    "normalize, fixed per channel, nonzero, channel_wise": ("NormalizeIntensityd", {
        "subtrahend": [40.0, 7.5], "divisor": [25.0, 0.0], "nonzero": True, "channel_wise": True}, 2),
    "normalize, fixed subtrahends per channel, channel_wise": ("NormalizeIntensityd", {
        "subtrahend": [40.0, 7.5], "channel_wise": True}, 2),
    "normalize, fixed divisor": ("NormalizeIntensityd", {"divisor": 25.0}, 1),
    "scale intensity": ("ScaleIntensityd", {"minv": -1.0, "maxv": 2.0}, 1),
    "scale intensity, no output minimum": ("ScaleIntensityd", {"minv": None, "maxv": 3.0}, 1),
    "scale intensity, channel_wise": ("ScaleIntensityd", {"channel_wise": True}, 2),
}


@pytest.mark.parametrize("case", list(INTENSITY))
def test_intensity_twins_equal_monai_s(case):
    """ScaleIntensityRange, ScaleIntensityRangePercentiles, NormalizeIntensity (fixed subtrahend and divisor) and
    ScaleIntensity on an odd-sized volume with zeros (a second channel of another scale where given)."""
    target, settings, channels = INTENSITY[case]
    generator = torch.Generator().manual_seed(4)
    array = torch.rand((channels,) + SHAPE, generator=generator) * 300.0 - 50.0
    array[:, :3] = 0.0
    if channels == 2:
        array[1] = array[1] * 0.1 + 7.0
    expected = getattr(monai.transforms, target[:-1])(**settings)(
        MetaTensor(array.clone(), affine=torch.as_tensor(oblique_affine()))).as_tensor()
    inputs, affine, back, _ = apply_step(twin_step(target, **settings), array[None], oblique_affine(), "sigmoid")
    difference = float((inputs[0] - expected).abs().max() / max(1.0, float(expected.abs().max())))
    print("{}: relative difference {:.1e}, output {:.3g}..{:.3g}".format(case, difference, float(expected.min()),
                                                                         float(expected.max())))
    assert back is None and np.array_equal(affine, oblique_affine()) and difference < 1e-6


def test_scale_intensity_without_an_output_range_is_no_step():
    """MONAI's ScaleIntensity with minv and maxv None (and no factor) returns the image as it is."""
    image = MetaTensor(torch.rand((1,) + SHAPE) * 300.0, affine=torch.as_tensor(oblique_affine()))
    assert torch.equal(monai.transforms.ScaleIntensity(minv=None, maxv=None)(image).as_tensor(), image.as_tensor())
    assert _twin("ScaleIntensity", {"keys": "image", "minv": None, "maxv": None, "factor": None}, "test") == []


@pytest.mark.parametrize("transform", [{"_target_": "ScaleIntensityd"},
                                       {"_target_": "ScaleIntensityRangePercentilesd", "lower": 1, "upper": 99,
                                        "b_min": 0.0, "b_max": 1.0}])
def test_a_multichannel_bundle_pooling_channels_is_refused(tmp_path, transform):
    """MONAI's ScaleIntensity and ScaleIntensityRangePercentiles pool all channels by default; the twins work per
    channel: on a bundle with several input channels that would differ, so it is refused."""
    root = twins_bundle(tmp_path / "bundle", UNet(**UNET).eval(), "trilinear", None, "symmetric", extra=[transform])
    metadata_path = root / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["network_data_format"]["inputs"]["image"]["num_channels"] = 2
    metadata_path.write_text(json.dumps(metadata))
    name = transform["_target_"][:-1]
    with pytest.raises(InputError, match="{} with channel_wise=False takes its statistics over all 2 channels".format(
            name)):
        load_model(root)
    metadata["network_data_format"]["inputs"]["image"]["num_channels"] = 1
    metadata_path.write_text(json.dumps(metadata))
    assert load_model(root).description.in_channels == 1  # one channel: per channel is the same
