"""Train the small nnU-Net v2 models shipped beside this script, with nnU-Net's own tools (not run by CI).

    .venv/bin/python Testing/Data/nnUNet/make_model.py WORK_DIR            # Dataset101_MedAdvTiny, folds 0 and 1
    .venv/bin/python Testing/Data/nnUNet/make_model.py WORK_DIR --regions  # Dataset102_MedAdvTinyRegions, fold 0

Six training cases are made from the nilearn wheel's MNI152 T1 and its grey/white matter maps, block-averaged to
2 mm (labels: background, other brain, grey matter, white matter), each cropped, scaled and noised differently.
nnU-Net plans and preprocesses them (``nnUNetv2_plan_and_preprocess``); the 3d_fullres network is then shrunk in
the plans (4 stages of 8-16-32-32 features, patch 48x56x48) so that it trains on two CPU cores, the data
preprocessed again, and folds 0 and 1 trained (``nnUNetv2_train -device cpu``) by a trainer that differs from
``nnUNetTrainer`` only in its schedule (fewer epochs and iterations). The trained folder is copied here as
``nnUNetTrainer__nnUNetPlans__3d_fullres``, the checkpoints' ``trainer_name`` set to ``nnUNetTrainer`` (which builds
the same network), so nnU-Net's own predictor loads it without the schedule-only trainer.

``--regions`` trains a region-based model on the same cases, as nnU-Net trains BraTS: dataset.json names three
nested regions (brain = labels 1-3, grey or white matter = 2-3, white matter = 3) and ``regions_class_order``
[1, 2, 3], so the network has one sigmoid output per region; only fold 0 is trained.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nilearn.datasets
import numpy as np

HERE = Path(__file__).resolve().parent
DATASET = "Dataset101_MedAdvTiny"
LABELS = {"background": 0, "other brain": 1, "grey matter": 2, "white matter": 3}
REGIONS_DATASET = "Dataset102_MedAdvTinyRegions"
REGIONS = {"background": 0, "brain": [1, 2, 3], "grey or white matter": [2, 3], "white matter": [3]}
TRAINER = "nnUNetTrainerMedAdvTiny"
EPOCHS, ITERATIONS = 12, 20
TRAINER_SOURCE = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    """nnUNetTrainer with a short schedule, for the small test model of MedAdvRobustness."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iterations}
        self.num_val_iterations_per_epoch = 2
'''


def mni(name):
    data = Path(nilearn.datasets.__file__).parent / "data"
    image = nib.load(str(data / "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz".format(name)))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def block_mean(array):
    shape = [s // 2 * 2 for s in array.shape]
    array = array[:shape[0], :shape[1], :shape[2]]
    return array.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).mean(axis=(1, 3, 5))


def write_cases(raw, regions=False):
    t1, affine = mni("t1")
    grey, white = block_mean(mni("gm")[0]), block_mean(mni("wm")[0])
    t1 = block_mean(t1)
    labels = np.where(t1 > 0, 1, 0)
    labels[grey > 0.5] = 2
    labels[white > 0.5] = 3
    affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for case in range(6):
        low = rng.integers(0, 8, size=3)
        high = np.array(t1.shape) - rng.integers(0, 8, size=3)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        image = t1[box] * rng.uniform(0.6, 1.6) + rng.normal(0, 4.0, size=t1[box].shape) * (t1[box] > 0)
        matrix = affine.copy()
        matrix[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
        name = "case_{:03d}".format(case)
        nib.save(nib.Nifti1Image(image.astype(np.float32), matrix), str(raw / "imagesTr" / (name + "_0000.nii.gz")))
        nib.save(nib.Nifti1Image(labels[box].astype(np.uint8), matrix), str(raw / "labelsTr" / (name + ".nii.gz")))
    dataset = {"channel_names": {"0": "T1"}, "labels": REGIONS if regions else LABELS, "numTraining": 6,
               "file_ending": ".nii.gz"}
    if regions:
        dataset["regions_class_order"] = [1, 2, 3]
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))


def shrink_plans(path):
    plans = json.loads(path.read_text())
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"] = [48, 56, 48]
    config["batch_size"] = 2
    arch = config["architecture"]["arch_kwargs"]
    arch.update({"n_stages": 4, "features_per_stage": [8, 16, 32, 32], "kernel_sizes": [[3, 3, 3]] * 4,
                 "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2, 2],
                 "n_conv_per_stage_decoder": [2, 2, 2]})
    path.write_text(json.dumps(plans, indent=2))


def main(work, regions=False):
    work = Path(work).resolve()
    dataset, number = (REGIONS_DATASET, "102") if regions else (DATASET, "101")
    folds = ("0",) if regions else ("0", "1")
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_n_proc_DA="2")
    bin_dir = Path(sys.executable).parent
    import nnunetv2
    trainer_file = Path(nnunetv2.__file__).parent / "training" / "nnUNetTrainer" / (TRAINER + ".py")
    trainer_file.write_text(TRAINER_SOURCE.format(name=TRAINER, epochs=EPOCHS, iterations=ITERATIONS))
    if not (work / "raw" / dataset).exists():
        write_cases(work / "raw" / dataset, regions)

    def run(*command):
        subprocess.run([str(bin_dir / command[0])] + list(command[1:]), env=env, check=True)

    if not (work / "preprocessed" / dataset).exists():
        run("nnUNetv2_plan_and_preprocess", "-d", number, "-c", "3d_fullres", "-np", "2")
        shrink_plans(work / "preprocessed" / dataset / "nnUNetPlans.json")
        shutil.rmtree(work / "preprocessed" / dataset / "nnUNetPlans_3d_fullres")
        run("nnUNetv2_preprocess", "-d", number, "-c", "3d_fullres", "-np", "2")
    for fold in folds:
        run("nnUNetv2_train", number, "3d_fullres", fold, "-tr", TRAINER, "-device", "cpu")
    ship(work / "results" / dataset / (TRAINER + "__nnUNetPlans__3d_fullres"), dataset, folds)


def ship(trained, dataset, folds):
    import torch
    target = HERE / dataset / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        shutil.copy(trained / name, target / name)
    for fold in folds:
        checkpoint = torch.load(trained / "fold_{}".format(fold) / "checkpoint_final.pth", map_location="cpu",
                                weights_only=False)
        checkpoint["trainer_name"] = "nnUNetTrainer"
        (target / "fold_{}".format(fold)).mkdir()
        torch.save(checkpoint, target / "fold_{}".format(fold) / "checkpoint_final.pth")


if __name__ == "__main__":
    main(sys.argv[1], regions="--regions" in sys.argv[2:])
