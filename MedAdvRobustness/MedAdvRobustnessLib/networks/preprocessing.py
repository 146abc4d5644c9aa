"""The differentiable operations of the preprocessing steps (:mod:`.steps` puts them in order): intensity
normalisation, percentiles, the foreground box and crop with the outputs padded back with background, divisible
padding. Gradients flow through each back to the raw intensities.
"""
import math

import torch
import torch.nn.functional as F

INTENSITY_TYPES = ("none", "percentile", "zscore", "range", "minmax", "sigmoid", "tanh", "pet")
# The comparisons a foreground crop may select its voxels with (x compared with the threshold).
COMPARISONS = {">": torch.gt, ">=": torch.ge, "<": torch.lt, "<=": torch.le, "!=": torch.ne, "==": torch.eq}
# Outputs outside the cropped box: background. Logits: background 0, other channels this much lower.
BACKGROUND_LOGIT_GAP = 100.0


def normalize_intensity(volume, spec):
    """Normalise a raw (B, C, *spatial) volume as ``spec`` says, per image and channel, differentiably.

    ``spec`` is one step or a list of steps applied in order:

    - ``{"type": "none"}``;
    - ``{"type": "percentile", "lower": 0, "upper": 99.5, "b_min": 0, "b_max": 1, "clip": false}`` maps those
      percentiles of the volume to ``b_min`` and ``b_max`` (MONAI's ``ScaleIntensityRangePercentiles``);
    - ``{"type": "zscore", "nonzero": false, "mean": null, "std": null}`` subtracts the mean and divides by the
      standard deviation (population, as MONAI's ``NormalizeIntensity``; over non-zero voxels only, which alone
      are changed, with ``nonzero``; fixed values where ``mean``/``std`` are given, one or a list of one per
      channel; per channel, or with
      ``"channel_wise": false`` over all channels together, as MONAI's default);
    - ``{"type": "range", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1, "clip": true}``: a fixed intensity
      window mapped to [b_min, b_max], clipped (MONAI's ``ScaleIntensityRange``);
    - ``{"type": "minmax", "min": 0, "max": 1}``: the volume's minimum and maximum mapped to ``min``, ``max``
      (MONAI's ``ScaleIntensity``);
    - ``{"type": "sigmoid"}``: the logistic function of each voxel; ``{"type": "tanh", "scale": 3}``:
      ``scale * tanh(x / scale)`` (the squashing steps of MONAI Auto3DSeg's ``ct`` and ``meanstdtanh`` modes);
    - ``{"type": "pet"}``: ``sigmoid((x - min) / std)``, the minimum and the standard deviation (with Bessel's
      correction, as torch's ``Tensor.std``) of the volume (MONAI Auto3DSeg's ``pet`` mode in MONAIAuto3DSeg).
    """
    if isinstance(spec, (list, tuple)):
        for step in spec:
            volume = normalize_intensity(volume, step)
        return volume
    spec = spec or {}
    kind = spec.get("type", "none")
    if kind == "none":
        return volume
    flat = volume.flatten(start_dim=2)
    if kind == "percentile":
        low, high = percentiles(flat, (spec.get("lower", 0.0) / 100.0, spec.get("upper", 100.0) / 100.0))
        return _scale(flat, low, high, spec.get("b_min", 0.0), spec.get("b_max", 1.0),
                      spec.get("clip", False)).view_as(volume)
    if kind == "range":
        low, high = float(spec["a_min"]), float(spec["a_max"])
        return _scale(flat, low, high, spec.get("b_min", 0.0), spec.get("b_max", 1.0),
                      spec.get("clip", True)).view_as(volume)
    if kind == "minmax":
        low = flat.amin(dim=2, keepdim=True)
        high = flat.amax(dim=2, keepdim=True)
        return _scale(flat, low, high, spec.get("min", 0.0), spec.get("max", 1.0), False).view_as(volume)
    if kind == "zscore":
        if not spec.get("channel_wise", True):  # one set of statistics for all channels of an image
            return _zscore(volume.flatten(start_dim=1)[:, None], spec).view_as(volume)
        return _zscore(flat, spec).view_as(volume)
    if kind == "sigmoid":
        return torch.sigmoid(volume)
    if kind == "tanh":
        scale = float(spec.get("scale", 1.0))
        return scale * torch.tanh(volume / scale)
    if kind == "pet":
        low = flat.amin(dim=2, keepdim=True)
        spread = flat.std(dim=2, keepdim=True)
        return torch.sigmoid((flat - low) / spread).view_as(volume)
    raise ValueError("unknown intensity preprocessing {!r}; expected one of {}".format(kind, INTENSITY_TYPES))


def percentiles(flat, q):
    """The fractions ``q`` (in [0, 1]) of ``flat`` along its last axis, each as a (..., 1) tensor: linear
    interpolation between the order statistics at ``q * (n - 1)``, as ``torch.quantile`` (which refuses more
    than 2^24 elements) and ``numpy.percentile``. By selection, not sorting, and differentiable: the gradient goes
    to the voxels interpolated, with the same weights, except where an order statistic is tied (other voxels hold
    its value): moving one of those voxels alone leaves it where it is (the others still hold it), so its gradient
    is 0 (torch.quantile gives it all to one of them: a gradient the function does not have, on which an L2 or
    minimal-perturbation attack spends its budget)."""
    n = flat.shape[-1]
    rows = flat.reshape(-1, n)
    wanted = []
    for fraction in q:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("percentile fraction {!r} outside [0, 1]".format(fraction))
        position = float(fraction) * (n - 1)
        below = int(math.floor(position))
        wanted.append((below, position - below))
    ranks = sorted({rank for below, weight in wanted for rank in ((below, below + 1) if weight > 0 else (below,))})
    picked = rows.gather(1, order_indices(rows.detach(), ranks))  # one gather: one scatter in the backward pass
    picked = torch.where(_tied(rows.detach(), picked.detach()), picked.detach(), picked)
    column = {rank: picked[:, i] for i, rank in enumerate(ranks)}
    values = []
    for below, weight in wanted:
        value = column[below] if weight == 0 else torch.lerp(column[below], column[below + 1], weight)
        values.append(value.reshape(flat.shape[:-1] + (1,)))
    return values


def _tied(rows, values):
    """(R, V) mask: whether more than one voxel of each row of ``rows`` (R, N) holds each of its ``values`` (R, V)."""
    return torch.stack([(rows == values[:, i:i + 1]).sum(dim=1) > 1 for i in range(values.shape[1])], dim=1)


def order_statistic(rows, k):
    """The ``k``-th smallest value (0-based) of each row of a (R, N) tensor, taken from one voxel so that the
    gradient goes there; among equal values the one a stable sort would put at ``k`` (the lowest index first), so
    the choice does not depend on the other voxels."""
    return rows.gather(1, order_indices(rows.detach(), [k]))[:, 0]


def order_indices(rows, ranks):
    """(R, len(ranks)) indices: per row of ``rows`` (R, N), the voxel a stable sort puts at each rank.

    Rank 0 is the first minimum; ranks in a tail (at most 1/8 of the voxels) come from one partial selection of
    that tail (``topk``, with the indices: no pass over the whole row unless a tie reaches past the tail), the
    others from ``kthvalue``. Among equal values the rank within the tie picks the voxel, in index order."""
    n = rows.shape[-1]
    columns = {0: rows.argmin(dim=1)} if 0 in ranks else {}
    lower = [rank for rank in ranks if 0 < rank < n // 2]
    upper = [rank for rank in ranks if rank >= max(n // 2, 1)]
    for tail, largest in ((lower, False), (upper, True)):
        size = (n - min(tail) + 1 if largest else max(tail) + 2) if tail else 0
        if size > max(n // _TAIL, 2):
            columns.update((rank, _kth_pick(rows, rank)) for rank in tail)
        elif tail:
            size = min(size, n)
            values, indices = rows.topk(size, dim=1, largest=largest)  # sorted from the extreme inwards
            for rank in tail:
                columns[rank] = torch.stack([_tail_pick(row, row_values, row_indices, rank, largest)
                                             for row, row_values, row_indices in zip(rows, values, indices)])
    return torch.stack([columns[rank] for rank in ranks], dim=1)


_TAIL = 8  # a tail selection takes at most 1/_TAIL of the voxels, else kthvalue


def _tail_pick(row, values, indices, rank, largest):
    """The voxel of ``row`` at ``rank``, from the ``values`` and ``indices`` of one of its tails."""
    n = row.numel()
    value = values[n - 1 - rank if largest else rank]
    if bool(values[-1] == value) and len(values) < n:  # the tie may go on past the tail: look at the whole row
        positions = torch.nonzero(row == value)[:, 0]
    else:
        positions = indices[values == value].sort().values
    below = n - int((values > value).sum()) - len(positions) if largest else int((values < value).sum())
    return positions[rank - below]


def _kth_pick(rows, rank):
    """Per row, the voxel at ``rank`` by ``kthvalue`` and one pass for the tie."""
    value = rows.kthvalue(rank + 1, dim=1).values
    less = (rows < value[:, None]).sum(dim=1)
    return torch.stack([torch.nonzero(row == v)[rank - int(k), 0] for row, v, k in zip(rows, value, less)])


def _scale(flat, low, high, b_min, b_max, clip):
    span = high - low
    if torch.is_tensor(span):
        span = span.clamp_min(1e-8)
    elif span == 0:
        span = 1e-8
    scaled = (flat - low) / span
    if b_min is not None and b_max is not None:
        scaled = scaled * (b_max - b_min) + b_min
        if clip:
            scaled = scaled.clamp(min(b_min, b_max), max(b_min, b_max))
    return scaled


def _zscore(flat, spec):
    mean, std = _per_channel(spec.get("mean"), flat), _per_channel(spec.get("std"), flat)
    if torch.is_tensor(std):
        std = torch.where(std == 0, torch.ones_like(std), std)  # as MONAI: a zero divisor is 1
    if spec.get("nonzero", False):
        mask = (flat != 0).detach()
        count = mask.sum(dim=2, keepdim=True).clamp_min(1)
        masked = torch.where(mask, flat, torch.zeros_like(flat))
        mean_ = masked.sum(dim=2, keepdim=True) / count if mean is None else mean
        deviation = torch.where(mask, flat - mean_, torch.zeros_like(flat))
        std_ = (deviation.square().sum(dim=2, keepdim=True) / count).sqrt() if std is None else std
        std_ = std_.clamp_min(1e-8) if torch.is_tensor(std_) else (std_ or 1.0)
        return torch.where(mask, (flat - mean_) / std_, flat)
    mean_ = flat.mean(dim=2, keepdim=True) if mean is None else mean
    std_ = flat.std(dim=2, keepdim=True, unbiased=False).clamp_min(1e-8) if std is None else (
        std if torch.is_tensor(std) else (std or 1.0))
    return (flat - mean_) / std_


def _per_channel(value, flat):
    """A fixed mean or standard deviation: a number, or one per channel (a list) as a (1, C, 1) tensor."""
    if not isinstance(value, (list, tuple)):
        return value
    return flat.new_tensor([float(v) for v in value]).view(1, -1, 1)


def foreground_box(volume, spec):
    """Bounding box (list of (start, stop) per spatial axis) of the voxels where ``x compare threshold``
    (``spec["compare"]``, one of :data:`COMPARISONS`, default ``>``; ``spec["threshold"]``, default 0) in any of
    the channels ``spec["channels"]`` (default all) and image, grown by ``spec["margin"]`` voxels, then to a
    multiple of ``spec["k_divisible"]`` (default 1) about its centre; None where there is no foreground or it
    fills the volume (MONAI's ``CropForeground`` with ``select_fn=lambda x: x > 0``, its default, or another such
    comparison, and ``channel_indices``)."""
    with torch.no_grad():
        mask = foreground_mask(volume.detach(), spec).flatten(0, 1).any(dim=0)
        if not bool(mask.any()):
            return None
        margin = spec.get("margin", 0)
        margins = [int(margin)] * mask.dim() if isinstance(margin, (int, float)) else [int(m) for m in margin]
        k = spec.get("k_divisible", 1)
        divisors = [int(k)] * mask.dim() if isinstance(k, (int, float)) else [int(v) for v in k]
        box = []
        for axis in range(mask.dim()):
            other = tuple(a for a in range(mask.dim()) if a != axis)
            present = torch.nonzero(mask.any(dim=other) if other else mask).flatten()
            start, stop = int(present[0]) - margins[axis], int(present[-1]) + 1 + margins[axis]
            if spec.get("allow_smaller", True):  # else the box may leave the grid: padded (MONAI's default)
                start, stop = max(start, 0), min(stop, mask.shape[axis])
            multiple = divisors[axis]
            if multiple > 1:  # MONAI's k_divisible: grown about its centre (the odd voxel after), past the edges
                size = int(math.ceil((stop - start) / multiple) * multiple)
                start -= (size - (stop - start)) // 2
                stop = start + size
            box.append((start, stop))
    if all(start == 0 and stop == size for (start, stop), size in zip(box, mask.shape)):
        return None
    return box


def foreground_mask(volume, spec):
    """Where ``volume`` (B, C, *spatial; the channels ``spec["channels"]``) compares with the threshold as
    ``spec["compare"]`` says, in the volume's own dtype (as MONAI's ``select_fn`` on the image)."""
    channels = spec.get("channels")
    if channels is not None:
        volume = volume[:, [int(c) for c in channels]]
    threshold = spec.get("threshold", 0.0)
    return COMPARISONS[spec.get("compare", ">")](volume, threshold)


def crop(volume, box):
    """``volume`` inside ``box``; zeros where the box leaves the grid."""
    if box is None:
        return volume
    padding = []
    for (start, stop), size in reversed(list(zip(box, volume.shape[2:]))):
        padding += [max(-start, 0), max(stop - size, 0)]
    if any(padding):
        volume = F.pad(volume, padding)
        box = [(start + max(-start, 0), stop + max(-start, 0)) for start, stop in box]
    return volume[(slice(None), slice(None)) + tuple(slice(start, stop) for start, stop in box)]


def pad_outputs_back(outputs, box, full_shape, activation, outside="background"):
    """Outputs on the cropped box → outputs on the full grid; outside the box the background label (``outside``
    ``background``) or zeros in every channel (``zeros``: what MONAI's ``Invertd`` gives a bundle)."""
    if box is None:
        return outputs
    background = torch.zeros((outputs.shape[0], outputs.shape[1]) + tuple(full_shape), dtype=outputs.dtype,
                             device=outputs.device)
    if outside == "zeros":
        pass
    elif activation == "softmax":
        background[:, 0] = 1.0
    elif activation == "logits" or activation is None:
        background[:, 1:] = -BACKGROUND_LOGIT_GAP
    # sigmoid: every foreground probability 0
    mask = torch.zeros(tuple(full_shape), dtype=torch.bool, device=outputs.device)
    mask[tuple(slice(max(start, 0), stop) for start, stop in box)] = True
    padding = []
    for (start, stop), size in reversed(list(zip(box, full_shape))):
        padding += [start, size - stop]  # negative where the box left the grid: F.pad crops there
    padded = F.pad(outputs, padding)
    return torch.where(mask, padded, background)


def divisible_padding(shape, k):
    """F.pad amounts (last axis first) that pad ``shape`` symmetrically to multiples of ``k`` (as MONAI's
    ``DivisiblePad``), or None."""
    if not k:
        return None
    ks = [int(k)] * len(shape) if isinstance(k, (int, float)) else [int(v) for v in k]
    pads = []
    for size, multiple in zip(shape, ks):
        extra = (math.ceil(size / multiple) * multiple - size) if multiple > 1 else 0
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return None
    return [p for pair in reversed(pads) for p in pair]


def unpad(tensor, padding):
    if padding is None:
        return tensor
    pairs = list(zip(padding[0::2], padding[1::2]))[::-1]
    index = tuple(slice(before, tensor.shape[2 + axis] - after) for axis, (before, after) in enumerate(pairs))
    return tensor[(slice(None), slice(None)) + index]


def straight_through(exact, value):
    """``value`` forward (exactly: x - x is 0), the gradient of ``exact`` backward."""
    return value.to(exact.dtype) + (exact - exact.detach())
