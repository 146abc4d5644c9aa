"""Fragility maps, fragile structures and whether fragility finds the network's errors, on the demo network and
its sample (a real sweep), each checked against an independent computation."""
import nibabel as nib
import numpy as np
import pytest
import torch
from slicer import util

from MedAdvRobustnessLib import Volume, load_model, make_probe, run_sweep
from MedAdvRobustnessLib.evaluation.fragility import (auroc, boundary_distance, critical_strength, fragility_map,
                                                      fragility_summary, instability_map, largest_cluster_centre,
                                                      middle_strength, ranking_summary, structure_rows,
                                                      top_error_fraction, unstable_labels)
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME

EPSILONS = [0.005, 0.01, 0.02]


class CountingNetwork(torch.nn.Module):
    """The demo network, counting its forward passes."""

    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, inputs):
        self.calls += 1
        return self.network(inputs)


@pytest.fixture(scope="module")
def demo_sweep():
    image = nib.load(str(SAMPLE_VOLUME))
    volume = Volume.from_array(image.get_fdata(), image.affine, name="sample")
    reference = np.asarray(nib.load(str(SAMPLE_LABELS)).dataobj).astype(np.int64)
    model = load_model("demo")
    model.network = CountingNetwork(model.network)
    result = run_sweep(model, volume, make_probe("fgsm"), EPSILONS, reference=reference)
    return model, result, reference


def test_the_sweep_makes_no_network_pass_beyond_the_attack_and_the_predictions(demo_sweep):
    """The whole sweep, map and rankings included, runs the network once on the clean volume and, per strength,
    once for FGSM's gradient and once for the prediction of the attacked volume: nothing for the fragility."""
    model, _, _ = demo_sweep
    assert model.network.calls == 1 + 2 * len(EPSILONS)


def test_the_map_is_the_first_strength_at_which_each_voxel_changes(demo_sweep):
    model, result, _ = demo_sweep
    calls = model.network.calls
    fragility = fragility_map(result)
    rows = structure_rows(result)
    assert model.network.calls == calls, "the map and the table come from the sweep's predictions only"
    clean = result.clean.prediction
    changed = np.stack([outcome.prediction != clean for outcome in result.outcomes[1:]])
    first = np.where(changed.any(axis=0), np.asarray(EPSILONS, np.float32)[changed.argmax(axis=0)], 0.0)
    assert fragility.dtype == np.float32 and fragility.shape == clean.shape
    assert np.array_equal(fragility, first)
    counts = [int((fragility == eps).sum()) for eps in EPSILONS]
    print("voxels first changed at", dict(zip(EPSILONS, counts)), "never:", int((fragility == 0).sum()))
    assert all(count > 0 for count in counts)
    by_name = {row["label"]: row for row in rows}
    for metric_row in result.rows:  # the table's Dice equals MONAI's, from the sweep's metric rows
        if metric_row["epsilon"] > 0 and metric_row["label"] in by_name:
            assert by_name[metric_row["label"]]["dice_{:g}".format(metric_row["epsilon"])] == \
                pytest.approx(metric_row["dice_clean"], abs=1e-6)  # MONAI: float32
    for row in rows:
        mine = clean == row["value"]
        assert row["voxels"] == int(mine.sum())
        # at the smallest strength, the voxels changed are those the map gives that strength
        assert row["changed_0.005"] == pytest.approx(float((fragility[mine] == 0.005).mean()))
        assert 0 < row["changed_0.005"] <= 1
    print({row["label"]: row["critical_epsilon"] for row in rows})
    assert all(row["critical_epsilon"] is None or 0 < row["critical_epsilon"] <= EPSILONS[-1] for row in rows)


def test_critical_strength_is_interpolated_where_dice_crosses_0_9():
    assert critical_strength([(0.0, 1.0), (0.01, 0.95), (0.02, 0.85)]) == pytest.approx(0.015)
    assert critical_strength([(0.0, 1.0), (0.01, 0.8)]) == pytest.approx(0.005)
    assert critical_strength([(0.0, 1.0), (0.01, 0.95)]) is None


def test_unstable_voxels_and_the_largest_cluster(demo_sweep):
    _, result, _ = demo_sweep
    fragility = fragility_map(result)
    middle = middle_strength(result)
    assert middle == 0.01
    unstable = unstable_labels(result, fragility, middle)
    assert np.array_equal(unstable != 0, (fragility > 0) & (fragility <= middle) & (result.clean.prediction != 0))
    assert np.array_equal(unstable[unstable != 0], result.clean.prediction[unstable != 0])
    mask = np.zeros((20, 20, 20), bool)
    mask[2:4, 2:4, 2:4] = True
    mask[10:15, 11:16, 12:17] = True
    assert largest_cluster_centre(mask) == (12.0, 13.0, 14.0)
    assert largest_cluster_centre(np.zeros((3, 3, 3), bool)) is None


def test_instability_counts_the_sweeps_in_which_a_voxel_changes_by_their_middle_strength():
    a = np.array([0.0, 0.01, 0.02, 0.04], np.float32)
    b = np.array([2.0, 0.0, 3.0, 1.0], np.float32)
    assert np.allclose(instability_map([a, b], [0.02, 3.0]), [0.5, 0.5, 1.0, 0.5])
    # a strength given as float64 is compared as the float32 the map holds (float64 0.01 > float32 0.01)
    assert np.allclose(instability_map([a], [np.float64(0.01)]), [0.0, 1.0, 0.0, 0.0])


def test_auroc_and_top_fractions_equal_their_definitions():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 300).astype(float)  # many ties
    positive = rng.random(300) < 0.3 + 0.1 * score
    pairs = score[positive][:, None] - score[~positive][None, :]
    assert auroc(score, positive) == pytest.approx(float((pairs > 0).mean() + 0.5 * (pairs == 0).mean()))
    score = np.array([5.0, 4.0, 4.0, 4.0, 1.0, 0.0])
    positive = np.array([True, True, False, False, True, False])
    # the top 3: the 5 and two of the three tied 4s, of which one is an error: 1 + 2 * 1/3
    assert top_error_fraction(score, positive, 0.5) == pytest.approx((1 + 2 / 3) / 3)
    assert auroc(score, np.zeros(6, bool)) is None


def test_ranking_on_a_tiny_case_equals_a_hand_computation():
    """Eight voxels along the third axis (2 mm apart): which voxels are scored, 1 / strength, the boundary sign."""
    clean = np.array([0, 1, 1, 1, 2, 2, 0, 0]).reshape(1, 1, 8)
    reference = np.array([1, 1, 1, 2, 2, 2, 0, 0]).reshape(1, 1, 8)  # errors at 0 and 3; 6 and 7 not scored
    fragility = np.array([0.02, 0, 0.04, 0.01, 0, 0.02, 0.01, 0], np.float32).reshape(1, 1, 8)
    entropy = np.array([0.3, 0.1, 0.2, 0.9, 0.2, 0.1, 0.9, 0.9], np.float32).reshape(1, 1, 8)
    summary = ranking_summary(clean, entropy, (5.0, 7.0, 2.0), fragility, reference)
    assert (summary["voxels"], summary["errors"]) == (6, 2) and summary["error_fraction"] == pytest.approx(1 / 3)
    scores = summary["scores"]
    # fragility 1/s on the scored voxels: errors 50, 100; the rest 0, 25, 0, 50 (one tie): (3.5 + 4) / 8 pairs
    assert scores["fragility"]["auroc"] == pytest.approx(7.5 / 8)
    assert scores["fragility"]["error_fraction_top_1%"] == 1.0  # the top voxel (100) is an error
    assert scores["entropy"]["auroc"] == 1.0
    # boundary voxels (a 6-neighbour of another label): 0, 1, 3, 4, 5; voxel 2 lies 2 mm from one; the closer,
    # the higher: errors 0, 0 against 0, -2, 0, 0: (2.5 + 2.5) / 8; the top voxel is one of five tied at 0,
    # two of them errors
    assert scores["boundary"]["auroc"] == pytest.approx(5 / 8)
    assert scores["boundary"]["error_fraction_top_1%"] == pytest.approx(2 / 5)
    assert boundary_distance(clean, (5.0, 7.0, 2.0)).ravel().tolist() == [0, 0, 2, 0, 0, 0, 0, 2]


def test_fragility_is_scored_against_the_errors_with_entropy_and_boundary_baselines(demo_sweep):
    model, result, reference = demo_sweep
    calls = model.network.calls
    summary = fragility_summary(result, fragility_map(result), reference)
    assert model.network.calls == calls
    print(summary)
    assert set(summary["scores"]) == {"fragility", "entropy", "boundary"}
    clean = result.clean.prediction
    scored = (clean != 0) | (reference != 0)
    assert summary["voxels"] == int(scored.sum()) and summary["errors"] == int((clean != reference)[scored].sum())
    for entry in summary["scores"].values():
        assert 0.0 < entry["auroc"] < 1.0 and 0.0 <= entry["error_fraction_top_5%"] <= 1.0
    entropy = summary["scores"]["entropy"]
    assert entropy["auroc"] > 0.9 and entropy["error_fraction_top_1%"] > 0.9, "the clean softmax's entropy finds the "\
        "demo network's errors: a baseline fragility must be compared with"


def test_fragility_files_and_nodes(demo_sweep, tmp_path):
    """fragility.nii.gz on the input's grid, structures.csv, fragility_summary.json; in a real MRML scene the
    coloured fragility volume (0 thresholded out), the structures table and the unstable segmentation."""
    import csv
    import json
    from MedAdvRobustnessLib.module.logic import segment_masks
    from MedAdvRobustnessLib.scene.fragility import add_fragility_nodes, write_fragility_files
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
    _, result, _ = demo_sweep
    fragility = fragility_map(result)
    summary = write_fragility_files(result, tmp_path)
    written = nib.load(str(tmp_path / "fragility.nii.gz"))
    assert written.get_data_dtype() == np.float32
    assert np.allclose(written.affine, nib.load(str(SAMPLE_VOLUME)).affine, atol=1e-5)
    as_read = result.volume.orientation.to_network(np.transpose(np.asarray(written.dataobj), (2, 1, 0)))
    assert np.array_equal(as_read, fragility)
    with open(str(tmp_path / "structures.csv")) as stream:
        rows = list(csv.DictReader(stream))
    assert [row["label"] for row in rows] == ["CSF", "grey matter", "white matter"]
    assert list(rows[0])[-1] == "critical_epsilon" and "changed_0.005" in rows[0]
    assert json.loads((tmp_path / "fragility_summary.json").read_text())["scores"] == summary["scores"]
    scene = SlicerScene.standalone()
    nodes = add_fragility_nodes(scene, result, fragility)
    volume_node, display = nodes["fragility"], nodes["fragility"].GetDisplayNode()
    assert volume_node.GetName() == "sample fragility fgsm"
    assert display.GetApplyThreshold() and 0 < display.GetLowerThreshold() < EPSILONS[0]
    assert not display.GetInterpolate()
    assert display.GetColorNodeID() == nodes["fragility_colors"].GetID()
    colors = nodes["fragility_colors"]
    entry = lambda value: colors.GetColorName(int(value / display.GetWindowLevelMax() * colors.GetNumberOfColors()))
    assert [entry(eps) for eps in EPSILONS] == ["first change at {:g}".format(eps) for eps in EPSILONS]
    assert nodes["structures"].GetNumberOfRows() == 3
    segmentation = nodes["unstable"].GetSegmentation()
    assert nodes["unstable"].GetName() == "sample unstable at <= 0.01 fgsm"
    assert sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())) == \
        ["CSF", "grey matter", "white matter"]
    corners = [result.volume.affine @ np.array([0, 0, 0, 1.0]),
               result.volume.affine @ np.append(np.array(result.volume.array.shape) - 1.0, 1.0)]
    assert all(min(a, b) <= f <= max(a, b) for f, a, b in zip(nodes["focus"], corners[0], corners[1]))

    # saved as a .mrb and read back: the same map, colours, threshold, table and unstable segments
    scene.write_mrb(tmp_path / "fragility.mrb")
    loaded_scene = SlicerScene.read_mrb(tmp_path / "fragility.mrb")
    loaded = loaded_scene.scene
    node = loaded.GetFirstNodeByName("sample fragility fgsm")
    assert np.array_equal(util.arrayFromVolume(node), util.arrayFromVolume(volume_node))
    shown = node.GetDisplayNode()
    assert shown.GetApplyThreshold() and shown.GetLowerThreshold() == display.GetLowerThreshold()
    assert not shown.GetInterpolate() and shown.GetWindowLevelMax() == display.GetWindowLevelMax()
    table = shown.GetColorNode()
    assert table.GetName() == colors.GetName() and table.GetNumberOfColors() == colors.GetNumberOfColors()
    for index in range(colors.GetNumberOfColors()):
        before, after = [0.0] * 4, [0.0] * 4
        colors.GetColor(index, before)
        table.GetColor(index, after)
        assert table.GetColorName(index) == colors.GetColorName(index)
        np.testing.assert_allclose(after, before, atol=1e-6)
    assert loaded.GetFirstNodeByName(nodes["structures"].GetName()).GetNumberOfRows() == 3
    reloaded = loaded.GetFirstNodeByName("sample unstable at <= 0.01 fgsm").GetSegmentation()
    assert reloaded.GetNumberOfSegments() == segmentation.GetNumberOfSegments()
    expected = unstable_labels(result, fragility, 0.01)  # the same names and voxels after the reload
    masks = segment_masks(loaded_scene, loaded.GetFirstNodeByName("sample unstable at <= 0.01 fgsm"), None, node,
                          result.volume)
    assert [name for name, _ in masks] == [label.name for label in result.labels[1:]]
    for (name, mask), label in zip(masks, result.labels[1:]):
        assert mask.any() and np.array_equal(mask, expected == label.value), name
