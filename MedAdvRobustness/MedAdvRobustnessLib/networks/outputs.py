"""What a network's outputs are (logits, softmax or sigmoid probabilities) and how to predict and score them.

Channel conventions: ``logits`` and ``softmax`` have one channel per label, background first;
``sigmoid`` has one channel per foreground label (labels 1..K), a voxel is background where all are < 0.5.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("logits", "softmax", "sigmoid")
_TINY = 1e-12


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError("unknown output activation {!r}; expected one of {}".format(activation, ACTIVATIONS))
    return activation


def label_count(outputs, activation):
    """Number of labels, background included, that (B, K, *spatial) outputs encode."""
    channels = outputs.shape[1]
    return channels + 1 if activation == "sigmoid" else channels


def predict_labels(outputs, activation):
    """Label map (B, *spatial) of integer labels from network outputs (B, K, *spatial)."""
    if check_activation(activation) == "sigmoid":
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
    target = F.one_hot(labels, outputs.shape[1] + 1).movedim(-1, 1)[:, 1:].to(outputs.dtype)
    probabilities = outputs.clamp(_TINY, 1.0 - 1e-7)
    return F.binary_cross_entropy(probabilities, target, reduction="none").sum(dim=1)
