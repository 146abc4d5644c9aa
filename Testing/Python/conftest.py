"""Shared fixtures: real MRML scenes from slicer-core and the embedded sample; the test process's exit."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nilearn.datasets
import numpy as np
import pytest
import torch
import vtk

from MedAdvRobustnessLib.networks.models import ModelDescription, SegmentationModel
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())
MEDADV = str(Path(sys.executable).with_name("medadv"))  # the console command of this environment
SHAPE = (12, 10, 8)


def tiny_model(activation="logits", labels=4, hidden=6, seed=0, dtype=torch.float32, intensity="percentile",
               window=None):
    """A seeded two-layer network (``labels`` labels, background included) with percentile normalisation."""
    torch.manual_seed(seed)
    channels = labels - 1 if activation == "sigmoid" else labels
    layers = [torch.nn.Conv3d(1, hidden, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(hidden, channels, 3, padding=1)]
    if activation == "softmax":
        layers.append(torch.nn.Softmax(dim=1))
    elif activation == "sigmoid":
        layers.append(torch.nn.Sigmoid())
    spec = {"type": "percentile", "lower": 1.0, "upper": 99.0} if intensity == "percentile" else {"type": "none"}
    description = ModelDescription(name="tiny", output_activation=activation, intensity=spec, window=window)
    return SegmentationModel(torch.nn.Sequential(*layers), description).to(dtype).eval()


def random_volume(shape=SHAPE, seed=0, dtype=torch.float32):
    """A seeded (1, 1, *shape) volume of intensities uniform in [-50, 350)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand((1, 1) + tuple(shape), generator=generator, dtype=torch.float64) * 400.0 - 50.0).to(dtype)


# The 1 mm MNI152 T1 of the nilearn wheel, and ways to store a crop of it in other orientations.
T1 = Path(nilearn.datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def rotation(degrees, axis):
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    other = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[other[0], other[0]], matrix[other[0], other[1]] = c, -s
    matrix[other[1], other[0]], matrix[other[1], other[1]] = s, c
    return matrix


GEOMETRIES = {  # (axis permutation of the stored array, flips, extra rotation): directions of i, j, k in RAS
    "LPS-permuted": ((2, 0, 1), (True, True, False), np.eye(3)),
    "oblique": ((0, 1, 2), (False, True, False), rotation(12.0, 0) @ rotation(-7.0, 2)),
}


@pytest.fixture(scope="module")
def t1_crop():
    """A 61x73x57 crop of the 1 mm MNI152 T1 (odd sizes), RAS, as (array, affine)."""
    image = nib.load(str(T1))
    array = np.asarray(image.dataobj, dtype=np.float32)[68:129, 80:153, 60:117]
    return array, image.affine


def stored(t1_crop, geometry, path):
    """The crop written as NIfTI with its axes permuted and flipped (and the affine rotated): same anatomy."""
    array, affine = t1_crop
    permutation, flips, rotate = GEOMETRIES[geometry]
    data = np.transpose(array, permutation)
    directions = np.diag(np.abs(np.diag(affine[:3, :3])))[:, list(permutation)]
    for axis, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis=axis)
            directions[:, axis] *= -1
    matrix = np.eye(4)
    matrix[:3, :3] = rotate @ directions
    matrix[:3, 3] = [-30.0, -40.0, 10.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), matrix), str(path))
    return path


# a model-zoo bundle's post-processing: softmax, then Invertd back to the file's grid (linear)
SOFTMAX_INVERTD = [{"_target_": "Activationsd", "softmax": True},
                   {"_target_": "Invertd", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False,
                    "to_tensor": True}]


def write_bundle(root, network, network_args, transforms, roi_size, postprocessing, labels):
    """A MONAI bundle as the model zoo lays them out (inference config, metadata with label names, weights): a UNet
    of ``network_args``, loading and RAS orientation followed by ``transforms`` (on ``image``), a Gaussian sliding
    window of ``roi_size``, and ``postprocessing`` on ``pred``."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.save(network.state_dict(), str(root / "models" / "model.pt"))
    image = {"keys": "image"}
    steps = [{"_target_": "LoadImaged", "image_only": True}, {"_target_": "EnsureChannelFirstd"},
             {"_target_": "Orientationd", "axcodes": "RAS"}] + list(transforms) + [{"_target_": "EnsureTyped"}]
    config = {
        "bundle_root": ".",
        "network_def": dict({"_target_": "UNet"}, **network_args),
        "network": "$@network_def.to('cpu')",
        "preprocessing": {"_target_": "Compose", "transforms": [dict(step, **image) for step in steps]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi_size), "overlap": 0.25,
                    "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [dict(step, keys="pred") for step in postprocessing]},
    }
    metadata = {"name": "tiny bundle", "version": "0.1.0", "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1}},
        "outputs": {"pred": {"type": "image", "num_channels": network_args["out_channels"], "channel_def": labels}}}}
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return root


def monai_bundle_run(root, network, image_path, postprocessing=True):
    """MONAI's own pipeline for a bundle, item by item as ConfigParser builds it: its preprocessing, its inferer
    (``pred``: the first item's outputs) and, unless told not to, its postprocessing; the data dictionary."""
    from monai.bundle import ConfigParser
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    data = parser.get_parsed_content("preprocessing")({"image": str(image_path)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None].float(), network)[0]
    return parser.get_parsed_content("postprocessing")(data) if postprocessing else data


def drive_as_widget(slicer_scene, settings, start, cancel_on=None):
    """Store ``settings`` in the module's parameter node, press the button (``start(slicer_scene, node)``), poll
    like the widget's timer (cancel once a message holds ``cancel_on``); the run and its (fraction, message)s."""
    from MedAdvRobustnessLib.module import logic as module_logic
    node = module_logic.parameter_node(slicer_scene.scene)
    module_logic.write_settings(node, settings)
    run = start(slicer_scene, node)
    messages = []
    while not run.done:
        time.sleep(0.05)
        messages.append(run.progress)
        if cancel_on and cancel_on in messages[-1][1]:
            run.cancel()
    return run, messages


@pytest.fixture
def slicer_scene():
    """A new standalone scene bound to real vtkSlicer*Logic objects."""
    return SlicerScene.standalone()


@pytest.fixture
def sample_nodes(slicer_scene):
    """The embedded sample volume and its tissue label map, loaded with Slicer's reader."""
    volume = slicer_scene.load_volume(SAMPLE_VOLUME)
    labels = slicer_scene.load_volume(SAMPLE_LABELS, label_map=True)
    return volume, labels


_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's status once everything is reported, without interpreter finalization.

    Once in about six full runs here, the interpreter crashed (SIGSEGV) while freeing what the suite left behind
    (VTK render windows and scenes of the in-process viewer apps, torch and OpenMP state of worker threads) after
    every test had passed and the summary was printed; the cause is not found. The commands themselves are tested
    in subprocesses whose exit status the tests check, so this skips nothing that is tested.
    """
    if "status" in _EXIT and not os.environ.get("MEDADV_TEST_FINALIZE"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])


def can_mount():
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (``unshare -rm``)."""
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
