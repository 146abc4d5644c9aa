"""The module's "compare networks" section driven as the widget drives it: parameter node in, one folder with the
summary table and the Dice chart out, through the bench runner (real MRML, built-in networks, FGSM)."""
import csv

import numpy as np
import pytest
import slicer
from slicer import util

from conftest import drive_as_widget
from MedAdvRobustnessLib.module import compare as module_compare
from MedAdvRobustnessLib.module import logic as module_logic
from MedAdvRobustnessLib.probes.attacks import AttackCancelled
from MedAdvRobustnessLib.study.cases import heldout_volume
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import Label, PALETTE
from MedAdvRobustnessLib.scene.nodes import (add_color_table, add_label_map_node, add_segmentation_node, add_volume_node,
                                       node_ids)
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME, TISSUE_LABELS
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

NETWORKS = "demo-unet-short, demo-slicewise2d"
EPSILON = 0.02


def table_rows(table_node):
    table = table_node.GetTable()
    columns = [table.GetColumn(index) for index in range(table.GetNumberOfColumns())]
    return [{column.GetName(): column.GetValue(row) for column in columns} for row in range(table.GetNumberOfRows())]


def without_nan(rows):
    return [{key: None if value != value else value for key, value in row.items()} for row in rows]


def compare_as_widget(slicer_scene, settings, cancel_after_cells=None):
    """Press "Compare networks" as the widget does (see conftest.drive_as_widget); the messages."""
    cancel_on = "cell {}/".format(cancel_after_cells) if cancel_after_cells else None
    run, progress = drive_as_widget(slicer_scene, settings, module_compare.start_comparison, cancel_on)
    return run, [message for _, message in progress]


@pytest.fixture(scope="module")
def scene_with_two_volumes():
    """The sample with its label map named ``<volume>-label``, and a held-out variant with a segmentation made on
    it (segments named like the network's labels)."""
    slicer_scene = SlicerScene.standalone()
    scene = slicer_scene.scene
    sample = slicer_scene.load_volume(SAMPLE_VOLUME)
    slicer_scene.load_volume(SAMPLE_LABELS, name=sample.GetName() + "-label", label_map=True)
    volume, labels = heldout_volume(1)
    heldout = add_volume_node(scene, volume.array, volume, "heldout")
    tissue = [Label(value, name, PALETTE[value]) for value, name in enumerate(TISSUE_LABELS)]
    label_node = add_label_map_node(scene, labels, volume, "heldout tissue", tissue,
                                    add_color_table(scene, tissue, "tissue colors"))
    segmentation = add_segmentation_node(slicer_scene, label_node, "heldout segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(heldout)
    scene.RemoveNode(label_node)
    return slicer_scene, sample, heldout


def settings_for(volumes, folder, **changes):
    values = dict(compareVolumes=list(volumes), compareNetworks=NETWORKS, compareFolder=str(folder), probe="fgsm",
                  epsilons=str(EPSILON))
    values.update(changes)
    return module_logic.ProbeSettings(**values)


@pytest.fixture(scope="module")
def comparison(scene_with_two_volumes, tmp_path_factory):
    slicer_scene, sample, heldout = scene_with_two_volumes
    folder = tmp_path_factory.mktemp("compare")
    originals = [util.arrayFromVolume(node).copy() for node in (sample, heldout)]
    run, messages = compare_as_widget(slicer_scene, settings_for([sample, heldout], folder))
    return run.finish(), messages, folder, originals


def test_comparison_fills_one_folder_with_the_summary_and_the_chart(scene_with_two_volumes, comparison):
    slicer_scene, sample, heldout = scene_with_two_volumes
    nodes, messages, _, originals = comparison
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_scene.scene)
    assert hierarchy.GetItemName(nodes["folder"]) == "compare networks fgsm"
    in_folder = module_logic.folder_nodes(hierarchy, nodes["folder"])
    assert nodes["summary"] in in_folder and nodes["chart"] in in_folder
    summary = [row for row in table_rows(nodes["summary"]) if row["probe"] == "fgsm"]
    assert sorted(row["network"] for row in summary) == ["demo-slicewise2d", "demo-unet-short"]
    for row in summary:
        clean, attacked = (float(value) for value in row["dice"].split())
        assert row["cases"] == 2 and 0.3 < clean <= 1
        assert clean == pytest.approx(row["clean_dice"], abs=1e-4)
        assert attacked < clean, row  # the attack hurts every network
    series = nodes["chart"].GetNumberOfPlotSeriesNodes()
    assert series == 2
    assert nodes["computed"] == 4 and nodes["reused"] == 0  # 2 networks x 2 volumes x 1 epsilon
    instability = nodes["instability"]
    assert sorted(instability) == sorted((network, case) for network in ("demo-slicewise2d", "demo-unet-short")
                                         for case in ("MNI152_T1_2mm", "heldout"))
    for (network, case), node in instability.items():
        assert node in in_folder and node.GetName() == "{} {} instability".format(case, network)
        values = util.arrayFromVolume(node)
        assert values.shape == util.arrayFromVolume(sample if case != "heldout" else heldout).shape
        assert set(np.unique(values)) == {0.0, 1.0}  # one probe: changed at its (middle) epsilon or not
    assert any("cell 4/4" in message for message in messages)
    for node, original in zip((sample, heldout), originals):
        np.testing.assert_array_equal(util.arrayFromVolume(node), original)


def test_comparison_scores_each_volume_against_its_reference_like_the_bench(comparison):
    nodes, _, folder, _ = comparison
    with open(str(folder / "results.csv")) as stream:
        rows = list(csv.DictReader(stream))
    assert {row["case"] for row in rows} == {"MNI152_T1_2mm", "heldout"}
    assert {row["against"] for row in rows} == {"reference"}  # label map by name, segmentation by geometry
    with open(str(folder / "summary.csv")) as stream:
        written = {(row["network"], row["probe"]): float(row["clean_dice"]) for row in csv.DictReader(stream)}
    shown = {(row["network"], row["probe"]): row["clean_dice"] for row in table_rows(nodes["summary"])}
    assert shown == pytest.approx(written, abs=1e-4)
    assert (folder / "report.html").is_file()


def test_comparison_run_again_on_its_folder_recomputes_nothing(scene_with_two_volumes, comparison):
    slicer_scene, sample, heldout = scene_with_two_volumes
    first, _, folder, _ = comparison
    run, _ = compare_as_widget(slicer_scene, settings_for([sample, heldout], folder))
    again = run.finish()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_scene.scene)
    assert hierarchy.GetItemName(again["folder"]) == "compare networks fgsm (2)"
    assert again["computed"] == 0 and again["reused"] == 4
    assert without_nan(table_rows(again["summary"])) == without_nan(table_rows(first["summary"]))


def test_cancelled_comparison_adds_nothing(scene_with_two_volumes, tmp_path):
    slicer_scene, sample, heldout = scene_with_two_volumes
    module_logic.parameter_node(slicer_scene.scene)
    before = node_ids(slicer_scene.scene)
    run, _ = compare_as_widget(slicer_scene, settings_for([sample, heldout], tmp_path), cancel_after_cells=1)
    with pytest.raises(AttackCancelled):
        run.finish()
    assert node_ids(slicer_scene.scene) == before
    assert len(list((tmp_path / "cells").glob("*.json"))) < 4  # stopped early; what was stored stays for a resume


@pytest.mark.parametrize("changes, message", [
    ({"compareVolumes": []}, "check at least one volume"),
    ({"compareNetworks": " , "}, "at least one network"),
    ({"compareNetworks": "demo-unet-short, demo-unet-short"}, "listed twice"),
    ({"epsilons": "0.02 x"}, "epsilons must be numbers"),
    ({"compareProbes": "pgd, no-such"}, "compare probes: unknown probe no-such; known probes: apgd-ce, "),
    ({"compareProbes": "pgd,\n pgd"}, "compare probes: pgd is listed twice"),
    ({"compareProbes": "fgsm"}, "compare probes: fgsm is the selected probe"),
    ({"compareSeeds": "0 x"}, "compare seeds: expected whole numbers"),
    ({"compareSeeds": "-1"}, "compare seeds: expected whole numbers"),
    ({"compareSeeds": "1, 1"}, "compare seeds: seed 1 is listed twice"),
    ({"compareProbes": "smoothing", "severities": "9"}, "severit"),
])
def test_bad_comparison_settings_are_refused_before_anything_runs(scene_with_two_volumes, tmp_path, changes,
                                                                   message):
    slicer_scene, sample, _ = scene_with_two_volumes
    before = node_ids(slicer_scene.scene)
    settings = settings_for([sample], tmp_path, **changes)
    with pytest.raises(InputError, match=message):
        module_compare.CompareRun(slicer_scene, settings)
    assert node_ids(slicer_scene.scene) == before


def test_further_probes_and_seeds_make_the_study_probes():
    """Each probe with its own stored parameters (an attack at the epsilons, a corruption at the severities), once
    per seed, the seed overriding a stored one; once as it is where its seed changes nothing (FGSM, smoothing)."""
    settings = module_logic.ProbeSettings(probe="fgsm", compareProbes="pgd,\nrician_noise, smoothing",
                                          compareSeeds="0 1", probeParameters='{"pgd": {"steps": "2"}, '
                                          '"rician_noise": {"seed": "9"}}', epsilons="0.01 0.02", severities="2 4")
    probes = module_compare.bench_probes(settings)
    assert [(probe.get("name"), probe.get("attack") or probe["corruption"]) for probe in probes] == [
        (None, "fgsm"), ("pgd seed 0", "pgd"), ("pgd seed 1", "pgd"),
        ("rician_noise seed 0", "rician_noise"), ("rician_noise seed 1", "rician_noise"), (None, "smoothing")]
    assert [probe["params"] for probe in probes] == [{}, {"steps": "2", "seed": 0}, {"steps": "2", "seed": 1},
                                                     {"seed": 0}, {"seed": 1}, {}]
    assert [probe.get("epsilons") or probe.get("severities") for probe in probes] == [[0.01, 0.02]] * 3 + [[2, 4]] * 3
    settings.compareProbes = "pgd"
    settings.probeParameters = '{"fgsm": {"target_mode": "permute"}, "pgd": {"random_start": "false"}}'
    assert [probe.get("name") for probe in module_compare.bench_probes(settings)] == [
        "fgsm seed 0", "fgsm seed 1", None]  # a permuted target draws from the seed; PGD without random start not
    settings.compareProbes, settings.probeParameters = "pgd,\nsmoothing", '{"pgd": {"steps": "2"}, ' \
        '"smoothing": {"seed": "9"}}'
    settings.compareSeeds = ""  # no seeds: each probe once, as it is
    assert module_compare.bench_probes(settings) == [
        {"attack": "fgsm", "epsilons": [0.01, 0.02], "params": {}},
        {"attack": "pgd", "epsilons": [0.01, 0.02], "params": {"steps": "2"}},
        {"corruption": "smoothing", "severities": [2, 4], "params": {"seed": "9"}}]
    assert module_compare.probe_label(probes) == "fgsm, pgd, rician_noise, smoothing"


def sample_crop(slicer_scene):
    """A 40x48x40 crop of the sample (the middle of the brain) as a volume node."""
    import nibabel as nib
    from MedAdvRobustnessLib.networks.volume import Volume
    image = nib.load(str(SAMPLE_VOLUME))
    start = np.array([20, 24, 20])
    affine = image.affine.copy()
    affine[:3, 3] += image.affine[:3, :3] @ start
    array = np.asarray(image.dataobj, dtype=np.float32)[20:60, 24:72, 20:60]
    volume = Volume.from_array(array, affine, name="crop")
    return add_volume_node(slicer_scene.scene, volume.array, volume, "crop")


def test_comparison_combines_further_probes_and_seeds_into_the_instability_map(tmp_path):
    """FGSM and a 1-step PGD, seeds 0 and 1, at two epsilons on a crop of the sample: FGSM once (its seed changes
    nothing), PGD once per seed; the instability node is, per voxel, the fraction of the three fragility maps the
    study wrote that changed at or below the middle epsilon."""
    import json
    import nibabel as nib
    slicer_scene = SlicerScene.standalone()
    crop = sample_crop(slicer_scene)
    settings = settings_for([crop], tmp_path, compareNetworks="demo-unet-short", compareProbes="pgd",
                            compareSeeds="0 1", probeParameters='{"pgd": {"steps": "1"}}', epsilons="0.01 0.02")
    run, _ = compare_as_widget(slicer_scene, settings)
    nodes = run.finish()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_scene.scene)
    assert hierarchy.GetItemName(nodes["folder"]).startswith("compare networks fgsm, pgd")
    with open(str(tmp_path / "study.json")) as stream:
        probes = json.load(stream)["study"]["probes"]
    assert [(p["name"], p["probe"], p["params"]) for p in probes] == [
        ("fgsm", "fgsm", {"seed": 0}), ("pgd seed 0", "pgd", {"steps": "1", "seed": 0}),
        ("pgd seed 1", "pgd", {"steps": "1", "seed": 1})]
    assert nodes["computed"] == 6  # 3 probes x 2 epsilons
    assert [chart.GetName() for chart in nodes["charts"]] == ["bench {} Dice".format(p["name"]) for p in probes]
    summary = table_rows(nodes["summary"])
    assert [row["probe"] for row in summary] == [p["name"] for p in probes] + ["overall"]
    middle = 0.01  # of the epsilons 0.01 0.02
    changed, later = [], 0
    for probe in probes:
        path = tmp_path / "fragility" / "demo-unet-short__crop__{}.nii.gz".format(probe["name"].replace(" ", "_"))
        fragility = np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)  # IJK -> Slicer's KJI
        changed.append((fragility > 0) & (fragility <= middle * (1 + 1e-6)))
        later += np.count_nonzero(fragility > middle * (1 + 1e-6))
    expected = np.mean(changed, axis=0)
    (key, node), = nodes["instability"].items()
    assert key == ("demo-unet-short", "crop")
    shown = util.arrayFromVolume(node)
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert later > 0  # voxels changed only at 0.02 exist, and count as stable
    assert 0 < np.count_nonzero((shown > 0) & (shown < 1))  # the probes disagree somewhere: a combination


def test_unknown_network_fails_with_its_name_and_adds_nothing(scene_with_two_volumes, tmp_path):
    slicer_scene, sample, _ = scene_with_two_volumes
    module_logic.parameter_node(slicer_scene.scene)
    before = node_ids(slicer_scene.scene)
    run, _ = compare_as_widget(slicer_scene, settings_for([sample], tmp_path, compareNetworks="demo-unet, no-such"))
    with pytest.raises(InputError, match="no-such"):
        run.finish()
    assert node_ids(slicer_scene.scene) == before


def test_compared_volumes_are_kept_in_the_parameter_node(scene_with_two_volumes):
    slicer_scene, sample, heldout = scene_with_two_volumes
    node = module_logic.parameter_node(slicer_scene.scene)
    module_logic.write_settings(node, settings_for([heldout, sample], ""))
    assert module_logic.read_settings(node).compareVolumes == [heldout, sample]
    module_logic.write_settings(node, settings_for([sample], ""))
    assert module_logic.read_settings(node).compareVolumes == [sample]


def test_reference_is_the_selected_one_for_the_input_volume_and_never_the_region(scene_with_two_volumes):
    slicer_scene, sample, heldout = scene_with_two_volumes
    scene = slicer_scene.scene
    segmentation = next(scene.GetNodesByClass("vtkMRMLSegmentationNode").GetItemAsObject(i)
                        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))
                        if scene.GetNodesByClass("vtkMRMLSegmentationNode").GetItemAsObject(i).GetName()
                        == "heldout segmentation")
    by_name = scene.GetFirstNodeByName(sample.GetName() + "-label")
    settings = settings_for([sample, heldout], "")
    assert module_compare.reference_node_of(scene, settings, sample) is by_name
    assert module_compare.reference_node_of(scene, settings, heldout) is segmentation
    settings.inputVolume = sample  # the input volume takes the reference selected under Inputs, here none
    assert module_compare.reference_node_of(scene, settings, sample) is None
    settings.regionSegmentation = segmentation  # a region is not a reference
    assert module_compare.reference_node_of(scene, settings, heldout) is None


def test_networks_and_cases_that_read_alike_stay_apart(tmp_path):
    import dataclasses
    networks = module_compare.study_networks(["demo-unet", "/runs/a/model.json", "/runs/b/model.json"])
    assert [item["name"] for item in networks] == ["demo-unet", "model", "model (2)"]
    volume, labels = heldout_volume(1)
    cases = [module_compare.CompareCase(dataclasses.replace(volume, name=name, array=volume.array + offset),
                                        labels, None) for offset, name in ((0, "a b"), (1, "a_b"), (2, "a b"))]
    inputs = module_compare.CompareInputs(cases, networks, [], "")
    written = module_compare.write_cases(inputs, tmp_path)
    assert [case["name"] for case in written] == ["a b", "a_b", "a b (2)"]
    assert len({case["volume"] for case in written} | {case["reference"] for case in written}) == 6
    import nibabel as nib
    firsts = [float(np.asarray(nib.load(case["volume"]).dataobj).max()) for case in written]
    assert firsts == sorted(set(firsts)) and len(set(firsts)) == 3  # each file holds its own volume


def test_a_classifier_study_shows_its_accuracy_table_and_chart(tmp_path):
    """The demo classifier's study (held-out slices, FGSM at two epsilons, DeepFool L-inf at one) in a real scene:
    the table holds classification.csv's rows, the chart one accuracy line per probe with the accuracy of each
    strength, all in the new folder; no instability maps (no segmentation)."""
    from MedAdvRobustnessLib.study.execution import run_study
    study = {"networks": ["demo-classifier"], "cases": ["heldout-slices:3"],
             "probes": [{"attack": "fgsm", "epsilons": [0.01, 0.05]}, {"attack": "deepfool-linf", "epsilons": [0.1]}]}
    study_run = run_study(study, tmp_path / "study")
    slicer_scene = SlicerScene.standalone()
    nodes = module_compare.add_compare_nodes(slicer_scene, study_run, "fgsm")
    with open(str(tmp_path / "study" / "classification.csv")) as stream:
        written = list(csv.DictReader(stream))
    shown = table_rows(nodes["summary"])
    assert [(row["network"], row["probe"]) for row in shown] == [(row["network"], row["probe"]) for row in written]
    for mine, theirs in zip(shown, written):
        assert mine["accuracy"] == theirs["accuracy"] and mine["strengths"] == theirs["strengths"]
        assert mine["clean_accuracy"] == pytest.approx(float(theirs["clean_accuracy"]))
    chart = nodes["chart"]
    assert chart.GetName() == "bench accuracy vs epsilon" and chart.GetNumberOfPlotSeriesNodes() == 2
    for index, row in enumerate(written[:2]):
        series = chart.GetNthPlotSeriesNode(index)
        table = series.GetTableNode().GetTable()
        xs = [table.GetColumnByName(series.GetXColumnName()).GetValue(i) for i in range(table.GetNumberOfRows())]
        ys = [table.GetColumnByName(series.GetYColumnName()).GetValue(i) for i in range(table.GetNumberOfRows())]
        assert series.GetName() == "demo-classifier " + row["probe"]
        assert xs == pytest.approx([float(s) for s in row["strengths"].split()])
        assert ys == pytest.approx([float(a) for a in row["accuracy"].split()], abs=1e-4)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_scene.scene)
    in_folder = module_logic.folder_nodes(hierarchy, nodes["folder"])
    assert nodes["summary"] in in_folder and chart in in_folder and nodes["instability"] == {}
    assert nodes["computed"] == 9 and not (tmp_path / "study" / "instability").exists()


def test_comparing_classifiers_from_the_scene_scores_the_true_class(tmp_path):
    """"Compare networks" with the demo classifier on two slices loaded in a scene, true class under Inputs: the
    accuracy table and chart of the bench, the accuracy of a direct sweep of the same images; without a true
    class one line and nothing added."""
    from MedAdvRobustnessLib import load_model, make_probe, run_sweep
    from MedAdvRobustnessLib.sample import SAMPLE_SLICE, SAMPLE_SLICE_CLASS
    from MedAdvRobustnessLib.study.cases import heldout_slice_cases, heldout_slice_volume
    slicer_scene = SlicerScene.standalone()
    module_logic.parameter_node(slicer_scene.scene)
    case = [c for c in heldout_slice_cases(16) if c["class"] == SAMPLE_SLICE_CLASS][-1]
    other = heldout_slice_volume(case)
    nodes = [slicer_scene.load_volume(SAMPLE_SLICE), add_volume_node(slicer_scene.scene, other.array, other, "other")]
    settings = settings_for(nodes, tmp_path / "none", compareNetworks="demo-classifier", epsilons="0.01 0.05")
    before = node_ids(slicer_scene.scene)
    run, _ = compare_as_widget(slicer_scene, settings)
    with pytest.raises(InputError, match="give the true class"):
        run.finish()
    assert node_ids(slicer_scene.scene) == before
    run, _ = compare_as_widget(slicer_scene, settings_for(nodes, tmp_path / "study", compareNetworks="demo-classifier",
                                                          epsilons="0.01 0.05", trueClass=str(SAMPLE_SLICE_CLASS)))
    added = run.finish()
    (row,) = [row for row in table_rows(added["summary"]) if row["probe"] == "fgsm"]
    model = load_model("demo-classifier")
    sweeps = [run_sweep(model, module_logic.volume_from_node(node), make_probe("fgsm"), [0.01, 0.05],
                        SAMPLE_SLICE_CLASS).rows for node in nodes]
    accuracy = [np.mean([rows[i]["predicted"] == SAMPLE_SLICE_CLASS for rows in sweeps]) for i in range(3)]
    assert [float(a) for a in row["accuracy"].split()] == pytest.approx(accuracy, abs=1e-4)  # strengths 0, 0.01, 0.05
    assert float(row["clean_accuracy"]) == pytest.approx(accuracy[0]) and 0 < accuracy[0] and accuracy[-1] < 1
    assert added["chart"].GetName() == "bench accuracy vs epsilon" and added["instability"] == {}
