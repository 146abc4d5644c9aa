"""Reproducible training of the demo classifier: axial slices of the embedded MNI152 T1 by anatomical level.

Each axial slice of the 2 mm sample, averaged to 4 mm in plane (40x48), is classed by the MNI z of its centre
(:data:`LEVELS`): below the lateral ventricles (posterior fossa, temporal lobes, basal ganglia floor; z < 0 mm),
the lateral ventricles (bodies and frontal horns, 0 <= z < 30 mm) and above them (centrum semiovale to the
vertex, z >= 30 mm); slices with less than 10 % brain are left out. Every fourth slice is held out (never
trained on) and is scored under an augmentation seed of its own. ``medadv train --task classification --out DIR``
runs it; the shipped ``Resources/Models/demo-classifier`` came from ``medadv train --task classification --out
MedAdvRobustness/MedAdvRobustnessLib/Resources/Models/demo-classifier``.
"""
import time
from pathlib import Path

import numpy as np
import torch

from .networks.models import Label, ModelDescription, build_network
from .sample import SAMPLE_DIR, SAMPLE_LABELS, SAMPLE_VOLUME
from .training import staged_model_folder, write_model_files, write_weights

LEVELS = (("below the lateral ventricles", None, 0.0), ("lateral ventricles", 0.0, 30.0),
          ("above the lateral ventricles", 30.0, None))
LEVEL_COLORS = [(0.45, 0.80, 0.45), (0.30, 0.55, 0.95), (0.95, 0.65, 0.20)]
ARCHITECTURE = {"name": "DenseNet", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": len(LEVELS),
                                             "init_features": 8, "growth_rate": 8, "block_config": [2, 2, 2],
                                             "bn_size": 2}}
INTENSITY = {"type": "percentile", "lower": 0.0, "upper": 99.5}
IN_PLANE = 2  # 2 mm voxels averaged 2x2 in plane: 40x48 at 4 mm
HELD_OUT_EVERY = 4
MIN_BRAIN = 0.10
SLICE_DIR = SAMPLE_DIR / "classification"
TRAINING_SEED_OFFSET, HELD_OUT_SEED_OFFSET = 0, 1000


def level_of(z_mm):
    """Class index of an axial slice whose centre lies at MNI ``z_mm``."""
    for index, (_, low, high) in enumerate(LEVELS):
        if (low is None or z_mm >= low) and (high is None or z_mm < high):
            return index
    raise ValueError(z_mm)


def axial_slices():
    """(slices (N, 40, 48) raw float, classes (N,), slice affines (N, 4, 4), slice indices) of the sample."""
    import nibabel as nib
    image = nib.load(str(SAMPLE_VOLUME))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    brain = np.asarray(nib.load(str(SAMPLE_LABELS)).dataobj) > 0
    f = IN_PLANE
    sx, sy = volume.shape[0] // f, volume.shape[1] // f
    slices, classes, affines, indices = [], [], [], []
    for k in range(volume.shape[2]):
        if brain[:, :, k].mean() < MIN_BRAIN:
            continue
        plane = volume[:sx * f, :sy * f, k].reshape(sx, f, sy, f).mean(axis=(1, 3))
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.array([0.5 * (f - 1), 0.5 * (f - 1), k]) + image.affine[:3, 3]
        affine[:3, :2] *= f
        slices.append(plane)
        classes.append(level_of(float(affine[2, 3])))
        affines.append(affine)
        indices.append(k)
    return np.stack(slices), np.array(classes), np.stack(affines), np.array(indices)


def split(indices):
    """Boolean mask of the held-out slices: every HELD_OUT_EVERY-th axial slice (never trained on)."""
    return indices % HELD_OUT_EVERY == HELD_OUT_EVERY // 2


def augmented(slices, count, seed):
    """``count`` augmented, model-normalised slices drawn from ``slices``: (count, 1, X, Y) and their indices.

    Batched in torch, seeded: small rotations (±0.2 rad), scaling (±8 %) and shifts (±2 voxels), a smooth bias
    field, intensity scale (±30 %) and offset, Gaussian noise; then the model's intensity normalisation."""
    from .networks.preprocessing import normalize_intensity
    generator = torch.Generator().manual_seed(seed)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    choice = torch.randint(0, len(slices), (count,), generator=generator)
    images = torch.as_tensor(slices, dtype=torch.float32)[choice][:, None]
    size = torch.tensor(images.shape[2:], dtype=torch.float32)
    angle, scale = uniform(-0.2, 0.2, count), 1 + uniform(-0.08, 0.08, count)
    shift = uniform(-2.0, 2.0, count, 2) * 2 / size
    theta = torch.stack([torch.stack([angle.cos() * scale, -angle.sin() * scale, shift[:, 0]], 1),
                         torch.stack([angle.sin() * scale, angle.cos() * scale, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    images = torch.nn.functional.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    x, y = grid[..., 1], grid[..., 0]
    bias = uniform(-0.3, 0.3, count, 3, 1, 1)
    images = images * torch.exp(bias[:, 0] * x + bias[:, 1] * y + bias[:, 2] * x * y)[:, None]
    images = images * (1 + uniform(-0.3, 0.3, count, 1, 1, 1)) + uniform(-40.0, 40.0, count, 1, 1, 1)
    images = images + uniform(0.0, 25.0, count, 1, 1, 1) * torch.randn(images.shape, generator=generator)
    return torch.stack([normalize_intensity(image[None], INTENSITY)[0] for image in images]), choice


def description(name="demo-classifier"):
    labels = [Label(value, level[0], color) for value, (level, color) in enumerate(zip(LEVELS, LEVEL_COLORS))]
    return ModelDescription(name=name, labels=labels, output_activation="logits", intensity=dict(INTENSITY),
                            architecture=dict(ARCHITECTURE), spacing=None, task="classification",
                            notes="Axial level of a 40x48 axial slice at 4 mm (MNI152 2009 T1): below, at or above "
                                  "the lateral ventricles. A demo of one subject's anatomy under augmentation, "
                                  "trained by MedAdvRobustnessLib.classification_training; not a clinical model.")


def accuracy(network, images, classes):
    network.eval()
    with torch.no_grad():
        return float((network(images).argmax(1) == classes).float().mean())


def train(out_dir, iterations=120, seed=0, learning_rate=3e-3, batch_size=16, name="demo-classifier",
          progress=print, held_out_count=300):
    """Train, score on the held-out slices, and write ``model.json``, ``model.pt``, ``training.json``."""
    staged = staged_model_folder(out_dir)
    torch.manual_seed(seed)
    slices, classes, _, indices = axial_slices()
    held_out = split(indices)
    train_slices, train_classes = slices[~held_out], torch.as_tensor(classes[~held_out])
    start = time.time()
    images, chosen = augmented(train_slices, iterations * batch_size, seed + TRAINING_SEED_OFFSET)
    targets = train_classes[chosen]
    network = build_network(ARCHITECTURE)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=iterations)
    losses = []
    network.train()
    for step in range(iterations):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(network(images[batch]), targets[batch])
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == iterations:
            progress("step {}/{} loss {:.4f} ({:.0f} s)".format(step + 1, iterations, np.mean(losses[-50:]),
                                                              time.time() - start))
    score = held_out_accuracy(network, seed, held_out_count)
    progress("held-out accuracy: {:.4f} ({} augmented held-out slices)".format(score, held_out_count))
    log = {"architecture": ARCHITECTURE, "iterations": iterations, "batch_size": batch_size, "seed": seed,
           "learning_rate": learning_rate, "seconds": round(time.time() - start, 1),
           "held_out_accuracy": round(score, 4), "held_out_count": held_out_count,
           "held_out_slices": [int(k) for k in indices[held_out]], "loss_every_50": losses[49::50],
           "parameters": sum(p.numel() for p in network.parameters()), "torch": torch.__version__}
    with staged as folder:
        write_weights(folder / "model.pt", lambda: torch.save(network.state_dict(), str(folder / "model.pt")))
        write_model_files(folder, description(name), log)
    return score


def held_out_accuracy(network, seed=0, count=300):
    """Accuracy on ``count`` augmented held-out slices (an augmentation seed of their own)."""
    slices, classes, _, indices = axial_slices()
    held_out = split(indices)
    images, chosen = augmented(slices[held_out], count, seed + HELD_OUT_SEED_OFFSET)
    return accuracy(network, images, torch.as_tensor(classes[held_out])[chosen])


def write_sample_slices(out_dir=SLICE_DIR):
    """One unaugmented held-out slice per class as a 40x48x1 NIfTI volume with its MNI affine."""
    import nibabel as nib
    slices, classes, affines, indices = axial_slices()
    held_out = np.flatnonzero(split(indices))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for level in range(len(LEVELS)):
        chosen = held_out[classes[held_out] == level]
        i = chosen[len(chosen) // 2]
        image = nib.Nifti1Image(np.round(slices[i][:, :, None]).astype(np.int16), affines[i])
        image.set_qform(affines[i], code=1)
        image.set_sform(affines[i], code=1)
        path = out_dir / "MNI152_T1_axial_z{:+.0f}mm.nii.gz".format(affines[i][2, 3])
        nib.save(image, str(path))
        paths.append(path)
    return paths
