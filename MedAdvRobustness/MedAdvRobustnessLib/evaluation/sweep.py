"""Run one probe (an attack or a corruption) at several strengths on one volume and measure what it did.

Attacks take epsilons (fractions of the intensity range), corruptions severities 1..5; both go through
:func:`run_sweep`, which asks the probe for one :class:`~.records.Outcome` per strength (strength 0: the clean
volume) and measures each against the reference and the clean prediction.
"""
import numpy as np
import torch

from ..errors import InputError
from ..networks.models import as_segmentation_model
from ..networks.outputs import predict_labels, prediction_entropy
from ..probes.attacks import check_cancel
from ..probes.corruptions import spacing_from_affine
from .classification import run_classification_sweep
from .metrics import (SURFACE_TOLERANCE_MM, LabelSurfaces, dice_per_label, mean_dice, perturbation_metrics,
                      structural_similarity)
from .records import Outcome, RobustnessResult


def run_sweep(model, volume, probe, strengths, reference=None, progress=None, is_cancelled=None, region=None,
              target=None, surface_tolerance=SURFACE_TOLERANCE_MM):
    """Apply ``probe`` to ``volume`` at each strength; labels for attacks are ``reference`` if given, else the clean
    prediction.

    ``model`` is a :class:`~..networks.models.SegmentationModel` (a plain ``torch.nn.Module`` is taken as logits on
    the raw volume, with a warning). ``region`` (boolean), an optional array on the volume's grid, bounds the probe:
    an attack's perturbation stays inside it, an intensity corruption is applied inside it only (a probe that moves
    the anatomy is refused). ``target`` (integer labels) makes an attack targeted.
    ``progress(fraction, message)`` reports the work done; ``is_cancelled()`` stops between iterations.
    ``surface_tolerance`` (mm): the tolerance of the surface Dice columns (``nsd_*``).
    A classifier (``model.task``) gets a :class:`~.records.ClassificationResult`
    (:func:`~.classification.run_classification_sweep`): its ``reference`` is the true class, or None.
    """
    model = as_segmentation_model(model)
    strengths = probe.check_strengths(strengths)
    if region is not None and probe.moves_anatomy:
        raise InputError("corruption {} moves the anatomy and cannot be restricted to a region; use an intensity "
                         "corruption or drop the region".format(probe.name))
    low, high = volume.intensity_range
    if high <= low:
        raise InputError("volume {} has constant intensity; epsilon as a fraction of its range is undefined".format(
            volume.name))
    with torch.no_grad():
        clean_outputs = model(volume.as_tensor())
    task = network_task(model, clean_outputs)
    if task not in probe.tasks:
        raise InputError("{} is for {} networks only; {} is a {} network".format(
            probe.name, " and ".join(probe.tasks), model.description.name, task))
    if task == "classification":
        return run_classification_sweep(model, volume, clean_outputs, probe, strengths, reference, region, target,
                                        progress, is_cancelled, _reporter)
    sweep = Sweep(model, volume, clean_outputs, reference, region, target, is_cancelled)
    if reference is not None and int(reference.max()) >= len(sweep.labels):
        raise InputError("the reference holds label {} but the network predicts labels 0..{}".format(
            int(reference.max()), len(sweep.labels) - 1))
    outcomes = [Outcome(0.0, volume.array, sweep.clean_prediction)]
    for index, strength in enumerate(strengths):
        check_cancel(is_cancelled)
        outcomes.append(probe.outcome(sweep, strength, _reporter(probe, strength, index, len(strengths), progress)))
    model_name = model.description.name
    rows = metric_rows(model_name, probe.name, volume, sweep.labels, reference, outcomes, probe.strength_name,
                       surface_tolerance)
    return RobustnessResult(model_name, probe.name, volume, sweep.labels, reference, outcomes, rows,
                            probe.strength_name, probe.strength_label, sweep.clean_entropy)


def network_task(model, outputs):
    """``segmentation`` or ``classification``: the model's declared or detected task, else detected here from its
    ``outputs``' shape ((B, K): a classifier)."""
    if model.description.task is None and model.detected_task is None:
        model.detected_task = "classification" if outputs.dim() == 2 else "segmentation"
    return model.task


def _reporter(probe, strength, index, count, progress, score="Dice"):
    """``report(step, steps, loss=None, dice=None)`` for the probe at the ``index``-th of ``count`` strengths;
    ``dice`` is shown as ``score`` (a classifier's: the fraction of images still given their label)."""
    def report(step, steps, loss=None, dice=None):
        if not progress:
            return
        text = "{} {} {:g}".format(probe.name, probe.strength_name, strength)
        if loss is not None:
            text += ": step {}/{} loss {:.4f}{}".format(step, steps, loss,
                                                      "" if dice is None else " {} {:.3f}".format(score, dice))
        progress((index + min(step, steps) / steps) / count, text)
    return report


class Sweep:
    """What every strength of one sweep shares, as a probe's :meth:`~..probes.base.Probe.outcome` uses it: the
    model, the clean volume (``inputs``, (1, C, X, Y, Z)) and its clean prediction (from ``clean_outputs``), the
    reference, the region and target (tensors or None), the loss labels (the reference, else the clean
    prediction), the intensity bounds."""

    def __init__(self, model, volume, clean_outputs, reference, region, target, is_cancelled):
        self.model, self.volume, self.reference, self.is_cancelled = model, volume, reference, is_cancelled
        self.inputs = volume.as_tensor()
        self.labels = model.labels(clean_outputs)
        self.clean_prediction = predict_labels(clean_outputs, model.activation)[0].numpy()
        self.clean_entropy = prediction_entropy(clean_outputs.float(), model.activation)[0].numpy()
        self.region = None if region is None else torch.from_numpy(np.asarray(region) != 0)[None]
        self.target = None if target is None else torch.from_numpy(np.asarray(target).astype(np.int64))[None]
        self.bounds = volume.intensity_range
        self.intensity_span = self.bounds[1] - self.bounds[0]
        self.spacing = spacing_from_affine(volume.affine)
        self.loss_labels = torch.from_numpy(reference if reference is not None else self.clean_prediction)[None]

    def outcome(self, strength, probed, record=None):
        """The :class:`~.records.Outcome` of the probed (1, C, X, Y, Z) volume: it and the network's prediction."""
        return Outcome(strength, probed[0, 0].numpy(), self.model.predict(probed)[0].numpy(), record)


def metric_rows(model_name, probe_name, volume, labels, reference, outcomes, strength_name="epsilon",
                surface_tolerance=SURFACE_TOLERANCE_MM):
    """One row per (strength, foreground label) plus a ``mean`` row per strength; None where not applicable.

    Dice, surface distances (HD95, symmetric mean surface distance, mm) and surface Dice (at ``surface_tolerance``
    mm) against the reference and the clean prediction; perturbation size and SSIM of the probed volume against
    the clean one.
    """
    low, high = volume.intensity_range
    spacing = spacing_from_affine(volume.affine)
    original = torch.from_numpy(volume.array)
    surfaces = _SurfaceCache(len(labels), spacing)
    rows = []
    for outcome in outcomes:
        prediction = torch.from_numpy(outcome.prediction)
        clean = outcome.clean_prediction if outcome.clean_prediction is not None else outcomes[0].prediction
        versus = {"clean": clean}
        if reference is not None:
            versus["reference"] = outcome.reference if outcome.reference is not None else reference
        dice = {name: dice_per_label(prediction, torch.from_numpy(other), len(labels))
                for name, other in versus.items()}
        distances = {name: surfaces.of(outcome.prediction).distances_to(surfaces.of(other), surface_tolerance)
                     for name, other in versus.items()}
        probed = torch.from_numpy(outcome.probed)
        common = dict(model=model_name, probe=probe_name, **perturbation_metrics(original, probed, high - low))
        common[strength_name] = outcome.strength
        common["ssim"] = 1.0 if outcome.probed is volume.array else structural_similarity(original, probed, high - low)
        for label in labels[1:]:
            row = dict(common, label=label.name)
            for name in ("reference", "clean"):
                row["dice_" + name] = dice[name][label.value] if name in dice else None
                for metric in ("hd95", "asd", "nsd"):
                    row[metric + "_" + name] = distances[name][label.value][metric] if name in distances else None
            rows.append(row)
        mean = dict(common, label="mean")
        for name in ("reference", "clean"):
            mean["dice_" + name] = mean_dice(dice[name]) if name in dice else None
            for metric in ("hd95", "asd", "nsd"):
                mean[metric + "_" + name] = (_mean_or_none([d[metric] for d in distances[name].values()])
                                             if name in distances else None)
        rows.append(mean)
    return rows


class _SurfaceCache:
    """:class:`LabelSurfaces` of each label map met, built once (the reference and the clean prediction are
    compared with every strength's prediction)."""

    def __init__(self, label_count, spacing):
        self.label_count, self.spacing, self.built = label_count, spacing, []

    def of(self, label_map):
        for known, surfaces in self.built:
            if known is label_map:
                return surfaces
        surfaces = LabelSurfaces(label_map, self.label_count, self.spacing)
        self.built.append((label_map, surfaces))
        return surfaces


def _mean_or_none(values):
    """Mean of the defined values; None if any is undefined (a label missing from a map)."""
    return None if any(v is None for v in values) or not values else sum(values) / len(values)
