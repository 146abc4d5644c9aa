"""Differentiable intensity preprocessing: gradients flow from the network back to raw intensities."""
import torch

INTENSITY_TYPES = ("none", "percentile", "zscore")


def normalize_intensity(volume, spec):
    """Normalise a raw (B, C, *spatial) volume as ``spec`` says, per image and channel, differentiably.

    ``{"type": "none"}``; ``{"type": "percentile", "lower": 0, "upper": 99.5}`` maps those percentiles to
    0 and 1 (no clipping); ``{"type": "zscore"}`` subtracts the mean and divides by the standard deviation.
    """
    kind = spec.get("type", "none")
    if kind == "none":
        return volume
    flat = volume.flatten(start_dim=2)
    if kind == "percentile":
        quantiles = torch.tensor([spec.get("lower", 0.0) / 100.0, spec.get("upper", 100.0) / 100.0],
                                 dtype=flat.dtype, device=flat.device)
        low, high = torch.quantile(flat, quantiles, dim=2, keepdim=True)
        return ((flat - low) / (high - low).clamp_min(1e-8)).view_as(volume)
    if kind == "zscore":
        mean = flat.mean(dim=2, keepdim=True)
        std = flat.std(dim=2, keepdim=True)
        return ((flat - mean) / std.clamp_min(1e-8)).view_as(volume)
    raise ValueError("unknown intensity preprocessing {!r}; expected one of {}".format(kind, INTENSITY_TYPES))
