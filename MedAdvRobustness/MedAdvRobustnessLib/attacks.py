"""Untargeted L-infinity attacks on dense (per-voxel) segmentation outputs, in the volume's intensity space.

Every attack has one call shape::

    adversarial, record = attack(model, volume, labels, epsilon, bounds, progress=None, is_cancelled=None)

``volume`` is (1, C, X, Y, Z) raw intensities, ``labels`` (1, X, Y, Z) integer labels for the loss, ``epsilon``
the L-infinity budget in intensity units, ``bounds`` the (low, high) intensities the result is clipped to.
``progress(step, steps, loss)`` is called after each iteration; ``is_cancelled()`` is checked between
iterations and stops the attack with :class:`AttackCancelled`.
"""
import time
from dataclasses import dataclass, field
from typing import List

import torch

from .errors import InputError
from .outputs import voxel_loss


class AttackCancelled(Exception):
    """The attack was cancelled between two iterations."""


@dataclass
class AttackRecord:
    """What happened during an attack."""
    attack: str
    epsilon: float
    steps: int
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0


def project_linf(candidate, original, epsilon, bounds):
    """Closest point to ``candidate`` with |x - original| <= epsilon and low <= x <= high, exactly in float.

    Projected in float64, then rounded to the volume's dtype; a voxel that rounding pushed past epsilon
    (by at most half a unit in the last place) steps one float back toward the original.
    """
    original64 = original.double()
    delta = (candidate.double() - original64).clamp(-epsilon, epsilon)
    projected = (original64 + delta).clamp(*bounds).to(candidate.dtype)
    overshoot = (projected.double() - original64).abs() > epsilon
    return torch.where(overshoot, torch.nextafter(projected, original), projected)


def loss_and_gradient(model, volume, labels):
    """Mean per-voxel cross-entropy of the model's outputs and its gradient with respect to the volume."""
    loss, gradient, _ = model.loss_and_gradient(volume, lambda outputs: voxel_loss(outputs, labels,
                                                                                  model.activation).mean())
    return loss, gradient


class FGSM:
    """Fast Gradient Sign Method (Goodfellow et al., 2015): one step of size epsilon along the gradient sign."""
    name = "fgsm"

    def __call__(self, model, volume, labels, epsilon, bounds, progress=None, is_cancelled=None):
        start = time.time()
        _check_cancel(is_cancelled)
        loss, gradient = loss_and_gradient(model, volume, labels)
        adversarial = project_linf(volume + epsilon * gradient.sign(), volume, epsilon, bounds)
        if progress:
            progress(1, 1, loss)
        return adversarial.detach(), AttackRecord(self.name, epsilon, 1, [loss], time.time() - start)


class PGD:
    """Projected Gradient Descent, L-infinity (Madry et al., 2018): random start, step 2.5 * epsilon / steps."""
    name = "pgd"

    def __init__(self, steps=10, seed=0, random_start=True):
        if steps < 1:
            raise InputError("PGD needs at least one step")
        self.steps = steps
        self.seed = seed
        self.random_start = random_start

    def __call__(self, model, volume, labels, epsilon, bounds, progress=None, is_cancelled=None):
        start = time.time()
        step_size = 2.5 * epsilon / self.steps
        adversarial = volume.detach()
        if self.random_start:
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.rand(volume.shape, generator=generator, dtype=volume.dtype) * 2.0 - 1.0
            adversarial = project_linf(volume + epsilon * noise.to(volume.device), volume, epsilon, bounds)
        losses = []
        for step in range(1, self.steps + 1):
            _check_cancel(is_cancelled)
            loss, gradient = loss_and_gradient(model, adversarial, labels)
            adversarial = project_linf(adversarial + step_size * gradient.sign(), volume, epsilon, bounds)
            losses.append(loss)
            if progress:
                progress(step, self.steps, loss)
        return adversarial.detach(), AttackRecord(self.name, epsilon, self.steps, losses, time.time() - start)


ATTACKS = {"fgsm": FGSM, "pgd": PGD}


def make_attack(name, steps=10, seed=0):
    """An attack by name with its parameters."""
    if name == "fgsm":
        return FGSM()
    if name == "pgd":
        return PGD(steps=steps, seed=seed)
    raise InputError("unknown attack {!r}; expected one of {}".format(name, sorted(ATTACKS)))


def _check_cancel(is_cancelled):
    if is_cancelled is not None and is_cancelled():
        raise AttackCancelled()
