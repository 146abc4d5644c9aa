"""The Slicer module's worker and bench give a MONAI bundle the volume file's matrix as nibabel (and MONAI) reads
it, as ``medadv run`` does: Slicer's reader differs by ~1e-6, which decides the half-way ties of Spacing nearest
(1 mm -> 1.5 mm) on an oblique file (79 % of the labels alike without it). An nnU-Net model gets no file matrix
there: the module and bench attack the volume as Slicer loaded it, as SlicerNNUNet predicts it."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from conftest import SOFTMAX_INVERTD, monai_bundle_run, stored, write_bundle
from MedAdvRobustnessLib.module import logic as module_logic
from MedAdvRobustnessLib.networks import models
from MedAdvRobustnessLib.networks.nnunet import NNUNetModel
from MedAdvRobustnessLib.networks.volume import GridOrientation
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
from MedAdvRobustnessLib.study import cells, definition

UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
        "num_res_units": 0}
NNUNET = Path(__file__).resolve().parents[1] / "Data" / "nnUNet" / "Dataset101_MedAdvTiny" / \
    "nnUNetTrainer__nnUNetPlans__3d_fullres"
PROBE = "contrast_compression"  # a corruption without randomness: one cheap sweep around the clean prediction


@pytest.fixture(scope="module")
def tie_case(tmp_path_factory, t1_crop):
    """(bundle, oblique T1 file, `monai.bundle run`'s labels in the network convention of the volume)."""
    folder = tmp_path_factory.mktemp("ties")
    torch.manual_seed(0)
    network = UNet(**UNET).eval()
    transforms = [{"_target_": "Spacingd", "pixdim": [1.5, 1.5, 1.5], "mode": "nearest"},
                  {"_target_": "NormalizeIntensityd", "nonzero": False}]
    root = write_bundle(folder / "bundle", network, UNET, transforms, (24, 24, 24), SOFTMAX_INVERTD,
                        {"0": "background", "1": "dark", "2": "bright"})
    path = stored(t1_crop, "oblique", folder / "t1.nii.gz")
    labels = np.asarray(monai_bundle_run(root, network, path)["pred"]).argmax(0)  # (i, j, k) of the file
    grid = GridOrientation.from_ijk_to_ras(nib.load(str(path)).affine, labels.shape[::-1])
    return root, path, grid.to_network(np.transpose(labels, (2, 1, 0)))


def agreement(labels, expected):
    assert labels.shape == expected.shape
    return float((labels == expected).mean())


def module_inputs(path, **settings):
    """RunInputs as the module reads them from a real scene holding the file loaded by Slicer's reader."""
    slicer_scene = SlicerScene.standalone()
    node = slicer_scene.load_volume(str(path))
    settings = module_logic.ProbeSettings(inputVolume=node, probe=PROBE, severities="1", **settings)
    return module_logic.read_inputs(slicer_scene, settings)


def test_module_worker_predicts_the_labels_monai_predicts_on_an_oblique_file(tie_case):
    root, path, expected = tie_case
    result = module_logic.compute(module_inputs(path, networkKind="bundle", networkPath=str(root)))
    share = agreement(result.clean.prediction, expected)
    print("module: labels agree with monai.bundle run on {:.5f}".format(share))
    assert share >= 0.999


def test_bench_cell_predicts_the_labels_monai_predicts_on_an_oblique_file(tie_case):
    root, path, expected = tie_case
    task = cells.study_cells(definition.resolve_study({
        "networks": [{"name": "bundle", "source": str(root)}], "cases": [{"name": "t1", "volume": str(path)}],
        "probes": [{"corruption": PROBE, "severities": [1]}]}))[0]
    share = agreement(cells.compute_cell(task)["arrays"]["clean"], expected)
    print("bench: labels agree with monai.bundle run on {:.5f}".format(share))
    assert share >= 0.999


def test_module_gives_an_nnunet_model_no_file_matrix_and_its_folds_and_mirroring(tie_case, monkeypatch):
    """SlicerNNUNet predicts the loaded node (written to a file): the module attacks the volume as Slicer loaded
    it, with the folds and mirroring chosen. The worker is stopped at the model's first run, to look at the model
    it got."""
    _, path, _ = tie_case
    inputs = module_inputs(path, networkKind="nnunet", networkPath=str(NNUNET), networkFolds="1, 0",
                           testTimeMirroring=False, skipUntwinned=True)
    assert inputs.file_ijk_to_ras is not None  # the file's matrix is read, and left out for nnU-Net
    assert inputs.load_options == {"folds": ["1", "0"], "mirroring": False}  # a bundle's option not passed

    class FirstRun(Exception):
        pass

    def first_run(model, volume):
        raise FirstRun(model)
    monkeypatch.setattr(models, "describe", first_run)
    with pytest.raises(FirstRun) as stopped:
        module_logic.compute(inputs)
    model = stopped.value.args[0]
    assert isinstance(model, NNUNetModel) and model.file_ijk_to_ras is None
    assert model.fold_names == ["1", "0"] and any("mirroring off" in step for step in model.pipeline_steps())


def test_the_module_passes_skip_untwinned_to_a_bundle(tie_case):
    root, path, _ = tie_case
    assert module_inputs(path, networkKind="bundle", networkPath=str(root), skipUntwinned=True,
                         networkFolds="3").load_options == {"skip_untwinned": True}
    assert module_inputs(path, networkKind="bundle", networkPath=str(root)).load_options == {"skip_untwinned": False}
