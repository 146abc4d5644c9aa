"""Fragility in a study, from the predictions its cells already made (no network evaluation here).

Each cell keeps, next to its record, which voxels its prediction changed against its own clean prediction
(``cells/<key>.npz``, bit-packed); the clean prediction and the entropy of the clean outputs of a (network, case),
the same in all its cells, are kept once (``cells/<network>__<case>__clean__<hash>.npz``). The outputs step combines
the cells of each (network, case, probe) into its fragility map (the smallest strength whose cell changed a voxel),
scores it against the case's reference, and combines the probes of a (network, case) into its instability map.
"""
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ..evaluation.fragility import changed_voxels, first_change_map, instability_map, ranking_summary, TOP_FRACTIONS
from ..probes.corruptions import spacing_from_affine

SCORES = ("fragility", "entropy", "boundary")
METRICS = ("auroc",) + tuple("top{:g}".format(100 * fraction) for fraction in TOP_FRACTIONS)
METRIC_COLUMNS = tuple("{}_{}".format(score, metric) for score in SCORES for metric in METRICS)
FRAGILITY_COLUMNS = (("network", "case", "probe", "kind", "strengths", "fragile_voxels", "voxels", "errors",
                      "error_fraction") + METRIC_COLUMNS)
INSTABILITY_COLUMNS = ("network", "case", "probes", "middle_strengths", "foreground_voxels", "instability_mean")


# ------------------------------------------------------------------------------------------ in the cells
def cell_arrays(result):
    """What a one-strength sweep leaves for the fragility: the voxels whose label changed (bit-packed, on the clean
    volume's grid: :func:`~..evaluation.fragility.changed_voxels`), the clean prediction and the entropy of the clean
    outputs."""
    return {"changed": np.packbits(changed_voxels(result, result.outcomes[1])),
            "clean": result.clean.prediction.astype(np.int16),
            "entropy": result.clean_entropy.astype(np.float32)}


def clean_key(task):
    """File stem of the clean prediction of a cell's (network, case)."""
    spec = json.dumps({"network": task["network"], "case": task["case"]}, sort_keys=True)
    text = "{}__{}__clean__{}".format(task["network"]["name"], task["case"]["name"],
                                      hashlib.sha256(spec.encode()).hexdigest()[:12])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def store_cell_arrays(cells_dir, task, arrays):
    """``<key>.npz`` (the changed voxels) and, if not there yet, the clean file of the cell's (network, case)."""
    clean = cells_dir / (clean_key(task) + ".npz")
    if not clean.is_file():
        write_npz_atomic(clean, clean=arrays["clean"], entropy=arrays["entropy"])
    write_npz_atomic(cells_dir / (task["key"] + ".npz"), changed=arrays["changed"])


def has_cell_arrays(cells_dir, task):
    return all((cells_dir / (stem + ".npz")).is_file() for stem in (task["key"], clean_key(task)))


def write_npz_atomic(path, **arrays):
    """``np.savez_compressed`` to a temporary file in the same folder, then renamed."""
    from .outputs import atomic_file
    with atomic_file(path, binary=True) as stream:
        np.savez_compressed(stream, **arrays)


def _load(path):
    with np.load(str(path)) as stored:
        return {name: stored[name] for name in stored.files}


# ------------------------------------------------------------------------------------------ in the outputs
def group_fragility(cells_dir, tasks):
    """The fragility map of the cells of one (network, case, probe) and their (clean, entropy) arrays."""
    clean = _load(cells_dir / (clean_key(tasks[0]) + ".npz"))
    shape, count = clean["clean"].shape, clean["clean"].size
    masks = [np.unpackbits(_load(cells_dir / (task["key"] + ".npz"))["changed"], count=count).reshape(shape)
             .astype(bool) for task in tasks]
    return first_change_map([task["strength"] for task in tasks], masks), clean


def study_fragility(out_dir, resolved, records):
    """Per (network, case, probe): ``fragility/<network>__<case>__<probe>.nii.gz`` and a row of ``fragility.csv``;
    per (network, case): ``instability/<network>__<case>.nii.gz`` and a row of ``instability.csv``. Returns
    (fragility rows, instability rows)."""
    from .cells import _cached_case
    from ..scene.results import write_volume_file
    cells_dir = out_dir / "cells"
    tasks = [record["task"] for record in records]
    rows, unstable = [], []
    for case in resolved["cases"]:  # each case loaded once
        volume, reference = _cached_case(case)
        spacing = spacing_from_affine(volume.affine)
        for network in resolved["networks"]:
            maps, middles, clean = [], [], None
            for probe in resolved["probes"]:
                group = [t for t in tasks if (t["network"]["name"], t["case"]["name"], t["probe"]["name"]) ==
                         (network["name"], case["name"], probe["name"])]
                fragility, clean = group_fragility(cells_dir, group)
                write_volume_file(fragility, volume, _path(out_dir / "fragility", network, case, probe))
                rows.append(fragility_row(network, case, probe, fragility, clean, spacing, reference))
                maps.append(fragility)
                middles.append(probe["strengths"][(len(probe["strengths"]) - 1) // 2])
            instability = instability_map(maps, middles)
            write_volume_file(instability, volume, _path(out_dir / "instability", network, case))
            unstable.append(instability_row(network, case, resolved["probes"], middles, instability,
                                            clean["clean"] != 0))
    return rows, unstable


def fragility_row(network, case, probe, fragility, clean, spacing, reference):
    """One row of ``fragility.csv``; the scores only where the case has a reference."""
    row = {"network": network["name"], "case": case["name"], "probe": probe["name"], "kind": probe["kind"],
           "strengths": " ".join("{:g}".format(s) for s in probe["strengths"]),
           "fragile_voxels": int((fragility > 0).sum())}
    if reference is None:
        return row
    summary = ranking_summary(clean["clean"], clean["entropy"], spacing, fragility, reference)
    row.update(voxels=summary["voxels"], errors=summary["errors"], error_fraction=summary["error_fraction"])
    for score in SCORES:
        entry = summary["scores"][score]
        row[score + "_auroc"] = entry["auroc"]
        for fraction in TOP_FRACTIONS:
            row["{}_top{:g}".format(score, 100 * fraction)] = entry["error_fraction_top_{:g}%".format(100 * fraction)]
    return row


def instability_row(network, case, probes, middles, instability, foreground):
    return {"network": network["name"], "case": case["name"], "probes": " ".join(p["name"] for p in probes),
            "middle_strengths": " ".join("{:g}".format(s) for s in middles),
            "foreground_voxels": int(foreground.sum()),
            "instability_mean": float(instability[foreground].mean()) if foreground.any() else None}


def network_fragility(rows, unstable):
    """Per (network, probe): the mean over the cases with a reference of each score's figures (``fragility_cases``
    of them); per network (``(network, "overall")``): their mean over the probes and the mean instability over the
    cases."""
    from .scores import mean_or_none
    out = {}
    for row in rows:
        out.setdefault((row["network"], row["probe"]), []).append(row)
    summary = {}
    for key, mine in out.items():
        scored = [row for row in mine if row.get("voxels") is not None]
        summary[key] = dict({column: mean_or_none([row.get(column) for row in scored]) for column in METRIC_COLUMNS},
                            fragility_cases=len(scored))
    for network in {row["network"] for row in unstable}:
        probes = [value for (name, _), value in summary.items() if name == network]
        overall = {column: mean_or_none([value[column] for value in probes]) for column in METRIC_COLUMNS}
        overall["fragility_cases"] = max(value["fragility_cases"] for value in probes)
        overall["instability_mean"] = mean_or_none([row["instability_mean"] for row in unstable
                                                    if row["network"] == network])
        summary[(network, "overall")] = overall
    return summary


def output_path(folder, *names):
    """``folder/<name>__<name>....nii.gz`` (names made file-safe)."""
    return Path(folder) / (re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(names)) + ".nii.gz")


def _path(folder, *items):
    folder.mkdir(parents=True, exist_ok=True)
    return output_path(folder, *(item["name"] for item in items))
