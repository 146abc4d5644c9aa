"""MONAI Auto3DSeg SegResNet models as the MONAIAuto3DSeg Slicer extension runs them.

The extension downloads a model to ``~/.MONAIAuto3DSeg/models/<model>/model.pt``: a checkpoint dictionary holding
``config`` (plain data) and ``state_dict``. It writes the input volume node to a file in the node's own voxel order
and runs its ``Scripts/auto3dseg_segresnet_inference.py`` on it. This module reproduces that script as it is since
commit 4b04da5 (May 2024; read at the extension's 9cdf2df, December 2025); the network is built from
``config["network"]`` with MONAI's ``ConfigParser``. For one input volume the script runs:

1. ``LoadImaged`` of the file (``image1``, in the file's voxel order), then ``ConcatItemsd`` into ``image`` and
   ``EnsureTyped`` float32;
2. the ``normalize_mode`` intensity step on ``image``, so with the statistics of the whole raw volume:
   ``ct``/``range``: the ``intensity_bounds`` to [-1, 1] (not clipped), then a sigmoid; ``mri``/``meanstd``:
   z-score over the non-zero voxels; ``meanstdtanh``: the same, then ``3 tanh(x / 3)``; ``pet``:
   ``sigmoid((x - min) / std)``;
3. ``Orientationd`` RAS (``orientation_ras``; a model without it is refused);
4. ``CropForegroundd(source_key="image1", margin=10, allow_smaller=True)`` (``crop_foreground``, on by default):
   the box of the voxels above 0 of ``image1``, not reoriented, in the file's voxel order, grown by 10 voxels and
   kept within the file's size. ``image1`` is the raw volume (of several input volumes: the first, normalised,
   since the script then normalises each before the concatenation). That box cuts the RAS-oriented ``image`` index by
   index, with zeros where it passes an axis's end. Where the file's axes are not R, A, S in this order, the box
   need not hold the foreground: it may cut into it. medadv cuts the same voxels;
5. ``Spacingd`` to ``resample_resolution``, bilinear (an axis within 25 % of it keeps its spacing);
6. a Gaussian ``SlidingWindowInfererAdapt`` of ``roi_size``, overlap 0.625, under float16 autocast on CUDA (so
   does medadv on CUDA);
7. the softmax and its argmax (a sigmoid model: each channel >= 0.5; the script saves channel 0 only), brought back
   to the input grid by ``Invertd(nearest_interp=True)``: nearest-neighbour resampling, label 0 outside the crop;
8. for a model whose path holds ``whole-head``: ``KeepLargestConnectedComponentd(num_components=2)``.

medadv's outputs are the probabilities brought back the same way: by nearest neighbour, background outside the crop.
A grid resampled to twice its spacing puts every other voxel half-way between two network voxels, and MONAI's
resampler decides such ties by the float32 rounding of its coordinates. So medadv asks MONAI's ``SpatialResample``
which network voxel each voxel takes, once per pair of grids (:func:`nearest_voxels`), and copies the probabilities
from there. Argmax commutes with nearest-neighbour resampling, so the labels medadv predicts are the script's. A
sigmoid model's outputs are its channel 0, the one the script saves (label 1 where >= 0.5). For ``whole-head``
models, ``KeepLargestConnectedComponent`` removes each label's components beyond its two largest (26-connected,
numbered in the file's voxel order and ranked as MONAI ranks them). Their voxels become background (probability 1,
no gradient there), so the labels equal the script's there too. ``whole-head`` and ``brats`` are read from the path
medadv is given, as the script reads them from the path the extension gives it.

Several input volumes (``extra_modalities``) are the channels of one volume, so they share one grid. Each is
normalised with its own mode before the concatenation, and the box comes from the first. The script's ``Resized``
of an extra volume whose array has another size therefore never applies.

A model whose path holds ``brats`` runs the script's BraTS branch: the sequences (up to four, ``input_channels``)
are the channels of ``image``; ``Orientationd`` RAS; ``CropForegroundd`` by ``image`` itself (voxels above 0 in any
channel, on the RAS-oriented volume, margin 10); ``Spacingd`` as above; only then the ``normalize_mode`` step, on
the cropped and resampled channels (z-score per channel); the window; a sigmoid per output channel (>= 0.5), back
by nearest neighbour, and the three channels merged into one label map: 2 where any channel is on, 1 where channel
1 or 2 is, 3 where channel 2 is. medadv's outputs are the three sigmoid channels as :class:`~.outputs.Regions`
(regions {1, 2, 3}, {1, 3}, {3} painting labels 2, 1, 3 in turn: the same label map), so the attack's loss is the
binary cross-entropy of each channel against its region. Label names come from ``labels.csv`` beside
``model.pt``, as the extension names its segments.

Refused by name: configs the script cannot run (no ``normalize_mode`` or ``intensity_bounds``, an unknown mode,
several channels without ``extra_modalities`` outside the BraTS branch); the ``pet`` mode on several BraTS channels
(the script takes one minimum and deviation over all of them); models without ``orientation_ras``; and network
configs that run code (unless trusted).

The script before 4b04da5 is no longer reproduced. At 0477a24 (February 2024) it cropped and resampled before the
intensities and brought probabilities back by linear interpolation.
"""
import csv
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .models import PALETTE, TRUST_HINT, Label, ModelDescription, SegmentationModel
from .outputs import Regions, predict_labels
from .preprocessing import crop, normalize_intensity, pad_outputs_back, straight_through
from .steps import monai_resampled, resample_axes, shifted, spacing_grid, target_spacing

SCRIPT = "Scripts/auto3dseg_segresnet_inference.py"
SCRIPT_COMMIT = "4b04da5"  # its last change (May 2024), read at the extension's 9cdf2df (December 2025)
WINDOW_OVERLAP = 0.625
CROP_MARGIN = 10
SPACING_RANGE = (0.75, 1.25)
KEEP_COMPONENTS = 2  # KeepLargestConnectedComponentd(num_components=2), for models whose path holds "whole-head"
MODES = ("none", "range", "ct", "meanstd", "mri", "meanstdtanh", "pet")
# the BraTS branch's merge: 2 where any channel >= 0.5, then 1 where channel 1 or 2 is, then 3 where channel 2 is
BRATS_REGIONS = Regions(regions=((1, 2, 3), (1, 3), (3,)), class_order=(2, 1, 3), inclusive=True)


class Auto3DSegError(InputError):
    """An Auto3DSeg checkpoint that cannot be reproduced (its own message, not "not a checkpoint")."""


def is_auto3dseg(checkpoint):
    """Whether a loaded checkpoint is an Auto3DSeg one (``config`` with a ``network``, and ``state_dict``)."""
    return (isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict)
            and "network" in checkpoint["config"] and "state_dict" in checkpoint)


def intensity_steps(config, where, mode=None):
    """The intensity steps (:func:`~.preprocessing.normalize_intensity`) of ``mode`` (default
    ``config["normalize_mode"]``), as the script's ``_add_normalization_transforms``."""
    mode = config.get("normalize_mode", "none") if mode is None else mode
    if mode == "none":
        return []
    if mode in ("range", "ct"):
        if "intensity_bounds" not in config:
            raise Auto3DSegError("Auto3DSeg model {}: normalize_mode {} needs intensity_bounds".format(where, mode))
        low, high = (float(v) for v in config["intensity_bounds"])
        return [{"type": "range", "a_min": low, "a_max": high, "b_min": -1.0, "b_max": 1.0, "clip": False},
                {"type": "sigmoid"}]
    zscore = {"type": "zscore", "nonzero": True, "mean": None, "std": None}
    if mode in ("meanstd", "mri"):
        return [zscore]
    if mode == "meanstdtanh":
        return [zscore, {"type": "tanh", "scale": 3.0}]
    if mode == "pet":
        return [{"type": "pet"}]
    raise Auto3DSegError("Auto3DSeg model {}: normalize_mode {!r} is not reproduced (the script knows {})".format(
        where, mode, ", ".join(MODES)))


def _channel_modes(config, where):
    """The normalize_mode of each input volume: the model's, then those of ``extra_modalities`` in order."""
    extra = config.get("extra_modalities") or {}
    if not isinstance(extra, dict):
        raise Auto3DSegError("Auto3DSeg model {}: extra_modalities must map names to normalize modes, got {!r}"
                             .format(where, extra))
    channels = int(config.get("input_channels", 1 + len(extra)))
    if channels != 1 + len(extra):
        raise Auto3DSegError("Auto3DSeg model {}: {} input channels but {} extra_modalities; the script normalises "
                             "one volume per channel and needs one mode for each".format(where, channels, len(extra)))
    return [config["normalize_mode"]] + [str(mode) for mode in extra.values()]


def brats_channel_modes(config, where):
    """The BraTS branch: the model's normalize_mode on each of its ``input_channels`` sequences (one to four)."""
    channels = int(config.get("input_channels", config["network"].get("in_channels", 4)))
    if not 1 <= channels <= 4:
        raise Auto3DSegError("Auto3DSeg model {}: the script's BraTS branch takes one to four sequences, the model "
                             "{}".format(where, channels))
    if config["normalize_mode"] == "pet" and channels > 1:
        raise Auto3DSegError("Auto3DSeg model {}: normalize_mode pet on {} BraTS sequences takes one minimum and "
                             "deviation over all of them; not reproduced".format(where, channels))
    return [config["normalize_mode"]] * channels


def check_config(config, where):
    """Refuse what the current script does not run, or medadv does not reproduce, with one message each."""
    if "roi_size" not in config:
        raise Auto3DSegError("Auto3DSeg model {}: its config has no roi_size".format(where))
    if not config.get("orientation_ras", False):
        raise Auto3DSegError("Auto3DSeg model {}: without orientation_ras the network sees the file's own axis order, "
                             "which is not reproduced".format(where))
    for key in ("normalize_mode", "intensity_bounds"):
        if key not in config:
            raise Auto3DSegError("Auto3DSeg model {}: its config has no {}, which the extension's script reads for "
                                 "every model (it stops there)".format(where, key))


def load_auto3dseg(checkpoint, where, trust_checkpoint=False):
    """An :class:`Auto3DSegModel` of an Auto3DSeg checkpoint, reproducing the extension's current pipeline.

    ``where`` is the path of ``model.pt``: the script decides by it whether the model is a ``whole-head`` one
    (largest components kept) or a ``brats`` one (its BraTS branch)."""
    from monai.bundle import ConfigParser
    from .bundles import _unsafe
    config = checkpoint["config"]
    check_config(config, where)
    brats = "brats" in where
    modes = brats_channel_modes(config, where) if brats else _channel_modes(config, where)
    channel_intensity = [intensity_steps(config, where, mode) for mode in modes]
    parser = ConfigParser({"network": config["network"]})
    problems = [] if trust_checkpoint else _unsafe(parser, "network")
    if problems:
        raise Auto3DSegError("Auto3DSeg model {}: its network config runs code ({}); {}".format(
            where, "; ".join(problems[:3]), TRUST_HINT))
    try:
        network = parser.get_parsed_content("network")
        network.load_state_dict(checkpoint["state_dict"], strict=True)
    except Exception as error:
        raise Auto3DSegError("Auto3DSeg model {}: cannot build its network: {}".format(where, error))
    pixdim = config.get("resample_resolution")
    pixdim = None if pixdim is None else [float(v) for v in pixdim]
    activation = "sigmoid" if config.get("sigmoid", False) or brats else "softmax"
    description = ModelDescription(
        name=str(config.get("name") or where), output_activation=BRATS_REGIONS if brats else activation,
        activation_after_inference=activation,
        labels=read_label_names(Path(where).parent / "labels.csv"),
        in_channels=len(channel_intensity), preprocessing=[], spacing=pixdim,
        intensity=channel_intensity[0] if len(channel_intensity) == 1 else channel_intensity,
        window={"roi_size": [int(v) for v in config["roi_size"]], "overlap": WINDOW_OVERLAP, "mode": "gaussian"},
        notes="MONAI Auto3DSeg model {}".format(where))
    model = Auto3DSegModel(network.eval(), description, channel_intensity,
                           crop_foreground=bool(config.get("crop_foreground", True)),
                           keep_components=KEEP_COMPONENTS if "whole-head" in where else None,
                           brats=brats, source="MONAI Auto3DSeg {}".format(where))
    model.load_notes = ["pipeline of MONAIAuto3DSeg's {} as changed last in {} (May 2024): intensities first, "
                        "crop by the file's own voxel order, labels back by nearest neighbour".format(SCRIPT, SCRIPT_COMMIT)]
    if brats:
        model.load_notes.append("'brats' in the path: the script's BraTS branch (crop and spacing before the "
                                "intensities, three sigmoid channels merged into labels 1-3)")
    elif activation == "sigmoid":
        model.load_notes.append("sigmoid model: the outputs are channel 0, the only one the script saves (label 1 "
                                "where >= 0.5)")
    if model.keep_components:
        model.load_notes.append("'whole-head' in the path: the script's KeepLargestConnectedComponent ({} per label) "
                                "is applied to the labels; removed voxels are background, without gradient".format(
                                    KEEP_COMPONENTS))
    return model


def read_label_names(path):
    """The labels of ``labels.csv`` beside ``model.pt`` (its ``LabelValue`` and ``Name`` columns, as the extension
    names its segments), or none where the file is missing."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
        if not {"LabelValue", "Name"} <= set(reader.fieldnames or ()):
            raise KeyError("columns {}".format(reader.fieldnames))
        return [Label(int(row["LabelValue"]), row["Name"].strip(), PALETTE[int(row["LabelValue"]) % len(PALETTE)])
                for row in rows if row.get("LabelValue", "").strip()]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error) as error:
        raise Auto3DSegError("{}: cannot read the label names (LabelValue and Name columns): {}".format(
            path, error))


class Auto3DSegModel(SegmentationModel):
    """An Auto3DSeg SegResNet with the current MONAIAuto3DSeg script's pipeline (see the module docstring).

    ``channel_intensity``: per input channel, its intensity steps; ``crop_foreground``: the script's crop by its
    ``image1``; ``keep_components``: the number of largest connected components kept per label (None: no
    such step); ``brats``: the script's BraTS branch."""

    def __init__(self, network, description, channel_intensity, crop_foreground=True, keep_components=None,
                 brats=False, source=""):
        super().__init__(network, description, source=source)
        self.brats = bool(brats)
        self.channel_intensity = [list(steps) for steps in channel_intensity]
        self.crop_foreground = bool(crop_foreground)
        self.keep_components = keep_components
        self.fixed_activation = True  # the config's softmax or sigmoid, as the script applies it
        self._nearest_cache = {}

    def pipeline_steps(self):
        if self.brats:
            return self._brats_steps()
        modes = "; ".join(json.dumps(steps) for steps in self.channel_intensity)
        lines = ["intensities over the whole raw volume, per input volume: {}".format(modes),
                 "orientation RAS"]
        if self.crop_foreground:
            lines.append("crop: the box of the first {}volume's voxels > 0 in the file's voxel order, margin {}, "
                         "cutting the RAS-oriented volume index by index (the script's CropForegroundd on "
                         "image1)".format("raw " if len(self.channel_intensity) == 1 else "normalised ", CROP_MARGIN))
        if self.description.spacing:
            lines.append("spacing {} mm (bilinear, MONAI's Spacing grid; an axis within 25 % keeps its own)".format(
                "x".join("{:g}".format(v) for v in self.description.spacing)))
        lines.append("{} on the network grid, back by nearest neighbour (Invertd(nearest_interp=True)), "
                     "background outside the crop".format(
                         "sigmoid, channel 0 kept" if self.activation == "sigmoid" else "softmax"))
        if self.keep_components:
            lines.append("largest {} connected components of each label kept (26-connected), the others "
                         "background".format(self.keep_components))
        return lines

    def _brats_steps(self):
        lines = ["the {} sequence(s) as channels; orientation RAS".format(len(self.channel_intensity))]
        if self.crop_foreground:
            lines.append("crop: the box of the voxels > 0 in any channel of the RAS-oriented volume, margin {} (the "
                         "script's BraTS CropForegroundd on image)".format(CROP_MARGIN))
        if self.description.spacing:
            lines.append("spacing {} mm (bilinear, MONAI's Spacing grid; an axis within 25 % keeps its own)".format(
                "x".join("{:g}".format(v) for v in self.description.spacing)))
        lines.append("intensities over the cropped, resampled channels: {}".format(
            json.dumps(self.channel_intensity[0])))
        lines.append("sigmoid per channel on the network grid, back by nearest neighbour, every channel 0 outside "
                     "the crop; merged: 2 where any channel >= 0.5, 1 where channel 1 or 2, 3 where channel 2")
        return lines

    # -------------------------------------------------------------------------------------------- grid order
    def _file_order(self, tensor):
        """Network-convention (B, C, x, y, z) → the file's own voxel order (B, C, i, j, k); the network axes are
        taken as the file's where only a grid matrix (or nothing) is known."""
        orientation = self.input_orientation
        return tensor if orientation is None else orientation.tensor_to_ijk(tensor)

    def _network_order(self, tensor):
        """The inverse of :meth:`_file_order`."""
        orientation = self.input_orientation
        return tensor if orientation is None else orientation.tensor_from_ijk(tensor)

    def crop_box(self, source):
        """The script's crop box, per axis (start, stop) on the RAS-oriented volume: computed on ``source`` (its
        ``image1``) in the file's voxel order (voxels > 0, any image of the batch, grown by the margin, within the
        file's size), its index ranges taken for the RAS axes in turn (a start past an axis's end: that end). The
        BraTS branch crops by the RAS-oriented volume itself."""
        with torch.no_grad():
            source = source.detach() if self.brats else self._file_order(source.detach())
            mask = (source > 0).any(dim=1).any(dim=0)
            if not bool(mask.any()):
                raise InputError("the first input volume has no voxel above 0{}: the MONAIAuto3DSeg script's "
                                 "foreground crop would leave nothing".format(
                                     "" if len(self.channel_intensity) == 1 else " once normalised"))
            box = []
            for axis in range(3):
                present = torch.nonzero(mask.any(dim=tuple(a for a in range(3) if a != axis))).flatten()
                start = max(int(present[0]) - CROP_MARGIN, 0)
                stop = min(int(present[-1]) + 1 + CROP_MARGIN, int(mask.shape[axis]))
                box.append((min(start, int(source.shape[2 + axis])), stop))
        return box

    # ------------------------------------------------------------------------------------------------ forward
    def prepare(self, volume):
        """Raw volume on its grid → network input (the script's transforms in order) and the way back."""
        channels = len(self.channel_intensity)
        if volume.shape[1] != channels:
            raise InputError("the network takes {} input volume(s) as channels but the volume has {}".format(
                channels, volume.shape[1]))
        volume = volume.to(self.device)
        full_shape = tuple(int(n) for n in volume.shape[2:])
        inputs = volume if self.brats else self._normalised(volume)
        affine, box, backward = self.input_affine, None, None
        if self.brats and self.crop_foreground:
            box = self.crop_box(volume)
            inputs = crop(inputs, box)
            affine = shifted(affine, [start for start, _ in box])
        elif self.crop_foreground:  # the script's image1: normalised before the concatenation of several volumes
            box = self.crop_box(volume[:, :1] if channels == 1 else inputs[:, :1])
            inputs = crop(inputs, box)
            affine = shifted(affine, [start for start, _ in box])
        pixdim = self.description.spacing
        if pixdim and affine is not None:
            step = {"spacing": pixdim, "min_pixdim": [v * SPACING_RANGE[0] for v in pixdim],
                    "max_pixdim": [v * SPACING_RANGE[1] for v in pixdim]}
            shape = tuple(int(n) for n in inputs.shape[2:])
            grid = spacing_grid(affine, shape, target_spacing(affine, step))
            if grid is not None:
                network_affine, forward, _ = grid
                size = tuple(len(where) for where in forward)
                inputs = straight_through(resample_axes(inputs, forward, "bilinear"), monai_resampled(
                    inputs, affine, network_affine, size, dtype="float32"))  # the script's Spacingd: float32
                backward = self._nearest(network_affine, tuple(int(n) for n in inputs.shape[2:]), affine, shape)
        if self.brats:
            inputs = self._normalised(inputs)
        plan = {"box": box, "full_shape": full_shape, "backward": backward, "device": volume.device,
                "network_size": tuple(inputs.shape[2:])}
        return inputs, plan

    def _normalised(self, volume):
        """Each channel through its intensity steps."""
        return torch.cat([normalize_intensity(volume[:, c:c + 1], steps)
                          for c, steps in enumerate(self.channel_intensity)], dim=1)

    def restore(self, outputs, plan):
        """Activated outputs on the network grid → outputs on the input's grid, as the script brings its labels
        back: nearest neighbour, background outside the crop, then the largest components where it keeps them."""
        # MONAI takes several sigmoid channels as one-hot and keeps components in channels 1.. only: not the saved one
        keep = self.keep_components and (self.activation != "sigmoid" or outputs.shape[1] == 1)
        if self.activation == "sigmoid":  # not the BraTS branch: its activation is its regions
            outputs = outputs[:, :1]
        if plan["backward"] is not None:
            outputs = back_by_nearest(outputs, plan["backward"])
        outputs = pad_outputs_back(outputs, plan["box"], plan["full_shape"], self.activation)
        if keep:
            outputs = self.keep_largest_components(outputs)
        return outputs.to(plan["device"])

    def _nearest(self, network_affine, network_shape, affine, shape):
        """Per axis, the network voxel whose outputs each voxel of the grid (``affine``, ``shape``) takes back
        (cached per pair of grids)."""
        key = (np.asarray(network_affine).tobytes(), network_shape, np.asarray(affine).tobytes(), shape)
        if key not in self._nearest_cache:
            if len(self._nearest_cache) > 16:
                self._nearest_cache.clear()
            self._nearest_cache[key] = nearest_voxels(network_affine, network_shape, affine, shape)
        return self._nearest_cache[key]

    def run_network(self, inputs):
        """The network on one window: under float16 autocast on CUDA, as the script runs it."""
        if inputs.device.type != "cuda" or self.amp:
            return super().run_network(inputs)
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            return super().run_network(inputs)

    def keep_largest_components(self, outputs):
        """``outputs`` with background where MONAI's ``KeepLargestConnectedComponent`` (``num_components``
        ``keep_components``, labels independent, full connectivity) removes a voxel of the predicted labels, which
        it labels in the file's voxel order (so equal-sized components are ranked alike)."""
        labels = self._file_order(predict_labels(outputs.detach(), self.activation)[:, None])[:, 0].cpu().numpy()
        removed = torch.from_numpy(np.stack([removed_components(item, self.keep_components) for item in labels]))
        removed = self._network_order(removed[:, None]).to(outputs.device)
        if not bool(removed.any()):
            return outputs
        background = torch.zeros_like(outputs[:, :, :1, :1, :1])
        if self.activation == "softmax":
            background[:, 0] = 1.0
        return torch.where(removed, background, outputs)


def removed_components(labels, keep):
    """The voxels of a label map that keeping each label's ``keep`` largest 26-connected components removes.

    Components are numbered in raster order (as scikit-image and scipy do) and ranked by size with numpy's
    ``argsort``, largest first, as MONAI's ``get_largest_connected_component_mask`` ranks them; a label with no
    more than ``keep`` components is kept whole."""
    from scipy import ndimage
    removed = np.zeros(labels.shape, dtype=bool)
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        components, count = ndimage.label(labels == value, structure=structure)
        if count <= keep:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        kept = np.zeros(len(sizes), dtype=bool)
        kept[np.argsort(sizes)[::-1][:keep]] = True
        removed |= (components > 0) & ~kept[components]
    return removed


def nearest_voxels(network_affine, network_shape, affine, shape):
    """Which network-grid voxel (grid ``network_affine``, ``network_shape``) MONAI's nearest-neighbour resampling back
    to the grid (``affine``, ``shape``) takes for each voxel of it, as ``Invertd(nearest_interp=True)`` inverts
    ``Spacingd``: per axis an index line where the choice along each axis depends on that axis alone (as it does
    where the grids are axis-aligned with each other), else one flat index per voxel.

    A grid resampled to twice its spacing puts half of its voxels half-way between two network voxels, and
    ``grid_sample`` decides such ties by the float32 rounding of its coordinates, which also depends on the sizes
    of the other axes. So the choice is MONAI's own: its ``SpatialResample`` (nearest, border, float32) run, as
    ``Invertd`` runs it, on the network grid's voxel coordinates, one axis at a time."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample
    resample = SpatialResample(mode="nearest", padding_mode="border", align_corners=False, dtype=torch.float32)
    source_affine = torch.as_tensor(np.asarray(network_affine, dtype=np.float64))
    target_affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    network_shape, shape = tuple(int(n) for n in network_shape), tuple(int(n) for n in shape)

    def chosen(axis):  # the network voxel index along ``axis`` for every voxel of the grid (exact in float32)
        view = [1, 1, 1]
        view[axis] = network_shape[axis]
        coordinates = torch.arange(network_shape[axis], dtype=torch.float32).reshape(view).expand(network_shape)
        return torch.as_tensor(resample(MetaTensor(coordinates[None].contiguous(), affine=source_affine),
                                        dst_affine=target_affine, spatial_size=shape))[0]

    lines = []
    for axis in range(3):
        choice = chosen(axis)
        line = choice[tuple(slice(None) if a == axis else 0 for a in range(3))].clone()
        view = [1, 1, 1]
        view[axis] = shape[axis]
        if not torch.equal(choice, line.reshape(view).expand(shape)):
            break
        lines.append(line.long())
    if len(lines) == 3:
        return {"lines": lines}
    flat = None
    for axis in range(3):
        choice = chosen(axis).long()
        flat = choice if flat is None else flat * network_shape[axis] + choice
    return {"flat": flat.reshape(-1), "shape": shape}


def back_by_nearest(outputs, choice):
    """``outputs`` on the network grid at the voxels :func:`nearest_voxels` chose (differentiable)."""
    if "lines" in choice:
        for axis, index in enumerate(choice["lines"]):
            outputs = outputs.index_select(axis + 2, index.to(outputs.device))
        return outputs
    flat = choice["flat"].to(outputs.device)
    return outputs.flatten(2).index_select(2, flat).reshape(outputs.shape[:2] + tuple(choice["shape"]))
