"""A sweep's fragility in the scene and in the results folder (see :mod:`..evaluation.fragility`).

Nodes, named after the run's other nodes (``<vol>``, ``<model>``, ``<probe>``):

- ``<vol> fragility <probe>``: a scalar volume, per voxel the strength at which its label first changes (0: never),
  coloured so that the most fragile voxels (the smallest strengths) are the brightest, never-changed voxels
  transparent (thresholded out) when it lies over the input;
- ``<vol> <model> <probe> structures``: the fragile structures table;
- ``<vol> unstable at <= <s> <probe>``: a segmentation holding, per clean label, the voxels whose label changes at
  or below the strength ``s``, to review and edit in the Segment Editor.

Files: ``fragility.nii.gz`` (float32, the input's grid and affine), ``structures.csv`` and, with a reference,
``fragility_summary.json``.
"""
import csv
import io
import json

import numpy as np

from ..evaluation.fragility import (fragility_summary, largest_cluster_centre, middle_strength,
                                    structure_rows, unstable_labels)
from .nodes import add_label_map_node, add_segmentation_node, add_table_node, add_volume_node
from .results import epsilon_text, write_text_checked, write_volume_file

COLOR_ENTRIES = 256


def structure_columns(result):
    strengths = [epsilon_text(outcome.strength) for outcome in result.outcomes[1:]]
    return (["label", "value", "voxels"] + ["changed_" + s for s in strengths] + ["dice_" + s for s in strengths]
            + ["critical_" + result.strength_name])


def write_fragility_files(result, out_dir, fragility=None):
    """``fragility.nii.gz``, ``structures.csv`` and (with a reference) ``fragility_summary.json`` in ``out_dir``;
    returns the summary (None without a reference)."""
    fragility = result.fragility if fragility is None else fragility
    write_volume_file(fragility, result.volume, out_dir / "fragility.nii.gz")
    columns = structure_columns(result)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in structure_rows(result):
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    write_text_checked(out_dir / "structures.csv", text.getvalue())
    if result.reference is None:
        return None
    summary = dict(fragility_summary(result, fragility, result.reference), probe=result.probe_name,
                   model=result.model_name, strengths=[outcome.strength for outcome in result.outcomes[1:]])
    write_text_checked(out_dir / "fragility_summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def fragility_colours(count):
    """``count`` colours (r, g, b), the first (the smallest strength, the most fragile) the brightest."""
    from matplotlib import colormaps
    plasma = colormaps["plasma"]
    return [tuple(plasma(0.95 - 0.8 * index / max(count - 1, 1))[:3]) for index in range(count)]


def add_fragility_nodes(slicer_scene, result, fragility=None, unstable_at=None):
    """The fragility volume (coloured, 0 transparent), the structures table and the "unstable at <= s" segmentation
    (``unstable_at``: a strength, default the sweep's middle one). Returns the nodes by role and ``focus``: the RAS
    centre of the largest unstable cluster (None if no voxel is unstable)."""
    scene, volume = slicer_scene.scene, result.volume
    fragility = result.fragility if fragility is None else fragility
    strengths = [outcome.strength for outcome in result.outcomes[1:]]
    unstable_at = middle_strength(result) if unstable_at is None else float(unstable_at)
    node = add_volume_node(scene, fragility, volume, "{} fragility {}".format(volume.name, result.probe_name))
    colors = add_fragility_colors(scene, strengths, "{} fragility {} colors".format(volume.name, result.probe_name))
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colors.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, display_maximum(strengths))
    display.SetInterpolate(False)  # each voxel its own strength's colour, no blend of neighbouring strengths
    display.SetApplyThreshold(True)  # never-changed voxels (0) are transparent over the input
    display.SetLowerThreshold(strengths[0] / 2.0)
    display.SetUpperThreshold(display_maximum(strengths))
    title = "{} {} {}".format(volume.name, result.model_name, result.probe_name)
    table = add_table_node(scene, structure_rows(result), structure_columns(result), title + " structures")
    unstable = unstable_labels(result, fragility, unstable_at)
    name = "{} unstable at <= {} {}".format(volume.name, epsilon_text(unstable_at), result.probe_name)
    label_map = add_label_map_node(scene, unstable, volume, name + " label map", result.labels)
    segmentation = add_segmentation_node(slicer_scene, label_map, name)
    scene.RemoveNode(label_map.GetDisplayNode().GetColorNode())
    scene.RemoveNode(label_map)
    centre = largest_cluster_centre(unstable != 0)
    focus = None if centre is None else ras_of(volume, centre)
    return {"fragility": node, "fragility_colors": colors, "structures": table, "unstable": segmentation,
            "unstable_at": unstable_at, "focus": focus}


def display_maximum(strengths):
    return strengths[-1] * 1.5


def add_fragility_colors(scene, strengths, name):
    """A colour table spanning 0..:func:`display_maximum`: each entry the colour of the strength band (bounded by
    the midpoints between strengths) its value falls in, as the report's fragility panel colours them."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", scene.GenerateUniqueName(name))
    table.SetTypeToUser()
    table.SetNumberOfColors(COLOR_ENTRIES)
    colours = fragility_colours(len(strengths))
    edges = [(a + b) / 2.0 for a, b in zip(strengths, strengths[1:])]
    top = display_maximum(strengths)
    for entry in range(COLOR_ENTRIES):
        value = (entry + 0.5) / COLOR_ENTRIES * top
        band = int(np.searchsorted(edges, value))
        table.SetColor(entry, "{} {:g}".format("first change at", strengths[band]), *colours[band], 1.0)
    return table


def ras_of(volume, point_xyz):
    """RAS position of a point given in the network-convention voxel coordinates of ``volume``."""
    return tuple(float(v) for v in (volume.affine @ np.append(np.asarray(point_xyz, dtype=np.float64), 1.0))[:3])
