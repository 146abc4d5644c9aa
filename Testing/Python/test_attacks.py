"""Attacks, losses and the runner: epsilon bounds, Dice drops on the demo network, gradients through preprocessing."""
import numpy as np
import pytest
import torch

from conftest import random_volume, tiny_model as shared_tiny_model
from MedAdvRobustnessLib.probes.attacks import FGSM, PGD, AttackCancelled, check_epsilons, project_linf
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.scene.nodes import labels_from_node, volume_from_node
from MedAdvRobustnessLib.networks.outputs import predict_labels, voxel_loss
from MedAdvRobustnessLib.pipeline import run_on_nodes
from MedAdvRobustnessLib.evaluation.sweep import run_sweep


def tiny_model(activation="logits", window=None, seed=0):
    return shared_tiny_model(activation, labels=3, hidden=4, seed=seed, window=window)


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


@pytest.fixture
def sample(sample_nodes):
    volume_node, label_node = sample_nodes
    volume = volume_from_node(volume_node)
    return volume, labels_from_node(label_node, volume)


def test_projection_is_exact_in_float():
    original = torch.tensor([1000.1, -3.3, 7.7, 123456.78, 10.0], dtype=torch.float32)
    epsilon = 0.1000000001
    candidate = original + torch.tensor([1.0, -1.0, 0.05, 1.0, -1.0])
    projected = project_linf(candidate, original, epsilon, (-10.0, 200000.0))
    assert torch.all((projected.double() - original.double()).abs() <= epsilon)
    assert projected[2] == candidate[2]


def test_projection_is_exact_where_float32_epsilon_exceeds_epsilon():
    """float32(9.68) > 9.68: 10 - 9.68 lands many float steps beyond the ball near 0.32."""
    generator = torch.Generator().manual_seed(0)
    original = torch.randint(0, 243, (100000,), generator=generator).float()
    candidate = original + torch.randn(original.shape, generator=generator) * 20.0
    for epsilon in (9.68, 7.26, 2.42):
        projected = project_linf(candidate, original, epsilon, (0.0, 242.0))
        distance = (projected.double() - original.double()).abs()
        assert float(distance.max()) <= epsilon
        assert float(distance.max()) > epsilon - 1e-5
        assert float(projected.min()) >= 0.0 and float(projected.max()) <= 242.0


@pytest.mark.parametrize("attack", [FGSM(), PGD(steps=3, seed=1)], ids=["fgsm", "pgd"])
def test_attack_respects_epsilon_and_intensity_bounds_exactly(attack):
    model, volume = tiny_model(), random_volume()
    low, high = float(volume.min()), float(volume.max())
    labels = model.predict(volume)
    epsilon = 0.03 * (high - low)
    adversarial, record = attack(model, volume, labels, epsilon, (low, high))
    delta = adversarial.double() - volume.double()
    assert float(delta.abs().max()) <= epsilon
    assert float(delta.abs().max()) > 0.9 * epsilon
    assert float(adversarial.min()) >= low and float(adversarial.max()) <= high
    assert len(record.losses) == record.steps


def test_pgd_is_seeded():
    model, volume = tiny_model(), random_volume()
    labels = model.predict(volume)
    bounds = (float(volume.min()), float(volume.max()))
    first, _ = PGD(steps=2, seed=3)(model, volume, labels, 5.0, bounds)
    again, _ = PGD(steps=2, seed=3)(model, volume, labels, 5.0, bounds)
    other, _ = PGD(steps=2, seed=4)(model, volume, labels, 5.0, bounds)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_pgd_reports_progress_and_can_be_cancelled():
    model, volume = tiny_model(), random_volume()
    labels = model.predict(volume)
    seen = []
    with pytest.raises(AttackCancelled):
        PGD(steps=5)(model, volume, labels, 5.0, (-50.0, 350.0),
                     progress=lambda step, steps, loss, dice: seen.append(step),
                     is_cancelled=lambda: len(seen) >= 2)
    assert seen == [1, 2]


def test_gradient_flows_through_normalisation_and_windows():
    """Autograd gradient of the loss in raw intensities matches finite differences, windows and percentiles included."""
    model = tiny_model(window={"roi_size": [6, 6, 6], "overlap": 0.5}).double()
    volume = random_volume().double()
    labels = model.predict(volume)
    volume.requires_grad_(True)
    loss = voxel_loss(model(volume), labels, "logits").sum()
    gradient, = torch.autograd.grad(loss, volume)
    for index in [(0, 0, 1, 1, 1), (0, 0, 7, 5, 3), (0, 0, 11, 9, 7)]:
        step = torch.zeros_like(volume)
        step[index] = 1e-4
        with torch.no_grad():
            plus = voxel_loss(model(volume + step), labels, "logits").sum()
            minus = voxel_loss(model(volume - step), labels, "logits").sum()
        assert float((plus - minus) / 2e-4) == pytest.approx(float(gradient[index]), rel=1e-4, abs=1e-7)


def test_softmax_outputs_are_scored_like_logits():
    logits_model, softmax_model = tiny_model("logits"), tiny_model("softmax")
    volume = random_volume()
    logits, probabilities = logits_model(volume), softmax_model(volume)
    labels = predict_labels(logits, "logits")
    assert torch.equal(labels, predict_labels(probabilities, "softmax"))
    assert torch.allclose(voxel_loss(logits, labels, "logits"), voxel_loss(probabilities, labels, "softmax"),
                          atol=1e-5)


def test_sigmoid_outputs_are_foreground_channels():
    outputs = torch.tensor([[0.9, 0.2, 0.1], [0.6, 0.8, 0.3]]).reshape(1, 2, 3, 1, 1)
    assert predict_labels(outputs, "sigmoid").flatten().tolist() == [1, 2, 0]
    loss = voxel_loss(outputs, torch.tensor([1, 2, 0]).reshape(1, 3, 1, 1), "sigmoid").flatten()
    expected = -np.log([0.9 * 0.4, 0.8 * 0.8, 0.9 * 0.7])
    assert loss.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_epsilons_must_be_fractions_of_the_range():
    assert check_epsilons([0.02, 0.01, 0.02]) == [0.01, 0.02]
    for bad in ([0.0], [-0.1], [1.0], [], [0.01, 1.5]):
        with pytest.raises(InputError):
            check_epsilons(bad)


def test_attacks_lower_dice_of_the_demo_network(demo, sample):
    volume, reference = sample
    result = run_sweep(demo, volume, PGD(steps=3), [0.01, 0.04], reference)
    clean = result.mean_dice(0.0, "reference")
    print("demo network mean Dice vs reference: clean {:.3f}, PGD eps 0.01 {:.3f}, eps 0.04 {:.3f}".format(
        clean, result.mean_dice(0.01, "reference"), result.mean_dice(0.04, "reference")))
    assert clean > 0.8
    assert result.mean_dice(0.04, "reference") < clean - 0.1
    assert result.mean_dice(0.04, "clean") < result.mean_dice(0.01, "clean") < 1.0
    for outcome in result.outcomes[1:]:
        epsilon = outcome.strength * (float(volume.array.max()) - float(volume.array.min()))
        assert np.abs(outcome.probed.astype(np.float64) - volume.array).max() <= epsilon


def test_run_on_nodes_leaves_input_untouched_and_cancel_leaves_no_node(demo, slicer_scene, sample_nodes):
    volume_node, label_node = sample_nodes
    before = volume_node.GetImageData().GetPointData().GetScalars()
    checksum = (np.array(before).sum(), volume_node.GetMTime())
    node_count = slicer_scene.scene.GetNumberOfNodes()
    with pytest.raises(AttackCancelled):
        run_on_nodes(slicer_scene, volume_node, demo, PGD(steps=3), [0.01], label_node, is_cancelled=lambda: True)
    assert slicer_scene.scene.GetNumberOfNodes() == node_count
    result, nodes = run_on_nodes(slicer_scene, volume_node, demo, FGSM(), [0.01, 0.02], label_node)
    assert (np.array(volume_node.GetImageData().GetPointData().GetScalars()).sum(), volume_node.GetMTime()) == checksum
    assert sorted(nodes["probed"]) == [0.01, 0.02]
    assert sorted(nodes["segmentation"]) == [0.0, 0.01, 0.02]
    assert nodes["metrics"].GetNumberOfRows() == len(result.rows) == 3 * 4
    assert nodes["chart"].GetNumberOfPlotSeriesNodes() == 4
