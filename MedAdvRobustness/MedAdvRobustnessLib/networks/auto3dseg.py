"""MONAI Auto3DSeg SegResNet models as the MONAIAuto3DSeg Slicer extension runs them.

The extension downloads a model to ``~/.MONAIAuto3DSeg/models/<model>/model.pt``: a checkpoint dictionary holding
``config`` (plain data) and ``state_dict``. Its inference script builds the network from ``config["network"]``
with MONAI's ``ConfigParser`` and runs, in this order: ``Orientationd`` RAS (``orientation_ras``),
``CropForegroundd`` with a margin of 10 voxels (``crop_foreground``, on by default), ``Spacingd`` to
``resample_resolution`` (bilinear; an axis within 25 % of it keeps its spacing), the intensity step
``normalize_mode`` names, a Gaussian sliding window of ``roi_size`` with overlap 0.625, a softmax (or a sigmoid
with ``sigmoid``) and ``Invertd`` back to the input grid. Each becomes a step of :mod:`.steps`.

This is the pipeline of the extension's ``Scripts/auto3dseg_segresnet_inference.py`` at commit 0477a24
(February 2024). The extension's current script differs: it normalises the intensities first (statistics of the
whole raw image), crops by the raw image, and brings argmax labels back with ``Invertd(nearest_interp=True)``;
that is not reproduced yet, and the model report says so.
"""
from ..errors import InputError
from .models import TRUST_HINT, ModelDescription, SegmentationModel

WINDOW_OVERLAP = 0.625
CROP_MARGIN = 10
SPACING_RANGE = (0.75, 1.25)


class Auto3DSegError(InputError):
    """An Auto3DSeg checkpoint that cannot be reproduced (its own message, not "not a checkpoint")."""


def is_auto3dseg(checkpoint):
    """Whether a loaded checkpoint is an Auto3DSeg one (``config`` with a ``network``, and ``state_dict``)."""
    return (isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict)
            and "network" in checkpoint["config"] and "state_dict" in checkpoint)


def intensity_steps(config, where):
    """The intensity steps of ``config["normalize_mode"]``."""
    mode = config.get("normalize_mode", "none")
    if mode == "none":
        return []
    if mode in ("range", "ct"):
        if "intensity_bounds" not in config:
            raise Auto3DSegError("Auto3DSeg model {}: normalize_mode {} needs intensity_bounds".format(where, mode))
        low, high = (float(v) for v in config["intensity_bounds"])
        return [{"intensity": {"type": "range", "a_min": low, "a_max": high, "b_min": -1.0, "b_max": 1.0,
                               "clip": False}}, {"intensity": {"type": "sigmoid"}}]
    zscore = {"intensity": {"type": "zscore", "nonzero": True, "mean": None, "std": None}}
    if mode in ("meanstd", "mri"):
        return [zscore]
    if mode == "meanstdtanh":
        return [zscore, {"intensity": {"type": "tanh", "scale": 3.0}}]
    raise Auto3DSegError("Auto3DSeg model {}: normalize_mode {!r} is not reproduced".format(where, mode))


def load_auto3dseg(checkpoint, where, trust_checkpoint=False):
    """A :class:`~.models.SegmentationModel` of an Auto3DSeg checkpoint, reproducing the extension's pipeline."""
    from monai.bundle import ConfigParser
    from .bundles import _unsafe
    config = checkpoint["config"]
    if "roi_size" not in config:
        raise Auto3DSegError("Auto3DSeg model {}: its config has no roi_size".format(where))
    if not config.get("orientation_ras", False):
        raise Auto3DSegError("Auto3DSeg model {}: without orientation_ras the network sees the file's own axis order, "
                         "which is not reproduced".format(where))
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
    steps = []
    if config.get("crop_foreground", True):
        steps.append({"crop": {"threshold": 0.0, "margin": CROP_MARGIN}})
    pixdim = config.get("resample_resolution")
    if pixdim is not None:
        pixdim = [float(v) for v in pixdim]
        steps.append({"spacing": pixdim, "mode": "bilinear", "min_pixdim": [v * SPACING_RANGE[0] for v in pixdim],
                      "max_pixdim": [v * SPACING_RANGE[1] for v in pixdim]})
    steps += intensity_steps(config, where)
    activation = "sigmoid" if config.get("sigmoid", False) else "softmax"
    description = ModelDescription(
        name=str(config.get("name") or where), output_activation=activation, activation_after_inference=activation,
        in_channels=int(config.get("input_channels", 1)), preprocessing=steps, spacing=pixdim,
        intensity=[step["intensity"] for step in steps if "intensity" in step] or {"type": "none"},
        window={"roi_size": [int(v) for v in config["roi_size"]], "overlap": WINDOW_OVERLAP, "mode": "gaussian"},
        notes="MONAI Auto3DSeg model {}".format(where))
    description.steps()  # every step can run (InputError naming it otherwise)
    model = SegmentationModel(network.eval(), description, source="MONAI Auto3DSeg {}".format(where))
    model.load_notes = ["pipeline of MONAIAuto3DSeg's inference script of February 2024 (0477a24); the current "
                        "script normalises first and brings labels back by nearest neighbour: not reproduced yet"]
    return model
