"""The whole job: scene nodes in, result nodes out (Slicer module), or files in, results folder out (CLI)."""
import numpy as np

from .errors import InputError
from .networks.models import describe, load_model
from .scene.nodes import labels_from_node, node_ids, remove_nodes_added_since, volume_from_node
from .report import write_report
from .scene.results import StagedOutput, add_result_nodes, write_result_files
from .evaluation.sweep import run_sweep
from .scene.slicer_scene import SlicerScene


def run_on_nodes(slicer_scene, volume_node, model, probe, strengths, reference_node=None, progress=None,
                 is_cancelled=None):
    """Probe the volume of ``volume_node`` (an attack at epsilons or a corruption at severities) and add the result
    nodes; on failure or cancel no new node is left."""
    volume = volume_from_node(volume_node)
    reference = labels_from_node(reference_node, volume) if reference_node is not None else None
    with model.on_grid(volume):  # the volume's spacing: the model resamples to its own and back
        for line in describe(model, volume).lines():  # detects an undeclared output activation, reports it
            if progress:
                progress(0.0, line)
        result = run_sweep(model, volume, probe, strengths, reference, progress, is_cancelled)
    return result, add_nodes_or_nothing(slicer_scene, result)


def run_on_files(volume_path, model_source, probe, strengths, out_dir, reference_path=None, output_activation=None,
                 progress=None, trust_checkpoint=False, device="cpu", amp=False, region_path=None, region_labels=None,
                 folds=None, mirroring=True, skip_untwinned=False):
    """Read the files, apply the probe (attack or corruption), and write the results folder: all of it, or nothing
    if anything fails.

    ``region_path`` (a label map on the volume's grid, else the reference when only ``region_labels`` is given)
    restricts the probe (an attack, or an intensity corruption) to its voxels holding ``region_labels`` (default:
    every non-zero label). ``folds``, ``mirroring`` (nnU-Net folders) and ``skip_untwinned`` (bundles): see
    :func:`load_model`."""
    strengths = probe.check_strengths(strengths)
    with StagedOutput(out_dir) as staging:
        slicer_scene = SlicerScene.standalone()
        volume = volume_from_node(slicer_scene.load_volume(volume_path))
        reference = None
        if reference_path:
            reference = labels_from_node(slicer_scene.load_volume(reference_path, label_map=True), volume)
        region = None
        if region_path or region_labels:
            region_map = reference if not region_path else labels_from_node(
                slicer_scene.load_volume(region_path, label_map=True), volume)
            region = region_mask(region_map, region_labels)
        model = load_model(model_source, output_activation, trust_checkpoint=trust_checkpoint, device=device, amp=amp,
                           folds=folds, mirroring=mirroring, skip_untwinned=skip_untwinned)
        with model.on_grid(volume):  # the volume's spacing: the model resamples to its own and back
            for line in describe(model, volume).lines():
                if progress:
                    progress(0.0, line)
            result = run_sweep(model, volume, probe, strengths, reference, progress, region=region)
        add_nodes_or_nothing(slicer_scene, result)
        write_result_files(result, staging)
        write_report(result, staging / "report.png")
        slicer_scene.write_mrb(staging / "scene.mrb")
    return result


def region_mask(region_map, region_labels=None):
    """Boolean mask of the voxels of ``region_map`` holding one of ``region_labels`` (default: any non-zero)."""
    if region_map is None:
        raise InputError("--region-labels without --region picks labels of the reference: give --reference")
    mask = region_map != 0 if not region_labels else np.isin(region_map, list(region_labels))
    if not mask.any():
        raise InputError("the region is empty: no voxel holds label {}".format(
            " or ".join(str(v) for v in region_labels) if region_labels else "other than 0"))
    return mask


def add_nodes_or_nothing(slicer_scene, result):
    """Add the result nodes to the scene; if that fails midway, remove the ones already added."""
    before = node_ids(slicer_scene.scene)
    try:
        return add_result_nodes(slicer_scene, result)
    except BaseException:
        remove_nodes_added_since(slicer_scene.scene, before)
        raise
