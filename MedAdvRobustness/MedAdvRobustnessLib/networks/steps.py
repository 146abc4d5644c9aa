"""The network's preprocessing as ordered, differentiable steps, each with the way back for the outputs.

A step is a one-key dictionary, in the order the pipeline runs them (``ModelDescription.preprocessing``; a MONAI
bundle's transforms in their declared order):

- ``{"intensity": spec}``: :func:`~.preprocessing.normalize_intensity`; the outputs need no way back.
- ``{"crop": {"threshold": t, "margin": m}}``: crop to the voxels above ``t`` (MONAI's ``CropForeground``); the
  outputs are padded back with background.
- ``{"spacing": [x, y, z], "mode": "bilinear"|"nearest", "min_pixdim": [...], "max_pixdim": [...]}``: MONAI's
  ``Spacing`` grid (voxel counts, origin and positions as ``zoom_affine`` and ``compute_shape_offset`` give them,
  border padding; an axis whose spacing lies within the optional ``min_pixdim``..``max_pixdim`` keeps it); the
  outputs go back to the input grid by linear interpolation, as MONAI's ``Invertd`` brings predictions back.
- ``{"pad_divisible": k}``: MONAI's ``DivisiblePad``; the outputs are unpadded.

Resampling is separable: along each axis a linear (or nearest) interpolation at fixed positions, a linear map of
the voxels, so gradients flow through it exactly.
"""
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .preprocessing import crop, divisible_padding, foreground_box, normalize_intensity, pad_outputs_back, unpad

SPACING_TOLERANCE = 1e-3  # spacings that agree within 0.1 %: no resampling
STEP_KINDS = ("intensity", "crop", "spacing", "pad_divisible")
RESAMPLING_MODES = ("bilinear", "nearest")


def step_kind(step):
    """The kind of a step dictionary (one of :data:`STEP_KINDS`); InputError for anything else."""
    kinds = [key for key in step if key in STEP_KINDS] if isinstance(step, dict) else []
    if len(kinds) != 1:
        raise InputError("a preprocessing step is one of {} with its settings, got {!r}".format(
            ", ".join(STEP_KINDS), step))
    return kinds[0]


def check_steps(steps):
    """Refuse steps that cannot be run (unknown kind, spacing that is not three positive numbers, bad mode)."""
    for step in steps:
        if step_kind(step) == "spacing":
            spacing = step["spacing"]
            if (not isinstance(spacing, (list, tuple)) or len(spacing) != 3
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in spacing)):
                raise InputError("spacing must be three positive numbers (mm along x, y, z), got {!r}".format(
                    spacing))
            if step.get("mode", "bilinear") not in RESAMPLING_MODES:
                raise InputError("spacing mode must be one of {}, got {!r}".format(", ".join(RESAMPLING_MODES),
                                                                                  step.get("mode")))
    return steps


def step_text(step):
    """One line on a step, for the model report."""
    kind = step_kind(step)
    if kind == "spacing":
        return "spacing {} mm ({}, MONAI's Spacing grid)".format(
            "x".join("{:g}".format(v) for v in step["spacing"]), step.get("mode", "bilinear"))
    return "{} {}".format(kind, json.dumps(step[kind], sort_keys=True))


def apply_step(step, inputs, affine, activation):
    """``inputs`` after ``step``, on a grid with voxel-to-RAS matrix ``affine`` (None: unknown, taken to be the
    network's spacing): the new inputs, their grid's matrix, the way back for outputs (a function, or None) and
    the crop box where the step crops."""
    kind = step_kind(step)
    if kind == "intensity":
        return normalize_intensity(inputs, step["intensity"]), affine, None, None
    if kind == "crop":
        box = foreground_box(inputs, step["crop"])
        full = tuple(inputs.shape[2:])
        back = None if box is None else (lambda outputs: pad_outputs_back(outputs, box, full, activation))
        return crop(inputs, box), shifted(affine, [start for start, _ in box] if box else None), back, box
    if kind == "spacing":
        grid = None if affine is None else spacing_grid(affine, inputs.shape[2:], target_spacing(affine, step))
        if grid is None:
            return inputs, affine, None, None
        new_affine, forward, backward = grid
        back = lambda outputs: resample_axes(outputs, backward, "bilinear")  # noqa: E731
        return resample_axes(inputs, forward, step.get("mode", "bilinear")), new_affine, back, None
    padding = divisible_padding(inputs.shape[2:], step["pad_divisible"])
    if padding is None:
        return inputs, affine, None, None
    before = padding[-2::-2]  # F.pad lists (before, after) pairs from the last axis: these are x, y, z
    back = lambda outputs: unpad(outputs, padding)  # noqa: E731
    return F.pad(inputs, padding), shifted(affine, [-amount for amount in before]), back, None


def shifted(affine, voxels):
    """``affine`` of the grid whose voxel 0 is voxel ``voxels`` of this one (None stays None)."""
    if affine is None or voxels is None:
        return affine
    moved = np.array(affine, dtype=np.float64)
    moved[:3, 3] = moved[:3, :3] @ np.asarray(voxels, dtype=np.float64) + moved[:3, 3]
    return moved


def target_spacing(affine, step):
    """The spacing a spacing step resamples to: its ``spacing``, except along axes whose spacing lies within
    ``min_pixdim``..``max_pixdim`` (MONAI's tolerance 1e-3), which keep theirs."""
    target = np.asarray(step["spacing"], dtype=np.float64)
    if step.get("min_pixdim") is None and step.get("max_pixdim") is None:
        return target
    have = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    # as MONAI's Spacing: a missing bound is the target itself
    low = np.minimum(np.asarray(step.get("min_pixdim") or target, dtype=np.float64), target) - SPACING_TOLERANCE
    high = np.maximum(np.asarray(step.get("max_pixdim") or target, dtype=np.float64), target) + SPACING_TOLERANCE
    return np.where((low <= have) & (have <= high), have, target)


def spacing_grid(affine, shape, pixdim):
    """MONAI's ``Spacing`` (``diagonal=False``, ``scale_extent=False``) of a grid of ``shape`` and voxel-to-RAS
    ``affine`` to ``pixdim`` mm, with MONAI's own ``zoom_affine`` and ``compute_shape_offset``: None where the
    spacings agree within 0.1 %, else (the output grid's matrix, per axis the input voxel coordinates of the output
    voxels, per axis the output voxel coordinates of the input voxels)."""
    from monai.data.utils import compute_shape_offset, zoom_affine
    affine, pixdim = np.asarray(affine, dtype=np.float64), np.asarray(pixdim, dtype=np.float64)
    if np.all(np.abs(np.linalg.norm(affine[:3, :3], axis=0) - pixdim) <= SPACING_TOLERANCE * pixdim):
        return None
    out_affine = zoom_affine(affine, pixdim, diagonal=False)
    out_shape, offset = compute_shape_offset(tuple(shape), affine, out_affine, False)
    out_affine[:3, 3] = offset[:3]
    to_input = np.linalg.solve(affine, out_affine)  # output voxel -> input voxel: axis-aligned up to rounding
    forward = [np.arange(int(n)) * to_input[a, a] + to_input[a, 3] for a, n in enumerate(out_shape)]
    backward = [(np.arange(int(n)) - to_input[a, 3]) / to_input[a, a] for a, n in enumerate(shape)]
    return out_affine, forward, backward


def resample_axes(tensor, positions, mode="bilinear"):
    """``tensor`` (B, C, *spatial) sampled along each spatial axis at the fractional voxel ``positions`` (None:
    that axis unchanged), clamped to the border; linear or nearest per axis, so trilinear for bilinear."""
    for axis, where in enumerate(positions):
        if where is not None:
            tensor = interpolate_axis(tensor, axis + 2, where, mode)
    return tensor


def interpolate_axis(tensor, dim, positions, mode="bilinear"):
    """Values of ``tensor`` at fractional voxel ``positions`` along dimension ``dim`` (border clamp)."""
    count = tensor.shape[dim]
    where = np.clip(np.asarray(positions, dtype=np.float64), 0.0, count - 1.0)
    device = tensor.device
    if mode == "nearest":
        index = torch.as_tensor(np.floor(where + 0.5).astype(np.int64), device=device)
        return tensor.index_select(dim, index.clamp_(max=count - 1))
    low = np.minimum(np.floor(where), max(count - 2, 0)).astype(np.int64)
    high = np.minimum(low + 1, count - 1)
    shape = [1] * tensor.dim()
    shape[dim] = len(where)
    weight = torch.as_tensor(where - low, dtype=tensor.dtype, device=device).reshape(shape)
    first = tensor.index_select(dim, torch.as_tensor(low, device=device))
    second = tensor.index_select(dim, torch.as_tensor(high, device=device))
    return first + (second - first) * weight


def default_steps(description):
    """The steps of a description that lists none: intensity, crop, spacing, padding, in this order."""
    steps = [{"intensity": description.intensity}]
    if description.crop:
        steps.append({"crop": description.crop})
    if description.spacing:
        steps.append({"spacing": list(description.spacing), "mode": "bilinear"})
    if description.pad_divisible:
        steps.append({"pad_divisible": description.pad_divisible})
    return steps
