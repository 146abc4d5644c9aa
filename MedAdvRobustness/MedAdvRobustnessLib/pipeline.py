"""The whole job: scene nodes in, result nodes out (Slicer module), or files in, results folder out (CLI)."""
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from .errors import InputError
from .networks.models import BUILTIN_MODELS, DESCRIPTION_FILE, MODELS_DIR, describe, load_model
from .networks.windowed import WindowKeeper
from .scene.nodes import labels_from_node, node_ids, remove_nodes_added_since, volume_from_node
from .report import write_classification_report, write_report
from .scene.results import RUN_FILE, StagedOutput, add_result_nodes, check_png, write_result_files, write_run_file
from .evaluation.sweep import run_sweep
from .scene.classification import add_classification_nodes, write_classification_files
from .scene.fragility import add_fragility_nodes, write_fragility_files
from .scene.slicer_scene import SlicerScene


def run_on_nodes(slicer_scene, volume_node, model, probe, strengths, reference_node=None, progress=None,
                 is_cancelled=None):
    """Probe the volume of ``volume_node`` (an attack at epsilons or a corruption at severities) and add the result
    nodes; on failure or cancel no new node is left."""
    volume = volume_from_node(volume_node)
    reference = labels_from_node(reference_node, volume) if reference_node is not None else None
    use_file_matrix(model, nifti_voxel_to_ras(node_file(volume_node)))  # as medadv run does with the same file
    with model.on_grid(volume):  # the volume's spacing: the model resamples to its own and back
        for line in describe(model, volume).lines():  # detects an undeclared output activation, reports it
            if progress:
                progress(0.0, line)
        result = run_sweep(model, volume, probe, strengths, reference, progress, is_cancelled)
    return result, add_nodes_or_nothing(slicer_scene, result)


def run_on_files(volume_path, model_source, probe, strengths, out_dir, reference_path=None, output_activation=None,
                 progress=None, trust_checkpoint=False, device="cpu", amp=False, region_path=None, region_labels=None,
                 folds=None, mirroring=True, skip_untwinned=False, command=None, unstable_at=None,
                 memory_budget=None, label=None, task=None):
    """Read the files, apply the probe (attack or corruption), and write the results folder: all of it, or nothing
    if anything fails. Its ``run.json`` records how (:func:`run_record`; ``command``: the command line, default
    ``sys.argv``).

    ``region_path`` (a label map on the volume's grid, else the reference when only ``region_labels`` is given)
    restricts the probe (an attack, or an intensity corruption) to its voxels holding ``region_labels`` (default:
    every non-zero label). ``folds``, ``mirroring`` (nnU-Net folders) and ``skip_untwinned`` (bundles): see
    :func:`load_model`. ``unstable_at``: the strength of the scene's "unstable at <= s" segmentation (default
    the middle one). ``memory_budget`` (bytes): a windowed network's kept forward graphs (default: half the
    available memory). ``label``: a classifier's true class (then ``reference_path`` does not apply). ``task``:
    ``segmentation`` or ``classification``, where the model does not say (default: detected from its outputs)."""
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
                slicer_scene.load_volume(region_path, label_map=True), volume, role="region")
            region = region_mask(region_map, region_labels)
        model = load_model(model_source, output_activation, trust_checkpoint=trust_checkpoint, device=device, amp=amp,
                           folds=folds, mirroring=mirroring, skip_untwinned=skip_untwinned)
        if memory_budget is not None:
            model.memory_budget = int(memory_budget)
        if task is not None:
            model.description.task = task
        model.file_ijk_to_ras = nifti_voxel_to_ras(volume_path)  # the frameworks' own matrix and voxel order
        files = {"volume": _file_entry(volume_path), "reference": _file_entry(reference_path),  # once read and valid
                 "region": _file_entry(region_path), "model": model_files_entry(model_source)}
        with model.on_grid(volume):  # the volume's spacing: the model resamples to its own and back
            model_report = describe(model, volume).lines()
            for line in model_report:
                if progress:
                    progress(0.0, line)
            if model.task == "classification":
                reference = _class_reference(reference, label)
            elif label is not None:
                raise InputError("--label gives a classifier's true class; {} is a segmentation network: give its "
                                 "reference segmentation with --reference".format(model.description.name))
            result = run_sweep(model, volume, probe, strengths, reference, progress, region=region)
        if model.gradient_report and progress:
            progress(1.0, WindowKeeper.line(model.gradient_report))
        add_nodes_or_nothing(slicer_scene, result, unstable_at)
        if model.task == "classification":
            write_classification_files(result, staging)
            write_classification_report(result, staging / "report.png")
        else:
            write_result_files(result, staging)
            write_fragility_files(result, staging)
            write_report(result, staging / "report.png")
        check_png(staging / "report.png")
        slicer_scene.write_mrb(staging / "scene.mrb")
        write_run_file(run_record(probe, strengths, files, model, model_source, model_report, command=command,
                                  output_activation=output_activation, trust_checkpoint=trust_checkpoint,
                                  mirroring=mirroring, skip_untwinned=skip_untwinned, region_labels=region_labels,
                                  label=label), staging / RUN_FILE)
    return result


def run_record(probe, strengths, files, model, model_source, model_report, command=None, output_activation=None,
               trust_checkpoint=False, mirroring=True, skip_untwinned=False, region_labels=None, label=None):
    """What ``run.json`` holds: the command line, the probe with every parameter (defaults included), its strengths
    and seed, the input files (``files``: volume, reference, region and model entries) with their SHA-256, a
    classifier's true class (``label``), the model (source, task, settings as run, files and bench's hash of them,
    what :func:`describe` reported) and the versions. The region is the region file's labels, else the
    reference's (``"map": "reference"``)."""
    settings = probe.settings()
    kind = "attack" if probe.strength_name == "epsilon" else "corruption"
    region = None
    if files["region"] or region_labels:
        region = dict(files["region"] or {"map": "reference"}, labels=list(region_labels) if region_labels else None)
    return {
        "command": list(sys.argv if command is None else command),
        "probe": {"name": probe.name, "kind": kind, "parameters": settings},
        "strengths": {"name": probe.strength_name, "values": list(strengths)},
        "seeds": {"probe": settings.get("seed")},
        "volume": files["volume"],
        "reference": files["reference"],
        "region": region,
        "label": label,
        "model": dict({"source": str(model_source) if isinstance(model_source, (str, os.PathLike)) else "in memory",
                       "name": model.description.name, "task": model.task, "loaded_as": model.source,
                       "output_activation": output_activation, "activation": str(model.activation),
                       "device": str(model.device), "amp": bool(model.amp), "trust_checkpoint": bool(trust_checkpoint),
                       "folds": getattr(model, "fold_names", None),  # the nnU-Net folds ensembled
                       "mirroring": bool(mirroring), "skip_untwinned": bool(skip_untwinned),
                       "memory_budget": model.memory_budget,  # bytes as set; None: half the available memory
                       "windowed_gradient": model.gradient_report},  # the last gradient's mode, None if unwindowed
                      **files["model"]),
        "model_report": list(model_report),
        "versions": versions(),
    }


def file_sha256(path):
    """The SHA-256 of a file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(str(path), "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_entry(path):
    if not path:
        return None
    path = Path(path).absolute()
    return {"path": str(path), "sha256": file_sha256(path)}


def model_files_entry(source):
    """``files`` (every file that determines the network, as bench finds them: a folder's files, a model.json and
    the weights it names, or the file) with their SHA-256, and ``hash``: bench's hash of them (study.json's)."""
    from .study.cases import hash_files
    from .study.definition import _model_files
    if not isinstance(source, (str, os.PathLike)):
        return {"files": [], "hash": None}  # a network in memory
    path = MODELS_DIR / BUILTIN_MODELS[str(source)] / DESCRIPTION_FILE if str(source) in BUILTIN_MODELS else \
        Path(source)
    files = _model_files(path)
    return {"files": [{"path": str(Path(file).absolute()), "sha256": file_sha256(file)} for file in files],
            "hash": hash_files(files)}


def versions():
    """Versions of what computed the results: bench's (study.json's) and slicer-core."""
    from importlib.metadata import PackageNotFoundError, version
    from .study.outputs import versions as study_versions
    try:
        slicer_core = version("slicer-core")
    except PackageNotFoundError:  # in 3D Slicer itself: no slicer-core wheel
        slicer_core = "unknown"
    return dict(study_versions(), **{"slicer-core": slicer_core})


def node_file(volume_node):
    """The file a volume node was read from (its storage node's), or None."""
    storage = volume_node.GetStorageNode() if hasattr(volume_node, "GetStorageNode") else None
    return storage.GetFileName() if storage is not None else None


def nifti_voxel_to_ras(path):
    """The voxel-to-RAS matrix of a NIfTI file as nibabel (and so nnU-Net, and MONAI) reads it; None for another
    format, no file, or a file no longer there. A model uses it only where the volume's grid is this file's (see
    :func:`~.networks.steps.file_exact_affine`)."""
    if not path or not os.path.isfile(str(path)) or not str(path).lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel
    return np.asarray(nibabel.load(str(path)).affine, dtype=np.float64)


def use_file_matrix(model, matrix):
    """Give ``model`` the volume file's matrix (:func:`nifti_voxel_to_ras`; None: none) in the module and bench,
    except an nnU-Net model: there it predicts the volume as Slicer loaded it, as SlicerNNUNet does (it writes the
    loaded node to a file and predicts that)."""
    from .networks.nnunet import NNUNetModel
    model.file_ijk_to_ras = None if isinstance(model, NNUNetModel) else matrix


def region_mask(region_map, region_labels=None):
    """Boolean mask of the voxels of ``region_map`` holding one of ``region_labels`` (default: any non-zero)."""
    if region_map is None:
        raise InputError("--region-labels without --region picks labels of the reference segmentation: give "
                         "--reference (a segmentation network), or --region with a label map (any network)")
    mask = region_map != 0 if not region_labels else np.isin(region_map, list(region_labels))
    if not mask.any():
        raise InputError("the region is empty: no voxel holds label {}".format(
            " or ".join(str(v) for v in region_labels) if region_labels else "other than 0"))
    return mask


def _class_reference(reference, label):
    """A classifier's reference: the true class ``label`` (or None); a reference segmentation is refused."""
    if reference is not None:
        raise InputError("the network is a classifier: it takes the true class (--label K), not a reference "
                         "segmentation")
    return None if label is None else int(label)


def add_all_result_nodes(slicer_scene, result, unstable_at=None):
    """The result nodes and the fragility nodes ("unstable at <= ``unstable_at``", default the middle strength);
    a classifier's result nodes (:func:`~.scene.classification.add_classification_nodes`)."""
    if getattr(result, "task", "segmentation") == "classification":
        return add_classification_nodes(slicer_scene, result)
    nodes = add_result_nodes(slicer_scene, result)
    nodes.update(add_fragility_nodes(slicer_scene, result, unstable_at=unstable_at))
    return nodes


def add_nodes_or_nothing(slicer_scene, result, unstable_at=None):
    """Add the result nodes to the scene (the fragility ones too); if that fails midway, remove the ones already
    added."""
    before = node_ids(slicer_scene.scene)
    try:
        return add_all_result_nodes(slicer_scene, result, unstable_at)
    except BaseException:
        remove_nodes_added_since(slicer_scene.scene, before)
        raise
