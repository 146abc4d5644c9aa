"""Gradient-masking check: is a network's white-box robustness real, or do its own gradients mislead the attack?

For each target network, on held-out case 1 at one epsilon: PGD on the target itself (white box, with more steps
and restarts than the study), and the adversarial volumes PGD made on each other network, transferred to the
target. A transfer attack that hurts the target more than its own white-box attack points to gradient masking
(Athalye et al. 2018). Prints one table of mean foreground Dice against the reference.

    python benchmarks/transfer_check.py [--epsilon 0.02] [--steps 20]
"""
import argparse
import dataclasses

import numpy as np

from MedAdvRobustnessLib.probes.registry import make_probe
from MedAdvRobustnessLib.study.cases import heldout_volume
from MedAdvRobustnessLib.evaluation.metrics import dice_per_label
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.evaluation.sweep import run_sweep

NETWORKS = ["demo-unet", "demo-unet-short", "demo-segresnet", "demo-attentionunet", "demo-slicewise2d"]


def mean_dice(model, volume, reference):
    import torch
    with model.on_grid(volume):
        prediction = model.predict(volume.as_tensor())[0]
    scores = dice_per_label(prediction, torch.from_numpy(reference), 4)
    return float(np.mean([scores[label] for label in (1, 2, 3)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=2)
    args = parser.parse_args()
    volume, reference = heldout_volume(1)
    models = {name: load_model(name) for name in NETWORKS}
    adversarial = {}
    for name, model in models.items():
        attack = make_probe("pgd", steps=args.steps, restarts=args.restarts, seed=0)
        with model.on_grid(volume):
            result = run_sweep(model, volume, attack, [args.epsilon], reference)
        adversarial[name] = dataclasses.replace(volume, array=result.outcomes[-1].probed.astype(np.float32))
        print("made PGD volume on", name, flush=True)
    print("\nmean foreground Dice of the target (rows) on PGD-{} epsilon {} volumes made on the source (columns)"
          .format(args.steps, args.epsilon))
    print("| target | clean | " + " | ".join(NETWORKS) + " |")
    print("|---" * (len(NETWORKS) + 2) + "|")
    for target, model in models.items():
        cells = ["{:.3f}".format(mean_dice(model, volume, reference))]
        for source in NETWORKS:
            value = mean_dice(model, adversarial[source], reference)
            cells.append(("**{:.3f}**" if source == target else "{:.3f}").format(value))
        print("| {} | {} |".format(target, " | ".join(cells)))


if __name__ == "__main__":
    main()
