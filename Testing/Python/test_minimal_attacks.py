"""DeepFool and the saliency map attack on tiny classifiers: equal to torchattacks and ART, budgets, progress."""
import numpy as np
import pytest
import torch
import torchattacks

from conftest import tiny_model as segmentation_model
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import ModelDescription, SegmentationModel
from MedAdvRobustnessLib.probes.attacks import AttackCancelled
from MedAdvRobustnessLib.probes.registry import make_probe


def classifier(classes=4, seed=0, dtype=torch.float64):
    """A tiny MLP classifier of (B, 1, 4, 4, 4) volumes in [0, 1], its network and the model around it."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, classes)).to(dtype).eval()
    return net, SegmentationModel(net, ModelDescription(name="tiny", task="classification"))


def volumes(count=3, seed=1, dtype=torch.float64):
    return torch.rand((count, 1, 4, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_deepfool_equals_torchattacks_where_no_bound_is_reached():
    net, model = classifier(seed=1)
    volume = volumes(count=4, seed=2)
    labels = model.predict(volume)
    adversarial, record = make_probe("deepfool")(model, volume, labels, 0.99, (0.0, 1.0))
    expected = torchattacks.DeepFool(net, steps=50, overshoot=0.02)(volume, labels)
    inside = ((expected > 0) & (expected < 1)).flatten(start_dim=1).all(dim=1)
    assert 2 <= int(inside.sum()) < len(volume)  # the cases torchattacks' clipping left alone, and one it did not
    assert torch.allclose(adversarial[inside], expected[inside], atol=1e-10)
    assert all(size is not None for size in record.details["minimal_perturbation"])


@pytest.mark.parametrize("name", ["deepfool", "deepfool-linf"])
def test_deepfool_always_flips_within_the_intensity_bounds(name):
    """Where a step would leave [0, 1], torchattacks' DeepFool clips it and can stall at the boundary (a quarter
    of these cases); the search here moves along the bounds instead and flips every case."""
    flipped, stalled = [], 0
    for seed in range(4):
        net, model = classifier(seed=seed)
        volume = volumes(count=8, seed=seed + 100)
        labels = model.predict(volume)
        adversarial, _ = make_probe(name)(model, volume, labels, 1.0, (0.0, 1.0))
        assert float(adversarial.min()) >= 0.0 and float(adversarial.max()) <= 1.0
        flipped += (model.predict(adversarial) != labels).tolist()
        stalled += int((model.predict(torchattacks.DeepFool(net)(volume, labels)) == labels).sum())
    assert all(flipped) and (name != "deepfool" or stalled > 0)


@pytest.mark.parametrize("name", ["deepfool", "deepfool-linf"])
def test_deepfool_flips_and_records_the_minimal_perturbation(name):
    _, model = classifier(seed=2)
    volume = volumes(count=1, seed=3)
    labels = model.predict(volume)
    adversarial, record = make_probe(name)(model, volume, labels, 0.99, (-100.0, 100.0))
    assert model.predict(adversarial).item() != labels.item()
    sizes = record.details["minimal_perturbation"]
    delta = (adversarial - volume).double().flatten()
    assert sizes["linf"] == pytest.approx(float(delta.abs().max()))
    assert sizes["l2"] == pytest.approx(float(delta.norm()))


@pytest.mark.parametrize("name", ["deepfool", "deepfool-linf"])
def test_deepfool_respects_the_budget(name):
    """Within a quarter of the flip's L-inf size nothing flips, and no minimal perturbation is claimed; at the
    flip's size the one recorded lies within the budget."""
    _, model = classifier()
    volume = volumes(count=1)
    labels = model.predict(volume)
    _, unlimited = make_probe(name)(model, volume, labels, 0.99, (0.0, 1.0))
    size = unlimited.details["minimal_perturbation"]["linf"]
    adversarial, record = make_probe(name)(model, volume, labels, size / 4, (0.0, 1.0))
    assert float((adversarial - volume).abs().max()) <= size / 4
    assert model.predict(adversarial).item() == labels.item()
    assert record.details["minimal_perturbation"] is None
    adversarial, record = make_probe(name)(model, volume, labels, size * 1.001, (0.0, 1.0))
    assert model.predict(adversarial).item() != labels.item()
    assert record.details["minimal_perturbation"]["linf"] <= size * 1.001


def test_deepfool_changes_the_decision_of_a_misclassified_volume():
    """Given a true class the network already gets wrong, DeepFool still moves the network's own decision (the
    paper's minimal perturbation), not nothing at size 0."""
    _, model = classifier()
    volume = volumes(count=1)
    decision = model.predict(volume)
    wrong = (decision + 1) % 4
    adversarial, record = make_probe("deepfool")(model, volume, wrong, 0.99, (0.0, 1.0))
    assert model.predict(adversarial).item() != decision.item()
    assert record.details["minimal_perturbation"]["l2"] > 0


@pytest.mark.parametrize("name", ["deepfool", "deepfool-linf"])
def test_deepfool_with_a_target_is_refused(name):
    _, model = classifier()
    volume = volumes(count=1)
    with pytest.raises(InputError, match="untargeted"):
        make_probe(name, target_mode="permute")(model, volume, model.predict(volume), 0.5, (0.0, 1.0))


def test_deepfool_candidates_limit_the_gradients():
    _, model = classifier(classes=6)
    volume = volumes(count=1)
    calls = []
    make_probe("deepfool", candidates=2, steps=3)(model, volume, model.predict(volume), 0.99, (0.0, 1.0),
                                                  progress=lambda *step: calls.append(step))
    assert calls and all(total == 8 for _, total, _, _ in calls) and len(calls) % 2 == 0


def art_saliency(net, volume, target, theta, gamma):
    from art.attacks.evasion import SaliencyMapMethod
    from art.estimators.classification import PyTorchClassifier
    estimator = PyTorchClassifier(net, torch.nn.CrossEntropyLoss(), input_shape=tuple(volume.shape[1:]),
                                  nb_classes=4, clip_values=(0.0, 1.0))
    attack = SaliencyMapMethod(estimator, theta=theta, gamma=gamma, batch_size=len(volume), verbose=False)
    return torch.from_numpy(attack.generate(volume.numpy(), y=np.eye(4)[target.numpy()]))


def test_jsma_equals_art():
    pytest.importorskip("art")
    net, model = classifier(dtype=torch.float32)
    volume = volumes(count=2, dtype=torch.float32) * 0.5
    labels = model.predict(volume)
    adversarial, _ = make_probe("jsma", theta=0.3)(model, volume, labels, 0.99, (0.0, 1.0))
    expected = art_saliency(net, volume, (labels + 1) % 4, theta=0.3, gamma=1.0)
    assert torch.allclose(adversarial, expected, atol=1e-6)
    assert not torch.equal(adversarial, volume)


def test_jsma_reaches_its_target_within_max_fraction_and_budget():
    _, model = classifier()
    volume = volumes(count=1) * 0.5
    labels = model.predict(volume)
    target = int(model(volume)[0].argsort()[-2])  # the runner-up class: an easy target
    adversarial, record = make_probe("jsma", target_label=target, theta=0.5)(model, volume, labels, 0.3, (0.0, 1.0))
    assert model.predict(adversarial).item() == target
    assert float((adversarial - volume).abs().max()) <= 0.3
    changed = (adversarial != volume).double().mean().item()
    _, limited = make_probe("jsma", target_label=target, max_fraction=0.1)(model, volume, labels, 0.01, (0.0, 1.0))
    assert record.details["changed_share"][0] == changed and limited.details["changed_share"][0] <= 0.1
    delta = (adversarial - volume).double().flatten()
    assert record.details["minimal_perturbation"]["l2"] == pytest.approx(float(delta.norm()))
    assert model.predict(volume).item() != target or record.details["minimal_perturbation"]["l2"] == 0


@pytest.mark.parametrize("name", ["deepfool", "jsma"])
def test_progress_and_cancel(name):
    _, model = classifier()
    volume = volumes(count=1)
    labels = model.predict(volume)
    calls = []
    make_probe(name)(model, volume, labels, 0.5, (0.0, 1.0), progress=lambda *step: calls.append(step))
    assert calls and [step for step, _, _, _ in calls] == list(range(1, len(calls) + 1))
    with pytest.raises(AttackCancelled):
        make_probe(name)(model, volume, labels, 0.5, (0.0, 1.0), is_cancelled=lambda: True)


@pytest.mark.parametrize("name", ["deepfool", "deepfool-linf", "jsma"])
def test_segmentation_network_is_refused(name):
    model = segmentation_model("logits", labels=3, hidden=4, seed=0)
    volume = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(InputError, match="attacks classifiers"):
        make_probe(name)(model, volume, model.predict(volume), 0.1, (0.0, 1.0))


@pytest.mark.parametrize("name", ["deepfool", "deepfool-linf"])
def test_deepfool_flips_every_heldout_slice_of_the_demo_classifier(name):
    """The demo classifier normalises by percentiles (the minimum a tie of background voxels at the lower bound):
    DeepFool changes the decision on each of its 16 held-out slices within 0.3 of the range (before its percentile
    gradient and its bounded step, it stalled at the boundary on 7 of them even at 0.99)."""
    from MedAdvRobustnessLib import load_model, run_sweep
    from MedAdvRobustnessLib.study.cases import heldout_slice_cases, heldout_slice_volume
    model = load_model("demo-classifier")
    for case in heldout_slice_cases(16):
        rows = run_sweep(model, heldout_slice_volume(case), make_probe(name), [0.3], case["class"]).rows
        assert rows[-1]["predicted"] != rows[0]["predicted"] and rows[-1]["linf_fraction"] <= 0.3 + 1e-6, case["name"]
        assert 0 < rows[-1]["minimal_linf_fraction"] <= 0.3 + 1e-6
