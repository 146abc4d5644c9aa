"""Run one probe (an attack or a corruption) at several strengths on one volume and measure what it did.

Attacks take epsilons (fractions of the intensity range), corruptions severities 1..5; both go through
:func:`run_sweep`, which gives one :class:`Outcome` per strength (strength 0: the clean volume).
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..probes.attacks import check_cancel, check_epsilons  # noqa: F401  (check_epsilons: the runner's public helper)
from ..probes.corruptions import rood_summary, spacing_from_affine
from ..errors import InputError
from .metrics import LabelSurfaces, dice_per_label, mean_dice, perturbation_metrics, structural_similarity
from ..networks.models import Label
from ..networks.outputs import predict_labels

METRIC_COLUMNS = ("model", "attack", "epsilon", "label", "dice_reference", "dice_clean", "linf", "l2",
                  "linf_fraction", "l2_fraction", "psnr", "ssim", "hd95_reference", "asd_reference", "hd95_clean",
                  "asd_clean")


@dataclass
class Outcome:
    """The volume the network saw at one strength (0: the clean volume) and what it predicted.

    ``reference`` and ``clean_prediction`` are set where the probe moved the anatomy (spatial corruptions): the
    reference and the clean prediction moved the same way, to compare with.
    """
    strength: float
    adversarial: np.ndarray
    prediction: np.ndarray
    record: object = None
    reference: Optional[np.ndarray] = None
    clean_prediction: Optional[np.ndarray] = None


@dataclass
class RobustnessResult:
    model_name: str
    attack_name: str
    volume: object
    labels: List[Label]
    reference: Optional[np.ndarray]
    outcomes: List[Outcome]
    rows: List[dict]
    strength_name: str = "epsilon"
    strength_label: str = "epsilon (fraction of intensity range)"

    @property
    def clean(self):
        return self.outcomes[0]

    @property
    def columns(self):
        """The metric columns, the strength column named after the probe's strength (epsilon or severity)."""
        return tuple(self.strength_name if column == "epsilon" else column for column in METRIC_COLUMNS)

    @property
    def against(self):
        """What Dice curves compare with: ``"reference"`` if given, else ``"clean"``."""
        return "reference" if self.reference is not None else "clean"

    def mean_dice(self, strength, against):
        """Mean foreground Dice at ``strength`` against ``"reference"`` or ``"clean"``."""
        for row in self.rows:
            if row[self.strength_name] == strength and row["label"] == "mean":
                return row["dice_" + against]
        raise KeyError(strength)

    def rood_summary(self):
        """ROOD-MRI summary (alpha 2/3) of the mean Dice over the severities; None for an attack."""
        if self.strength_name != "severity":
            return None
        scores = {int(outcome.strength): self.mean_dice(outcome.strength, self.against)
                  for outcome in self.outcomes[1:]}
        return dict(rood_summary(scores, self.mean_dice(0, self.against)), metric="mean Dice",
                    against=self.against, corruption=self.attack_name)


def run_sweep(model, volume, probe, strengths, reference=None, progress=None, is_cancelled=None, region=None,
              target=None):
    """Apply ``probe`` to ``volume`` at each strength; labels for attacks are ``reference`` if given, else the clean
    prediction.

    ``region`` (boolean), an optional array on the volume's grid, bounds the probe: an attack's perturbation stays
    inside it, an intensity corruption is applied inside it only (a spatial one, which moves the anatomy, is
    refused). ``target`` (integer labels) makes an attack targeted.
    ``progress(fraction, message)`` reports the work done; ``is_cancelled()`` stops between iterations.
    """
    strengths = probe.check_strengths(strengths)
    if region is not None and getattr(probe, "spatial", False):
        raise InputError("corruption {} moves the anatomy and cannot be restricted to a region; use an intensity "
                         "corruption or drop the region".format(probe.name))
    low, high = volume.intensity_range
    if high <= low:
        raise InputError("volume {} has constant intensity; epsilon as a fraction of its range is undefined".format(
            volume.name))
    inputs = volume.as_tensor()
    with torch.no_grad():
        clean_outputs = model(inputs)
    labels = model.labels(clean_outputs)
    clean_prediction = predict_labels(clean_outputs, model.activation)[0].numpy()
    if reference is not None and int(reference.max()) >= len(labels):
        raise InputError("the reference holds label {} but the network predicts labels 0..{}".format(
            int(reference.max()), len(labels) - 1))
    sweep = _Sweep(model, volume, inputs, reference, clean_prediction, region, target, is_cancelled)
    outcomes = [Outcome(0.0, volume.array, clean_prediction)]
    for index, strength in enumerate(strengths):
        def report(step, steps, loss, dice=None, index=index, strength=strength):
            if progress:
                progress((index + min(step, steps) / steps) / len(strengths),
                         "{} {} {:g}: step {}/{} loss {:.4f}{}".format(
                             probe.name, probe.strength_name, strength, step, steps, loss,
                             "" if dice is None else " Dice {:.3f}".format(dice)))
        check_cancel(is_cancelled)
        if hasattr(probe, "apply"):
            outcome = sweep.corrupt(probe, strength)
            if progress:
                progress((index + 1) / len(strengths), "{} severity {}".format(probe.name, strength))
        else:
            outcome = sweep.attack(probe, strength, report)
        outcomes.append(outcome)
    model_name = model.description.name
    rows = metric_rows(model_name, probe.name, volume, labels, reference, outcomes, probe.strength_name)
    return RobustnessResult(model_name, probe.name, volume, labels, reference, outcomes, rows, probe.strength_name,
                            probe.strength_label)


class _Sweep:
    """What every strength of one sweep shares: the model, the clean volume and its labels."""

    def __init__(self, model, volume, inputs, reference, clean_prediction, region, target, is_cancelled):
        self.model, self.volume, self.inputs = model, volume, inputs
        self.reference, self.clean_prediction = reference, clean_prediction
        self.region = None if region is None else torch.from_numpy(np.asarray(region) != 0)[None]
        self.target = None if target is None else torch.from_numpy(np.asarray(target).astype(np.int64))[None]
        self.is_cancelled = is_cancelled

    def attack(self, attack, epsilon, report):
        low, high = self.volume.intensity_range
        loss_labels = torch.from_numpy(self.reference if self.reference is not None else self.clean_prediction)[None]
        extra = {}
        if self.region is not None:
            extra["region"] = self.region
        if self.target is not None:
            extra["target"] = self.target
        budget = attack.intensity_budget(epsilon, high - low, self.inputs, self.region)
        adversarial, record = attack(self.model, self.inputs, loss_labels, budget, (low, high), progress=report,
                                     is_cancelled=self.is_cancelled, **extra)
        return Outcome(epsilon, adversarial[0, 0].numpy(), self.model.predict(adversarial)[0].numpy(), record)

    def corrupt(self, corruption, severity):
        maps = [torch.from_numpy(self.clean_prediction)]
        if self.reference is not None:
            maps.append(torch.from_numpy(self.reference))
        corrupted, moved = corruption.apply(self.inputs, severity, spacing_from_affine(self.volume.affine), maps)
        if self.region is not None:
            corrupted = torch.where(self.region[None], corrupted, self.inputs)
        prediction = self.model.predict(corrupted)[0].numpy()
        outcome = Outcome(float(severity), corrupted[0, 0].numpy(), prediction)
        if corruption.spatial:
            outcome.clean_prediction = moved[0].numpy()
            outcome.reference = moved[1].numpy() if self.reference is not None else None
        return outcome


def metric_rows(model_name, attack_name, volume, labels, reference, outcomes, strength_name="epsilon"):
    """One row per (strength, foreground label) plus a ``mean`` row per strength; None where not applicable.

    Dice and surface distances (HD95, symmetric mean surface distance, mm) against the reference and the clean
    prediction; perturbation size and SSIM of the probed volume against the clean one.
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
        distances = {name: surfaces.of(outcome.prediction).distances_to(surfaces.of(other))
                     for name, other in versus.items()}
        adversarial = torch.from_numpy(outcome.adversarial)
        common = dict(model=model_name, attack=attack_name, **perturbation_metrics(original, adversarial, high - low))
        common[strength_name] = outcome.strength
        common["ssim"] = 1.0 if outcome.adversarial is volume.array else structural_similarity(
            original, adversarial, high - low)
        for label in labels[1:]:
            row = dict(common, label=label.name)
            for name in ("reference", "clean"):
                row["dice_" + name] = dice[name][label.value] if name in dice else None
                for metric in ("hd95", "asd"):
                    row[metric + "_" + name] = distances[name][label.value][metric] if name in distances else None
            rows.append(row)
        mean = dict(common, label="mean")
        for name in ("reference", "clean"):
            mean["dice_" + name] = mean_dice(dice[name]) if name in dice else None
            for metric in ("hd95", "asd"):
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
