"""Segmentation agreement (MONAI's Dice) and perturbation size metrics."""
import math

import torch


def dice_per_label(prediction, reference, label_count):
    """Dice of each foreground label (1..label_count-1) between two integer label maps of one grid.

    A label absent from both maps scores 1, absent from one only 0 (MONAI's ``ignore_empty=False``).
    """
    from monai.metrics import compute_dice
    if prediction.shape != reference.shape:
        raise ValueError("label maps differ in shape: {} vs {}".format(tuple(prediction.shape),
                                                                       tuple(reference.shape)))
    as_one_hot = [_one_hot(labels, label_count) for labels in (prediction, reference)]
    scores = compute_dice(as_one_hot[0], as_one_hot[1], include_background=False, ignore_empty=False)[0]
    return {value: float(score) for value, score in enumerate(scores.tolist(), start=1)}


def surface_distances_per_label(prediction, reference, label_count, spacing):
    """95th percentile Hausdorff and symmetric mean surface distance (mm) of each foreground label.

    Both from one pair of directed surface distances per label (MONAI's edges and distance transform), as MONAI's
    ``compute_hausdorff_distance(percentile=95)`` and ``compute_average_surface_distance(symmetric=True)`` give
    them. None where the label is absent from either map (the distances are undefined there).
    """
    from monai.metrics.utils import get_edge_surface_distance
    spacing = [float(s) for s in spacing]
    distances = {}
    for value in range(1, label_count):
        predicted, expected = prediction == value, reference == value
        if not bool(predicted.any()) or not bool(expected.any()):
            distances[value] = {"hd95": None, "asd": None}
            continue
        _, directed, _ = get_edge_surface_distance(predicted, expected, spacing=spacing, symmetric=True)
        hd95 = max(float(torch.quantile(d.double(), 0.95)) if d.numel() else 0.0 for d in directed)
        asd = float(torch.cat(directed).double().mean())
        distances[value] = {"hd95": _finite_or_none(hd95), "asd": _finite_or_none(asd)}
    return distances


def structural_similarity(original, adversarial, intensity_range):
    """SSIM (MONAI, Gaussian window) between two volumes of the same grid, over the volume's intensity range."""
    from monai.metrics import SSIMMetric
    spatial = original.dim()
    metric = SSIMMetric(spatial_dims=spatial, data_range=float(intensity_range), win_size=7)
    return float(metric(adversarial.float()[None, None], original.float()[None, None]).mean())


def mean_dice(scores):
    return sum(scores.values()) / len(scores) if scores else float("nan")


def perturbation_metrics(original, adversarial, intensity_range):
    """L-infinity and L2 norms of the perturbation, in intensity units and as fractions of the range, and PSNR."""
    delta = adversarial.double() - original.double()
    linf = float(delta.abs().max())
    l2 = float(torch.linalg.vector_norm(delta))
    rmse = float(delta.pow(2).mean().sqrt())
    psnr = 20.0 * math.log10(intensity_range / rmse) if rmse > 0 else None
    return {"linf": linf, "l2": l2, "linf_fraction": linf / intensity_range, "l2_fraction": l2 / intensity_range,
            "psnr": psnr}


def _one_hot(labels, label_count):
    from monai.networks.utils import one_hot
    return one_hot(labels.long().clamp(0, label_count - 1)[None, None], label_count)


def _finite_or_none(value):
    return float(value) if math.isfinite(value) else None
