"""A study's outputs: results.csv, summary.csv (classifiers: classification.csv), the figures, report.html, and the
summary as MRML table and chart nodes."""
import base64
import csv
import io
import json
import math
import os
import platform
import re
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..networks.models import PALETTE
from .cases import HELDOUT_RECIPE, HELDOUT_SEED, is_class_case
from .scores import (CLASSIFICATION_COLUMNS, TABLE_KEYS, accuracy_curves, classification_summary_rows, curves,
                     mean_or_none, summary_rows, table_rows, unique)


SUMMARY_COLUMNS = ("network", "probe", "kind", "dice_against", "cases", "cases_without_reference", "clean_dice",
                   "clean_dice_sd", "strengths", "dice", "robustness_score", "robustness_score_sd",
                   "rood_degradation", "rood_degradation_sd", "rood_overall")


SUMMARY_FRAGILITY_COLUMNS = ("fragility_cases", "fragility_auroc", "entropy_auroc", "boundary_auroc", "fragility_top1",
                             "entropy_top1", "boundary_top1", "fragility_top5", "entropy_top5", "boundary_top5",
                             "instability_mean")


def versions():
    """Versions of what computes the cells."""
    import monai
    try:
        from importlib.metadata import version
        package = version("medadvrobustness")
    except Exception:
        package = "unknown"
    return {"medadvrobustness": package, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def write_outputs(out_dir, resolved, records):
    """``results.csv``, ``study.json`` (provenance), ``figures/`` and ``report.html``; for segmentation networks
    ``summary.csv`` and the fragility (``fragility.csv``, ``instability.csv``, ``fragility/``, ``instability/``,
    see :mod:`.fragility`), for classifiers ``classification.csv`` (:func:`~.scores.classification_summary_rows`)
    in their place. Returns the fragility per (network, probe) and instability per network (none for
    classifiers)."""
    out_dir = Path(out_dir)
    rows = table_rows(records)
    _write_csv(out_dir / "results.csv", rows, _columns(rows))
    heldout = {"recipe": [list(step) for step in HELDOUT_RECIPE],
               "seeds": "{} + 10 x case index + step (0, 1, 2)".format(HELDOUT_SEED)}
    provenance = {"study": resolved, "versions": versions(), "cells": len(records), "heldout_cases": heldout,
                  "cell_versions": unique(json.dumps(r["versions"], sort_keys=True) for r in records),
                  "seconds_computing": round(sum(r["seconds"] for r in records), 1)}
    write_json_atomic(out_dir / "study.json", provenance)
    if all(is_class_case(case) for case in resolved["cases"]):
        _write_classifier_outputs(out_dir, resolved, rows, provenance)
        return {}
    return _write_segmentation_outputs(out_dir, resolved, records, rows, provenance)


def _write_segmentation_outputs(out_dir, resolved, records, rows, provenance):
    """``summary.csv``, the fragility files, the Dice figures and the report of a study of segmentation
    networks."""
    from .fragility import FRAGILITY_COLUMNS, INSTABILITY_COLUMNS, network_fragility, study_fragility
    fragile, unstable = study_fragility(out_dir, resolved, records)
    by_network = network_fragility(fragile, unstable)
    summary = [dict(row, **by_network.get((row["network"], row["probe"]), {})) for row in summary_rows(rows)]
    _write_csv(out_dir / "summary.csv", summary, SUMMARY_COLUMNS + SUMMARY_FRAGILITY_COLUMNS)
    _write_csv(out_dir / "fragility.csv", fragile, FRAGILITY_COLUMNS)
    _write_csv(out_dir / "instability.csv", unstable, INSTABILITY_COLUMNS)
    figures = write_figures(out_dir / "figures", rows, summary)
    shown = [path for path in figures if path.name != "overview.png"]  # the same panels, side by side
    files = ["results.csv", "summary.csv", "fragility.csv", "fragility/", "instability.csv", "instability/",
             "study.json", "cells/"] + ["figures/" + path.name for path in figures]
    write_html(out_dir / "report.html", resolved, summary, shown, provenance, files=files)
    return by_network


def _write_classifier_outputs(out_dir, resolved, rows, provenance):
    """``classification.csv``, the accuracy figures and the report of a study of classifiers (no Dice summary,
    no fragility: a classifier has no segmentation)."""
    classified = classification_summary_rows(rows)
    _write_csv(out_dir / "classification.csv", classified, CLASSIFICATION_COLUMNS)
    figures = write_accuracy_figures(out_dir / "figures", rows)
    files = ["results.csv", "classification.csv", "study.json", "cells/"] + ["figures/" + p.name for p in figures]
    write_html(out_dir / "report.html", resolved, [], figures, provenance, classified, files)


def _columns(rows):
    columns = list(TABLE_KEYS) + ["dice", "against"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def _write_csv(path, rows, columns):
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell_text(row.get(key)) for key in columns})
    write_atomic(path, stream.getvalue())


def _cell_text(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "{:.6g}".format(value) if math.isfinite(value) else str(value)
    return value


def write_figures(folder, rows, summary):
    """One Dice-vs-strength plot per probe (all networks, mean over cases, range shaded), the scatter of clean
    Dice against robustness score, and ``overview.png`` with all of them side by side; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grouped = curves(rows)
    probes = unique(key[1] for key in grouped)
    overall = [row for row in summary if row["probe"] == "overall" and row["robustness_score"] is not None
               and row["dice_against"] == "reference"]  # clean Dice against the clean prediction is always 1
    paths = []
    for probe in probes:
        figure, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
        _plot_probe(ax, grouped, probe)
        paths.append(_save(figure, folder / "dice_vs_{}.png".format(re.sub(r"[^A-Za-z0-9_-]+", "_", probe))))
        plt.close(figure)
    if overall:
        figure, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
        _plot_scatter(ax, overall)
        paths.append(_save(figure, folder / "clean_vs_robustness.png"))
        plt.close(figure)
    panels = len(probes) + (1 if overall else 0)
    if not panels:
        return paths
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.0), constrained_layout=True, squeeze=False)
    for ax, probe in zip(axes[0], probes):
        _plot_probe(ax, grouped, probe)
    if overall:
        _plot_scatter(axes[0][-1], overall)
    paths.append(_save(figure, folder / "overview.png"))
    plt.close(figure)
    return paths


STRENGTH_AXES = {"attack": ("epsilon", "epsilon (fraction of intensity range)"),
                 "corruption": ("severity", "severity (0: clean)")}


def write_accuracy_figures(folder, rows):
    """A classifier study's figures: ``accuracy_vs_epsilon.png`` (attacks) and ``accuracy_vs_severity.png``
    (corruptions, if any), one line per network and probe: the share of cases given their class against the
    strength. Returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grouped, paths = accuracy_curves(rows), []
    for kind, (word, label) in STRENGTH_AXES.items():
        lines = {key: curve for key, curve in grouped.items() if key[2] == kind}
        if not lines:
            continue
        figure, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
        for (network, probe, _), (strengths, accuracy) in lines.items():
            ax.plot(strengths, accuracy, marker="o", label="{} · {}".format(network, probe))
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (share of cases given their class)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("accuracy vs {}: one line per network and probe".format(word), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(figure, folder / "accuracy_vs_{}.png".format(word)))
        plt.close(figure)
    return paths


def _plot_probe(ax, grouped, probe):
    kind = None
    for (network, name, kind_of), by_case in grouped.items():
        if name != probe:
            continue
        kind = kind_of
        strengths = sorted({s for values in by_case.values() for s in values})
        table = np.array([[values.get(s, np.nan) for s in strengths] for values in by_case.values()])
        line, = ax.plot(strengths, np.nanmean(table, axis=0), marker="o", label=network)
        if len(table) > 1:
            ax.fill_between(strengths, np.nanmin(table, axis=0), np.nanmax(table, axis=0), alpha=0.15,
                            color=line.get_color())
    ax.set_xlabel("epsilon (fraction of intensity range)" if kind == "attack" else "severity (0: clean)")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.set_title("{}: mean over cases, range shaded".format(probe), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_scatter(ax, overall):
    for row in overall:
        ax.scatter(row["clean_dice"], row["robustness_score"], s=50)
        ax.annotate(row["network"], (row["clean_dice"], row["robustness_score"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=9)
    ax.set_xlabel("clean Dice (mean over cases)")
    ax.set_ylabel("robustness score (normalised AUC, attacks)")
    ax.set_title("generalizability vs robustness", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.25)


def _save(figure, path):
    figure.savefig(str(path), dpi=90)
    return path


STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #bbb;"
         "padding:3px 8px;font-size:13px}figure{display:inline-block;margin:1em}img{max-width:560px}")


def write_html(path, resolved, summary, figures, provenance, classified=(), files=()):
    """A single offline HTML file: the summary table and the fragility table (segmentation networks) or the
    classifiers' table, the figures embedded, the study's files, the study and its provenance."""
    import html
    images = "".join('<figure><img alt="{0}" src="data:image/png;base64,{1}"><figcaption>{0}</figcaption></figure>'
                     .format(html.escape(p.name), base64.b64encode(p.read_bytes()).decode()) for p in figures)
    body = _classifier_section(classified, images) if classified else _segmentation_section(summary, images)
    text = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>medadv bench</title><style>{}</style></head>"
            "<body>{}{}<h2>Study and provenance</h2><pre>{}</pre></body></html>").format(
        STYLE, body, _files_section(files), html.escape(json.dumps(provenance, indent=1, default=str)))
    write_atomic(path, text)


def _segmentation_section(summary, images):
    """The report of segmentation networks: the Dice summary, the figures and the fragility table."""
    table = _html_table(summary, SUMMARY_COLUMNS)
    fragility = _html_table(summary, ("network", "probe") + SUMMARY_FRAGILITY_COLUMNS)
    return ("<h1>Networks compared: clean Dice and robustness</h1>"
            "<p>Robustness score: area under the Dice-vs-epsilon curve relative to the clean Dice, normalised to "
            "[0, 1]. ROOD degradation: clean Dice minus the severity-weighted mean Dice (alpha 2/3). Dice is against "
            "the reference label map; cases without one (cases_without_reference) are left out of the averages, "
            "unless no case has one: then Dice is against the clean prediction (dice_against), and the clean Dice "
            "(1) is left out of the scatter.</p>"
            "{}{}<h2>Does fragility find the errors?</h2><p>Per network and probe, the mean over the cases with "
            "a reference (fragility_cases) of how well three per-voxel scores rank the voxels where the clean "
            "prediction is wrong: AUROC, and the error fraction among the top 1 % and 5 % of each score. Fragility: "
            "1 / the smallest strength that changes the voxel's label (never: 0); entropy of the clean outputs; "
            "closeness to a label boundary. instability_mean (overall rows): the mean over the cases' clean "
            "foreground of the fraction of probes under which a voxel changes at or below the probe's middle "
            "strength. Per case: fragility.csv, instability.csv.</p>{}").format(table, images, fragility)


def _classifier_section(classified, images):
    """The report of classifiers: their table and the accuracy figures."""
    return ("<h1>Classifiers: accuracy and robustness</h1><p>Accuracy: the share of cases given their true "
            "class, clean and at each strength. Robustness score: as for Dice, the area under the accuracy-vs-epsilon "
            "curve relative to the clean accuracy, normalised to [0, 1]. Minimal perturbation (DeepFool, JSMA): the "
            "median over the cases, at the probe's largest epsilon, of the smallest perturbation that changed the "
            "class (L2 and L-inf, fractions of the intensity range); a case with no change within the budget counts "
            "as larger than all (minimal_found of minimal_cases changed).</p>{}{}").format(
        _html_table(classified, CLASSIFICATION_COLUMNS), images)


def _files_section(files):
    """The list of the files the study wrote (empty without any)."""
    import html
    if not files:
        return ""
    return "<h2>Files</h2><ul>{}</ul>".format("".join("<li>{}</li>".format(html.escape(name)) for name in files))


def _html_table(rows, columns):
    import html
    header = "".join("<th>{}</th>".format(html.escape(c)) for c in columns)
    body = "".join("<tr>{}</tr>".format("".join("<td>{}</td>".format(html.escape(str(_cell_text(row.get(c)))))
                                                for c in columns)) for row in rows)
    return "<table><tr>{}</tr>{}</table>".format(header, body)


def add_study_nodes(scene, records):
    """The study in an MRML scene (the Slicer module's view of it): the summary table, and per probe a table of
    the mean Dice of every network against the strength with its chart; for classifiers the table of
    ``classification.csv`` and the accuracy chart (:func:`~..scene.classification.add_study_accuracy_nodes`).
    Returns (summary table, charts)."""
    from ..scene.nodes import add_line_chart, add_table_node
    rows = table_rows(records)
    classified = classification_summary_rows(rows)
    if classified:  # a study of classifiers: its classification.csv and accuracy curves
        from ..scene.classification import add_study_accuracy_nodes
        return add_study_accuracy_nodes(scene, classified, accuracy_curves(rows), CLASSIFICATION_COLUMNS)
    summary = add_table_node(scene, summary_rows(rows), SUMMARY_COLUMNS, "bench summary")
    grouped = curves(rows)
    charts = []
    for probe in unique(key[1] for key in grouped):
        means, kind = {}, None
        for (network, name, kind_of), by_case in grouped.items():
            if name == probe:
                kind = kind_of
                for strength in sorted({s for values in by_case.values() for s in values}):
                    means.setdefault(strength, {"strength": strength})[network] = mean_or_none(
                        [values.get(strength) for values in by_case.values()])
        networks = unique(key[0] for key in grouped if key[1] == probe)
        table = add_table_node(scene, [means[s] for s in sorted(means)], ["strength"] + networks,
                               "bench {} Dice table".format(probe))
        series = [(network, PALETTE[1 + index % (len(PALETTE) - 1)]) for index, network in enumerate(networks)]
        charts.append(add_line_chart(scene, table, "strength", series, "bench {} Dice".format(probe),
                                     "epsilon" if kind == "attack" else "severity", "mean foreground Dice"))
    return summary, charts


def write_json_atomic(path, data):
    write_atomic(path, json.dumps(data, indent=1, default=_json_default))


def write_atomic(path, text):
    """Write text to ``path`` as :func:`atomic_file` does."""
    with atomic_file(path) as stream:
        stream.write(text)


@contextmanager
def atomic_file(path, binary=False):
    """A stream to a temporary file in the same folder, renamed to ``path`` once written and flushed to the disk:
    a reader sees the whole file or none. The file is created as open() creates one (permissions from the umask);
    a failed write leaves nothing behind."""
    temporary = path.with_name(".{}.{}.tmp".format(path.name, uuid.uuid4().hex[:12]))
    try:
        with open(str(temporary), "xb") if binary else open(str(temporary), "x", encoding="utf-8",
                                                            newline="") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(str(temporary), str(path))
    except BaseException:
        if temporary.exists():
            temporary.unlink()
        raise


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(type(value).__name__)
