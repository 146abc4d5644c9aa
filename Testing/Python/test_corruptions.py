"""Corruptions on the embedded sample: every family at every severity, determinism, severity monotone in a measured
image statistic, labels moved with spatial families, and the ROOD-MRI summary on hand-made numbers."""
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from MedAdvRobustnessLib.probes.corruptions import (CORRUPTIONS, SEVERITIES, corrupt, corrupt_with_labels,
                                             corruption_names, corruption_parameters, rood_summary,
                                             spacing_from_affine)
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME

ROOD_FAMILIES = ["affine", "anisotropic_downsampling", "bias_field", "contrast_compression", "contrast_expansion",
                 "elastic_deformation", "ghosting", "motion", "rician_noise", "smoothing"]
BRAIN_THRESHOLD = 50.0  # between background (~1) and CSF (~97) on the sample


@pytest.fixture(scope="module")
def sample():
    """The sample as a (1, 1, X, Y, Z) float32 tensor, its labels, and its spacing read from the affine."""
    image = nib.load(str(SAMPLE_VOLUME))
    volume = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32))[None, None]
    labels = torch.from_numpy(np.asarray(nib.load(str(SAMPLE_LABELS)).dataobj).astype(np.uint8))
    return volume, labels, spacing_from_affine(image.affine)


@pytest.fixture(scope="module")
def runs(sample):
    """Per family: the corrupted volumes at severities 1..5 (seed 0), and whether each call changed its input."""
    volume, _, spacing = sample
    results = {}
    for name in corruption_names():
        outputs, changed = [], []
        for severity in SEVERITIES:
            given = volume.clone()
            outputs.append(corrupt(name, given, severity, seed=0, spacing=spacing))
            changed.append(not torch.equal(given, volume))
        results[name] = outputs, changed
    return results


def difference_norm(corrupted, clean, brain):
    return float((corrupted.double() - clean.double()).norm())


def difference_std(corrupted, clean, brain):
    return float((corrupted.double() - clean.double()).std())


def axis_energies(corrupted):
    """Mean squared difference of neighbouring voxels along each axis: high-frequency energy."""
    image = corrupted[0, 0].double()
    return [float((image.diff(dim=axis) ** 2).mean()) for axis in range(3)]


def high_frequency_energy(corrupted, clean, brain):
    return sum(axis_energies(corrupted))


def through_plane_energy(corrupted, clean, brain):
    """High-frequency energy along the axis that has least: the downsampled one."""
    return min(axis_energies(corrupted))


def brain_std(corrupted, clean, brain):
    return float(corrupted[0, 0][brain].double().std())


def log_ratio_std(corrupted, clean, brain):
    """Spread of log(corrupted / clean) inside the brain: the log bias field."""
    low = float(clean.min())
    inside = brain & (clean[0, 0] > low + 1.0)
    ratio = (corrupted[0, 0][inside].double() - low) / (clean[0, 0][inside].double() - low)
    return float(torch.log(ratio).std())


# family -> (statistic, +1 if it must increase with the severity, -1 if it must decrease)
MONOTONE = {
    "affine": (difference_norm, 1),
    "anisotropic_downsampling": (through_plane_energy, -1),
    "bias_field": (log_ratio_std, 1),
    "contrast_compression": (brain_std, -1),
    "contrast_expansion": (brain_std, 1),
    "elastic_deformation": (difference_norm, 1),
    "ghosting": (difference_norm, 1),
    "motion": (difference_norm, 1),
    "rician_noise": (difference_std, 1),
    "smoothing": (high_frequency_energy, -1),
    "gibbs_ringing": (difference_norm, 1),
    "kspace_spikes": (difference_norm, 1),
}


def test_registry_holds_rood_families_first_and_two_k_space_artefacts():
    assert corruption_names() == ROOD_FAMILIES + ["gibbs_ringing", "kspace_spikes"]
    assert sorted(MONOTONE) == sorted(corruption_names())


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_parameter_table_has_five_monotone_levels(name):
    corruption = CORRUPTIONS[name]
    assert corruption.description
    assert len(corruption.levels) == len(SEVERITIES)
    keys = set(corruption.levels[0])
    for key in keys:
        values = [corruption_parameters(name, severity)[key] for severity in SEVERITIES]
        steps = np.sign(np.diff(values))
        assert len(set(steps)) == 1, (key, values)
    assert corruption.spatial == (name in ("affine", "elastic_deformation"))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_severity_keeps_shape_dtype_grid_and_input(runs, sample, name):
    volume = sample[0]
    outputs, changed = runs[name]
    assert not any(changed)
    for output in outputs:
        assert output.shape == volume.shape
        assert output.dtype == volume.dtype
        assert bool(torch.isfinite(output).all())
        assert not torch.equal(output, volume)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_severity_is_monotone_in_a_measured_statistic(runs, sample, name):
    volume, labels, _ = sample
    statistic, direction = MONOTONE[name]
    brain = labels > 0
    values = [statistic(volume, volume, brain)] + [statistic(output, volume, brain) for output in runs[name][0]]
    steps = np.diff(values) * direction
    assert np.all(steps > 0), "{} of clean, severity 1..5: {}".format(statistic.__name__, np.round(values, 3))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_same_seed_gives_same_volume_other_seed_another(runs, sample, name):
    volume, _, spacing = sample
    again = corrupt(name, volume, 3, seed=0, spacing=spacing)
    assert torch.equal(again, runs[name][0][2])
    other = corrupt(name, volume, 3, seed=1, spacing=spacing)
    assert torch.equal(other, again) != CORRUPTIONS[name].random


def test_double_precision_volume_stays_double(sample):
    small = sample[0][..., ::2, ::2, ::2].double()
    for name in corruption_names():
        corrupted = corrupt(name, small, 2, seed=3, spacing=(4.0, 4.0, 4.0))
        assert corrupted.dtype == torch.float64 and corrupted.shape == small.shape
        assert bool(torch.isfinite(corrupted).all())


def test_spacing_is_read_from_the_affine(sample):
    assert sample[2] == (2.0, 2.0, 2.0)
    permuted = np.array([[0.0, 0.0, 3.0, 1.0], [1.5, 0.0, 0.0, 2.0], [0.0, -2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
    assert spacing_from_affine(permuted) == pytest.approx((1.5, 2.0, 3.0))


def test_blur_is_in_millimetres(sample):
    volume = sample[0]
    fine_voxels = corrupt("smoothing", volume, 2, spacing=(1.0, 1.0, 1.0))
    coarse_voxels = corrupt("smoothing", volume, 2, spacing=(2.0, 2.0, 2.0))
    assert high_frequency_energy(fine_voxels, volume, None) < high_frequency_energy(coarse_voxels, volume, None)


def centroid(mask):
    coordinates = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in mask.shape], indexing="ij")
    return torch.stack([axis[mask].mean() for axis in coordinates])


def dice(first, second):
    return float(2.0 * (first & second).sum() / (first.sum() + second.sum()))


def test_affine_moves_labels_with_the_image(sample):
    volume, labels, spacing = sample
    moved_volume, moved_labels = corrupt_with_labels("affine", volume, labels, 3, seed=0, spacing=spacing)
    assert torch.equal(moved_volume, corrupt("affine", volume, 3, seed=0, spacing=spacing))
    assert moved_labels.dtype == labels.dtype and moved_labels.shape == labels.shape
    assert set(torch.unique(moved_labels).tolist()) <= set(torch.unique(labels).tolist())
    image_shift = centroid(moved_volume[0, 0] > BRAIN_THRESHOLD) - centroid(volume[0, 0] > BRAIN_THRESHOLD)
    label_shift = centroid(moved_labels > 0) - centroid(labels > 0)
    assert float(image_shift.norm()) > 5.0
    assert float((image_shift - label_shift).norm()) < 0.5
    _, spread_labels = corrupt_with_labels("affine", volume, labels * 5, 3, seed=0, spacing=spacing)
    assert set(torch.unique(spread_labels).tolist()) == {0, 5, 10, 15}  # nearest: no value in between


@pytest.mark.parametrize("name", ["affine", "elastic_deformation"])
def test_moved_labels_fit_the_moved_brain_as_the_originals_fit_the_original(sample, name):
    volume, labels, spacing = sample
    moved_volume, moved_labels = corrupt_with_labels(name, volume, labels, 5, seed=1, spacing=spacing)
    clean_fit = dice(volume[0, 0] > BRAIN_THRESHOLD, labels > 0)
    moved_fit = dice(moved_volume[0, 0] > BRAIN_THRESHOLD, moved_labels > 0)
    unmoved_fit = dice(moved_volume[0, 0] > BRAIN_THRESHOLD, labels > 0)
    assert moved_fit > clean_fit - 0.01
    assert unmoved_fit < moved_fit - 0.05
    for label in (1, 2, 3):
        clean_mean = float(volume[0, 0][labels == label].mean())
        assert abs(float(moved_volume[0, 0][moved_labels == label].mean()) - clean_mean) < 5.0


@pytest.mark.parametrize("name", ["motion", "rician_noise"])
def test_other_families_leave_labels_alone(sample, name):
    volume, labels, spacing = sample
    corrupted, same_labels = corrupt_with_labels(name, volume, labels, 2, seed=2, spacing=spacing)
    assert torch.equal(corrupted, corrupt(name, volume, 2, seed=2, spacing=spacing))
    assert torch.equal(same_labels, labels) and same_labels is not labels


def test_bad_requests_are_input_errors(sample):
    volume, labels, spacing = sample
    for call in (lambda: corrupt("fog", volume, 1),
                 lambda: corrupt("smoothing", volume, 0),
                 lambda: corrupt("smoothing", volume, 6),
                 lambda: corrupt("smoothing", volume[0], 1),
                 lambda: corrupt("smoothing", volume.long(), 1),
                 lambda: corrupt("motion", volume, 1, seed=-1),
                 lambda: corrupt("smoothing", volume, 1, spacing=(1.0, 0.0, 1.0)),
                 lambda: corrupt_with_labels("affine", volume, labels[:-1], 1)):
        with pytest.raises(InputError):
            call()


def test_rood_summary_by_hand():
    summary = rood_summary({1: 0.6, 2: 0.3}, clean_score=0.8, alpha=0.5)
    # weights 0.5 and 0.25, normalised to 2/3 and 1/3
    assert summary["weighted_mean"] == pytest.approx(0.5)
    assert summary["degradation"] == pytest.approx(0.3)
    assert summary["overall"] == pytest.approx((0.8 + 0.5 * 0.6 + 0.25 * 0.3) / 1.75)


def test_rood_summary_default_alpha_weights_mild_severities_most():
    scores = {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5}
    summary = rood_summary(scores, clean_score=1.0)
    # (2/3)^s: 0.6667, 0.4444, 0.2963, 0.1975, 0.1317 (sum 1.7366); weighted sum 1.3473
    assert summary["weighted_mean"] == pytest.approx(1.34733 / 1.73663, abs=1e-4)
    assert summary["weighted_mean"] > sum(scores.values()) / 5
    assert summary["degradation"] == pytest.approx(1.0 - summary["weighted_mean"])
    assert rood_summary({3: 0.7}, clean_score=0.9)["weighted_mean"] == pytest.approx(0.7)
    assert math.isclose(rood_summary({s: 0.4 for s in SEVERITIES}, 0.4)["degradation"], 0.0, abs_tol=1e-12)


def test_rood_summary_refuses_unknown_severities():
    for scores in ({}, {0: 0.5}, {6: 0.5}):
        with pytest.raises(InputError):
            rood_summary(scores, clean_score=0.9)
