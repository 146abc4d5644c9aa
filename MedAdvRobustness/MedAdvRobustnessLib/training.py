"""Reproducible training of the demo tissue segmentation networks on the embedded sample.

One subject (the MNI152 template) with strong augmentation: affine and flips, bias field, gamma, noise,
blur, random 64^3 patches. ``medadv train --out DIR`` runs it; the committed demo weights came from
``medadv train --out MedAdvRobustness/MedAdvRobustnessLib/Resources/Models/demo-unet`` (see its model.json).
``--architecture`` picks another family (:data:`ARCHITECTURES`) trained with the same recipe: MONAI SegResNet,
AttentionUnet, or a 2D UNet applied slice by slice (in the spirit of QuickNAT), saved as TorchScript.
"""
import errno
import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import InputError
from .networks.models import Label, ModelDescription, SegmentationModel, build_network
from .sample import SAMPLE_LABELS, SAMPLE_VOLUME, TISSUE_LABELS

ARCHITECTURE = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4,
                                         "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                                         "num_res_units": 2}}
# Inference of the other families: the whole volume at once. Zero-padding the 80x96x80 sample into the demo's
# 96^3 window (8 planes on two axes) costs every network Dice on it, SegResNet most (GM 0.85 -> 0.49).
WHOLE_VOLUME = {"window": None, "pad_divisible": 8}
ARCHITECTURES = {
    "unet": ARCHITECTURE,
    "segresnet": {"name": "SegResNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4,
                                                "init_filters": 8, "blocks_down": [1, 2, 2, 4],
                                                "blocks_up": [1, 1, 1]},
                  "inference": WHOLE_VOLUME},
    "attentionunet": {"name": "AttentionUnet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4,
                                                        "channels": [16, 32, 64, 128], "strides": [2, 2, 2]},
                      "inference": WHOLE_VOLUME},
    "slicewise2d": {"name": "UNet", "slicewise": True,
                    "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 4, "channels": [16, 32, 64, 128],
                             "strides": [2, 2, 2], "num_res_units": 2},
                    "inference": WHOLE_VOLUME},
}
TISSUE_COLORS = [(0.0, 0.0, 0.0), (0.30, 0.55, 0.95), (0.85, 0.45, 0.35), (0.95, 0.90, 0.55)]
INTENSITY = {"type": "percentile", "lower": 0.0, "upper": 99.5}
PATCH = (64, 64, 64)


def demo_description(name="demo-unet", architecture=ARCHITECTURE):
    labels = [Label(value, name, color) for value, (name, color) in enumerate(zip(TISSUE_LABELS, TISSUE_COLORS))]
    return ModelDescription(name=name, labels=labels, output_activation="logits", intensity=dict(INTENSITY),
                            window={"roi_size": [96, 96, 96], "overlap": 0.25}, architecture=architecture,
                            spacing=[2.0, 2.0, 2.0],
                            notes="Brain tissue segmentation (CSF, grey matter, white matter) trained by "
                                  "MedAdvRobustnessLib.training on the MNI152 2009 T1 template at 2 mm.")


class SliceWise(torch.nn.Module):
    """A 2D network applied to each axial (last-axis) slice of a (B, C, X, Y, Z) volume, like QuickNAT."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, volume):
        batch, channels, size_x, size_y, size_z = volume.shape
        slices = volume.permute(0, 4, 1, 2, 3).reshape(batch * size_z, channels, size_x, size_y)
        outputs = self.network(slices)
        outputs = outputs.reshape(batch, size_z, outputs.shape[1], size_x, size_y)
        return outputs.permute(0, 2, 3, 4, 1)


def build_training_network(architecture):
    """The network to train: a MONAI network, wrapped slice by slice where ``architecture["slicewise"]``."""
    plain = {"name": architecture["name"], "args": architecture.get("args", {})}
    network = build_network(plain)
    return SliceWise(network) if architecture.get("slicewise") else network


def save_network(network, architecture, out_dir, description):
    """State dict for a MONAI architecture (named in model.json); TorchScript for a slice-wise wrapper."""
    path = out_dir / description.weights
    if architecture.get("slicewise"):
        description.architecture = None  # model.json loads it as TorchScript
        scripted = torch.jit.script(network.cpu().eval())
        write_weights(path, lambda: scripted.save(str(path)))
    else:
        write_weights(path, lambda: torch.save(network.state_dict(), str(path)))


def staged_model_folder(out_dir):
    """The model folder of ``medadv train``, checked before any training: refused where it is a file or a folder
    that is not empty (a model is never written over another, or among the user's files); the files are written
    into a hidden sibling folder and moved into place once all are on the disk
    (:class:`~.scene.results.StagedOutput`), so a failed run leaves no half model."""
    from .scene.results import StagedOutput
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("{} is a file: give a folder for model.json, model.pt and training.json".format(out_dir))
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError("model folder {} exists and is not empty: give a new or empty folder (a trained model is "
                         "not written over another one or among other files)".format(out_dir))
    return StagedOutput(out_dir)


def write_weights(path, save):
    """Run ``save()`` (torch's writer of ``path``) and flush the file to the disk; OSError where either fails (torch
    reports a full disk as a RuntimeError)."""
    from .scene.slicer_scene import sync_file
    try:
        save()
    except RuntimeError as error:
        reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", " ".join(str(error).split()))[:200]
        raise OSError(errno.EIO, "PyTorch could not write the weights ({}); is the disk full?".format(reason),
                      str(path))
    sync_file(path)


def write_model_files(folder, description, log):
    """``model.json`` and ``training.json`` beside the weights, each flushed to the disk."""
    from .scene.results import write_text_checked
    write_text_checked(folder / "model.json", json.dumps(asdict(description), indent=2) + "\n")
    write_text_checked(folder / "training.json", json.dumps(log, indent=2) + "\n")


def augmentations(seed):
    """Random transforms of the whole raw volume, then the model's normalisation, then patches."""
    from monai import transforms as T
    keys = ("image", "label")
    pipeline = T.Compose([
        T.RandAffined(keys, prob=0.9, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                      translate_range=(6, 6, 6), mode=("bilinear", "nearest"), padding_mode="zeros"),
        T.RandFlipd(keys, prob=0.5, spatial_axis=0),
        T.RandBiasFieldd("image", prob=0.6, coeff_range=(0.0, 0.4)),
        T.Lambdad("image", lambda image: normalize_like_model(image)),
        T.RandAdjustContrastd("image", prob=0.5, gamma=(0.6, 1.6)),
        T.RandGaussianSmoothd("image", prob=0.25, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.0)),
        T.RandGaussianNoised("image", prob=0.6, std=0.06),
        T.RandSpatialCropSamplesd(keys, roi_size=PATCH, num_samples=2, random_size=False),
    ])
    pipeline.set_random_state(seed=seed)
    return pipeline


def normalize_like_model(image):
    from .networks.preprocessing import normalize_intensity
    return normalize_intensity(torch.as_tensor(image)[None].float(), INTENSITY)[0]


def load_sample_as_network_input():
    """Sample volume and labels as MONAI presents them: channel first, RAS-oriented (network convention)."""
    from monai import transforms as T
    keys = ("image", "label")
    load = T.Compose([T.LoadImaged(keys), T.EnsureChannelFirstd(keys), T.Orientationd(keys, axcodes="RAS")])
    return load({"image": str(SAMPLE_VOLUME), "label": str(SAMPLE_LABELS)})


def train(out_dir, iterations=1500, seed=0, learning_rate=2e-3, architecture=ARCHITECTURE, name="demo-unet",
          progress=print, note=""):
    """Train, evaluate on the unaugmented sample, and write ``model.json``, ``model.pt``, ``training.json``.

    ``architecture``: a key of :data:`ARCHITECTURES` or ``{"name", "args", "slicewise"?}``.
    """
    if isinstance(architecture, str):
        if architecture not in ARCHITECTURES:
            raise InputError("unknown architecture {!r}; choose one of {}".format(architecture,
                                                                                 ", ".join(ARCHITECTURES)))
        architecture = ARCHITECTURES[architecture]
    staged = staged_model_folder(out_dir)
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    sample = load_sample_as_network_input()
    dataset = Dataset([sample] * iterations, transform=augmentations(seed))
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=1)
    network = build_training_network(architecture)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=iterations)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    losses, start = [], time.time()
    network.train()
    for step, batch in enumerate(loader, 1):
        optimizer.zero_grad()
        loss = criterion(network(batch["image"].as_tensor()), batch["label"].as_tensor())
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == iterations:
            progress("step {}/{} loss {:.4f} ({:.0f} s)".format(step, iterations, sum(losses[-50:]) / len(losses[-50:]),
                                                              time.time() - start))
    description = demo_description(name, dict(architecture))
    for key, value in architecture.get("inference", {}).items():
        setattr(description, key, value)
    dice = evaluate(SegmentationModel(network.eval(), description), sample)
    progress("Dice on the sample: {}".format(dice))
    description.architecture.pop("slicewise", None)
    description.architecture.pop("inference", None)
    log = {"architecture": architecture, "iterations": iterations, "seed": seed, "learning_rate": learning_rate,
           "seconds": time.time() - start, "dice_on_sample": dice, "loss_every_50": losses[49::50],
           "parameters": sum(p.numel() for p in network.parameters()), "torch": torch.__version__}
    if note:
        log["note"] = note
    with staged as folder:
        save_network(network, architecture, folder, description)
        write_model_files(folder, description, log)
    return dice


def evaluate(model, sample):
    """Dice per tissue label of the model's prediction on a network-convention sample."""
    from .evaluation.metrics import dice_per_label
    prediction = model.predict(sample["image"].as_tensor()[None].float())[0]
    reference = sample["label"].as_tensor()[0].long()
    scores = dice_per_label(prediction, reference, len(TISSUE_LABELS))
    return {TISSUE_LABELS[value]: round(score, 4) for value, score in scores.items()}
