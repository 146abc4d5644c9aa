"""nnU-Net v2 trained model folders, predicted as nnU-Net's own ``nnUNetPredictor`` predicts, differentiably.

A folder ``DatasetNNN_Name/TRAINER__PLANS__CONFIGURATION/`` holds ``dataset.json``, ``plans.json`` and
``fold_K/checkpoint_final.pth`` (TotalSegmentator and SlicerNNUNet keep their models this way). nnU-Net reads
an image with SimpleITK (array axes k, j, i of the file's voxel grid, no reorientation), then:

1. transposes the axes by the plans' ``transpose_forward``;
2. crops to the bounding box of the non-zero voxels (holes filled);
3. normalises each channel by its scheme (z-score over the non-zero mask or over all voxels, CT clipping with the
   dataset's foreground statistics, rescaling to [0, 1]);
4. resamples to the configuration's spacing: skimage's ``resize`` (spline of order 3, edge mode, clipped to the
   input's range), or, where one axis is much coarser, in-plane first and along that axis by
   ``map_coordinates`` of order ``order_z``. Each is a fixed linear map per axis, applied here as one matrix per
   axis (built with the same scipy calls), so gradients flow through it exactly;
5. pads to the patch size, predicts tile by tile (``tile_step_size``, Gaussian importance), averaging the mirrored
   predictions (test-time mirroring) and the folds;
6. resamples the logits back to the cropped grid (order 1), applies softmax, puts them back into the uncropped
   volume (background outside) and transposes back. A region-based model (BraTS-style: dataset.json's labels name
   regions, sets of labels, and ``regions_class_order`` the label each region paints) applies a sigmoid instead,
   every region 0 outside the crop, and paints the regions' labels in order where they exceed 0.5.

Here the same runs on the network-convention tensor: it is turned back into the file's (k, j, i) array first, and
the outputs back into the network convention. The networks are built from the plans with
``dynamic-network-architectures``; checkpoints load with ``weights_only=True`` and an allow-list of the numpy
scalars and dtypes nnU-Net pickles with them.
"""
import contextlib
import importlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .outputs import Regions
from .preprocessing import straight_through
from .windowed import window_plan
from .models import (Label, ModelDescription, PALETTE, SegmentationModel, TRUST_HINT, UnsafeCheckpoint, grid_spacing,
                     refuse_plain_pickle)

CHECKPOINT = "checkpoint_final.pth"
ANISOTROPY_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
NORMALIZATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo01Normalization")
RESAMPLING = "resample_data_or_seg_to_shape"
RESAMPLING_KWARGS = {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"}
READERS = ("SimpleITKIO", "NibabelIO")  # both give the file's voxel order (k, j, i); NibabelIOWithReorient does not
NETWORK_PACKAGE = "dynamic_network_architectures.architectures."
EPSILON = 1e-8
NUMERIC_DTYPES = ["{}DType".format(kind) for kind in ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16",
                                                     "UInt32", "UInt64", "Float16", "Float32", "Float64", "Long",
                                                     "ULong", "Byte", "UByte", "Short", "UShort", "Int", "UInt",
                                                     "LongLong", "ULongLong", "Half", "Double")]


class NNUNetError(InputError):
    """A model folder, plans file or checkpoint that cannot be reproduced as nnU-Net runs it."""


# ------------------------------------------------------------------------------------------------------- folders
def is_nnunet_folder(path):
    return nnunet_folder(path) is not None


def nnunet_folder(path):
    """The trained model folder (``TRAINER__PLANS__CONFIGURATION``) at ``path``, or the one inside a dataset
    folder; None where there is none. Several inside a dataset folder: an error listing them."""
    path = Path(path)
    if _is_trained_folder(path):
        return path
    if not path.is_dir():
        return None
    inside = sorted(child for child in path.iterdir() if _is_trained_folder(child))
    if len(inside) > 1:
        raise NNUNetError("{} holds {} nnU-Net trained models ({}): give one of them".format(
            path, len(inside), ", ".join(child.name for child in inside)))
    return inside[0] if inside else None


def _is_trained_folder(path):
    return (path / "plans.json").is_file() and (path / "dataset.json").is_file() and bool(_fold_names(path))


def _fold_names(path):
    found = [child.name[len("fold_"):] for child in Path(path).glob("fold_*") if (child / CHECKPOINT).is_file()]
    return sorted(found, key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise NNUNetError("cannot read {}: {}".format(path, error))


# --------------------------------------------------------------------------------------------------------- plans
class NNUNetPlans:
    """What prediction needs from ``plans.json`` and ``dataset.json`` for one configuration, checked up front."""

    def __init__(self, folder, configuration=None):
        self.folder = Path(folder)
        self.where = self.folder / "plans.json"
        self.plans = _read_json(self.where)
        self.dataset = _read_json(self.folder / "dataset.json")
        parts = self.folder.name.split("__")
        self.configuration_name = configuration or (parts[2] if len(parts) == 3 else None)
        self.config = self._configuration(self.configuration_name)
        self._check_framework_classes()
        self.transpose_forward = self._axes("transpose_forward")
        self.transpose_backward = self._axes("transpose_backward")
        self.spacing = self._numbers("spacing", float)
        self.patch_size = self._numbers("patch_size", int)
        if len(self.patch_size) != 3 or len(self.spacing) != 3:
            raise NNUNetError("{}: configuration {} is {}D; only 3D configurations are supported".format(
                self.where, self.configuration_name, len(self.patch_size)))
        self.channels = self._channels()
        self.schemes = list(self.required("normalization_schemes"))
        self.use_mask = [bool(v) for v in self.required("use_mask_for_norm")]
        self.intensity = self.plans.get("foreground_intensity_properties_per_channel", {})
        self._check_normalisation()
        self.data_resampling = self._resampling("data")
        self.output_resampling = self._resampling("probabilities")
        self.labels, self.regions = self._labels()

    def _axes(self, key):
        """``transpose_forward``/``transpose_backward``: a permutation of 0, 1, 2 (default: none)."""
        axes = self.plans.get(key, [0, 1, 2])
        if not isinstance(axes, list) or sorted(str(a) for a in axes) != ["0", "1", "2"]:
            raise NNUNetError("{}: {} must be a permutation of 0, 1, 2, got {!r}".format(self.where, key, axes))
        return [int(a) for a in axes]

    def _numbers(self, key, kind):
        """A list of numbers of the configuration (``spacing``, ``patch_size``), or an error naming it."""
        values = self.required(key)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise NNUNetError("{}: configuration {}'s {} must be a list of numbers, got {!r}".format(
                self.where, self.configuration_name, key, values))
        return [kind(v) for v in values]

    def required(self, key):
        """A key of the configuration nnU-Net cannot predict without: its value, or an error naming it."""
        if key not in self.config:
            raise NNUNetError("{}: configuration {} has no {!r}".format(self.where, self.configuration_name, key))
        return self.config[key]

    def _check_framework_classes(self):
        """Refuse plans that name readers, preprocessors or label managers other than the ones reproduced."""
        reader = self.plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in READERS:
            raise NNUNetError("{}: image_reader_writer {} cannot be reproduced (it may reorient the image); supported: "
                              "{}".format(self.where, reader, ", ".join(READERS)))
        preprocessor = self.config.get("preprocessor_name", "DefaultPreprocessor")
        if preprocessor != "DefaultPreprocessor":
            raise NNUNetError("{}: preprocessor {} cannot be reproduced; supported: DefaultPreprocessor".format(
                self.where, preprocessor))
        manager = self.plans.get("label_manager", "LabelManager")
        if manager != "LabelManager":
            raise NNUNetError("{}: label manager {} cannot be reproduced; supported: LabelManager".format(
                self.where, manager))

    def _configuration(self, name):
        configurations = self.plans.get("configurations", {})
        if name not in configurations:
            raise NNUNetError("{}: configuration {!r} (from the folder name TRAINER__PLANS__CONFIGURATION or the "
                              "checkpoint) not in the plans; they hold {}".format(
                                  self.where, name, ", ".join(sorted(configurations))))
        config = dict(configurations[name])
        seen = [name]
        while "inherits_from" in config:  # nnU-Net's configurations may inherit from others
            parent = config.pop("inherits_from")
            if parent in seen or parent not in configurations:
                raise NNUNetError("{}: configuration {} inherits from {!r}, which cannot be resolved".format(
                    self.folder / "plans.json", name, parent))
            seen.append(parent)
            merged = dict(configurations[parent])
            merged.update(config)
            config = merged
        if config.get("previous_stage"):
            raise NNUNetError("{}: configuration {} is a cascade stage (it needs the segmentation of {}); cascades "
                              "are not supported".format(self.folder / "plans.json", name, config["previous_stage"]))
        if "architecture" not in config and "UNet_class_name" in config:
            config["architecture"] = architecture_from_old_plans(config, self.where)
        return config

    def _channels(self):
        names = self.dataset.get("channel_names", self.dataset.get("modality"))
        if not isinstance(names, dict) or not names or not all(str(key).isdigit() for key in names):
            raise NNUNetError("{}: channel_names must map channel numbers 0, 1, ... to names, got {!r}".format(
                self.folder / "dataset.json", names))
        return [str(names[key]) for key in sorted(names, key=int)]

    def _check_normalisation(self):
        where = self.folder / "plans.json"
        if not (len(self.schemes) == len(self.use_mask) == len(self.channels)):
            raise NNUNetError("{}: {} normalisation scheme(s) for {} channel(s)".format(
                where, len(self.schemes), len(self.channels)))
        for channel, scheme in enumerate(self.schemes):
            if scheme not in NORMALIZATIONS:
                raise NNUNetError("{}: normalisation scheme {} (channel {}) cannot be reproduced; supported: {}"
                                  .format(where, scheme, channel, ", ".join(NORMALIZATIONS)))
            if scheme == "CTNormalization":
                properties = self.intensity.get(str(channel), {})
                keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
                missing = [k for k in keys if not isinstance(properties.get(k), (int, float))
                           or isinstance(properties.get(k), bool)]
                if missing:
                    raise NNUNetError("{}: CTNormalization of channel {} needs the foreground intensity property "
                                      "(ies) {} as numbers".format(where, channel, ", ".join(missing)))

    def _resampling(self, kind):
        name = self.config.get("resampling_fn_" + kind)
        if name != RESAMPLING:
            raise NNUNetError("{}: resampling function {} ({}) cannot be reproduced; supported: {}".format(
                self.folder / "plans.json", name, "resampling_fn_" + kind, RESAMPLING))
        key = "resampling_fn_{}_kwargs".format(kind)
        kwargs = dict(self.required(key))
        unknown = sorted(set(kwargs) - RESAMPLING_KWARGS)
        if unknown:
            raise NNUNetError("{}: {} has setting(s) {} that are not reproduced".format(
                self.where, key, ", ".join(unknown)))
        # the defaults of nnU-Net's resample_data_or_seg_to_shape
        settings = {"order": int(kwargs.get("order", 3)), "order_z": int(kwargs.get("order_z", 0)),
                    "force_separate_z": kwargs.get("force_separate_z", False),
                    "threshold": float(kwargs.get("separate_z_anisotropy_threshold", ANISOTROPY_THRESHOLD))}
        if kwargs.get("is_seg"):
            raise NNUNetError("{}: resampling_fn_{} resamples as a segmentation (is_seg); cannot be reproduced"
                              .format(self.folder / "plans.json", kind))
        return settings

    def _labels(self):
        """Label names by value (0, 1, ...), and the :class:`Regions` of a region-based model (else None)."""
        where = self.folder / "dataset.json"
        labels = self.dataset.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise NNUNetError("{}: no labels".format(where))
        labels = {name: value for name, value in labels.items() if name != "ignore"}
        if any(isinstance(value, (list, tuple)) and len(value) > 1 for value in labels.values()):
            return self._region_labels(labels, where)
        by_value = {int(value[0] if isinstance(value, (list, tuple)) else value): name
                    for name, value in labels.items()}
        if sorted(by_value) != list(range(len(by_value))):
            raise NNUNetError("{}: labels {} are not 0, 1, 2, ... without gaps, as nnU-Net requires".format(
                where, sorted(by_value)))
        return [by_value[value] for value in range(len(by_value))], None

    def _region_labels(self, labels, where):
        """A region-based model: one sigmoid output per region (in dataset.json's order, background left out);
        label ``regions_class_order[i]`` is named after region i."""
        order = self.dataset.get("regions_class_order")
        regions = [(name, tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value])))
                   for name, value in labels.items()]
        regions = [(name, region) for name, region in regions if set(region) != {0}]
        if not isinstance(order, list) or len(order) != len(regions):
            raise NNUNetError("{}: a region-based model needs regions_class_order with one label per region ({} "
                              "regions: {}), got {!r}".format(where, len(regions),
                                                             ", ".join(name for name, _ in regions), order))
        order = [int(value) for value in order]
        names = {0: "background"}
        names.update({label: name for (name, _), label in zip(regions, order)})
        count = max(names) + 1
        by_value = [names.get(value, "label {}".format(value)) for value in range(count)]
        return by_value, Regions(tuple(region for _, region in regions), tuple(order))

    @property
    def output_channels(self):
        return len(self.regions.regions) if self.regions else len(self.labels)

    @property
    def network_class(self):
        name = self.config["architecture"].get("network_class_name") \
            if isinstance(self.config.get("architecture"), dict) else None
        if not isinstance(name, str):
            raise NNUNetError("{}: configuration {}'s architecture has no network_class_name".format(
                self.where, self.configuration_name))
        return name

    def steps(self, mirror_axes, folds, tile_step_size):
        """The reproduced pipeline, one line per step, for the model report."""
        normalise = ", ".join("{} {}{}".format(name, scheme, " (non-zero mask)" if mask else "")
                              for name, scheme, mask in zip(self.channels, self.schemes, self.use_mask))
        data, back = self.data_resampling, self.output_resampling
        coarse = ", order {} along a coarse axis".format(data["order_z"]) if data["force_separate_z"] is not False \
            else ""
        return ["file's voxel order (k, j, i), as nnU-Net reads it with SimpleITK",
                "transpose {}".format(self.transpose_forward),
                "crop to the non-zero voxels (holes filled)",
                "normalise: " + normalise,
                "resample to {} mm in the transposed axis order (spline order {}{})".format(
                    "x".join("{:g}".format(s) for s in self.spacing), data["order"], coarse),
                "patch {} tile step {:g}, Gaussian importance; mirroring {}; folds {}".format(
                    "x".join(str(s) for s in self.patch_size), tile_step_size,
                    "along axes {}".format(list(mirror_axes)) if mirror_axes else "off", ", ".join(folds)),
                "logits back to the cropped grid (order {}), {}".format(
                    back["order"], "sigmoid, every region 0 outside the crop" if self.regions
                    else "softmax, background outside the crop"),
                "transpose back {}".format(self.transpose_backward)]


def architecture_from_old_plans(config, where):
    """The ``architecture`` entry of plans written before nnU-Net 2.4 (TotalSegmentator's, for one), built as
    nnU-Net's ``ConfigurationManager`` rebuilds it from ``UNet_class_name`` and the stage settings."""
    name = config["UNet_class_name"]
    blocks = {"PlainConvUNet": "n_conv_per_stage", "ResidualEncoderUNet": "n_blocks_per_stage"}
    if name not in blocks:
        raise NNUNetError("{}: old-format plans with UNet_class_name {}; only PlainConvUNet and ResidualEncoderUNet "
                          "are rebuilt".format(where, name))
    try:
        stages = len(config["n_conv_per_stage_encoder"])
        dims = len(config["patch_size"])
        kwargs = {
            "n_stages": stages,
            "features_per_stage": [min(config["UNet_base_num_features"] * 2 ** i, config["unet_max_num_features"])
                                   for i in range(stages)],
            "conv_op": "torch.nn.modules.conv.Conv{}d".format(dims),
            "kernel_sizes": config["conv_kernel_sizes"], "strides": config["pool_op_kernel_sizes"],
            blocks[name]: config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm{}d".format(dims),
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    except KeyError as error:
        raise NNUNetError("{}: old-format plans without {}".format(where, error))
    return {"network_class_name": NETWORK_PACKAGE + "unet." + name, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


# -------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_allow_list():
    """The plain-data globals nnU-Net's checkpoints pickle besides tensors: numpy scalars and dtypes."""
    try:
        from numpy._core.multiarray import scalar  # numpy 2
    except ImportError:
        from numpy.core.multiarray import scalar
    # a checkpoint names the scalar by the path of the numpy that wrote it: both, whichever numpy reads it
    allowed = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in NUMERIC_DTYPES if hasattr(dtypes, name)]
    return allowed


def load_nnunet_checkpoint(path, trust_checkpoint=False):
    """A checkpoint dict: weights only plus the numpy allow-list; anything else only with ``trust_checkpoint``; a
    plain Python pickle never (:func:`~.models.refuse_plain_pickle`)."""
    refuse_plain_pickle(path)
    try:
        with torch.serialization.safe_globals(checkpoint_allow_list()):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        if "Weights only load failed" not in text:
            raise NNUNetError("cannot read {} as a PyTorch checkpoint: {}".format(path, text.splitlines()[0]))
        if not trust_checkpoint:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            raise UnsafeCheckpoint("refusing to load {}: it contains {}, which is neither weights nor the numpy "
                                   "scalars nnU-Net stores; loading it needs arbitrary unpickling, which can run code "
                                   "stored in the file; {}".format(path, found.group(1) if found else "other objects",
                                                                   TRUST_HINT))
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise NNUNetError("{} is not an nnU-Net checkpoint (no network_weights)".format(path))
    return checkpoint


# ------------------------------------------------------------------------------------------------------ network
def _torch_class(name, where):
    if not isinstance(name, str) or not name.startswith("torch.nn."):
        raise NNUNetError("{}: {!r} is not a torch.nn class; only torch.nn classes are built".format(where, name))
    module_name, _, class_name = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise NNUNetError("{}: {} not found in this PyTorch".format(where, name))
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise NNUNetError("{}: {} is not a torch.nn.Module class".format(where, name))
    return found


def _network_class(name, where):
    """The class ``name`` names; where it moved inside the package (as nnU-Net also allows), found by its name."""
    module_name, _, class_name = name.rpartition(".")
    try:
        importlib.import_module(NETWORK_PACKAGE + "unet")
    except ImportError as error:
        raise NNUNetError("{}: cannot import dynamic-network-architectures ({}); install it with pip install "
                          "--no-deps dynamic-network-architectures==0.4.4".format(where, error))
    candidates = [module_name] + [NETWORK_PACKAGE + module for module in ("unet", "resnet", "vgg")]
    for candidate in candidates:
        try:
            found = getattr(importlib.import_module(candidate), class_name, None)
        except ImportError:
            continue
        if isinstance(found, type) and issubclass(found, torch.nn.Module):
            return found
    raise NNUNetError("{}: network class {} not found in dynamic-network-architectures".format(where, name))


def build_nnunet_network(plans):
    """The network the plans declare, built as nnU-Net's ``get_network_from_plans`` builds it (no deep
    supervision); classes only from ``dynamic_network_architectures.architectures`` and ``torch.nn``."""
    where = "{} ({} architecture)".format(plans.folder / "plans.json", plans.configuration_name)
    architecture = plans.config.get("architecture")
    if not isinstance(architecture, dict):
        raise NNUNetError("{}: no architecture (plans from nnU-Net before v2.4 are not supported)".format(where))
    name = plans.network_class
    if not name.startswith(NETWORK_PACKAGE):
        raise NNUNetError("{}: network class {} is not from {}; only those are built".format(
            where, name, NETWORK_PACKAGE.rstrip(".")))
    network_class = _network_class(name, where)
    kwargs = dict(architecture.get("arch_kwargs", {}))
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _torch_class(kwargs[key], where)
    kwargs["deep_supervision"] = False
    try:
        return network_class(input_channels=len(plans.channels), num_classes=plans.output_channels, **kwargs)
    except TypeError as error:
        raise NNUNetError("{}: cannot build {}: {}".format(where, network_class.__name__, error))


class NNUNetEnsemble(torch.nn.Module):
    """The folds' networks on one tile: their logits averaged, each averaged over the mirrored tiles.

    nnU-Net averages the mirrored predictions per tile and the folds' aggregated logits; the aggregation is linear
    with the same weights for every fold, so averaging the folds per tile gives the same logits.
    """

    def __init__(self, networks, mirror_axes=()):
        super().__init__()
        self.folds = torch.nn.ModuleList(networks)
        self.mirror_axes = tuple(int(a) for a in mirror_axes)

    def flips(self):
        axes = [axis + 2 for axis in self.mirror_axes]
        return [()] + [combo for count in range(1, len(axes) + 1) for combo in itertools.combinations(axes, count)]

    def fold_outputs(self, tiles):
        """Each fold's logits on the tiles, averaged over the mirrored tiles as nnU-Net does."""
        flips = self.flips()
        per_fold = []
        for network in self.folds:
            total = 0.0
            for axes in flips:
                outputs = network(torch.flip(tiles, axes) if axes else tiles)
                total = total + (torch.flip(outputs, axes) if axes else outputs)
            per_fold.append(total / len(flips))
        return per_fold

    def forward(self, tiles):
        per_fold = self.fold_outputs(tiles)
        return sum(per_fold) / len(per_fold)


# ---------------------------------------------------------------------------------------------------- resampling
def new_shape(shape, spacing, target_spacing):
    """nnU-Net's ``compute_new_shape``."""
    return [int(round(s / t * n)) for s, t, n in zip(spacing, target_spacing, shape)]


def separate_axis(settings, spacing, target_spacing):
    """nnU-Net's ``determine_do_sep_z_and_axis``: the coarse axis resampled on its own, or None."""
    def lowres(values):
        axes = np.where(max(values) / np.array(values) == 1)[0]
        return int(axes[0]) if len(axes) == 1 else None

    def anisotropic(values):
        return max(values) / min(values) > settings["threshold"]

    force = settings["force_separate_z"]
    if force is not None:
        return lowres(spacing) if force else None
    if anisotropic(spacing):
        return lowres(spacing)
    if anisotropic(target_spacing):
        return lowres(target_spacing)
    return None


def spline_matrix(size_in, size_out, order):
    """skimage ``resize`` along one axis (scipy ``zoom``, ``grid_mode``, edge mode) as a (out, in) matrix."""
    from scipy import ndimage
    if size_in == size_out:
        return np.eye(size_in)
    identity = np.eye(size_in)
    return ndimage.zoom(identity, (size_out / size_in, 1.0), order=order, mode="nearest", grid_mode=True)


def coordinate_matrix(size_in, size_out, order):
    """nnU-Net's ``map_coordinates`` along the coarse axis (centres aligned, nearest edges) as a matrix."""
    from scipy import ndimage
    scale = float(size_in) / size_out
    rows, columns = np.mgrid[:size_out, :size_in]
    coordinates = np.array([scale * (rows + 0.5) - 0.5, columns.astype(np.float64)])
    return ndimage.map_coordinates(np.eye(size_in), coordinates, order=order, mode="nearest")


class Resampling:
    """nnU-Net's ``resample_data_or_seg`` from one shape to another, as matrices per axis (clipped as skimage
    clips each ``resize`` to its input's range)."""

    def __init__(self, shape_in, shape_out, settings, spacing, target_spacing):
        self.shape_in, self.shape_out = list(shape_in), list(shape_out)
        self.identity = self.shape_in == self.shape_out
        self.axis = separate_axis(settings, spacing, target_spacing)
        order, order_z = settings["order"], settings["order_z"]
        self.order, self.order_z = order, order_z
        self.matrices = []
        for axis, (size_in, size_out) in enumerate(zip(self.shape_in, self.shape_out)):
            if axis == self.axis:
                matrix = coordinate_matrix(size_in, size_out, order_z) if size_in != size_out else np.eye(size_in)
            else:
                matrix = spline_matrix(size_in, size_out, order)
            self.matrices.append(torch.from_numpy(matrix))

    def __call__(self, data):
        """(B, C, *shape_in) → (B, C, *shape_out)."""
        if self.identity:
            return data
        matrices = [m.to(device=data.device, dtype=data.dtype) for m in self.matrices]
        plane = [a for a in range(3) if a != self.axis]
        out = data
        for axis in plane:
            out = apply_along(out, matrices[axis], axis)
        clip_dims = tuple(a + 2 for a in plane)  # one resize per channel, or per slice along the coarse axis
        low = data.amin(dim=clip_dims, keepdim=True)
        high = data.amax(dim=clip_dims, keepdim=True)
        out = torch.maximum(torch.minimum(out, high), low)
        if self.axis is not None:
            out = apply_along(out, matrices[self.axis], self.axis)
        return out


    def reference(self, data, stored=np.float32):
        """The same resampling of the (detached) values as nnU-Net computes it, with scipy on float64 arrays
        (skimage's ``resize`` is scipy's ``zoom`` plus the clip) stored in the array type nnU-Net stores them in
        (numpy's rounding, not torch's: torch rounds float64 to float16 through float32): bit for bit, where the
        matrices differ from it in the last bits. Returned in ``data``'s type."""
        from scipy import ndimage
        array = data.detach().cpu().double().numpy()
        out = np.empty(array.shape[:2] + tuple(self.shape_out), dtype=stored)
        for index in np.ndindex(*array.shape[:2]):
            out[index] = self._reference_one(array[index], ndimage)
        return torch.from_numpy(out).to(device=data.device, dtype=data.dtype)

    def _reference_one(self, image, ndimage):
        def resize(plane, shape):
            zoom = [1.0 / (size_in / size_out) for size_in, size_out in zip(plane.shape, shape)]
            zoomed = ndimage.zoom(plane, zoom, order=self.order, mode="nearest", cval=0.0, grid_mode=True)
            return np.clip(zoomed, plane.min(), plane.max())

        if self.axis is None:
            return resize(image, self.shape_out)
        plane_shape = [n for a, n in enumerate(self.shape_out) if a != self.axis]
        moved = np.moveaxis(image, self.axis, 0)
        planes = np.moveaxis(np.stack([resize(plane, plane_shape) for plane in moved]), 0, self.axis)
        if self.shape_in[self.axis] == self.shape_out[self.axis]:
            return planes
        scales = [float(size_in) / size_out for size_in, size_out in zip(planes.shape, self.shape_out)]
        grid = np.mgrid[tuple(slice(0, n) for n in self.shape_out)].astype(np.float64)
        coordinates = np.array([scale * (axis_grid + 0.5) - 0.5 for scale, axis_grid in zip(scales, grid)])
        return ndimage.map_coordinates(planes, coordinates, order=self.order_z, mode="nearest")


def apply_along(data, matrix, axis):
    """``matrix`` (out, in) applied along spatial ``axis`` of (B, C, X, Y, Z) data."""
    moved = data.movedim(axis + 2, -1)
    return (moved @ matrix.T).movedim(-1, axis + 2)


# ----------------------------------------------------------------------------------------------- normalisation
def normalise(data, plans, mask, rounding=True):
    """Each channel of (1, C, *spatial) by its scheme; ``mask`` (spatial, bool) is nnU-Net's ``seg >= 0``."""
    channels = []
    for channel, (scheme, use_mask) in enumerate(zip(plans.schemes, plans.use_mask)):
        image = data[:, channel]
        if scheme == "ZScoreNormalization":
            values = image[:, mask] if use_mask else image
            mean, std = numpy_statistics(values) if rounding else (values.mean(), values.std(unbiased=False))
            scaled = (image - mean) / torch.clamp(std, min=EPSILON)
            image = torch.where(mask, scaled, image) if use_mask else scaled
        elif scheme == "CTNormalization":
            properties = plans.intensity[str(channel)]
            image = torch.clamp(image, float(properties["percentile_00_5"]), float(properties["percentile_99_5"]))
            image = (image - float(properties["mean"])) / max(float(properties["std"]), EPSILON)
        elif scheme == "RescaleTo01Normalization":
            image = image - image.min()
            image = image / torch.clamp(image.max(), min=EPSILON)
        elif scheme == "RGBTo01Normalization":
            image = image / 255.0
        channels.append(image)
    return torch.stack(channels, dim=1)


def numpy_statistics(values):
    """Mean and standard deviation with numpy's float32 values (nnU-Net computes them with numpy, whose summation
    order differs from torch's), and torch's gradient."""
    mean, std = values.mean(), values.std(unbiased=False)
    if values.dtype != torch.float32:
        return mean, std
    array = values.detach().cpu().numpy()
    return (torch.tensor(float(array.mean()), dtype=values.dtype, device=values.device) + (mean - mean.detach()),
            torch.tensor(float(array.std()), dtype=values.dtype, device=values.device) + (std - std.detach()))


def nonzero_box(data):
    """nnU-Net's ``crop_to_nonzero``: the box (start, stop per axis) of the non-zero voxels of any channel, holes
    filled, and the filled mask inside it."""
    from scipy.ndimage import binary_fill_holes
    mask = binary_fill_holes((data.detach()[0] != 0).any(dim=0).cpu().numpy())
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append((int(present[0]), int(present[-1]) + 1) if present.size else (0, mask.shape[axis]))
    inside = mask[tuple(slice(a, b) for a, b in box)]
    return box, torch.from_numpy(inside).to(data.device)


# ------------------------------------------------------------------------------------------------------ model
class NNUNetModel(SegmentationModel):
    """An nnU-Net v2 trained model: nnU-Net's preprocessing, tiling, mirroring, fold ensemble and way back.

    ``nnunet_rounding``: the forward values carry nnU-Net's own rounding (default): its float16 sums, its numpy
    statistics and scipy resampling stored in float32 and float16, so the outputs equal nnU-Net's bit for bit up to
    the softmax; False gives the smooth function (the same maths without that rounding) whose gradient attacks
    use either way.
    """

    def __init__(self, network, description, plans, fold_names, tile_step_size=0.5, source=""):
        super().__init__(network, description, source=source)
        self.plans = plans
        self.tile_step_size = float(tile_step_size)
        self.nnunet_rounding = True
        self.fold_names = list(fold_names)
        # the voxel-to-RAS matrix of the file as nnU-Net reads it (nibabel's affine), where Slicer's reader stored
        # the volume in another voxel order (it reverses k of a left-handed file): then the file's order is used
        self.file_ijk_to_ras = None

    fixed_activation = True  # softmax, or sigmoid for regions, as nnU-Net's predictor applies them

    def pipeline_steps(self):
        return self.plans.steps(self.network.mirror_axes, self.fold_names, self.tile_step_size)

    def checked_outputs(self, network_outputs, plan):
        return self.restore(network_outputs, plan)  # the logits become probabilities on the way back

    # -------------------------------------------------------------------------------------------- grid order
    def _file_order(self, volume):
        """Network-convention (B, C, x, y, z) → the file's (B, C, k, j, i), and the spacing along k, j, i (None
        where unknown: the volume is then taken to be at the network's spacing)."""
        orientation = self.input_orientation
        if orientation is None:  # only a grid matrix known, if any: its axes are taken as the file's
            spacing = grid_spacing(self.input_affine)
            return volume.permute(0, 1, 4, 3, 2), None if spacing is None else list(spacing)[::-1]
        spacing_ijk = np.linalg.norm(np.asarray(self.input_ijk_to_ras)[:3, :3], axis=0)
        ijk = orientation.tensor_to_ijk(volume)
        reversed_axes = self._reversed_axes()
        if reversed_axes:
            ijk = torch.flip(ijk, [axis + 2 for axis in reversed_axes])
        return ijk.permute(0, 1, 4, 3, 2), [float(s) for s in spacing_ijk[::-1]]

    def _reversed_axes(self):
        """The volume's i, j, k axes that run opposite to the file's (``file_ijk_to_ras``), as Slicer's reader
        stores a left-handed file with k reversed."""
        if self.file_ijk_to_ras is None or self.input_ijk_to_ras is None:
            return []
        mine = np.asarray(self.input_ijk_to_ras, dtype=np.float64)[:3, :3]
        theirs = np.asarray(self.file_ijk_to_ras, dtype=np.float64)[:3, :3]
        return [axis for axis in range(3) if np.allclose(mine[:, axis], -theirs[:, axis], atol=1e-4)
                and not np.allclose(mine[:, axis], theirs[:, axis], atol=1e-4)]

    def _network_order(self, outputs):
        """The inverse of :meth:`_file_order` for outputs."""
        ijk = outputs.permute(0, 1, 4, 3, 2)
        reversed_axes = self._reversed_axes()
        if reversed_axes:
            ijk = torch.flip(ijk, [axis + 2 for axis in reversed_axes])
        orientation = self.input_orientation
        return ijk if orientation is None else orientation.tensor_from_ijk(ijk)

    # ------------------------------------------------------------------------------------------------ tiles
    def _tile_precision(self, device):
        """nnU-Net's predictor runs its network under float16 autocast on CUDA: so do the forward values here when
        no gradient is taken (gradients stay in float32: per-voxel loss gradients underflow in float16)."""
        if device.type == "cuda" and not torch.is_grad_enabled():
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        if self.amp:
            return torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda"
                                  else torch.bfloat16)
        return contextlib.nullcontext()

    def run_network(self, inputs):
        with self._tile_precision(inputs.device):
            outputs = self.network(inputs)
        return outputs.to(inputs.dtype)

    def infer(self, inputs):
        """The folds' tiled logits, with the values nnU-Net's predictor computes and float32 gradients.

        nnU-Net sums the weighted tiles, the weights and the folds' logits in float16 (where only tiny Gaussian
        weights reach a voxel, near the corners, that moves logits by up to 0.5). The forward values repeat that
        arithmetic tile by tile (the weighting in float16 too where the network ran in float16, as on CUDA); the
        gradient is the one of the same sums in float32 (rounding has none).
        """
        plan = window_plan(inputs.shape[2:], self.description.window, inputs.device, inputs.dtype)
        padded = plan.pad_input(inputs)
        emulate = self.nnunet_rounding
        weights16 = plan.importance.half()
        exact, halves = None, None
        count16 = torch.zeros(plan.padded_size, dtype=torch.half, device=inputs.device)
        for window_slice in plan.slices:
            index = (slice(None), slice(None)) + window_slice
            with self._tile_precision(inputs.device):
                raw = self.network.fold_outputs(padded[index])
            per_fold = [outputs.to(inputs.dtype) for outputs in raw]
            weighted = sum(per_fold) / len(per_fold) * plan.importance
            if exact is None:
                shape = weighted.shape[:2] + tuple(plan.padded_size)
                exact = weighted.new_zeros(shape)
                halves = [torch.zeros(shape, dtype=torch.half, device=inputs.device) for _ in raw] if emulate else []
            exact[index] += weighted
            if emulate:
                count16[window_slice] += weights16
                for half, outputs in zip(halves, raw):
                    half[index] += outputs.detach() * weights16  # float32 product on CPU, float16 under autocast
        exact = (exact / plan.count)[plan.crop]
        if not emulate:
            return exact
        folds16 = None
        for half in halves:
            logits = torch.div(half, count16)
            folds16 = logits if folds16 is None else folds16 + logits
        if len(halves) > 1:
            folds16 = folds16 / len(halves)
        return straight_through(exact, folds16[plan.crop])

    def prepare(self, volume):
        if volume.shape[0] != 1:
            raise InputError("an nnU-Net model takes one volume at a time, got a batch of {}".format(
                volume.shape[0]))
        if volume.shape[1] != len(self.plans.channels):
            raise InputError("the network takes {} input channel(s) ({}) but the volume has {}".format(
                len(self.plans.channels), ", ".join(self.plans.channels), volume.shape[1]))
        data, spacing = self._file_order(volume.to(self.device))
        forward = self.plans.transpose_forward
        data = data.permute(0, 1, *[a + 2 for a in forward])
        spacing = list(self.plans.spacing) if spacing is None else [spacing[a] for a in forward]
        full_shape = list(data.shape[2:])
        box, mask = nonzero_box(data)
        if not bool(mask.any()):
            raise InputError("the volume is all zeros: nnU-Net crops to the non-zero voxels, and none are left")
        data = data[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in box)]
        cropped_shape = list(data.shape[2:])
        data = normalise(data, self.plans, mask, self.nnunet_rounding)
        target = new_shape(cropped_shape, spacing, self.plans.spacing)
        resample = Resampling(cropped_shape, target, self.plans.data_resampling, spacing, self.plans.spacing)
        if not resample.identity:  # in float64, as nnU-Net resamples (its own values forward)
            resampled = resample(data.double()).to(data.dtype)
            data = straight_through(resampled, resample.reference(data)) if self.nnunet_rounding else resampled
        back = Resampling(target, cropped_shape, self.plans.output_resampling, self.plans.spacing, spacing)
        plan = {"device": volume.device, "network_size": tuple(target), "box": box, "full_shape": full_shape,
                "back": back}
        return data, plan

    def restore(self, outputs, plan):
        """Logits on the network grid → probabilities on the input's grid, as nnU-Net exports them."""
        back = plan["back"]
        resampled = back(outputs)
        if not back.identity and self.nnunet_rounding:  # nnU-Net: float16 logits, float64 maths, float16 out
            resampled = straight_through(resampled, back.reference(outputs, np.float16))
        regions = self.plans.regions is not None
        probabilities = torch.sigmoid(resampled) if regions else torch.softmax(resampled, dim=1)
        full = probabilities.new_zeros((1, probabilities.shape[1]) + tuple(plan["full_shape"]))
        if not regions:
            full[:, 0] = 1.0
        inside = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in plan["box"])
        full = _paste(full, probabilities, inside)
        backward = self.plans.transpose_backward
        full = full.permute(0, 1, *[a + 2 for a in backward])
        return self._network_order(full).to(plan["device"])


def _paste(full, part, inside):
    """``full`` with ``part`` at ``inside``, differentiable in ``part``."""
    full = full.clone()
    full[inside] = part
    return full


# ------------------------------------------------------------------------------------------------------ loading
def load_nnunet(folder, folds=None, mirroring=True, trust_checkpoint=False, tile_step_size=0.5):
    """An :class:`NNUNetModel` from a trained model folder (or a dataset folder holding one): ``folds`` (default:
    every ``fold_K`` with a final checkpoint), test-time ``mirroring`` as nnU-Net does by default."""
    trained = nnunet_folder(folder)
    if trained is None:
        raise NNUNetError("{} is not an nnU-Net trained model folder (plans.json, dataset.json and "
                          "fold_K/{})".format(folder, CHECKPOINT))
    available = _fold_names(trained)
    chosen = [str(f) for f in folds] if folds else available
    missing = [f for f in chosen if f not in available]
    if missing:
        raise NNUNetError("{}: no {} for fold(s) {} (folds with one: {})".format(
            trained, CHECKPOINT, ", ".join(missing), ", ".join(available)))
    if not 0 < float(tile_step_size) <= 1:
        raise NNUNetError("tile step size must lie in (0, 1], got {}".format(tile_step_size))
    # the configuration the folder name gives, checked before any checkpoint loads; the checkpoint's has the last word
    plans = NNUNetPlans(trained) if len(trained.name.split("__")) == 3 else None
    checkpoints = [load_nnunet_checkpoint(trained / "fold_{}".format(f) / CHECKPOINT, trust_checkpoint)
                   for f in chosen]
    configuration = checkpoints[0].get("init_args", {}).get("configuration")
    if plans is None or (configuration and configuration != plans.configuration_name):
        plans = NNUNetPlans(trained, configuration)
    networks = []
    for fold, checkpoint in zip(chosen, checkpoints):
        network = build_nnunet_network(plans)
        try:
            network.load_state_dict(checkpoint["network_weights"])
        except RuntimeError as error:
            raise NNUNetError("fold {}: the weights do not fit the network the plans declare (trainer {}): {}".format(
                fold, checkpoint.get("trainer_name"), " ".join(str(error).split())[:300]))
        networks.append(network.eval())
    mirror_axes = checkpoints[0].get("inference_allowed_mirroring_axes") if mirroring else None
    ensemble = NNUNetEnsemble(networks, mirror_axes or ())
    labels = [Label(value, name, PALETTE[value % len(PALETTE)]) for value, name in enumerate(plans.labels)]
    description = ModelDescription(
        name=trained.parent.name if trained.parent.name.startswith("Dataset") else trained.name,
        labels=labels, output_activation=plans.regions or "softmax", in_channels=len(plans.channels),
        intensity={"type": "nnU-Net", "schemes": plans.schemes, "use_mask_for_norm": plans.use_mask},
        window={"roi_size": plans.patch_size, "style": "nnunet", "tile_step_size": float(tile_step_size)},
        notes="nnU-Net v2 {} ({} configuration)".format(trained.name, plans.configuration_name))
    model = NNUNetModel(ensemble, description, plans, chosen, tile_step_size,
                        source="nnU-Net v2 folder {}".format(trained))
    model.load_notes.append("nnU-Net v2, folds {}, test-time mirroring {}".format(
        ", ".join(chosen), "along axes {}".format(list(ensemble.mirror_axes)) if ensemble.mirror_axes else "off"))
    return model
