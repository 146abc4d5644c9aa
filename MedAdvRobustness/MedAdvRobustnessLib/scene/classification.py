"""Write a classifier's :class:`~..evaluation.records.ClassificationResult` into an MRML scene and a results
folder: the attacked images, the perturbations, the saliency map, the metrics table and the confidence curve."""
from pathlib import Path

import numpy as np

from .nodes import add_line_chart, add_table_node, add_volume_node
from .results import STRENGTH_WORDS, epsilon_text, outcome_title, write_metrics_csv, write_volume_file

CONFIDENCE_SERIES = (("confidence", (0.85, 0.3, 0.25)), ("label_probability", (0.25, 0.45, 0.85)))


def predicted_text(result, outcome_index):
    """``<class name> (p 0.93)`` for one outcome, from its metric row."""
    row = result.rows[outcome_index]
    return "{} (p {:.2f})".format(row["predicted_name"], row["confidence"])


def add_classification_nodes(slicer_scene, result):
    """Per strength the probed image and its perturbation, the clean image's saliency map, the metrics table and
    the confidence-vs-strength chart; returns the new nodes by role."""
    scene, volume = slicer_scene.scene, result.volume
    title = "{} {} {}".format(volume.name, result.model_name, result.probe_name)
    nodes = {"probed": {}, "perturbation": {}}
    for outcome in result.outcomes[1:]:
        suffix = outcome_title(result, outcome)
        nodes["probed"][outcome.strength] = add_volume_node(
            scene, outcome.probed, volume, "{} {} {}".format(volume.name, STRENGTH_WORDS[result.strength_name][1],
                                                             suffix))
        nodes["perturbation"][outcome.strength] = add_volume_node(
            scene, outcome.probed - volume.array, volume, "{} perturbation {}".format(volume.name, suffix))
    nodes["saliency"] = add_volume_node(scene, result.saliency, volume, "{} saliency {}".format(
        volume.name, result.model_name))
    nodes["metrics"] = add_table_node(scene, result.rows, result.columns, title + " metrics")
    nodes["curve"], nodes["chart"] = add_confidence_curve(scene, result, title)
    return nodes


def confidence_curve_rows(result):
    """Strength, confidence of the predicted class and (with a true class) that class's probability."""
    key = result.strength_name
    return [{key: row[key], "confidence": row["confidence"], "label_probability": row.get("label_probability")}
            for row in result.rows]


def add_confidence_curve(scene, result, title):
    key = result.strength_name
    rows = confidence_curve_rows(result)
    series = [item for item in CONFIDENCE_SERIES
              if item[0] == "confidence" or any(row["label_probability"] is not None for row in rows)]
    table = add_table_node(scene, rows, [key] + [name for name, _ in series], "{} confidence vs {} table".format(
        title, key))
    chart = add_line_chart(scene, table, key, series, "{} confidence vs {}".format(title, key),
                           result.strength_label, "probability")
    return table, chart


def write_classification_files(result, out_dir):
    """``adversarial_<eps>.nii.gz`` (``corrupted_<severity>``) and ``perturbation_<eps>.nii.gz`` per strength,
    ``saliency.nii.gz`` (of the clean image) and ``metrics.csv``. A colour image's are ``.nrrd``: Slicer's NIfTI
    reader drops the one-voxel axis of a vector NIfTI, and with it the slice's position and spacing."""
    out_dir = Path(out_dir)
    prefix = STRENGTH_WORDS[result.strength_name][1]
    suffix = ".nrrd" if result.volume.channels > 1 else ".nii.gz"
    for outcome in result.outcomes:
        strength = epsilon_text(outcome.strength)
        write_volume_file(outcome.probed, result.volume, out_dir / "{}_{}{}".format(prefix, strength, suffix))
        if outcome.strength > 0:
            write_volume_file(outcome.probed - result.volume.array, result.volume,
                              out_dir / "perturbation_{}{}".format(strength, suffix))
    write_volume_file(np.asarray(result.saliency, dtype=np.float32), result.volume, out_dir / "saliency.nii.gz")
    write_metrics_csv(result, out_dir / "metrics.csv")


def add_study_accuracy_nodes(scene, classified, accuracy_curves, columns):
    """A classifier study in the scene: the table of its ``classification.csv`` rows (``columns``) and, per kind
    of strength, a chart of the accuracy against it with one line per network and probe (each line its own
    table: the probes' strengths differ). Returns (table, charts)."""
    from ..networks.models import PALETTE
    table = add_table_node(scene, classified, columns, "bench classification")
    charts = []
    for kind, word in (("attack", "epsilon"), ("corruption", "severity")):
        lines = [(key, curve) for key, curve in accuracy_curves.items() if key[2] == kind]
        if not lines:
            continue
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(
            "bench accuracy vs {}".format(word)))
        for index, ((network, probe, _), (strengths, accuracy)) in enumerate(lines):
            name = "{} {}".format(network, probe)
            rows = [{word: s, "accuracy": a} for s, a in zip(strengths, accuracy)]
            line = add_table_node(scene, rows, [word, "accuracy"], "bench accuracy {} table".format(name))
            _add_series(scene, chart, line, word, name, PALETTE[1 + index % (len(PALETTE) - 1)])
        chart.SetTitle("bench accuracy vs {}".format(word))
        chart.SetXAxisTitle(word)
        chart.SetYAxisTitle("accuracy (share of cases given their class)")
        charts.append(chart)
    return table, charts


def _add_series(scene, chart, table, x_column, name, color):
    """One line series of ``table``'s accuracy against ``x_column`` on ``chart``."""
    plot = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(name))
    plot.SetAndObserveTableNodeID(table.GetID())
    plot.SetXColumnName(x_column)
    plot.SetYColumnName("accuracy")
    plot.SetPlotType(plot.PlotTypeScatter)
    plot.SetMarkerStyle(plot.MarkerStyleCircle)
    plot.SetColor(*color)
    chart.AddAndObservePlotSeriesNodeID(plot.GetID())
