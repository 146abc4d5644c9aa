"""``medadv run`` on a classifier, through the installed command: the files, the table's columns, the geometry
of what is written back, the scene's nodes, and the refusals of a segmentation reference and of ``--label``."""
import csv
import json
import subprocess
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import MEDADV

CLASSES = ["lower", "middle", "upper"]
COLUMNS = ["model", "attack", "epsilon", "predicted", "predicted_name", "confidence", "label", "label_probability",
           "flipped", "linf", "l2", "linf_fraction", "l2_fraction", "psnr", "ssim"]
AFFINE = np.array([[0.0, -1.5, 0.0, 30.0], [1.2, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def medadv(*args):
    return subprocess.run([MEDADV] + [str(a) for a in args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A MONAI DenseNet classifier folder (3 classes, random weights) and a 12x14x8 axis-permuted volume."""
    from monai.networks.nets import DenseNet
    root = tmp_path_factory.mktemp("classifier")
    architecture = {"name": "DenseNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                                 "init_features": 4, "growth_rate": 4, "block_config": [1, 1],
                                                 "bn_size": 2}}
    torch.manual_seed(0)
    network = DenseNet(**architecture["args"])
    model = root / "model"
    model.mkdir()
    torch.save(network.state_dict(), model / "model.pt")
    (model / "model.json").write_text(json.dumps({
        "name": "tiny-classifier", "task": "classification", "architecture": architecture,
        "labels": [{"value": value, "name": name} for value, name in enumerate(CLASSES)],
        "intensity": {"type": "zscore"}}))
    array = np.random.default_rng(1).normal(100.0, 20.0, (12, 14, 8)).astype(np.float32)
    volume = root / "image.nii.gz"
    nib.save(nib.Nifti1Image(array, AFFINE), str(volume))
    nib.save(nib.Nifti1Image((array > 100).astype(np.int16), AFFINE), str(root / "labels.nii.gz"))
    return model, volume


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    model, volume = files
    out = tmp_path_factory.mktemp("run") / "results"
    completed = medadv("run", "--volume", volume, "--model", model, "--attack", "pgd", "--steps", "3",
                       "--epsilon", "0.02", "0.2", "--label", 1, "--out", out, "-q")
    assert completed.returncode == 0, completed.stderr
    return out, completed


def test_a_classifier_run_writes_its_files_and_the_issue_s_columns(run):
    out, completed = run
    names = {path.name for path in out.iterdir()}
    assert names == {"scene.mrb", "metrics.csv", "report.png", "run.json", "saliency.nii.gz",
                     "adversarial_0.nii.gz", "adversarial_0.02.nii.gz", "adversarial_0.2.nii.gz",
                     "perturbation_0.02.nii.gz", "perturbation_0.2.nii.gz"}
    with open(str(out / "metrics.csv")) as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == COLUMNS
    assert [float(row["epsilon"]) for row in rows] == [0.0, 0.02, 0.2]
    assert all(row["predicted_name"] in CLASSES and row["label"] == "1" for row in rows)
    assert rows[0]["flipped"] in ("False", "0") and float(rows[0]["linf"]) == 0.0
    for row in rows:
        probabilities = float(row["confidence"]), float(row["label_probability"])
        assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert float(rows[2]["linf_fraction"]) <= 0.2 + 1e-6
    assert "predicted" in completed.stdout and "flipped" in completed.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["label"] == 1 and record["model"]["task"] == "classification"


def test_what_is_written_back_lies_on_the_input_grid(run, files):
    out, _ = run
    _, volume = files
    original = nib.load(str(volume))
    for name in ("adversarial_0.2.nii.gz", "perturbation_0.2.nii.gz", "saliency.nii.gz"):
        image = nib.load(str(out / name))
        assert image.shape == original.shape
        np.testing.assert_allclose(image.affine, original.affine, atol=1e-5)
    clean = nib.load(str(out / "adversarial_0.nii.gz")).get_fdata()
    np.testing.assert_allclose(clean, original.get_fdata(), rtol=1e-6)
    attacked = nib.load(str(out / "adversarial_0.2.nii.gz")).get_fdata()
    perturbation = nib.load(str(out / "perturbation_0.2.nii.gz")).get_fdata()
    np.testing.assert_allclose(attacked - clean, perturbation, atol=1e-3)
    saliency = nib.load(str(out / "saliency.nii.gz")).get_fdata()
    assert saliency.min() >= 0.0 and saliency.max() > 0.0


def test_the_scene_holds_the_classifier_s_nodes(run):
    out, _ = run
    with zipfile.ZipFile(str(out / "scene.mrb")) as archive:
        scene_text = next(archive.read(name).decode() for name in archive.namelist() if name.endswith(".mrml"))
    for part in ("saliency", "perturbation", "confidence vs epsilon", "metrics"):
        assert part in scene_text, part
    assert "segmentation" not in scene_text.lower().replace("vtkmrmlsegmentation", "")


def test_a_classifier_refuses_a_reference_segmentation_and_a_segmenter_refuses_label(files, tmp_path):
    model, volume = files
    completed = medadv("run", "--volume", volume, "--model", model, "--attack", "fgsm", "--epsilon", "0.01",
                       "--reference", volume.parent / "labels.nii.gz", "--out", tmp_path / "a", "-q")
    assert completed.returncode != 0
    assert completed.stderr.strip().count("\n") == 0 and "classifier" in completed.stderr
    assert not (tmp_path / "a").exists()
    completed = medadv("run", "--volume", volume, "--model", model, "--attack", "fgsm", "--epsilon", "0.01",
                       "--label", 7, "--out", tmp_path / "b", "-q")
    assert completed.returncode != 0 and completed.stderr.strip().count("\n") == 0
    assert "7" in completed.stderr and not (tmp_path / "b").exists()


def test_the_classification_demo_runs_on_a_held_out_slice(tmp_path):
    completed = medadv("demo", "--task", "classification", "--attack", "pgd", "--steps", "5", "--epsilon", "0.05",
                       "--out", tmp_path / "demo", "-q")
    assert completed.returncode == 0, completed.stderr
    with open(str(tmp_path / "demo" / "metrics.csv")) as stream:
        clean, attacked = list(csv.DictReader(stream))
    assert clean["predicted_name"] == "lateral ventricles" and clean["label"] == "1"
    assert attacked["flipped"] == "True" and float(attacked["linf_fraction"]) <= 0.05 + 1e-6
