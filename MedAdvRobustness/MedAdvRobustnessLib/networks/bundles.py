"""MONAI bundles (folder or zip) as a :class:`~.models.SegmentationModel`, read with MONAI's ``ConfigParser``.

From ``configs/inference.json`` (or ``.yaml``): ``network_def`` is instantiated by the parser; the
``preprocessing`` transforms that act on the image are read (their arguments resolved by the parser, defaults
from the transform's signature) and mapped, transform by transform, onto the differentiable preprocessing
(intensity scaling and normalisation, spacing, foreground and centre crop, padding, resizing); a transform
without a twin is refused, or with ``skip_untwinned`` left out and named in the model's notes; the ``inferer``
(``SlidingWindowInferer``) becomes the window; an ``Activations`` transform in ``postprocessing`` says whether the
outputs are softmax logits or sigmoid logits. ``configs/metadata.json`` gives the label names (the channel
definition of the network's output) and the input channels. Weights: ``models/model.pt`` (a state dict, loaded
with ``weights_only=True``) or ``models/model.ts`` (TorchScript).

A bundle config is code: ``$`` expressions run Python and ``_target_`` can name any callable. Without
``trust_checkpoint`` only configs whose every item this reads is plain data, with targets among MONAI's
components or ``torch.nn``, are accepted; the one expression accepted is a comparison of x with a number
(``"$lambda x: x > 1"``, a ``CropForeground`` ``select_fn``), read as written (:data:`AS_WRITTEN`).
"""
import inspect
import json
import pydoc
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import InputError
from .models import (TRUST_HINT, ModelDescription, SegmentationModel, _torchscript, network_with_weights,
                     parse_labels)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# Where the components a bundle (or an Auto3DSeg network config) may name without trust come from: networks,
# transforms, inferers and torch.nn; not monai.bundle or monai.apps, which download, write files or run configs.
SAFE_MODULES = ("monai.networks.", "monai.transforms.", "monai.inferers.", "torch.nn.")
# Transforms that do not change what the network sees in the network convention (loading, channel first, types).
NEUTRAL = {"LoadImage", "EnsureChannelFirst", "AsChannelFirst", "AddChannel", "EnsureType", "ToTensor",
           "CastToType", "ToDevice", "Identity", "CopyItems", "DeleteItems", "SelectItems", "SaveImage",
           "ToNumpy", "FromMetaTensor", "ToMetaTensor", "EnsureTyped"}


def bundle_root(folder):
    """The bundle folder (holding ``configs/inference.*``): ``folder`` or its only subfolder; None if neither."""
    folder = Path(folder)
    candidates = [folder] + sorted(path for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
    for candidate in candidates:
        if any((candidate / "configs" / name).is_file() for name in CONFIG_NAMES):
            return candidate
    return None


def is_bundle_zip(path):
    """A zip archive with ``configs/inference.*`` (at its top or in one folder); TorchScript files, zips too,
    have none."""
    if not zipfile.is_zipfile(str(path)):
        return False
    with zipfile.ZipFile(str(path)) as archive:
        names = archive.namelist()
    return any(re.search(r"(^|/)configs/inference\.(json|ya?ml)$", name) for name in names)


def load_bundle(path, trust_checkpoint=False, skip_untwinned=False):
    """A :class:`~.models.SegmentationModel` from a bundle folder or zip.

    A preprocessing transform without a differentiable twin is refused (InputError naming it); with
    ``skip_untwinned`` it is left out instead, and the model's ``load_notes`` (the report's notes) and description
    notes name it: the attacked pipeline then differs from the bundle's. A twinned transform with a setting that is
    not reproduced is refused either way."""
    path = Path(path)
    if path.is_dir():
        root = bundle_root(path)
        if root is None:
            raise InputError("{} is not a MONAI bundle (no configs/inference.json)".format(path))
        return _load_root(root, trust_checkpoint, str(path), skip_untwinned)
    scratch = Path(tempfile.mkdtemp(prefix="medadv-bundle-"))
    try:
        _extract(path, scratch)
        root = bundle_root(scratch)
        if root is None:
            raise InputError("{} is not a MONAI bundle (no configs/inference.json)".format(path))
        return _load_root(root, trust_checkpoint, str(path), skip_untwinned)
    finally:
        shutil.rmtree(str(scratch), ignore_errors=True)


def _extract(archive_path, target):
    """Unzip, refusing members that would land outside ``target``."""
    with zipfile.ZipFile(str(archive_path)) as archive:
        for member in archive.infolist():
            name = PurePosixPath(member.filename)
            if name.is_absolute() or ".." in name.parts:
                raise InputError("{} holds an unsafe path {!r}".format(archive_path, member.filename))
        archive.extractall(str(target))


def _load_root(root, trust_checkpoint, where, skip_untwinned=False):
    from monai.bundle import ConfigParser
    config_file = next(root / "configs" / name for name in CONFIG_NAMES if (root / "configs" / name).is_file())
    metadata_file = root / "configs" / "metadata.json"
    metadata = {}
    if metadata_file.is_file():
        try:
            metadata = json.loads(metadata_file.read_text())
        except ValueError as error:
            raise InputError("cannot read {}: {}".format(metadata_file, error))
    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
        if metadata:
            parser.read_meta(str(metadata_file))
        parser["bundle_root"] = str(root)
        parser.parse()
    except Exception as error:
        raise InputError("cannot read {}: {}".format(config_file, error))
    config = parser.get()
    reader = _Reader(parser, trust_checkpoint, where)
    notes = []
    inputs_format, outputs_format = _data_format(metadata)
    image_key = next(iter(inputs_format), "image")
    reader.output_key = next(iter(outputs_format), "pred")

    network = _bundle_network(root, parser, config, reader, trust_checkpoint, where)
    description = ModelDescription(name=str(metadata.get("name") or root.name), output_activation=None)
    if inputs_format.get(image_key, {}).get("num_channels"):
        description.in_channels = int(inputs_format[image_key]["num_channels"])
    raw = parser.get("preprocessing")
    if isinstance(raw, dict) and raw.get("lazy") in (True, "true", "True"):
        raise InputError("bundle {}: its preprocessing Compose(lazy=True) merges the spatial transforms into one "
                         "resampling, which is not reproduced (each transform is, one after the other)".format(where))
    transforms = reader.transforms("preprocessing", image_key, MAPPED)
    names = [name for name, _ in transforms]
    if "Orientation" not in names:
        raise InputError("bundle {}: its preprocessing has no Orientation(d), so its network sees the file's own "
                         "voxel order, which is not reproduced (here the network gets RAS)".format(where))
    before = [name for name in names[:names.index("Orientation")] if name in SPATIAL]
    if before:
        raise InputError("bundle {}: its preprocessing runs {} before Orientation(d), in the file's own voxel order, "
                         "which is not reproduced (the steps run on the RAS-oriented volume here); put "
                         "Orientation(d) first".format(where, ", ".join(before)))
    skipped = [name for name, args in transforms if args is None and name not in NEUTRAL] if skip_untwinned else []
    steps = [step for name, args in transforms if name not in skipped for step in _checked_twin(name, args, where)]
    if skipped:
        notes.append("preprocessing transform{} {} skipped (no differentiable twin; skip_untwinned): the attacked "
                     "pipeline differs from the bundle's".format("s" if len(skipped) > 1 else "",
                                                                 ", ".join(skipped)))
    pooled = [name for name, args in transforms if name in POOLED_BY_DEFAULT and args is not None
              and str(args.get("channel_wise", False)).lower() != "true"]
    if description.in_channels > 1 and pooled:
        raise InputError("bundle {}: {} with channel_wise=False takes its statistics over all {} channels together, "
                         "which is not reproduced (its twin works channel by channel)".format(
                             where, pooled[0], description.in_channels))
    if description.in_channels == 1:  # one channel (the volume is checked against it): per channel is the same
        for step in steps:
            if "intensity" in step and step["intensity"].get("channel_wise") is False:
                del step["intensity"]["channel_wise"]
    description.preprocessing = steps
    intensity = [step["intensity"] for step in steps if "intensity" in step]
    description.intensity = intensity[0] if len(intensity) == 1 else (intensity or {"type": "none"})
    description.spacing = next((step["spacing"] for step in steps if "spacing" in step), None)
    description.window = _window(reader, config, notes)
    activation, description.activation_after_inference = _activation(reader)
    dropped = _untwinned_postprocessing(reader)
    if dropped and not skip_untwinned:
        raise InputError("bundle {}: its postprocessing runs {}, which changes the labels and is not reproduced "
                         "(reproduced are Activations, Invert, AsDiscrete by argmax or at threshold 0.5, and loading, "
                         "type and saving transforms); skip_untwinned=True (--skip-untwinned) predicts without "
                         "it".format(where, ", ".join(dropped)))
    description.output_activation = activation
    description.labels = _labels(outputs_format, activation, where)
    description.task = _task(outputs_format.get(reader.output_key))
    version = metadata.get("version")
    description.notes = "MONAI bundle {}{}".format(description.name, " version {}".format(version) if version else "")
    if skipped:
        description.notes += "; without its preprocessing transform{} {} (no twin, skipped)".format(
            "s" if len(skipped) > 1 else "", ", ".join(skipped))
    if dropped:
        plural, listed = "s" if len(dropped) > 1 else "", ", ".join(dropped)
        notes.append("postprocessing transform{} {} skipped (not reproduced; skip_untwinned): the labels may differ "
                     "from the bundle's".format(plural, listed))
        description.notes += "; without its postprocessing transform{} {} (not reproduced, skipped)".format(
            plural, listed)
    description.steps()  # every step can run (InputError naming it otherwise)
    model = SegmentationModel(network, description, source="MONAI bundle {}".format(where))
    model.load_notes = notes
    return model


def _bundle_network(root, parser, config, reader, trust_checkpoint, where):
    weights, script = root / "models" / "model.pt", root / "models" / "model.ts"
    if weights.is_file() and "network_def" in config:
        reader.check("network_def")
        try:
            network = parser.get_parsed_content("network_def")
        except Exception as error:
            raise InputError("cannot build network_def of bundle {}: {}".format(where, error))
        if not isinstance(network, torch.nn.Module):
            raise InputError("network_def of bundle {} is not a network".format(where))
        return network_with_weights(network, weights, trust_checkpoint)
    if script.is_file():
        network = _torchscript(script)
        if network is None:
            raise InputError("{} of bundle {} is not TorchScript".format(script.name, where))
        return network
    if weights.is_file():
        return network_with_weights(None, weights, trust_checkpoint)
    raise InputError("bundle {} has neither models/model.pt (with network_def) nor models/model.ts".format(where))


class _Reader:
    """Resolves config items with the parser once they are known to be plain data (or the bundle is trusted)."""

    def __init__(self, parser, trusted, where):
        self.parser, self.trusted, self.where = parser, trusted, where
        self.output_key = "pred"

    def check(self, item_id):
        if self.trusted:
            return
        problems = _unsafe(self.parser, item_id)
        if problems:
            raise InputError("bundle {}: {} runs code where this tool reads it ({}); {}".format(
                self.where, item_id, "; ".join(problems[:3]), TRUST_HINT))

    def component(self, item_id):
        """(class name, arguments with the class's defaults) of a ``_target_`` item, or None."""
        raw = self.parser.get(item_id)
        if not isinstance(raw, dict) or "_target_" not in raw or raw.get("_disabled_") in (True, "true", "True"):
            return None
        self.check(item_id)
        try:
            item = self.parser.get_parsed_content(item_id, instantiate=False)
            module_name = item.resolve_module_name()
            args = item.resolve_args()
        except Exception as error:
            raise InputError("bundle {}: cannot read {}: {}".format(self.where, item_id, error))
        target = pydoc.locate(module_name) if isinstance(module_name, str) else module_name
        defaults = {}
        try:
            for name, parameter in inspect.signature(target).parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    defaults[name] = getattr(parameter.default, "value", parameter.default)
        except (TypeError, ValueError):
            pass
        defaults.update(args)
        name = getattr(target, "__name__", str(module_name).rsplit(".", 1)[-1])
        return name, defaults

    def transforms(self, item_id, image_key, wanted):
        """(name, args) for each transform of a ``Compose`` (or list) at ``item_id``; args (resolved) only for the
        ``wanted`` names that act on ``image_key``, None for the others (never resolved: nothing runs)."""
        raw = self.parser.get(item_id)
        if raw is None:
            return []
        if isinstance(raw, dict) and "transforms" in raw:
            list_id, items = item_id + "::transforms", raw["transforms"]
        else:
            list_id, items = item_id, raw
        if isinstance(items, str) and items.startswith("@"):
            list_id = items[1:].replace("#", "::")
            items = self.parser.get(list_id)
        if isinstance(items, dict) and "_target_" in items:
            list_id, items = None, [items]
            ids = [item_id]
        elif isinstance(items, list):
            ids = ["{}::{}".format(list_id, index) for index in range(len(items))]
        else:
            raise InputError("bundle {}: {} is not a list of transforms this tool can read; give a config whose "
                             "{} lists its transforms".format(self.where, item_id, item_id))
        found = []
        for transform_id, item in zip(ids, items):
            if not isinstance(item, dict) or "_target_" not in item or item.get("_disabled_") in (True, "true"):
                continue
            name = transform_name(item["_target_"])
            if name not in wanted:
                found.append((name, None))
                continue
            raw_settings = {setting: self.raw(item[setting]) for setting in AS_WRITTEN.get(name, ()) if setting in item}
            if "select_fn" in raw_settings:  # refused by name before anything is resolved
                select_rule(raw_settings["select_fn"], self.where)
            component = self.component(transform_id)
            if component is None:
                continue
            _, args = component
            args.update(raw_settings)
            keys = args.get("keys")
            if keys is not None:
                keys = [keys] if isinstance(keys, str) else list(keys)
                if image_key not in keys:
                    continue
            found.append((name, args))
        return found


    def raw(self, value):
        """A config value as written, following ``@`` references to the items they name (not resolved)."""
        for _ in range(10):
            if not (isinstance(value, str) and value.startswith("@")):
                break
            value = self.parser.get(value[1:].replace("#", "::"))
        return value


# Settings read as the config writes them: the parser turns them into Python objects whose content is lost.
AS_WRITTEN = {"CropForeground": ("select_fn",)}


def transform_name(target):
    """``monai.transforms.ScaleIntensityRanged`` → ``ScaleIntensityRange``: the array transform's name."""
    name = str(target).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name[:-1] in KNOWN else name


POOLED_BY_DEFAULT = ("ScaleIntensity", "ScaleIntensityRangePercentiles")  # MONAI: channel_wise=False by default
MAPPED = {"Orientation", "Spacing", "ScaleIntensityRange", "ScaleIntensityRangePercentiles", "NormalizeIntensity",
          "ScaleIntensity", "CropForeground", "DivisiblePad", "SpatialPad", "CenterSpatialCrop", "Resize"}
# Resize modes: MONAI's name -> torch's interpolate mode on a 3-D volume (MONAI's resolves_modes: linear is
# trilinear there); bicubic has no 3-D interpolate, and MONAI's Resize fails on it.
RESIZE_MODE_NAMES = {"linear": "trilinear", "bilinear": "trilinear", "trilinear": "trilinear", "area": "area",
                "nearest": "nearest", "nearest-exact": "nearest-exact"}
SIGNATURE_ARGS = {"keys", "allow_missing_keys", "lazy"}
KNOWN = NEUTRAL | MAPPED | {"Activations", "AsDiscrete", "Invert", "KeepLargestConnectedComponent"}
SPATIAL = {"Spacing", "CropForeground", "SpatialPad", "DivisiblePad", "Resize", "CenterSpatialCrop"}  # grid-bound


def _checked_twin(name, args, where):
    """:func:`_twin`, with arguments it cannot read (missing, of the wrong type or length) refused in one line."""
    try:
        return _twin(name, args, where)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as error:
        problem = "no {}".format(error) if isinstance(error, KeyError) else " ".join(str(error).split())[:200]
        raise InputError("bundle {}: preprocessing transform {} has arguments that cannot be read ({}): {}".format(
            where, name, problem, {key: value for key, value in (args or {}).items()}))


def _twin(name, args, where):
    """The steps (:mod:`.steps`) that reproduce transform ``name`` of a bundle's preprocessing: none for loading and
    type transforms; InputError for a transform, or a setting, this cannot reproduce exactly."""
    if name in NEUTRAL:
        return []
    if args is None:
        raise InputError("bundle {}: preprocessing transform {} has no differentiable twin here, so the attacked "
                         "pipeline would differ from the bundle's; reproduced are {}; skip_untwinned=True loads the "
                         "bundle without it (named in the model's notes)".format(
                             where, name, ", ".join(sorted(MAPPED))))

    def refuse(setting):
        raise InputError("bundle {}: {}({}) is not reproduced".format(where, name, setting))

    def first(value):  # a dictionary transform may give one value per key: this image is the only key here
        return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
    if name == "Orientation":
        if str(args.get("axcodes", "RAS")).upper() != "RAS":
            refuse("axcodes={}".format(args.get("axcodes")))
        return []  # the network convention is RAS (MONAI's Orientation("RAS"), tested in test_network_convention)
    if name == "Spacing":
        if str(args.get("diagonal", False)).lower() != "false":
            refuse("diagonal={}".format(args.get("diagonal")))
        if str(args.get("recompute_affine", False)).lower() != "false":
            refuse("recompute_affine={}".format(args.get("recompute_affine")))
        pixdim = args["pixdim"]
        pixdim = [float(v) for v in (pixdim if isinstance(pixdim, (list, tuple)) else [pixdim])]
        pixdim += pixdim[-1:] * (3 - len(pixdim))  # as MONAI: a short pixdim goes on with its last value
        if min(pixdim[:3]) <= 0:
            refuse("pixdim={}".format(args["pixdim"]))
        mode = str(first(args.get("mode", "bilinear"))).lower()
        if mode not in ("bilinear", "nearest"):  # an integer: scipy's spline interpolation
            refuse("mode={}".format(mode))
        padding = str(first(args.get("padding_mode", "border"))).lower()
        if padding not in ("border", "zeros", "reflection"):
            refuse("padding_mode={}".format(padding))
        flags = {}
        for setting in ("align_corners", "scale_extent"):
            value = first(args.get(setting, False))
            if str(value).lower() not in ("true", "false"):
                refuse("{}={}".format(setting, value))
            flags[setting] = str(value).lower() == "true"
        dtype = _dtype_name(first(args.get("dtype", "float64")))
        if dtype not in ("float32", "float64", None):
            refuse("dtype={}".format(dtype))
        # Invertd(nearest_interp=False) inverts with the recorded mode, padding_mode and align_corners
        step = {"spacing": pixdim[:3], "mode": mode, "padding_mode": padding, "back": "same"}
        step.update(flags)
        # which voxel a nearest tie picks, and the float noise of a bilinear resampling (whose values medadv takes
        # from MONAI's own resampling), depend on the dtype MONAI computes in
        step["dtype"] = dtype or "float32"  # None: the input's, float32 after loading
        for bound in ("min_pixdim", "max_pixdim"):
            if args.get(bound) is not None:  # as MONAI: one number is the first axis's bound, the others the target's
                value = list(args[bound]) if isinstance(args[bound], (list, tuple)) else [args[bound]]
                step[bound] = ([None if v is None else float(v) for v in value] + [None] * 3)[:3]
        return [step]
    if name == "ScaleIntensityRange":
        if float(args["a_min"]) == float(args["a_max"]):  # MONAI then only shifts the intensities
            refuse("a_min=a_max={}".format(args["a_min"]))
        low, high = _number(args.get("b_min")), _number(args.get("b_max"))
        if bool(args.get("clip", False)) and low is not None and high is not None and low > high:
            refuse("b_min={} > b_max={} with clip=True".format(low, high))  # MONAI's clamp then gives b_max
        return [{"intensity": {"type": "range", "a_min": float(args["a_min"]), "a_max": float(args["a_max"]),
                               "b_min": _number(args.get("b_min")), "b_max": _number(args.get("b_max")),
                               "clip": bool(args.get("clip", False))}}]
    if name == "ScaleIntensityRangePercentiles":
        if args.get("relative"):
            refuse("relative=True")
        return [{"intensity": {"type": "percentile", "lower": float(args["lower"]), "upper": float(args["upper"]),
                               "b_min": _number(args.get("b_min")), "b_max": _number(args.get("b_max")),
                               "clip": bool(args.get("clip", False))}}]
    if name == "NormalizeIntensity":
        dtype = _dtype_name(args.get("dtype", "float32"))
        if dtype not in ("float32", "float64", None):  # the twin computes in the input's dtype
            refuse("dtype={}".format(dtype))
        channel_wise = str(args.get("channel_wise", False)).lower() == "true"
        fixed = {}
        for setting, key in (("subtrahend", "mean"), ("divisor", "std")):
            value = args.get(setting)
            if isinstance(value, (list, tuple)):  # one per channel: MONAI takes them with channel_wise only
                if not channel_wise or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in value):
                    refuse("{}={}, channel_wise={}".format(setting, value, channel_wise))
                fixed[key] = [float(v) for v in value]
            else:
                fixed[key] = _number(value)
        return [{"intensity": dict({"type": "zscore", "nonzero": bool(args.get("nonzero", False)),
                                    "channel_wise": channel_wise}, **fixed)}]
    if name == "ScaleIntensity":
        if args.get("factor") is not None:
            refuse("factor={}".format(args.get("factor")))
        if args.get("minv") is None and args.get("maxv") is None:  # MONAI's ScaleIntensity then changes nothing
            return []
        return [{"intensity": {"type": "minmax", "min": _number(args.get("minv", 0.0)),
                               "max": _number(args.get("maxv", 1.0))}}]
    if name == "CropForeground":
        compare, threshold = select_rule(args.get("select_fn"), where)
        if args.get("source_key") not in (None, args.get("keys"), [args.get("keys")], "image"):
            refuse("source_key={}".format(args.get("source_key")))
        if str(first(args.get("mode", "constant"))).lower() != "constant":  # where the box leaves the grid
            refuse("mode={}".format(args.get("mode")))
        k = args.get("k_divisible", 1)
        ks = list(k) if isinstance(k, (list, tuple)) else [k] * 3  # one number: every axis
        if len(ks) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ks):
            refuse("k_divisible={}".format(k))
        crop = {"threshold": threshold, "margin": args.get("margin", 0),
                "allow_smaller": bool(args.get("allow_smaller", False)),
                "outside": "zeros"}  # Invertd pads the crop back with zeros in every channel
        if compare != ">":
            crop["compare"] = compare
        channels = args.get("channel_indices")
        if channels is not None:
            channels = list(channels) if isinstance(channels, (list, tuple)) else [channels]
            if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels):
                refuse("channel_indices={}".format(args.get("channel_indices")))
            crop["channels"] = channels
        if ks != [1, 1, 1]:
            crop["k_divisible"] = ks
        return [{"crop": crop}]
    if name == "DivisiblePad":
        if str(args.get("method", "symmetric")).lower() != "symmetric":
            refuse("method={}".format(args.get("method")))
        if str(first(args.get("mode", "constant"))).lower() != "constant":
            refuse("mode={}".format(args.get("mode")))
        return [{"pad_divisible": args.get("k")}]
    if args.get("lazy") in (True, "true", "True"):  # MONAI would merge it with its neighbours into one resampling
        refuse("lazy=True")
    if name == "SpatialPad":
        for setting in sorted(set(args) - SIGNATURE_ARGS - {"spatial_size", "method", "mode", "value"}):
            refuse("{}={}".format(setting, args[setting]))  # np.pad or torch.pad arguments other than value
        if str(args.get("method", "symmetric")).lower() not in ("symmetric", "end"):
            refuse("method={}".format(args.get("method")))
        if str(first(args.get("mode", "constant"))).lower() != "constant":
            refuse("mode={}".format(args.get("mode")))
        value = first(args.get("value", 0.0))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            refuse("value={}".format(value))
        return [{"pad_size": _sizes(args["spatial_size"], refuse, "spatial_size"),
                 "method": str(args.get("method", "symmetric")).lower(), "value": float(value)}]
    if name == "CenterSpatialCrop":
        return [{"center_crop": _sizes(args["roi_size"], refuse, "roi_size"),
                 "outside": "zeros"}]  # Invertd pads the crop back with zeros in every channel
    if name == "Resize":
        mode = str(first(args.get("mode", "area"))).lower()
        if mode not in RESIZE_MODE_NAMES:
            refuse("mode={}".format(mode))
        mode = RESIZE_MODE_NAMES[mode]
        corners = first(args.get("align_corners"))
        if corners is not None and mode != "trilinear":  # torch's interpolate refuses it, and so MONAI
            refuse("mode={}, align_corners={}".format(mode, corners))
        if args.get("anti_aliasing") in (True, "true", "True"):
            refuse("anti_aliasing=True")
        dtype = _dtype_name(first(args.get("dtype")))
        if dtype not in ("float32", "float64", None):  # the twin computes in the input's dtype
            refuse("dtype={}".format(dtype))
        size_mode = str(args.get("size_mode", "all")).lower()
        if size_mode == "longest":
            size = args["spatial_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                refuse("size_mode=longest, spatial_size={}".format(size))
        elif size_mode == "all":
            size = _sizes(args["spatial_size"], refuse, "spatial_size")
        else:
            refuse("size_mode={}".format(size_mode))
        step = {"resize": size, "size_mode": size_mode, "mode": mode}
        if mode == "trilinear":
            step["align_corners"] = None if corners is None else bool(corners)
        return [step]
    raise AssertionError(name)


# A CropForeground select_fn as a config writes it: x compared with a number ("$lambda x: x > 1").
SELECT_FN = re.compile(r"^\$\s*lambda\s+(?P<x>[A-Za-z_]\w*)\s*:\s*(?P=x)\s*(?P<compare>>=|<=|!=|==|>|<)\s*"
                       r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\Z")
IS_POSITIVE = ("$monai.transforms.is_positive", "$monai.transforms.utils.is_positive")  # MONAI's default, x > 0


def select_rule(select_fn, where):
    """(comparison, threshold) of a ``CropForeground`` ``select_fn``: MONAI's default ``is_positive`` (x > 0), or
    the config's own text comparing x with a number (the parser makes a lambda of it, whose threshold cannot be
    read back); InputError naming anything else."""
    if select_fn is None or select_fn in IS_POSITIVE or (
            callable(select_fn) and getattr(select_fn, "__name__", None) == "is_positive"
            and str(getattr(select_fn, "__module__", "")).startswith("monai.")):
        return ">", 0
    match = SELECT_FN.match(select_fn) if isinstance(select_fn, str) else None
    if match is None:
        raise InputError("bundle {}: CropForeground(select_fn={}) is not reproduced (reproduced are comparisons of x "
                         "with a number: \"$lambda x: x > 1\", with >, >=, <, <=, != or ==)".format(
                             where, getattr(select_fn, "__name__", select_fn)))
    value = match.group("value")
    number = float(value) if any(c in value for c in ".eE") else int(value)
    return match.group("compare"), number


def _dtype_name(value):
    """``float32`` for torch.float32, numpy.float32 or "float32"; None for None."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    try:
        return np.dtype(value).name
    except TypeError:
        return str(value)


def _sizes(value, refuse, setting):
    """Three voxel counts from one number or three (as MONAI's ``fall_back_tuple``; not positive: keep the axis)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        refuse("{}={}".format(setting, value))
    return values


def _number(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        raise InputError("per-channel intensity values are not supported: {}".format(value))
    return float(value)


def _window(reader, config, notes):
    raw = config.get("inferer")
    if not isinstance(raw, dict) or "_target_" not in raw:
        return None
    if transform_name(raw["_target_"]) not in ("SlidingWindowInferer", "SlidingWindowInfererAdapt", "SimpleInferer"):
        notes.append("inferer {} is run as a whole-volume inference".format(transform_name(raw["_target_"])))
        return None
    component = reader.component("inferer")
    if component is None:
        return None
    name, args = component
    if name in ("SlidingWindowInferer", "SlidingWindowInfererAdapt"):
        if args.get("with_coord") in (True, "true", "True"):  # the network would get the windows' coordinates
            raise InputError("bundle {}: {}(with_coord=True) is not reproduced".format(reader.where, name))
        roi = args.get("roi_size")
        return {"roi_size": [int(v) for v in (roi if isinstance(roi, (list, tuple)) else [roi] * 3)],
                "overlap": args.get("overlap", 0.25), "mode": str(args.get("mode", "constant")),
                "sigma_scale": args.get("sigma_scale", 0.125), "padding_mode": str(args.get("padding_mode",
                                                                                            "constant")),
                "cval": float(args.get("cval", 0.0)), "sw_batch_size": int(args.get("sw_batch_size", 1))}
    return None


def _activation(reader):
    """(output activation, the activation applied to the aggregated outputs before the preprocessing is undone):
    a sigmoid always; a softmax where ``Invertd`` follows it (MONAI then resamples probabilities, not logits),
    else the outputs are read as the softmax's logits."""
    found = reader.transforms("postprocessing", reader.output_key, {"Activations", "Invert"})
    for name, args in found:
        if name == "Invert" and args is not None and args.get("nearest_interp", True):
            raise InputError("bundle {}: Invert(d) with nearest_interp (its default) brings the outputs back by "
                             "nearest neighbour, which is not reproduced; linear (nearest_interp=false) is".format(
                                 reader.where))
    for index, (name, args) in enumerate(found):
        if name == "Activations" and args is not None:
            if args.get("sigmoid"):
                return "sigmoid", "sigmoid"
            if args.get("softmax"):
                inverted = any(later == "Invert" for later, _ in found[index + 1:])
                return ("softmax", "softmax") if inverted else ("logits", None)
    return None, None


def _untwinned_postprocessing(reader):
    """The postprocessing transforms (on the output key) that change the labels in a way not reproduced: all but
    loading, type and saving transforms, Activations, Invert and AsDiscrete by argmax or at threshold 0.5 (the
    labels the outputs give here)."""
    dropped = []
    for name, args in reader.transforms("postprocessing", reader.output_key, {"AsDiscrete"}):
        if name in NEUTRAL or name in ("Activations", "Invert"):
            continue
        if name == "AsDiscrete" and args is not None and not args.get("rounding") \
                and args.get("threshold") in (None, 0.5):
            continue
        dropped.append(name if args is None else "{}({})".format(name, ", ".join(
            "{}={}".format(key, value) for key, value in sorted(args.items()) if key not in SIGNATURE_ARGS)))
    return dropped


def _data_format(metadata):
    data_format = metadata.get("network_data_format") or {}
    return dict(data_format.get("inputs") or {}), dict(data_format.get("outputs") or {})


def _task(output_format):
    """``classification`` where the metadata's output is class scores (``"format": "classes"`` or ``"type":
    "probabilities"``, as the model zoo's classifiers declare them), else None (detected from the outputs)."""
    if not isinstance(output_format, dict):
        return None
    if output_format.get("format") == "classes" or output_format.get("type") == "probabilities":
        return "classification"
    return None


def _labels(outputs_format, activation, where):
    """Label names from the output channel definition (``channel_def``); sigmoid channel c is label c + 1."""
    for output in outputs_format.values():
        channels = output.get("channel_def") if isinstance(output, dict) else None
        if isinstance(channels, dict) and channels:
            offset = 1 if activation == "sigmoid" else 0
            names = {int(channel) + offset: str(name) for channel, name in channels.items()}
            if offset:
                names.setdefault(0, "background")
            return parse_labels({value: names[value] for value in sorted(names)}, where)
    return []


# --------------------------------------------------------------------------------------------------------- safety
def _unsafe(parser, item_id):
    """What in ``item_id`` (and every item it references) would run code when the parser resolves it."""
    from monai.bundle.config_item import ComponentLocator
    locator = ComponentLocator()
    problems, seen, pending = [], set(), [item_id]

    def safe_target(target):
        if not isinstance(target, str):
            return False
        if "." not in target:
            modules = locator.get_component_module_name(target)
            modules = [modules] if isinstance(modules, str) else list(modules or [])
            return bool(modules) and all(module.startswith(SAFE_MODULES) for module in modules)
        return target.startswith(SAFE_MODULES)

    def walk(value, where):
        if isinstance(value, str):
            if value in IS_POSITIVE or SELECT_FN.match(value):
                pass  # a comparison of x with a number: a lambda that runs nothing else
            elif value.startswith("$"):
                problems.append("{} is a Python expression {!r}".format(where, value[:60]))
            elif value.startswith("%"):
                problems.append("{} reads another config file {!r}".format(where, value[:60]))
            elif value.startswith("@"):
                pending.append(value[1:].replace("#", "::"))
        elif isinstance(value, dict):
            if "_target_" in value and not safe_target(value["_target_"]):
                problems.append("{} targets {!r}, outside MONAI and torch.nn".format(where, value["_target_"]))
            if value.get("_mode_", "default") != "default":
                problems.append("{} has _mode_ {!r}".format(where, value["_mode_"]))
            for key, item in value.items():
                walk(item, "{}::{}".format(where, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, "{}::{}".format(where, index))

    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            walk(parser.get(current), current)
        except Exception:
            problems.append("{} cannot be read".format(current))
    return problems
