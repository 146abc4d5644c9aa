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


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    study = {"networks": ["demo-classifier"], "probes": PROBES,
             "cases": ["heldout-slices:{}".format(SLICES),
                       {"name": "sample-slice", "volume": str(SAMPLE_SLICE), "class": SAMPLE_SLICE_CLASS}]}
    out = tmp_path_factory.mktemp("classification-bench") / "out"
    run_study(study, out)
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
