"""What a network's outputs are (logits, softmax or sigmoid probabilities, or sigmoid regions) and how to predict
and score them.

Channel conventions: ``logits`` and ``softmax`` have one channel per label, background first;
``sigmoid`` has one channel per foreground label (labels 1..K), a voxel is background where all are < 0.5;
:class:`Regions` (nnU-Net's region-based models, BraTS-style) has one sigmoid channel per region, a region being a
set of labels that may overlap the others.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("logits", "softmax", "sigmoid")
_TINY = 1e-12


@dataclass(frozen=True)
class Regions:
    """Sigmoid outputs, one channel per region (a set of labels), as nnU-Net's region-based models have them.

    The label map is made as nnU-Net makes it: background, then for each region in turn, its ``class_order``
    label wherever its probability is above 0.5 (later regions overwrite earlier ones); ``inclusive``: at 0.5 too
    (MONAIAuto3DSeg's BraTS merge).
    """
    regions: Tuple[Tuple[int, ...], ...]
    class_order: Tuple[int, ...]
    inclusive: bool = False

    def __post_init__(self):
        if len(self.regions) != len(self.class_order) or not self.regions:
            raise ValueError("regions {} and class order {} must be as many, at least one".format(
                self.regions, self.class_order))

    def __str__(self):
        return "sigmoid regions ({})".format("; ".join(
            "label {} where {{{}}}".format(label, ", ".join(map(str, region)))
            for region, label in zip(self.regions, self.class_order)))

    @property
    def label_count(self):
        return max(max(self.class_order), max(max(region) for region in self.regions)) + 1

    def labels(self, probabilities):
        prediction = torch.zeros(probabilities.shape[:1] + probabilities.shape[2:], dtype=torch.long,
                                 device=probabilities.device)
        for channel, label in enumerate(self.class_order):
            channel = probabilities[:, channel]
            prediction[(channel >= 0.5) if self.inclusive else (channel > 0.5)] = label
        return prediction

    def targets(self, labels, dtype):
        """(B, regions, ...) membership of each voxel's label in each region."""
        return torch.stack([torch.isin(labels, torch.tensor(region, device=labels.device))
                            for region in self.regions], dim=1).to(dtype)


def check_activation(activation):
    if not isinstance(activation, Regions) and activation not in ACTIVATIONS:
        raise ValueError("unknown output activation {!r}; expected one of {}".format(activation, ACTIVATIONS))
    return activation


def label_count(outputs, activation):
    """Number of labels, background included, that (B, K, *spatial) outputs encode."""
    if isinstance(activation, Regions):
        return activation.label_count
    channels = outputs.shape[1]
    return channels + 1 if activation == "sigmoid" else channels


def predict_labels(outputs, activation):
    """Label map (B, *spatial) of integer labels from network outputs (B, K, *spatial)."""
    if isinstance(check_activation(activation), Regions):
        return activation.labels(outputs)
    if activation == "sigmoid":
        best, index = outputs.max(dim=1)
        return torch.where(best >= 0.5, index + 1, torch.zeros_like(index))
    return outputs.max(dim=1).indices  # argmax's first-maximum rule; argmax(dim=1) is ~20x slower on CPU


def voxel_loss(outputs, labels, activation):
    """Per-voxel cross-entropy (B, *spatial) of outputs against integer labels, correct for the activation."""
    labels = labels.long()
    if check_activation(activation) == "logits":
        return F.cross_entropy(outputs, labels, reduction="none")
    if activation == "softmax":
        return F.nll_loss(torch.log(outputs.clamp_min(_TINY)), labels, reduction="none")
    if isinstance(activation, Regions):
        target = activation.targets(labels, outputs.dtype)
    else:
        target = F.one_hot(labels, outputs.shape[1] + 1).movedim(-1, 1)[:, 1:].to(outputs.dtype)
    probabilities = outputs.clamp(_TINY, 1.0 - 1e-7)
    return F.binary_cross_entropy(probabilities, target, reduction="none").sum(dim=1)


def prediction_entropy(outputs, activation):
    """Per-voxel entropy in nats (B, *spatial) of what the outputs predict: over the labels for logits and softmax,
    the sum of the channels' binary entropies for sigmoid outputs and regions."""
    if check_activation(activation) in ("logits", "softmax"):
        probabilities = torch.softmax(outputs, dim=1) if activation == "logits" else outputs
        return -(probabilities * torch.log(probabilities.clamp_min(_TINY))).sum(dim=1)
    probabilities = outputs.clamp(_TINY, 1.0 - 1e-7)
    return -(probabilities * torch.log(probabilities) + (1 - probabilities) * torch.log1p(-probabilities)).sum(dim=1)


def class_probabilities(outputs, activation):
    """Probability of each class (B, classes) from a classifier's (B, K) outputs: the softmax of logits, softmax
    outputs as they are; for sigmoid outputs class 0 is "none above 0.5" (:func:`predict_labels`'s rule), its
    probability that of no channel being on."""
    if check_activation(activation) == "logits":
        return torch.softmax(outputs, dim=1)
    if activation == "sigmoid":
        return torch.cat([(1 - outputs).prod(dim=1, keepdim=True), outputs], dim=1)
    return outputs

