"""Where a segmentation is fragile, from the predictions a sweep already made (no network evaluation here).

- :func:`fragility_map`: per voxel, the smallest swept strength (epsilon or severity) at which its predicted label
  differs from the clean prediction; 0 where it never does. Every map is on the subject's own grid (the clean
  volume's): for a probe that moves the anatomy, :func:`changed_voxels` brings each strength's changes back to it.
- :func:`structure_rows`: per label of the clean prediction, its size, the fraction of its voxels changed at each
  strength, and its critical strength (Dice against the clean prediction below 0.9, interpolated).
- :func:`unstable_labels`: per clean label, the voxels whose label changes at or below a strength.
- :func:`fragility_summary`: how well fragility (1 / strength, never changed = 0) ranks the voxels where the clean
  prediction is wrong, next to two baselines: the entropy of the clean outputs and the closeness to a label boundary.
- :func:`first_change_map`, :func:`ranking_summary`: the same from arrays (a study's cells, each one strength).
- :func:`instability_map`: over several sweeps, the fraction under which each voxel changes at or below their
  middle strength.
"""
import math

import numpy as np

CRITICAL_DICE = 0.9
TOP_FRACTIONS = (0.01, 0.05)


def fragility_map(result):
    """float32 map on the volume's grid: the smallest strength whose prediction differs from the clean one
    (:func:`changed_voxels`), 0 where none does."""
    outcomes = result.outcomes[1:]
    return first_change_map([outcome.strength for outcome in outcomes],
                            [changed_voxels(result, outcome) for outcome in outcomes])


def changed_voxels(result, outcome):
    """Boolean on the clean volume's grid: the voxels whose label ``outcome`` changed. A probe that moves the anatomy
    compares with the clean prediction moved with it and brings that mask back to the subject (``outcome.changed``)."""
    if outcome.changed is not None:
        return outcome.changed
    return outcome.prediction != result.clean.prediction


def first_change_map(strengths, changed):
    """:func:`fragility_map` from one boolean mask per strength (the voxels whose label it changed): the smallest
    strength whose mask holds the voxel, 0 where none does."""
    fragility = np.zeros(changed[0].shape, dtype=np.float32)
    for strength, mask in sorted(zip(strengths, changed), key=lambda item: item[0], reverse=True):
        fragility[mask] = strength
    return fragility


def middle_strength(result):
    """The strength in the middle of the sweep (the lower middle of an even count)."""
    strengths = [outcome.strength for outcome in result.outcomes[1:]]
    return float(strengths[(len(strengths) - 1) // 2])


def changed_at_or_below(fragility, strength):
    """Boolean map of the voxels whose label changes at or below ``strength``, compared as the float32 the map
    holds (a float64 0.1 is above the map's float32 0.1)."""
    return (fragility > 0) & (fragility <= np.float32(strength))


def structure_rows(result):
    """One row per foreground label of the clean prediction: ``label``, ``value``, ``voxels``, ``changed_<s>`` (the
    fraction of its voxels whose label differs at strength s, :func:`changed_voxels`), ``dice_<s>`` (against the
    clean prediction; moved with the anatomy where the probe moves it) and ``critical_<strength name>``."""
    clean = result.clean.prediction
    names = {label.value: label.name for label in result.labels}
    changed_masks = [changed_voxels(result, outcome) for outcome in result.outcomes[1:]]
    rows = []
    for value in (int(v) for v in np.unique(clean) if v != 0):
        mine = clean == value
        row = {"label": names.get(value, "label {}".format(value)), "value": value, "voxels": int(mine.sum())}
        curve = [(0.0, 1.0)]
        for outcome, changed_mask in zip(result.outcomes[1:], changed_masks):
            changed = float(changed_mask[mine].mean())
            before = outcome.clean_prediction if outcome.clean_prediction is not None else clean
            dice = _dice(outcome.prediction == value, before == value)
            row["changed_{:g}".format(outcome.strength)] = changed
            row["dice_{:g}".format(outcome.strength)] = dice
            curve.append((outcome.strength, dice))
        row["critical_" + result.strength_name] = critical_strength(curve)
        rows.append(row)
    return rows


def critical_strength(curve, threshold=CRITICAL_DICE):
    """The strength at which Dice first falls below ``threshold`` along (strength, Dice) points (the first at 0
    with Dice 1), linearly interpolated between the two strengths around it; None if it never does."""
    for (s0, d0), (s1, d1) in zip(curve, curve[1:]):
        if d1 < threshold:
            return s0 + (d0 - threshold) / (d0 - d1) * (s1 - s0) if d0 > d1 else s1
    return None


def unstable_labels(result, fragility, strength):
    """Label map: each voxel's clean label where its label changes at or below ``strength``, else 0."""
    return np.where(changed_at_or_below(fragility, strength), result.clean.prediction, 0).astype(result.clean.prediction.dtype)


def largest_cluster_centre(mask):
    """(i, j, k) centre of the largest 26-connected component of a boolean mask, or None if it is empty."""
    from scipy import ndimage
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = int(sizes.argmax())
    return tuple(float(c) for c in ndimage.center_of_mass(components == largest))


def instability_map(fragility_maps, strengths):
    """float32: per voxel, the fraction of the sweeps (their fragility maps, each with its middle strength) under
    which it changes at or below that strength."""
    counts = None
    for fragility, strength in zip(fragility_maps, strengths):
        unstable = changed_at_or_below(fragility, strength).astype(np.float32)
        counts = unstable if counts is None else counts + unstable
    return counts / len(fragility_maps)


# --------------------------------------------------------------------------------------- does it find errors?
def fragility_summary(result, fragility, reference):
    """How well fragility ranks the voxels where the clean prediction differs from ``reference``, against the
    entropy of the clean outputs and the closeness to a label boundary of the clean prediction.

    Scored on the voxels where the clean prediction or the reference is foreground: per score its AUROC (ties
    counted half, as the Mann-Whitney statistic) and the fraction of errors among its top 1 % and 5 % (voxels tied
    at the cut counted in proportion)."""
    return ranking_summary(result.clean.prediction, result.clean_entropy, result.spacing, fragility, reference)


def ranking_summary(clean, entropy, spacing, fragility, reference):
    """:func:`fragility_summary` from the arrays: the clean prediction, the entropy of the clean outputs (or
    None), the voxel spacing (mm)."""
    scored = (clean != 0) | (reference != 0)
    errors = (clean != reference)[scored]
    scores = {"fragility": np.where(fragility > 0, 1.0 / np.maximum(fragility, 1e-12), 0.0)[scored]}
    if entropy is not None:
        scores["entropy"] = entropy[scored].astype(np.float64)
    scores["boundary"] = -boundary_distance(clean, spacing)[scored]
    summary = {"voxels": int(scored.sum()), "errors": int(errors.sum()),
               "error_fraction": float(errors.mean()) if errors.size else None,
               "scored_on": "voxels where the clean prediction or the reference is foreground",
               "scores": {}}
    for name, score in scores.items():
        entry = {"auroc": auroc(score, errors)}
        for fraction in TOP_FRACTIONS:
            entry["error_fraction_top_{:g}%".format(100 * fraction)] = top_error_fraction(score, errors, fraction)
        summary["scores"][name] = entry
    return summary


def summary_line(summary):
    """One line of the printed summary: the AUROC and top-1 % error fraction of each score."""
    parts = ["{} AUROC {} top 1 % errors {}".format(name, _text(entry["auroc"]), _text(entry["error_fraction_top_1%"]))
             for name, entry in summary["scores"].items()]
    return "errors of the clean prediction ({} of {} voxels) ranked by: {}".format(
        summary["errors"], summary["voxels"], "; ".join(parts))


def auroc(score, positive):
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (Mann-Whitney U with average ranks);
    None without positives or negatives."""
    from scipy.stats import rankdata
    positives = int(positive.sum())
    negatives = positive.size - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def top_error_fraction(score, positive, fraction):
    """The fraction of ``positive`` among the ``fraction`` highest scores; the voxels tied at the cut count in
    proportion to the part of them the cut takes (the expectation over random tie-breaking)."""
    count = max(1, int(math.ceil(fraction * score.size)))
    if score.size == 0:
        return None
    cut = np.partition(score, score.size - count)[score.size - count]
    above, tied = score > cut, score == cut
    taken_from_tied = count - int(above.sum())
    hits = positive[above].sum() + taken_from_tied * positive[tied].sum() / tied.sum()
    return float(hits / count)


def boundary_distance(labels, spacing):
    """Distance (mm) from every voxel to the nearest voxel whose 6-neighbourhood holds another label."""
    from scipy import ndimage
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        differs = np.diff(labels, axis=axis) != 0
        before = [slice(None)] * labels.ndim
        after = [slice(None)] * labels.ndim
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        boundary[tuple(before)] |= differs
        boundary[tuple(after)] |= differs
    if not boundary.any():
        return np.full(labels.shape, np.inf)
    return ndimage.distance_transform_edt(~boundary, sampling=[float(s) for s in spacing])


def _dice(a, b):
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _text(value):
    return "n/a" if value is None else "{:.3f}".format(value)
