"""The demo classifier: axial level of MNI152 slices, trained reproducibly, shipped as ``demo-classifier``."""
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from MedAdvRobustnessLib import classification_training as ct
from MedAdvRobustnessLib.networks.models import MODELS_DIR, load_model

README = Path(__file__).resolve().parents[2] / "README.md"
SHIPPED = MODELS_DIR / "demo-classifier"


def test_levels_are_defined_from_the_atlas_z():
    assert [ct.level_of(z) for z in (-40.0, -0.5, 0.0, 29.5, 30.0, 70.0)] == [0, 0, 1, 1, 2, 2]
    _, classes, affines, indices = ct.axial_slices()
    assert set(classes.tolist()) == {0, 1, 2}
    assert all(ct.level_of(affine[2, 3]) == level for affine, level in zip(affines, classes))
    held_out = ct.split(indices)
    assert set(classes[held_out].tolist()) == {0, 1, 2} and 0 < held_out.sum() < len(indices) / 3


def tiny_training(folder, iterations, seed=0):
    return ct.train(folder, iterations=iterations, batch_size=8, seed=seed, held_out_count=60,
                    progress=lambda _: None)


def test_a_tiny_training_learns_above_chance_on_held_out_slices(tmp_path):
    assert tiny_training(tmp_path, 30) > 1.0 / len(ct.LEVELS) + 0.1


def test_the_same_seed_trains_the_same_weights(tmp_path):
    for name, seed in (("first", 0), ("second", 0), ("other", 1)):
        tiny_training(tmp_path / name, 1, seed)
    first, second, other = (torch.load(str(tmp_path / name / "model.pt")) for name in ("first", "second", "other"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_the_shipped_model_is_a_declared_classifier_of_the_three_levels():
    model = load_model("demo-classifier")
    assert model.task == "classification"
    assert [label.name for label in model.description.labels] == [level[0] for level in ct.LEVELS]
    assert model.description.architecture["args"]["spatial_dims"] == 2
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 1_000_000


def test_the_shipped_model_reaches_the_accuracy_the_readme_states():
    model = load_model("demo-classifier")
    log = json.loads((SHIPPED / "training.json").read_text())
    score = ct.held_out_accuracy(model.network, seed=log["seed"], count=log["held_out_count"])
    stated = float(re.search(r"held-out accuracy of ([0-9.]+) %", README.read_text()).group(1)) / 100
    assert abs(score - stated) < 0.01


def test_the_sample_slices_are_held_out_one_slice_volumes_classified_right():
    model = load_model("demo-classifier")
    _, _, affines, indices = ct.axial_slices()
    held_out_z = {round(float(affine[2, 3]), 1) for affine in affines[ct.split(indices)]}
    paths = sorted(ct.SLICE_DIR.glob("*.nii.gz"))
    assert len(paths) == len(ct.LEVELS)
    from MedAdvRobustnessLib.networks.preprocessing import normalize_intensity
    for path in paths:
        image = nib.load(str(path))
        assert image.shape == (40, 48, 1) and np.allclose(np.diag(image.affine)[:3], (4.0, 4.0, 2.0))
        z = float(image.affine[2, 3])
        assert round(z, 1) in held_out_z
        slice_ = torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32)[None, None, :, :, 0])
        with torch.no_grad():
            predicted = int(model.network.eval()(normalize_intensity(slice_, model.description.intensity)).argmax())
        assert predicted == ct.level_of(z)
