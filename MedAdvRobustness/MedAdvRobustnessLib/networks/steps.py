"""The network's preprocessing as ordered, differentiable steps, each with the way back for the outputs.

A step is a one-key dictionary, in the order the pipeline runs them (``ModelDescription.preprocessing``; a MONAI
bundle's transforms in their declared order):

- ``{"intensity": spec}``: :func:`~.preprocessing.normalize_intensity`; the outputs need no way back.
- ``{"crop": {"threshold": t, "margin": m}}``: crop to the voxels above ``t`` (MONAI's ``CropForeground``;
  optional ``"compare"``: ``>`` (default), ``>=``, ``<``, ``<=``, ``!=`` or ``==``, its ``select_fn`` x compared
  with ``t``; ``"channels"``: its ``channel_indices``; ``"k_divisible"``, ``"allow_smaller"``); the outputs are
  padded back with background.
- ``{"spacing": [x, y, z], "mode": "bilinear"|"nearest", "min_pixdim": [...], "max_pixdim": [...]}``: MONAI's
  ``Spacing`` grid (voxel counts, origin and positions as ``zoom_affine`` and ``compute_shape_offset`` give them,
  border padding; an axis whose spacing lies within 1e-3 mm of the optional ``min_pixdim``..``max_pixdim``, or of
  the target, keeps it (a bound may be None: the target); no resampling where MONAI's ``SpatialResample`` keeps
  the image, :func:`grid_unchanged`); the
  outputs go back to the input grid by linear interpolation, as MONAI's ``Invertd`` brings predictions back.
  Optional, as a bundle's ``Spacing`` sets them: ``"padding_mode": "border"|"zeros"|"reflection"``,
  ``"align_corners": true`` (where reflection reflects), ``"scale_extent": true`` (``compute_shape_offset``'s
  voxel-extent grid) and ``"back": "same"`` (the way back with the forward's mode, padding and ``align_corners``,
  as ``Invertd(nearest_interp=False)`` inverts MONAI's ``Spacing``; ``"linear"``, the default, is the above).
  ``"nearest"`` with ``"back": "same"`` picks the voxels MONAI's own resampling picks (``"dtype"`` float64, its
  default, or float32), ties included; otherwise nearest is the closest voxel per axis.
- ``{"pad_divisible": k}``: MONAI's ``DivisiblePad``; the outputs are unpadded.
- ``{"pad_size": [x, y, z], "method": "symmetric"|"end", "value": 0}``: MONAI's ``SpatialPad`` (constant ``value``;
  an axis whose size is not positive, or not larger than the input's, is not padded); the outputs are unpadded.
- ``{"center_crop": [x, y, z], "outside": "background"|"zeros"}``: MONAI's ``CenterSpatialCrop`` (the box starts
  at ``n // 2 - size // 2``; an axis whose size is not positive, or not smaller than the input's, is kept); the
  outputs are padded back with background, or with zeros in every channel (as ``Invertd`` pads them; bundles).
- ``{"resize": [x, y, z], "size_mode": "all", "mode": "trilinear"|"area"|"nearest"|"nearest-exact",
  "align_corners": None|False|True}``: MONAI's ``Resize``, which is ``torch.nn.functional.interpolate`` to that
  size (a size that is not positive keeps the axis; ``"size_mode": "longest"`` with one number scales the longest
  axis to it, the others in proportion, rounded), with MONAI's output affine (``scale_affine``); the outputs go
  back to the input size by the same interpolation, as ``Invertd`` inverts ``Resize``.

Resampling is separable: along each axis a linear (or nearest) interpolation at fixed positions, a linear map of
the voxels, so gradients flow through it exactly.
"""
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .preprocessing import (COMPARISONS, crop, divisible_padding, foreground_box, normalize_intensity,
                            pad_outputs_back, straight_through, unpad)

AFFINE_TOL = 1e-3  # MONAI's AFFINE_TOL: how close two grids are to be the same (no resampling)
STEP_KINDS = ("intensity", "crop", "spacing", "pad_divisible", "pad_size", "center_crop", "resize")
RESAMPLING_MODES = ("bilinear", "nearest")
PADDING_MODES = ("border", "zeros", "reflection")  # torch's grid_sample, as MONAI's Spacing pads
RESIZE_MODES = ("trilinear", "area", "nearest", "nearest-exact")  # torch's interpolate on 3-D volumes
PAD_METHODS = ("symmetric", "end")


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
            if step.get("padding_mode", "border") not in PADDING_MODES:
                raise InputError("spacing padding_mode must be one of {}, got {!r}".format(
                    ", ".join(PADDING_MODES), step.get("padding_mode")))
            if step.get("back", "linear") not in ("linear", "same"):
                raise InputError("spacing back must be linear or same, got {!r}".format(step.get("back")))
            if step.get("dtype", "float64") not in ("float64", "float32"):
                raise InputError("spacing dtype must be float64 or float32, got {!r}".format(step.get("dtype")))
            for flag in ("align_corners", "scale_extent"):
                if not isinstance(step.get(flag, False), bool):
                    raise InputError("spacing {} must be true or false, got {!r}".format(flag, step.get(flag)))
        elif step_kind(step) == "crop":
            check_crop(step["crop"])
        elif step_kind(step) in ("pad_size", "center_crop"):
            kind = step_kind(step)
            if not _sizes_ok(step[kind]):
                raise InputError("{} must be three whole numbers of voxels (or one for all axes), got {!r}".format(
                    kind, step[kind]))
            if kind == "center_crop" and step.get("outside", "background") not in ("background", "zeros"):
                raise InputError("center_crop outside must be background or zeros, got {!r}".format(
                    step.get("outside")))
            if kind == "pad_size" and step.get("method", "symmetric") not in PAD_METHODS:
                raise InputError("pad_size method must be one of {}, got {!r}".format(", ".join(PAD_METHODS),
                                                                                     step.get("method")))
        elif step_kind(step) == "resize":
            longest = step.get("size_mode", "all") == "longest"
            if step.get("size_mode", "all") not in ("all", "longest"):
                raise InputError("resize size_mode must be all or longest, got {!r}".format(step.get("size_mode")))
            if not (isinstance(step["resize"], int) and step["resize"] > 0 if longest else _sizes_ok(step["resize"])):
                raise InputError("resize must be {}, got {!r}".format(
                    "one positive whole number with size_mode longest" if longest else
                    "three whole numbers of voxels (or one for all axes)", step["resize"]))
            if step.get("mode", "trilinear") not in RESIZE_MODES:
                raise InputError("resize mode must be one of {}, got {!r}".format(", ".join(RESIZE_MODES),
                                                                                 step.get("mode")))
            if step.get("align_corners") is not None and step.get("mode", "trilinear") != "trilinear":
                raise InputError("resize align_corners is for mode trilinear only (as torch's interpolate)")
    return steps


def check_crop(spec):
    """Refuse a foreground crop whose comparison, threshold or channels cannot be run."""
    if not isinstance(spec, dict):
        raise InputError("crop must be its settings (threshold, compare, margin, ...), got {!r}".format(spec))
    if spec.get("compare", ">") not in COMPARISONS:
        raise InputError("crop compare must be one of {}, got {!r}".format(" ".join(COMPARISONS),
                                                                         spec.get("compare")))
    threshold = spec.get("threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise InputError("crop threshold must be a number, got {!r}".format(threshold))
    channels = spec.get("channels")
    if channels is not None and not (isinstance(channels, (list, tuple)) and channels and all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels)):
        raise InputError("crop channels must be a list of channel indices, got {!r}".format(channels))
    margin = spec.get("margin", 0)
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0
               for m in (margin if isinstance(margin, (list, tuple)) else [margin])):
        raise InputError("crop margin must be whole voxels of at least 0 (or one per axis), got {!r}".format(margin))


def _sizes_ok(value):
    value = [value] * 3 if isinstance(value, int) else value
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _axis_sizes(value, shape):
    """MONAI's ``fall_back_tuple``: one size per axis (one number for all), a size that is not positive keeps the
    axis's own."""
    value = [value] * len(shape) if isinstance(value, int) else list(value)
    return [int(v) if v > 0 else int(n) for v, n in zip(value, shape)]


def step_text(step):
    """One line on a step, for the model report."""
    kind = step_kind(step)
    if kind == "spacing":
        extras = [step.get("mode", "bilinear")]
        if step.get("padding_mode", "border") != "border":
            extras.append("padding {}".format(step["padding_mode"]))
        extras += [flag for flag in ("align_corners", "scale_extent") if step.get(flag)]
        return "spacing {} mm ({}, MONAI's Spacing grid)".format(
            "x".join("{:g}".format(v) for v in step["spacing"]), ", ".join(extras))
    if kind == "pad_size":
        return "pad to {} ({}, value {:g}, MONAI's SpatialPad)".format(
            _size_text(step["pad_size"]), step.get("method", "symmetric"), float(step.get("value", 0.0)))
    if kind == "center_crop":
        return "centre crop {} (MONAI's CenterSpatialCrop)".format(_size_text(step["center_crop"]))
    if kind == "resize":
        mode = step.get("mode", "trilinear")
        longest = step.get("size_mode") == "longest"
        return "resize to {}{} ({}{}, MONAI's Resize)".format(
            step["resize"] if longest else _size_text(step["resize"]), " on the longest axis" if longest else "",
            mode, ", align_corners {}".format(bool(step.get("align_corners"))) if mode == "trilinear" else "")
    return "{} {}".format(kind, json.dumps(step[kind], sort_keys=True))


def _size_text(value):
    return "x".join(str(v) if v > 0 else "same" for v in ([value] * 3 if isinstance(value, int) else value))


def apply_step(step, inputs, affine, activation):
    """``inputs`` after ``step``, on a grid with voxel-to-RAS matrix ``affine`` (None: unknown, taken to be the
    network's spacing): the new inputs, their grid's matrix, the way back for outputs (a function, or None) and
    the crop box where the step crops."""
    kind = step_kind(step)
    if kind == "intensity":
        return normalize_intensity(inputs, step["intensity"]), affine, None, None
    if kind in ("crop", "center_crop"):
        box = (foreground_box(inputs, step["crop"]) if kind == "crop"
               else center_box(inputs.shape[2:], step["center_crop"]))
        full = tuple(inputs.shape[2:])
        outside = (step[kind] if kind == "crop" else step).get("outside", "background")
        back = None if box is None else (lambda outputs: pad_outputs_back(outputs, box, full, activation, outside))
        return crop(inputs, box), shifted(affine, [start for start, _ in box] if box else None), back, box
    if kind == "spacing":
        extent = bool(step.get("scale_extent", False))
        grid = None if affine is None else spacing_grid(affine, inputs.shape[2:], target_spacing(affine, step),
                                                        scale_extent=extent)
        if grid is None:
            return inputs, affine, None, None
        new_affine, forward, backward = grid
        mode, padding = step.get("mode", "bilinear"), step.get("padding_mode", "border")
        corners, same = bool(step.get("align_corners", False)), step.get("back", "linear") == "same"
        full, size = tuple(int(n) for n in inputs.shape[2:]), tuple(len(where) for where in forward)
        if mode == "nearest" and same:  # MONAI's own choice of voxel, ties included
            dtype = step.get("dtype", "float64")
            picked = nearest_voxels(affine, full, new_affine, size, padding, corners, dtype)
            # the way back starts from the affine MONAI's MetaTensor holds after Spacing (the input's times the
            # voxel map), as its inverse does
            held = (torch.as_tensor(np.asarray(affine, dtype=np.float64))
                    @ torch.as_tensor(np.linalg.solve(np.asarray(affine, dtype=np.float64), new_affine))).numpy()
            returned = nearest_voxels(held, size, np.asarray(affine, dtype=np.float64), full, padding, corners, dtype)
            back = lambda outputs: gather_voxels(outputs, returned, full)  # noqa: E731
            return gather_voxels(inputs, picked, size), new_affine, back, None
        if same:
            back = lambda outputs: resample_axes(outputs, backward, mode, padding, corners)  # noqa: E731
        else:
            back = lambda outputs: resample_axes(outputs, backward, "bilinear")  # noqa: E731
        resampled = resample_axes(inputs, forward, mode, padding, corners)
        values = monai_resampled(inputs, affine, new_affine, size, mode, padding, corners,
                                 step.get("dtype", "float64"))
        return straight_through(resampled, values), new_affine, back, None
    if kind == "resize":
        full = tuple(int(n) for n in inputs.shape[2:])
        size = resize_shape(full, step["resize"], step.get("size_mode", "all"))
        if size == full:
            return inputs, affine, None, None
        mode = step.get("mode", "trilinear")
        corners = bool(step.get("align_corners")) if mode == "trilinear" else None
        back = lambda outputs: F.interpolate(outputs, size=full, mode=mode, align_corners=corners)  # noqa: E731
        return (F.interpolate(inputs, size=size, mode=mode, align_corners=corners),
                resized_affine(affine, full, size, bool(corners)), back, None)
    if kind == "pad_size":
        padding = size_padding(inputs.shape[2:], step["pad_size"], step.get("method", "symmetric"))
        value = float(step.get("value", 0.0))
    else:
        padding, value = divisible_padding(inputs.shape[2:], step["pad_divisible"]), 0.0
    if padding is None:
        return inputs, affine, None, None
    before = padding[-2::-2]  # F.pad lists (before, after) pairs from the last axis: these are x, y, z
    back = lambda outputs: unpad(outputs, padding)  # noqa: E731
    return F.pad(inputs, padding, value=value), shifted(affine, [-amount for amount in before]), back, None


def step_shape(step, shape, affine):
    """The voxel counts and grid matrix :func:`apply_step` gives an input of ``shape`` on the grid ``affine``,
    without computing it: a foreground crop (which depends on the voxels) is taken to keep every voxel."""
    kind, shape = step_kind(step), tuple(int(n) for n in shape)
    if kind == "center_crop":
        box = center_box(shape, step["center_crop"])
        return (shape, affine) if box is None else (tuple(stop - start for start, stop in box),
                                                    shifted(affine, [start for start, _ in box]))
    if kind == "spacing" and affine is not None:
        grid = spacing_grid(affine, shape, target_spacing(affine, step), bool(step.get("scale_extent", False)))
        return (shape, affine) if grid is None else (tuple(len(where) for where in grid[1]), grid[0])
    if kind == "resize":
        size = resize_shape(shape, step["resize"], step.get("size_mode", "all"))
        return size, resized_affine(affine, shape, size, bool(step.get("align_corners")))
    if kind in ("pad_size", "pad_divisible"):
        padding = (size_padding(shape, step["pad_size"], step.get("method", "symmetric")) if kind == "pad_size"
                   else divisible_padding(shape, step["pad_divisible"]))
        if padding is not None:
            return tuple(n + padding[-2 - 2 * axis] + padding[-1 - 2 * axis] for axis, n in enumerate(shape)), affine
    return shape, affine


def size_padding(shape, sizes, method="symmetric"):
    """F.pad amounts (last axis first) that pad ``shape`` to ``sizes`` as MONAI's ``SpatialPad`` (symmetric: the
    odd voxel after; end: all after), or None."""
    pads = []
    for size, wanted in zip(shape, _axis_sizes(sizes, shape)):
        extra = max(wanted - int(size), 0)
        pads.append((extra // 2, extra - extra // 2) if method == "symmetric" else (0, extra))
    if not any(a or b for a, b in pads):
        return None
    return [p for pair in reversed(pads) for p in pair]


def center_box(shape, sizes):
    """MONAI's ``CenterSpatialCrop`` box (start, stop per axis) of ``sizes`` in a grid of ``shape``: it starts at
    ``n // 2 - size // 2`` (at least 0) and stops within the grid; None where it keeps every voxel."""
    box = []
    for size, wanted in zip(shape, _axis_sizes(sizes, shape)):
        start = max(int(size) // 2 - wanted // 2, 0)
        box.append((start, min(start + wanted, int(size))))
    if all(start == 0 and stop == size for (start, stop), size in zip(box, shape)):
        return None
    return box


def resize_shape(shape, sizes, size_mode="all"):
    """The size MONAI's ``Resize`` gives a grid of ``shape``: ``sizes`` (not positive: the axis's own), or with
    ``size_mode="longest"`` every axis scaled so that the longest is ``sizes``, rounded as Python rounds."""
    if size_mode == "longest":
        scale = int(sizes) / max(shape)
        return tuple(int(round(n * scale)) for n in shape)
    return tuple(_axis_sizes(sizes, shape))


def resized_affine(affine, shape, size, align_corners=False):
    """The voxel-to-RAS matrix MONAI's ``Resize`` gives its output (``affine`` times ``scale_affine``): output voxel
    ``i`` lies at input voxel ``(i + 1/2) n / m - 1/2``, or ``i (n - 1) / (m - 1)`` with ``align_corners`` (0
    where ``m`` is 1), as torch's interpolate samples it."""
    if affine is None:
        return None
    scale = np.eye(4)
    for axis, (n, m) in enumerate(zip(shape, size)):
        if align_corners:
            scale[axis, axis] = 0.0 if m == 1 else (n - 1.0) / (m - 1.0)
        else:
            scale[axis, axis] = float(n) / max(m, 1)
            scale[axis, 3] = (scale[axis, axis] - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def shifted(affine, voxels):
    """``affine`` of the grid whose voxel 0 is voxel ``voxels`` of this one (None stays None)."""
    if affine is None or voxels is None:
        return affine
    moved = np.array(affine, dtype=np.float64)
    moved[:3, 3] = moved[:3, :3] @ np.asarray(voxels, dtype=np.float64) + moved[:3, 3]
    return moved


def file_exact_affine(affine, file_ijk_to_ras, tolerance=1e-3):
    """``affine`` (network convention) rebuilt from the file's own voxel-to-RAS matrix as nibabel, and so MONAI,
    reads it, where the two grids are the same voxels in another order (a signed axis permutation): the last bits
    of the matrix decide which voxels MONAI's resampler leaves at ~1e-12 near a zero background, and a reader's
    matrix differs from nibabel's by ~1e-6. Otherwise (no file, another grid) ``affine`` as it is."""
    if affine is None or file_ijk_to_ras is None:
        return affine
    file_affine = np.asarray(file_ijk_to_ras, dtype=np.float64)
    voxel_map = np.linalg.solve(file_affine, np.asarray(affine, dtype=np.float64))  # network ijk -> file ijk
    rounded = np.round(voxel_map)
    if np.abs(voxel_map - rounded).max() > tolerance or not np.allclose(np.abs(rounded[:3, :3]).sum(axis=0), 1):
        return affine
    return file_affine @ rounded


def target_spacing(affine, step):
    """The spacing a spacing step resamples to, as MONAI's ``Spacing`` picks it: along each axis the step's
    ``spacing``, except where the grid's own lies within :data:`AFFINE_TOL` mm of ``min_pixdim``..``max_pixdim``
    (a bound that is missing or None: the target itself), which keeps its own: so a spacing within 1e-3 mm of the
    target is always kept."""
    target = np.asarray(step["spacing"], dtype=np.float64)
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    have = np.sqrt(np.sum(matrix * matrix, axis=0))  # MONAI's affine_to_spacing
    low = np.fmin(_pixdim_bound(step.get("min_pixdim")), target)  # fmin, fmax: NaN gives the target
    high = np.fmax(_pixdim_bound(step.get("max_pixdim")), target)
    return np.where((low - AFFINE_TOL <= have) & (have <= high + AFFINE_TOL), have, target)


def _pixdim_bound(value):
    """A ``min_pixdim`` or ``max_pixdim`` as three numbers, NaN where missing or None (one number: the first
    axis's, as MONAI reads it)."""
    values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    values = [np.nan if v is None else float(v) for v in values[:3]]
    return np.array(values + [np.nan] * (3 - len(values)), dtype=np.float64)


def spacing_grid(affine, shape, pixdim, scale_extent=False):
    """MONAI's ``Spacing`` (``diagonal=False``) of a grid of ``shape`` and voxel-to-RAS ``affine`` to ``pixdim`` mm,
    with MONAI's own ``zoom_affine`` and ``compute_shape_offset`` (with ``scale_extent``, the grid of the voxels'
    full extent): None where MONAI does not resample (:func:`grid_unchanged`), else (the output grid's matrix, per
    axis the input voxel coordinates of the output voxels, per axis the output voxel coordinates of the input
    voxels)."""
    from monai.data.utils import compute_shape_offset, zoom_affine
    affine, pixdim = np.asarray(affine, dtype=np.float64), np.asarray(pixdim, dtype=np.float64)
    out_affine = zoom_affine(affine, pixdim, diagonal=False)
    out_shape, offset = compute_shape_offset(tuple(shape), affine, out_affine, bool(scale_extent))
    out_affine[:3, 3] = offset[:3]
    if grid_unchanged(affine, shape, out_affine, out_shape):
        return None
    to_input = np.linalg.solve(affine, out_affine)  # output voxel -> input voxel: axis-aligned up to rounding
    forward = [np.arange(int(n)) * to_input[a, a] + to_input[a, 3] for a, n in enumerate(out_shape)]
    backward = [(np.arange(int(n)) - to_input[a, 3]) / to_input[a, a] for a, n in enumerate(shape)]
    return out_affine, forward, backward


def grid_unchanged(affine, shape, out_affine, out_shape):
    """MONAI's ``SpatialResample`` rule for keeping the image as it is: the same voxel counts, and the two matrices,
    or the voxel map between them and the identity, equal within ``allclose``'s tolerance (absolute
    :data:`AFFINE_TOL`, relative 1e-5)."""
    if tuple(int(n) for n in out_shape) != tuple(int(n) for n in shape):
        return False
    voxel_map = np.linalg.solve(affine, out_affine)
    return bool(np.allclose(affine, out_affine, rtol=1e-5, atol=AFFINE_TOL)
                or np.allclose(voxel_map, np.eye(4), rtol=1e-5, atol=AFFINE_TOL))


def resample_axes(tensor, positions, mode="bilinear", padding_mode="border", align_corners=False):
    """``tensor`` (B, C, *spatial) sampled along each spatial axis at the fractional voxel ``positions`` (None:
    that axis unchanged); linear or nearest per axis, so trilinear for bilinear; outside the grid as torch's
    ``grid_sample`` pads (``border``, ``zeros``, ``reflection`` about the voxel centres with ``align_corners``,
    about the grid's edges without), which is separable."""
    for axis, where in enumerate(positions):
        if where is not None:
            tensor = interpolate_axis(tensor, axis + 2, where, mode, padding_mode, align_corners)
    return tensor


def reflect_positions(where, count, align_corners=False):
    """torch's ``grid_sample`` reflection of voxel positions into the grid (its ``reflect_coordinates``, then
    clipped to the voxel centres)."""
    low, high = (0.0, 2.0 * (count - 1)) if align_corners else (-1.0, 2.0 * count - 1.0)
    if low == high:
        return np.zeros_like(where)
    least, span = low / 2.0, (high - low) / 2.0
    distance = np.abs(where - least)
    extra, flips = np.fmod(distance, span), np.floor(distance / span)
    return np.clip(np.where(flips % 2 == 0, extra + least, span - extra + least), 0.0, count - 1.0)


def interpolate_axis(tensor, dim, positions, mode="bilinear", padding_mode="border", align_corners=False):
    """Values of ``tensor`` at fractional voxel ``positions`` along dimension ``dim`` (padding as
    :func:`resample_axes`)."""
    count = tensor.shape[dim]
    where = np.asarray(positions, dtype=np.float64)
    device = tensor.device
    if padding_mode == "zeros":
        # one zero voxel on each side: a position within a voxel of the grid mixes with it, one further is zero
        zeros = torch.zeros(tensor.shape[:dim] + (1,) + tensor.shape[dim + 1:], dtype=tensor.dtype, device=device)
        tensor = torch.cat([zeros, tensor, zeros], dim=dim)
        if mode == "nearest":
            where = np.where((where > -0.5) & (where < count - 0.5), where + 1.0, 0.0)
        else:
            where = np.clip(where, -1.0, float(count)) + 1.0
        count += 2
    elif padding_mode == "reflection":
        where = reflect_positions(where, count, align_corners)
    where = np.clip(where, 0.0, count - 1.0)
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


_NEAREST_CACHE = {}


def nearest_voxels(src_affine, src_shape, dst_affine, dst_shape, padding_mode="border", align_corners=False,
                   dtype="float64"):
    """For each voxel of the grid (``dst_affine``, ``dst_shape``), the flat index of the voxel of the grid
    (``src_affine``, ``src_shape``) that MONAI's ``SpatialResample`` with ``mode="nearest"`` copies there (-1:
    none, zero padding): MONAI's own resampling of the voxel indices (one channel per axis, exact in ``dtype``),
    so its rounding, ties included, is the twin's. Kept for the last few grids."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample
    src_affine, dst_affine = np.asarray(src_affine, dtype=np.float64), np.asarray(dst_affine, dtype=np.float64)
    key = (src_affine.tobytes(), tuple(src_shape), dst_affine.tobytes(), tuple(dst_shape), padding_mode,
           bool(align_corners), dtype)
    if key not in _NEAREST_CACHE:
        ramps = torch.stack(torch.meshgrid(*[torch.arange(1, n + 1, dtype=torch.float64) for n in src_shape],
                                           indexing="ij"))  # index + 1: 0 is zero padding
        resample = SpatialResample(mode="nearest", padding_mode=padding_mode, align_corners=align_corners,
                                   dtype=getattr(torch, dtype))
        picked = resample(MetaTensor(ramps, affine=torch.as_tensor(src_affine)), dst_affine=torch.as_tensor(
            dst_affine), spatial_size=[int(n) for n in dst_shape])
        picked = np.rint(np.asarray(picked.as_tensor(), dtype=np.float64)).astype(np.int64) - 1
        if picked.shape[1:] != tuple(dst_shape):
            raise AssertionError("MONAI resampled to {}, not {}".format(picked.shape[1:], dst_shape))
        outside = (picked < 0).any(axis=0)
        flat = np.ravel_multi_index(tuple(np.clip(picked, 0, None)), tuple(src_shape)).reshape(-1)
        flat[outside.reshape(-1)] = -1
        if len(_NEAREST_CACHE) >= 8:
            _NEAREST_CACHE.pop(next(iter(_NEAREST_CACHE)))
        _NEAREST_CACHE[key] = flat
    return _NEAREST_CACHE[key]


def monai_resampled(inputs, affine, new_affine, size, mode="bilinear", padding_mode="border", align_corners=False,
                    dtype="float64"):
    """MONAI's own ``SpatialResample`` of the (detached) inputs onto the grid (``new_affine``, ``size``): the values
    its Spacing gives, float noise included. Where resampling meets zero voxels MONAI leaves values of about 1e-12,
    and a later ``NormalizeIntensity(nonzero=True)`` counts them: the twin's exact interpolation (whose gradient
    attacks use) gives 0 there, so the forward values are MONAI's."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample
    resample = SpatialResample(mode=mode, padding_mode=padding_mode, align_corners=align_corners,
                               dtype=getattr(torch, dtype))
    source, target = (torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (affine, new_affine))
    items = []
    for item in inputs.detach():
        out = resample(MetaTensor(item, affine=source), dst_affine=target, spatial_size=[int(n) for n in size])
        items.append(torch.as_tensor(out.as_tensor(), dtype=inputs.dtype, device=inputs.device))
    values = torch.stack(items)
    if tuple(values.shape[2:]) != tuple(int(n) for n in size):
        raise AssertionError("MONAI resampled to {}, not {}".format(tuple(values.shape[2:]), tuple(size)))
    return values


def gather_voxels(tensor, flat, shape):
    """``tensor`` (B, C, *spatial) at the voxels of flat index ``flat`` (-1: zero), as a (B, C, *shape) grid."""
    values = tensor.flatten(start_dim=2)
    values = torch.cat([values, values.new_zeros(values.shape[:2] + (1,))], dim=2)  # index -1: this zero
    index = torch.as_tensor(flat, device=tensor.device)
    return values.index_select(2, torch.where(index < 0, values.shape[2] - 1, index)).reshape(
        tensor.shape[:2] + tuple(int(n) for n in shape))


def default_steps(description):
    """The steps of a description that lists none: intensity, crop, spacing, padding, in this order."""
    steps = [{"intensity": description.intensity}]
    if description.crop:
        steps.append({"crop": description.crop})
    if description.spacing:
        spacing = description.spacing
        steps.append({"spacing": list(spacing) if isinstance(spacing, (list, tuple)) else spacing, "mode": "bilinear"})
    if description.pad_divisible:
        steps.append({"pad_divisible": description.pad_divisible})
    return steps
