"""Run one probe (an attack or a corruption) at several strengths on one volume and measure what it did.

Attacks take epsilons (fractions of the intensity range), corruptions severities 1..5; both go through
:func:`run_sweep`, which asks the probe for one :class:`~.records.Outcome` per strength (strength 0: the clean
volume; FGSM and PGD may run all strengths as one batch, see ``batch_strengths``) and measures each against the
reference and the clean prediction.
"""
import numpy as np
import torch

from ..errors import InputError
from ..networks.models import SegmentationModel, as_segmentation_model
from ..networks.outputs import predict_labels, prediction_entropy, voxel_loss
from ..probes.attacks import check_cancel
from ..probes.corruptions import spacing_from_affine
from .classification import run_classification_sweep
from .metrics import (SURFACE_TOLERANCE_MM, LabelSurfaces, dice_per_label, mean_dice, perturbation_metrics,
                      structural_similarity)
from .records import Outcome, RobustnessResult


def run_sweep(model, volume, probe, strengths, reference=None, progress=None, is_cancelled=None, region=None,
              target=None, surface_tolerance=SURFACE_TOLERANCE_MM, batch_strengths=None):
    """Apply ``probe`` to ``volume`` at each strength; labels for attacks are ``reference`` if given, else the clean
    prediction.

    ``model`` is a :class:`~..networks.models.SegmentationModel` (a plain ``torch.nn.Module`` is taken as logits on
    the raw volume, with a warning). ``region`` (boolean), an optional array on the volume's grid, bounds the probe:
    an attack's perturbation stays inside it, an intensity corruption is applied inside it only (a probe that moves
    the anatomy is refused). ``target`` (integer labels) makes an attack targeted.
    ``progress(fraction, message)`` reports the work done; ``is_cancelled()`` stops between iterations.
    ``surface_tolerance`` (mm): the tolerance of the surface Dice columns (``nsd_*``).
    ``batch_strengths``: whether a probe that can (FGSM, PGD, SegPGD, CosPGD without restarts) runs all strengths
    as one batch of copies of the volume (same results as one by one, within float tolerance): True forces it,
    False runs one by one, None (default) decides (:meth:`Sweep.batches`: on for a CUDA whole-volume network
    whose batch fits in free GPU memory).
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
    sweep = Sweep(model, volume, clean_outputs, reference, region, target, is_cancelled, batch_strengths)
    if reference is not None and int(reference.max()) >= len(sweep.labels):
        raise InputError("the reference holds label {} but the network predicts labels 0..{}".format(
            int(reference.max()), len(sweep.labels) - 1))
    def report_for(indices):  # the progress of the strengths at these consecutive indices
        chosen = [strengths[index] for index in indices]
        return _reporter(probe, chosen[0] if len(chosen) == 1 else chosen, indices[0], len(strengths), progress)

    outcomes = [Outcome(0.0, volume.array, sweep.clean_prediction)] + probe.outcomes(sweep, strengths, report_for)
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
    """``report(step, steps, loss=None, dice=None)`` for the probe at the ``index``-th of ``count`` strengths, or
    at the consecutive strengths from there that run at once (``strength`` a list; then ``loss`` and ``dice`` are
    lists, one value per strength); ``dice`` is shown as ``score`` (a classifier's: the fraction of images still
    given their label)."""
    together = strength if isinstance(strength, list) else [strength]

    def report(step, steps, loss=None, dice=None):
        if not progress:
            return
        text = "{} {} {}".format(probe.name, probe.strength_name, ", ".join("{:g}".format(s) for s in together))
        text += " at once" if len(together) > 1 else ""
        if loss is not None:
            text += ": step {}/{} loss {}{}".format(step, steps, _joined("{:.4f}", loss), "" if dice is None else
                                                  " {} {}".format(score, _joined("{:.3f}", dice)))
        progress((index + len(together) * min(step, steps) / steps) / count, text)
    return report


def _joined(form, values):
    """One value formatted, or a list of them joined by slashes."""
    return "/".join(form.format(v) for v in values) if isinstance(values, list) else form.format(values)


class Sweep:
    """What every strength of one sweep shares, as a probe's :meth:`~..probes.base.Probe.outcome` uses it: the
    model, the clean volume (``inputs``, (1, C, X, Y, Z)) and its clean prediction (from ``clean_outputs``), the
    reference, the region and target (tensors or None), the loss labels (the reference, else the clean
    prediction), the intensity bounds, and whether strengths may run as one batch (see :meth:`batches`)."""

    def __init__(self, model, volume, clean_outputs, reference, region, target, is_cancelled, batch_strengths=None):
        self.model, self.volume, self.reference, self.is_cancelled = model, volume, reference, is_cancelled
        self.batch_strengths = batch_strengths
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

    def check_cancel(self):
        check_cancel(self.is_cancelled)

    def batches(self, count):
        """Whether ``count`` strengths run as one batch of ``count`` copies of the volume: ``batch_strengths``
        True (InputError where the network's pipeline is not per volume), False, or None: only where
        :meth:`default_obstacle` finds nothing and the batch fits in free GPU memory (:func:`batch_fits`)."""
        if self.batch_strengths is not None:
            unfit = batch_obstacle(self.model)
            if self.batch_strengths and unfit:
                raise InputError("strengths cannot run as one batch: {}; run them one by one".format(unfit))
            return bool(self.batch_strengths)
        return self.default_obstacle() is None and batch_fits(self.model, self.inputs, self.loss_labels, count)

    def default_obstacle(self):
        """Why strengths run one by one by default (None: as one batch, where it fits): a pipeline that is not
        per volume, more than one window over the volume (each copy's windows would be run one by one anyway),
        or a device other than CUDA (on the CPU a batch of 3 costs 1.1 to 1.4 x three single passes: README)."""
        unfit = batch_obstacle(self.model)
        if unfit:
            return unfit
        if not self.model.covers_in_one_window(self.inputs):
            return "{} runs in several windows over this volume".format(self.model.description.name)
        if self.model.device.type != "cuda":
            return "on {} a batch of strengths costs more than one by one".format(self.model.device.type)
        return None


def batch_obstacle(model):
    """Why a batch of copies of a volume would not give each copy what it gets alone (None if it would): a
    preprocessing that sees the whole batch (a foreground crop takes one box for all; a model's own pipeline)."""
    if type(model).prepare is not SegmentationModel.prepare:
        return "{} has its own preprocessing, not known to treat each volume of a batch alone".format(
            model.description.name)
    if any("crop" in step for step in model.description.steps()):
        return "the foreground crop of {} takes one box for a whole batch".format(model.description.name)
    return None


BATCH_MEMORY_SHARE = 0.8  # of the free GPU memory; the rest for the allocator's fragmentation and workspaces


def batch_fits(model, inputs, labels, count):
    """Whether ``count`` copies of ``inputs`` fit in free GPU memory: ``count`` times the peak (above what is
    held) of one measured gradient of the cross-entropy (the graph grows with the batch; one extra forward and
    backward pass per sweep) within :data:`BATCH_MEMORY_SHARE` of the memory free before it."""
    device = model.device
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model.loss_and_gradient(inputs, lambda outputs: voxel_loss(outputs, labels, model.activation).mean())
    torch.cuda.synchronize(device)
    one = torch.cuda.max_memory_allocated(device) - held
    return count * one <= BATCH_MEMORY_SHARE * free


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
