"""A model-zoo-style MONAI bundle run as its users run it, ``python -m monai.bundle run --config_file
configs/inference.json`` (its ``SupervisedEvaluator``: dataset, dataloader, sliding window, softmax, ``Invertd``,
``SaveImaged`` of the probabilities), against medadv's outputs on the input's grid, on a 1 mm T1 with odd sizes
stored axis-permuted and flipped, and oblique."""
import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from conftest import GEOMETRIES, stored
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.networks.volume import GridOrientation
from MedAdvRobustnessLib.scene.nodes import volume_from_node
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

# python -m monai.bundle needs fire, its SupervisedEvaluator pytorch-ignite: both in the test extra
UNET = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
        "strides": [2], "num_res_units": 1, "norm": "batch"}


SPACING = {"pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"}
INFERER = {"roi_size": [24, 24, 24], "sw_batch_size": 4, "overlap": 0.5}


def inference_config(spacing=SPACING, inferer=INFERER):
    """configs/inference.json laid out as the model zoo's (spleen_ct_segmentation's, say): the data list from a
    folder, dataset and dataloader, the evaluator with its checkpoint loader, ``initialize`` and ``run``; the
    ``Spacingd`` and ``SlidingWindowInferer`` settings given."""
    image = {"keys": "image"}
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.float32",
        "output_postfix": "prob",
        "separate_folder": True,
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": UNET,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            dict({"_target_": "LoadImaged"}, **image),
            dict({"_target_": "EnsureChannelFirstd"}, **image),
            dict({"_target_": "Orientationd", "axcodes": "RAS"}, **image),
            dict({"_target_": "Spacingd"}, **spacing, **image),
            dict({"_target_": "NormalizeIntensityd", "nonzero": False}, **image),
            dict({"_target_": "EnsureTyped"}, **image)]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": dict({"_target_": "SlidingWindowInferer"}, **inferer),
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
             "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
             "separate_folder": "@separate_folder"}]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


METADATA = {"name": "tiny model-zoo bundle", "version": "0.1.0", "network_data_format": {
    "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1,
                         "spatial_shape": [24, 24, 24], "dtype": "float32"}},
    "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                         "spatial_shape": [24, 24, 24], "dtype": "float32",
                         "channel_def": {"0": "background", "1": "dark", "2": "bright"}}}}}


def write_bundle(root, spacing=SPACING, inferer=INFERER):
    """The bundle (seeded weights) with these ``Spacingd`` and inferer settings."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.manual_seed(0)
    network = UNet(**{key: value for key, value in UNET.items() if key != "_target_"})
    torch.save(network.state_dict(), str(root / "models" / "model.pt"))
    (root / "configs" / "inference.json").write_text(json.dumps(inference_config(spacing, inferer), indent=4))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    return root


def write_volumes(data, volumes):
    """``volumes`` ({name: (array, affine, geometry)}) stored in the folder ``data``: {name: path}."""
    data.mkdir()
    return {name: stored((array, affine), geometry, data / "t1_{}.nii.gz".format(name))
            for name, (array, affine, geometry) in volumes.items()}


def saved_outputs(root, inputs):
    """{name: (input path, probabilities path)} of what the evaluator saved (output_dir @bundle_root/eval)."""
    saved = {}
    for name, path in inputs.items():
        stem = path.name[:-len(".nii.gz")]
        saved[name] = (path, root / "eval" / stem / "{}_prob.nii.gz".format(stem))
        assert saved[name][1].is_file(), sorted(str(p) for p in (root / "eval").rglob("*"))
    return saved


def run(command, cwd):
    """``command`` run in ``cwd``; the seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=str(cwd), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, t1_crop):
    """The bundle and the crop in every geometry (one data folder), run as the model zoo's READMEs say, from the
    bundle folder: ``python -m monai.bundle run --config_file configs/inference.json`` with ``--dataset_dir``;
    (bundle root, {geometry: (input path, saved probabilities path)}, seconds it took)."""
    base = tmp_path_factory.mktemp("evaluator")
    root = write_bundle(base / "bundle")
    inputs = write_volumes(base / "data", {geometry: t1_crop + (geometry,) for geometry in sorted(GEOMETRIES)})
    seconds = run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                   "--dataset_dir", str(base / "data")], root)
    return root, saved_outputs(root, inputs), seconds


def compare(root, path, probabilities_path):
    """medadv's outputs on the volume at ``path`` against the probabilities MONAI's evaluator saved: (largest
    probability difference, fraction of voxels whose labels agree, label fractions)."""
    written = nib.load(str(probabilities_path))
    expected = np.asarray(written.dataobj, dtype=np.float64)
    expected = expected.reshape(expected.shape[:3] + (-1,))  # SaveImaged: channels last (i, j, k, C)
    assert expected.shape[3] == 3 and np.abs(expected.sum(axis=3) - 1.0).max() < 1e-5  # probabilities, not labels
    assert np.allclose(written.affine, nib.load(str(path)).affine, atol=1e-4)  # Invertd: back on the file's grid

    model = load_model(root)
    assert [list(step)[0] for step in model.description.preprocessing] == ["spacing", "intensity"]
    assert model.activation == "softmax"  # the softmax before Invertd: probabilities go back to the input's grid
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    with torch.no_grad(), model.on_grid(volume):
        ours = model(volume.as_tensor())[0].double().numpy()
    # the saved file's voxel order; Slicer's reader may store an oblique file with an axis flipped (same anatomy):
    # both in the network convention (RAS)
    file_grid = GridOrientation.from_ijk_to_ras(written.affine, expected.shape[:3][::-1])
    expected = np.stack([file_grid.to_network(np.transpose(expected[..., c], (2, 1, 0)))
                         for c in range(expected.shape[-1])])
    assert ours.shape == expected.shape
    fractions = np.bincount(expected.argmax(0).ravel(), minlength=3) / expected[0].size
    return (float(np.abs(ours - expected).max()), float((ours.argmax(0) == expected.argmax(0)).mean()),
            np.round(fractions, 3).tolist())


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_bundle_outputs_equal_monai_s_evaluator(evaluated, geometry):
    root, saved, seconds = evaluated
    difference, agreement, fractions = compare(root, *saved[geometry])
    print("{}: evaluator {:.1f} s, labels agree on {:.5f} of the voxels (label fractions {}), largest probability "
          "difference {:.2e}".format(geometry, seconds, agreement, fractions, difference))
    assert difference < 1e-4 and agreement >= 0.999


# Newer Spacing settings, with other inferer settings (Gaussian weights of another sigma, replicate padding where
# the window is larger than the image, uneven overlap), on the crop with 2 mm slices (61 x 73 x 29 voxels of
# 1 x 1 x 2 mm) stored oblique with an axis flipped. The target spacings put no output voxel half-way between two
# input voxels: there nearest picks one by the float noise of the file's matrix, which Slicer's reader and
# MONAI's read differently (to 2e-6), so a spacing such as 1.5 mm from 1 mm (ties every other voxel) decides
# those ties differently.
NEWER = {
    "nearest": {"pixdim": [1.73, 2.31, 2.57], "mode": "nearest"},
    "bilinear reflection, align_corners, scale_extent": {"pixdim": [1.73, 2.31, 2.57], "mode": "bilinear",
                                                         "padding_mode": "reflection", "align_corners": True,
                                                         "scale_extent": True},
}
NEWER_INFERER = {"roi_size": [40, 24, 16], "sw_batch_size": 2, "overlap": [0.5, 0.25, 0.4], "mode": "gaussian",
                 "sigma_scale": 0.2, "padding_mode": "replicate"}
# MONAI's own monai.bundle.run (what python -m monai.bundle run calls) for each bundle, in one process
RUN_EACH = ("import sys; from monai.bundle import run\nfor root in sys.argv[2:]: run(run_id='run', "
            "config_file=root + '/configs/inference.json', bundle_root=root, dataset_dir=sys.argv[1])")


@pytest.fixture(scope="module")
def newer_evaluated(tmp_path_factory, t1_crop):
    """A bundle for each of :data:`NEWER`, run by MONAI's evaluator on the anisotropic crop: ({case: bundle root},
    {name: (input path, probabilities path)} per case, seconds it took)."""
    base = tmp_path_factory.mktemp("newer")
    array, affine = t1_crop
    affine = affine.copy()
    affine[:3, 2] *= 2.0  # every other slice: 2 mm
    inputs = write_volumes(base / "data", {"oblique": (array[:, :, ::2], affine, "oblique")})
    roots = {case: write_bundle(base / "bundle{}".format(index), NEWER[case], NEWER_INFERER)
             for index, case in enumerate(NEWER)}
    seconds = run([sys.executable, "-c", RUN_EACH, str(base / "data")] + [str(root) for root in roots.values()],
                  base)
    return roots, {case: saved_outputs(root, inputs) for case, root in roots.items()}, seconds


@pytest.mark.parametrize("case", list(NEWER))
def test_newer_spacing_settings_equal_monai_s_evaluator(newer_evaluated, case):
    roots, saved, seconds = newer_evaluated
    path, probabilities_path = saved[case]["oblique"]
    assert nib.load(str(path)).shape == (61, 73, 29)
    model = load_model(roots[case])
    spacing = model.description.preprocessing[0]
    assert all(spacing.get(key, False) == value for key, value in NEWER[case].items() if key != "pixdim")
    assert {key: model.description.window[key] for key in NEWER_INFERER} == NEWER_INFERER
    difference, agreement, fractions = compare(roots[case], path, probabilities_path)
    print("{}: evaluators {:.1f} s, labels agree on {:.5f} of the voxels (label fractions {}), largest probability "
          "difference {:.2e}".format(case, seconds, agreement, fractions, difference))
    assert difference < 1e-4 and agreement >= 0.999
