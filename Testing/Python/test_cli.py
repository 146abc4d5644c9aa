"""``medadv`` end to end on the embedded data, through the installed console command; bad input fails cleanly."""
import csv
import hashlib
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from slicer import util

from conftest import MEDADV
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene



def medadv(*args, cwd=None):
    return subprocess.run([MEDADV] + [str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=cwd)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "results"
    before = digest(SAMPLE_VOLUME)
    completed = medadv("demo", "--out", out, "--epsilon", "0.01", "0.03", "--steps", "2")
    assert completed.returncode == 0, completed.stderr
    assert digest(SAMPLE_VOLUME) == before
    return out, completed


def test_demo_writes_every_result_file(demo_run):
    out, completed = demo_run
    names = {path.name for path in out.iterdir()}
    assert names == {"scene.mrb", "metrics.csv", "report.png", "run.json", "adversarial_0.nii.gz",
                     "adversarial_0.01.nii.gz", "adversarial_0.03.nii.gz", "prediction_0.nii.gz",
                     "prediction_0.01.nii.gz", "prediction_0.03.nii.gz", "fragility.nii.gz", "structures.csv",
                     "fragility_summary.json", "labels.ctbl", "labels.itksnap.txt"}
    assert "clean Dice against the reference" in completed.stdout
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_names_and_colours_travel_with_the_label_maps(demo_run):
    """labels.ctbl read back by Slicer's own colour table reader; labels.itksnap.txt in ITK-SNAP's format."""
    import slicer
    out, _ = demo_run
    scene = slicer.vtkMRMLScene()
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode")
    storage = scene.AddNewNodeByClass("vtkMRMLColorTableStorageNode")
    storage.SetFileName(str(out / "labels.ctbl"))
    assert storage.ReadData(table)
    names = [table.GetColorName(value) for value in range(table.GetNumberOfColors())]
    assert names == ["background", "CSF", "grey matter", "white matter"]
    colour = [0.0] * 4
    table.GetColor(2, colour)
    entries = [line.split() for line in (out / "labels.itksnap.txt").read_text().splitlines()
               if not line.startswith("#")]
    assert [int(entry[0]) for entry in entries] == [0, 1, 2, 3]
    assert [" ".join(entry[7:]).strip('"') for entry in entries] == names
    assert [int(v) for v in entries[2][1:4]] == [int(round(255 * c)) for c in colour[:3]] and colour[3] == 1.0
    labels = np.asarray(nib.load(str(out / "prediction_0.01.nii.gz")).dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}


def test_the_fragility_map_is_the_first_change_of_the_written_predictions(demo_run):
    """fragility.nii.gz against the prediction files: per voxel the smallest epsilon whose prediction differs from
    the clean one (0: none does), on the same grid; structures.csv's changed fractions from the same files."""
    out, completed = demo_run
    read = {name: nib.load(str(out / name)) for name in ("fragility.nii.gz", "prediction_0.nii.gz",
                                                           "prediction_0.01.nii.gz", "prediction_0.03.nii.gz")}
    clean, weak, strong = (np.asarray(read["prediction_{}.nii.gz".format(eps)].dataobj) for eps in ("0", "0.01",
                                                                                                    "0.03"))
    expected = np.where(weak != clean, 0.01, np.where(strong != clean, 0.03, 0.0)).astype(np.float32)
    fragility = read["fragility.nii.gz"]
    assert np.allclose(fragility.affine, read["prediction_0.nii.gz"].affine)
    assert np.array_equal(np.asarray(fragility.dataobj), expected)
    with open(str(out / "structures.csv")) as stream:
        rows = {row["label"]: row for row in csv.DictReader(stream)}
    grey = clean == 2
    assert float(rows["grey matter"]["changed_0.03"]) == pytest.approx(float((strong[grey] != 2).mean()))
    assert int(rows["grey matter"]["voxels"]) == int(grey.sum())
    summary = json.loads((out / "fragility_summary.json").read_text())
    assert set(summary["scores"]) == {"fragility", "entropy", "boundary"}


def test_metrics_csv_rows_and_columns(demo_run):
    out, _ = demo_run
    with open(str(out / "metrics.csv")) as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["model", "probe", "epsilon", "label", "dice_reference", "dice_clean", "linf", "l2",
                             "linf_fraction", "l2_fraction", "psnr", "ssim", "hd95_reference", "asd_reference",
                             "hd95_clean", "asd_clean", "nsd_reference", "nsd_clean"]
    assert [(row["epsilon"], row["label"]) for row in rows] == [
        (eps, label) for eps in ("0.0", "0.01", "0.03") for label in ("CSF", "grey matter", "white matter", "mean")]
    clean = [row for row in rows if row["epsilon"] == "0.0"]
    assert all(row["psnr"] == "" and float(row["linf"]) == 0 and float(row["dice_clean"]) == 1 for row in clean)
    attacked = [row for row in rows if row["epsilon"] == "0.03"]
    assert all(float(row["linf_fraction"]) == pytest.approx(0.03, rel=1e-5) for row in attacked)
    mean = {row["epsilon"]: float(row["dice_reference"]) for row in rows if row["label"] == "mean"}
    assert mean["0.03"] < mean["0.0"]


def test_surface_distances_and_ssim_grow_with_the_attack(demo_run):
    out, _ = demo_run
    with open(str(out / "metrics.csv")) as stream:
        mean = {row["epsilon"]: row for row in csv.DictReader(stream) if row["label"] == "mean"}
    clean, weak, strong = mean["0.0"], mean["0.01"], mean["0.03"]
    assert float(clean["hd95_clean"]) == 0 and float(clean["asd_clean"]) == 0 and float(clean["ssim"]) == 1
    assert 0 < float(clean["hd95_reference"]) and 0 < float(clean["asd_reference"]) < float(clean["hd95_reference"])
    assert 0 < float(weak["asd_clean"]) < float(strong["asd_clean"])
    assert float(clean["nsd_clean"]) == 1 and 0 < float(clean["nsd_reference"]) < 1
    assert 1 > float(weak["nsd_clean"]) > float(strong["nsd_clean"]) > 0
    assert float(clean["asd_reference"]) < float(strong["asd_reference"])
    assert 1 > float(weak["ssim"]) > float(strong["ssim"]) > 0


def test_corruption_run_writes_severities_and_the_rood_summary(tmp_path):
    out = tmp_path / "ghosting"
    completed = medadv("run", "--volume", SAMPLE_VOLUME, "--model", "demo", "--reference", SAMPLE_LABELS,
                       "--corruption", "ghosting", "--severity", "1", "5", "--out", out)
    assert completed.returncode == 0, completed.stderr
    assert "ROOD-MRI summary" in completed.stdout
    names = {path.name for path in out.iterdir()}
    assert {"corrupted_1.nii.gz", "corrupted_5.nii.gz", "prediction_5.nii.gz", "rood_summary.json"} <= names
    with open(str(out / "metrics.csv")) as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0])[:4] == ["model", "probe", "severity", "label"]
    mean = {row["severity"]: float(row["dice_reference"]) for row in rows if row["label"] == "mean"}
    assert set(mean) == {"0.0", "1.0", "5.0"} and mean["5.0"] < mean["1.0"] <= mean["0.0"] + 1e-6
    summary = json.loads((out / "rood_summary.json").read_text())
    weights = {1: 2 / 3, 5: (2 / 3) ** 5}
    expected = (weights[1] * mean["1.0"] + weights[5] * mean["5.0"]) / sum(weights.values())
    assert summary["weighted_mean"] == pytest.approx(expected, abs=1e-9)
    assert summary["degradation"] == pytest.approx(mean["0.0"] - expected, abs=1e-9)
    volumes = SlicerScene.read_mrb(out / "scene.mrb").scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    names = {volumes.GetItemAsObject(i).GetName() for i in range(volumes.GetNumberOfItems())}
    assert "MNI152_T1_2mm corrupted ghosting severity 5" in names


def test_affine_corruption_moves_the_reference_with_the_volume(tmp_path):
    out = tmp_path / "affine"
    completed = medadv("run", "--volume", SAMPLE_VOLUME, "--model", "demo", "--reference", SAMPLE_LABELS,
                       "--corruption", "affine", "--severity", "2", "--out", out)
    assert completed.returncode == 0, completed.stderr
    with open(str(out / "metrics.csv")) as stream:
        mean = {row["severity"]: row for row in csv.DictReader(stream) if row["label"] == "mean"}
    # Against the moved reference the network still finds the moved anatomy; against the unmoved one it would not.
    moved = np.asarray(nib.load(str(out / "prediction_2.nii.gz")).dataobj)
    unmoved_reference = np.asarray(nib.load(str(SAMPLE_LABELS)).dataobj)
    unmoved_dice = np.mean([2.0 * np.logical_and(moved == v, unmoved_reference == v).sum()
                            / ((moved == v).sum() + (unmoved_reference == v).sum()) for v in (1, 2, 3)])
    assert float(mean["2.0"]["dice_reference"]) > unmoved_dice + 0.1


def test_intensity_corruption_stays_inside_the_region(tmp_path):
    """Rician noise at severity 5 restricted to the reference's white matter (label 3): every other voxel is the
    input's, and the white matter is changed."""
    out = tmp_path / "noise-in-wm"
    completed = medadv("run", "--volume", SAMPLE_VOLUME, "--model", "demo", "--reference", SAMPLE_LABELS,
                       "--corruption", "rician_noise", "--severity", "5", "--region-labels", "3", "--out", out)
    assert completed.returncode == 0, completed.stderr
    original = np.asarray(nib.load(str(SAMPLE_VOLUME)).dataobj, dtype=np.float32)
    corrupted = np.asarray(nib.load(str(out / "corrupted_5.nii.gz")).dataobj, dtype=np.float32)
    white_matter = np.asarray(nib.load(str(SAMPLE_LABELS)).dataobj) == 3
    assert np.array_equal(corrupted[~white_matter], original[~white_matter])
    assert np.abs(corrupted[white_matter] - original[white_matter]).mean() > 0.01 * np.ptp(original)


def test_spatial_corruption_refuses_a_region(tmp_path):
    completed = medadv("run", "--volume", SAMPLE_VOLUME, "--model", "demo", "--reference", SAMPLE_LABELS,
                       "--corruption", "affine", "--severity", "2", "--region-labels", "3", "--out", tmp_path / "out")
    assert completed.returncode == 2
    assert "moves the anatomy" in completed.stderr and not (tmp_path / "out").exists()


def test_corruption_refuses_attack_options(tmp_path):
    completed = medadv("run", "--volume", SAMPLE_VOLUME, "--model", "demo", "--corruption", "smoothing",
                       "--steps", "3", "--out", tmp_path / "out")
    assert completed.returncode == 2
    assert "--steps" in completed.stderr and not (tmp_path / "out").exists()



def test_result_volumes_are_in_the_input_space(demo_run):
    out, _ = demo_run
    original = nib.load(str(SAMPLE_VOLUME))
    reference = np.asarray(nib.load(str(SAMPLE_LABELS)).dataobj)
    for name in ("adversarial_0.03.nii.gz", "prediction_0.nii.gz"):
        image = nib.load(str(out / name))
        assert image.shape == original.shape
        assert np.allclose(image.affine, original.affine, atol=1e-5)
    clean = np.asarray(nib.load(str(out / "adversarial_0.nii.gz")).dataobj)
    assert np.array_equal(clean, np.asarray(original.dataobj))
    adversarial = np.asarray(nib.load(str(out / "adversarial_0.03.nii.gz")).dataobj).astype(np.float64)
    span = float(clean.max() - clean.min())
    assert np.abs(adversarial - clean).max() <= 0.03 * span
    with open(str(out / "metrics.csv")) as stream:
        reported = {(row["epsilon"], row["label"]): float(row["dice_reference"]) for row in csv.DictReader(stream)}
    for epsilon, eps_text in (("0", "0.0"), ("0.03", "0.03")):
        prediction = np.asarray(nib.load(str(out / "prediction_{}.nii.gz".format(epsilon))).dataobj)
        for value, name in enumerate(("CSF", "grey matter", "white matter"), start=1):
            a, b = prediction == value, reference == value
            dice = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
            assert dice == pytest.approx(reported[(eps_text, name)], abs=1e-6)


def test_scene_bundle_reloads_with_every_node(demo_run):
    out, _ = demo_run
    loaded = SlicerScene.read_mrb(out / "scene.mrb")
    scene = loaded.scene

    def named(class_name):
        nodes = scene.GetNodesByClass(class_name)
        return {nodes.GetItemAsObject(i).GetName(): nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())}

    volumes = named("vtkMRMLScalarVolumeNode")
    assert {"MNI152_T1_2mm", "MNI152_T1_2mm adversarial pgd eps 0.03", "MNI152_T1_2mm perturbation pgd eps 0.01"} \
        <= set(volumes)
    assert np.array_equal(util.arrayFromVolume(volumes["MNI152_T1_2mm"]),
                          np.asanyarray(nib.load(str(SAMPLE_VOLUME)).dataobj).transpose(2, 1, 0))
    adversarial = np.asarray(nib.load(str(out / "adversarial_0.03.nii.gz")).dataobj).transpose(2, 1, 0)
    assert np.array_equal(util.arrayFromVolume(volumes["MNI152_T1_2mm adversarial pgd eps 0.03"]), adversarial)
    segmentations = named("vtkMRMLSegmentationNode")
    assert len(segmentations) == 4  # clean, two attacked, the voxels unstable at the middle epsilon
    unstable = segmentations["MNI152_T1_2mm unstable at <= 0.01 pgd"].GetSegmentation()
    assert unstable.GetNumberOfSegments() == 3
    fragility = volumes["MNI152_T1_2mm fragility pgd"]
    assert np.array_equal(util.arrayFromVolume(fragility),
                          np.asarray(nib.load(str(out / "fragility.nii.gz")).dataobj).transpose(2, 1, 0))
    assert fragility.GetDisplayNode().GetApplyThreshold()
    clean = segmentations["MNI152_T1_2mm segmentation clean"].GetSegmentation()
    names = {clean.GetNthSegment(i).GetName() for i in range(clean.GetNumberOfSegments())}
    assert names == {"CSF", "grey matter", "white matter"}
    tables = named("vtkMRMLTableNode")
    assert any(table.GetNumberOfRows() == 12 for table in tables.values())
    charts = named("vtkMRMLPlotChartNode")
    assert len(charts) == 1 and list(charts.values())[0].GetNumberOfPlotSeriesNodes() == 4


def test_torchscript_model_with_softmax_outputs(tmp_path):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Softmax(dim=1))
    model_path = tmp_path / "tiny.pt"
    torch.jit.script(network).save(str(model_path))
    out = tmp_path / "out"
    completed = medadv("run", "--volume", SAMPLE_VOLUME, "--model", model_path, "--attack", "fgsm", "--epsilon",
                       "0.02", "--output-activation", "softmax", "--out", out)
    assert completed.returncode == 0, completed.stderr
    with open(str(out / "metrics.csv")) as stream:
        rows = list(csv.DictReader(stream))
    assert {row["label"] for row in rows} == {"label 1", "label 2", "mean"}
    assert all(row["dice_reference"] == "" for row in rows)


def write_vector_volume(path):
    scene = SlicerScene.standalone()
    node = scene.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "vector")
    util.updateVolumeFromArray(node, np.random.rand(5, 6, 7, 3).astype(np.float32))
    scene.save_node(node, path)
    return path


def write_shifted_labels(path):
    image = nib.load(str(SAMPLE_LABELS))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-2], image.affine), str(path))
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "file not found"),
    ("vector", "the network takes 1 input channel(s) but the volume has 3"),  # a colour image, one-channel network
    ("four_d", "holds 2 volumes (shape (5, 6, 7, 2)); give a single volume"),
    ("reference_grid", "another grid"),
    ("epsilon_zero", "0 < epsilon < 1"),
    ("epsilon_one", "0 < epsilon < 1"),
    ("model", "model not found"),
])
def test_bad_input_gives_one_clear_error_and_leaves_nothing(tmp_path, case, expected):
    volume, reference, epsilon, model = SAMPLE_VOLUME, None, "0.01", "demo"
    if case == "missing":
        volume = tmp_path / "nope.nii.gz"
    elif case == "vector":
        volume = write_vector_volume(tmp_path / "vector.nrrd")
    elif case == "four_d":
        volume = tmp_path / "4d.nii.gz"
        nib.save(nib.Nifti1Image(np.random.rand(5, 6, 7, 2).astype(np.float32), np.eye(4)), str(volume))
    elif case == "reference_grid":
        reference = write_shifted_labels(tmp_path / "labels.nii.gz")
    elif case == "model":
        model = tmp_path / "missing-model.pt"
    else:
        epsilon = "0" if case == "epsilon_zero" else "1"
    out = tmp_path / "results"
    args = ["run", "--volume", volume, "--model", model, "--attack", "fgsm", "--epsilon", epsilon, "--out", out]
    completed = medadv(*(args + (["--reference", reference] if reference else [])))
    assert completed.returncode != 0
    errors = [line for line in completed.stderr.splitlines() if line.startswith("medadv: error:")]
    assert len(errors) == 1 and expected in errors[0], completed.stderr
    assert "Traceback" not in completed.stderr
    assert not out.exists()
    assert not [path for path in tmp_path.iterdir() if ".partial-" in path.name]


def test_existing_results_are_not_overwritten(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    completed = medadv("demo", "--out", out, "--epsilon", "0.01", "--attack", "fgsm")
    assert completed.returncode == 2 and "not empty" in completed.stderr
    assert [path.name for path in out.iterdir()] == ["precious.txt"]


def test_relative_output_folder(tmp_path):
    completed = medadv("demo", "--out", "results/run", "--epsilon", "0.01", "--attack", "fgsm", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "results" / "run" / "scene.mrb").is_file()
