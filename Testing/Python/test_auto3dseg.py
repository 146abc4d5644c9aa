"""MONAI Auto3DSeg SegResNet models (``model.pt`` with ``config`` and ``state_dict``, as the MONAIAuto3DSeg extension
keeps them): medadv's outputs against the extension's current inference script (Scripts/auto3dseg_segresnet_inference.py
as changed last in 4b04da5), its pipeline written here from the script's logic with MONAI's own transforms, inferer,
Invertd and KeepLargestConnectedComponentd, on a 1 mm T1 stored axis-permuted and flipped."""
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInfererAdapt
from monai.networks.nets import SegResNetDS
from monai.transforms import (Compose, ConcatItemsd, CropForegroundd, EnsureTyped, Invertd,
                              KeepLargestConnectedComponentd, Lambdad, LoadImaged, NormalizeIntensityd, Orientationd,
                              ScaleIntensityRanged, Spacingd)

from conftest import T1, stored
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.networks.outputs import predict_labels
from MedAdvRobustnessLib.networks.preprocessing import normalize_intensity
from MedAdvRobustnessLib.networks.volume import GridOrientation
from MedAdvRobustnessLib.scene.nodes import volume_from_node
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

NETWORK = {"_target_": "SegResNetDS", "init_filters": 4, "blocks_down": [1, 1], "in_channels": 1, "out_channels": 3,
           "spatial_dims": 3}
BOUNDS = [20.0, 90.0]
CONFIGS = {  # (model folder, config): the script keeps the largest components of models whose path has whole-head
    "mri-2mm": ("model", {"normalize_mode": "meanstd", "resample_resolution": [2.0, 2.0, 2.0]}),
    "range-within-25-percent": ("model", {"normalize_mode": "range", "resample_resolution": [1.2, 0.9, 1.1]}),
    "tanh-no-crop": ("model", {"normalize_mode": "meanstdtanh", "crop_foreground": False,
                               "resample_resolution": [1.5, 1.5, 2.0]}),
    "whole-head-ct": ("whole-head-05mm-v1.0.1", {"normalize_mode": "ct", "resample_resolution": [1.6, 1.6, 2.4]}),
    "two-volumes-sigmoid": ("model", {"normalize_mode": "mri", "extra_modalities": {"adc": "pet"}, "sigmoid": True,
                                      "input_channels": 2, "resample_resolution": [2.0, 1.5, 1.5]}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: as fast for the tiny network's many small convolutions, and several times faster where
    other processes share the cores (threads then wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_checkpoint(folder, overrides):
    """A model folder as MONAIAuto3DSeg keeps it: model.pt holding the training config and the weights."""
    torch.manual_seed(0)
    network_config = dict(NETWORK, in_channels=int(overrides.get("input_channels", 1)))
    network = SegResNetDS(**{k: v for k, v in network_config.items() if k != "_target_"}).eval()
    config = dict({"network": network_config, "orientation_ras": True, "roi_size": [32, 32, 32], "sigmoid": False,
                   "intensity_bounds": BOUNDS, "name": "tiny segresnet"}, **overrides)
    folder.mkdir()
    torch.save({"config": config, "state_dict": network.state_dict(), "epoch": 3, "best_metric": 0.5},
               str(folder / "model.pt"))
    return folder, network, config


def normalization(key, mode, bounds):
    """The script's intensity transforms for ``mode`` (its ``_add_normalization_transforms``)."""
    if mode in ("range", "ct"):
        return [ScaleIntensityRanged(keys=key, a_min=bounds[0], a_max=bounds[1], b_min=-1, b_max=1, clip=False),
                Lambdad(keys=key, func=torch.sigmoid)]
    if mode in ("meanstd", "mri", "meanstdtanh"):
        steps = [NormalizeIntensityd(keys=key, nonzero=True, channel_wise=True)]
        return steps + ([Lambdad(keys=key, func=lambda x: 3 * torch.tanh(x / 3))] if mode == "meanstdtanh" else [])
    if mode == "pet":
        return [Lambdad(keys=key, func=lambda x: torch.sigmoid((x - x.min()) / x.std()))]
    assert mode == "none"
    return []


def script_pipeline(config, keys):
    """The transforms the current script composes for ``config`` and its loaded ``image1``, ``image2``, ...:
    the intensities first, then the RAS orientation, the crop by the raw ``image1`` and the spacing."""
    bounds = config["intensity_bounds"]
    if len(keys) == 1:
        transforms = [ConcatItemsd(keys=keys, name="image", dim=0),
                      EnsureTyped(keys="image", data_type="tensor", dtype=torch.float)]
        transforms += normalization("image", config["normalize_mode"], bounds)
    else:
        modes = [config["normalize_mode"]] + list(config["extra_modalities"].values())
        transforms = [step for key, mode in zip(keys, modes) for step in normalization(key, mode, bounds)]
        transforms += [ConcatItemsd(keys=keys, name="image", dim=0),
                       EnsureTyped(keys="image", data_type="tensor", dtype=torch.float)]
    transforms.append(Orientationd(keys="image", axcodes="RAS"))
    if config.get("crop_foreground", True):
        transforms.append(CropForegroundd(keys="image", source_key="image1", margin=10, allow_smaller=True))
    if config.get("resample_resolution") is not None:
        pixdim = np.asarray(config["resample_resolution"])
        transforms.append(Spacingd(keys=["image"], pixdim=list(pixdim), mode=["bilinear"], dtype=torch.float,
                                   min_pixdim=pixdim * 0.75, max_pixdim=pixdim * 1.25))
    return Compose(transforms)


def script_outputs(config, network, paths, model_file):
    """As the script runs a model: the probabilities on the network grid (C, x, y, z) and the labels it saves on the
    first file's grid (i, j, k), with the labels before KeepLargestConnectedComponentd."""
    keys = ["image{}".format(index + 1) for index in range(len(paths))]
    data = LoadImaged(keys=keys, ensure_channel_first=True, dtype=None, image_only=False)(
        {key: str(path) for key, path in zip(keys, paths)})
    pipeline = script_pipeline(config, keys)
    data = pipeline(data)
    inferer = SlidingWindowInfererAdapt(roi_size=config["roi_size"], sw_batch_size=1, overlap=0.625, mode="gaussian",
                                        cache_roi_weight_map=False)
    with torch.no_grad():
        logits = inferer(inputs=data["image"][None].as_tensor(), network=network)
    if config["sigmoid"]:
        probabilities = torch.sigmoid(logits)
        pred = probabilities >= 0.5
    else:
        probabilities = torch.softmax(logits, dim=1)
        pred = torch.argmax(probabilities, dim=1, keepdim=True).to(dtype=torch.uint8)
    data["pred"] = MetaTensor(pred[0], meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    inverted = Invertd(keys="pred", orig_keys="image", transform=pipeline, nearest_interp=True)(data)
    before = np.asarray(inverted["pred"][0]).astype(np.uint8)
    if "whole-head" in model_file:
        inverted = KeepLargestConnectedComponentd(keys="pred", num_components=2)(inverted)
    labels = np.asarray(inverted["pred"][0]).astype(np.uint8)  # the script saves channel 0 as uint8
    return probabilities[0].double().numpy(), labels, before


def written(volume, path):
    """The volume written in its own voxel order, as the extension writes the volume node for its script."""
    nib.save(nib.Nifti2Image(np.transpose(volume.orientation.to_slicer(volume.array), (2, 1, 0)), volume.ijk_to_ras),
             str(path))
    return path


@pytest.mark.parametrize("case, geometry", [(case, "LPS-permuted") for case in sorted(CONFIGS)]
                         + [("tanh-no-crop", "oblique"), ("two-volumes-sigmoid", "oblique")])
def test_auto3dseg_model_equals_the_extension_s_script(tmp_path, t1_crop, case, geometry):
    name, overrides = CONFIGS[case]
    folder, network, config = write_checkpoint(tmp_path / name, overrides)
    array, affine = t1_crop
    array = array.copy()
    array[:14], array[:, -9:] = 0.0, 0.0  # background for the foreground crop to remove
    array[-16:] = 2.0  # dim: in the box of the raw volume, not in that of a normalised one
    stored_files = [stored((array, affine), geometry, tmp_path / "t1.nii.gz")]
    if config.get("extra_modalities"):  # a second sequence on the same grid
        stored_files.append(stored((np.sqrt(array) * 7.0 + 3.0, affine), geometry, tmp_path / "second.nii.gz"))
    scene = SlicerScene.standalone()
    volumes = [volume_from_node(scene.load_volume(str(path))) for path in stored_files]
    paths = [written(item, tmp_path / "input-volume{}.nii.gz".format(index)) for index, item in enumerate(volumes)]
    expected_probabilities, expected, before = script_outputs(config, network, paths, str(folder / "model.pt"))
    model = load_model(folder)
    volume = torch.cat([item.as_tensor() for item in volumes], dim=1)
    with torch.no_grad(), model.on_grid(volumes[0]):
        inputs, plan = model.prepare(volume)
        network_outputs = model.description.activate(model.infer(inputs))
        outputs = model.restore(network_outputs, plan)  # what model(volume) returns
    probabilities = network_outputs[0].double().numpy()
    labels = predict_labels(outputs, model.activation)[0].numpy()
    assert probabilities.shape == expected_probabilities.shape
    difference = float(np.abs(probabilities - expected_probabilities).max())
    file_grid = GridOrientation.from_ijk_to_ras(nib.load(str(paths[0])).affine, expected.shape[::-1])
    expected, before = (file_grid.to_network(np.transpose(item, (2, 1, 0))) for item in (expected, before))
    agreement = float((labels == expected).mean())
    removed = float((expected != before).mean())
    print("{}, {}: network input {}, probabilities on it within {:.1e}, labels agree on {:.5f} of the voxels{}".format(
        case, geometry, tuple(inputs.shape[2:]), difference, agreement,
        ", {:.3f} of them removed by KeepLargestConnectedComponentd".format(removed) if removed else ""))
    assert difference < 1e-4 and agreement >= 0.999
    assert (removed > 0.001) == ("whole-head" in name)


def test_kept_components_are_monai_s():
    """Each label's two largest 26-connected components, equal sizes ranked alike: against MONAI's own transform."""
    from MedAdvRobustnessLib.networks.auto3dseg import removed_components
    generator = np.random.default_rng(5)
    for shape in ((9, 11, 7), (14, 6, 10)):
        labels = (generator.random(shape) * 4).astype(np.uint8) * (generator.random(shape) < 0.3)
        kept = KeepLargestConnectedComponentd(keys="pred", num_components=2)({"pred": torch.as_tensor(labels[None])})
        assert np.array_equal(np.where(removed_components(labels, 2), 0, labels), np.asarray(kept["pred"][0]))


def test_the_way_back_by_a_flat_index_equals_the_way_back_by_lines():
    from MedAdvRobustnessLib.networks.auto3dseg import back_by_nearest, nearest_voxels
    from MedAdvRobustnessLib.networks.steps import spacing_grid
    affine = np.diag([1.0, 0.9, 1.2, 1.0])
    network_affine, forward, _ = spacing_grid(affine, (11, 13, 9), [2.0, 1.5, 2.4])
    network_shape = tuple(len(positions) for positions in forward)
    lines = nearest_voxels(network_affine, network_shape, affine, (11, 13, 9))["lines"]
    index = np.ix_(*[line.numpy() for line in lines])
    flat = {"flat": torch.as_tensor(np.ravel_multi_index(index, network_shape)).reshape(-1), "shape": (11, 13, 9)}
    outputs = torch.rand((2, 3) + network_shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(back_by_nearest(outputs, {"lines": lines}), back_by_nearest(outputs, flat))
    assert torch.equal(back_by_nearest(outputs, flat), outputs[(slice(None), slice(None)) + index])


def test_pet_normalisation_is_the_script_s():
    volume = torch.rand((2, 1, 5, 6, 7), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 900 - 80
    expected = torch.stack([torch.sigmoid((x - x.min()) / x.std()) for x in volume])
    assert torch.allclose(normalize_intensity(volume, {"type": "pet"}), expected, rtol=0, atol=1e-12)


def test_auto3dseg_settings_that_are_not_reproduced_are_refused(tmp_path):
    refused = {
        "native": ({"normalize_mode": "meanstd", "orientation_ras": False}, "without orientation_ras"),
        "unknown": ({"normalize_mode": "histogram"}, "normalize_mode 'histogram' is not reproduced"),
        "no-mode": ({}, "no normalize_mode"),
        "no-bounds": ({"normalize_mode": "mri"}, "no intensity_bounds"),
        "channels": ({"normalize_mode": "mri", "input_channels": 2}, "2 input channels but 0 extra_modalities"),
        "code": ({"normalize_mode": "meanstd", "network": dict(NETWORK, init_filters="$4")}, "--trust-checkpoint"),
        "brats-pet": ({"normalize_mode": "pet", "input_channels": 2}, "pet on 2 BraTS sequences"),
    }
    for name, (overrides, message) in refused.items():
        folder, _, _ = write_checkpoint(tmp_path / name, overrides)
        if name == "no-bounds":
            checkpoint = torch.load(str(folder / "model.pt"), weights_only=True)
            del checkpoint["config"]["intensity_bounds"]
            torch.save(checkpoint, str(folder / "model.pt"))
        with pytest.raises(InputError, match=message):
            load_model(folder)


def test_an_auto3dseg_model_is_attacked_through_its_pipeline(tmp_path, t1_crop):
    from MedAdvRobustnessLib.evaluation.sweep import run_sweep
    from MedAdvRobustnessLib.probes.registry import make_probe
    folder, _, _ = write_checkpoint(tmp_path / "model", CONFIGS["mri-2mm"][1])
    volume = volume_from_node(SlicerScene.standalone().load_volume(
        str(stored(t1_crop, "LPS-permuted", tmp_path / "t1.nii.gz"))))
    model = load_model(folder)
    with model.on_grid(volume):
        result = run_sweep(model, volume, make_probe("pgd", steps=2), [0.02])
    low, high = volume.intensity_range
    delta = result.outcomes[1].probed.astype(np.float64) - volume.array
    assert 0 < np.abs(delta).max() <= 0.02 * (high - low) * (1 + 1e-6)
    assert result.mean_dice(0.02, "clean") < 1.0


def test_label_names_come_from_labels_csv_as_the_extension_names_its_segments(tmp_path):
    """MONAIAuto3DSeg finds a model by its labels.csv and names the segments by its LabelValue and Name columns."""
    folder, _, _ = write_checkpoint(tmp_path / "model", CONFIGS["mri-2mm"][1])
    (folder / "labels.csv").write_text(
        "LabelValue,Name,SegmentedPropertyCategoryCodeSequence.CodeValue\n"
        "1,cerebrospinal fluid,123037004\n2,grey matter,123037004\n3,white matter,123037004\n")
    names = {label.value: label.name for label in load_model(folder).description.labels}
    assert names == {1: "cerebrospinal fluid", 2: "grey matter", 3: "white matter"}
    (folder / "labels.csv").write_text("Value;Name\n1;liver\n")
    with pytest.raises(InputError, match="labels.csv: cannot read the label names"):
        load_model(folder)


def brats_script_outputs(config, network, paths):
    """As the script's BraTS branch runs a model: the sequences as channels, orientation, crop by the image itself,
    spacing, then the intensities; sigmoid channels >= 0.5 brought back by Invertd and merged into labels 1-3."""
    transforms = [LoadImaged(keys="image", ensure_channel_first=True, dtype=None, image_only=False),
                  EnsureTyped(keys="image", data_type="tensor", dtype=torch.float),
                  Orientationd(keys="image", axcodes="RAS"),
                  CropForegroundd(keys="image", source_key="image", margin=10, allow_smaller=True)]
    pixdim = np.asarray(config["resample_resolution"])
    transforms.append(Spacingd(keys=["image"], pixdim=list(pixdim), mode=["bilinear"], dtype=torch.float,
                               min_pixdim=pixdim * 0.75, max_pixdim=pixdim * 1.25))
    pipeline = Compose(transforms + normalization("image", config["normalize_mode"], config["intensity_bounds"]))
    data = pipeline({"image": [str(path) for path in paths]})
    inferer = SlidingWindowInfererAdapt(roi_size=config["roi_size"], sw_batch_size=1, overlap=0.625, mode="gaussian",
                                        cache_roi_weight_map=False)
    with torch.no_grad():
        probabilities = torch.sigmoid(inferer(inputs=data["image"][None].as_tensor(), network=network))
    data["pred"] = MetaTensor(probabilities[0] >= 0.5, meta=data["image"].meta,
                              applied_operations=data["image"].applied_operations)
    seg = torch.as_tensor(Invertd(keys="pred", orig_keys="image", transform=pipeline, nearest_interp=True)(data)["pred"])
    labels = 2 * seg.any(0).to(torch.uint8)
    labels[seg[1:].any(0)] = 1
    labels[seg[2:].any(0)] = 3
    return probabilities[0].double().numpy(), labels.numpy()


@pytest.mark.parametrize("geometry, background", [("LPS-permuted", "zero borders"), ("oblique", "zero borders"),
                                                  ("LPS-permuted", "head in zero background")])
def test_a_brats_model_equals_the_script_s_brats_branch(tmp_path, t1_crop, geometry, background):
    """Where the crop keeps zero voxels (a skull-stripped or head volume in its zero background), MONAI's resampling
    leaves values of about 1e-12 there, which the z-score's non-zero mask counts: medadv takes MONAI's values."""
    config = {"normalize_mode": "meanstd", "input_channels": 2, "sigmoid": True,
              "resample_resolution": [1.5, 2.0, 1.5], "network": dict(NETWORK, in_channels=2)}
    folder, network, config = write_checkpoint(tmp_path / "brats-mets-v1.0.0", config)
    array, affine = t1_crop
    array = array.copy()
    if background == "head in zero background":
        image = nib.load(str(T1))
        array, affine = np.ascontiguousarray(np.asarray(image.dataobj, dtype=np.float32)[40:150, 30:170, 20:120]), \
            image.affine
        assert 0.1 < (array == 0).mean() < 0.5
    else:
        array[:14], array[:, -9:] = 0.0, 0.0  # background for the crop to remove
    files = [stored((array, affine), geometry, tmp_path / "t1.nii.gz"),
             stored((np.sqrt(array) * 7.0, affine), geometry, tmp_path / "flair.nii.gz")]
    scene = SlicerScene.standalone()
    volumes = [volume_from_node(scene.load_volume(str(path))) for path in files]
    paths = [written(item, tmp_path / "input-volume{}.nii.gz".format(index)) for index, item in enumerate(volumes)]
    expected_probabilities, expected = brats_script_outputs(config, network, paths)
    model = load_model(folder)
    volume = torch.cat([item.as_tensor() for item in volumes], dim=1)
    with torch.no_grad(), model.on_grid(volumes[0]):
        inputs, plan = model.prepare(volume)
        network_outputs = model.description.activate(model.infer(inputs))
        outputs = model.restore(network_outputs, plan)
    difference = float(np.abs(network_outputs[0].double().numpy() - expected_probabilities).max())
    labels = predict_labels(outputs, model.activation)[0].numpy()
    file_grid = GridOrientation.from_ijk_to_ras(nib.load(str(paths[0])).affine, expected.shape[::-1])
    expected = file_grid.to_network(np.transpose(expected, (2, 1, 0)))
    agreement = float((labels == expected).mean())
    print("brats, {}: network input {}, probabilities within {:.1e}, labels agree on {:.5f}, labels {}".format(
        geometry, tuple(inputs.shape[2:]), difference, agreement, np.unique(expected).tolist()))
    assert set(np.unique(expected).tolist()) == {0, 1, 2, 3}
    assert difference < 1e-4 and agreement >= 0.999
