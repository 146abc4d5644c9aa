"""What a sweep gives: one :class:`Outcome` per strength and the :class:`RobustnessResult` with its metric rows."""
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional

import numpy as np

from ..networks.models import Label
from ..probes.corruptions import rood_summary, spacing_from_affine

METRIC_COLUMNS = ("model", "probe", "strength", "label", "dice_reference", "dice_clean", "linf", "l2",
                  "linf_fraction", "l2_fraction", "psnr", "ssim", "hd95_reference", "asd_reference", "hd95_clean",
                  "asd_clean", "nsd_reference", "nsd_clean")


def metric_columns(strength_name):
    """The columns of the metric rows, the strength column named ``strength_name`` (epsilon or severity)."""
    return tuple(strength_name if column == "strength" else column for column in METRIC_COLUMNS)


@dataclass
class Outcome:
    """The volume the network saw at one strength (0: the clean volume), ``probed``, and what it predicted.

    ``reference`` and ``clean_prediction`` are set where the probe moved the anatomy (spatial corruptions): the
    reference and the clean prediction moved the same way, to compare with; ``changed`` then holds the voxels whose
    label differs from the moved clean prediction, brought back to the subject's own grid (the clean volume's; see
    :func:`~..probes.corruptions.to_subject_frame`).
    """
    strength: float
    probed: np.ndarray
    prediction: np.ndarray
    record: object = None
    reference: Optional[np.ndarray] = None
    clean_prediction: Optional[np.ndarray] = None
    probabilities: Optional[np.ndarray] = None  # a classifier's: the probability of each class
    changed: Optional[np.ndarray] = None


@dataclass
class RobustnessResult:
    model_name: str
    probe_name: str
    volume: object
    labels: List[Label]
    reference: Optional[np.ndarray]
    outcomes: List[Outcome]
    rows: List[dict]
    strength_name: str = "epsilon"
    strength_label: str = "epsilon (fraction of intensity range)"
    clean_entropy: Optional[np.ndarray] = None  # per voxel, of the clean outputs (nats)

    @cached_property
    def fragility(self):
        """The fragility map (:func:`~.fragility.fragility_map`), computed once for every writer."""
        from .fragility import fragility_map
        return fragility_map(self)

    @property
    def spacing(self):
        return spacing_from_affine(self.volume.affine)

    @property
    def clean(self):
        return self.outcomes[0]

    @property
    def columns(self):
        """The metric columns, the strength column named after the probe's strength (epsilon or severity)."""
        return metric_columns(self.strength_name)

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
                    against=self.against, corruption=self.probe_name)


CLASSIFICATION_COLUMNS = ("model", "attack", "strength", "predicted", "predicted_name", "confidence", "label",
                          "label_probability", "flipped", "linf", "l2", "linf_fraction", "l2_fraction", "psnr",
                          "ssim")
MINIMAL_COLUMNS = ("minimal_l2_fraction", "minimal_linf_fraction")


@dataclass
class ClassificationResult:
    """A classifier's sweep: one :class:`Outcome` and one metric row per strength (0: clean), the true class
    (``reference``, or None) and the gradient saliency map of the clean input on the volume's grid."""
    model_name: str
    probe_name: str
    volume: object
    labels: List[Label]
    reference: Optional[int]
    outcomes: List[Outcome]
    rows: List[dict]
    saliency: np.ndarray
    strength_name: str = "epsilon"
    strength_label: str = "epsilon (fraction of intensity range)"
    task = "classification"

    @property
    def clean(self):
        return self.outcomes[0]

    @property
    def columns(self):
        """The issue's columns, the strength column named after the probe's strength, plus the minimal
        perturbation's where the attack reports one."""
        columns = tuple(self.strength_name if column == "strength" else column for column in CLASSIFICATION_COLUMNS)
        if any(column in row for row in self.rows for column in MINIMAL_COLUMNS):
            columns += MINIMAL_COLUMNS
        return columns
