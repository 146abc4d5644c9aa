"""Segmentation agreement (MONAI's Dice, surface distances and surface Dice) and perturbation size metrics."""
import math

import numpy as np
import torch

from ..errors import InputError

SURFACE_TOLERANCE_MM = 2.0  # the default tolerance of the surface Dice (normalised surface distance)


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

    As MONAI's ``compute_hausdorff_distance(percentile=95)`` and ``compute_average_surface_distance(symmetric=True)``
    give them; None where the label is absent from either map. See :class:`LabelSurfaces` to compare many maps.
    """
    return LabelSurfaces(prediction, label_count, spacing).distances_to(LabelSurfaces(reference, label_count, spacing))


class LabelSurfaces:
    """The surface of each foreground label of one label map (MONAI's mask edges: the label minus its binary
    erosion) and, computed on first use, the Euclidean distance (mm) from every voxel to it (MONAI's
    ``distance_transform_edt``): built once per map, compared with any number of maps on the same grid."""

    def __init__(self, labels, label_count, spacing):
        from monai.metrics.utils import get_mask_edges
        labels = labels.numpy() if torch.is_tensor(labels) else np.asarray(labels)
        self.spacing = [float(s) for s in spacing]
        self.label_count = label_count
        self.edges, self._distance = {}, {}
        for value in range(1, label_count):
            mask = labels == value
            if mask.any():
                self.edges[value] = get_mask_edges(mask, mask, crop=False)[0]

    def distance(self, value):
        """Distance (mm) from every voxel to the surface of label ``value``."""
        if value not in self._distance:
            from monai.transforms.utils import distance_transform_edt
            self._distance[value] = distance_transform_edt((~self.edges[value])[None], sampling=self.spacing)[0]
        return self._distance[value]

    def distances_to(self, other, tolerance=SURFACE_TOLERANCE_MM):
        """Per foreground label {"hd95", "asd", "nsd"} between this map's surfaces and ``other``'s (symmetric).

        ``nsd``: the surface Dice at ``tolerance`` mm, the fraction of both surfaces' voxels within ``tolerance``
        of the other surface (MONAI's ``compute_surface_dice``): 0 where the label is in one map only, None where
        it is in neither; hd95 and asd are None where it is missing from either."""
        distances = {}
        for value in range(1, self.label_count):
            if value not in self.edges or value not in other.edges:
                present = value in self.edges or value in other.edges
                distances[value] = {"hd95": None, "asd": None, "nsd": 0.0 if present else None}
                continue
            directed = [other.distance(value)[self.edges[value]], self.distance(value)[other.edges[value]]]
            hd95 = max(float(np.percentile(d, 95)) for d in directed)
            asd = float(np.concatenate(directed).astype(np.float64).mean())
            within = sum(int((d <= tolerance).sum()) for d in directed)
            distances[value] = {"hd95": _finite_or_none(hd95), "asd": _finite_or_none(asd),
                                "nsd": within / sum(len(d) for d in directed)}
        return distances


SSIM_WINDOW = 7  # voxels along each axis of the Gaussian window (sigma 1.5)


def structural_similarity(original, adversarial, intensity_range):
    """SSIM (MONAI, Gaussian window of :data:`SSIM_WINDOW` voxels) between two volumes of the same grid, over the
    volume's intensity range.

    3D where every axis holds the window; where one axis is shorter (a single slice, a 2D image as Slicer loads
    it, 64x64x1), the mean of the 2D SSIM of each slice across that axis; refused where fewer than two do.
    """
    from monai.metrics import SSIMMetric
    long_axes = [axis for axis, size in enumerate(original.shape) if size >= SSIM_WINDOW]
    if len(long_axes) < 2:
        raise InputError("the volume ({}) is too small for SSIM: its {}-voxel window needs {} voxels along at least "
                         "two axes".format("x".join(str(n) for n in original.shape), SSIM_WINDOW, SSIM_WINDOW))
    pair = [volume.float() for volume in (adversarial, original)]
    if len(long_axes) == original.dim():
        pair = [volume[None, None] for volume in pair]
    else:  # the slices of the short axes as a batch of 2D images
        short = [axis for axis in range(original.dim()) if axis not in long_axes]
        sizes = [original.shape[axis] for axis in long_axes]
        pair = [volume.permute(*short, *long_axes).reshape(-1, 1, *sizes) for volume in pair]
    metric = SSIMMetric(spatial_dims=pair[0].dim() - 2, data_range=float(intensity_range), win_size=SSIM_WINDOW)
    return float(metric(*pair).mean())


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
