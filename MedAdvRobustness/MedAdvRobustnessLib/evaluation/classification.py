"""A probe's sweep on a classifier: per strength the predicted class, its probability, the true class's, whether
the prediction flipped and the perturbation's size; and the gradient saliency map of the clean input."""
import numpy as np
import torch

from ..errors import InputError
from ..networks.outputs import class_probabilities, predict_labels
from ..probes.attacks import check_cancel, class_scores
from ..probes.corruptions import spacing_from_affine
from .metrics import perturbation_metrics, structural_similarity
from .records import ClassificationResult, Outcome


def run_classification_sweep(model, volume, clean_outputs, probe, strengths, reference, region, target, progress,
                             is_cancelled, reporter):
    """:func:`~.sweep.run_sweep` for a classifier (its checks done); ``reference`` is the true class or None."""
    if probe.moves_anatomy:
        raise InputError("corruption {} moves the anatomy; classifiers take intensity corruptions only".format(
            probe.name))
    sweep = ClassificationSweep(model, volume, clean_outputs, reference, region, target, is_cancelled)
    outcomes = [sweep.outcome(0.0, sweep.inputs, outputs=clean_outputs)]
    for index, strength in enumerate(strengths):
        check_cancel(is_cancelled)
        report = reporter(probe, strength, index, len(strengths), progress, score="accuracy")
        outcomes.append(probe.outcome(sweep, strength, report))
    name = model.description.name
    rows = classification_rows(name, probe.name, volume, sweep.labels, sweep.reference, outcomes, probe.strength_name)
    return ClassificationResult(name, probe.name, volume, sweep.labels, sweep.reference, outcomes, rows,
                                saliency_map(model, sweep.inputs, int(sweep.clean_prediction)), probe.strength_name, probe.strength_label)


class ClassificationSweep:
    """What every strength of a classifier's sweep shares (as :class:`~.sweep.Sweep`): the loss labels are one
    class, the true one if given, else the clean prediction."""

    def __init__(self, model, volume, clean_outputs, reference, region, target, is_cancelled):
        self.model, self.volume, self.is_cancelled = model, volume, is_cancelled
        self.inputs = volume.as_tensor()
        self.labels = model.labels(clean_outputs)
        self.reference = check_class(reference, len(self.labels), "the true class (--label)")
        self.clean_prediction = predict_labels(clean_outputs, model.activation)[0].numpy()
        self.region = None if region is None else torch.from_numpy(np.asarray(region) != 0)[None]
        self.target = None if target is None else torch.tensor([check_class(target, len(self.labels), "the target")])
        self.bounds = volume.intensity_range
        self.intensity_span = self.bounds[1] - self.bounds[0]
        self.spacing = spacing_from_affine(volume.affine)
        label = self.reference if self.reference is not None else int(self.clean_prediction)
        self.loss_labels = torch.tensor([label])

    def outcome(self, strength, probed, record=None, outputs=None):
        """The :class:`~.records.Outcome` of the probed (1, C, X, Y, Z) volume (its ``outputs`` if known): the
        class and its probabilities."""
        if outputs is None:
            with torch.no_grad():
                outputs = self.model(probed)
        probabilities = class_probabilities(outputs.float(), self.model.activation)[0].numpy()
        prediction = predict_labels(outputs, self.model.activation)[0].numpy()
        return Outcome(strength, volume_array(probed), prediction, record, probabilities=probabilities)


def volume_array(probed):
    """The (X, Y, Z) array of a one-channel (1, 1, X, Y, Z) volume, (C, X, Y, Z) of several channels."""
    return probed[0, 0].numpy() if probed.shape[1] == 1 else probed[0].numpy()


def check_class(value, count, what):
    """``value`` as a class index of a ``count``-class classifier (None stays None); InputError otherwise."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.integer):
        raise InputError("{} of a classifier is one class index (0..{}), not {}".format(
            what, count - 1, "an image of shape {}".format(array.shape) if array.ndim else repr(value)))
    if not 0 <= int(array) < count:
        raise InputError("{} is class {} but the network has classes 0..{}".format(what, int(array), count - 1))
    return int(array)


def classification_rows(model_name, probe_name, volume, labels, reference, outcomes, strength_name="epsilon"):
    """One row per strength: the predicted class, its name and probability, the true class and its probability
    (None without one), whether the prediction flipped from the clean one, the perturbation's size and SSIM, and
    the minimal perturbation (fractions of the range) where the attack reports one."""
    low, high = volume.intensity_range
    original = torch.from_numpy(volume.array)
    clean_class = int(outcomes[0].prediction)
    rows = []
    for outcome in outcomes:
        predicted = int(outcome.prediction)
        probed = torch.from_numpy(outcome.probed)
        row = dict(model=model_name, attack=probe_name, predicted=predicted, predicted_name=labels[predicted].name,
                   confidence=float(outcome.probabilities[predicted]), label=reference,
                   label_probability=None if reference is None else float(outcome.probabilities[reference]),
                   flipped=predicted != clean_class, **perturbation_metrics(original, probed, high - low))
        row[strength_name] = outcome.strength
        row["ssim"] = 1.0 if outcome.strength == 0 else _ssim(original, probed, high - low)
        row.update(minimal_fractions(outcome.record, high - low))
        rows.append(row)
    return rows


def _ssim(original, probed, span):
    """SSIM of one channel, the mean over the channels of several."""
    if original.dim() == 3:
        return structural_similarity(original, probed, span)
    return float(np.mean([structural_similarity(a, b, span) for a, b in zip(original, probed)]))


def minimal_fractions(record, intensity_span):
    """``minimal_l2_fraction`` and ``minimal_linf_fraction`` from an attack's ``details["minimal_perturbation"]``
    (intensity units, None where no flip was found); nothing where the attack reports none."""
    details = getattr(record, "details", None) or {}
    if "minimal_perturbation" not in details:
        return {}
    minimal = details["minimal_perturbation"] or {}
    return {"minimal_{}_fraction".format(norm): None if minimal.get(norm) is None
            else float(minimal[norm]) / intensity_span for norm in ("l2", "linf")}


def saliency_map(model, inputs, predicted):
    """|d score / d input| of the ``predicted`` class (its logits-like score) at the (1, C, X, Y, Z) ``inputs``, on
    the volume's (X, Y, Z) grid: the maximum over the channels of several."""
    inputs = inputs.clone().requires_grad_(True)
    with torch.enable_grad():
        scores = class_scores(model(inputs), model.activation)
        gradient, = torch.autograd.grad(scores[0, predicted], inputs)
    return gradient[0].abs().amax(dim=0).numpy()
