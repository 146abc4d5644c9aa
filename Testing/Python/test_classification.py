"""Classifiers through the networks and evaluation layers: the sweep's rows and saliency map, the attacks against
torchattacks and their budgets, 2D networks on one-slice volumes, several channels, and the refusals."""
import math

import numpy as np
import pytest
import torch

from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.evaluation.classification import minimal_fractions
from MedAdvRobustnessLib.evaluation.sweep import run_sweep
from MedAdvRobustnessLib.networks.models import ModelDescription, SegmentationModel, describe
from MedAdvRobustnessLib.networks.volume import Volume
from MedAdvRobustnessLib.probes.attacks import AttackRecord
from MedAdvRobustnessLib.probes.registry import make_probe

CLASSES = ["lower", "middle", "upper", "outside"]
COLUMNS = ["model", "attack", "epsilon", "predicted", "predicted_name", "confidence", "label", "label_probability",
           "flipped", "linf", "l2", "linf_fraction", "l2_fraction", "psnr", "ssim"]


def classifier_network(channels=1, classes=4, spatial_dims=3, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    pool = torch.nn.AdaptiveAvgPool3d if spatial_dims == 3 else torch.nn.AdaptiveAvgPool2d
    return torch.nn.Sequential(conv(channels, 6, 3, padding=1), torch.nn.Tanh(), pool(2), torch.nn.Flatten(),
                               torch.nn.Linear(6 * 2 ** spatial_dims, classes)).eval()


def classifier(channels=1, task=None, seed=0, **description):
    network = classifier_network(channels, seed=seed)
    return SegmentationModel(network, ModelDescription.from_dict(dict(
        name="tiny-classifier", task=task, labels=CLASSES, **description)))


def image(shape=(10, 9, 8), seed=1):
    array = np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)
    return Volume.from_array(array, name="image")


# --- 1. evaluation ------------------------------------------------------------------------------------------------

def test_a_classifier_sweep_gives_one_row_per_strength_with_the_issue_s_columns():
    model, volume, messages = classifier(), image(), []
    result = run_sweep(model, volume, make_probe("pgd", steps=5, random_start=False), [0.05, 0.3], reference=2,
                       progress=lambda fraction, text: messages.append(text))
    assert model.task == "classification"
    assert "pgd epsilon 0.05: step 1/5 loss" in messages[0] and " accuracy " in messages[0]  # not a Dice
    assert list(result.columns) == COLUMNS
    assert [row["epsilon"] for row in result.rows] == [0.0, 0.05, 0.3]
    clean, strongest = result.rows[0], result.rows[-1]
    with torch.no_grad():
        probabilities = torch.softmax(model.network(volume.as_tensor()), dim=1)[0]
    assert clean["predicted"] == int(probabilities.argmax())
    assert clean["predicted_name"] == CLASSES[clean["predicted"]]
    assert clean["confidence"] == pytest.approx(float(probabilities.max()), rel=1e-5)
    assert clean["label"] == 2 and clean["label_probability"] == pytest.approx(float(probabilities[2]), rel=1e-5)
    assert clean["flipped"] is False and clean["linf"] == 0.0 and clean["ssim"] == 1.0
    # attacking the true class lowers its probability, within the budget
    assert strongest["label_probability"] < clean["label_probability"]
    assert strongest["linf_fraction"] <= 0.3 + 1e-6
    assert strongest["flipped"] == (strongest["predicted"] != clean["predicted"])
    assert all(row["label"] == 2 for row in result.rows)


def test_without_a_true_class_the_label_columns_are_empty_and_the_attack_pushes_off_the_clean_class():
    result = run_sweep(classifier(), image(), make_probe("fgsm"), [0.5])
    assert [row["label"] for row in result.rows] == [None, None]
    assert [row["label_probability"] for row in result.rows] == [None, None]
    assert result.rows[1]["confidence"] != result.rows[0]["confidence"]


def test_the_saliency_map_is_the_gradient_of_the_predicted_class_s_logit_as_finite_differences_give_it():
    model, volume = classifier(), image()
    result = run_sweep(model, volume, make_probe("fgsm"), [0.1])
    assert result.saliency.shape == volume.array.shape and result.saliency.min() >= 0.0
    network, inputs = model.network.double(), volume.as_tensor().double()
    predicted, step = result.rows[0]["predicted"], 1e-5
    for voxel in [(0, 0, 0), (4, 5, 3), (9, 8, 7)]:
        shifted = [inputs.clone() for _ in range(2)]
        shifted[0][(0, 0) + voxel] += step
        shifted[1][(0, 0) + voxel] -= step
        with torch.no_grad():
            logits = [float(network(x)[0, predicted]) for x in shifted]
        assert result.saliency[voxel] == pytest.approx(abs(logits[0] - logits[1]) / (2 * step), rel=1e-3, abs=1e-7)


def test_a_reported_minimal_perturbation_becomes_fractions_of_the_range():
    record = AttackRecord("deepfool", 0.1, 0)
    assert minimal_fractions(record, 2.0) == {}
    record.details["minimal_perturbation"] = {"l2": 0.5, "linf": None}
    assert minimal_fractions(record, 2.0) == {"minimal_l2_fraction": 0.25, "minimal_linf_fraction": None}


# --- 2. attacks ---------------------------------------------------------------------------------------------------

def test_fgsm_and_pgd_equal_torchattacks_on_a_classifier():
    import torchattacks
    model = classifier()
    inputs = image().as_tensor()  # in [0, 1]: torchattacks' bounds
    labels = model.predict(inputs)
    network = model.network
    ours, _ = make_probe("fgsm")(model, inputs, labels, 8 / 255, (0.0, 1.0))
    theirs = torchattacks.FGSM(network, eps=8 / 255)(inputs, labels)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    ours, _ = make_probe("pgd", steps=7, step_size=0.25, random_start=False)(model, inputs, labels, 8 / 255,
                                                                          (0.0, 1.0))
    theirs = torchattacks.PGD(network, eps=8 / 255, alpha=0.25 * 8 / 255, steps=7, random_start=False)(inputs,
                                                                                                       labels)
    assert not torch.equal(theirs, inputs)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, settings", [
    ("fgsm", {}), ("pgd", {"steps": 4}), ("pgd", {"steps": 4, "norm": "l2"}), ("pgd", {"steps": 3, "restarts": 2}),
    ("apgd-ce", {"steps": 4}), ("apgd-dlr", {"steps": 4}), ("apgd-dlr", {"steps": 3, "restarts": 2}), ("apgd-ce", {"steps": 4, "norm": "l2"}),
    ("pgd", {"steps": 3, "target_mode": "permute"}), ("apgd-ce", {"steps": 3, "target_mode": "turn",
                                                                  "source_label": 1, "target_label": 3})])
def test_every_attack_on_a_classifier_respects_its_budget_and_the_bounds(name, settings):
    model, volume = classifier(), image()
    epsilon = 0.1
    result = run_sweep(model, volume, make_probe(name, **settings), [epsilon], reference=1)
    row, probed = result.rows[1], result.outcomes[1].probed
    assert probed.min() >= volume.array.min() - 1e-6 and probed.max() <= volume.array.max() + 1e-6
    assert row["linf"] > 0
    if settings.get("norm") == "l2":  # the root-mean-square perturbation is at most epsilon of the range
        assert row["l2_fraction"] <= epsilon * math.sqrt(volume.array.size) * (1 + 1e-5)
    else:
        assert row["linf_fraction"] <= epsilon + 1e-6


def test_the_restarts_scores_are_recorded_per_restart():
    result = run_sweep(classifier(), image(), make_probe("pgd", steps=2, restarts=3), [0.1])
    scores = result.outcomes[1].record.details["restart_scores"]
    assert len(scores) == 3 and all(len(s) == 1 for s in scores)


@pytest.mark.parametrize("name", ["dag", "segpgd", "cospgd"])
def test_segmentation_only_attacks_are_refused_for_a_classifier(name):
    with pytest.raises(InputError, match="for segmentation networks only; tiny-classifier is a classification"):
        run_sweep(classifier(), image(), make_probe(name), [0.1])


@pytest.mark.parametrize("mode", ["grow", "vanish"])
def test_region_targets_are_refused_for_a_classifier(mode):
    with pytest.raises(InputError, match="target mode {} moves a region's border; for a classifier".format(mode)):
        run_sweep(classifier(), image(), make_probe("pgd", steps=2, target_mode=mode, source_label=1), [0.1])


# --- 5. bad input -------------------------------------------------------------------------------------------------

def test_a_segmentation_reference_is_refused_for_a_classifier():
    volume = image()
    with pytest.raises(InputError, match=r"the true class \(--label\) of a classifier is one class index \(0..3\), "
                                         r"not an image"):
        run_sweep(classifier(), volume, make_probe("fgsm"), [0.1], reference=np.zeros(volume.array.shape, np.int64))


def test_a_true_class_beyond_the_classes_is_refused():
    with pytest.raises(InputError, match=r"the true class \(--label\) is class 4 but the network has classes 0..3"):
        run_sweep(classifier(), image(), make_probe("fgsm"), [0.1], reference=4)


def test_a_declared_task_that_the_outputs_contradict_is_refused():
    with pytest.raises(InputError, match=r"declared a segmentation network but outputs shape \(1, 4\)"):
        describe(classifier(task="segmentation"), image().as_tensor())


# --- 3. 2D networks on one-slice volumes ----------------------------------------------------------------------

def densenet_2d_classifier():
    from MedAdvRobustnessLib.networks.models import build_network
    architecture = {"name": "DenseNet", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 4,
                                                 "init_features": 4, "growth_rate": 4, "block_config": [1, 1],
                                                 "bn_size": 2}}
    torch.manual_seed(0)
    network = build_network(architecture).eval()
    return SegmentationModel(network, ModelDescription.from_dict(dict(
        name="tiny-2d", architecture=architecture, labels=CLASSES))), network


@pytest.mark.parametrize("flat", [0, 1, 2])
def test_a_2d_classifier_gets_a_one_slice_volume_without_its_one_voxel_axis(flat):
    model, network = densenet_2d_classifier()
    shape = [16, 12, 14]
    shape[flat] = 1
    volume = image(tuple(shape))
    report = describe(model, volume)
    assert model.spatial_dims == 2 and model.task == "classification"
    assert report.lines()[1] == "task: classification, 2D network, 4 classes"
    assert "classes: 0 lower, 1 middle, 2 upper, 3 outside" in report.lines()
    with torch.no_grad():
        torch.testing.assert_close(model(volume.as_tensor()), network(volume.as_tensor().squeeze(flat + 2)))
    result = run_sweep(model, volume, make_probe("pgd", steps=3), [0.1])
    assert result.saliency.shape == volume.array.shape and result.outcomes[1].probed.shape == volume.array.shape


def test_a_2d_segmenter_s_outputs_come_back_on_the_one_slice_grid():
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 3, 3, padding=1).eval()
    model = SegmentationModel(network, ModelDescription.from_dict(dict(name="seg-2d", spatial_dims=2)))
    volume = image((12, 1, 10))
    outputs = model(volume.as_tensor())
    assert outputs.shape == (1, 3, 12, 1, 10)
    with torch.no_grad():
        torch.testing.assert_close(outputs[:, :, :, 0], network(volume.as_tensor()[:, :, :, 0]))
    assert model.task == "segmentation" and describe(model, volume).lines()[1] == "task: segmentation, 2D network"


@pytest.mark.parametrize("shape", [(10, 9, 8), (10, 1, 1)])
def test_a_2d_network_refuses_a_volume_without_exactly_one_one_voxel_axis(shape):
    model, _ = densenet_2d_classifier()
    size = "x".join(str(n) for n in shape)
    with pytest.raises(InputError, match="tiny-2d is a 2D network: it takes a one-slice volume .*, got " + size):
        model(image(shape).as_tensor())


# --- 4. several channels ------------------------------------------------------------------------------------------

AFFINE = np.array([[0.0, -1.5, 0.0, 30.0], [1.2, 0.0, 0.0, -20.0], [0.0, 0.0, -2.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def test_a_colour_volume_holds_its_channels_on_the_grid_of_each_one():
    rgb = np.random.default_rng(3).uniform(0, 255, (10, 9, 8, 3)).astype(np.float32)
    volume = Volume.from_array(rgb, AFFINE)
    channels = [Volume.from_array(rgb[..., c], AFFINE) for c in range(3)]
    assert volume.channels == 3 and volume.array.shape == (3,) + channels[0].array.shape
    for c, one in enumerate(channels):
        np.testing.assert_array_equal(volume.array[c], one.array)
        assert one.channels == 1 and one.as_tensor().shape == (1, 1) + one.array.shape
    assert volume.as_tensor().shape == (1, 3) + channels[0].array.shape
    np.testing.assert_array_equal(volume.affine, channels[0].affine)


def test_a_three_channel_classifier_is_attacked_within_budget_and_measured_over_its_channels():
    rgb = np.random.default_rng(4).uniform(0, 255, (10, 9, 8, 3)).astype(np.float32)
    volume = Volume.from_array(rgb, AFFINE)
    model = classifier(channels=3, in_channels=3)
    result = run_sweep(model, volume, make_probe("pgd", steps=3, random_start=False), [0.02], reference=1)
    row, probed = result.rows[1], result.outcomes[1].probed
    assert probed.shape == volume.array.shape and result.saliency.shape == volume.array.shape[1:]
    assert row["linf"] == pytest.approx(float(np.abs(probed - volume.array).max()))
    assert 0 < row["linf_fraction"] <= 0.02 + 1e-6
    assert 0.0 < row["ssim"] < 1.0
    assert not np.array_equal(probed[0] - volume.array[0], probed[1] - volume.array[1])


def test_a_colour_image_is_refused_by_a_one_channel_network():
    volume = Volume.from_array(np.random.default_rng(5).uniform(0, 1, (10, 9, 8, 3)))
    with pytest.raises(InputError, match=r"the network takes 1 input channel\(s\) but the volume has 3"):
        run_sweep(classifier(), volume, make_probe("fgsm"), [0.1])
