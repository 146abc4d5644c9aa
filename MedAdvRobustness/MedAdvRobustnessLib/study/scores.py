"""Scores: the results table of the stored cells, the Dice curves, the robustness score and the ROOD-MRI summary
per network and probe, with their standard deviation over the cases."""
import math

from ..errors import InputError
from ..probes.corruptions import rood_summary


TABLE_KEYS = ("network", "case", "probe", "kind", "strength", "label")


def robustness_score(strengths, dices):
    """Area under the Dice-vs-strength curve relative to the clean Dice, normalised to [0, 1].

    ``strengths`` start at 0 (the clean volume); the curve ``min(dice / clean dice, 1)`` is integrated with the
    trapezoid rule from 0 to the largest strength and divided by it: 1 for a network the probe does not affect,
    0 for one that loses everything at once.
    """
    pairs = sorted(zip((float(s) for s in strengths), (float(d) for d in dices)))
    if len(pairs) < 2 or pairs[0][0] != 0.0 or pairs[-1][0] <= 0.0:
        raise InputError("a robustness score needs the clean Dice (strength 0) and one strength above 0 at least")
    clean = pairs[0][1]
    if not clean > 0:
        return 0.0
    xs = [s for s, _ in pairs]
    ys = [min(max(d / clean, 0.0), 1.0) for _, d in pairs]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2.0 for i in range(len(xs) - 1))
    return area / xs[-1]


def table_rows(records):
    """The long-format table: one row per network, case, probe, strength, label; the clean rows (strength 0)
    once per network, case and probe."""
    rows, seen = [], set()
    for record in records:
        for row in record["rows"]:
            key = tuple(row[k] for k in TABLE_KEYS)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def curves(rows):
    """Mean-label Dice per (network, probe, kind), case and strength, from :func:`scored_rows`."""
    per_case = {}
    for row in scored_rows(rows):
        per_case[(row["network"], row["probe"], row["kind"], row["case"], float(row["strength"]))] = row["dice"]
    grouped = {}
    for (network, probe, kind, case, strength), dice in per_case.items():
        grouped.setdefault((network, probe, kind), {}).setdefault(case, {})[strength] = dice
    return grouped


def scored_rows(rows):
    """The mean-label rows that Dice is averaged over, never mixing two kinds of Dice: per (network, probe, kind),
    the rows against the reference when any case has one, else (no case has one) those against the clean
    prediction."""
    referenced = _referenced_groups(rows)
    return [row for row in rows if row["label"] == "mean" and row["dice"] is not None
            and (row.get("against") == "reference") == (_group(row) in referenced)]


def _referenced_groups(rows):
    """The (network, probe, kind) groups with Dice against a reference."""
    return {_group(row) for row in rows if row.get("against") == "reference"}


def _group(row):
    return row["network"], row["probe"], row["kind"]


def summary_rows(rows):
    """Per network and probe: clean Dice, Dice per strength, robustness score (attacks) and ROOD degradation
    (corruptions), each averaged over the cases (see :func:`scored_rows`; ``dice_against`` says against what, and
    ``cases_without_reference`` how many cases were left out for want of a reference), with the standard deviation
    over them (``_sd``, from two cases on); then one ``overall`` row per network."""
    referenced, unreferenced = _referenced_groups(rows), {}
    for row in rows:
        if row.get("against") != "reference":
            unreferenced.setdefault(_group(row), set()).add(row["case"])
    out = [dict(_probe_summary(key, by_case), dice_against="reference" if key in referenced else "clean prediction",
                cases_without_reference=len(unreferenced.get(key, ()))) for key, by_case in curves(rows).items()]
    for network in unique(row["network"] for row in out):
        out.append(_overall_summary(network, [row for row in out if row["network"] == network]))
    return out


def _probe_summary(key, by_case):
    """The summary row of one (network, probe, kind) from its Dice per case and strength."""
    network, probe, kind = key
    strengths = sorted({s for values in by_case.values() for s in values})
    complete = {case: values for case, values in by_case.items() if set(values) == set(strengths)}
    scores, degradations, overalls = [], [], []
    for values in complete.values():
        ordered = [values[s] for s in strengths]
        scores.append(robustness_score(strengths, ordered))
        if kind == "corruption":
            summary = rood_summary({int(s): values[s] for s in strengths if s > 0}, values[0.0])
            degradations.append(summary["degradation"])
            overalls.append(summary["overall"])
    dice = [mean_or_none([values[s] for values in complete.values()]) for s in strengths]
    cleans = [values[0.0] for values in complete.values() if 0.0 in values]
    return {"network": network, "probe": probe, "kind": kind, "cases": len(complete),
            "clean_dice": dice[0] if dice else None, "clean_dice_sd": _sd(cleans),
            "strengths": " ".join("{:g}".format(s) for s in strengths),
            "dice": " ".join("{:.4f}".format(d) for d in dice), "robustness_score": mean_or_none(scores),
            "robustness_score_sd": _sd(scores), "rood_degradation": mean_or_none(degradations),
            "rood_degradation_sd": _sd(degradations), "rood_overall": mean_or_none(overalls)}


def _overall_summary(network, mine):
    """The ``overall`` row of a network from its probe rows (those against the reference, if any are)."""
    mine = [row for row in mine if row["dice_against"] == "reference"] or mine
    attacks = [row for row in mine if row["kind"] == "attack"]
    corruptions = [row for row in mine if row["kind"] == "corruption"]
    return {"network": network, "probe": "overall", "kind": "", "dice_against": mine[0]["dice_against"],
            "cases": max(row["cases"] for row in mine),
            "cases_without_reference": max(row["cases_without_reference"] for row in mine),
            "clean_dice": mean_or_none([row["clean_dice"] for row in mine]), "strengths": "", "dice": "",
            "robustness_score": mean_or_none([row["robustness_score"] for row in attacks]),
            "rood_degradation": mean_or_none([row["rood_degradation"] for row in corruptions]),
            "rood_overall": mean_or_none([row["rood_overall"] for row in corruptions])}


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _sd(values):
    """Sample standard deviation; None for fewer than two values."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def unique(items):
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


# ------------------------------------------------------------------------------------------ classifiers
CLASSIFICATION_COLUMNS = ("network", "probe", "kind", "cases", "clean_accuracy", "strengths", "accuracy",
                          "robustness_score", "minimal_cases", "minimal_found", "median_minimal_l2_fraction",
                          "median_minimal_linf_fraction")


def is_class_row(row):
    """Whether a results row is a classifier's (see :func:`~.cells._class_row`)."""
    return row.get("task") == "classification"


def classification_summary_rows(rows):
    """Per classifier and probe: the accuracy (share of cases given their true class) clean and at each strength,
    the robustness score of that accuracy curve (:func:`robustness_score` on accuracy in place of Dice) and, for
    the minimal-perturbation attacks (DeepFool, JSMA), the median minimal perturbation over the cases at the
    probe's largest strength (:func:`median_minimal`); then one ``overall`` row per network."""
    grouped = _class_groups(rows)
    out = [_class_probe_summary(key, by_case) for key, by_case in grouped.items()]
    for network in unique(row["network"] for row in out):
        out.append(_class_overall(network, [row for row in out if row["network"] == network], grouped))
    return out


def _class_groups(rows):
    """The classifier rows per (network, probe, kind), case and strength."""
    grouped = {}
    for row in rows:
        if is_class_row(row):
            key = (row["network"], row["probe"], row["kind"])
            grouped.setdefault(key, {}).setdefault(row["case"], {})[float(row["strength"])] = row
    return grouped


def _accuracy_curve(by_case):
    """The strengths, the accuracy at each over the cases that have every strength, and those cases' rows."""
    strengths = sorted({s for values in by_case.values() for s in values})
    complete = [values for values in by_case.values() if set(values) == set(strengths)]
    accuracy = [mean_or_none([float(bool(values[s]["correct"])) for values in complete]) for s in strengths]
    return strengths, accuracy, complete


def accuracy_curves(rows):
    """Per classifier (network, probe, kind): its strengths and the accuracy at each (as in
    :func:`classification_summary_rows`)."""
    return {key: _accuracy_curve(by_case)[:2] for key, by_case in _class_groups(rows).items()}


def _class_probe_summary(key, by_case):
    network, probe, kind = key
    strengths, accuracy, complete = _accuracy_curve(by_case)
    score = robustness_score(strengths, accuracy) if len(strengths) > 1 and complete else None
    row = {"network": network, "probe": probe, "kind": kind, "cases": len(complete),
           "clean_accuracy": accuracy[0] if accuracy else None,
           "strengths": " ".join("{:g}".format(s) for s in strengths),
           "accuracy": " ".join("{:.4f}".format(a) for a in accuracy), "robustness_score": score}
    row.update(median_minimal([values[strengths[-1]] for values in complete]))
    return row


def reports_minimal(rows):
    """Whether a probe's rows come from a minimal-perturbation attack: one of them at least gives the minimal
    perturbation (a case whose attack found no flip gives none)."""
    return any("minimal_l2_fraction" in row for row in rows)


def median_minimal(rows):
    """The median over ``rows`` (one per case, of a minimal-perturbation attack) of ``minimal_l2_fraction`` and
    ``minimal_linf_fraction``, a case whose attack found no flip within its budget counted as infinitely large (the
    median is None where half the cases or more found none); ``minimal_cases`` and ``minimal_found`` count the
    cases and those with a flip. Nothing where the attack reports no minimal perturbation."""
    if not reports_minimal(rows):
        return {}
    sizes = {norm: [row.get("minimal_{}_fraction".format(norm)) for row in rows] for norm in ("l2", "linf")}
    out = {"minimal_cases": len(rows), "minimal_found": sum(size is not None for size in sizes["l2"])}
    for norm, values in sizes.items():
        median = _median([math.inf if value is None else value for value in values])
        out["median_minimal_{}_fraction".format(norm)] = median if math.isfinite(median) else None
    return out


def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2.0


def _class_overall(network, mine, grouped):
    """The ``overall`` row of a classifier: mean clean accuracy, mean robustness score over its attacks, and the
    median minimal perturbation over all its minimal-perturbation cells (each probe at its largest strength)."""
    attacks = [row for row in mine if row["kind"] == "attack"]
    minimal = []
    for (name, probe, _), by_case in grouped.items():
        if name == network:
            largest = max(s for values in by_case.values() for s in values)
            attacked = [values[largest] for values in by_case.values() if largest in values]
            minimal += attacked if reports_minimal(attacked) else []
    row = {"network": network, "probe": "overall", "kind": "", "cases": max(row["cases"] for row in mine),
           "clean_accuracy": mean_or_none([row["clean_accuracy"] for row in mine]), "strengths": "", "accuracy": "",
           "robustness_score": mean_or_none([row["robustness_score"] for row in attacks])}
    row.update(median_minimal(minimal))
    return row
