"""A new probe started from the viewer's page: the same sweep on a shown run's clean volume, in a worker process
(progress polled, cancel asked), its result nodes added to the viewer's scene under the names :mod:`..scene.results`
gives them, so that the page finds the new run as it finds the others."""
import functools
from pathlib import Path

from ..errors import InputError
from ..networks.models import BUILTIN_MODELS
from ..module.logic import ProbeSettings, RunInputs, WorkerRun, compute, probe_from_settings, volume_file_matrix
from ..scene.nodes import labels_from_node, volume_from_node

DEFAULT_EPSILONS, DEFAULT_SEVERITIES = "0.01 0.02", "1 3 5"


def network_for(runs, model_source=None):
    """What new probes run on: ``model_source`` if given, else the shown results' network when it is built in."""
    if model_source:
        if str(model_source) not in BUILTIN_MODELS and not Path(model_source).exists():
            raise InputError("--model: not found: {} (built-in names: {})".format(
                model_source, ", ".join(sorted(BUILTIN_MODELS))))
        return str(model_source)
    names = {run.model for run in runs}
    return names.pop() if len(names) == 1 and next(iter(names)) in BUILTIN_MODELS else None


def scene_reference(scene, volume):
    """The labels of the scene's label map on ``volume``'s grid when the scene holds exactly one; else None."""
    label_maps = scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode")
    if label_maps.GetNumberOfItems() != 1:
        return None
    try:
        return labels_from_node(label_maps.GetItemAsObject(0), volume)
    except InputError:  # another volume's: no reference for this one
        return None


def true_class_of(run):
    """A classifier run's true class (the ``label`` of its metrics table, as ``medadv run --label`` gave it), or
    None (none given, or a segmentation run)."""
    from .scene import table_rows
    if not run.is_classification or run.metrics is None:
        return None
    labels = {row.get("label") for row in table_rows(run.metrics)}
    return int(labels.pop()) if len(labels) == 1 and None not in labels else None


class PageProbe(WorkerRun):
    """``probe_name`` at ``strengths_text`` on the clean volume of ``run`` (its reference label map if the scene
    holds exactly one; a classifier run's true class), with the network ``model_source``."""

    def __init__(self, slicer_scene, model_source, run, runs, probe_name, strengths_text):
        if any(other.volume is run.volume and other.probe == probe_name for other in runs):
            raise InputError("{} already has a {} run here; pick another probe".format(run.volume_name, probe_name))
        self.slicer_scene = slicer_scene
        # the module's probe settings: library defaults, the text as epsilons or severities, whichever applies
        probe, strengths = probe_from_settings(ProbeSettings(probe=probe_name, epsilons=strengths_text,
                                                             severities=strengths_text))
        volume = volume_from_node(run.volume)
        self.inputs = RunInputs(volume, scene_reference(slicer_scene.scene, volume), None, None, probe, strengths,
                                true_class_of(run), model_source, None, False, "cpu",
                                volume_file_matrix(run.volume))
        super().__init__()

    def job(self):
        return functools.partial(compute, self.inputs)

    def add_nodes(self, result):
        from ..pipeline import add_nodes_or_nothing
        return add_nodes_or_nothing(self.slicer_scene, result)
