"""A classification network in a MONAI bundle (Orientation, Spacing, ScaleIntensity, Resize, SimpleInferer, softmax):
medadv's class probabilities against MONAI's own preprocessing, inferer and postprocessing, the task and the class
names read from the bundle, and an attack on it through ``medadv run``."""
import csv
import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet

from conftest import MEDADV, monai_bundle_run, stored
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.scene.nodes import volume_from_node
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

DENSENET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_features": 4, "growth_rate": 4,
            "block_config": [2, 2]}
CLASSES = {"0": "normal", "1": "atrophy", "2": "lesion"}


def write_classifier_bundle(root, network):
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.save(network.state_dict(), str(root / "models" / "model.pt"))
    steps = [{"_target_": "LoadImaged", "image_only": True}, {"_target_": "EnsureChannelFirstd"},
             {"_target_": "Orientationd", "axcodes": "RAS"},
             {"_target_": "Spacingd", "pixdim": [3.0, 3.0, 3.0], "mode": "bilinear"},
             {"_target_": "ScaleIntensityd", "minv": 0.0, "maxv": 1.0},
             {"_target_": "Resized", "spatial_size": [24, 28, 20], "mode": "trilinear"},
             {"_target_": "EnsureTyped"}]
    config = {"bundle_root": ".", "network_def": dict({"_target_": "DenseNet"}, **DENSENET),
              "network": "$@network_def.to('cpu')",
              "preprocessing": {"_target_": "Compose", "transforms": [dict(step, keys="image") for step in steps]},
              "inferer": {"_target_": "SimpleInferer"},
              "postprocessing": {"_target_": "Compose",
                                 "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]}}
    metadata = {"name": "tiny classifier bundle", "version": "0.1.0", "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1}},
        "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 3,
                             "channel_def": CLASSES}}}}
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, t1_crop):
    folder = tmp_path_factory.mktemp("classifier-bundle")
    torch.manual_seed(0)
    network = DenseNet(**DENSENET).eval()
    with torch.no_grad():  # a bias that makes the three classes compete (untrained: nearly equal scores)
        network.class_layers.out.bias.copy_(torch.tensor([0.0, 0.02, -0.02]))
    root = write_classifier_bundle(folder / "bundle", network)
    path = stored(t1_crop, "LPS-permuted", folder / "t1.nii.gz")
    return root, network, path


def test_a_bundle_classifier_gives_monai_s_class_probabilities(bundle):
    root, network, path = bundle
    expected = np.asarray(monai_bundle_run(root, network, path)["pred"], dtype=np.float64)
    model = load_model(root)
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    with torch.no_grad(), model.on_grid(volume):
        outputs = model(volume.as_tensor())
    assert model.task == "classification" and tuple(outputs.shape) == (1, 3)
    assert [label.name for label in model.labels(outputs)] == list(CLASSES.values())
    ours = torch.softmax(outputs.double(), 1)[0].numpy() if model.activation == "logits" else outputs[0].numpy()
    print("MONAI", expected, "medadv", ours)
    assert np.abs(ours - expected).max() < 1e-5


def test_medadv_run_attacks_a_bundle_classifier(bundle, tmp_path):
    root, _, path = bundle
    out = tmp_path / "run"
    completed = subprocess.run([MEDADV, "run", "--volume", str(path), "--model", str(root), "--label", "1",
                                "--attack", "fgsm", "--epsilon", "0.05", "--out", str(out), "--quiet"],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    with open(str(out / "metrics.csv")) as stream:
        rows = list(csv.DictReader(stream))
    assert [float(row["epsilon"]) for row in rows] == [0.0, 0.05]
    assert all(row["predicted_name"] in CLASSES.values() for row in rows)
    assert float(rows[1]["label_probability"]) < float(rows[0]["label_probability"])  # FGSM lowers the true class
    written = nib.load(str(out / "adversarial_0.05.nii.gz"))
    assert written.shape == nib.load(str(path)).shape
