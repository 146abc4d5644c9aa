"""Segmentation networks with their preprocessing, loaded from the built-in demo, a model folder or TorchScript.

A :class:`SegmentationModel` takes raw intensities in the network convention (B, C, X, Y, Z: RAS-oriented
grid, channel first) and returns the network's outputs, so attacks get gradients in intensity space.
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .errors import InputError
from .outputs import check_activation, label_count, predict_labels
from .preprocessing import normalize_intensity

MODELS_DIR = Path(__file__).resolve().parent / "Resources" / "Models"
BUILTIN_MODELS = {"demo": "demo-unet", "demo-unet": "demo-unet"}
DESCRIPTION_FILE = "model.json"
PALETTE = [(0.0, 0.0, 0.0), (0.30, 0.55, 0.95), (0.85, 0.45, 0.35), (0.95, 0.90, 0.55), (0.45, 0.80, 0.45),
           (0.80, 0.45, 0.85), (0.40, 0.85, 0.85), (0.95, 0.65, 0.20), (0.60, 0.60, 0.60), (0.90, 0.30, 0.55)]



@dataclass
class Label:
    value: int
    name: str
    color: Tuple[float, float, float]


@dataclass
class ModelDescription:
    """What a user can write by hand next to the weights (``model.json``)."""
    name: str
    labels: List[Label] = field(default_factory=list)
    output_activation: str = "logits"
    in_channels: int = 1
    intensity: dict = field(default_factory=lambda: {"type": "none"})
    window: Optional[dict] = None
    architecture: Optional[dict] = None
    weights: str = "model.pt"
    spacing: Optional[List[float]] = None
    notes: str = ""

    @classmethod
    def from_json(cls, path):
        data = json.loads(Path(path).read_text())
        data["labels"] = [Label(int(item["value"]), item["name"], tuple(item["color"]))
                          for item in data.get("labels", [])]
        return cls(**data)

    def to_json(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def labels_for(self, count):
        """The first ``count`` labels, named ``label N`` with palette colours where the description has none."""
        known = {label.value: label for label in self.labels}
        return [known.get(value, Label(value, "background" if value == 0 else "label {}".format(value),
                                       PALETTE[value % len(PALETTE)]))
                for value in range(count)]


class SegmentationModel(torch.nn.Module):
    """A network with its differentiable intensity preprocessing and (optionally) sliding-window inference."""

    def __init__(self, network, description):
        super().__init__()
        self.network = network
        self.description = description
        check_activation(description.output_activation)

    @property
    def activation(self):
        return self.description.output_activation

    def forward(self, volume):
        inputs = normalize_intensity(volume, self.description.intensity)
        window = self.description.window
        if not window:
            return self.network(inputs)
        from monai.inferers import sliding_window_inference
        return sliding_window_inference(inputs, roi_size=tuple(window["roi_size"]), sw_batch_size=1,
                                        predictor=self.network, overlap=window.get("overlap", 0.25),
                                        mode=window.get("mode", "gaussian"))

    def loss_and_gradient(self, volume, loss_fn):
        """``loss_fn(outputs)`` (a scalar), its gradient with respect to the raw volume, and the detached outputs."""
        volume = volume.detach().requires_grad_(True)
        outputs = self(volume)
        loss = loss_fn(outputs)
        gradient, = torch.autograd.grad(loss, volume)
        return float(loss.detach()), gradient, outputs.detach()

    @torch.no_grad()
    def predict(self, volume):
        """Integer label map (B, X, Y, Z) for a raw-intensity volume."""
        return predict_labels(self(volume), self.activation)

    def labels(self, outputs):
        """Labels (names, colours) for outputs of this network."""
        return self.description.labels_for(label_count(outputs, self.activation))


def load_model(source, output_activation=None):
    """Load a built-in model name, a model folder (or its ``model.json``), or a TorchScript file."""
    source = str(source)
    if source in BUILTIN_MODELS:
        model = _load_described(MODELS_DIR / BUILTIN_MODELS[source] / DESCRIPTION_FILE)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / DESCRIPTION_FILE
        if not path.exists():
            raise InputError("model not found: {} (give a built-in name {}, a model folder or a TorchScript "
                             "file)".format(source, sorted(BUILTIN_MODELS)))
        model = _load_described(path) if path.suffix == ".json" else _load_torchscript(path)
    if output_activation is not None:
        model.description.output_activation = check_activation(output_activation)
    return model.eval()


def build_network(architecture):
    """A MONAI network from ``{"name": "UNet", "args": {...}}``; only classes of ``monai.networks.nets``."""
    from monai.networks import nets
    name = architecture["name"]
    network_class = getattr(nets, name, None)
    if not isinstance(network_class, type) or not issubclass(network_class, torch.nn.Module):
        raise InputError("unknown MONAI architecture {!r}".format(name))
    return network_class(**architecture.get("args", {}))


def _load_described(description_path):
    description = ModelDescription.from_json(description_path)
    if not description.architecture:
        raise InputError("{} names no architecture".format(description_path))
    network = build_network(description.architecture)
    weights = description_path.parent / description.weights
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError("cannot load weights {} safely (weights_only=True): {}".format(weights, error))
    network.load_state_dict(state)
    return SegmentationModel(network, description)


def _load_torchscript(path):
    try:
        network = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise InputError("{} is not a TorchScript file ({}); export it with torch.jit.save or give a model "
                         "folder with {}".format(path, str(error).splitlines()[0], DESCRIPTION_FILE))
    return SegmentationModel(network, ModelDescription(name=path.stem))
