"""Segmentation networks with their preprocessing: the built-in demo, a model folder, TorchScript, a MONAI bundle.

A :class:`SegmentationModel` takes raw intensities in the network convention (B, C, X, Y, Z: RAS-oriented
grid, channel first) on the volume's own grid, and returns the network's outputs on that same grid: intensity
normalisation, cropping, resampling to the network's spacing, sliding windows and the way back all happen inside,
differentiably, so attacks get gradients in the volume's own intensities and grid.
"""
import itertools
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import InputError
from .convolutions import input_gradient_convolutions
from .outputs import Regions, check_activation, label_count, predict_labels
from .steps import apply_step, check_steps, default_steps, file_exact_affine, step_shape, step_text
from .windowed import (GRADIENT_MODES, WindowKeeper, available_memory, default_memory_budget, is_nnunet_window,
                       sliding_window_outputs, window_plan, window_settings, window_vjp)

MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
BUILTIN_MODELS = {"demo": "demo-unet", "demo-unet": "demo-unet", "demo-unet-short": "demo-unet-short",
                  "demo-slicewise2d": "demo-slicewise2d", "demo-segresnet": "demo-segresnet",
                  "demo-attentionunet": "demo-attentionunet", "demo-classifier": "demo-classifier"}
DESCRIPTION_FILE = "model.json"
PALETTE = [(0.0, 0.0, 0.0), (0.30, 0.55, 0.95), (0.85, 0.45, 0.35), (0.95, 0.90, 0.55), (0.45, 0.80, 0.45),
           (0.80, 0.45, 0.85), (0.40, 0.85, 0.85), (0.95, 0.65, 0.20), (0.60, 0.60, 0.60), (0.90, 0.30, 0.55)]
TRUST_HINT = ("load it only if you trust where it comes from, with --trust-checkpoint (trust_checkpoint=True "
              "in Python)")
CHECKPOINT_KEYS = ("state_dict", "model")
NETWORK_BYTES_PER_VOXEL = 64  # float32 copies per voxel of the network's grid in a run (input, outputs, gradients)
TASKS = ("segmentation", "classification")


class UnsafeCheckpoint(InputError):
    """A checkpoint that only arbitrary unpickling could load, refused without ``trust_checkpoint``."""


class PlainPickle(InputError):
    """A Python pickle that is no PyTorch file (neither torch.save's zip nor its legacy format): never unpickled."""


@dataclass
class Label:
    value: int
    name: str
    color: Tuple[float, float, float]


@dataclass
class ModelDescription:
    """What a user can write by hand next to the weights (``model.json``); every field but ``name`` is optional.

    ``output_activation``: ``logits``, ``softmax`` or ``sigmoid``; None (what a model.json, TorchScript file or
    bundle that does not say gets): detected from the outputs (see :func:`describe`), else logits.
    ``intensity``: one step or a list (see :func:`~.preprocessing.normalize_intensity`).
    ``spacing``: the network's voxel size in mm along x, y, z (the input is resampled to it and the outputs
    back). ``window``: sliding-window inference (``roi_size``, ``overlap``, ``mode``, ``sigma_scale``,
    ``padding_mode``, ``cval``, ``sw_batch_size``). ``crop``: crop to the foreground (``threshold`` on the
    normalised volume, ``margin`` in voxels) and pad the outputs back with background. ``pad_divisible``: pad the
    network input to multiples of this many voxels.
    """
    name: str
    labels: List[Label] = field(default_factory=list)
    output_activation: Optional[str] = "logits"
    in_channels: int = 1
    intensity: Union[dict, list] = field(default_factory=lambda: {"type": "none"})
    window: Optional[dict] = None
    architecture: Optional[dict] = None
    weights: str = "model.pt"
    spacing: Optional[List[float]] = None
    crop: Optional[dict] = None
    pad_divisible: Optional[int] = None
    preprocessing: Optional[list] = None
    activation_after_inference: Optional[str] = None
    task: Optional[str] = None
    spatial_dims: Optional[int] = None
    notes: str = ""

    def activate(self, outputs):
        """``activation_after_inference`` (``softmax`` or ``sigmoid``) on the network's aggregated outputs, before
        the preprocessing is undone, as a MONAI bundle's ``Activationsd`` before ``Invertd``; else the outputs."""
        if self.activation_after_inference == "softmax":
            return torch.softmax(outputs, dim=1)
        if self.activation_after_inference == "sigmoid":
            return torch.sigmoid(outputs)
        return outputs

    def steps(self):
        """The preprocessing steps in the order they run (:mod:`.steps`): ``preprocessing`` where given (a MONAI
        bundle's transforms in their order), else intensity, crop, spacing and padding from the fields."""
        return check_steps(self.preprocessing if self.preprocessing is not None else default_steps(self))

    @classmethod
    def from_json(cls, path):
        try:
            text = Path(path).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise InputError("cannot read {}: it is not UTF-8 text (byte 0x{:02x} at position {}); save it as "
                             "UTF-8".format(path, error.object[error.start], error.start))
        except OSError as error:
            raise InputError("cannot read {}: {}".format(path, error.strerror or error))
        if not text.strip():
            raise InputError("{} is empty; it describes the network as a JSON object (see README, model.json)".format(
                path))
        try:
            data = json.loads(text)
        except ValueError as error:
            raise InputError("cannot read {}: {}".format(path, error))
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data, where="model description"):
        if not isinstance(data, dict) or "name" not in data:
            raise InputError("{} must be a JSON object with at least a \"name\"".format(where))
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError("{}: unknown field(s) {}; known fields: {}".format(where, ", ".join(unknown),
                                                                               ", ".join(sorted(known))))
        data = dict(data)
        data["labels"] = parse_labels(data.get("labels", []), where)
        data.setdefault("output_activation", None)  # not declared: detected from the outputs
        if data.get("task") is not None and data["task"] not in TASKS:
            raise InputError("{}: unknown task {!r}; expected one of {}".format(where, data["task"], ", ".join(TASKS)))
        if data.get("spatial_dims") not in (None, 2, 3):
            raise InputError("{}: spatial_dims must be 2 or 3, got {!r}".format(where, data["spatial_dims"]))
        if data.get("output_activation") is not None:
            try:
                check_activation(data["output_activation"])
            except ValueError as error:
                raise InputError("{}: {}".format(where, error))
        description = cls(**data)
        try:
            check_field_values(description, check_intensity_types(description.steps()))
        except InputError as error:
            raise InputError("{}: {}".format(where, error))
        return description

    def to_json(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def labels_for(self, count, task="segmentation"):
        """The first ``count`` labels, with palette colours where the description has none: named ``background``,
        ``label N`` (a classifier's: ``class N``)."""
        known = {label.value: label for label in self.labels}

        def name(value):
            if task == "classification":
                return "class {}".format(value)
            return "background" if value == 0 else "label {}".format(value)
        return [known.get(value, Label(value, name(value), PALETTE[value % len(PALETTE)])) for value in range(count)]


def check_intensity_types(steps):
    """Refuse intensity steps whose ``type`` :func:`~.preprocessing.normalize_intensity` does not know."""
    from .preprocessing import INTENSITY_TYPES
    for step in steps:
        specs = step.get("intensity", []) if isinstance(step, dict) else []
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            kind = spec.get("type", "none") if isinstance(spec, dict) else spec
            if spec is not None and (not isinstance(spec, dict) or kind not in INTENSITY_TYPES):
                raise InputError("unknown intensity type {!r}; known types: {} (as {{\"type\": NAME, ...}})".format(
                    kind, ", ".join(INTENSITY_TYPES)))
    return steps


def check_field_values(description, steps):
    """Refuse values of a model.json no run can use: ``pad_divisible`` below 1, a percentile normalisation whose
    percentiles are not 0 <= lower < upper <= 100, a zscore with a fixed ``std`` that is not positive, a window
    whose ``roi_size`` is not positive or whose ``overlap`` lies outside [0, 1)."""
    channels = description.in_channels
    if channels is not None and not (isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1):
        raise InputError("in_channels must be a whole number of at least 1, got {!r}".format(channels))
    if description.pad_divisible is not None:
        _check_divisor(description.pad_divisible)
    for step in steps:
        if "pad_divisible" in step:
            _check_divisor(step["pad_divisible"])
        specs = step.get("intensity", [])
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            if isinstance(spec, dict):
                _check_intensity_values(spec)
    if description.window:  # null or {}: the whole volume at once
        check_window(description.window)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _check_divisor(value):
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise InputError("pad_divisible must be a whole number of voxels of at least 1 (or one per axis), got "
                         "{!r}".format(value))


def _check_intensity_values(spec):
    kind = spec.get("type", "none")
    if kind == "percentile":
        lower, upper = spec.get("lower", 0.0), spec.get("upper", 100.0)
        if not (_is_number(lower) and _is_number(upper) and 0 <= lower < upper <= 100):
            raise InputError("intensity percentile: lower and upper must be percentiles with 0 <= lower < upper "
                             "<= 100, got lower {!r}, upper {!r}".format(lower, upper))
    for kind_of, low, high in (("range", "a_min", "a_max"), ("minmax", "min", "max")):
        if kind == kind_of and spec.get(low) is not None and spec.get(high) is not None:
            if not (_is_number(spec[low]) and _is_number(spec[high]) and spec[low] != spec[high]):
                raise InputError("intensity {}: {} and {} must be two different numbers (the window they span "
                                 "divides the volume), got {!r} and {!r}".format(kind, low, high, spec[low],
                                                                                 spec[high]))
    if kind == "zscore" and spec.get("std") is not None:
        std = spec["std"]
        if not all(_is_number(v) and v > 0 for v in (std if isinstance(std, (list, tuple)) else [std])):
            raise InputError("intensity zscore: a fixed std must be positive (it divides the volume), got "
                             "{!r}".format(std))


def check_window(window):
    """Refuse a sliding window without ``roi_size`` in whole voxels of at least 1, or with ``overlap`` outside
    [0, 1)."""
    if not isinstance(window, dict):
        raise InputError("window must be its settings (roi_size, overlap, ...) or null, got {!r}".format(window))
    roi = window.get("roi_size")
    if not (isinstance(roi, (list, tuple)) and roi
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in roi)):
        raise InputError("window roi_size must be whole numbers of voxels of at least 1, one per axis, got "
                         "{!r}".format(roi))
    overlap = window.get("overlap")
    if overlap is not None and not all(_is_number(v) and 0 <= v < 1 for v in (
            overlap if isinstance(overlap, (list, tuple)) else [overlap])):
        raise InputError("window overlap must lie in [0, 1) (a share of the window), got {!r}".format(overlap))
    batch = window.get("sw_batch_size", 1)
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise InputError("window sw_batch_size must be a whole number of at least 1, got {!r}".format(batch))


def parse_labels(labels, where="labels"):
    """Labels from ``[{"value", "name", "color"?}]``, ``["background", "liver", ...]`` or ``{"1": "liver"}``."""
    if isinstance(labels, dict):
        try:
            labels = [{"value": int(value), "name": name} for value, name in labels.items()]
        except ValueError:
            raise InputError("{}: label values must be whole numbers, got {!r}".format(where, sorted(labels)))
    if labels is not None and not isinstance(labels, (list, tuple)):
        raise InputError("{}: labels must be a list of names, a list of {{value, name}} or a {{value: name}} "
                         "mapping, got {!r}".format(where, labels))
    parsed = []
    for index, item in enumerate(labels or []):
        if isinstance(item, str):
            item = {"value": index, "name": item}
        try:
            value = int(item["value"])
            color = tuple(float(c) for c in item.get("color", PALETTE[value % len(PALETTE)]))[:3]
            parsed.append(Label(value, str(item["name"]), color))
        except (KeyError, TypeError, ValueError):
            raise InputError("{}: a label needs a value and a name, got {!r}".format(where, item))
    values = [label.value for label in parsed]
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise InputError("{}: label value {} is given twice".format(where, ", ".join(map(str, repeated))))
    return parsed


def grid_affine(spacing_or_affine):
    """Voxel-to-RAS matrix of the network-convention grid: given (or a Volume's), or the diagonal of a spacing."""
    if spacing_or_affine is None:
        return None
    if hasattr(spacing_or_affine, "affine"):
        spacing_or_affine = spacing_or_affine.affine
    array = np.asarray(spacing_or_affine, dtype=np.float64)
    return array.copy() if array.ndim == 2 else np.diag(list(array[:3]) + [1.0])


def grid_spacing(spacing_or_affine):
    """Voxel size along the network's x, y, z: given, or the column norms of a voxel-to-RAS matrix."""
    affine = grid_affine(spacing_or_affine)
    return None if affine is None else tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def torch_device(name):
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; an :class:`InputError` where this machine lacks it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError("unknown device {!r}: give cpu, cuda or cuda:N".format(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device {} was asked for but CUDA is not available here (PyTorch {} sees no GPU)".format(
            name, torch.__version__))
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError("device {} was asked for but there are only {} CUDA device(s)".format(
            name, torch.cuda.device_count()))
    return device


class SegmentationModel(torch.nn.Module):
    """A network with its differentiable preprocessing, run on the input's own grid.

    ``gradient_mode`` (windowed networks only): ``"windowed"`` (default) computes input gradients one window at a
    time (memory of one window); ``"naive"`` is autograd through MONAI's sliding-window inference. Both give the
    same gradient. ``input_spacing`` (mm along x, y, z; see :meth:`on_grid`) is the spacing of the volumes given
    to the model; where it is unknown (None) the input is taken to be at the network's spacing.
    """

    def __init__(self, network, description, device="cpu", amp=False, gradient_mode=None, source=""):
        super().__init__()
        self.network = network
        self.description = description
        if description.output_activation is not None:
            check_activation(description.output_activation)
        if gradient_mode is not None and gradient_mode not in GRADIENT_MODES:
            raise ValueError("gradient_mode must be one of {}".format(GRADIENT_MODES))
        self.gradient_mode = gradient_mode or "windowed"
        self.memory_budget = None  # bytes for a windowed gradient's kept windows; None: half the available memory
        self.gradient_report = None  # what the last windowed gradient kept and recomputed (WindowKeeper.report)
        self._window_counts = {}
        self._window_graphs = {}
        self.detected_activation = None
        self.detected_task = None
        self.input_affine = None
        self.input_orientation = None  # how the volume's own voxel order maps to the network convention
        self.input_ijk_to_ras = None
        self.file_ijk_to_ras = None  # the volume's file matrix as nibabel reads it (NIfTI), where known
        self.amp = bool(amp)
        self.source = source
        self.load_notes = []
        self.to_device(device)

    # ----------------------------------------------------------------------------------------------- settings
    @property
    def input_spacing(self):
        """Voxel size (mm along x, y, z) of the volumes given to the model (see :meth:`on_grid`), or None."""
        return None if self.input_affine is None else grid_spacing(self.input_affine)

    @property
    def activation(self):
        return self.description.output_activation or self.detected_activation or "logits"

    @property
    def task(self):
        """``segmentation`` or ``classification``: declared, else detected from the outputs (:func:`describe`)."""
        return self.description.task or self.detected_task or "segmentation"

    @property
    def spatial_dims(self):
        """2 for a network on 2D images (declared, or its architecture's ``spatial_dims``), else 3."""
        declared = self.description.spatial_dims
        architecture = self.description.architecture
        if declared is None and architecture and not architecture.get("slicewise"):  # slice by slice: a volume
            declared = architecture.get("args", {}).get("spatial_dims")
        return declared or 3

    @property
    def device(self):
        for tensor in list(self.network.parameters()) + list(self.network.buffers()):
            return tensor.device
        return self._fallback_device

    def to_device(self, device):
        device = torch_device(device)
        self._fallback_device = device
        self.network.to(device)
        return self

    @contextmanager
    def on_grid(self, spacing_or_affine):
        """Within this block, inputs have this spacing (or the grid of this voxel-to-RAS matrix, or of this Volume:
        then also its own voxel order, which frameworks that do not reorient, as nnU-Net, work in)."""
        previous = self.input_affine, self.input_orientation, self.input_ijk_to_ras
        self.input_affine = file_exact_affine(grid_affine(spacing_or_affine), self.file_ijk_to_ras)
        self.input_orientation = getattr(spacing_or_affine, "orientation", None)
        self.input_ijk_to_ras = getattr(spacing_or_affine, "ijk_to_ras", None)
        try:
            yield self
        finally:
            self.input_affine, self.input_orientation, self.input_ijk_to_ras = previous

    def pipeline_steps(self):
        """The reproduced pipeline, one line per step (the model report lists them)."""
        return [step_text(step) for step in self.description.steps()]

    def checked_outputs(self, network_outputs, plan):
        """What ``output_activation`` describes, from the network's aggregated outputs: those outputs (after
        ``activation_after_inference``), before the way back."""
        return self.description.activate(network_outputs)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, volume):
        inputs, plan = self.prepare(volume)
        return self.restore(self.description.activate(self.infer(inputs)), plan)

    def prepare(self, volume):
        """Raw volume on its grid → network input (each preprocessing step in order) and the way back."""
        channels = self.description.in_channels
        if channels and volume.shape[1] != channels:
            raise InputError("the network takes {} input channel(s) but the volume has {}".format(
                channels, volume.shape[1]))
        inputs, affine, undo, box = volume.to(self.device), self.input_affine, [], None
        for step in self.description.steps():
            inputs, affine, back, cropped = apply_step(step, inputs, affine, self.activation)
            undo.append(back)
            box = box if cropped is None else cropped
        plan = {"undo": undo, "box": box, "device": volume.device, "network_size": tuple(inputs.shape[2:])}
        return inputs, plan

    def restore(self, outputs, plan):
        """Network outputs → outputs on the input's grid (each step undone, last first); a classifier's (B, K)
        class scores as they are."""
        if outputs.dim() == 2:
            return outputs.to(plan["device"])
        for back in reversed(plan["undo"]):
            if back is not None:
                outputs = back(outputs)
        return outputs.to(plan["device"])

    def infer(self, inputs):
        """Network outputs for a prepared input: the whole input at once, or window by window."""
        window = self.description.window
        if not window:
            return self.run_network(inputs)
        return sliding_window_outputs(self.run_network, inputs, window)

    def run_network(self, inputs):
        """The network on one input (or batch of windows), under autocast with ``amp``, outputs in input dtype; a 2D
        network gets the one-slice input without its one-voxel axis."""
        flat_axis = one_voxel_axis(inputs, self.description.name) if self.spatial_dims == 2 else None
        network_inputs = inputs if flat_axis is None else inputs.squeeze(flat_axis)
        if self.amp:
            kind = inputs.device.type
            with torch.autocast(device_type=kind, dtype=torch.float16 if kind == "cuda" else torch.bfloat16):
                outputs = self.network(network_inputs)
        else:
            outputs = self.network(network_inputs)
        if isinstance(outputs, (list, tuple)):
            outputs = outputs[0]
        if not torch.is_tensor(outputs):
            raise InputError("the network returned {}, not a tensor".format(type(outputs).__name__))
        if flat_axis is not None and outputs.dim() > 2:
            outputs = outputs.unsqueeze(flat_axis)
        if outputs.dim() == 2:  # (B, K) class scores: a classifier
            return outputs if outputs.dtype == inputs.dtype else outputs.to(inputs.dtype)
        if tuple(outputs.shape[2:]) != tuple(inputs.shape[2:]):
            raise InputError("the network returned outputs of size {} for an input of size {}; only networks "
                             "whose outputs lie on their input grid are supported".format(
                                 tuple(outputs.shape[2:]), tuple(inputs.shape[2:])))
        return outputs if outputs.dtype == inputs.dtype else outputs.to(inputs.dtype)

    # ---------------------------------------------------------------------------------------------- gradients
    @property
    def windowed_gradients(self):
        return bool(self.description.window) and self.gradient_mode == "windowed"

    def loss_and_gradient(self, volume, loss_fn):
        """``loss_fn(outputs)`` (a scalar), its gradient with respect to the raw volume, and the detached outputs.

        Windowed networks (``gradient_mode="windowed"``): the outputs are aggregated without autograd, the loss
        gradient taken on them, and pushed back through the network one window at a time (:func:`window_vjp`),
        then through the resampling and normalisation to the raw intensities: exact for any loss of the outputs.
        Where one window covers the input, plain autograd does the same with one forward pass fewer. Within
        ``memory_budget`` the windows' graphs are kept from the forward pass instead of being recomputed
        (:class:`WindowKeeper`; ``gradient_report`` says how many were). On CPU the stride-1 convolutions pass
        their input gradients as forward convolutions (:func:`input_gradient_convolutions`): during this call
        they give no gradient to their weights, in any thread.
        """
        with input_gradient_convolutions(self.network, self.device, self.amp):
            return self._loss_and_gradient(volume, loss_fn)

    def _loss_and_gradient(self, volume, loss_fn):
        volume = volume.detach().requires_grad_(True)
        inputs, plan = self.prepare(volume)
        self.gradient_report = None
        if not self.windowed_gradients or self._one_window(inputs):  # one window: autograd holds no more memory
            outputs = self.restore(self.description.activate(self.infer(inputs)), plan)
            loss = loss_fn(outputs)
            gradient, = torch.autograd.grad(loss, volume)
            return float(loss.detach()), gradient, outputs.detach()
        keeper = self._window_keeper(inputs)
        with torch.no_grad():
            network_outputs = self.infer(inputs.detach()) if keeper is None else sliding_window_outputs(
                keeper, inputs.detach(), self.description.window)
        network_outputs.requires_grad_(True)
        outputs = self.restore(self.description.activate(network_outputs), plan)
        loss = loss_fn(outputs)
        output_gradient, = torch.autograd.grad(loss, network_outputs)
        input_gradient = window_vjp(self.run_network, inputs.detach(), output_gradient, self.description.window,
                                    keeper)
        self.gradient_report = keeper.report() if keeper is not None else {"mode": "none kept"}
        if keeper is not None and keeper.measured is not None:
            self._window_graphs[keeper.key] = keeper.measured  # the next gradient on this size need not measure
        if inputs.requires_grad:
            gradient, = torch.autograd.grad(inputs, volume, input_gradient)
        else:
            gradient = input_gradient
        return float(loss.detach()), gradient.to(volume.device), outputs.detach()

    def _window_keeper(self, inputs):
        """A :class:`WindowKeeper` within ``memory_budget`` (default: half the memory available now), with room for
        six volume-sized output buffers; None where the model aggregates its own tiles (nnU-Net)."""
        if is_nnunet_window(self.description.window) or type(self).infer is not SegmentationModel.infer:
            return None
        budget = self.memory_budget if self.memory_budget is not None else default_memory_budget(inputs.device)
        roi = window_settings(self.description.window)["roi_size"]
        voxels = inputs.shape[0] * int(np.prod([max(i, r) for i, r in zip(inputs.shape[2:], roi)]))
        key = (tuple(inputs.shape), inputs.dtype, str(inputs.device), repr(self.description.window), self.amp)
        keeper = WindowKeeper(self.run_network, budget, voxels, measured=self._window_graphs.get(key),
                              shared=list(self.network.parameters()) + list(self.network.buffers()))
        keeper.key = key
        return keeper

    def covers_in_one_window(self, volume):
        """Whether one window covers the network input of ``volume`` (a whole-volume network: always)."""
        if not self.description.window:
            return True
        with torch.no_grad():
            inputs, _ = self.prepare(volume[:1])
        return self._one_window(inputs)

    def _one_window(self, inputs):
        if inputs.shape[0] != 1:
            return False
        key = (tuple(inputs.shape[2:]), repr(self.description.window))
        if key not in self._window_counts:  # a plan builds the importance map: once per input size
            self._window_counts[key] = len(window_plan(inputs.shape[2:], self.description.window))
        return self._window_counts[key] == 1

    # ------------------------------------------------------------------------------------------------ results
    @torch.no_grad()
    def predict(self, volume):
        """Integer label map (B, X, Y, Z) for a raw-intensity volume."""
        return predict_labels(self(volume), self.activation)

    def labels(self, outputs):
        """Labels (names, colours) for outputs of this network."""
        return self.description.labels_for(label_count(outputs, self.activation),
                                           "classification" if outputs.dim() == 2 else "segmentation")


def one_voxel_axis(inputs, name):
    """The dimension of a (B, C, X, Y, Z) input's single one-voxel axis, that a 2D network's image lacks."""
    flat = [axis for axis in range(2, inputs.dim()) if inputs.shape[axis] == 1]
    if len(flat) != 1:
        raise InputError("model {} is a 2D network: it takes a one-slice volume (one axis of one voxel), got "
                         "{}".format(name, "x".join(str(n) for n in inputs.shape[2:])))
    return flat[0]


# ------------------------------------------------------------------------------------------------------ loading
def load_model(source, output_activation=None, trust_checkpoint=False, device="cpu", amp=False,
               gradient_mode=None, folds=None, mirroring=True, skip_untwinned=False):
    """Load a network with its preprocessing from any of:

    - a built-in name (``demo``);
    - a model folder holding ``model.json`` (or that file), with a state dict, a checkpoint dict or TorchScript;
    - a TorchScript file (``.pt``/``.ts``; raw whole-volume input, outputs detected unless declared);
    - a MONAI bundle, folder or ``.zip``, with ``configs/inference.json`` and ``models/model.pt`` or ``model.ts``
      (``skip_untwinned``: leave out the preprocessing transforms without a differentiable twin, reported, instead
      of refusing the bundle);
    - an nnU-Net v2 trained model folder (``TRAINER__PLANS__CONFIGURATION``, or the dataset folder holding one):
      ``folds`` (default: all there) and test-time ``mirroring`` (see :mod:`.nnunet`);
    - a pickled network or checkpoint, only with ``trust_checkpoint`` (unpickling can run code from the file).

    Weights load with ``weights_only=True``; a file that needs more is refused unless ``trust_checkpoint``. A
    ``torch.nn.Module`` is taken as it is (see :func:`as_segmentation_model`).
    """
    if isinstance(source, torch.nn.Module):
        model = as_segmentation_model(source)
        model.to_device(device)
        model.amp = bool(amp)
        return model
    source = str(source)
    if source in BUILTIN_MODELS:
        model = _load_described(MODELS_DIR / BUILTIN_MODELS[source] / DESCRIPTION_FILE, trust_checkpoint)
        model.source = "built-in {}".format(BUILTIN_MODELS[source])
    else:
        from . import bundles, nnunet
        path = Path(source)
        if not path.exists():
            raise InputError("model not found: {} (give a built-in name {}, a model folder, a MONAI bundle, an "
                             "nnU-Net trained model folder or a TorchScript file)".format(source, sorted(BUILTIN_MODELS)))
        if path.is_dir():
            if (path / DESCRIPTION_FILE).is_file():
                model = _load_described(path / DESCRIPTION_FILE, trust_checkpoint)
            elif nnunet.is_nnunet_folder(path):
                model = nnunet.load_nnunet(path, folds, mirroring, trust_checkpoint)
            elif bundles.bundle_root(path) is not None:
                model = bundles.load_bundle(path, trust_checkpoint, skip_untwinned)
            elif (path / "model.pt").is_file():  # a MONAI Auto3DSeg model folder, as MONAIAuto3DSeg keeps them
                model = _load_network_file(path / "model.pt", trust_checkpoint)
            elif (path / "plans.json").is_file() and (path / "dataset.json").is_file():
                raise InputError("{} looks like an nnU-Net trained model folder but has no fold_K/{} (found: {})"
                                 .format(path, nnunet.CHECKPOINT, ", ".join(sorted(
                                     str(p.relative_to(path)) for p in path.glob("fold_*/*.pth"))) or "no fold"))
            else:
                raise InputError("{} holds neither {}, a MONAI bundle (configs/inference.json and models/) nor an "
                                 "nnU-Net trained model (plans.json, dataset.json, fold_K/)".format(
                                     path, DESCRIPTION_FILE))
        elif path.suffix == ".json":
            model = _load_described(path, trust_checkpoint)
        elif bundles.is_bundle_zip(path):
            model = bundles.load_bundle(path, trust_checkpoint, skip_untwinned)
        else:
            model = _load_network_file(path, trust_checkpoint)
    if output_activation is not None:
        if getattr(model, "fixed_activation", False) and output_activation != model.description.output_activation:
            raise InputError("{} outputs {} probabilities, as its framework computes them; --output-activation "
                             "{} does not apply".format(source, model.description.output_activation,
                                                        output_activation))
        model.description.output_activation = check_activation(output_activation)
        if output_activation != model.description.activation_after_inference:
            model.description.activation_after_inference = None  # the user's word on what the network outputs
    if gradient_mode is not None:
        if gradient_mode not in GRADIENT_MODES:
            raise InputError("gradient mode must be one of {}".format(GRADIENT_MODES))
        model.gradient_mode = gradient_mode
    model.amp = bool(amp)
    model.to_device(device)
    return model.eval()


def as_segmentation_model(network):
    """``network`` as a :class:`SegmentationModel`: itself if it is one; a plain ``torch.nn.Module`` wrapped as
    logits on the raw whole volume (no preprocessing), with a warning saying so."""
    if isinstance(network, SegmentationModel):
        return network
    if not isinstance(network, torch.nn.Module):
        raise InputError("the network must be a torch.nn.Module or a model from load_model, got {}".format(
            type(network).__name__))
    name = type(network).__name__
    warnings.warn("{} is a plain torch.nn.Module: taken as logits on the raw whole volume, without intensity "
                  "preprocessing, resampling or sliding windows; wrap it as SegmentationModel(network, "
                  "ModelDescription(...)) to say otherwise{}".format(
                      name, "; it is in training mode (dropout, batch statistics): call .eval() first"
                      if network.training else ""), stacklevel=3)
    return SegmentationModel(network, ModelDescription(name=name, output_activation="logits",
                                                       in_channels=convolution_in_channels(network)),
                             device=_module_device(network))


def convolution_in_channels(network):
    """The input channels of a plain module's first convolution (a colour network's 3); 1 without one."""
    convolution = next((module for module in network.modules()
                        if isinstance(module, torch.nn.modules.conv._ConvNd)), None)
    return 1 if convolution is None else int(convolution.in_channels)


def _module_device(network):
    for tensor in list(network.parameters()) + list(network.buffers()):
        return tensor.device
    return "cpu"


def build_network(architecture):
    """A MONAI network from ``{"name": "UNet", "args": {...}}``; only classes of ``monai.networks.nets``."""
    from monai.networks import nets
    name = architecture["name"]
    network_class = getattr(nets, name, None)
    if not isinstance(network_class, type) or not issubclass(network_class, torch.nn.Module):
        raise InputError("unknown MONAI architecture {!r}".format(name))
    try:
        return network_class(**architecture.get("args", {}))
    except (TypeError, ValueError, AssertionError) as error:  # what MONAI raises on arguments it refuses
        raise InputError("cannot build {} with {}: {}".format(name, architecture.get("args", {}), error))


def load_checkpoint(path, trust_checkpoint=False):
    """``torch.load`` with ``weights_only=True``; what needs arbitrary unpickling only with ``trust_checkpoint``; a
    plain Python pickle (:func:`refuse_plain_pickle`) never."""
    refuse_plain_pickle(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if "Weights only load failed" not in text or (found is None and "Unsupported" in text):
            # not a pickle torch.load can read at all (random bytes, text): damaged, or not a checkpoint
            raise InputError("cannot read {} as a PyTorch checkpoint: the file is damaged or of another kind "
                             "({})".format(path, type(error).__name__))
        if not trust_checkpoint:
            reason = ("it contains {}, which is not plain weights".format(found.group(1)) if found
                      else "it is not plain weights")
            raise UnsafeCheckpoint("refusing to load {}: {}; loading it needs arbitrary unpickling "
                                   "(weights_only=False), which can run code stored in the file; {}".format(
                                       path, reason, TRUST_HINT))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as error:
        raise InputError("cannot read {} even with --trust-checkpoint: {}".format(path, str(error).splitlines()[0]))


def refuse_plain_pickle(path):
    """:class:`PlainPickle` where ``path`` is a Python pickle but neither torch.save's zip archive nor its legacy
    format (a pickle of torch's magic number first): torch cannot load it, and even a trusted load would unpickle it
    (run its code) first. Only the opcodes of the first pickle are read, nothing is unpickled."""
    import pickletools
    import zipfile
    with open(str(path), "rb") as stream:
        if stream.read(1) != b"\x80" or zipfile.is_zipfile(str(path)):  # \x80: a pickle's PROTO opcode (protocol 2+)
            return
        stream.seek(0)
        try:
            first = [arg for _opcode, arg, _position in itertools.islice(pickletools.genops(stream), 3)]
        except Exception:  # not a pickle after all (damaged, another format): torch.load says so
            return
    if torch.serialization.MAGIC_NUMBER not in first:
        raise PlainPickle("{} is a plain Python pickle, not a PyTorch checkpoint or TorchScript file; it was not "
                          "unpickled (that would run code stored in it): save the network's weights with "
                          "torch.save(network.state_dict(), ...) or export it with torch.jit.save".format(path))


def unwrap_checkpoint(checkpoint):
    """A network (pickled nn.Module) or a state dict, out of a checkpoint dict's ``state_dict``/``model``."""
    if isinstance(checkpoint, torch.nn.Module):
        return checkpoint
    if isinstance(checkpoint, dict):
        for key in CHECKPOINT_KEYS:
            inner = checkpoint.get(key)
            if isinstance(inner, (dict, torch.nn.Module)):
                return unwrap_checkpoint(inner)
        if checkpoint and all(torch.is_tensor(value) for value in checkpoint.values()):
            if all(str(key).startswith("module.") for key in checkpoint):  # saved from DataParallel
                return {key[len("module."):]: value for key, value in checkpoint.items()}
            return checkpoint
    raise InputError("the checkpoint holds neither a state dict (tensors by name) nor one under {}, got {}".format(
        "/".join(CHECKPOINT_KEYS), type(checkpoint).__name__))


def network_with_weights(network, weights_path, trust_checkpoint=False):
    """``network`` with the state dict of a checkpoint file, or the pickled network the file holds (trusted)."""
    loaded = unwrap_checkpoint(load_checkpoint(weights_path, trust_checkpoint))
    if isinstance(loaded, torch.nn.Module):
        return loaded
    if network is None:
        raise InputError("{} holds weights (a state dict) but nothing says which network they belong to; name the "
                         "architecture in {}".format(weights_path, DESCRIPTION_FILE))
    try:
        network.load_state_dict(loaded)
    except RuntimeError as error:
        raise InputError("the weights in {} do not fit the network of {}: {}".format(
            weights_path, DESCRIPTION_FILE, state_dict_differences(network.state_dict(), loaded) or
            " ".join(str(error).split())[:300]))
    return network


def state_dict_differences(expected, loaded):
    """What differs between two state dicts, in a few words: missing, unexpected and reshaped tensors (one example
    of each)."""
    if not isinstance(loaded, dict):
        return ""
    missing = [key for key in expected if key not in loaded]
    unexpected = [key for key in loaded if key not in expected]
    reshaped = [key for key in expected if key in loaded and hasattr(loaded[key], "shape")
                and tuple(loaded[key].shape) != tuple(expected[key].shape)]
    parts = []
    for keys, what in ((missing, "missing"), (unexpected, "not in the network")):
        if keys:
            parts.append("{} tensor(s) {} (e.g. {})".format(len(keys), what, keys[0]))
    if reshaped:
        key = reshaped[0]
        parts.append("{} of another shape (e.g. {}: {} in the file, {} in the network)".format(
            len(reshaped), key, tuple(loaded[key].shape), tuple(expected[key].shape)))
    return "; ".join(parts)


def _load_described(description_path, trust_checkpoint=False):
    description_path = Path(description_path)
    description = ModelDescription.from_json(description_path)
    weights = description_path.parent / description.weights
    if not weights.is_file():
        raise InputError("weights not found: {} (named by {})".format(weights, description_path))
    if description.architecture:
        try:
            built = build_network(description.architecture)
        except InputError as error:
            raise InputError("{}: architecture: {}".format(description_path, error))
        network = network_with_weights(built, weights, trust_checkpoint)
    else:
        network = _torchscript(weights)
        if network is None:
            network = network_with_weights(None, weights, trust_checkpoint)
    return SegmentationModel(network, description, source="model folder {}".format(description_path.parent))


def _torchscript(path):
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        return None


def _load_network_file(path, trust_checkpoint=False):
    network = _torchscript(path)
    if network is not None:
        # input channels not declared: a wrong count is the network's own error, named by network_input_error
        return SegmentationModel(network, ModelDescription(name=path.stem, output_activation=None, in_channels=None),
                                 source="TorchScript {}".format(path))
    from . import auto3dseg
    try:
        checkpoint = load_checkpoint(path, trust_checkpoint)
        if auto3dseg.is_auto3dseg(checkpoint):
            return auto3dseg.load_auto3dseg(checkpoint, str(path), trust_checkpoint)
        loaded = unwrap_checkpoint(checkpoint)
    except (UnsafeCheckpoint, PlainPickle, auto3dseg.Auto3DSegError):
        raise
    except InputError as error:
        raise InputError("{} is neither TorchScript nor a PyTorch checkpoint ({}); export it with torch.jit.save, "
                         "or give a model folder with {} or a MONAI bundle".format(path, error, DESCRIPTION_FILE))
    if not isinstance(loaded, torch.nn.Module):
        raise InputError("{} holds weights (a state dict) but no network; give a model folder with {} naming the "
                         "architecture, or export the network with torch.jit.save".format(path, DESCRIPTION_FILE))
    return SegmentationModel(loaded, ModelDescription(name=path.stem, output_activation=None,
                                                      in_channels=convolution_in_channels(loaded)),
                             source="pickled network {}".format(path))


# ----------------------------------------------------------------------------------------------------- describe
@dataclass
class ModelReport:
    """What :func:`describe` found: declared settings, and what the outputs on a volume show."""
    name: str
    source: str
    in_channels: Optional[int]
    network_in_channels: Optional[int]
    out_channels: int
    declared_activation: Optional[str]
    detected_activation: str
    activation: str
    labels: List[Label]
    intensity: Union[dict, list]
    steps: List[str]
    network_spacing: Optional[List[float]]
    input_spacing: Optional[Tuple[float, ...]]
    input_size: Tuple[int, ...]
    network_size: Tuple[int, ...]
    window: Optional[dict]
    windows: int
    gradient_mode: str
    device: str
    amp: bool
    parameters: Optional[int]
    notes: List[str]
    task: str = "segmentation"
    spatial_dims: int = 3

    def lines(self):
        def size(values, unit=""):
            return "x".join("{:g}".format(v) for v in values) + unit

        out = ["model {} ({})".format(self.name, self.source)]
        out.append("task: {}, {}D network{}".format(self.task, self.spatial_dims, ", {} classes".format(
            len(self.labels)) if self.task == "classification" else ""))
        network = "network: {} output channel(s)".format(self.out_channels)
        if self.parameters is not None:
            network += ", {:.2f} M parameters".format(self.parameters / 1e6)
        if self.network_in_channels is not None:
            network += ", {} input channel(s)".format(self.network_in_channels)
        out.append(network)
        if self.declared_activation:
            as_detected = "sigmoid" if isinstance(self.declared_activation, Regions) else self.declared_activation
            agree = "agree" if as_detected == self.detected_activation else \
                "look like {}: check the declaration".format(self.detected_activation)
            out.append("outputs: {} (declared; the outputs on this volume {})".format(self.declared_activation,
                                                                                      agree))
        else:
            out.append("outputs: {} (detected: not declared)".format(self.detected_activation))
        out.append(("classes: " if self.task == "classification" else "labels: ") + ", ".join("{} {}".format(label.value, label.name) for label in self.labels))
        out.append("intensity: {}".format(json.dumps(self.intensity)))
        out.append("preprocessing, in order: {}".format("; ".join(
            "{}. {}".format(index, text) for index, text in enumerate(self.steps, 1))))
        if self.network_spacing:
            if self.input_spacing is None:
                out.append("spacing: network {}; volume spacing unknown, not resampled".format(
                    size(self.network_spacing, " mm")))
            else:
                out.append("spacing: network {}, volume {}: {} voxels in, {} at the network".format(
                    size(self.network_spacing, " mm"), size(self.input_spacing, " mm"), size(self.input_size),
                    size(self.network_size)))
        if self.window:
            layout = ("tile step {} (nnU-Net's tiles and Gaussian)".format(self.window["tile_step_size"])
                      if is_nnunet_window(self.window) else "overlap {} ({})".format(self.window["overlap"],
                                                                                    self.window["mode"]))
            out.append("window: {} {}, {} window(s) on this volume; gradients {}".format(
                size(self.window["roi_size"]), layout, self.windows,
                "window by window" if self.gradient_mode == "windowed" else "through the whole sliding window "
                                                                           "(naive)"))
        out.append("device: {}{}".format(self.device, ", mixed precision" if self.amp else ""))
        out.extend("note: " + note for note in self.notes)
        return out


def detect_activation(outputs, tolerance=1e-3):
    """``softmax`` where outputs lie in [0, 1] and sum to 1 over channels, ``sigmoid`` where they lie in [0, 1]
    otherwise, else ``logits``."""
    outputs = outputs.detach().float()
    low, high = float(outputs.min()), float(outputs.max())
    if low < -tolerance or high > 1.0 + tolerance:
        return "logits"
    if outputs.shape[1] > 1 and float((outputs.sum(dim=1) - 1.0).abs().max()) <= tolerance:
        return "softmax"
    return "sigmoid"


def network_in_channels(network):
    """Input channels of the first convolution (or first 5-D weight, for TorchScript), if there is one."""
    try:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.conv._ConvNd):
                return int(module.in_channels)
    except Exception:
        pass
    for parameter in network.parameters():
        if parameter.dim() >= 3:
            return int(parameter.shape[1])
    return None


CHANNELS_ERROR = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")


def network_input_error(model, error):
    """An :class:`InputError` naming the model and the channel counts where ``error`` (a RuntimeError from inside
    the network) says its first convolution takes another number of input channels than it was given; else None."""
    found = CHANNELS_ERROR.search(str(error))
    if found is None:
        return None
    return InputError("model {} ({}): its first convolution takes {} input channel(s) but the volume gives {}; "
                      "give a network made for {}-channel volumes".format(
                          model.description.name, model.source or "in memory", found.group(1), found.group(2),
                          found.group(2)))


def network_grid_shape(model, shape, affine):
    """The voxel counts of a volume of ``shape`` on the grid ``affine`` once the model's preprocessing has resampled,
    cropped and padded it (a foreground crop taken to keep every voxel); a model with its own preprocessing
    (nnU-Net, Auto3DSeg): the volume's extent at the network's ``spacing``, where the description gives one."""
    shape = tuple(int(n) for n in shape)
    if type(model).prepare is not SegmentationModel.prepare:
        target = model.description.spacing
        if affine is None or not target:
            return shape
        have = grid_spacing(affine)
        return tuple(max(1, int(round(n * h / t))) for n, h, t in zip(shape, have, target))
    for step in model.description.steps():
        shape, affine = step_shape(step, shape, affine)
    return shape


def check_network_memory(model, shape, affine):
    """Refuse (one line naming both sizes) a volume whose network grid (:func:`network_grid_shape`) needs more
    memory than the model's device has free: a coarse volume resampled to a fine network spacing."""
    try:
        network_shape = network_grid_shape(model, shape, affine)
    except (ValueError, TypeError, RuntimeError, np.linalg.LinAlgError):  # a grid prepare() itself names or refuses
        return
    per_voxel = NETWORK_BYTES_PER_VOXEL * max(1, model.description.in_channels or 1)
    need = float(np.prod(network_shape, dtype=np.float64)) * per_voxel
    if need <= float(np.prod(shape, dtype=np.float64)) * per_voxel:
        return  # no larger than the volume's own grid, which reading the file checked
    available = available_memory(model.device)
    if need > available:
        raise InputError("model {}: the volume's {} voxels become {} at the network's grid{}, which need about "
                         "{:.1f} GiB of memory for a run, and {} has {:.1f} GiB free".format(
                             model.description.name, "x".join(str(int(n)) for n in shape),
                             "x".join(str(int(n)) for n in network_shape),
                             " ({} mm)".format("x".join("{:g}".format(v) for v in model.description.spacing))
                             if model.description.spacing else "", need / 2 ** 30, model.device,
                             available / 2 ** 30))


@torch.no_grad()
def describe(model, volume):
    """Run ``model`` once on ``volume`` (a (1, C, X, Y, Z) tensor or a :class:`~.volume.Volume`) and report what
    it is: declared settings and what the outputs show. An undeclared output activation is detected from the
    outputs and adopted by the model."""
    grid = model.input_affine
    if hasattr(volume, "as_tensor"):
        grid = volume  # its voxel order too (frameworks that do not reorient work in it)
        volume = volume.as_tensor()
    spacing = grid_spacing(grid)
    with model.on_grid(grid):
        check_network_memory(model, volume.shape[2:], model.input_affine)
        try:
            inputs, plan = model.prepare(volume)
            outputs = model.checked_outputs(model.infer(inputs), plan)
        except InputError:  # already one clear line (a channel count, a one-slice axis)
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, torch.jit.Error) as error:  # the first run
            lines = str(error).strip().splitlines() or [""]
            reason = lines[-1] if isinstance(error, torch.jit.Error) else "{}: {}".format(type(error).__name__,
                                                                                         lines[0])
            refusal = network_input_error(model, error) or InputError(
                "model {} ({}) fails on this volume ({} input): {}".format(
                    model.description.name, model.source or "in memory", "x".join(str(n) for n in volume.shape[2:]),
                    reason[:300]))
            raise refusal from None
    if not bool(torch.isfinite(outputs).all()):
        raise InputError("model {} ({}) outputs NaN or infinite values on this volume; its outputs cannot be "
                         "predicted from or attacked".format(model.description.name, model.source or "in memory"))
    detected = detect_activation(outputs)
    if model.description.output_activation is None:
        model.detected_activation = detected
    task = "classification" if outputs.dim() == 2 else "segmentation"
    if model.description.task not in (None, task):
        raise InputError("model {} is declared a {} network but outputs shape {} ({})".format(
            model.description.name, model.description.task, tuple(outputs.shape),
            "class scores" if task == "classification" else "one score map per label"))
    model.detected_task = task
    window = window_settings(model.description.window) if model.description.window else None
    windows = len(window_plan(inputs.shape[2:], window)) if window else 1
    try:
        parameters = sum(p.numel() for p in model.network.parameters())
    except Exception:
        parameters = None
    return ModelReport(
        name=model.description.name, source=model.source or "in memory", in_channels=model.description.in_channels,
        network_in_channels=network_in_channels(model.network), out_channels=int(outputs.shape[1]),
        declared_activation=model.description.output_activation, detected_activation=detected,
        activation=model.activation, labels=model.labels(outputs), intensity=model.description.intensity,
        steps=model.pipeline_steps(),
        network_spacing=model.description.spacing, input_spacing=spacing, input_size=tuple(volume.shape[2:]),
        network_size=plan["network_size"], window=window, windows=windows, gradient_mode=model.gradient_mode
        if window else "autograd", device=str(model.device), amp=model.amp, parameters=parameters,
        notes=list(model.load_notes), task=task, spatial_dims=model.spatial_dims)
