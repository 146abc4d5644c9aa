"""medadv bench on classifiers: the demo classifier on its held-out axial slices (and the shipped sample slice as
a file case with its class), FGSM at two epsilons and DeepFool (L2 and L-inf) at one; the summary's accuracy,
robustness score and median minimal perturbation against a direct sweep of the same slices."""
import csv
import math

import numpy as np
import pytest
import torch

from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.evaluation.sweep import run_sweep
from MedAdvRobustnessLib.networks.models import load_model
from MedAdvRobustnessLib.probes.registry import make_probe
from MedAdvRobustnessLib.sample import SAMPLE_SLICE, SAMPLE_SLICE_CLASS
from MedAdvRobustnessLib.study.cases import heldout_slice_cases, heldout_slice_volume, load_case
from MedAdvRobustnessLib.study.execution import run_study

PROBES = [{"attack": "fgsm", "epsilons": [0.01, 0.05]}, {"attack": "deepfool", "epsilons": [0.1]},
          {"attack": "deepfool-linf", "epsilons": [0.1]}]
SLICES = 4


def bench_study():
    return {"networks": ["demo-classifier"], "probes": PROBES,
            "cases": ["heldout-slices:{}".format(SLICES),
                      {"name": "sample-slice", "volume": str(SAMPLE_SLICE), "class": SAMPLE_SLICE_CLASS}]}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("classification-bench") / "out"
    run_study(bench_study(), out)
    with open(str(out / "classification.csv")) as stream:
        rows = {row["probe"]: row for row in csv.DictReader(stream)}
    return out, rows


@pytest.fixture(scope="module")
def direct():
    """Per probe and case, the rows of a direct sweep (one torch thread, as the bench's cells run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model("demo-classifier")
        cases = [(heldout_slice_volume(case), case["class"]) for case in heldout_slice_cases(SLICES)]
        cases.append((load_case({"name": "sample-slice", "volume": str(SAMPLE_SLICE)})[0], SAMPLE_SLICE_CLASS))
        return {probe["attack"]: [run_sweep(model, volume, make_probe(probe["attack"], seed=0), probe["epsilons"],
                                            label).rows for volume, label in cases] for probe in PROBES}
    finally:
        torch.set_num_threads(before)


def _accuracy(sweeps):
    """The share of cases given their class, per strength (0 first)."""
    return [np.mean([rows[index]["predicted"] == rows[index]["label"] for rows in sweeps])
            for index in range(len(sweeps[0]))]


def test_accuracy_equals_a_direct_sweep(bench, direct):
    _, rows = bench
    for probe in PROBES:
        name = probe["attack"]
        row = rows[name]
        assert int(row["cases"]) == SLICES + 1
        assert row["strengths"] == " ".join("{:g}".format(s) for s in [0.0] + probe["epsilons"])
        expected = _accuracy(direct[name])
        assert row["accuracy"] == " ".join("{:.4f}".format(a) for a in expected)
        assert float(row["clean_accuracy"]) == pytest.approx(expected[0], abs=1e-6)
    assert float(rows["overall"]["clean_accuracy"]) == pytest.approx(_accuracy(direct["fgsm"])[0], abs=1e-6)


def test_robustness_score_is_the_area_under_the_accuracy_curve(bench, direct):
    _, rows = bench
    scores = []
    for probe in PROBES:
        strengths = [0.0] + probe["epsilons"]
        accuracy = np.array(_accuracy(direct[probe["attack"]]))
        relative = np.minimum(accuracy / accuracy[0], 1.0)
        area = sum((strengths[i + 1] - strengths[i]) * (relative[i] + relative[i + 1]) / 2
                   for i in range(len(strengths) - 1))
        scores.append(area / strengths[-1])
        assert float(rows[probe["attack"]]["robustness_score"]) == pytest.approx(scores[-1], abs=1e-5)
    assert float(rows["overall"]["robustness_score"]) == pytest.approx(np.mean(scores), abs=1e-5)
    assert 0.0 < min(scores) and max(scores) <= 1.0


def _median_of(values):
    """The median, a missing value (no flip within the budget) counted as infinitely large; None if infinite."""
    median = float(np.median([math.inf if value is None else value for value in values]))
    return median if math.isfinite(median) else None


def test_median_minimal_perturbation_of_the_cases(bench, direct):
    _, rows = bench
    assert rows["fgsm"]["median_minimal_l2_fraction"] == ""  # FGSM reports no minimal perturbation
    pooled = {"l2": [], "linf": []}
    for name in ("deepfool", "deepfool-linf"):
        attacked = [sweep[1] for sweep in direct[name]]
        found = sum(row.get("minimal_l2_fraction") is not None for row in attacked)
        assert int(rows[name]["minimal_found"]) == found and int(rows[name]["minimal_cases"]) == SLICES + 1
        for norm in ("l2", "linf"):
            values = [row.get("minimal_{}_fraction".format(norm)) for row in attacked]
            pooled[norm] += values
            expected = _median_of(values)
            shown = rows[name]["median_minimal_{}_fraction".format(norm)]
            assert (shown == "") if expected is None else float(shown) == pytest.approx(expected, rel=1e-5)
    assert rows["deepfool-linf"]["median_minimal_linf_fraction"] != ""  # a finite median is compared at least once
    for norm, values in pooled.items():
        expected = _median_of(values)
        shown = rows["overall"]["median_minimal_{}_fraction".format(norm)]
        assert (shown == "") if expected is None else float(shown) == pytest.approx(expected, rel=1e-5)


def test_results_and_report_carry_the_classifier(bench, direct):
    out, _ = bench
    with open(str(out / "results.csv")) as stream:
        results = [row for row in csv.DictReader(stream) if row["probe"] == "fgsm" and row["strength"] == "0.05"]
    assert [int(row["predicted"]) for row in results] == [rows[2]["predicted"] for rows in direct["fgsm"]]
    assert "Classifiers: accuracy and robustness" in (out / "report.html").read_text()


def test_a_study_mixing_classifier_and_segmentation_cases_is_refused(tmp_path):
    study = {"networks": ["demo-classifier"], "cases": ["heldout-slices:1", "heldout:1"],
             "probes": [{"attack": "fgsm", "epsilons": [0.01]}]}
    with pytest.raises(InputError, match="run them as two studies"):
        run_study(study, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_segmenter_on_classifier_cases_is_refused(tmp_path):
    study = {"networks": ["demo"], "cases": ["heldout-slices:1"], "probes": [{"attack": "fgsm", "epsilons": [0.01]}]}
    with pytest.raises(InputError, match="network demo is a segmentation network but the case is an image"):
        run_study(study, tmp_path / "out")


def test_a_classifier_study_writes_its_own_files_and_an_accuracy_figure(bench, direct):
    """classification.csv and the accuracy-vs-epsilon figure in place of the Dice summary, the fragility files
    and the Dice figures; the report says so and lists what was written. The figure plots the accuracy of a
    direct sweep."""
    from PIL import Image
    from MedAdvRobustnessLib.study.scores import accuracy_curves, table_rows
    out, _ = bench
    assert sorted(path.name for path in out.iterdir()) == ["cells", "classification.csv", "figures", "report.html",
                                                           "results.csv", "study.json"]
    assert [path.name for path in (out / "figures").iterdir()] == ["accuracy_vs_epsilon.png"]
    assert Image.open(str(out / "figures" / "accuracy_vs_epsilon.png")).size[0] > 300
    report = (out / "report.html").read_text()
    listed = report.split("<h2>Files</h2>", 1)[1].split("</ul>", 1)[0]
    assert listed == "<ul>{}".format("".join("<li>{}</li>".format(name) for name in (
        "results.csv", "classification.csv", "study.json", "cells/", "figures/accuracy_vs_epsilon.png")))
    assert 'alt="accuracy_vs_epsilon.png"' in report and "clean Dice" not in report and "fragility" not in report
    again = run_study(bench_study(), out)  # the stored cells, read back
    assert again.computed == []
    plotted = accuracy_curves(table_rows(again.records))
    for probe in PROBES:
        strengths, accuracy = plotted[("demo-classifier", probe["attack"], "attack")]
        assert strengths == [0.0] + probe["epsilons"]
        assert accuracy == pytest.approx(_accuracy(direct[probe["attack"]]), abs=1e-9)


def test_a_bench_of_a_torchscript_colour_classifier_on_colour_images(slicer_scene, tmp_path):
    """Two colour (RGB) .nrrd images with their class and a three-channel TorchScript classifier: the bench's
    accuracy and predictions are those of a direct sweep of the same files, the attack changes every channel."""
    from test_rgb_volumes import PNG_MATRIX, add_colour_node, colour_pixels, three_channel_classifier
    model_path = tmp_path / "rgb-classifier.pt"
    torch.jit.save(torch.jit.script(three_channel_classifier(seed=2)), str(model_path))
    cases = []
    for index in range(2):
        image = tmp_path / "colour{}.nrrd".format(index)
        slicer_scene.save_node(add_colour_node(slicer_scene.scene, colour_pixels(seed=10 + index), PNG_MATRIX), image)
        cases.append({"name": "colour{}".format(index), "volume": str(image), "class": index})
    probes = [{"attack": "fgsm", "epsilons": [0.05, 0.2]}]
    run = run_study({"networks": [{"name": "rgb", "source": str(model_path)}], "cases": cases, "probes": probes},
                    tmp_path / "out")
    assert len(run.computed) == 4
    model = load_model(str(model_path))
    sweeps = []
    for case in cases:
        volume = load_case({"name": case["name"], "volume": case["volume"]})[0]
        assert volume.channels == 3
        sweeps.append(run_sweep(model, volume, make_probe("fgsm", seed=0), probes[0]["epsilons"], case["class"]).rows)
    with open(str(tmp_path / "out" / "classification.csv")) as stream:
        row = next(row for row in csv.DictReader(stream) if row["probe"] == "fgsm")
    assert int(row["cases"]) == 2
    assert row["accuracy"] == " ".join("{:.4f}".format(a) for a in _accuracy(sweeps))
    with open(str(tmp_path / "out" / "results.csv")) as stream:
        results = list(csv.DictReader(stream))
    for case, rows in zip(cases, sweeps):
        mine = [r for r in results if r["case"] == case["name"]]
        assert [int(r["predicted"]) for r in mine] == [r["predicted"] for r in rows]
        assert float(mine[-1]["linf_fraction"]) == pytest.approx(0.2, rel=1e-4)
    assert (tmp_path / "out" / "figures" / "accuracy_vs_epsilon.png").is_file()
