"""Fragility under probes that move the anatomy (affine, elastic deformation): every change mask is brought back to
the subject's own grid, checked against numpy from the voxel matrix, a round trip through the elastic field, and a
real sweep of a pointwise network on a small synthetic volume."""
import numpy as np
import pytest
import torch

from MedAdvRobustnessLib import ModelDescription, SegmentationModel, Volume, make_probe, run_sweep
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.evaluation.fragility import (changed_voxels, first_change_map, fragility_map,
                                                      structure_rows, unstable_labels)
from MedAdvRobustnessLib.probes.corruptions import (_rigid_voxel_matrix, corrupt_with_labels, corruption_parameters,
                                                    to_subject_frame)
from MedAdvRobustnessLib.study.fragility import cell_arrays

SHAPE = (24, 24, 24)
SPACING = (2.0, 2.0, 2.0)
SEED = 3


def voxel_indices(shape):
    """(3, X, Y, Z) float64: each voxel's own index."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def affine_matrix(severity, seed, spacing):
    """The output-to-input voxel matrix of ``affine`` at ``severity``: its rotation and translation drawn as
    corruptions draws them (two uniform triples of the seed's generator)."""
    parameters = corruption_parameters("affine", severity)
    rng = np.random.default_rng(seed)
    rotation = rng.uniform(-1.0, 1.0, 3) * parameters["max_rotation_deg"]
    translation = rng.uniform(-1.0, 1.0, 3) * parameters["max_translation_mm"]
    return _rigid_voxel_matrix(rotation, translation, spacing)


def apply_centred(matrix, points, shape):
    """``matrix (points - c) + c`` for (3, ...) voxel indices, c the grid centre."""
    centre = ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0).reshape((3,) + (1,) * (points.ndim - 1))
    return np.einsum("ij,j...->i...", matrix[:3, :3], points - centre) + matrix[:3, 3].reshape(centre.shape) + centre


def take_nearest(array, points, outside):
    """``array`` at the nearest voxel of each (3, ...) point, ``outside`` where that voxel is off the grid."""
    index = np.rint(points).astype(np.int64)
    inside = np.all((index >= 0) & (index < np.reshape(array.shape, (3,) + (1,) * (points.ndim - 1))), axis=0)
    result = np.full(points.shape[1:], outside, dtype=array.dtype)
    result[inside] = array[tuple(index[:, inside])]
    return result


# --------------------------------------------------------------------------------------------- the deformations
@pytest.mark.parametrize("severity", [1, 2])
def test_an_affine_change_mask_comes_back_through_the_inverse_voxel_matrix(severity):
    """numpy from the voxel matrix: the deformed image's voxel o shows the subject at M (o - c) + c (checked on the
    labels corruptions moves), so subject voxel p is where the deformed voxel inv(M) (p - c) + c shows it."""
    spacing = (1.5, 1.0, 2.0)
    matrix = affine_matrix(severity, SEED, spacing)
    codes = torch.arange(1, 1 + int(np.prod(SHAPE))).reshape(SHAPE)  # each voxel its own label; the smallest, 1,
    # is also what fills the field of view that nothing moved into
    moved_codes = corrupt_with_labels("affine", torch.zeros((1, 1) + SHAPE), codes, severity, SEED, spacing)[1]
    expected_codes = take_nearest(codes.numpy(), apply_centred(matrix, voxel_indices(SHAPE), SHAPE), outside=1)
    assert np.array_equal(moved_codes.numpy(), expected_codes), "the matrix is the one corruptions uses"
    moved_mask = np.random.default_rng(0).random(SHAPE) < 0.5
    back = to_subject_frame("affine", moved_mask, severity, SEED, spacing)
    shown_at = apply_centred(np.linalg.inv(matrix), voxel_indices(SHAPE), SHAPE)
    expected = take_nearest(moved_mask, shown_at, False)
    print("severity", severity, "subject voxels in view", float(take_nearest(np.ones(SHAPE, bool), shown_at, False)
                                                                .mean()))
    assert back.dtype == bool and np.array_equal(back, expected)
    assert 0.1 < (back != moved_mask).mean(), "the frames differ: a mask left where it is would fail"


@pytest.mark.parametrize("severity", [2, 5])
def test_an_elastic_round_trip_lands_within_one_voxel(severity):
    """Each subject voxel moved by the deformation (nearest) and brought back lands on itself or, by double
    rounding, a neighbour, never further (left where they are, some land 2 voxels off or more); a smooth mask comes
    back but for a small measured fraction."""
    codes = torch.arange(1, 1 + int(np.prod(SHAPE))).reshape(SHAPE)  # 1 is also what leaves the field of view
    moved = corrupt_with_labels("elastic_deformation", torch.zeros((1, 1) + SHAPE), codes, severity, SEED,
                                SPACING)[1].numpy()
    back = to_subject_frame("elastic_deformation", moved, severity, SEED, SPACING)
    index = voxel_indices(SHAPE)
    known = back > 1
    offset = np.abs(np.stack(np.unravel_index(np.maximum(back - 1, 0), SHAPE)) - index).max(axis=0)[known]
    unmoved = np.abs(np.stack(np.unravel_index(moved - 1, SHAPE)) - index).max(axis=0)[moved > 1]
    ball = np.linalg.norm(index - 11.5, axis=0) < 7.0
    moved_ball = corrupt_with_labels("elastic_deformation", torch.zeros((1, 1) + SHAPE),
                                     torch.from_numpy(ball.astype(np.int64)), severity, SEED, SPACING)[1].numpy()
    ball_back = to_subject_frame("elastic_deformation", moved_ball.astype(bool), severity, SEED, SPACING)
    print("severity", severity, "in view", float(known.mean()), "back on itself", float((offset == 0).mean()),
          "largest offset back / left in place", int(offset.max()), int(unmoved.max()),
          "ball voxels differing back / left in place", float((ball_back != ball).mean()),
          float((moved_ball.astype(bool) != ball).mean()))
    assert known.mean() > 0.6 and offset.max() <= 1 and (offset == 0).mean() > 0.75
    assert unmoved.max() >= 2
    assert (ball_back != ball).mean() < 0.01 < (moved_ball.astype(bool) != ball).mean()


def test_only_a_boolean_or_integer_grid_can_be_brought_back():
    with pytest.raises(InputError, match="boolean or integer"):
        to_subject_frame("affine", np.zeros(SHAPE, np.float32), 1)
    assert np.array_equal(to_subject_frame("smoothing", np.eye(3, dtype=bool)[None].repeat(3, 0), 2),
                          np.eye(3, dtype=bool)[None].repeat(3, 0))


# --------------------------------------------------------------------------------------------- a real sweep
def pointwise_model():
    """A 1x1x1 convolution: label 0 below 1/3, 1 up to 2/3, 2 above (logits 0, 3x - 1, 6x - 3): its prediction of a
    moved image is the moved prediction but for interpolation at the label boundaries."""
    conv = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 3.0, 6.0]).view(3, 1, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, -1.0, -3.0]))
    return SegmentationModel(conv, ModelDescription(name="pointwise")).eval()


def blobs():
    """Smooth intensities in [0, 1]: two Gaussian blobs off the centre, so that a rotation about it moves them."""
    index = voxel_indices(SHAPE)

    def blob(centre, width):
        return np.exp(-((index - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(axis=0) / (2.0 * width ** 2))
    image = np.maximum(blob((9.0, 10.0, 13.0), 5.0), 0.9 * blob((16.0, 14.0, 9.0), 3.5))
    return Volume.from_array(image, np.diag(list(SPACING) + [1.0]), name="blobs")


SWEPT = {"affine": [1, 2], "elastic_deformation": [2, 4]}


@pytest.fixture(scope="module")
def sweeps():
    model, volume = pointwise_model(), blobs()
    return {name: run_sweep(model, volume, make_probe(name, seed=SEED), severities)
            for name, severities in SWEPT.items()}


def near_a_boundary(labels):
    """The voxels with a 26-neighbour of another label."""
    from scipy import ndimage
    return np.any([ndimage.grey_dilation(labels, size=3) != labels, ndimage.grey_erosion(labels, size=3) != labels],
                  axis=0)


@pytest.mark.parametrize("name", list(SWEPT))
def test_the_fragility_map_of_a_moving_probe_is_on_the_subject_frame(sweeps, name):
    """The pointwise network's labels change only where interpolation crosses a threshold: at label boundaries of
    the subject. The map marks few voxels, all next to a boundary of the clean prediction; comparing with the
    unmoved clean prediction would mark many, and the moved frame's positions miss the boundaries."""
    result = sweeps[name]
    clean = result.clean.prediction
    fragility = fragility_map(result)
    moved_frame = first_change_map([o.strength for o in result.outcomes[1:]],
                                   [o.prediction != o.clean_prediction for o in result.outcomes[1:]])
    unmoved = np.any([o.prediction != clean for o in result.outcomes[1:]], axis=0)
    boundary = near_a_boundary(clean)
    fragile = fragility > 0
    print(name, "fragile voxels", int(fragile.sum()), "against the unmoved clean prediction", int(unmoved.sum()),
          "next to a clean boundary: subject frame", float(boundary[fragile].mean()),
          "moved frame", float(boundary[moved_frame > 0].mean()), "clean foreground", int((clean != 0).sum()))
    assert fragility.dtype == np.float32 and fragility.shape == clean.shape
    assert 0 < fragile.sum() < 0.3 * unmoved.sum()
    assert boundary[fragile].mean() > 0.95
    assert boundary[moved_frame > 0].mean() < boundary[fragile].mean() - 0.1


def test_the_affine_sweep_brings_each_change_back_through_the_inverse_matrix(sweeps):
    result = sweeps["affine"]
    changed = []
    for outcome in result.outcomes[1:]:
        inverse = np.linalg.inv(affine_matrix(int(outcome.strength), SEED, SPACING))
        expected = take_nearest(outcome.prediction != outcome.clean_prediction,
                                apply_centred(inverse, voxel_indices(SHAPE), SHAPE), False)
        assert np.array_equal(changed_voxels(result, outcome), expected)
        changed.append(expected)
    assert np.array_equal(fragility_map(result), first_change_map(SWEPT["affine"], changed))


@pytest.mark.parametrize("name", list(SWEPT))
def test_the_unstable_segment_holds_the_labels_of_the_anatomy_that_changed(sweeps, name):
    """Each voxel of the segment has the clean label the changed anatomy had: the moved clean prediction's label at
    the deformed voxel that shows it (as the subject-frame map finds it), for nearly all of them; the moved frame's
    positions would put other labels on many."""
    result = sweeps[name]
    strength = result.outcomes[-1].strength
    fragility = fragility_map(result)
    unstable = unstable_labels(result, fragility, strength)
    segment = unstable != 0
    assert np.array_equal(segment, (fragility > 0) & (result.clean.prediction != 0))
    assert np.array_equal(unstable[segment], result.clean.prediction[segment])
    agree, agree_moved = [], []
    for outcome in result.outcomes[1:]:
        at = outcome.strength
        mask = fragility == at
        shown = to_subject_frame(name, outcome.clean_prediction.astype(np.int64), int(at), SEED, SPACING)
        agree.append(unstable[mask & segment] == shown[mask & segment])
        old = (outcome.prediction != outcome.clean_prediction) & (result.clean.prediction != 0)
        agree_moved.append(result.clean.prediction[old] == outcome.clean_prediction[old])
    agree, agree_moved = np.concatenate(agree), np.concatenate(agree_moved)
    print(name, "segment voxels", int(segment.sum()), "with the changed anatomy's label", float(agree.mean()),
          "at the moved frame's positions", float(agree_moved.mean()))
    assert segment.sum() > 0 and agree.mean() > 0.85  # the rest: a neighbour's label, by double rounding
    assert agree_moved.mean() < agree.mean() - 0.3


@pytest.mark.parametrize("name", list(SWEPT))
def test_one_strength_cells_give_the_sweep_s_map_and_the_table_s_dice_is_the_metric_rows(sweeps, name):
    result = sweeps[name]
    model, volume = pointwise_model(), blobs()
    masks = []
    for severity in SWEPT[name]:
        cell = run_sweep(model, volume, make_probe(name, seed=SEED), [severity])
        arrays = cell_arrays(cell)
        masks.append(np.unpackbits(arrays["changed"], count=cell.clean.prediction.size)
                     .reshape(SHAPE).astype(bool))
        assert np.array_equal(masks[-1], fragility_map(cell) > 0)
    assert np.array_equal(first_change_map(SWEPT[name], masks), fragility_map(result))
    rows = {row["label"]: row for row in structure_rows(result)}
    for metric_row in result.rows:
        if metric_row["severity"] > 0 and metric_row["label"] in rows:
            row = rows[metric_row["label"]]
            assert row["dice_{:g}".format(metric_row["severity"])] == pytest.approx(metric_row["dice_clean"], abs=1e-6)
            mine = result.clean.prediction == row["value"]
            changed = changed_voxels(result, next(o for o in result.outcomes if o.strength == metric_row["severity"]))
            assert row["changed_{:g}".format(metric_row["severity"])] == pytest.approx(float(changed[mine].mean()))
