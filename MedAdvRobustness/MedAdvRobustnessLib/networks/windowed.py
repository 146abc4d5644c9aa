"""Sliding-window inference and its input gradient computed one window at a time.

The forward pass is MONAI's ``sliding_window_inference``: the input is padded to at least the window size,
cut into overlapping windows (``dense_patch_slices``), each window's outputs are weighted by the importance map
(constant or Gaussian) and summed, and the sum is divided by the summed weights (the count map)::

    Y = crop( sum_w  pad_w( w * f(x_w) ) / count )

Autograd through that keeps the activations of every window until the backward pass: memory grows with the number
of windows. :func:`window_vjp` instead takes ``G = dL/dY`` (computed once on the aggregated outputs, so any loss
of the aggregated outputs is exact) and for each window recomputes ``f(x_w)`` with grad and backpropagates its
share ``w * G_w / count_w``, accumulating the input gradient: the same gradient, with one window's activations in
memory at a time (``sw_batch_size`` windows per backward).

A window with ``"style": "nnunet"`` places its tiles and weights as nnU-Net's predictor does
(:class:`NNUNetTilePlan`); the nnU-Net model aggregates its tiles itself (with nnU-Net's float16 arithmetic), and
the gradient is computed the same way.

With a memory budget (:class:`WindowKeeper`), the forward pass keeps the graphs of as many windows as fit, and
:func:`window_vjp` runs one backward per kept window with its share instead of recomputing it (one forward and
one backward per window when all fit, never autograd through MONAI's aggregation); the others are recomputed.
The gradient is the same either way.
"""
import itertools
import os

import numpy as np
import torch
import torch.nn.functional as F

WINDOW_DEFAULTS = {"overlap": 0.25, "mode": "gaussian", "sigma_scale": 0.125, "padding_mode": "constant",
                   "cval": 0.0, "sw_batch_size": 1}
GRADIENT_MODES = ("windowed", "naive")
OUTPUT_BUFFERS = 6  # aggregated outputs, their gradient, its padded share, restored outputs, count map and slack


def window_settings(window):
    """The window of a model description with every setting filled in."""
    if is_nnunet_window(window):
        settings = {"tile_step_size": 0.5, "sw_batch_size": 1}
        settings.update(window)
        settings["roi_size"] = [int(size) for size in settings["roi_size"]]
        return settings
    settings = dict(WINDOW_DEFAULTS)
    settings.update({key: value for key, value in (window or {}).items() if value is not None})
    settings["roi_size"] = [int(size) for size in settings["roi_size"]]
    return settings


def sliding_window_outputs(predictor, inputs, window):
    """MONAI's sliding-window inference of ``predictor`` on ``inputs`` with the model description's window."""
    if is_nnunet_window(window):
        raise ValueError("nnU-Net tiles are aggregated by the nnU-Net model (networks.nnunet), not here")
    from monai.inferers import sliding_window_inference
    settings = window_settings(window)
    return sliding_window_inference(inputs, roi_size=tuple(settings["roi_size"]),
                                    sw_batch_size=int(settings["sw_batch_size"]), predictor=predictor,
                                    overlap=settings["overlap"], mode=settings["mode"],
                                    sigma_scale=settings["sigma_scale"], padding_mode=settings["padding_mode"],
                                    cval=float(settings["cval"]))


class WindowPlan:
    """Where MONAI's ``sliding_window_inference`` puts its windows on an image, with their weights."""

    def __init__(self, image_size, window, device="cpu", dtype=torch.float32):
        from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
        from monai.utils import fall_back_tuple
        settings = window_settings(window)
        dims = len(image_size)
        self.settings = settings
        self.image_size = tuple(int(s) for s in image_size)
        self.roi_size = tuple(fall_back_tuple(settings["roi_size"], self.image_size))
        overlap = settings["overlap"]
        overlap = tuple(overlap) if isinstance(overlap, (list, tuple)) else (overlap,) * dims
        # F.pad order (last axis first), symmetric, as MONAI pads images smaller than the window
        self.padding = []
        for axis in reversed(range(dims)):
            diff = max(self.roi_size[axis] - self.image_size[axis], 0)
            self.padding += [diff // 2, diff - diff // 2]
        self.padded_size = tuple(max(i, r) for i, r in zip(self.image_size, self.roi_size))
        interval = _scan_interval(self.padded_size, self.roi_size, dims, overlap)
        self.slices = [tuple(s) for s in dense_patch_slices(self.padded_size, self.roi_size, interval,
                                                            return_slice=True)]
        patch = get_valid_patch_size(self.padded_size, self.roi_size)
        self.importance = compute_importance_map(tuple(patch), mode=settings["mode"],
                                                 sigma_scale=settings["sigma_scale"], device=device, dtype=dtype)
        self.count = torch.zeros(self.padded_size, dtype=dtype, device=device)
        for window_slice in self.slices:
            self.count[window_slice] += self.importance

    def __len__(self):
        return len(self.slices)

    def pad_input(self, inputs):
        if not any(self.padding):
            return inputs
        mode = self.settings["padding_mode"]
        value = float(self.settings["cval"]) if mode == "constant" else None
        return F.pad(inputs, self.padding, mode=mode, value=value)

    def pad_output_gradient(self, gradient):
        """The gradient of the cropping MONAI does after aggregation: zeros where it padded."""
        return F.pad(gradient, self.padding) if any(self.padding) else gradient


def is_nnunet_window(window):
    return bool(window) and window.get("style") == "nnunet"


def window_plan(image_size, window, device="cpu", dtype=torch.float32):
    """Where the windows of this model description go on an image of this size, with their weights."""
    plan_class = NNUNetTilePlan if is_nnunet_window(window) else WindowPlan
    return plan_class(image_size, window, device=device, dtype=dtype)


class NNUNetTilePlan:
    """Where nnU-Net's ``predict_sliding_window_return_logits`` puts its tiles, with their weights: the image
    padded with zeros to at least the patch (``pad_nd_image``), tiles at ``compute_steps_for_sliding_window``,
    weighted by ``compute_gaussian`` (sigma 1/8 of the patch, stored in float16, zeros raised to the smallest
    weight)."""

    def __init__(self, image_size, window, device="cpu", dtype=torch.float32):
        settings = window_settings(window)
        self.settings = settings
        self.image_size = tuple(int(s) for s in image_size)
        self.roi_size = tuple(settings["roi_size"])
        self.padding = []
        for axis in reversed(range(len(self.image_size))):
            diff = max(self.roi_size[axis] - self.image_size[axis], 0)
            self.padding += [diff // 2, diff - diff // 2]
        self.padded_size = tuple(max(i, r) for i, r in zip(self.image_size, self.roi_size))
        steps = tile_steps(self.padded_size, self.roi_size, float(settings["tile_step_size"]))
        self.slices = [tuple(slice(start, start + size) for start, size in zip(corner, self.roi_size))
                       for corner in itertools.product(*steps)]
        self.importance = nnunet_gaussian(self.roi_size).to(device=device, dtype=dtype)
        self.count = torch.zeros(self.padded_size, dtype=dtype, device=device)
        for window_slice in self.slices:
            self.count[window_slice] += self.importance

    def __len__(self):
        return len(self.slices)

    @property
    def crop(self):
        """The index that cuts the padding off aggregated outputs."""
        before = [self.padding[2 * (len(self.image_size) - 1 - axis)] for axis in range(len(self.image_size))]
        return (slice(None), slice(None)) + tuple(slice(b, b + n) for b, n in zip(before, self.image_size))

    def pad_input(self, inputs):
        return F.pad(inputs, self.padding, mode="constant", value=0.0) if any(self.padding) else inputs

    pad_output_gradient = WindowPlan.pad_output_gradient


def tile_steps(image_size, tile_size, tile_step_size):
    """nnU-Net's ``compute_steps_for_sliding_window``: the tile starts along each axis."""
    steps = []
    for size, tile in zip(image_size, tile_size):
        count = int(np.ceil((size - tile) / (tile * tile_step_size))) + 1
        step = (size - tile) / (count - 1) if count > 1 else 0
        steps.append([int(np.round(step * i)) for i in range(count)])
    return steps


def nnunet_gaussian(tile_size, sigma_scale=1.0 / 8, value_scaling_factor=10.0):
    """nnU-Net's ``compute_gaussian`` importance map (float16 values, as its predictor uses them)."""
    from scipy.ndimage import gaussian_filter
    impulse = np.zeros(tile_size)
    impulse[tuple(size // 2 for size in tile_size)] = 1
    gaussian = gaussian_filter(impulse, [size * sigma_scale for size in tile_size], 0, mode="constant", cval=0)
    gaussian /= np.max(gaussian) / value_scaling_factor
    gaussian = torch.from_numpy(gaussian).to(torch.float16)
    gaussian[gaussian == 0] = torch.min(gaussian[gaussian != 0])
    return gaussian.float()


def window_vjp(predictor, inputs, output_gradient, window, kept=None):
    """d L / d inputs, given ``output_gradient`` = d L / d Y for Y = sliding-window outputs of ``inputs``.

    Exact (up to float rounding) for any loss of Y. ``inputs`` (B, C, *spatial), ``output_gradient``
    (B, K, *spatial) on the same grid; the predictor must keep the spatial size of its windows. ``kept``: a
    :class:`WindowKeeper` that ran the forward pass; its kept windows are not run again (and are freed here).
    """
    inputs = inputs.detach()
    plan = window_plan(inputs.shape[2:], window, device=inputs.device, dtype=output_gradient.dtype)
    padded = plan.pad_input(inputs)
    share = plan.pad_output_gradient(output_gradient.to(inputs.device)) / plan.count
    padded_gradient = torch.zeros_like(padded)
    batch = int(plan.settings["sw_batch_size"])
    jobs = [(image, window_slice) for image in range(inputs.shape[0]) for window_slice in plan.slices]
    for first in range(0, len(jobs), batch):
        chunk = jobs[first:first + batch]
        index = [(slice(image, image + 1), slice(None)) + window_slice for image, window_slice in chunk]
        graph = kept.take(first // batch) if kept is not None else None
        with torch.enable_grad():
            if graph is None:
                window_inputs = torch.cat([padded[i] for i in index]).requires_grad_(True)
                window_outputs = predictor(window_inputs)
            else:
                window_inputs, window_outputs = graph
            if tuple(window_outputs.shape[2:]) != tuple(window_inputs.shape[2:]):
                raise ValueError("windowed gradients need outputs of the window's size, got {} for {}".format(
                    tuple(window_outputs.shape[2:]), tuple(window_inputs.shape[2:])))
            cotangent = torch.cat([share[i] for i in index]) * plan.importance
            window_gradient, = torch.autograd.grad(window_outputs, window_inputs,
                                                   cotangent.to(window_outputs.dtype))
        for i, gradient in zip(index, window_gradient):
            padded_gradient[i] += gradient[None].to(padded_gradient.dtype)
    if not any(plan.padding):
        return padded_gradient
    with torch.enable_grad():
        leaf = inputs.requires_grad_(True)
        gradient, = torch.autograd.grad(plan.pad_input(leaf), leaf, padded_gradient)
    return gradient


def available_memory(device):
    """Bytes free now: on a CUDA device what the allocator can still get, else the available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_memory_budget(device):
    """The memory budget of a windowed gradient where none is set: half the memory available now."""
    return available_memory(device) // 2


def parse_bytes(text):
    """``"8G"``, ``"512M"``, ``"1.5GiB"``, ``"2e9"`` as bytes (K, M, G, T: powers of 1024)."""
    units = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}
    value = str(text).strip().lower().replace("ib", "").replace("b", "")
    unit = value[-1:] if value[-1:] in units and value[-1:] else ""
    try:
        number = float(value[:-1] if unit else value)
    except ValueError:
        raise ValueError("not a memory size: {!r} (give bytes, or a number with K, M, G or T)".format(text))
    if number < 0:
        raise ValueError("a memory size cannot be negative: {!r}".format(text))
    return int(number * units[unit])


class WindowKeeper:
    """The predictor MONAI's sliding window calls during a windowed gradient: it runs each batch of windows with
    autograd and keeps its graph while ``budget`` bytes allow, else without autograd (recomputed by
    :func:`window_vjp`). The first batch's graph is measured (the bytes its saved tensors and outputs hold,
    ``shared`` tensors such as the weights left out). Of the budget, room for :data:`OUTPUT_BUFFERS` buffers of
    the aggregated outputs (``voxels``: images x padded voxels) is set aside, and one batch's room for the window
    being recomputed or pushed back. ``measured``: (graph bytes, output bytes per voxel) of an earlier keeper on
    the same input size, so that this one need not measure."""

    def __init__(self, predictor, budget, voxels=0, shared=(), measured=None):
        self.predictor, self.budget, self.voxels, self.reserve = predictor, int(budget), int(voxels), 0
        self.shared = {tensor.untyped_storage().data_ptr() for tensor in shared}
        self.graphs, self.window_bytes, self.capacity, self.kept = [], None, 0, 0
        if measured is not None:
            self._plan(*measured)

    def __call__(self, window_inputs):
        if self.window_bytes is not None and self.kept >= self.capacity:
            self.graphs.append(None)
            return self.predictor(window_inputs)
        with torch.enable_grad():
            leaf = window_inputs.detach().requires_grad_(True)
            if self.window_bytes is None:
                outputs, graph_bytes = self._measured(leaf)
                self._plan(graph_bytes, outputs.shape[1] * outputs.element_size())
            else:
                outputs = self.predictor(leaf)
        keep = self.kept < self.capacity  # not even the first batch where one does not fit
        self.graphs.append((leaf, outputs) if keep else None)
        self.kept += keep
        return outputs.detach()

    def _plan(self, graph_bytes, output_voxel_bytes):
        self.window_bytes, self.output_voxel_bytes = graph_bytes, output_voxel_bytes
        self.reserve = OUTPUT_BUFFERS * self.voxels * output_voxel_bytes
        self.capacity = max((self.budget - self.reserve) // max(graph_bytes, 1) - 1, 0)

    @property
    def measured(self):
        """(graph bytes of one batch, output bytes per voxel), for the next keeper on the same input size."""
        return None if self.window_bytes is None else (self.window_bytes, self.output_voxel_bytes)

    def take(self, index):
        """The kept (inputs, outputs) of the ``index``-th batch, or None; the keeper lets go of it."""
        graph = self.graphs[index] if index < len(self.graphs) else None
        if graph is not None:
            self.graphs[index] = None
        return graph

    def report(self):
        """What ran: windows (batches) in all, kept, recomputed; the budget and one batch's graph in bytes."""
        batches, kept = len(self.graphs), self.kept
        mode = "all kept" if kept == batches else ("none kept" if kept == 0 else "some kept")
        return {"mode": mode, "batches": batches, "kept": kept, "recomputed": batches - kept,
                "budget": self.budget, "window_bytes": self.window_bytes, "reserve": self.reserve}

    @staticmethod
    def line(report):
        """One line for the user: which mode the windowed gradient ran in, and within what budget."""
        if "kept" not in report:  # a model that aggregates its own tiles (nnU-Net): each one recomputed
            return "windowed gradient: {} (every tile recomputed)".format(report["mode"])
        return "windowed gradient: {} ({} of {} window batches kept, {} recomputed; budget {:.2f} GiB)".format(
            report["mode"], report["kept"], report["batches"], report["recomputed"], report["budget"] / 2 ** 30)

    def _measured(self, leaf):
        stored = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.shared:
                stored[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = self.predictor(leaf)
        stored[outputs.untyped_storage().data_ptr()] = outputs.untyped_storage().nbytes()
        return outputs, sum(stored.values())


def _scan_interval(image_size, roi_size, dims, overlap):
    try:
        from monai.inferers.utils import _get_scan_interval
        return _get_scan_interval(image_size, roi_size, dims, overlap)
    except ImportError:  # the same rule, should MONAI rename its helper
        return tuple(int(r) if r == i else max(int(r * (1 - o)), 1)
                     for i, r, o in zip(image_size, roi_size, overlap))
