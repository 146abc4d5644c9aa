"""Minimal-perturbation attacks on classifiers: DeepFool (L2 and L-infinity) and the saliency map attack (JSMA).

DeepFool (Moosavi-Dezfooli et al. 2016) linearises the class scores around the current point and steps, with an
``overshoot``, across the nearest linearised decision boundary, until the class flips or ``steps`` iterations are
done. As every attack it takes epsilon as the largest L-infinity perturbation allowed: the search stops once it
is passed and the result is projected into it. What it changes is the network's decision (its clean prediction),
as the paper defines the minimal perturbation, whatever the true class. The perturbation at the flip is recorded
in ``record.details["minimal_perturbation"]`` (L2 and L-infinity, intensity units; None where nothing flipped
within epsilon). The saliency map attack records there the perturbation with which it reached its target.
"""
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..errors import InputError
from .attacks import Attack, _norms, class_scores, project_linf
from .parameters import parameter

_TINY = 1e-12


def perturbation_sizes(delta):
    """L2 and L-infinity size of one perturbation (intensity units)."""
    flat = delta.double().flatten()
    return {"l2": float(torch.linalg.vector_norm(flat)), "linf": float(flat.abs().max())}


def require_classifier(context):
    """InputError unless the attacked network is a classifier (one class per volume)."""
    if context.labels.dim() != 1:
        raise InputError("{} attacks classifiers (one class per volume); this network segments".format(
            context.attack.name))


@dataclass
class DeepFool(Attack):
    name: ClassVar[str] = "deepfool"
    summary: ClassVar[str] = ("DeepFool (Moosavi-Dezfooli et al. 2016): the minimal L2 perturbation that crosses the "
                              "nearest linearised decision boundary, with overshoot; classifiers only")
    tasks: ClassVar[tuple] = ("classification",)
    distance: ClassVar[str] = "l2"

    steps: int = parameter(50, int, "largest number of iterations", minimum=1)
    overshoot: float = parameter(0.02, float, "each step goes (1 + overshoot) times past the boundary", minimum=0.0)
    candidates: Optional[int] = parameter(None, int, "classes considered: the top scoring ones of the clean volume "
                                          "(none: all)", minimum=2)

    def run(self, context):
        require_classifier(context)
        if context.targeted:
            raise InputError("{} is untargeted (it changes the network's decision to the nearest other class); "
                             "drop --target-mode, or use jsma for a target class".format(self.name))
        volume = context.volume
        with torch.no_grad():
            clean = class_scores(context.model(volume), context.activation)
        decision = clean.argmax(dim=1)  # what DeepFool changes: the network's decision, as in the paper
        considered = self._considered(clean, decision)
        classes = torch.nonzero(considered.any(dim=0)).flatten().tolist()
        context.plan((self.steps + 1) * len(classes))
        point, active = volume.clone(), torch.ones(len(volume), dtype=torch.bool, device=volume.device)
        minimal = [None] * len(volume)
        for iteration in range(self.steps + 1):
            scores, gradients = self._scores_and_gradients(context, point, classes)
            flipped = scores.argmax(dim=1) != decision
            over = _norms(point - volume, "linf").flatten() > context.epsilon
            for b in torch.nonzero(active & flipped & ~over).flatten().tolist():
                minimal[b] = perturbation_sizes(point[b] - volume[b])
            active = active & ~flipped & ~over
            if iteration == self.steps or not bool(active.any()):
                break
            moved = self._step(context, point, scores, gradients, considered, decision)
            point = torch.where(active.view((-1,) + (1,) * (point.dim() - 1)), moved, point)
        context.record.details["minimal_perturbation"] = minimal[0] if len(minimal) == 1 else minimal
        context.record.details["iterations"] = iteration
        return project_linf(point, volume, context.epsilon, context.bounds)

    def _considered(self, scores, labels):
        """(B, K) mask of the classes each volume's search considers: all, or its label and the ``candidates - 1``
        other top-scoring classes of the clean volume."""
        if self.candidates is None or self.candidates >= scores.shape[1]:
            return torch.ones_like(scores, dtype=torch.bool)
        others = scores.scatter(1, labels[:, None], float("-inf")).topk(self.candidates - 1, dim=1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, others, True)
        return mask.scatter(1, labels[:, None], True)

    def _scores_and_gradients(self, context, point, classes):
        """Scores (B, K) at ``point`` and the gradient of each class score in ``classes``, (B, K, N) (zero for
        the others); one gradient evaluation per class."""
        scores, gradients = None, torch.zeros((len(point), 0), dtype=point.dtype, device=point.device)
        for k in classes:
            _, gradient, outputs = context.evaluate(point, lambda out, k=k: class_scores(out, context.activation)[:, k])
            if scores is None:
                scores = class_scores(outputs, context.activation)
                gradients = torch.zeros((len(point), scores.shape[1], point[0].numel()), dtype=gradient.dtype,
                                        device=gradient.device)
            gradients[:, k] = gradient.flatten(start_dim=1)
        return scores, gradients

    def _step(self, context, point, scores, gradients, considered, decision):
        """One DeepFool step per volume: towards each considered class, the smallest perturbation (in the attack's
        norm) that reaches ``1 + overshoot`` times the linearised boundary within the intensity bounds (see
        :func:`bounded_linear_step`); the nearest class's is taken. Where no bound is met it is DeepFool's own
        step; plain clipping would shorten the step instead and stall short of the boundary."""
        batch, own = torch.arange(len(point), device=point.device), decision
        gaps = (scores - scores[batch, own][:, None]).abs() * (1.0 + self.overshoot)  # (B, K)
        directions = gradients - gradients[batch, own][:, None]  # (B, K, N)
        flat = point.flatten(start_dim=1)[:, None, :].to(directions.dtype)
        deltas, reached = bounded_linear_step(directions, gaps, flat, context.bounds, self.distance)
        sizes = torch.linalg.vector_norm(deltas, ord=float("inf") if self.distance == "linf" else 2, dim=2)
        candidates = considered.clone()
        candidates[batch, own] = False
        reachable = candidates & reached
        choice = torch.where(reachable, sizes, torch.full_like(sizes, float("inf")))
        shortfall = torch.where(candidates, gaps - (deltas * directions).sum(dim=2), torch.full_like(sizes, float("inf")))
        nearest = torch.where(reachable.any(dim=1), choice.argmin(dim=1), shortfall.argmin(dim=1))
        moved = point + deltas[batch, nearest].view_as(point).to(point.dtype)
        return moved.clamp(*context.bounds).detach()



def bounded_linear_step(directions, gaps, point, bounds, distance):
    """The smallest perturbation d (L2 or L-infinity) with ``directions . d >= gaps`` and ``point + d`` within
    ``bounds``, per leading index: each voxel moves along the sign of its direction component by ``min(s * rate,
    room)`` (``rate`` its component's size for L2, 1 for L-infinity; ``room`` its distance to the bound it moves
    towards), the scalar ``s`` found exactly among the voxels' saturation points. Returns (d, reached): where the
    bounds do not allow ``gaps``, d moves every voxel to its bound and reached is False."""
    low, high = bounds
    sizes = directions.abs()
    room = torch.where(directions > 0, high - point, point - low).clamp_min(0.0)
    rates = sizes if distance == "l2" else (sizes > 0).to(sizes.dtype)
    reached = (sizes * room).sum(dim=-1) >= gaps
    saturation = room / rates.clamp_min(_TINY)  # where each voxel reaches its bound (voxels of rate 0 give nothing)
    saturation, order = saturation.sort(dim=-1)
    gain_before = torch.nn.functional.pad((sizes * room).gather(-1, order).cumsum(dim=-1), (1, 0))
    slope_after = (sizes * rates).sum(dim=-1, keepdim=True) - torch.nn.functional.pad(
        (sizes * rates).gather(-1, order).cumsum(dim=-1), (1, 0))
    gain_at = gain_before[..., 1:] + saturation * slope_after[..., 1:]  # the gain where voxel j saturates
    passed = (gain_at < gaps[..., None]).sum(dim=-1, keepdim=True)  # voxels saturated before the gap is reached
    scale = (gaps[..., None] - gain_before.gather(-1, passed)) / slope_after.gather(-1, passed).clamp_min(_TINY)
    scale = torch.where(reached[..., None], scale.clamp_min(0.0), torch.full_like(scale, float("inf")))
    moves = torch.where(rates > 0, torch.minimum(scale * rates, room), torch.zeros_like(room))
    return directions.sign() * moves, reached


@dataclass
class DeepFoolLinf(DeepFool):
    name: ClassVar[str] = "deepfool-linf"
    summary: ClassVar[str] = ("DeepFool, L-infinity variant (Moosavi-Dezfooli et al. 2016): the minimal L-infinity "
                              "perturbation that crosses the nearest linearised decision boundary; classifiers only")
    distance: ClassVar[str] = "linf"


@dataclass
class JSMA(Attack):
    """Targeted: each iteration raises the two voxels with the largest gradient of the target class's output
    among those below their ceiling (the upper bound, at most epsilon above the original) by ``theta`` (of the
    bounds' span; at most epsilon), as ART's ``SaliencyMapMethod`` chooses them, until the target is predicted,
    every voxel is at its ceiling, or one more pair would change more than ``max_fraction`` of the voxels (ART's
    ``gamma``)."""
    name: ClassVar[str] = "jsma"
    summary: ClassVar[str] = ("saliency map attack (JSMA, Papernot et al. 2016): raises the voxel pairs with the "
                              "largest target-class gradient until the target class is predicted; classifiers only")
    tasks: ClassVar[tuple] = ("classification",)
    target_label_alone: ClassVar[bool] = True  # the target class

    theta: float = parameter(0.1, float, "change per chosen voxel, fraction of the intensity range (at most "
                             "epsilon)", minimum=0.0)
    max_fraction: float = parameter(1.0, float, "largest share of the voxels changed (ART's gamma)", minimum=0.0)

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 < self.theta and 0.0 < self.max_fraction <= 1.0):
            raise InputError("jsma: theta must be positive and max_fraction in (0, 1], got theta {:g}, max_fraction "
                             "{:g}".format(self.theta, self.max_fraction))

    def run(self, context):
        require_classifier(context)
        low, high = context.bounds
        change = min(self.theta * (high - low), context.epsilon)
        original = context.volume.flatten(start_dim=1)
        ceiling = torch.clamp(original.double() + context.epsilon, max=high).to(original.dtype)
        flat, touched = original.clone(), torch.zeros_like(original, dtype=torch.bool)
        allowed = int(self.max_fraction * original.shape[1])
        context.plan(math.ceil(allowed / 2) * math.ceil(min(high - low, context.epsilon) / change))
        target = None
        while True:
            _, gradient, outputs = context.evaluate(flat.view_as(context.volume), lambda out: context.direction * out[
                :, self._target(context, out, target)])
            target = self._target(context, outputs, target)
            free = flat < ceiling
            chosen = gradient.flatten(start_dim=1).masked_fill(~free, float("-inf")).topk(2, dim=1).indices
            within = touched.scatter(1, chosen, True).sum(dim=1) <= allowed
            active = (outputs.argmax(dim=1) != target) & free.any(dim=1) & within
            if not bool(active.any()):
                break
            rows = torch.nonzero(active).flatten()[:, None]
            picked = chosen[rows[:, 0]]
            flat[rows, picked] = torch.minimum(flat[rows, picked] + change, ceiling[rows, picked])
            touched[rows, picked] = True
        context.record.details["changed_share"] = (touched.sum(dim=1).double() / original.shape[1]).tolist()
        reached = (outputs.argmax(dim=1) == target).tolist()
        minimal = [perturbation_sizes(flat[b] - original[b]) if hit else None for b, hit in enumerate(reached)]
        context.record.details["minimal_perturbation"] = minimal[0] if len(minimal) == 1 else minimal
        return project_linf(flat.view_as(context.volume), context.volume, context.epsilon, context.bounds)

    def _target(self, context, outputs, known):
        """The target class per volume: ``target_label``, the target map of ``target_mode``, else the next class."""
        if known is not None:
            return known
        if self.target_label is not None and self.target_mode is None:
            if not 0 <= self.target_label < outputs.shape[1]:
                raise InputError("jsma: target_label {} is not a class of this network (0..{})".format(
                    self.target_label, outputs.shape[1] - 1))
            return torch.full_like(context.labels, self.target_label)
        if context.targeted:
            return context.target(outputs)
        return (context.labels + 1) % outputs.shape[1]


ATTACKS = {attack.name: attack for attack in (DeepFool, DeepFoolLinf, JSMA)}
