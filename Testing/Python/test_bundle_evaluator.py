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


def inference_config():
    """configs/inference.json laid out as the model zoo's (spleen_ct_segmentation's, say): the data list from a
    folder, dataset and dataloader, the evaluator with its checkpoint loader, ``initialize`` and ``run``."""
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
            dict({"_target_": "Spacingd", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"}, **image),
            dict({"_target_": "NormalizeIntensityd", "nonzero": False}, **image),
            dict({"_target_": "EnsureTyped"}, **image)]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [24, 24, 24], "sw_batch_size": 4,
                    "overlap": 0.5},
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


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, t1_crop):
    """The bundle (seeded weights) and the crop in every geometry (one data folder), run as the model zoo's
    READMEs say, from the bundle folder: ``python -m monai.bundle run --config_file configs/inference.json`` with
    ``--dataset_dir``; (bundle root, {geometry: (input path, saved probabilities path)}, seconds it took)."""
    base = tmp_path_factory.mktemp("evaluator")
    root, data = base / "bundle", base / "data"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    data.mkdir()
    torch.manual_seed(0)
    network = UNet(**{key: value for key, value in UNET.items() if key != "_target_"})
    torch.save(network.state_dict(), str(root / "models" / "model.pt"))
    (root / "configs" / "inference.json").write_text(json.dumps(inference_config(), indent=4))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    inputs = {geometry: stored(t1_crop, geometry, data / "t1_{}.nii.gz".format(geometry))
              for geometry in sorted(GEOMETRIES)}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--dataset_dir", str(data)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=str(root), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    output, saved = root / "eval", {}  # output_dir: @bundle_root + '/eval'
    for geometry, path in inputs.items():
        stem = path.name[:-len(".nii.gz")]
        saved[geometry] = (path, output / stem / "{}_prob.nii.gz".format(stem))
        assert saved[geometry][1].is_file(), sorted(str(p) for p in output.rglob("*"))
    return root, saved, seconds


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_bundle_outputs_equal_monai_s_evaluator(evaluated, geometry):
    root, saved, seconds = evaluated
    path, probabilities_path = saved[geometry]
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
    difference = float(np.abs(ours - expected).max())
    agreement = float((ours.argmax(0) == expected.argmax(0)).mean())
    fractions = np.bincount(expected.argmax(0).ravel(), minlength=3) / expected[0].size
    print("{}: evaluator {:.1f} s, labels agree on {:.5f} of the voxels (label fractions {}), largest probability "
          "difference {:.2e}".format(geometry, seconds, agreement, np.round(fractions, 3).tolist(), difference))
    assert difference < 1e-4 and agreement >= 0.999
