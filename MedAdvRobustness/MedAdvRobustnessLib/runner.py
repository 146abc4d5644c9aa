"""Run one attack at several epsilons on one volume and measure what it did."""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .errors import InputError
from .metrics import dice_per_label, mean_dice, perturbation_metrics
from .models import Label

METRIC_COLUMNS = ("model", "attack", "epsilon", "label", "dice_reference", "dice_clean", "linf", "l2",
                  "linf_fraction", "l2_fraction", "psnr")


@dataclass
class Outcome:
    """The volume the network saw at one epsilon (0: the clean volume) and what it predicted."""
    epsilon: float
    adversarial: np.ndarray
    prediction: np.ndarray
    record: object = None


@dataclass
class RobustnessResult:
    model_name: str
    attack_name: str
    volume: object
    labels: List[Label]
    reference: Optional[np.ndarray]
    outcomes: List[Outcome]
    rows: List[dict]

    @property
    def clean(self):
        return self.outcomes[0]

    def mean_dice(self, epsilon, against):
        """Mean foreground Dice at ``epsilon`` against ``"reference"`` or ``"clean"``."""
        for row in self.rows:
            if row["epsilon"] == epsilon and row["label"] == "mean":
                return row["dice_" + against]
        raise KeyError(epsilon)


def check_epsilons(epsilons):
    """Sorted distinct epsilons, each a fraction of the intensity range strictly between 0 and 1."""
    values = sorted({float(e) for e in epsilons})
    if not values:
        raise InputError("give at least one epsilon")
    bad = [e for e in values if not 0.0 < e < 1.0]
    if bad:
        raise InputError("epsilon must be a fraction of the intensity range with 0 < epsilon < 1, got {}".format(
            ", ".join("{:g}".format(e) for e in bad)))
    return values


def run_attack_sweep(model, volume, attack, epsilons, reference=None, progress=None, is_cancelled=None, region=None,
                     target=None):
    """Attack ``volume`` at each epsilon; labels for the loss are ``reference`` if given, else the clean prediction.

    ``region`` (boolean) and ``target`` (integer labels), optional arrays on the reference's grid, are passed to
    the attack: the perturbation stays inside ``region``; ``target`` makes the attack targeted. Epsilons are
    fractions of the intensity range, converted by the attack's ``intensity_budget`` (L2: root-mean-square).
    ``progress(fraction, message)`` reports the work done; ``is_cancelled()`` stops between iterations.
    """
    epsilons = check_epsilons(epsilons)
    low, high = volume.intensity_range
    if high <= low:
        raise InputError("volume {} has constant intensity; epsilon as a fraction of its range is undefined".format(
            volume.name))
    inputs = volume.as_tensor()
    with torch.no_grad():
        clean_outputs = model(inputs)
    labels = model.labels(clean_outputs)
    clean_prediction = model.predict(inputs)[0].numpy()
    if reference is not None and int(reference.max()) >= len(labels):
        raise InputError("the reference holds label {} but the network predicts labels 0..{}".format(
            int(reference.max()), len(labels) - 1))
    loss_labels = torch.from_numpy(reference if reference is not None else clean_prediction)[None]
    region_mask = None if region is None else torch.from_numpy(np.asarray(region) != 0)[None]
    target_map = None if target is None else torch.from_numpy(np.asarray(target).astype(np.int64))[None]
    outcomes = [Outcome(0.0, volume.array, clean_prediction)]
    for index, epsilon in enumerate(epsilons):
        def report(step, steps, loss, dice=None, index=index, epsilon=epsilon):
            if progress:
                progress((index + min(step, steps) / steps) / len(epsilons),
                         "{} epsilon {:g}: step {}/{} loss {:.4f}{}".format(
                             attack.name, epsilon, step, steps, loss,
                             "" if dice is None else " Dice {:.3f}".format(dice)))
        budget = getattr(attack, "intensity_budget", None)
        epsilon_abs = (budget(epsilon, high - low, inputs, region_mask) if budget is not None
                       else epsilon * (high - low))
        extra = {}
        if region_mask is not None:
            extra["region"] = region_mask
        if target_map is not None:
            extra["target"] = target_map
        adversarial, record = attack(model, inputs, loss_labels, epsilon_abs, (low, high), progress=report,
                                     is_cancelled=is_cancelled, **extra)
        prediction = model.predict(adversarial)[0].numpy()
        outcomes.append(Outcome(epsilon, adversarial[0, 0].numpy(), prediction, record))
    model_name = model.description.name
    rows = metric_rows(model_name, attack.name, volume, labels, reference, outcomes)
    return RobustnessResult(model_name, attack.name, volume, labels, reference, outcomes, rows)


def metric_rows(model_name, attack_name, volume, labels, reference, outcomes):
    """One row per (epsilon, foreground label) plus a ``mean`` row per epsilon; None where not applicable."""
    low, high = volume.intensity_range
    clean = torch.from_numpy(outcomes[0].prediction)
    rows = []
    for outcome in outcomes:
        prediction = torch.from_numpy(outcome.prediction)
        against_clean = dice_per_label(prediction, clean, len(labels))
        against_reference = (dice_per_label(prediction, torch.from_numpy(reference), len(labels))
                             if reference is not None else None)
        size = perturbation_metrics(torch.from_numpy(volume.array), torch.from_numpy(outcome.adversarial), high - low)
        common = dict(model=model_name, attack=attack_name, epsilon=outcome.epsilon, **size)
        for label in labels[1:]:
            rows.append(dict(common, label=label.name, dice_clean=against_clean[label.value],
                             dice_reference=against_reference[label.value] if against_reference else None))
        rows.append(dict(common, label="mean", dice_clean=mean_dice(against_clean),
                         dice_reference=mean_dice(against_reference) if against_reference else None))
    return rows
