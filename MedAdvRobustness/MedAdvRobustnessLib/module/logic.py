"""What the Slicer module computes, without Slicer's GUI: parameter node in, result nodes (in one folder) out.

The widget stores its settings in a ``vtkMRMLScriptedModuleNode`` through Slicer's ``parameterNodeWrapper``;
:func:`read_settings` reads the same parameters, stored the same way (text, ``True``/``False``, node references
under the parameter's name). :class:`ProbeRun` then reads the input nodes on the calling (main) thread, computes
in a child process (progress and cancel are polled; see :mod:`.worker`), and adds every result node only when
:meth:`ProbeRun.finish` is called on the main thread: all of them in a new subject-hierarchy folder, or none.
"""
import functools
import json
import math
import logging
import re
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
import vtk
import slicer

from ..probes.attacks import AttackCancelled
from ..probes.registry import is_corruption, make_probe
from ..errors import InputError
from ..scene.nodes import labels_from_node, node_ids, remove_nodes_added_since, volume_from_node
from .worker import ProcessRun

MODULE_NAME = "MedAdvRobustness"
NETWORK_KINDS = ("builtin", "torchscript", "bundle", "description", "nnunet")
OUTPUT_ACTIVATIONS = ("auto", "logits", "softmax", "sigmoid")


@dataclass
class ProbeSettings:
    """The module's settings; the field names are the parameter names of the widget's parameter node."""
    inputVolume: object = None
    referenceNode: object = None  # label map volume or segmentation
    referenceSegmentIds: str = ""  # segments of a segmentation reference (comma-separated ids; empty: all)
    trueClass: str = ""  # a classifier's true class (an index, as medadv run --label); empty: none
    networkKind: str = "builtin"
    builtinNetwork: str = "demo"
    networkPath: str = ""
    outputActivation: str = "auto"
    trustCheckpoint: bool = False
    networkFolds: str = ""  # nnU-Net: the folds to ensemble ("0 1"); empty: every fold with a checkpoint
    testTimeMirroring: bool = True  # nnU-Net's test-time mirroring (its default: on)
    skipUntwinned: bool = False  # a bundle's transforms without a twin left out (reported) instead of refused
    probe: str = "pgd"
    probeParameters: str = "{}"  # JSON: {probe: {parameter: value text}}; missing: the library default
    epsilons: str = "0.005 0.01 0.02"
    severities: str = "1 3 5"
    unstableAt: str = ""  # the "unstable at <= s" segmentation's strength; empty: the sweep's middle one
    regionSegmentation: object = None
    regionSegmentId: str = ""
    device: str = "cpu"
    compareVolumes: list = field(default_factory=list)  # the volumes of "compare networks"
    compareNetworks: str = "demo-unet-short, demo-segresnet, demo-slicewise2d"  # built-in names or model paths
    compareFolder: str = ""  # study folder (kept: run again to resume); empty: a new temporary folder
    compareProbes: str = ""  # further probes compared besides the selected one (comma or new line separated)
    compareSeeds: str = ""  # seeds each compared probe runs with ("0 1 2"); empty: the probe's own seed


NODE_PARAMETERS = ("inputVolume", "referenceNode", "regionSegmentation")
NODE_LIST_PARAMETERS = ("compareVolumes",)  # several references under one role (kept by the widget itself)


def default_settings():
    return ProbeSettings()


def parameter_node(scene, create=True):
    """The module's singleton parameter node in ``scene`` (as ScriptedLoadableModuleLogic makes it)."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None and create:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(MODULE_NAME)
        node.SetModuleName(MODULE_NAME)
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node = scene.AddNode(node)
    return node


def write_settings(node, settings):
    """Store ``settings`` the way ``parameterNodeWrapper`` does."""
    was_modifying = node.StartModify()
    for item in fields(ProbeSettings):
        value = getattr(settings, item.name)
        if item.name in NODE_PARAMETERS:
            node.SetParameter(item.name, "")
            node.SetNodeReferenceID(item.name, value.GetID() if value is not None else None)
        elif item.name in NODE_LIST_PARAMETERS:
            node.RemoveNodeReferenceIDs(item.name)
            for referenced in value:
                node.AddNodeReferenceID(item.name, referenced.GetID())
        elif isinstance(value, bool):
            node.SetParameter(item.name, "True" if value else "False")
        else:
            node.SetParameter(item.name, str(value))
    node.EndModify(was_modifying)


def read_settings(node):
    """The settings stored in a parameter node; defaults where a parameter is not set."""
    settings = ProbeSettings()
    for item in fields(ProbeSettings):
        if item.name in NODE_PARAMETERS:
            setattr(settings, item.name, node.GetNodeReference(item.name))
        elif item.name in NODE_LIST_PARAMETERS:
            setattr(settings, item.name, [node.GetNthNodeReference(item.name, index)
                                          for index in range(node.GetNumberOfNodeReferences(item.name))])
        elif node.HasParameter(item.name):
            text = node.GetParameter(item.name)
            setattr(settings, item.name, text == "True" if isinstance(item.default, bool) else text)
    return settings


def parse_strengths(text, what="epsilons"):
    """Numbers separated by spaces or commas, or a sweep ``start:stop:count`` (count values, ends included)."""
    text = str(text).strip()
    sweep = re.fullmatch(r"([^:\s]+)\s*:\s*([^:\s]+)\s*:\s*(\d+)", text)
    try:
        if sweep:
            start, stop, count = float(sweep.group(1)), float(sweep.group(2)), int(sweep.group(3))
            if count < 1:
                raise ValueError(text)
            return [float(v) for v in np.linspace(start, stop, count)]
        values = [float(item) for item in re.split(r"[\s,;]+", text) if item]
    except ValueError:
        raise InputError("{} must be numbers separated by spaces or commas, or start:stop:count; got \"{}\"".format(
            what, text))
    if not values:
        raise InputError("give at least one value for the {}".format(what))
    return values


def stored_probe_parameters(settings, name=None):
    """The parameter values stored for the probe ``name`` (default: the selected one; text, as the form holds
    them)."""
    try:
        stored = json.loads(settings.probeParameters or "{}")
    except ValueError:
        raise InputError("the probe parameters are not valid JSON: {}".format(settings.probeParameters))
    values = stored.get(name or settings.probe, {}) if isinstance(stored, dict) else {}
    return {key: value for key, value in values.items() if str(value).strip() != ""}


def probe_from_settings(settings, name=None):
    """The attack or corruption probe ``name`` (default: the selected one) with its stored parameters, and its
    strengths (the epsilons or the severities)."""
    name = name or settings.probe
    probe = make_probe(name, **stored_probe_parameters(settings, name))
    text, what = ((settings.severities, "severities") if is_corruption(name) else
                  (settings.epsilons, "epsilons"))
    return probe, probe.check_strengths(parse_strengths(text, what))


def network_source(settings):
    """What ``load_model`` takes for the network settings."""
    if settings.networkKind not in NETWORK_KINDS:
        raise InputError("unknown network kind {!r}; expected one of {}".format(settings.networkKind,
                                                                              ", ".join(NETWORK_KINDS)))
    if settings.networkKind == "builtin":
        return settings.builtinNetwork.strip() or "demo"
    path = settings.networkPath.strip()
    if not path:
        raise InputError("select the {} file or folder of the network".format(settings.networkKind))
    return path


def output_activation(settings):
    if settings.outputActivation not in OUTPUT_ACTIVATIONS:
        raise InputError("output activation must be one of {}".format(", ".join(OUTPUT_ACTIVATIONS)))
    return None if settings.outputActivation == "auto" else settings.outputActivation


@dataclass
class RunInputs:
    """Everything the worker needs, read from the scene on the main thread (arrays, no node)."""
    volume: object
    reference: Optional[np.ndarray]
    reference_segments: Optional[list]  # [(segment name, mask)] of a segmentation reference
    region: Optional[np.ndarray]
    probe: object
    strengths: list
    true_class: Optional[int]
    source: str
    activation: Optional[str]
    trust_checkpoint: bool
    device: str
    file_ijk_to_ras: Optional[np.ndarray] = None  # the volume file's matrix as nibabel reads it (NIfTI), if any
    load_options: dict = field(default_factory=dict)  # load_model's folds, mirroring and skip_untwinned


def read_inputs(slicer_scene, settings):
    """Check the settings and copy the inputs out of the scene (InputError on bad input; nothing changes)."""
    if settings.inputVolume is None:
        raise InputError("select an input volume")
    volume = volume_from_node(settings.inputVolume)
    probe, strengths = probe_from_settings(settings)
    reference, segments = None, None
    if settings.referenceNode is not None:
        if settings.referenceNode.IsA("vtkMRMLSegmentationNode"):
            ids = [s for s in settings.referenceSegmentIds.split(",") if s.strip()]
            segments = segment_masks(slicer_scene, settings.referenceNode, ids, settings.inputVolume, volume)
        else:
            reference = labels_from_node(settings.referenceNode, volume)
    region = None
    if settings.regionSegmentation is not None:
        if not settings.regionSegmentId:
            raise InputError("select the segment of {} that bounds the perturbation".format(
                settings.regionSegmentation.GetName()))
        region = segment_masks(slicer_scene, settings.regionSegmentation, [settings.regionSegmentId],
                               settings.inputVolume, volume)[0][1]
        if not region.any():
            raise InputError("region segment {} is empty on the volume's grid".format(settings.regionSegmentId))
        if probe.moves_anatomy:
            raise InputError("corruption {} moves the anatomy and cannot be restricted to a region; clear the "
                             "region".format(probe.name))
    return RunInputs(volume, reference, segments, region, probe, strengths, true_class(settings),
                     network_source(settings), output_activation(settings), bool(settings.trustCheckpoint),
                     settings.device.strip() or "cpu", volume_file_matrix(settings.inputVolume),
                     load_options(settings))


def load_options(settings):
    """``load_model``'s options of the network kind, as ``--folds``, ``--no-mirroring`` and ``--skip-untwinned``
    give them: an nnU-Net folder's folds (names separated by spaces or commas; empty: every fold) and mirroring, a
    bundle's skip_untwinned (the widget shows each for its kind only)."""
    if settings.networkKind == "nnunet":
        folds = settings.networkFolds.replace(",", " ").split()
        return {"folds": folds or None, "mirroring": bool(settings.testTimeMirroring)}
    if settings.networkKind == "bundle":
        return {"skip_untwinned": bool(settings.skipUntwinned)}
    return {}


def volume_file_matrix(volume_node):
    """The matrix of the file the node was read from, as ``medadv run`` and the frameworks read it (or None)."""
    from ..pipeline import nifti_voxel_to_ras, node_file
    return nifti_voxel_to_ras(node_file(volume_node))


def true_class(settings):
    """The classifier's true class index from its text (None when empty); checked against the classes once the
    network is loaded (:func:`class_reference`)."""
    text = settings.trueClass.strip()
    if not text:
        return None
    if not re.fullmatch(r"\+?\d+", text):
        raise InputError("true class: expected a class index (0, 1, 2...), got {!r}".format(text))
    return int(text)


def segment_masks(slicer_scene, segmentation_node, segment_ids, volume_node, volume):
    """[(name, boolean mask on the volume's grid)] of the given segments (all if none given)."""
    segmentation = segmentation_node.GetSegmentation()
    ids = segment_ids or [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise InputError("segmentation {} has no segment".format(segmentation_node.GetName()))
    masks = []
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise InputError("segmentation {} has no segment {}".format(segmentation_node.GetName(), segment_id))
        masks.append((segment.GetName(), _segment_on_grid(slicer_scene, segmentation_node, segment_id,
                                                          volume_node, volume) > 0))
    return masks


def _segment_on_grid(slicer_scene, segmentation_node, segment_id, volume_node, volume):
    """The segment exported to a scratch label map on the volume's grid; every scratch node (label map, display,
    colour table) is removed again."""
    scene = slicer_scene.scene
    before = node_ids(scene)
    try:
        label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("medadv scratch"))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer_scene.segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, label_map,
                                                                             volume_node):
            raise InputError("cannot map segment {} onto the grid of {}".format(segment_id, volume_node.GetName()))
        return labels_from_node(label_map, volume)
    finally:
        remove_nodes_added_since(scene, before)


def reference_from_segments(segments, labels, shape):
    """Label array from [(segment name, mask)], each segment matched by name (case-insensitive) to a label."""
    values = {label.name.lower(): label.value for label in labels}
    reference = np.zeros(shape, dtype=np.int64)
    for name, mask in segments:
        if name.lower() not in values:
            raise InputError("reference segment \"{}\" is none of the network's labels ({}); rename it".format(
                name, ", ".join(label.name for label in labels[1:])))
        reference[mask] = values[name.lower()]
    return reference


def compute(inputs, progress=None, is_cancelled=None):
    """Load the network and run the sweep (no scene access: runs in the worker process)."""
    from ..networks.models import describe, load_model
    from ..evaluation.sweep import run_sweep
    from ..pipeline import use_file_matrix

    model = load_model(inputs.source, inputs.activation, trust_checkpoint=inputs.trust_checkpoint,
                       device=inputs.device, **inputs.load_options)
    use_file_matrix(model, inputs.file_ijk_to_ras)
    with model.on_grid(inputs.volume):
        report = describe(model, inputs.volume)
        for line in report.lines():
            logging.info("MedAdvRobustness: %s", line)
        if model.task == "classification":
            reference = class_reference(inputs, report)
        else:
            reference = segmentation_reference(inputs, report)
        return run_sweep(model, inputs.volume, inputs.probe, inputs.strengths, reference, progress, is_cancelled,
                         region=inputs.region)


def class_reference(inputs, report):
    """A classifier's reference: the true class, within its classes (or None); a reference segmentation is
    refused."""
    if inputs.reference is not None or inputs.reference_segments is not None:
        raise InputError("{} is a classifier: it takes the true class (a class index), not a reference "
                         "segmentation; clear the reference".format(report.name))
    if inputs.true_class is not None and inputs.true_class >= len(report.labels):
        raise InputError("true class {} is beyond the classes of {}: 0..{} ({})".format(
            inputs.true_class, report.name, len(report.labels) - 1,
            ", ".join("{} {}".format(label.value, label.name) for label in report.labels)))
    return inputs.true_class


def segmentation_reference(inputs, report):
    """A segmentation network's reference label array (or None); a true class is refused."""
    if inputs.true_class is not None:
        raise InputError("the true class is for classifiers; {} is a segmentation network: give its reference "
                         "segmentation instead and clear the true class".format(report.name))
    if inputs.reference_segments is not None:
        return reference_from_segments(inputs.reference_segments, report.labels, inputs.volume.array.shape[-3:])
    return inputs.reference


class WorkerRun:
    """Work started from the main thread, computed in a child process (:class:`.worker.ProcessRun`: progress
    polled, cancel asked), and its nodes added on the main thread by :meth:`finish`. Subclasses define :meth:`job`
    and :meth:`add_nodes`, and call ``super().__init__()`` once the inputs are read."""

    def __init__(self):
        self._process = ProcessRun(self.job())

    def job(self):
        """A picklable callable ``(progress, is_cancelled)`` that computes the result without any scene access."""
        raise NotImplementedError

    def add_nodes(self, result):
        """On the main thread: the result nodes, all of them or none."""
        raise NotImplementedError

    def start(self):
        self._process.start()
        return self

    def cancel(self):
        """Ask the worker to stop at its next iteration; :meth:`finish` then adds nothing."""
        self._process.cancel()

    def abandon(self):
        """Cancel for good (the application quits): nobody will call :meth:`finish`; the worker cleans up."""
        self._process.abandon()

    @property
    def cancelled(self):
        return self._process.cancelled

    @property
    def done(self):
        return self._process.done

    @property
    def progress(self):
        """(fraction 0..1, message) of the work done."""
        return self._process.progress

    def wait(self, timeout=None):
        return self._process.wait(timeout)

    def finish(self):
        """On the main thread, once :attr:`done`: add the result nodes and return them.

        Raises the worker's error, or AttackCancelled if the run was cancelled; then nothing is added.
        """
        if not self.done:
            raise RuntimeError("the run has not finished")
        if self.cancelled:  # even if the worker finished before it saw the cancel
            self._process.outcome_or_none()
            raise AttackCancelled()
        return self.add_nodes(self._process.outcome())


class ProbeRun(WorkerRun):
    """One probe of one network on one volume: results in a new folder named after them."""

    def __init__(self, slicer_scene, settings):
        self.slicer_scene = slicer_scene
        self.settings = settings
        self.inputs = read_inputs(slicer_scene, settings)
        self.unstable_at = unstable_strength(settings)
        super().__init__()

    def job(self):
        return functools.partial(compute, self.inputs)

    def add_nodes(self, result):
        nodes = add_run_nodes(self.slicer_scene, result, self.unstable_at)
        nodes["input"] = self.settings.inputVolume
        nodes["status"] = result_status(result)
        return nodes


def result_status(result):
    """What the status line adds to "results in folder ...": a classifier's predicted class (name and
    probability) clean and under the strongest probe; nothing for a segmentation network."""
    if getattr(result, "task", "segmentation") != "classification":
        return ""
    clean, strongest = result.rows[0], result.rows[-1]
    text = "clean: {} (p {:.2f})".format(clean["predicted_name"], clean["confidence"])
    if len(result.rows) > 1:
        text += "; {} {} {:g}: {} (p {:.2f}){}".format(
            result.probe_name, result.strength_name, strongest[result.strength_name], strongest["predicted_name"],
            strongest["confidence"], ", flipped" if strongest["flipped"] else "")
    return text


def unstable_strength(settings):
    """The strength of the "unstable at <= s" segmentation (None: the sweep's middle one)."""
    text = settings.unstableAt.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InputError("review unstable at: expected a positive strength (an epsilon or a severity), got {!r}"
                         .format(text))
    return value


def add_run_nodes(slicer_scene, result, unstable_at=None):
    """Add the result nodes (the fragility ones too, "unstable at <= ``unstable_at``") under a new
    subject-hierarchy folder; on any failure remove all of them and it."""
    from ..pipeline import add_all_result_nodes

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_scene.scene)
    name = "{} {} {}".format(result.volume.name, result.model_name, result.probe_name)
    return add_nodes_in_folder(slicer_scene.scene, unique_folder_name(hierarchy, name),
                               lambda: add_all_result_nodes(slicer_scene, result, unstable_at))


def add_nodes_in_folder(scene, name, add_nodes):
    """Call ``add_nodes()`` (returns a dictionary of nodes) and put every node it added into a new folder
    ``name``; on any failure remove all of them and the folder. Returns the dictionary with ``"folder"``."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    before = node_ids(scene)
    folder = None
    try:
        nodes = add_nodes()
        folder = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), name)
        for index in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(index)
            if node.GetID() not in before and not node.GetHideFromEditors():
                _put_in_folder(hierarchy, node, folder)
        nodes["folder"] = folder
        return nodes
    except BaseException:
        if folder:
            hierarchy.RemoveItem(folder, False, False)
        remove_nodes_added_since(scene, before)
        raise


def _put_in_folder(hierarchy, node, folder):
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, folder)
    else:
        hierarchy.CreateItem(folder, node)


def unique_folder_name(hierarchy, base):
    """``base``, numbered (``base (2)``...) when a folder of that name exists already."""
    existing = vtk.vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), existing, True)
    return numbered(base, {hierarchy.GetItemName(existing.GetId(index)) for index in range(existing.GetNumberOfIds())})


def numbered(base, taken):
    """``base``, or ``base (2)``, ``base (3)``... the first that is not in ``taken``."""
    name, number = base, 2
    while name in taken:
        name, number = "{} ({})".format(base, number), number + 1
    return name


def folder_nodes(hierarchy, folder):
    """Data nodes under ``folder`` (recursively)."""
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(folder, children, True)
    nodes = [hierarchy.GetItemDataNode(children.GetId(index)) for index in range(children.GetNumberOfIds())]
    return [node for node in nodes if node is not None]


def run_settings(slicer_scene, settings):
    """Run synchronously (scripts, the in-Slicer self-test): start, wait, finish."""
    run = ProbeRun(slicer_scene, settings).start()
    run.wait()
    return run.finish()


def start_run(slicer_scene, node):
    """What the widget's Apply does: read the parameter node, check the inputs, start the worker."""
    return ProbeRun(slicer_scene, read_settings(node)).start()
