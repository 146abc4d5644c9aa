"""nnU-Net v2 trained model folders: medadv's differentiable reproduction against nnunetv2's own nnUNetPredictor.

The model under Testing/Data/nnUNet was trained with nnU-Net's own tools (make_model.py there says how). The
volumes are crops of the MNI152 T1 stored in other voxel orders, spacings and oblique directions; nnU-Net reads
the file with SimpleITK, medadv the volume Slicer loaded from it.
"""
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import MEDADV, T1, rotation
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import UnsafeCheckpoint, describe, load_model
from MedAdvRobustnessLib.networks.nnunet import NNUNetError
from MedAdvRobustnessLib.scene.nodes import volume_from_node
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

MODEL = Path(__file__).resolve().parents[1] / "Data" / "nnUNet" / "Dataset101_MedAdvTiny" / \
    "nnUNetTrainer__nnUNetPlans__3d_fullres"
REGIONS_MODEL = MODEL.parents[1] / "Dataset102_MedAdvTinyRegions" / "nnUNetTrainer__nnUNetPlans__3d_fullres"

# name: (axis permutation, flips, rotation, voxel size in mm): directions of the stored i, j, k in RAS
GEOMETRIES = {
    "permuted and flipped, 2 mm": ((2, 0, 1), (True, True, False), np.eye(3), (2.0, 2.0, 2.0)),
    "oblique, 1.2x1.2x4.2 mm (coarse axis apart)": ((0, 1, 2), (True, True, False),
                                                    rotation(12.0, 0) @ rotation(-7.0, 2), (1.2, 1.2, 4.2)),
    "permuted, 2.6x1.6x2.2 mm": ((1, 0, 2), (False, False, True), np.eye(3), (2.6, 1.6, 2.2)),
    "left-handed oblique, 2 mm": ((0, 1, 2), (False, True, False), rotation(12.0, 0), (2.0, 2.0, 2.0)),
}


CROP = (slice(40, 160, 2), slice(50, 190, 2), slice(30, 150, 2))  # 60x70x60 voxels
SMALL_CROP = (slice(60, 140, 2), slice(70, 170, 2), slice(40, 130, 2))  # 40x50x45 voxels: one tile


def store(geometry, path, crop=CROP, margins=None):
    """A crop of the T1 (every second voxel), written in this geometry; ``margins``: zeros added before and after
    along i, j, k (nnU-Net crops them away and pads its outputs back with background)."""
    array = np.asarray(nib.load(str(T1)).dataobj, dtype=np.float32)[crop]
    if margins:
        array = np.pad(array, margins)
    permutation, flips, rotate, voxel = GEOMETRIES[geometry]
    data = np.transpose(array, permutation)
    directions = np.eye(3)[:, list(permutation)]
    for axis, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis=axis)
            directions[:, axis] *= -1
    matrix = np.eye(4)
    matrix[:3, :3] = rotate @ directions @ np.diag(voxel)
    matrix[:3, 3] = [-30.0, -40.0, 10.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), matrix), str(path))
    return path


def nnunet_prediction(folder, path, folds, mirroring):
    """nnU-Net's own prediction of a file: labels and probabilities, (C, k, j, i) in SimpleITK's voxel order."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=[int(f) for f in folds])
    data, properties = SimpleITKIO().read_images([str(path)])
    return predictor.predict_single_npy_array(data, properties, None, None, True)


def medadv_prediction(model, volume):
    with torch.no_grad(), model.on_grid(volume):
        outputs = model(volume.as_tensor())[0].double().numpy()
    return np.stack([volume.orientation.to_slicer(channel) for channel in outputs])  # (C, k, j, i)


UNEVEN_ZEROS = ((7, 2), (0, 9), (4, 5))
OBLIQUE = "oblique, 1.2x1.2x4.2 mm (coarse axis apart)"
CASES = {  # geometry, folds, mirroring, plans edit (see edited_plans), zero margins, crop
    "permuted, fold 0, no mirroring": ("permuted and flipped, 2 mm", ["0"], False, None, None, CROP),
    "oblique anisotropic, folds 0 1, mirroring": (OBLIQUE, ["0", "1"], True, None, None, CROP),
    "anisotropic, zero margins, transposed CT plans, fold 1": ("permuted, 2.6x1.6x2.2 mm", ["1"], False,
                                                               "transposed CT", UNEVEN_ZEROS, CROP),
    "oblique, z-score without the mask, folds 0 1, no mirroring": (OBLIQUE, ["0", "1"], False, "z-score unmasked",
                                                                   UNEVEN_ZEROS, SMALL_CROP),
    "oblique, rescaled to 0-1, folds 0 1, no mirroring": (OBLIQUE, ["0", "1"], False, "rescale to 0-1",
                                                          UNEVEN_ZEROS, SMALL_CROP),
}
PLANS_EDITS = {"z-score unmasked": ("ZScoreNormalization", False), "rescale to 0-1": ("RescaleTo01Normalization", False)}


def transposed_ct_plans(folder, target):
    """The model with plans that transpose the axes and CT-normalise: nnU-Net must agree on any valid plans."""
    shutil.copytree(folder, target)
    plans = json.loads((target / "plans.json").read_text())
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    config = plans["configurations"]["3d_fullres"]
    config["normalization_schemes"], config["use_mask_for_norm"] = ["CTNormalization"], [False]
    plans["foreground_intensity_properties_per_channel"] = {"0": {
        "mean": 60.0, "std": 25.0, "percentile_00_5": 5.0, "percentile_99_5": 95.0}}
    (target / "plans.json").write_text(json.dumps(plans))
    return target


def edited_plans(folder, target, edit):
    """The model with plans edited: ``transposed CT`` (:func:`transposed_ct_plans`) or another normalisation scheme
    (:data:`PLANS_EDITS`: the scheme and whether it uses the non-zero mask)."""
    if edit == "transposed CT":
        return transposed_ct_plans(folder, target)
    shutil.copytree(folder, target)
    plans = json.loads((target / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    scheme, mask = PLANS_EDITS[edit]
    config["normalization_schemes"], config["use_mask_for_norm"] = [scheme], [mask]
    (target / "plans.json").write_text(json.dumps(plans))
    return target


@pytest.mark.parametrize("case", sorted(CASES))
def test_medadv_predicts_what_nnunet_predicts(tmp_path, case):
    geometry, folds, mirroring, edit, margins, crop = CASES[case]
    folder = edited_plans(MODEL, tmp_path / "model", edit) if edit else MODEL
    path = store(geometry, tmp_path / "case_0000.nii.gz", crop, margins)
    assert np.linalg.det(nib.load(str(path)).affine[:3, :3]) > 0  # right-handed: Slicer keeps the file's order
    labels, expected = nnunet_prediction(folder, path, folds, mirroring)
    model = load_model(folder, folds=folds, mirroring=mirroring)
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    ours = medadv_prediction(model, volume)
    assert ours.shape == expected.shape
    agreement = float((ours.argmax(0) == labels).mean())
    difference = float(np.abs(ours - expected).max())
    print("{}: labels agree on {:.5f} of the voxels, largest probability difference {:.1e}".format(
        case, agreement, difference))
    # the same float16 arithmetic and numpy's rounding: equal up to float32 noise in the softmax
    assert agreement >= 0.999 and difference < 1e-5


def test_a_left_handed_file_is_predicted_as_slicernnunet_hands_it_to_nnunet(tmp_path):
    """Slicer's reader reverses the k axis of a file whose voxel axes are left-handed; SlicerNNUNet gives nnU-Net
    the volume Slicer loaded (written back to a file), and that is what medadv reproduces."""
    scene = SlicerScene.standalone()
    node = scene.load_volume(str(store("left-handed oblique, 2 mm", tmp_path / "file.nii.gz")))
    written = tmp_path / "case_0000.nii.gz"
    scene.save_node(node, written)
    labels, expected = nnunet_prediction(MODEL, written, ["0"], True)
    ours = medadv_prediction(load_model(MODEL, folds=["0"]), volume_from_node(node))
    assert float((ours.argmax(0) == labels).mean()) >= 0.999 and float(np.abs(ours - expected).max()) < 1e-5


def test_medadv_run_on_a_left_handed_file_predicts_what_nnunet_predicts_on_that_file(tmp_path):
    """Slicer's reader stores a left-handed file with k reversed; nnUNetv2_predict reads the file in its own order.
    medadv run takes the file's own order back (without mirroring the two orders give other labels: 95 % alike)."""
    from MedAdvRobustnessLib.pipeline import run_on_files
    from MedAdvRobustnessLib.probes.registry import make_probe
    path = store("left-handed oblique, 2 mm", tmp_path / "case_0000.nii.gz", SMALL_CROP)
    assert np.linalg.det(nib.load(str(path)).affine[:3, :3]) < 0
    labels, _ = nnunet_prediction(MODEL, path, ["0"], False)
    run_on_files(str(path), str(MODEL), make_probe("fgsm"), [0.001], tmp_path / "out", folds=["0"], mirroring=False)
    ours = nib.as_closest_canonical(nib.load(str(tmp_path / "out" / "prediction_0.nii.gz")))
    theirs = nib.as_closest_canonical(nib.Nifti1Image(np.transpose(labels, (2, 1, 0)).astype(np.int16),
                                                      nib.load(str(path)).affine))
    assert np.allclose(ours.affine, theirs.affine, atol=1e-4)
    agreement = float((np.asarray(ours.dataobj) == np.asarray(theirs.dataobj)).mean())
    print("left-handed file, no mirroring: labels agree on {:.5f}".format(agreement))
    assert agreement >= 0.999


def test_the_report_lists_nnunet_s_pipeline_and_labels(tmp_path):
    path = store("oblique, 1.2x1.2x4.2 mm (coarse axis apart)", tmp_path / "case_0000.nii.gz")
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    model = load_model(MODEL.parent)  # the dataset folder holding one trained model
    lines = "\n".join(describe(model, volume).lines())
    print(lines)
    assert "labels: 0 background, 1 other brain, 2 grey matter, 3 white matter" in lines
    assert "normalise: T1 ZScoreNormalization (non-zero mask)" in lines
    assert "folds 0, 1" in lines and "mirroring along axes [0, 1, 2]" in lines
    assert "48x56x48 tile step 0.5 (nnU-Net's tiles and Gaussian)" in lines


def test_gradient_matches_finite_differences_and_windowed_equals_autograd(tmp_path):
    path = store("oblique, 1.2x1.2x4.2 mm (coarse axis apart)", tmp_path / "case_0000.nii.gz", SMALL_CROP)
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    model = load_model(MODEL, folds=["0"], mirroring=False).double()
    model.nnunet_rounding = False  # the smooth function whose gradient attacks follow
    x = volume.as_tensor().double()
    # break the ties of the template's quantised intensities: skimage clips each resize to its input's range, and
    # where several voxels hold the maximum that clip has no derivative
    x = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * (x != 0)
    weights = torch.rand((1, 4) + x.shape[2:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(outputs):
        return (outputs * weights).sum()

    with model.on_grid(volume):
        model.gradient_mode = "naive"
        _, gradient, _ = model.loss_and_gradient(x, loss)
        model.gradient_mode = "windowed"
        _, windowed, _ = model.loss_and_gradient(x, loss)
        direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        direction = direction * (x != 0)  # the non-zero mask, hence the crop, stays as it is
        step = 1e-5  # the network is piecewise linear (LeakyReLU): a small step crosses few of its kinks
        with torch.no_grad():
            numeric = (loss(model(x + step * direction)) - loss(model(x - step * direction))) / (2 * step)
    analytic = float((gradient * direction).sum())
    print("directional derivative: autograd {:.6f}, finite differences {:.6f}".format(analytic, float(numeric)))
    assert abs(analytic - float(numeric)) <= 1e-4 * max(1.0, abs(analytic))
    assert torch.allclose(gradient, windowed, rtol=1e-8, atol=1e-10)


def test_a_checkpoint_that_pickles_code_is_refused_and_the_code_never_runs(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder, ignore=shutil.ignore_patterns("fold_1"))
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    contents = torch.load(checkpoint, map_location="cpu", weights_only=False)
    marker = tmp_path / "ran"
    contents["logging"] = _Touch(marker)
    torch.save(contents, checkpoint)
    with pytest.raises(UnsafeCheckpoint, match="refusing to load .*checkpoint_final.pth.*--trust-checkpoint"):
        load_model(folder)
    assert not marker.exists()


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["configurations"]["3d_fullres"].update(normalization_schemes=["MyNormalization"]),
     "normalisation scheme MyNormalization .channel 0. cannot be reproduced"),
    (lambda p: p["configurations"]["3d_fullres"].update(resampling_fn_data="resample_torch_fornnunet"),
     "resampling function resample_torch_fornnunet .resampling_fn_data. cannot be reproduced"),
    (lambda p: p["configurations"]["3d_fullres"]["architecture"].update(network_class_name="os.system"),
     "network class os.system is not from dynamic_network_architectures.architectures"),
    (lambda p: p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(nonlin="os.system"),
     "'os.system' is not a torch.nn class"),
])
def test_plans_that_cannot_be_reproduced_are_refused_naming_what(tmp_path, edit, message):
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    plans = json.loads((folder / "plans.json").read_text())
    edit(plans)
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NNUNetError, match=message):
        load_model(folder)


def test_medadv_run_takes_an_nnunet_folder_with_folds_and_mirroring_off(tmp_path):
    import subprocess
    path = store("permuted and flipped, 2 mm", tmp_path / "case_0000.nii.gz", SMALL_CROP)
    out = tmp_path / "results"
    done = subprocess.run([MEDADV, "run", "--volume", str(path), "--model", str(MODEL), "--folds", "1",
                           "--no-mirroring", "--attack", "fgsm", "--epsilon", "0.02", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "nnU-Net v2, folds 1, test-time mirroring off" in done.stderr
    rows = (out / "metrics.csv").read_text().splitlines()
    assert any(",grey matter," in row for row in rows[1:])
    missing = subprocess.run([MEDADV, "run", "--volume", str(path), "--model", str(MODEL), "--folds", "3",
                              "--attack", "fgsm", "--epsilon", "0.02", "--out", str(tmp_path / "other")], capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "medadv: error: {}: no checkpoint_final.pth for fold(s) 3 (folds with one: 0, 1)".format(MODEL)]


def test_a_bench_network_entry_chooses_folds_and_mirroring():
    """A study's network entry takes load_model's options (folds, mirroring, skip_untwinned, trust_checkpoint):
    left out at their defaults (the cell keys stay), passed to the model, and of the wrong type one line."""
    from MedAdvRobustnessLib.study import cells
    from MedAdvRobustnessLib.study.definition import _network
    plain = _network({"name": "tiny", "source": str(MODEL), "mirroring": True})
    assert set(plain) == {"name", "source", "hash"}
    chosen = _network({"name": "tiny", "source": str(MODEL), "folds": [1], "mirroring": False})
    assert chosen == dict(plain, folds=[1], mirroring=False)
    model = cells._cached_model(chosen)
    assert model.fold_names == ["1"] and any("mirroring off; folds 1" in step for step in model.pipeline_steps())
    assert cells._model_key(chosen) != cells._model_key(plain)
    for entry, message in (({"folds": "0"}, "folds must be a non-empty list"), ({"mirroring": "no"},
                           "mirroring must be true or false"), ({"fold": [0]}, "unknown key(s) fold")):
        with pytest.raises(InputError, match=re.escape(message)):
            _network(dict({"name": "tiny", "source": str(MODEL)}, **entry))


def test_the_module_and_bench_take_the_nnunet_folder(tmp_path, slicer_scene):
    """The module's logic (network kind nnunet, as the widget drives it) and ``medadv bench`` on the same case."""
    from conftest import drive_as_widget
    from MedAdvRobustnessLib.module import logic as module_logic
    from MedAdvRobustnessLib.study import execution
    model = tmp_path / "model"
    shutil.copytree(MODEL, model, ignore=shutil.ignore_patterns("fold_1"))  # one fold: a shorter test
    path = store("permuted and flipped, 2 mm", tmp_path / "case.nii.gz", SMALL_CROP)
    volume = slicer_scene.load_volume(str(path))
    labels, _ = nnunet_prediction(model, path, ["0"], True)
    nib.save(nib.Nifti1Image(np.transpose(labels, (2, 1, 0)).astype(np.int16), nib.load(str(path)).affine),
             str(tmp_path / "case_seg.nii.gz"))  # nnU-Net's own labels as the reference
    settings = module_logic.ProbeSettings(inputVolume=volume, networkKind="nnunet", networkPath=str(model),
                                          probe="fgsm", epsilons="0.02")
    run, _ = drive_as_widget(slicer_scene, settings, module_logic.start_run)
    segmentation = run.finish()["segmentation"][0.0]
    assert [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(
        segmentation.GetSegmentation().GetNumberOfSegments())] == ["grey matter", "white matter"]  # those present
    (tmp_path / "cases").mkdir()
    for name in ("case.nii.gz", "case_seg.nii.gz"):
        shutil.move(str(tmp_path / name), str(tmp_path / "cases" / name))
    study = {"networks": [{"name": "tiny nnU-Net", "source": str(model)}], "cases": [str(tmp_path / "cases")],
             "probes": [{"attack": "fgsm", "epsilons": [0.02]}]}
    execution.run_study(study, tmp_path / "bench")
    import csv
    with open(str(tmp_path / "bench" / "results.csv")) as stream:
        rows = list(csv.DictReader(stream))
    clean = {row["label"]: float(row["dice_reference"]) for row in rows if float(row["strength"]) == 0}
    attacked = {row["label"]: float(row["dice_reference"]) for row in rows if float(row["strength"]) == 0.02}
    print("clean Dice against nnU-Net's labels {}, under FGSM 0.02 {}".format(clean, attacked))
    assert clean["grey matter"] == clean["white matter"] == 1.0 and attacked["grey matter"] < 1.0


def old_format_plans(folder, target):
    """The model with its plans in the format before nnU-Net 2.4 (TotalSegmentator's), which both rebuild."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("fold_1"))
    plans = json.loads((target / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    arch = config.pop("architecture")["arch_kwargs"]
    config.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=8, unet_max_num_features=32,
                  n_conv_per_stage_encoder=arch["n_conv_per_stage"],
                  n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"], conv_kernel_sizes=arch["kernel_sizes"],
                  pool_op_kernel_sizes=arch["strides"], num_pool_per_axis=[3, 3, 3])
    (target / "plans.json").write_text(json.dumps(plans))
    return target


def numpy1_checkpoint(folder):
    """The checkpoint as numpy 1 pickles it: its scalars named numpy.core.multiarray.scalar."""
    import zipfile
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    original = checkpoint.with_suffix(".numpy2")
    checkpoint.rename(original)
    with zipfile.ZipFile(str(original)) as source, zipfile.ZipFile(str(checkpoint), "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(item, data)
    original.unlink()


def test_old_format_plans_and_numpy1_checkpoints_load_as_nnunet_loads_them(tmp_path):
    folder = old_format_plans(MODEL, tmp_path / "model")
    numpy1_checkpoint(folder)
    path = store("permuted and flipped, 2 mm", tmp_path / "case_0000.nii.gz", SMALL_CROP)
    labels, expected = nnunet_prediction(folder, path, ["0"], False)
    ours = medadv_prediction(load_model(folder, mirroring=False),
                             volume_from_node(SlicerScene.standalone().load_volume(str(path))))
    assert float((ours.argmax(0) == labels).mean()) >= 0.999 and float(np.abs(ours - expected).max()) < 1e-5


def test_an_all_zero_volume_is_refused(tmp_path):
    from MedAdvRobustnessLib.errors import InputError
    from MedAdvRobustnessLib.networks.volume import Volume
    volume = Volume.from_array(np.zeros((20, 22, 18), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    model = load_model(MODEL, folds=["0"], mirroring=False)
    with pytest.raises(InputError, match="the volume is all zeros"), model.on_grid(volume):
        model(volume.as_tensor())


@pytest.mark.parametrize("edit, message", [
    (lambda p, d: p.update(image_reader_writer="NibabelIOWithReorient"),
     "image_reader_writer NibabelIOWithReorient cannot be reproduced"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(preprocessor_name="MyPreprocessor"),
     "preprocessor MyPreprocessor cannot be reproduced"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(patch_size=[48, 56]),
     "only 3D configurations are supported"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(previous_stage="3d_lowres"), "cascade"),
    (lambda p, d: d.update(labels={"background": 0, "tumour": [1, 2], "core": 2}),
     "a region-based model needs regions_class_order with one label per region"),
    (lambda p, d: d.update(labels={"background": 0, "a": 1, "b": 3}), "without gaps"),
    (lambda p, d: p["configurations"]["3d_fullres"]["resampling_fn_data_kwargs"].update(antialias=True),
     "setting.s. antialias that are not reproduced"),
    (lambda p, d: p["configurations"]["3d_fullres"].pop("spacing"), "has no 'spacing'"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(spacing="2"), "spacing must be a list of numbers"),
    (lambda p, d: p.update(transpose_forward=[0, 1]), "transpose_forward must be a permutation of 0, 1, 2"),
    (lambda p, d: p["configurations"]["3d_fullres"]["architecture"].pop("network_class_name"),
     "architecture has no network_class_name"),
])
def test_more_plans_that_cannot_be_reproduced_are_refused(tmp_path, edit, message):
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder, ignore=shutil.ignore_patterns("fold_1"))
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    edit(plans, dataset)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(NNUNetError, match=message):
        load_model(folder)


def test_a_region_based_model_predicts_what_nnunet_predicts(tmp_path):
    """BraTS-style regions (brain ⊃ grey or white matter ⊃ white matter): sigmoid per region, every region 0
    outside the crop, labels painted in regions_class_order; an oblique anisotropic file, mirroring on."""
    path = store("oblique, 1.2x1.2x4.2 mm (coarse axis apart)", tmp_path / "case_0000.nii.gz", margins=UNEVEN_ZEROS)
    labels, expected = nnunet_prediction(REGIONS_MODEL, path, ["0"], True)
    model = load_model(REGIONS_MODEL)
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    ours = medadv_prediction(model, volume)
    assert ours.shape == expected.shape == (3,) + labels.shape
    ours_labels = model.activation.labels(torch.from_numpy(ours)[None])[0].numpy()
    agreement = float((ours_labels == labels).mean())
    difference = float(np.abs(ours - expected).max())
    print("regions: labels agree on {:.5f} of the voxels, largest probability difference {:.1e}, labels {}".format(
        agreement, difference, np.unique(labels).tolist()))
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}  # every region paints somewhere: a real test
    assert agreement >= 0.999 and difference < 1e-5
    lines = "\n".join(describe(model, volume).lines())
    assert "labels: 0 background, 1 brain, 2 grey or white matter, 3 white matter" in lines
    assert "sigmoid, every region 0 outside the crop" in lines
    assert "label 2 where {2, 3}" in lines


def test_a_region_based_model_is_attacked_on_its_regions(tmp_path):
    """The loss is the binary cross-entropy of each region against the labels' membership in it, so PGD moves
    the regions (Dice against the clean labels falls); attacks that need one score per label are refused."""
    from MedAdvRobustnessLib import make_probe, run_sweep
    from MedAdvRobustnessLib.errors import InputError
    path = store("permuted and flipped, 2 mm", tmp_path / "case_0000.nii.gz", SMALL_CROP)
    volume = volume_from_node(SlicerScene.standalone().load_volume(str(path)))
    model = load_model(REGIONS_MODEL, mirroring=False)
    result = run_sweep(model, volume, make_probe("pgd", steps=3), [0.05])
    clean, attacked = result.mean_dice(0.0, "clean"), result.mean_dice(0.05, "clean")
    print("regions under PGD: Dice against the clean labels {:.3f} → {:.3f}".format(clean, attacked))
    assert clean == 1.0 and attacked < 0.9
    with pytest.raises(InputError, match="needs one score per label"):
        run_sweep(model, volume, make_probe("dag", steps=2), [0.05])
