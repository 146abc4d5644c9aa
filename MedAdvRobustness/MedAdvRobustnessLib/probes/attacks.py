"""Adversarial attacks on dense (per-voxel) segmentation outputs, in the volume's own intensity space.

Every attack is a dataclass whose fields are its parameters (with defaults, listed by ``medadv attacks``), built
by name with :func:`~.registry.make_probe`, and called the same way::

    adversarial, record = attack(model, volume, labels, epsilon, bounds, region=None, target=None,
                                 progress=None, is_cancelled=None)

- ``volume`` (B, C, X, Y, Z) raw intensities (the sweep uses B = 1); ``labels`` (B, X, Y, Z) integer labels
  the attack moves away from (the reference, else the clean prediction).
- ``epsilon`` the budget in intensity units: L-infinity (max |delta|) or, for ``norm="l2"``, the L2 norm of the
  perturbation (:meth:`Attack.intensity_budget` converts a fraction of the intensity range). ``bounds`` the
  (low, high) intensities the result is clipped to. Both hold exactly, checked in float64. FGSM and PGD (and its
  kin, without restarts) also take a list, one epsilon per volume: each volume is then attacked as it would be
  alone (its own random start) and ``record`` is a list, one :class:`AttackRecord` per volume (a sweep runs its
  strengths so, as one batch of copies of the volume, see :meth:`Attack.outcomes`).
- ``region`` optional boolean mask (1 or B, X, Y, Z): the perturbation is zero outside it. With the common
  parameter ``region_loss=True`` the loss (and DAG's active set) is also restricted to it.
- ``target`` optional integer label map like ``labels``: the attack becomes targeted (it lowers its loss towards
  ``target``). Without it, an attack whose ``target_mode`` is set builds the target from ``labels`` (see
  :func:`make_target`: ``permute``, ``swap``, ``turn``, ``grow``, ``vanish``).
- ``progress(step, steps, loss, dice)`` after each gradient evaluation: ``loss`` is the attack's loss at the point
  the gradient was taken (untargeted: being raised; targeted: the loss towards the target, being lowered),
  ``dice`` the mean foreground Dice of that point's prediction against ``labels``, both computed from the outputs
  that :meth:`SegmentationModel.loss_and_gradient` returned (no extra forward pass).
- ``is_cancelled()`` is checked before each gradient evaluation and stops the attack with :class:`AttackCancelled`.

Design (after foolbox 3 and torchattacks): one base class holds the call protocol, the bookkeeping
(:class:`AttackRecord`), the norm-specific step/projection/random start (as foolbox's L-infinity and L2
gradient-descent bases) and the targeting; step sizes are relative to epsilon (foolbox's ``rel_stepsize``).
Subclasses only say how they iterate (FGSM, PGD, APGD, DAG) or which loss they use (SegPGD, CosPGD).

Output activations: methods that need class scores (DAG, DLR) use logits-like scores: the logits; ``log p`` for
softmax outputs (logits up to a per-voxel constant, which these methods ignore); for sigmoid outputs (one
probability per foreground label) ``[0, logit(p_1), ..., logit(p_K)]``, whose arg-max is background exactly when
every ``p_k < 0.5``, as :func:`predict_labels` decides. Probabilities (CosPGD) are the softmax of those scores:
the softmax outputs themselves, and ``(1 - p, p)`` for a single sigmoid channel. Cross-entropy is always
:func:`voxel_loss`, correct for the activation (binary cross-entropy summed over channels for sigmoid).
"""
import math
import time
from dataclasses import dataclass, field, fields
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..networks.models import as_segmentation_model
from ..networks.outputs import Regions, label_count, predict_labels, voxel_loss
from .base import Probe
from .parameters import check_parameters, describe_parameter, parameter, parameter_fields, seed_parameter, value_text

NORMS = ("linf", "l2")
TARGET_MODES = ("permute", "swap", "turn", "grow", "vanish")
RESTART_CRITERIA = ("dice", "loss")
_TINY = 1e-12


class AttackCancelled(Exception):
    """The attack was cancelled between two iterations."""


@dataclass
class AttackRecord:
    """What happened during an attack: one loss and one Dice per gradient evaluation, and method details."""
    attack: str
    epsilon: float
    steps: int
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    dice: List[float] = field(default_factory=list)
    details: Dict[str, object] = field(default_factory=dict)


# --- projections -------------------------------------------------------------------------------------------------

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


def project_linf(candidate, original, epsilon, bounds):
    """Closest point to ``candidate`` with |x - original| <= epsilon and low <= x <= high, exactly in float.

    Projected in float64, then rounded to the volume's dtype; a voxel that rounding pushed past epsilon
    (by at most half a unit in the last place) steps one float back toward the original.
    """
    original64 = original.double()
    delta = (candidate.double() - original64).clamp(-epsilon, epsilon)
    return _exact_linf(original64 + delta, original, original64, epsilon, bounds)


def _exact_linf(wanted, original, original64, epsilon, bounds):
    """``wanted`` (float64) clipped to ``bounds``, rounded to the volume's dtype, stepped one float back toward
    the original where rounding passed epsilon."""
    projected = wanted.clamp(*bounds).to(original.dtype)
    overshoot = (projected.double() - original64).abs() > epsilon
    return torch.where(overshoot, torch.nextafter(projected, original), projected)


def linf_limits(original, epsilon, bounds, region=None):
    """Per voxel, the lowest and highest value :func:`project_linf` can return (the original outside
    ``region``): clamping a candidate between them in its own dtype is :func:`project_linf`, without float64."""
    original64 = original.double()
    limits = [_exact_linf(original64 + sign * epsilon, original, original64, epsilon, bounds) for sign in (-1, 1)]
    if region is not None:
        limits = [torch.where(region, limit, original) for limit in limits]
    return limits


def project_l2(candidate, original, epsilon, bounds, region=None):
    """``candidate - original`` (zero outside ``region``) scaled into the L2 ball of radius epsilon per volume,
    then clipped to ``bounds``; exact in float: a voxel that rounding moved farther from the original than the
    float64 result steps one float back, so every |delta| only shrinks and the norm stays <= epsilon."""
    original64 = original.double()
    delta = candidate.double() - original64
    if region is not None:
        delta = delta * region
    norm = _norms(delta, "l2")
    scale = torch.where(norm > epsilon, epsilon * (1.0 - 1e-12) / norm.clamp_min(_TINY), torch.ones_like(norm))
    wanted = (original64 + delta * scale).clamp(*bounds)
    projected = wanted.to(candidate.dtype)
    away = (projected.double() - original64).abs() > (wanted - original64).abs()
    return torch.where(away, torch.nextafter(projected, original), projected)


def _norms(tensor, norm):
    """Per-volume norm, shaped (B, 1, 1, 1, 1) for broadcasting."""
    flat = tensor.flatten(start_dim=1)
    values = flat.abs().amax(dim=1) if norm == "linf" else torch.linalg.vector_norm(flat, dim=1)
    return values.view((-1,) + (1,) * (tensor.dim() - 1))


# --- scores, probabilities, losses -------------------------------------------------------------------------------

def class_scores(outputs, activation):
    """Logits-like scores (B, labels, ...) whose arg-max is the predicted label (see the module docstring)."""
    if activation == "logits":
        return outputs
    if activation == "softmax":
        return torch.log(outputs.clamp_min(_TINY))
    if isinstance(activation, Regions):
        raise InputError("this attack needs one score per label; a region-based network scores overlapping "
                         "regions ({}): use an attack on the cross-entropy (fgsm, pgd, apgd-ce, segpgd)".format(
                             activation))
    probabilities = outputs.clamp(1e-7, 1.0 - 1e-7)
    foreground = torch.log(probabilities) - torch.log1p(-probabilities)
    return torch.cat([torch.zeros_like(foreground[:, :1]), foreground], dim=1)


def class_probabilities(outputs, activation):
    """Per-voxel probabilities over labels: softmax of logits, softmax outputs as is, softmax of sigmoid scores."""
    if activation == "softmax":
        return outputs
    return torch.softmax(class_scores(outputs, activation), dim=1)


def dlr_loss(scores, labels, target=None):
    """Per-voxel Difference of Logits Ratio (Croce & Hein 2020) on (B, K, ...) scores.

    Untargeted (K >= 3): ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, raised by the attack. Targeted (K >= 4):
    ``(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, the negative of the paper's targeted DLR, lowered.
    """
    needed = 3 if target is None else 4
    if scores.shape[1] < needed:
        raise InputError("the {}DLR loss needs at least {} labels, the network has {}".format(
            "" if target is None else "targeted ", needed, scores.shape[1]))
    ordered = scores.sort(dim=1, descending=True).values
    own = scores.gather(1, labels[:, None].long())[:, 0]
    if target is None:
        top_is_own = scores.max(dim=1).indices == labels
        best_other = torch.where(top_is_own, ordered[:, 1], ordered[:, 0])
        return -(own - best_other) / (ordered[:, 0] - ordered[:, 2] + _TINY)
    wanted = scores.gather(1, target[:, None].long())[:, 0]
    return (own - wanted) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + _TINY)


def foreground_dice(outputs, activation, labels, count=None):
    """Mean foreground Dice of each volume's prediction against ``labels``: a list, one value per volume.

    As :func:`~..evaluation.metrics.dice_per_label` (a label absent from both maps scores 1), from one label
    confusion count per volume (``count``: the number of labels, default from the outputs and ``labels``)."""
    prediction = predict_labels(outputs, activation)
    if prediction.dim() == 1:  # a classifier: 1 where the class is still the label's, else 0
        return [float(p == l) for p, l in zip(prediction.tolist(), labels.tolist())]
    if count is None:
        count = max(label_count(outputs, activation), int(labels.max()) + 1)
    return [_mean_dice(prediction[b], labels[b], count) for b in range(len(prediction))]


def _mean_dice(prediction, labels, count):
    """Mean foreground Dice of two label maps, in float32 as MONAI's ``compute_dice`` on one-hot maps."""
    if count < 2:
        return float("nan")
    small = torch.uint8 if count * count <= 256 else torch.int32  # the pair index in the narrowest integer
    pairs = torch.bincount((prediction.flatten().to(small) * count + labels.flatten().to(small)).cpu(),
                           minlength=count * count)
    pairs = pairs.view(count, count)  # [predicted, reference]
    overlap = 2.0 * pairs.diagonal()[1:].float()
    totals = (pairs.sum(dim=1) + pairs.sum(dim=0))[1:].float()
    scores = torch.where(totals > 0, overlap / totals.clamp_min(1.0), torch.ones_like(totals))
    return sum(scores.tolist()) / len(scores)


# --- targets -----------------------------------------------------------------------------------------------------

def make_target(mode, labels, labels_count, source_label=None, target_label=None, grow_voxels=1, seed=0):
    """An integer target map (like ``labels``) for a targeted attack.

    - ``permute``: every voxel gets ``pi(label)`` for a random permutation ``pi`` of 0..labels_count-1 without a
      fixed point (a seeded random cycle), so every voxel has another target (DAG's random targets).
    - ``swap``: ``source_label`` <-> ``target_label``; other voxels keep their label.
    - ``turn``: ``source_label`` becomes ``target_label`` ("turn A into B").
    - ``vanish``: ``source_label`` becomes background (0) ("make A vanish").
    - ``grow``: ``source_label`` spreads ``grow_voxels`` voxels into its neighbours (that many 6-connected
      binary dilations); voxels of the grown rim get ``source_label``.
    Voxels whose target equals their label are to be kept as they are.
    """
    labels = labels.long()
    if mode not in TARGET_MODES:
        raise InputError("unknown target mode {!r}; expected one of {}".format(mode, ", ".join(TARGET_MODES)))
    if mode == "permute":
        if labels_count < 2:
            raise InputError("a label permutation needs at least 2 labels")
        order = torch.randperm(labels_count, generator=torch.Generator().manual_seed(seed))
        mapping = torch.empty(labels_count, dtype=torch.long)
        mapping[order] = order.roll(-1)
        return mapping.to(labels.device)[labels]
    needs_target = mode in ("swap", "turn")
    _check_label("source_label", source_label, labels_count, mode)
    if needs_target:
        _check_label("target_label", target_label, labels_count, mode)
        if target_label == source_label:
            raise InputError("target mode {}: source and target label are both {}".format(mode, source_label))
    if mode == "vanish" and source_label == 0:
        raise InputError("target mode vanish: the source label must be a foreground label, not 0")
    source = labels == source_label
    if mode == "swap":
        return torch.where(source, target_label, torch.where(labels == target_label, source_label, labels))
    if mode == "turn":
        return torch.where(source, torch.full_like(labels, target_label), labels)
    if mode == "vanish":
        return torch.where(source, torch.zeros_like(labels), labels)
    grown = dilate(source, grow_voxels)
    return torch.where(grown, torch.full_like(labels, source_label), labels)


def dilate(mask, iterations):
    """``iterations`` binary dilations of a (B, X, Y, Z) mask with the 6-connected cross."""
    kernel = torch.zeros((1, 1, 3, 3, 3), dtype=torch.float32, device=mask.device)
    kernel[0, 0, 1, 1, :] = kernel[0, 0, 1, :, 1] = kernel[0, 0, :, 1, 1] = 1.0
    grown = mask[:, None].float()
    for _ in range(iterations):
        grown = (F.conv3d(grown, kernel, padding=1) > 0).float()
    return grown[:, 0] > 0


def _check_label(name, value, labels_count, mode):
    if value is None:
        raise InputError("target mode {} needs {}".format(mode, name))
    if not 0 <= value < labels_count:
        raise InputError("{} {} is not a label of this network (0..{})".format(name, value, labels_count - 1))


@dataclass
class Attack(Probe):
    """Base class: the call protocol, the norm geometry and the targeting shared by every attack."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    norm: ClassVar[str] = "linf"
    strength_name: ClassVar[str] = "epsilon"
    strength_label: ClassVar[str] = "epsilon (fraction of intensity range)"

    target_label_alone: ClassVar[bool] = False  # whether target_label without a target mode means something
    seed: int = seed_parameter("seed of random starts and of the permute target")
    target_mode: Optional[str] = parameter(None, str, "targeted attack: target map built from the labels",
                                           choices=TARGET_MODES)
    source_label: Optional[int] = parameter(None, int, "label A of swap/turn/grow/vanish")
    target_label: Optional[int] = parameter(None, int, "label B of swap/turn")
    grow_voxels: int = parameter(1, int, "grow: voxels label A spreads into its neighbours", minimum=1)
    region_loss: bool = parameter(False, bool, "restrict the loss (not only the perturbation) to the region")
    target_weight: Optional[float] = parameter(None, float, "targeted: share of the loss on the voxels whose target "
                                               "differs from their label, the rest on keeping the others (Metzen et "
                                               "al. 2017); none: one mean over all voxels", minimum=0.0)

    def __post_init__(self):
        check_parameters(self)
        if self.target_weight is not None and not self.target_weight <= 1.0:
            raise InputError("{} target_weight must be in [0, 1], got {:g}".format(self.name, self.target_weight))
        if self.target_mode in ("swap", "turn", "grow", "vanish") and self.source_label is None:
            raise InputError("{}: target mode {} needs source_label".format(self.name, self.target_mode))
        if self.target_mode in ("swap", "turn") and self.target_label is None:
            raise InputError("{}: target mode {} needs target_label".format(self.name, self.target_mode))
        unused = [name for name in ("source_label", "target_label") if getattr(self, name) is not None
                  and not (name == "target_label" and self.target_label_alone)]
        if self.target_mode is None and unused:
            raise InputError("{}: {} applies to a targeted attack; give a target mode too (--target-mode {})".format(
                self.name, " and ".join(unused), ", ".join(TARGET_MODES)))

    @classmethod
    def parameters(cls):
        """The parameters (name, default, type, help) this attack takes: its own first, then the common ones."""
        common = {item.name for item in fields(Attack)}
        ordered = sorted(parameter_fields(cls), key=lambda item: item.name in common)
        return [describe_parameter(item) for item in ordered]

    def check_strengths(self, epsilons):
        return check_epsilons(epsilons)

    def batches_strengths(self):
        """Whether it takes one epsilon per volume, so that a sweep may run all its epsilons as one batch."""
        return False

    def draws_from_seed(self):
        return bool(getattr(self, "random_start", False)) or self.target_mode == "permute"

    def intensity_budget(self, fraction, intensity_range, volume, region=None):
        """Epsilon in intensity units for a budget given as a fraction of the intensity range.

        L-infinity: ``fraction * range``. L2: ``fraction * range * sqrt(n)`` with n the attacked voxels (the
        region's, times channels), i.e. the root-mean-square perturbation over them is ``fraction * range``.
        """
        if self.norm == "linf":
            return fraction * intensity_range
        voxels = volume[0].numel() if region is None else int(region[0].sum()) * volume.shape[1]
        return fraction * intensity_range * math.sqrt(voxels)

    def __call__(self, model, volume, labels, epsilon, bounds, region=None, target=None, progress=None,
                 is_cancelled=None):
        context = _Context(self, as_segmentation_model(model), volume, labels, epsilon, bounds, region, target,
                           progress, is_cancelled)
        adversarial = self.run(context)
        context.record.seconds = time.time() - context.start
        return adversarial.detach(), context.records() if torch.is_tensor(context.epsilon) else context.record

    def run(self, context):
        """The adversarial volume of one call (``context``: inputs, projections, gradient evaluations)."""
        raise NotImplementedError

    def outcome(self, sweep, epsilon, report):
        budget = self.intensity_budget(epsilon, sweep.intensity_span, sweep.inputs, sweep.region)
        extra = {key: value for key, value in (("region", sweep.region), ("target", sweep.target))
                 if value is not None}
        probed, record = self(sweep.model, sweep.inputs, sweep.loss_labels, budget, sweep.bounds, progress=report,
                              is_cancelled=sweep.is_cancelled, **extra)
        return sweep.outcome(epsilon, probed, record)

    def outcomes(self, sweep, strengths, report_for):
        """Every epsilon at once where :meth:`batches_strengths` and ``sweep.batches`` say so: one batch of copies
        of the volume, one epsilon each (each record's details say ``strengths_at_once``); else one by one."""
        count = len(strengths)
        if count < 2 or not self.batches_strengths() or not sweep.batches(count):
            return super().outcomes(sweep, strengths, report_for)
        sweep.check_cancel()
        budgets = [self.intensity_budget(e, sweep.intensity_span, sweep.inputs, sweep.region) for e in strengths]
        copies = lambda tensor: tensor.expand((count,) + tuple(tensor.shape[1:])).contiguous()  # noqa: E731
        extra = {"region": sweep.region} if sweep.region is not None else {}
        if sweep.target is not None:
            extra["target"] = copies(sweep.target)
        probed, records = self(sweep.model, copies(sweep.inputs), copies(sweep.loss_labels), budgets, sweep.bounds,
                               progress=report_for(list(range(count))), is_cancelled=sweep.is_cancelled, **extra)
        for record in records:
            record.details["strengths_at_once"] = count
        return [sweep.outcome(epsilon, probed[b:b + 1], record)
                for b, (epsilon, record) in enumerate(zip(strengths, records))]

    def _loss(self, context, outputs, step, steps):
        """Per-volume loss (B,): mean cross-entropy towards the loss labels (the target when targeted)."""
        return context.reduce(voxel_loss(outputs, context.loss_labels(outputs), context.activation))


class _Context:
    """One call of an attack: inputs, geometry, targeting, gradient evaluations and the record."""

    def __init__(self, attack, model, volume, labels, epsilon, bounds, region, target, progress, is_cancelled):
        if volume.dim() != 5:
            raise InputError("attacks take a (B, C, X, Y, Z) volume, got shape {}".format(tuple(volume.shape)))
        # a classifier's labels are one class per volume (B,), a segmentation network's one label per voxel
        spatial = (volume.shape[0],) if labels.dim() == 1 else (volume.shape[0],) + tuple(volume.shape[2:])
        if tuple(labels.shape) != spatial:
            raise InputError("labels of shape {} do not match the volume {}".format(tuple(labels.shape),
                                                                                   tuple(volume.shape)))
        if labels.dim() == 1 and attack.target_mode in ("grow", "vanish"):
            raise InputError("{}: target mode {} moves a region's border; for a classifier use permute, swap or "
                             "turn".format(attack.name, attack.target_mode))
        if target is not None and tuple(target.shape) != spatial:
            raise InputError("target of shape {} does not match the volume {}".format(tuple(target.shape),
                                                                                     tuple(volume.shape)))
        if region is not None:
            if tuple(region.shape[1:]) != tuple(volume.shape[2:]) or region.shape[0] not in (1, spatial[0]):
                raise InputError("region of shape {} does not match the volume {}".format(tuple(region.shape),
                                                                                         tuple(volume.shape)))
            region = region.to(torch.bool).to(volume.device)
            if not bool(region.any()):
                raise InputError("the region is empty")
        epsilon = _epsilon(attack, epsilon, volume)
        if not bool((torch.as_tensor(epsilon) > 0).all()):
            raise InputError("epsilon must be positive, got {}".format(_listed(epsilon)))
        self.attack, self.model, self.volume = attack, model, volume.detach()
        self.labels = labels.long().to(volume.device)
        self.epsilon, self.bounds = epsilon, (float(bounds[0]), float(bounds[1]))
        self.region = region
        self.voxel_region = None if region is None else region[:, None]
        self.loss_mask = region if (region is not None and attack.region_loss) else None
        self.given_target = None if target is None else target.long().to(volume.device)
        self.targeted = target is not None or attack.target_mode is not None
        self.direction = -1.0 if self.targeted else 1.0
        self.activation = model.activation
        self.progress, self.is_cancelled = progress, is_cancelled
        self.start = time.time()
        self.record = AttackRecord(attack.name, _listed(epsilon), 0)
        self.per_volume = []  # per evaluation: the losses and Dice of each volume
        self.total_steps, self.step = 1, 0
        self._target = None
        self._limits = None  # L-infinity: the per-voxel interval of the projection, built on first use
        self._label_count = None

    # targeting
    def target(self, outputs):
        """The target map (built from the labels on first use, when the number of labels is known)."""
        if self._target is None:
            count = label_count(outputs, self.activation)
            if self.given_target is not None:
                self._target = self.given_target
            else:
                attack = self.attack
                self._target = make_target(attack.target_mode, self.labels, count, attack.source_label,
                                           attack.target_label, attack.grow_voxels, attack.seed)
            if int(self._target.max()) >= count or int(self._target.min()) < 0:
                raise InputError("the target holds labels outside 0..{}".format(count - 1))
        return self._target

    def loss_labels(self, outputs):
        return self.target(outputs) if self.targeted else self.labels

    def reduce(self, per_voxel, weights=None):
        """Per-volume mean over voxels (over the region with ``region_loss``), optionally weighted; targeted with
        ``target_weight`` w: w * mean over the voxels to change + (1 - w) * mean over those to keep."""
        if weights is not None:
            per_voxel = per_voxel * weights
        mask = None if self.loss_mask is None else self.loss_mask.expand_as(per_voxel).to(per_voxel.dtype)
        share = self.attack.target_weight
        if not self.targeted or share is None or self._target is None:
            return _mean(per_voxel, mask)
        mask = torch.ones_like(per_voxel) if mask is None else mask
        change = (self._target != self.labels).to(per_voxel.dtype) * mask
        keep = mask - change
        total = torch.zeros(per_voxel.shape[0], dtype=per_voxel.dtype, device=per_voxel.device)
        weight_sum = torch.zeros_like(total)
        for group, weight in ((change, share), (keep, 1.0 - share)):
            present = (group.flatten(start_dim=1).sum(dim=1) > 0).to(per_voxel.dtype) * weight
            total = total + present * _mean(per_voxel, group)
            weight_sum = weight_sum + present
        return total / weight_sum.clamp_min(_TINY)

    # gradient evaluations
    def plan(self, steps):
        self.total_steps = self.record.steps = steps

    def evaluate(self, point, loss):
        """``loss(outputs)`` per volume at ``point``: (values (B,), ascent gradient, detached outputs)."""
        check_cancel(self.is_cancelled)
        direction, kept = self.direction, {}

        def total(outputs):  # the per-volume values are kept: the loss is computed once
            kept["values"] = loss(outputs)
            return direction * kept["values"].sum()

        _, gradient, outputs = self.model.loss_and_gradient(point, total)
        values = kept["values"].detach()
        windows = getattr(self.model, "gradient_report", None)
        if windows:  # a windowed gradient: which windows were kept, which recomputed (the last evaluation's)
            self.record.details["windows"] = windows
        if self._label_count is None:
            self._label_count = max(label_count(outputs, self.activation), int(self.labels.max()) + 1)
        dice = foreground_dice(outputs, self.activation, self.labels, self._label_count)
        self.step += 1
        self.record.losses.append(float(values.mean()))
        self.record.dice.append(sum(dice) / len(dice))
        self.per_volume.append((values.tolist(), dice))
        if self.progress and torch.is_tensor(self.epsilon):  # one epsilon per volume: their values, in a list
            self.progress(self.step, self.total_steps, *self.per_volume[-1])
        elif self.progress:
            self.progress(self.step, self.total_steps, self.record.losses[-1], self.record.dice[-1])
        return values, gradient, outputs

    def records(self):
        """One :class:`AttackRecord` per volume (its epsilon, losses and Dice; the call's steps, seconds and
        details)."""
        record = self.record
        return [AttackRecord(record.attack, epsilon, record.steps, [losses[b] for losses, _ in self.per_volume],
                             record.seconds, [dice[b] for _, dice in self.per_volume], dict(record.details))
                for b, epsilon in enumerate(record.epsilon)]

    # geometry
    def masked(self, tensor):
        return tensor if self.voxel_region is None else tensor * self.voxel_region

    def project(self, candidate, norm):
        candidate = candidate.to(self.volume.dtype)
        if norm == "l2":
            return project_l2(candidate, self.volume, self.epsilon, self.bounds, self.voxel_region)
        if self._limits is None:
            self._limits = linf_limits(self.volume, self.epsilon, self.bounds, self.voxel_region)
        return torch.minimum(torch.maximum(candidate, self._limits[0]), self._limits[1])

    def ascend(self, point, gradient, size, norm):
        """``point`` moved by ``size`` (a number or per-volume (B,) tensor) along the steepest ascent direction
        of ``norm`` (gradient sign for L-infinity, normalised gradient for L2), then projected."""
        gradient = self.masked(gradient)
        if norm == "linf":
            direction = gradient.sign()
        else:
            direction = gradient / _norms(gradient, "l2").clamp_min(_TINY)
        if torch.is_tensor(size):
            size = size.view((-1,) + (1,) * (point.dim() - 1)).to(point.dtype)
        return self.project(point + size * direction, norm)

    def random_start(self, seed, norm):
        """A random point of the epsilon ball (seeded); with one epsilon per volume, each volume's noise is
        the noise it draws alone."""
        if torch.is_tensor(self.epsilon):
            noise = torch.cat([self._noise(seed, norm, b) for b in range(self.volume.shape[0])])
        else:
            noise = self._noise(seed, norm)
        return self.project(self.volume + self.masked(noise), norm)

    def _noise(self, seed, norm, index=None):
        """The random start's noise (in the volume's dtype) of every volume, or of volume ``index`` alone."""
        generator = torch.Generator().manual_seed(seed)
        volume, epsilon = self.volume, self.epsilon
        region = self.voxel_region
        if index is not None:
            volume, epsilon = volume[index:index + 1], epsilon[index:index + 1]
            region = None if region is None or len(region) == 1 else region[index:index + 1]
        if norm == "linf":
            noise = (torch.rand(volume.shape, generator=generator, dtype=volume.dtype) * 2.0 - 1.0).to(volume)
            return _in_dtype(epsilon, noise) * noise
        noise = torch.randn(volume.shape, generator=generator, dtype=torch.float64).to(volume.device)
        noise = noise if region is None else noise * region
        radius = torch.rand((volume.shape[0],), generator=generator, dtype=torch.float64).to(volume.device)
        return (noise / _norms(noise, "l2").clamp_min(_TINY) * epsilon * radius.view(-1, 1, 1, 1, 1)).to(volume)

    def score(self, point, criterion):
        """Per-volume badness of ``point`` for restarts (higher is worse for the network), one forward pass."""
        with torch.no_grad():
            outputs = self.model(point)
            if criterion == "loss":  # the plain cross-entropy (towards the target when targeted)
                return (self.direction * Attack._loss(self.attack, self, outputs, 1, 1)).cpu()
            reference = self.target(outputs) if self.targeted else self.labels
            dice = torch.tensor(foreground_dice(outputs, self.activation, reference))
            return dice if self.targeted else -dice


def _epsilon(attack, epsilon, volume):
    """A number as a float; a list (one per volume, where the attack takes that) as a (B, 1, ..., 1) float64
    tensor, so that each volume's arithmetic is that of its number (float64, rounded to the volume's dtype
    where a Python number would be)."""
    if not isinstance(epsilon, (list, tuple)):
        return float(epsilon)
    if not attack.batches_strengths():
        raise InputError("{} takes one epsilon per call, got {}".format(attack.name, len(epsilon)))
    if len(epsilon) != volume.shape[0]:
        raise InputError("{} epsilons for {} volumes: give one per volume".format(len(epsilon), volume.shape[0]))
    values = torch.tensor([float(e) for e in epsilon], dtype=torch.float64, device=volume.device)
    return values.view((-1,) + (1,) * (volume.dim() - 1))


def _listed(epsilon):
    """A float as is, a per-volume tensor as a list of floats."""
    return epsilon.flatten().tolist() if torch.is_tensor(epsilon) else epsilon


def _in_dtype(value, like):
    """A number as is; a per-volume float64 tensor rounded to ``like``'s dtype, as torch rounds a Python number
    that multiplies a tensor (so that the arithmetic is the same)."""
    return value.to(like.dtype) if torch.is_tensor(value) else value


def _mean(per_voxel, mask=None):
    """Per-volume mean of ``per_voxel`` over ``mask`` (all voxels where None; 0 where the mask is empty); a
    classifier's per-volume losses (B,) as they are."""
    if per_voxel.dim() == 1:
        return per_voxel
    if mask is None:
        return per_voxel.flatten(start_dim=1).sum(dim=1) / float(max(per_voxel[0].numel(), 1))
    return (per_voxel * mask).flatten(start_dim=1).sum(dim=1) / mask.flatten(start_dim=1).sum(dim=1).clamp_min(1.0)


def check_cancel(is_cancelled):
    if is_cancelled is not None and is_cancelled():
        raise AttackCancelled()


def _select(better, new, old):
    """Per volume: ``new`` where ``better`` (B,) else ``old``."""
    return torch.where(better.view((-1,) + (1,) * (new.dim() - 1)).to(new.device), new, old)


# --- attacks -------------------------------------------------------------------------------------------------------

@dataclass
class FGSM(Attack):
    name: ClassVar[str] = "fgsm"
    summary: ClassVar[str] = ("Fast Gradient Sign Method (Goodfellow et al. 2015): one L-infinity step of epsilon "
                              "along the sign of the cross-entropy gradient")

    def batches_strengths(self):
        return True

    def run(self, context):
        context.plan(1)
        _, gradient, _ = context.evaluate(context.volume, lambda out: self._loss(context, out, 1, 1))
        return context.ascend(context.volume, gradient, context.epsilon, "linf")


@dataclass
class PGD(Attack):
    name: ClassVar[str] = "pgd"
    summary: ClassVar[str] = ("Projected Gradient Descent (Madry et al. 2018), L-infinity (sign steps) or L2 "
                              "(normalised steps), on the per-voxel cross-entropy")

    steps: int = parameter(10, int, "iterations (gradient evaluations) per restart", minimum=1)
    norm: str = parameter("linf", str, "threat model", choices=NORMS)
    step_size: Optional[float] = parameter(None, float, "step as a fraction of epsilon (default 2.5/steps)",
                                           above=0.0)
    random_start: bool = parameter(True, bool, "start at a random point of the epsilon ball (seeded)")
    restarts: int = parameter(1, int, "random restarts; per volume the worst case is kept", minimum=1)
    restart_criterion: str = parameter("dice", str, "worst case of the restarts: lowest mean Dice against the "
                                       "labels (targeted: highest against the target) or highest loss",
                                       choices=RESTART_CRITERIA)

    def __post_init__(self):
        super().__post_init__()
        if self.restarts > 1 and not self.random_start:
            raise InputError("{}: restarts need random_start (without it every restart is the same)".format(
                self.name))

    def batches_strengths(self):
        return self.restarts == 1  # restarts run one epsilon at a time

    def run(self, context):
        context.plan(self.steps * self.restarts)
        size = (self.step_size if self.step_size is not None else 2.5 / self.steps) * context.epsilon
        best, best_score, scores = None, None, []
        for restart in range(self.restarts):
            point = context.random_start(self.seed + restart, self.norm) if self.random_start else context.volume
            for step in range(1, self.steps + 1):
                _, gradient, _ = context.evaluate(point, lambda out: self._loss(context, out, step, self.steps))
                point = context.ascend(point, gradient, size, self.norm)
            if self.restarts == 1:
                return point
            score = context.score(point, self.restart_criterion)
            scores.append([float(s) for s in score])
            if best is None:
                best, best_score = point, score
            else:
                better = score > best_score
                best, best_score = _select(better, point, best), torch.where(better, score, best_score)
        context.record.details["restart_scores"] = scores
        return best


@dataclass
class SegPGD(PGD):
    name: ClassVar[str] = "segpgd"
    tasks: ClassVar[tuple] = ("segmentation",)
    summary: ClassVar[str] = ("SegPGD (Gu et al. ECCV 2022): PGD on (1-l)*CE over correctly classified voxels + "
                              "l*CE over misclassified ones, l = (t-1)/(2T)")

    def _loss(self, context, outputs, step, steps):
        weight = (step - 1) / (2.0 * steps)
        wanted = context.loss_labels(outputs)
        done = predict_labels(outputs.detach(), context.activation) == wanted
        # untargeted: "correct" voxels still carry their label; targeted: voxels already at their target.
        first = ~done if context.targeted else done
        weights = torch.where(first, 1.0 - weight, weight).to(outputs.dtype)
        return context.reduce(voxel_loss(outputs, wanted, context.activation), weights)


@dataclass
class CosPGD(PGD):
    name: ClassVar[str] = "cospgd"
    tasks: ClassVar[tuple] = ("segmentation",)
    summary: ClassVar[str] = ("CosPGD (Agnihotri et al. ICML 2024): PGD on the per-voxel CE weighted by the "
                              "(detached) cosine similarity of the class probabilities and the one-hot labels "
                              "(targeted: 1 - cosine to the target)")

    def _loss(self, context, outputs, step, steps):
        wanted = context.loss_labels(outputs)
        probabilities = class_probabilities(outputs.detach(), context.activation)
        one_hot = F.one_hot(wanted, probabilities.shape[1]).movedim(-1, 1).to(probabilities.dtype)
        cosine = F.cosine_similarity(probabilities, one_hot, dim=1, eps=_TINY)
        weights = 1.0 - cosine if context.targeted else cosine
        return context.reduce(voxel_loss(outputs, wanted, context.activation), weights)


def apgd_checkpoints(steps):
    """APGD's checkpoint iterations w_j = ceil(p_j * steps): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), for 0 < w_j < steps."""
    previous, current, points = 0.0, 0.22, []
    while current < 1.0:
        point = math.ceil(round(current * steps, 9))
        if 0 < point < steps and point not in points:
            points.append(point)
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return points


@dataclass
class APGD(Attack):
    name: ClassVar[str] = "apgd"
    summary: ClassVar[str] = "Auto-PGD (Croce & Hein 2020)"
    loss_name: ClassVar[str] = "ce"

    steps: int = parameter(10, int, "gradient evaluations per restart", minimum=2)
    norm: str = parameter("linf", str, "threat model", choices=NORMS)
    random_start: bool = parameter(True, bool, "start at a random point of the epsilon ball (seeded)")
    restarts: int = parameter(1, int, "random restarts; per volume the highest loss is kept", minimum=1)
    step_size: float = parameter(2.0, float, "initial step as a fraction of epsilon (the paper's 2)", above=0.0)
    momentum: float = parameter(0.75, float, "weight alpha of the new step (1 - alpha: momentum)", above=0.0)
    rho: float = parameter(0.75, float, "halve the step when fewer than rho of the steps since the last "
                        "checkpoint raised the loss", minimum=0.0)

    def _loss(self, context, outputs, step, steps):
        if self.loss_name == "ce":
            return super()._loss(context, outputs, step, steps)
        scores = class_scores(outputs, context.activation)
        target = context.target(outputs) if context.targeted else None
        return context.reduce(dlr_loss(scores, context.labels, target))

    def run(self, context):
        context.plan(self.steps * self.restarts)
        best, best_value = None, None
        for restart in range(self.restarts):
            point, value = self._run(context, restart)
            if best is None:
                best, best_value = point, value
            else:
                better = value > best_value
                best, best_value = _select(better, point, best), torch.where(better, value, best_value)
        return best

    def _run(self, context, restart):
        """One APGD run; returns the best point evaluated and its (ascent) objective per volume."""
        loss = lambda out: self._loss(context, out, 1, 1)
        sign = context.direction
        point = context.random_start(self.seed + restart, self.norm) if self.random_start else context.volume
        values, gradient, _ = context.evaluate(point, loss)
        value = sign * values
        best, best_value, best_gradient = point, value, gradient
        batch = point.shape[0]
        eta = torch.full((batch,), self.step_size * context.epsilon, dtype=torch.float64, device=value.device)
        previous = point
        checkpoints = set(apgd_checkpoints(self.steps))
        successes = torch.zeros_like(value)
        last_check, eta_at_check, best_at_check = 0, eta.clone(), best_value.clone()
        halvings = []
        for k in range(1, self.steps):
            z = context.ascend(point, gradient, eta, self.norm)
            if k == 1:
                candidate = z
            else:
                alpha = self.momentum
                candidate = context.project(point + alpha * (z - point) + (1.0 - alpha) * (point - previous),
                                            self.norm)
            values, new_gradient, _ = context.evaluate(candidate, loss)
            new_value = sign * values
            successes += (new_value > value).float()
            improved = new_value > best_value
            best = _select(improved, candidate, best)
            best_gradient = _select(improved, new_gradient, best_gradient)
            best_value = torch.where(improved, new_value, best_value)
            previous, point, gradient, value = point, candidate, new_gradient, new_value
            if k in checkpoints:
                # the paper's conditions: too few of the steps since the last checkpoint raised the loss, or
                # neither the step size (as it was at the last checkpoint) nor the best loss changed since
                too_few = successes < self.rho * (k - last_check)
                stalled = (eta == eta_at_check) & (best_value == best_at_check)
                halve = too_few | stalled
                eta_at_check, best_at_check = eta.clone(), best_value.clone()
                eta = torch.where(halve, eta / 2.0, eta)
                # x^(k+1) <- x_max; the momentum of the next step still uses x^(k+1) - x^(k)
                point, gradient = _select(halve, best, point), _select(halve, best_gradient, gradient)
                value = torch.where(halve, best_value, value)
                halvings.append([k, [bool(h) for h in halve]])
                successes.zero_()
                last_check = k
        details = context.record.details
        details.setdefault("checkpoints", sorted(checkpoints))
        details.setdefault("halvings", []).append(halvings)
        details.setdefault("best_objective", []).append([float(v) for v in best_value])
        return best, best_value


@dataclass
class APGDCE(APGD):
    name: ClassVar[str] = "apgd-ce"
    summary: ClassVar[str] = ("Auto-PGD (Croce & Hein 2020) on the per-voxel cross-entropy: checkpoint step "
                              "halving, momentum 0.75, restart from the best point")
    loss_name: ClassVar[str] = "ce"


@dataclass
class APGDDLR(APGD):
    name: ClassVar[str] = "apgd-dlr"
    summary: ClassVar[str] = ("Auto-PGD (Croce & Hein 2020) on the Difference of Logits Ratio, per voxel and "
                              "averaged (targeted: the targeted DLR); needs >= 3 labels (targeted >= 4)")
    loss_name: ClassVar[str] = "dlr"


@dataclass
class DAG(Attack):
    """Dense Adversary Generation. Each iteration: active voxels = those still predicted as their label whose
    target is another label; r = gradient of sum_active (z_target - z_label) (logits-like scores); step
    gamma * epsilon * r / |r|inf, projected on the epsilon ball and the bounds; stop when no voxel is active.

    ``gamma`` is relative to epsilon (the paper's 0.5 was in 0-255 pixel units), so the attack does not depend
    on the intensity scale. ``scale_quantile`` < 1 divides r by that quantile of |r| and clips to [-1, 1]
    instead, so that the few largest entries of r do not set the step of all the others.
    """
    tasks: ClassVar[tuple] = ("segmentation",)
    name: ClassVar[str] = "dag"
    summary: ClassVar[str] = ("Dense Adversary Generation (Xie et al. ICCV 2017): per-voxel adversarial targets; "
                              "r = grad sum over the active voxels of (z_target - z_label), step gamma*eps*r/|r|inf, "
                              "until no voxel is active; always targeted (default: random label permutation)")

    target_mode: Optional[str] = parameter("permute", str, "target map built from the labels", choices=TARGET_MODES)
    steps: int = parameter(20, int, "maximum iterations", minimum=1)
    gamma: float = parameter(0.5, float, "L-infinity size of each step as a fraction of epsilon", above=0.0)
    scale_quantile: float = parameter(1.0, float, "r is divided by this quantile of |r| and clipped to [-1, 1] "
                                      "(1: the paper's r/|r|inf)", minimum=0.0)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.scale_quantile <= 1.0:
            raise InputError("dag scale_quantile must be in (0, 1], got {:g}".format(self.scale_quantile))

    def direction(self, gradient):
        """The step direction r / s clipped to [-1, 1], s the ``scale_quantile`` quantile of |r| per volume
        (the attacked voxels' only); with quantile 1, s = |r|inf and this is the paper's r / |r|inf."""
        if self.scale_quantile >= 1.0:
            return gradient / _norms(gradient, "linf").clamp_min(_TINY)
        scales = []
        for b in range(gradient.shape[0]):
            values = gradient[b].abs().flatten()
            values = values[values > 0] if bool((values > 0).any()) else values
            rank = max(1, math.ceil(self.scale_quantile * values.numel()))
            scales.append(values.kthvalue(rank).values.clamp_min(_TINY))
        scale = torch.stack(scales).view((-1,) + (1,) * (gradient.dim() - 1))
        return (gradient / scale).clamp(-1.0, 1.0)

    def _loss(self, context, outputs, step, steps):
        """Per volume: sum over active voxels of z_target - z_label (DAG raises it)."""
        scores = class_scores(outputs, context.activation)
        target = context.target(outputs)
        active = self.active(context, outputs)
        margin = scores.gather(1, target[:, None])[:, 0] - scores.gather(1, context.labels[:, None])[:, 0]
        return (margin * active.to(margin.dtype)).flatten(start_dim=1).sum(dim=1)

    def active(self, context, outputs):
        """Voxels still predicted as their label whose target is another label (within the region with
        ``region_loss``)."""
        prediction = predict_labels(outputs.detach(), context.activation)
        active = (prediction == context.labels) & (context.target(outputs) != context.labels)
        if context.loss_mask is not None:
            active = active & context.loss_mask
        return active

    def run(self, context):
        if not context.targeted:
            raise InputError("dag needs a target map or a target mode")
        context.direction = 1.0  # DAG raises z_target - z_label itself
        context.plan(self.steps)
        point, counts = context.volume, []
        for _ in range(self.steps):
            _, gradient, outputs = context.evaluate(point, lambda out: self._loss(context, out, 1, 1))
            active = self.active(context, outputs)
            counts.append(int(active.sum()))
            if counts[-1] == 0:
                break
            gradient = context.masked(gradient)
            step = self.gamma * context.epsilon * self.direction(gradient)
            point = context.project(point + step, "linf")
        context.record.details["active"] = counts
        context.record.details["iterations"] = len(counts)
        return point


ATTACKS = {attack.name: attack for attack in (FGSM, PGD, SegPGD, CosPGD, APGDCE, APGDDLR, DAG)}


def describe_attacks():
    """Every attack with its summary and its parameters with their defaults, as text."""
    lines = []
    for name in sorted(ATTACKS):
        attack_class = ATTACKS[name]
        lines.append("{}: {}".format(name, attack_class.summary))
        for item in attack_class.parameters():
            choices = " ({})".format("|".join(item.choices)) if item.choices else ""
            lines.append("    {:<18} default {:<8} {}{}".format(item.name, value_text(item.default), item.help,
                                                               choices))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
