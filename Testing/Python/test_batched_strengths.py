"""Several strengths of a sweep as one batch (issue 18, item 3): the same volumes, predictions and records as one
by one; refused where a batch would not treat each copy alone; off by default on the CPU."""
import numpy as np
import pytest

from conftest import random_volume, tiny_model
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.evaluation.sweep import run_sweep
from MedAdvRobustnessLib.networks.models import ModelDescription, SegmentationModel, load_model
from MedAdvRobustnessLib.networks.volume import Volume
from MedAdvRobustnessLib.probes.registry import make_probe
from MedAdvRobustnessLib.sample import SAMPLE_VOLUME

EPSILONS = [0.01, 0.03, 0.06]


def small_volume(seed=0):
    return Volume.from_array(random_volume((14, 12, 10), seed=seed)[0, 0].numpy())


def both_ways(model, volume, probe_name, settings, **extra):
    """The sweep one by one and as one batch (each with a fresh probe)."""
    return [run_sweep(model, volume, make_probe(probe_name, **settings), EPSILONS, batch_strengths=batched, **extra)
            for batched in (False, True)]


def assert_same_outcomes(alone, together, volume_tolerance):
    assert [o.strength for o in together.outcomes] == [o.strength for o in alone.outcomes]
    for one, batched in zip(alone.outcomes[1:], together.outcomes[1:]):
        assert batched.record.details["strengths_at_once"] == len(EPSILONS)
        assert "strengths_at_once" not in one.record.details
        assert batched.record.epsilon == one.record.epsilon
        assert np.abs(batched.probed.astype(np.float64) - one.probed).max() <= volume_tolerance
        assert np.array_equal(batched.prediction, one.prediction)
        assert batched.record.losses == pytest.approx(one.record.losses, rel=1e-5, abs=1e-6)
        assert batched.record.dice == pytest.approx(one.record.dice, abs=1e-6)
    assert len(together.rows) == len(alone.rows)
    for batched_row, row in zip(together.rows, alone.rows):  # the metrics table, to float tolerance
        assert batched_row.keys() == row.keys()
        for key, value in row.items():
            assert batched_row[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


@pytest.mark.parametrize("probe_name, settings", [
    ("fgsm", {}), ("pgd", {"steps": 3}), ("pgd", {"steps": 3, "norm": "l2"}), ("segpgd", {"steps": 3}),
    ("cospgd", {"steps": 3}), ("pgd", {"steps": 2, "random_start": False})])
def test_a_batch_of_strengths_gives_what_each_gives_alone(probe_name, settings):
    alone, together = both_ways(tiny_model(), small_volume(), probe_name, settings)
    # L-infinity: the same float operations per copy, bit for bit; L2: the norm's sum may round in another order
    assert_same_outcomes(alone, together, 0.0 if settings.get("norm") != "l2" else 1e-4)
    assert len({o.probed.tobytes() for o in together.outcomes[1:]}) == len(EPSILONS)  # each copy its own epsilon


def test_a_batch_keeps_the_region_and_the_target():
    volume = small_volume(seed=1)
    region = np.zeros(volume.array.shape, dtype=bool)
    region[3:10, 2:9, 2:8] = True
    target = np.zeros(volume.array.shape, dtype=np.int64)
    target[5:9] = 2
    alone, together = both_ways(tiny_model(), volume, "pgd", {"steps": 2}, region=region, target=target)
    assert_same_outcomes(alone, together, 0.0)
    for outcome in together.outcomes[1:]:
        assert np.array_equal(outcome.probed[~region], volume.array[~region])


def test_the_demo_network_on_the_sample_batched_as_alone():
    import nibabel as nib
    model = load_model("demo")
    image = nib.as_closest_canonical(nib.load(str(SAMPLE_VOLUME)))
    volume = Volume.from_array(image.get_fdata(dtype=np.float32)[::2, ::2, ::2].copy(), name="sample")
    alone, together = [run_sweep(model, volume, make_probe("fgsm"), EPSILONS[:2], batch_strengths=batched)
                       for batched in (False, True)]
    for one, batched in zip(alone.outcomes[1:], together.outcomes[1:]):
        assert batched.record.details["strengths_at_once"] == 2
        assert np.array_equal(batched.probed, one.probed)
        assert np.mean(batched.prediction == one.prediction) >= 0.9999


def test_progress_names_the_strengths_that_run_at_once():
    messages = []
    run_sweep(tiny_model(), small_volume(), make_probe("pgd", steps=2), EPSILONS, batch_strengths=True,
              progress=lambda fraction, message: messages.append((fraction, message)))
    assert messages[-1][0] == pytest.approx(1.0)
    assert any(message.startswith("pgd epsilon 0.01, 0.03, 0.06 at once: step 2/2 loss ") and message.count("/") >= 3
               for _, message in messages)


def test_the_cpu_default_and_probes_that_cannot_batch_run_one_by_one():
    model, volume = tiny_model(), small_volume()
    default = run_sweep(model, volume, make_probe("fgsm"), EPSILONS)
    restarts = run_sweep(model, volume, make_probe("pgd", steps=1, restarts=2), EPSILONS, batch_strengths=True)
    apgd = run_sweep(model, volume, make_probe("apgd-ce", steps=2), EPSILONS, batch_strengths=True)
    for result in (default, restarts, apgd):
        assert all("strengths_at_once" not in o.record.details for o in result.outcomes[1:])


def test_a_batch_is_refused_where_the_foreground_crop_would_take_one_box_for_all():
    base = tiny_model(intensity="none")
    description = ModelDescription(name="cropping", output_activation="logits", intensity={"type": "none"},
                                   crop={"threshold": 0.0})
    model = SegmentationModel(base.network, description).eval()
    with pytest.raises(InputError, match="^strengths cannot run as one batch: the foreground crop of cropping"):
        run_sweep(model, small_volume(), make_probe("fgsm"), EPSILONS, batch_strengths=True)


def test_an_attack_called_with_a_list_of_epsilons_checks_it():
    model, volume = tiny_model(), small_volume().as_tensor()
    labels = model.predict(volume)
    with pytest.raises(InputError, match="^2 epsilons for 1 volumes"):
        make_probe("fgsm")(model, volume, labels, [1.0, 2.0], (-50.0, 350.0))
    with pytest.raises(InputError, match="^apgd-ce takes one epsilon per call"):
        make_probe("apgd-ce")(model, volume, labels, [1.0], (-50.0, 350.0))
    with pytest.raises(InputError, match="^epsilon must be positive, got \\[1.0, 0.0\\]"):
        make_probe("fgsm")(model, volume.expand(2, -1, -1, -1, -1), labels.expand(2, -1, -1, -1), [1.0, 0.0],
                           (-50.0, 350.0))


def test_the_default_decision_names_what_keeps_a_sweep_one_by_one():
    """The demo declares a 96^3 window: on the 2 mm sample one window covers it (only the device stops a batch
    here), on a 100x97x90 volume several do; a foreground crop stops it first."""
    import nibabel as nib
    import torch
    from MedAdvRobustnessLib.evaluation.sweep import Sweep
    model = load_model("demo")
    image = nib.as_closest_canonical(nib.load(str(SAMPLE_VOLUME)))
    sample = Volume.from_array(image.get_fdata(dtype=np.float32), image.affine)
    large = Volume.from_array(np.ones((100, 97, 90), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    reasons = []
    for volume in (sample, large):
        outputs = torch.zeros((1, 4) + volume.array.shape[-3:])
        sweep = Sweep(model, volume, outputs, None, None, None, None)
        reasons.append(sweep.default_obstacle())
        assert sweep.batches(3) is False
    assert reasons == ["on cpu a batch of strengths costs more than one by one",
                       "demo-unet runs in several windows over this volume"]
    base = tiny_model(intensity="none")
    cropping = SegmentationModel(base.network, ModelDescription(name="cropping", output_activation="logits",
                                                                intensity={"type": "none"}, crop={"threshold": 0.0}))
    volume = small_volume()
    sweep = Sweep(cropping, volume, torch.zeros((1, 4) + volume.array.shape[-3:]), None, None, None, None)
    assert sweep.default_obstacle() == "the foreground crop of cropping takes one box for a whole batch"
