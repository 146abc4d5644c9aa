"""The attack suite: agreement with torchattacks, exact budgets, losses against hand computations, DAG's update
rule, Dice on the demo network, progress/cancel, and the command line."""
import csv
import math
import subprocess

import numpy as np
import pytest
import torch

from conftest import MEDADV, SHAPE, random_volume, tiny_model
from MedAdvRobustnessLib import cli
from MedAdvRobustnessLib.probes.attacks import (ATTACKS, DAG, FGSM, PGD, AttackCancelled, AttackRecord, apgd_checkpoints,
                                         class_scores, dlr_loss, foreground_dice, make_target,
                                         project_l2)
from MedAdvRobustnessLib.probes.corruptions import CORRUPTIONS
from MedAdvRobustnessLib.probes.registry import make_probe
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.volume import GridOrientation
from MedAdvRobustnessLib.networks.models import ModelDescription, SegmentationModel, load_model
from MedAdvRobustnessLib.networks.volume import Volume
from MedAdvRobustnessLib.scene.nodes import labels_from_node, volume_from_node
from MedAdvRobustnessLib.networks.outputs import predict_labels, voxel_loss
from MedAdvRobustnessLib.evaluation.sweep import run_sweep
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

def box_region():
    region = torch.zeros((1,) + SHAPE, dtype=torch.bool)
    region[:, 2:10, 2:8, 1:6] = True
    return region


def bounds_of(volume):
    return float(volume.min()), float(volume.max())


# --- (a) agreement with torchattacks ---------------------------------------------------------------------------

class UnitRange(torch.nn.Module):
    """The model seen through inputs scaled to [0, 1], as torchattacks requires."""

    def __init__(self, model, low, high):
        super().__init__()
        self.model, self.low, self.span = model, low, high - low

    def forward(self, inputs):
        return self.model(self.low + inputs * self.span)


@pytest.mark.parametrize("case", ["fgsm", "pgd-linf", "pgd-l2"])
def test_fgsm_and_pgd_equal_torchattacks(case):
    import torchattacks  # installed by scripts/setup.sh (--no-deps: it needs no torchvision)
    model = tiny_model(dtype=torch.float64)
    volume = random_volume(dtype=torch.float64)
    low, high = bounds_of(volume)
    span = high - low
    labels = torch.randint(0, 4, (1,) + SHAPE, generator=torch.Generator().manual_seed(1))
    unit = (volume - low) / span
    wrapped = UnitRange(model, low, high).eval()
    if case == "fgsm":
        epsilon = 0.03 * span
        ours, _ = FGSM()(model, volume, labels, epsilon, (low, high))
        theirs = torchattacks.FGSM(wrapped, eps=epsilon / span)(unit, labels)
    elif case == "pgd-linf":
        epsilon = 0.03 * span
        ours, _ = PGD(steps=4, step_size=0.4, random_start=False)(model, volume, labels, epsilon, (low, high))
        theirs = torchattacks.PGD(wrapped, eps=epsilon / span, alpha=0.4 * epsilon / span, steps=4,
                                  random_start=False)(unit, labels)
    else:
        epsilon = 0.03 * span * math.sqrt(volume.numel())
        ours, _ = PGD(steps=4, norm="l2", step_size=0.4, random_start=False)(model, volume, labels, epsilon,
                                                                             (low, high))
        theirs = torchattacks.PGDL2(wrapped, eps=epsilon / span, alpha=0.4 * epsilon / span, steps=4,
                                    random_start=False)(unit, labels)
    theirs = low + theirs.double() * span
    assert float((ours - volume).abs().max()) > 0.0
    # L2: the [0, 1] round trip's rounding grows through the four normalised steps to about 1e-9 of the range
    # (measured 9.7e-10 with torch.quantile's tie gradient, 1.1e-9 with a tied percentile's zero gradient)
    assert float((ours - theirs).abs().max()) < (1e-8 if case == "pgd-l2" else 1e-9) * span, case


# --- (b) budgets, bounds and region ---------------------------------------------------------------------------

SEGMENTATION_ATTACKS = sorted(name for name, attack in ATTACKS.items() if "segmentation" in attack.tasks)


def registry_suite():
    """Every segmentation attack of the registry (the classifiers' own: test_minimal_attacks.py, test_classification.py):
    with few steps, with each other norm it offers, and targeted (turn 2 into 3)."""
    cases = []
    for name in SEGMENTATION_ATTACKS:
        taken = {parameter.name: parameter for parameter in ATTACKS[name].parameters()}
        base = {"steps": 3} if "steps" in taken else {}
        cases.append((name, base))
        if "norm" in taken:
            cases += [(name, dict(base, norm=norm)) for norm in taken["norm"].choices
                      if norm != taken["norm"].default]
        cases.append((name, dict(base, target_mode="turn", source_label=2, target_label=3)))
    return cases


SUITE = registry_suite() + [
    ("pgd", {"steps": 2, "restarts": 2}),
    ("pgd", {"steps": 3, "target_mode": "vanish", "source_label": 1}),
    ("cospgd", {"steps": 3, "norm": "l2", "target_mode": "swap", "source_label": 1, "target_label": 2}),
    ("apgd-dlr", {"steps": 4, "target_mode": "permute"}),
    ("dag", {"steps": 4, "target_mode": "grow", "source_label": 1, "grow_voxels": 2, "scale_quantile": 0.9}),
]


def suite_id(case):
    name, params = case
    return name + "".join("-{}={}".format(k, v) for k, v in params.items())


@pytest.mark.parametrize("use_region", [False, True], ids=["volume", "region"])
@pytest.mark.parametrize("case", SUITE, ids=[suite_id(case) for case in SUITE])
def test_every_attack_respects_its_budget_the_bounds_and_the_region(case, use_region):
    name, params = case
    attack = make_probe(name, **params)
    model, volume = tiny_model(), random_volume()
    low, high = bounds_of(volume)
    labels = model.predict(volume)
    region = box_region() if use_region else None
    norm = getattr(attack, "norm", "linf")
    epsilon = attack.intensity_budget(0.0242, high - low, volume, region)  # float32(epsilon) != epsilon
    adversarial, record = attack(model, volume, labels, epsilon, (low, high), region=region)
    assert adversarial.dtype == volume.dtype and adversarial.shape == volume.shape
    delta = adversarial.double() - volume.double()
    if norm == "linf":
        assert float(delta.abs().max()) <= epsilon
    else:
        assert float(torch.linalg.vector_norm(delta)) <= epsilon * (1.0 + 1e-6)
    assert float(adversarial.min()) >= low and float(adversarial.max()) <= high
    if region is not None:
        assert float(delta[0, 0][~region[0]].abs().max()) == 0.0
        assert float(delta[0, 0][region[0]].abs().max()) > 0.0
    else:
        assert float(delta.abs().max()) > 0.0
    assert len(record.losses) == len(record.dice) >= 1
    assert isinstance(record, AttackRecord) and record.attack == name


def test_l2_projection_is_exact_in_float32():
    """Rounding x + delta to float32 must never lengthen delta: tiny budgets on large intensities."""
    generator = torch.Generator().manual_seed(0)
    original = (torch.rand((1, 1, 40, 40, 40), generator=generator) * 3000.0 + 1000.0).float()
    candidate = original + torch.randn(original.shape, generator=generator)
    for epsilon in (1e-3, 0.37, 5.0, 300.0):
        projected = project_l2(candidate, original, epsilon, (0.0, 5000.0))
        norm = float(torch.linalg.vector_norm(projected.double() - original.double()))
        assert norm <= epsilon
        assert norm > 0.5 * epsilon or epsilon < 0.01


# --- losses against hand computations ------------------------------------------------------------------------------

def one_by_one_model(weights, biases, activation="logits"):
    """A 1x1x1 convolution z_c = w_c * x + b_c per voxel, no preprocessing, float64."""
    conv = torch.nn.Conv3d(1, len(weights), 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1, 1, 1))
        conv.bias.copy_(torch.tensor(biases, dtype=torch.float64))
    layers = [conv] + ([torch.nn.Softmax(dim=1)] if activation == "softmax" else [])
    return SegmentationModel(torch.nn.Sequential(*layers), ModelDescription(name="1x1x1",
                                                                            output_activation=activation)).eval()


HAND_VOLUME = torch.tensor([2.0, -1.0, 0.1, 3.0, -2.0, 0.2, 1.5, -0.5], dtype=torch.float64).view(1, 1, 2, 2, 2)


def test_dag_update_is_the_published_rule_by_hand():
    """z = (0.5, x, -2x): one DAG step r = grad sum_active (z_t - z_l), step gamma*eps*r/|r|inf, computed by hand."""
    model = one_by_one_model([0.0, 1.0, -2.0], [0.5, 0.0, 0.0])
    # clean prediction: x=2 -> 1, -1 -> 2, 0.1 -> 0, 3 -> 1, -2 -> 2, 0.2 -> 0, 1.5 -> 1, -0.5 -> 2
    assert model.predict(HAND_VOLUME).flatten().tolist() == [1, 2, 0, 1, 2, 0, 1, 2]
    labels = torch.tensor([1, 2, 0, 1, 2, 0, 1, 1]).view(1, 2, 2, 2)  # voxel 7 already misclassified: inactive
    target = torch.tensor([2, 0, 1, 1, 1, 2, 0, 0]).view(1, 2, 2, 2)  # voxel 3 keeps its label: inactive
    # r = w_t - w_l on active voxels: [-2-1, 0+2, 1-0, 0, 1+2, -2-0, 0-1, 0] = [-3, 2, 1, 0, 3, -2, -1, 0];
    # |r|inf = 3, gamma * eps = 0.5 * 4 = 2: step = 2 r / 3
    expected_step = [-2.0, 4.0 / 3.0, 2.0 / 3.0, 0.0, 2.0, -4.0 / 3.0, -2.0 / 3.0, 0.0]
    # objective sum_active z_t - z_l: (-4-2) + (0.5-2) + (0.1-0.5) + (-2-4) + (-0.4-0.5) + (0.5-1.5) = -15.8
    adversarial, record = DAG(steps=1, gamma=0.5)(model, HAND_VOLUME, labels, 4.0, (-10.0, 10.0), target=target)
    assert (adversarial - HAND_VOLUME).flatten().tolist() == pytest.approx(expected_step, abs=1e-12)
    assert record.details["active"] == [6]
    assert record.losses == [pytest.approx(-15.8, abs=1e-12)]
    # the same update from softmax outputs (log-probabilities differ from logits by a per-voxel constant)
    softmax_model = one_by_one_model([0.0, 1.0, -2.0], [0.5, 0.0, 0.0], "softmax")
    again, _ = DAG(steps=1, gamma=0.5)(softmax_model, HAND_VOLUME, labels, 4.0, (-10.0, 10.0), target=target)
    assert (again - HAND_VOLUME).flatten().tolist() == pytest.approx(expected_step, abs=1e-9)
    # a second step follows the rule from the new point and the active set it gives
    two, record = DAG(steps=2, gamma=0.5)(model, HAND_VOLUME, labels, 4.0, (-10.0, 10.0), target=target)
    first = HAND_VOLUME.flatten() + torch.tensor(expected_step, dtype=torch.float64)
    prediction = model.predict(first.view(1, 1, 2, 2, 2)).flatten()
    weights = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    active = (prediction == labels.flatten()) & (target.flatten() != labels.flatten())
    r = torch.where(active, weights[target.flatten()] - weights[labels.flatten()], torch.zeros(8, dtype=torch.float64))
    assert record.details["active"] == [6, int(active.sum())]
    assert (two.flatten() - first).tolist() == pytest.approx((2.0 * r / r.abs().max()).tolist(), abs=1e-12)


def test_dag_clips_to_epsilon_and_stops_when_no_voxel_is_active():
    model = one_by_one_model([0.0, 1.0, -2.0], [0.5, 0.0, 0.0])
    labels = model.predict(HAND_VOLUME)
    target = torch.tensor([2, 0, 1, 1, 1, 2, 0, 0]).view(1, 2, 2, 2)
    adversarial, record = DAG(steps=20, gamma=0.5)(model, HAND_VOLUME, labels, 0.3, (-2.0, 3.0), target=target)
    assert float((adversarial - HAND_VOLUME).abs().max()) <= 0.3
    nothing_to_do, record = DAG(steps=20)(model, HAND_VOLUME, labels, 0.3, (-2.0, 3.0), target=labels)
    assert record.details["active"] == [0] and torch.equal(nothing_to_do, HAND_VOLUME)


def test_segpgd_weights_follow_the_schedule():
    """SegPGD at step t: mean of (1 - l_t) CE on correct voxels + l_t CE on wrong ones, l_t = (t - 1) / (2T)."""
    model = one_by_one_model([0.0, 1.0, -2.0], [0.5, 0.0, 0.0])
    labels = torch.tensor([1, 2, 0, 1, 2, 0, 2, 2]).view(1, 2, 2, 2)
    steps = 4
    _, record = make_probe("segpgd", steps=steps, random_start=False, step_size=0.01)(
        model, HAND_VOLUME, labels, 0.02, (-10.0, 10.0))
    # first step: the clean volume, l_1 = 0: CE of correct voxels over all 8
    outputs = model(HAND_VOLUME).detach()
    ce = voxel_loss(outputs, labels, "logits").flatten()
    correct = (outputs.argmax(1) == labels).flatten()
    assert not bool(correct.all()) and bool(correct.any())
    assert record.losses[0] == pytest.approx(float((ce * correct).sum() / 8), rel=1e-12)
    assert len(record.losses) == steps


def test_cospgd_weights_ce_by_the_cosine_similarity():
    model = one_by_one_model([0.0, 1.0, -2.0], [0.5, 0.0, 0.0])
    labels = torch.tensor([1, 2, 0, 1, 2, 0, 2, 2]).view(1, 2, 2, 2)
    outputs = model(HAND_VOLUME).detach()
    p = torch.softmax(outputs, 1)[0].reshape(3, -1)
    ce = voxel_loss(outputs, labels, "logits").flatten()
    y = labels.flatten()
    cosine = p[y, torch.arange(8)] / p.norm(dim=0)  # cos(p, e_y) = p_y / |p|
    _, record = make_probe("cospgd", steps=1, random_start=False)(model, HAND_VOLUME, labels, 0.02, (-10.0, 10.0))
    assert record.losses[0] == pytest.approx(float((cosine * ce).mean()), rel=1e-12)
    # targeted: (1 - cos) to the target, and the attack lowers that loss
    target = torch.tensor([2, 0, 1, 1, 1, 2, 0, 0]).view(1, 2, 2, 2)
    t = target.flatten()
    ce_t = voxel_loss(outputs, target, "logits").flatten()
    cos_t = p[t, torch.arange(8)] / p.norm(dim=0)
    adversarial, record = make_probe("cospgd", steps=3, random_start=False)(
        model, HAND_VOLUME, labels, 0.5, (-10.0, 10.0), target=target)
    assert record.losses[0] == pytest.approx(float(((1 - cos_t) * ce_t).mean()), rel=1e-12)
    assert record.losses[-1] < record.losses[0]


def test_target_weight_balances_voxels_to_change_and_to_keep():
    """target_weight w: w * mean CE over the voxels whose target differs + (1 - w) * mean CE over the others."""
    model = one_by_one_model([0.0, 1.0, -2.0], [0.5, 0.0, 0.0])
    labels = torch.tensor([1, 2, 0, 1, 2, 0, 2, 2]).view(1, 2, 2, 2)
    target = torch.tensor([0, 2, 0, 1, 2, 0, 2, 0]).view(1, 2, 2, 2)
    ce = voxel_loss(model(HAND_VOLUME).detach(), target, "logits").flatten()
    change = (target != labels).flatten()
    for weight in (0.9, 0.5):
        _, record = make_probe("pgd", steps=1, random_start=False, target_weight=weight)(
            model, HAND_VOLUME, labels, 0.02, (-10.0, 10.0), target=target)
        expected = weight * ce[change].mean() + (1 - weight) * ce[~change].mean()
        assert record.losses[0] == pytest.approx(float(expected), rel=1e-12)
    _, record = make_probe("pgd", steps=1, random_start=False)(model, HAND_VOLUME, labels, 0.02, (-10.0, 10.0),
                                                                target=target)
    assert record.losses[0] == pytest.approx(float(ce.mean()), rel=1e-12)
    with pytest.raises(InputError, match="target_weight"):
        make_probe("pgd", target_weight=1.5)


def test_dlr_loss_by_hand_and_scores_of_every_activation():
    scores = torch.tensor([3.0, 1.0, 0.5, -1.0]).view(1, 4, 1, 1, 1)
    label = torch.zeros((1, 1, 1, 1), dtype=torch.long)
    # y = 0 is the top: -(3 - 1) / (3 - 0.5); y = 2: -(0.5 - 3) / (3 - 0.5)
    assert float(dlr_loss(scores, label)) == pytest.approx(-2.0 / 2.5)
    assert float(dlr_loss(scores, label + 2)) == pytest.approx(2.5 / 2.5)
    # targeted (to be lowered): (z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), y = 0, t = 3
    assert float(dlr_loss(scores, label, label + 3)) == pytest.approx(4.0 / (3.0 + 0.25))
    with pytest.raises(InputError):
        dlr_loss(scores[:, :2], label)
    logits = torch.randn((1, 4, 5, 4, 3), generator=torch.Generator().manual_seed(0))
    softmax_scores = class_scores(torch.softmax(logits, 1), "softmax")
    assert torch.allclose(softmax_scores - softmax_scores[:, :1], logits - logits[:, :1], atol=1e-5)
    probabilities = torch.rand((1, 3, 5, 4, 3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(class_scores(probabilities, "sigmoid").argmax(1), predict_labels(probabilities, "sigmoid"))


# --- targets --------------------------------------------------------------------------------------------------------

def test_target_generators():
    labels = torch.zeros((1, 7, 7, 7), dtype=torch.long)
    labels[0, 3, 3, 3] = 1
    labels[0, 0, 0, :3] = 2
    labels[0, 6, 6, 6] = 3
    vanish = make_target("vanish", labels, 4, source_label=2)
    assert int((vanish == 2).sum()) == 0 and torch.equal(vanish[labels != 2], labels[labels != 2])
    turn = make_target("turn", labels, 4, source_label=2, target_label=3)
    assert torch.equal(turn[labels == 2], torch.full((3,), 3)) and int((turn == 3).sum()) == 4
    swap = make_target("swap", labels, 4, source_label=1, target_label=3)
    assert int(swap[0, 3, 3, 3]) == 3 and int(swap[0, 6, 6, 6]) == 1
    grown = make_target("grow", labels, 4, source_label=1, grow_voxels=2)
    assert int((grown == 1).sum()) == 25  # a 6-connected ball of radius 2: 1 + 6 + 18 voxels
    assert int(grown[0, 3, 3, 5]) == 1 and int(grown[0, 3, 4, 4]) == 1 and int(grown[0, 4, 4, 4]) == 0
    permuted = make_target("permute", labels, 4, seed=3)
    assert bool((permuted != labels).all())
    mapping = {int(a): int(b) for a, b in zip(labels.flatten(), permuted.flatten())}
    assert sorted(mapping.values()) == [0, 1, 2, 3]
    assert torch.equal(make_target("permute", labels, 4, seed=3), permuted)
    with pytest.raises(InputError, match="not a label"):
        make_target("turn", labels, 4, source_label=1, target_label=7)
    with pytest.raises(InputError, match="needs source_label"):
        make_probe("pgd", target_mode="vanish")


# --- restarts and APGD ---------------------------------------------------------------------------------------------

def test_pgd_restarts_keep_the_worst_case():
    model, volume = tiny_model(), random_volume()
    labels = model.predict(volume)
    bounds = bounds_of(volume)
    for criterion in ("loss", "dice"):
        best, record = PGD(steps=2, seed=5, restarts=3, restart_criterion=criterion)(model, volume, labels, 12.0,
                                                                                     bounds)
        singles = [PGD(steps=2, seed=5 + r)(model, volume, labels, 12.0, bounds)[0] for r in range(3)]
        with torch.no_grad():
            if criterion == "loss":
                badness = [float(voxel_loss(model(x), labels, "logits").mean()) for x in singles]
            else:
                badness = [-foreground_dice(model(x), "logits", labels)[0] for x in singles]
        assert torch.equal(best, singles[int(np.argmax(badness))]), criterion
        assert len(record.losses) == 6 and record.steps == 6
    with pytest.raises(InputError, match="random_start"):
        PGD(restarts=2, random_start=False)


def test_apgd_schedule_and_best_point():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # a case where APGD's best point is not its last (the percentile model of seed 2 has none since a tied
    # percentile passes no gradient: its loss rises to a plateau)
    model, volume = tiny_model(seed=1, intensity="none"), random_volume(seed=1)
    labels = model.predict(volume)
    attack = make_probe("apgd-ce", steps=12)
    adversarial, record = attack(model, volume, labels, 10.0, bounds_of(volume))
    assert record.details["checkpoints"] == apgd_checkpoints(12) == [3, 5, 7, 9, 10, 11]
    assert any(halved for _, (halved,) in record.details["halvings"][0])
    # here the best point is not the last one, and APGD returns its best evaluated point
    assert max(record.losses) > record.losses[-1] + 5e-5
    with torch.no_grad():
        returned = float(voxel_loss(model(adversarial), labels, "logits").mean())
    assert returned == pytest.approx(max(record.losses), rel=1e-6)
    assert record.details["best_objective"][0][0] == pytest.approx(max(record.losses), rel=1e-6)


# --- (e) progress and cancel ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SEGMENTATION_ATTACKS)
def test_progress_reports_loss_and_dice_and_cancel_stops(name):
    model, volume = tiny_model(), random_volume()
    labels = model.predict(volume)
    labels[0, :3] = 0  # not all correct: Dice below 1
    seen = []
    attack = make_probe(name) if name == "fgsm" else make_probe(name, steps=3)
    _, record = attack(model, volume, labels, 12.0, bounds_of(volume),
                       progress=lambda step, steps, loss, dice: seen.append((step, steps, loss, dice)))
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1))
    assert [s[2] for s in seen] == record.losses and [s[3] for s in seen] == record.dice
    with torch.no_grad():
        clean_dice = foreground_dice(model(volume), "logits", labels)[0]
    if name in ("fgsm", "dag") or not getattr(attack, "random_start", False):
        assert seen[0][3] == pytest.approx(clean_dice)
    assert all(0.0 <= s[3] < 1.0 for s in seen)
    if name == "fgsm":
        with pytest.raises(AttackCancelled):
            attack(model, volume, labels, 12.0, bounds_of(volume), is_cancelled=lambda: True)
        return
    calls = []
    with pytest.raises(AttackCancelled):
        attack(model, volume, labels, 12.0, bounds_of(volume),
               progress=lambda step, steps, loss, dice: calls.append(step), is_cancelled=lambda: len(calls) >= 2)
    assert calls == [1, 2]


def test_runner_passes_region_and_target_and_reports_dice():
    model, tensor = tiny_model(), random_volume()
    volume = Volume("tiny", tensor[0, 0].numpy(), np.eye(4), GridOrientation.from_ijk_to_ras(np.eye(4), SHAPE[::-1]))
    region = box_region()[0].numpy()
    target = np.zeros(SHAPE, dtype=np.int64)
    messages = []
    attack = make_probe("pgd", steps=2, random_start=False)
    result = run_sweep(model, volume, attack, [0.05], progress=lambda f, m: messages.append(m), region=region,
                       target=target)
    delta = result.outcomes[1].probed.astype(np.float64) - volume.array
    assert np.abs(delta[~region]).max() == 0 and np.abs(delta[region]).max() > 0
    assert np.abs(delta).max() <= 0.05 * (float(volume.array.max()) - float(volume.array.min()))
    assert "Dice" in messages[-1] and "step 2/2" in messages[-1]
    record = result.outcomes[1].record
    assert len(record.dice) == 2
    with torch.no_grad():  # the first loss is the cross-entropy towards the target, at the clean volume
        towards_target = float(voxel_loss(model(tensor), torch.zeros((1,) + SHAPE, dtype=torch.long), "logits").mean())
    assert record.losses[0] == pytest.approx(towards_target, rel=1e-6)


def test_make_probe_checks_names_and_parameters():
    with pytest.raises(InputError, match="unknown probe 'nope'"):
        make_probe("nope")
    with pytest.raises(InputError, match="fgsm has no parameter steps"):
        make_probe("fgsm", steps=3)
    with pytest.raises(InputError, match="not one of"):
        make_probe("pgd", norm="l1")
    with pytest.raises(InputError, match="cannot read 'many' as int"):
        make_probe("pgd", steps="many")
    with pytest.raises(InputError, match="at least 1"):
        make_probe("dag", steps=0)
    attack = make_probe("pgd", steps="7", random_start="false", step_size="0.5", norm="l2")
    assert (attack.steps, attack.random_start, attack.step_size, attack.norm) == (7, False, 0.5, "l2")
    for name, attack_class in ATTACKS.items():
        defaults = {p.name: p.default for p in attack_class.parameters()}
        assert make_probe(name) == attack_class(**defaults)


# --- (c) and (d) on the demo network -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_case():
    scene = SlicerScene.standalone()
    volume = volume_from_node(scene.load_volume(SAMPLE_VOLUME))
    reference = labels_from_node(scene.load_volume(SAMPLE_LABELS, label_map=True), volume)
    return load_model("demo"), volume.as_tensor(), torch.from_numpy(reference)[None].long(), volume.intensity_range


def test_iterative_attacks_lower_dice_at_least_as_much_as_fgsm(demo_case):
    model, volume, labels, (low, high) = demo_case
    epsilon = 0.02 * (high - low)
    dice = {}
    with torch.no_grad():
        dice["clean"] = foreground_dice(model(volume), "logits", labels)[0]
    for name in ("fgsm", "pgd", "segpgd", "cospgd", "apgd-ce"):
        attack = make_probe(name) if name == "fgsm" else make_probe(name, steps=3)
        adversarial, _ = attack(model, volume, labels, epsilon, (low, high))
        with torch.no_grad():
            dice[name] = foreground_dice(model(adversarial), "logits", labels)[0]
    print("demo network, eps 0.02 of the range, 3 iterations, mean Dice vs reference: " +
          ", ".join("{} {:.3f}".format(name, value) for name, value in dice.items()))
    assert dice["fgsm"] < dice["clean"] - 0.1
    for name in ("pgd", "segpgd", "cospgd", "apgd-ce"):
        assert dice[name] <= dice["fgsm"], name


def test_dag_on_the_demo_network_shrinks_the_active_set_and_reaches_targets(demo_case):
    """Turn white matter (3) into grey matter (2) at eps 0.05 of the range, 5 iterations.

    The paper's step r / |r|inf is led by the largest entries of r; scale_quantile=0.99 divides by the 99th
    percentile of |r| instead (and clips to [-1, 1]), so that more voxels move.
    """
    model, volume, labels, (low, high) = demo_case
    attack = make_probe("dag", steps=5, target_mode="turn", source_label=3, target_label=2, scale_quantile=0.99)
    adversarial, record = attack(model, volume, labels, 0.05 * (high - low), (low, high))
    with torch.no_grad():
        prediction = model.predict(adversarial)
    target = make_target("turn", labels, 4, source_label=3, target_label=2)
    wanted = target != labels
    reached = float(((prediction == target) & wanted).sum()) / float(wanted.sum())
    active = record.details["active"]
    print("DAG turn WM->GM, eps 0.05, 5 iterations: active voxels {}, target reached on {:.1%} of {} voxels, "
          "mean Dice {:.3f} -> {:.3f}".format(active, reached, int(wanted.sum()), record.dice[0], record.dice[-1]))
    assert all(later <= earlier for earlier, later in zip(active, active[1:]))
    assert active[-1] < 0.85 * active[0]
    assert reached >= 0.2
    assert float((adversarial.double() - volume.double()).abs().max()) <= 0.05 * (high - low)


# --- (f) command line ----------------------------------------------------------------------------------------------

def medadv(*args):
    return subprocess.run([MEDADV] + [str(a) for a in args], capture_output=True, text=True, timeout=600)


def test_attacks_command_lists_every_attack_with_its_defaults(capsys):
    assert cli.main(["attacks"]) == 0
    attacks_text, _, corruptions_text = capsys.readouterr().out.partition("\ncorruptions ")
    assert {line.split(":")[0].strip() for line in corruptions_text.splitlines()[1:]
            if line.startswith("  ") and not line.startswith("   ")} == set(CORRUPTIONS)
    blocks = {}
    for line in attacks_text.splitlines():
        if line and not line.startswith(" "):
            current = line.split(":")[0]
            blocks[current] = []
        elif line.strip():
            blocks[current].append(line.split())
    assert set(blocks) == set(ATTACKS)
    for name, attack_class in ATTACKS.items():
        listed = {words[0]: words[2] for words in blocks[name] if words[1] == "default"}
        expected = {p.name: p.default for p in attack_class.parameters()}
        assert set(listed) == set(expected), name
        for key, value in expected.items():
            text = "none" if value is None else str(value).lower() if isinstance(value, bool) else \
                "{:g}".format(value) if isinstance(value, float) else str(value)
            assert listed[key] == text, (name, key)
    assert {"gamma", "steps", "scale_quantile"} <= set(p.name for p in DAG.parameters())


def test_run_dag_end_to_end_on_the_sample(tmp_path):
    out = tmp_path / "dag"
    completed = medadv("run", "--volume", SAMPLE_VOLUME, "--model", "demo", "--reference", SAMPLE_LABELS,
                       "--attack", "dag", "--epsilon", "0.05", "--steps", "3", "--target-mode", "vanish",
                       "--source-label", "1", "--param", "scale_quantile=0.99", "--out", out)
    assert completed.returncode == 0, completed.stderr
    assert "dag epsilon 0.05: step 3/3" in completed.stderr and "Dice" in completed.stderr
    with open(str(out / "metrics.csv")) as stream:
        rows = [row for row in csv.DictReader(stream) if row["label"] in ("mean", "CSF")]
    assert {row["probe"] for row in rows} == {"dag"}
    dice = {(row["epsilon"], row["label"]): float(row["dice_reference"]) for row in rows}
    print("medadv run --attack dag (vanish CSF, eps 0.05, 3 iterations): CSF Dice {:.3f} -> {:.3f}".format(
        dice[("0.0", "CSF")], dice[("0.05", "CSF")]))
    assert dice[("0.05", "CSF")] < dice[("0.0", "CSF")] - 0.02
    assert float(next(row for row in rows if row["epsilon"] == "0.05")["linf_fraction"]) <= 0.05


def test_region_restricts_the_attack_to_one_structure(tmp_path):
    """medadv demo --region-labels 1: FGSM perturbs the reference's CSF voxels only, by exactly epsilon."""
    import nibabel as nib
    out = tmp_path / "csf"
    completed = medadv("demo", "--attack", "fgsm", "--epsilon", "0.02", "--region-labels", "1", "--out", out)
    assert completed.returncode == 0, completed.stderr
    clean = np.asarray(nib.load(str(SAMPLE_VOLUME)).dataobj).astype(np.float64)
    delta = np.asarray(nib.load(str(out / "adversarial_0.02.nii.gz")).dataobj).astype(np.float64) - clean
    csf = np.asarray(nib.load(str(SAMPLE_LABELS)).dataobj) == 1
    assert np.abs(delta[~csf]).max() == 0
    assert np.abs(delta[csf]).max() == pytest.approx(0.02 * (clean.max() - clean.min()), rel=1e-5)


@pytest.mark.parametrize("args, expected", [
    (["--attack", "fgsm", "--steps", "3"], "attack fgsm has no parameter steps"),
    (["--attack", "pgd", "--param", "gamma=2"], "attack pgd has no parameter gamma"),
    (["--attack", "pgd", "--param", "steps"], "--param takes KEY=VALUE"),
    (["--attack", "dag", "--target-mode", "swap", "--source-label", "1"], "needs target_label"),
    (["--attack", "fgsm", "--region-labels", "9"], "the region is empty: no voxel holds label 9"),
    (["--corruption", "smoothing", "--region-labels", "1"], "--corruption takes --severity, --seed, --region"),
])
def test_bad_attack_parameters_fail_cleanly(tmp_path, capsys, args, expected):
    """In process (the console command's error path is covered by test_cli): exit 2, one message, no output."""
    out = tmp_path / "out"
    assert cli.main(["demo", "--epsilon", "0.01", "--out", str(out)] + args) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("medadv: error:") and expected in errors[0]
    assert not out.exists()


def test_command_line_options_become_attack_parameters():
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--out", "x", "--attack", "pgd", "--steps", "4", "--norm", "l2",
                              "--no-random-start", "--step-size", "0.3", "--param", "restart_criterion=loss"])
    assert cli.probe_from_args(args)[0] == PGD(steps=4, norm="l2", random_start=False, step_size=0.3,
                                             restart_criterion="loss")
    args = parser.parse_args(["demo", "--out", "x", "--attack", "dag", "--gamma", "0.25", "--target-mode", "grow",
                              "--source-label", "2", "--grow-voxels", "3", "--seed", "4"])
    assert cli.probe_from_args(args)[0] == DAG(gamma=0.25, target_mode="grow", source_label=2, grow_voxels=3, seed=4)
    args = parser.parse_args(["demo", "--out", "x", "--attack", "fgsm"])
    assert cli.probe_from_args(args)[0] == FGSM()
