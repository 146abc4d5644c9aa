"""Metrics on hand-made label maps and volumes with known answers."""
import math

import pytest
import torch

from MedAdvRobustnessLib.evaluation.metrics import SURFACE_TOLERANCE_MM, LabelSurfaces, dice_per_label, mean_dice, \
    perturbation_metrics, structural_similarity, surface_distances_per_label


def cube_labels():
    labels = torch.zeros(30, 30, 30, dtype=torch.long)
    labels[5:15, 5:15, 5:15] = 1
    labels[20:25, 20:25, 20:25] = 2
    return labels


def test_dice_per_label_by_hand():
    reference = cube_labels()
    prediction = reference.clone()
    prediction[5:10, 5:15, 5:15] = 0
    scores = dice_per_label(prediction, reference, 4)
    assert scores[1] == pytest.approx(2 * 500 / (500 + 1000))
    assert scores[2] == 1.0
    assert scores[3] == 1.0, "a label absent from both maps agrees"
    assert mean_dice(scores) == pytest.approx((2 / 3 + 2) / 3)
    prediction[prediction == 2] = 0
    assert dice_per_label(prediction, reference, 4)[2] == 0.0


def test_surface_distances_use_the_spacing():
    reference = cube_labels()
    shifted = torch.zeros_like(reference)
    shifted[7:17, 5:15, 5:15] = 1
    distances = surface_distances_per_label(shifted, reference, 3, spacing=(2.0, 1.0, 1.0))
    assert distances[1]["hd95"] == pytest.approx(4.0)
    assert 0.0 < distances[1]["asd"] < 4.0
    assert distances[2] == {"hd95": None, "asd": None, "nsd": 0.0}, "label 2 is in the reference only"
    same = surface_distances_per_label(reference, reference, 3, spacing=(1.0, 1.0, 1.0))
    assert same[1] == {"hd95": 0.0, "asd": 0.0, "nsd": 1.0}


def test_surface_distances_match_monai_on_the_sample_tissue_map():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice
    from monai.networks.utils import one_hot
    from MedAdvRobustnessLib.sample import SAMPLE_LABELS
    import nibabel
    reference = torch.from_numpy(nibabel.load(str(SAMPLE_LABELS)).get_fdata().astype("int64"))
    prediction = torch.roll(reference, 1, 0)
    prediction[torch.rand(reference.shape, generator=torch.Generator().manual_seed(0)) < 0.01] = 2
    spacing = (2.0, 1.5, 1.0)
    ours = surface_distances_per_label(prediction, reference, 4, spacing)
    tolerant = LabelSurfaces(prediction, 4, spacing).distances_to(LabelSurfaces(reference, 4, spacing), 1.5)
    as_one_hot = [one_hot(labels[None, None], 4) for labels in (prediction, reference)]
    for tolerance, computed in ((SURFACE_TOLERANCE_MM, ours), (1.5, tolerant)):
        nsd = compute_surface_dice(*as_one_hot, [tolerance] * 3, spacing=spacing)[0]
        for value in (1, 2, 3):
            assert computed[value]["nsd"] == pytest.approx(float(nsd[value - 1]), rel=1e-6)
        print("surface Dice at {} mm: {}".format(tolerance, [round(computed[v]["nsd"], 4) for v in (1, 2, 3)]))
    assert 0 < tolerant[1]["nsd"] < ours[1]["nsd"] < 1, "a wider tolerance counts more of the shifted surface"
    hd95 = compute_hausdorff_distance(*as_one_hot, percentile=95, spacing=spacing)[0]
    asd = compute_average_surface_distance(*as_one_hot, symmetric=True, spacing=spacing)[0]
    for value in (1, 2, 3):
        assert ours[value]["hd95"] == pytest.approx(float(hd95[value - 1]), rel=1e-6)
        assert ours[value]["asd"] == pytest.approx(float(asd[value - 1]), rel=1e-6)
    assert ours[2]["hd95"] > ours[1]["hd95"], "the scattered grey-matter voxels lie far from its surface"


def test_perturbation_metrics_by_hand():
    original = torch.zeros(10, 10, 10)
    adversarial = original.clone()
    adversarial[0, 0, :4] = torch.tensor([3.0, -4.0, 0.0, 0.0])
    size = perturbation_metrics(original, adversarial, intensity_range=100.0)
    assert size["linf"] == 4.0 and size["linf_fraction"] == 0.04
    assert size["l2"] == pytest.approx(5.0) and size["l2_fraction"] == pytest.approx(0.05)
    assert size["psnr"] == pytest.approx(20 * math.log10(100.0 / math.sqrt(25.0 / 1000)))
    assert perturbation_metrics(original, original, 100.0)["psnr"] is None


def test_ssim_falls_with_noise():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(24, 24, 24, generator=generator) * 100.0
    assert structural_similarity(volume, volume, 100.0) == pytest.approx(1.0)
    noisy = [structural_similarity(volume, volume + torch.randn(volume.shape, generator=generator) * sigma, 100.0)
             for sigma in (1.0, 5.0, 20.0)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2]
