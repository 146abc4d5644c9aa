"""The module's "compare networks" section: the selected probe (and further ones, each once per seed), several
networks, the volumes checked in the scene.

It is ``medadv bench`` driven from the scene: the checked volumes (with their references) are written as bench
cases into the study folder, the study runs cell by cell in a worker process (progress, cancel), and its summary
table and Dice curves land in the scene as table and chart nodes, with each network's instability map on each
volume (combining every probe), all in one new folder. The study folder keeps the cells, ``results.csv``, ``summary.csv``, the fragility
(``fragility.csv``, ``fragility/``, ``instability/``), the figures and ``report.html``: run again with the same
folder and only the missing cells are computed.
"""
import functools
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import slicer

from ..study.cases import REFERENCE_MARKERS, is_class_case
from ..errors import InputError
from ..probes.registry import is_corruption, make_probe, probe_names
from .logic import (WorkerRun, add_nodes_in_folder, numbered, probe_from_settings, read_settings, true_class,
                    reference_from_segments, segment_masks, stored_probe_parameters, unique_folder_name)
from ..scene.nodes import labels_from_node, volume_from_node


@dataclass
class CompareCase:
    """One checked volume, copied out of the scene (arrays, no node)."""
    volume: object
    reference: Optional[np.ndarray]
    reference_segments: Optional[list]  # [(segment name, mask)] of a segmentation reference
    reference_name: str = ""


@dataclass
class CompareInputs:
    cases: list
    networks: list  # {"name", "source"}: a built-in name or a model path
    probes: list  # bench probes: {"attack": NAME, "epsilons": [...], "params": {...}, "name"?} or corruptions
    folder: str
    true_class: Optional[int] = None  # classifiers: the class of every checked image (Inputs: true class)


def network_list(text):
    """Built-in names or model paths, separated by commas or new lines (as the widget stores them)."""
    networks = _listed(text, "network {} is listed twice")
    if not networks:
        raise InputError("choose at least one network to compare")
    return networks


def _listed(text, repeated_message):
    """The items of ``text`` separated by commas or new lines, each once (else ``repeated_message``)."""
    items = [item.strip() for item in re.split(r"[,\n]+", str(text)) if item.strip()]
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise InputError(repeated_message.format(", ".join(repeated)))
    return items


def bench_probe(settings, name=None):
    """The probe ``name`` (default: the selected one), its stored parameters and the epsilons or severities of the
    settings as a bench study probe (checked like a single run)."""
    name = name or settings.probe
    _, strengths = probe_from_settings(settings, name)
    params = stored_probe_parameters(settings, name)
    if is_corruption(name):
        return {"corruption": name, "severities": strengths, "params": params}
    return {"attack": name, "epsilons": strengths, "params": params}


def bench_probes(settings):
    """The study probes of the comparison: the selected probe, then those of ``compareProbes``, each once per seed
    of ``compareSeeds``."""
    seeds = seed_list(settings.compareSeeds)
    names = [settings.probe] + compare_probe_names(settings.compareProbes, settings.probe)
    return [seeded for name in names for seeded in seeded_probes(bench_probe(settings, name), seeds)]


def compare_probe_names(text, selected):
    """The further probes to compare (comma or new line separated): known, each once, not the selected one."""
    names = _listed(text, "compare probes: {} is listed twice")
    known = probe_names()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError("compare probes: unknown probe {}; known probes: {}".format(", ".join(unknown),
                                                                                    ", ".join(known)))
    if selected in names:
        raise InputError("compare probes: {} is the selected probe, which runs anyway; list only further probes"
                         .format(selected))
    return names


def seed_list(text):
    """The seeds of the comparison (whole numbers separated by spaces or commas; empty: none)."""
    items = [item for item in re.split(r"[\s,;]+", str(text).strip()) if item]
    if not all(re.fullmatch(r"\+?\d+", item) for item in items):
        raise InputError("compare seeds: expected whole numbers separated by spaces or commas (0 1 2), got {!r}"
                         .format(str(text)))
    seeds = [int(item) for item in items]
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise InputError("compare seeds: seed {} is listed twice".format(", ".join(str(s) for s in repeated)))
    return seeds


def seeded_probes(probe, seeds):
    """The study probe once per seed, named ``<probe> seed <N>`` with the parameter seed N; once as it is without
    seeds or when its seed changes nothing (FGSM, PGD without random start: more seeds would only count the same
    probe more often in the instability map)."""
    name = probe.get("attack") or probe["corruption"]
    if not seeds or not make_probe(name, **probe["params"]).draws_from_seed():
        return [probe]
    return [dict(probe, name="{} seed {}".format(name, seed), params=dict(probe["params"], seed=seed))
            for seed in seeds]


def probe_label(probes):
    """The probes' names without their seeds (``fgsm, smoothing``), as the result folder is named."""
    names = []
    for probe in probes:
        name = probe.get("attack") or probe["corruption"]
        if name not in names:
            names.append(name)
    return ", ".join(names)


def reference_node_of(scene, settings, volume_node):
    """The reference of a checked volume: for the input volume the one selected above (or none); for another
    volume a label map named after it (``NAME-label``, ``NAME_seg``...), else a segmentation made on it (not the
    region's); else None."""
    if volume_node is settings.inputVolume:
        return settings.referenceNode
    for marker in REFERENCE_MARKERS:
        found = scene.GetNodesByClassByName("vtkMRMLLabelMapVolumeNode", volume_node.GetName() + marker)
        if found.GetNumberOfItems():
            return found.GetItemAsObject(0)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    segmentations = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for index in range(segmentations.GetNumberOfItems()):
        segmentation = segmentations.GetItemAsObject(index)
        if segmentation.GetNodeReference(role) is volume_node and segmentation is not settings.regionSegmentation:
            return segmentation
    return None


def read_case(slicer_scene, settings, volume_node):
    volume = volume_from_node(volume_node)
    reference_node = reference_node_of(slicer_scene.scene, settings, volume_node)
    if reference_node is None:
        return CompareCase(volume, None, None)
    if reference_node.IsA("vtkMRMLSegmentationNode"):
        ids = []
        if reference_node is settings.referenceNode:
            ids = [s for s in settings.referenceSegmentIds.split(",") if s.strip()]
        return CompareCase(volume, None, segment_masks(slicer_scene, reference_node, ids, volume_node, volume),
                           reference_node.GetName())
    return CompareCase(volume, labels_from_node(reference_node, volume), None, reference_node.GetName())


def read_compare_inputs(slicer_scene, settings):
    """Check the comparison settings and copy the checked volumes out of the scene (InputError on bad input)."""
    volume_nodes = [node for node in settings.compareVolumes if node is not None]
    if not volume_nodes:
        raise InputError("check at least one volume to compare the networks on")
    networks = study_networks(network_list(settings.compareNetworks))
    probes = bench_probes(settings)
    cases = [read_case(slicer_scene, settings, node) for node in volume_nodes]
    return CompareInputs(cases, networks, probes, settings.compareFolder.strip(), true_class(settings))


def study_networks(sources):
    """``{"name", "source"}`` per network, named after the built-in name or the file or folder, numbered where
    two share a name (``run1/model.pt`` and ``run2/model.pt``)."""
    from pathlib import PurePath
    networks = []
    for source in sources:
        name = numbered(PurePath(source).name.replace(".json", "") or source, {item["name"] for item in networks})
        networks.append({"name": name, "source": source})
    return networks


def case_names(cases):
    """The volume names, numbered where two volumes share one."""
    names = []
    for case in cases:
        names.append(numbered(case.volume.name or "volume", names))
    return names


def network_labels(source, volume):
    """The labels of a network, as it reports them on ``volume``."""
    from ..networks.models import describe, load_model
    model = load_model(source)
    with model.on_grid(volume):
        return describe(model, volume).labels


def network_task(source, volume):
    """"classification" or "segmentation": the task a network declares, or shows on ``volume``."""
    from ..networks.models import describe, load_model
    model = load_model(source)
    with model.on_grid(volume):
        describe(model, volume)
        return model.task


def write_cases(inputs, folder):
    """Each case as ``<name>.nii.gz`` (+ ``<name>_seg.nii.gz``) on its own grid; returns the study's cases. For
    classifiers (the first network's task) each image is a case with the true class of the settings."""
    from ..scene.results import write_volume_file
    folder.mkdir(parents=True, exist_ok=True)
    if network_task(inputs.networks[0]["source"], inputs.cases[0].volume) == "classification":
        return write_class_cases(inputs, folder)
    labels, cases = None, []
    for index, (case, name) in enumerate(zip(inputs.cases, case_names(inputs.cases)), 1):
        stem = "{:03d}-{}".format(index, re.sub(r"[^A-Za-z0-9._-]+", "_", name))  # unique however names read
        volume_path, reference_path = folder / (stem + ".nii.gz"), None
        write_volume_file(case.volume.array, case.volume, volume_path)
        reference = case.reference
        if case.reference_segments is not None:
            labels = labels or network_labels(inputs.networks[0]["source"], case.volume)
            try:
                reference = reference_from_segments(case.reference_segments, labels, case.volume.array.shape)
            except InputError as error:
                raise InputError("reference {} of {}: {}".format(case.reference_name, name, error))
        if reference is not None:
            reference_path = folder / (stem + "_seg.nii.gz")
            write_volume_file(reference, case.volume, reference_path, label_map=True)
        cases.append({"name": name, "volume": str(volume_path),
                      "reference": str(reference_path) if reference_path else None})
    return cases


def write_class_cases(inputs, folder):
    """Each image as ``<name>.nrrd`` (a colour image stays one) with the settings' true class."""
    from ..scene.results import write_volume_file
    if inputs.true_class is None:
        raise InputError("these networks are classifiers: give the true class of the checked images (true class, "
                         "under Inputs); the comparison scores accuracy against it")
    cases = []
    for index, (case, name) in enumerate(zip(inputs.cases, case_names(inputs.cases)), 1):
        path = folder / "{:03d}-{}.nrrd".format(index, re.sub(r"[^A-Za-z0-9._-]+", "_", name))
        write_volume_file(case.volume.array, case.volume, path)
        cases.append({"name": name, "volume": str(path), "class": inputs.true_class})
    return cases


def compute_comparison(inputs, progress=None, is_cancelled=None):
    """Write the cases and run the study (no scene access: runs in the worker process). Returns the StudyRun."""
    import torch
    from ..study.execution import run_study
    progress = progress or (lambda fraction, message: None)
    temporary = not inputs.folder
    folder = Path(tempfile.mkdtemp(prefix="medadv-compare-")) if temporary else Path(inputs.folder)
    progress(0.0, "writing the cases to {}".format(folder))
    try:
        study = {"networks": inputs.networks, "cases": write_cases(inputs, folder / "cases"),
                 "probes": inputs.probes, "threads": torch.get_num_threads()}

        def cell_done(done, total, record):
            task = record["task"]
            progress(done / total, "cell {}/{}: {} on {}, {} {:g}".format(
                done, total, task["network"]["name"], task["case"]["name"], task["probe"]["name"],
                task["strength"]))

        return run_study(study, folder, progress=cell_done, is_cancelled=is_cancelled)
    except BaseException:
        if temporary:  # nothing of a failed or cancelled run is kept where nobody asked for it
            shutil.rmtree(str(folder), ignore_errors=True)
        raise


def add_compare_nodes(slicer_scene, study_run, probe_name):
    """The summary table, per probe the chart of mean Dice per network against the strength (``charts``;
    ``chart``: the first probe's) and the instability maps, in a new folder ``compare networks <probe_name>``; for
    classifiers the table of ``classification.csv`` and the accuracy chart (no instability: a
    classifier has no segmentation)."""
    from ..study.outputs import add_study_nodes
    scene = slicer_scene.scene
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)

    def add():
        summary, charts = add_study_nodes(scene, study_run.records)
        return {"summary": summary, "chart": charts[0], "charts": charts, "study": str(study_run.out_dir),
                "report": str(Path(study_run.out_dir) / "report.html"), "computed": len(study_run.computed),
                "reused": len(study_run.reused),
                "instability": {} if is_classifier_study(study_run) else add_instability_nodes(slicer_scene, study_run)}

    return add_nodes_in_folder(scene, unique_folder_name(hierarchy, "compare networks {}".format(probe_name)), add)


def is_classifier_study(study_run):
    """Whether the study's cases are images with a class (a study of classifiers)."""
    return any(is_class_case(record["task"]["case"]) for record in study_run.records)


def add_instability_nodes(slicer_scene, study_run):
    """Per network and case, its instability map (``instability/<network>__<case>.nii.gz``: the fraction of the
    probes under which a voxel changes at or below their middle strength) as ``<case> <network> instability``,
    0 transparent. Returns {(network, case): node}."""
    from ..study.fragility import output_path
    nodes = {}
    for task in (record["task"] for record in study_run.records):
        key = task["network"]["name"], task["case"]["name"]
        if key not in nodes:
            path = output_path(Path(study_run.out_dir) / "instability", *key)
            nodes[key] = slicer_scene.load_volume(path, name="{} {} instability".format(key[1], key[0]))
            display = nodes[key].GetDisplayNode()
            display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeIron")
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, 1.0)
            display.SetInterpolate(False)
            display.SetApplyThreshold(True)  # stable voxels (0) are transparent over the volume
            display.SetLowerThreshold(1e-6)
            display.SetUpperThreshold(1.0)
    return nodes


class CompareRun(WorkerRun):
    """The comparison: the selected probe (and the further ones, per seed) on every listed network and checked
    volume."""

    def __init__(self, slicer_scene, settings):
        self.slicer_scene = slicer_scene
        self.settings = settings
        self.inputs = read_compare_inputs(slicer_scene, settings)
        super().__init__()

    def job(self):
        return functools.partial(compute_comparison, self.inputs)

    def add_nodes(self, result):
        return add_compare_nodes(self.slicer_scene, result, probe_label(self.inputs.probes))


def start_comparison(slicer_scene, node):
    """What the widget's "Compare networks" button does: read the parameter node, check, start the worker."""
    return CompareRun(slicer_scene, read_settings(node)).start()
