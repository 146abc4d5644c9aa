"""Find the nodes of a results scene by the names :mod:`..scene.results` gives them (no trame, no rendering here).

``medadv run`` writes, per input volume ``<vol>``, probe ``<probe>`` and model ``<model>``, for an attack at
each epsilon ``<e>`` (or a corruption at each severity ``<s>``):

- ``<vol>``: the input volume,
- ``<vol> adversarial <probe> eps <e>`` (``<vol> corrupted <probe> severity <s>``) and
  ``<vol> perturbation <probe> eps <e>`` (``... severity <s>``),
- ``<vol> segmentation clean`` and ``<vol> segmentation <probe> eps <e>`` (``... severity <s>``),
- ``<vol> <model> <probe> metrics``, ``<vol> <model> <probe> Dice vs epsilon table`` (``Dice vs severity table``)
  and the chart ``<vol> <model> <probe> Dice vs epsilon`` (``Dice vs severity``);
- ``<vol> fragility <probe>`` and the table ``<vol> <model> <probe> structures`` (:mod:`..scene.fragility`), in
  scenes written since fragility maps exist.

A classifier's run (:mod:`..scene.classification`) has the same probed volumes and perturbations, no
segmentation, ``<vol> saliency <model>``, the metrics table (a row per strength: the predicted class and its
probability) and ``<vol> <model> <probe> confidence vs epsilon table`` with its chart ``... confidence vs epsilon``.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List

from ..errors import InputError

# The word in node names, the strength's name (the metrics table's column) and how the page writes it.
STRENGTHS = {"eps": ("epsilon", "ε"), "severity": ("severity", "severity")}
_PER_STRENGTH = re.compile(r"^(?P<volume>.+) (?P<role>adversarial|corrupted|perturbation|segmentation) "
                           r"(?P<probe>\S+) (?P<word>eps|severity) (?P<value>[0-9.eE+-]+)$")
_CLEAN_SEGMENTATION = re.compile(r"^(?P<volume>.+) segmentation clean$")
_ROLES = {"adversarial": "probed", "corrupted": "probed", "perturbation": "perturbation",
          "segmentation": "segmentation"}


@dataclass
class ProbedStrength:
    """The nodes of one strength (an epsilon or a severity) of a sweep."""
    strength: float
    text: str
    probed: object = None
    perturbation: object = None
    segmentation: object = None

    @property
    def key(self):
        """A name usable in HTML ids and trame state values."""
        return self.text.replace(".", "_").replace("-", "m").replace("+", "")


@dataclass
class ResultsRun:
    """One sweep of one probe (attack or corruption) on one volume: the nodes the viewer shows."""
    volume_name: str
    probe: str
    strength_name: str = "epsilon"
    volume: object = None
    clean_segmentation: object = None
    strengths: List[ProbedStrength] = field(default_factory=list)
    metrics: object = None
    dice_table: object = None
    chart: object = None
    model: str = ""
    fragility: object = None
    structures: object = None
    task: str = "segmentation"  # or "classification": no segmentation, a confidence curve
    saliency: object = None

    @property
    def is_classification(self):
        return self.task == "classification"

    @property
    def title(self):
        return " ".join(part for part in (self.volume_name, self.model, self.probe) if part)

    @property
    def is_attack(self):
        return self.strength_name == "epsilon"

    @property
    def symbol(self):
        """How the page writes the strength: ε or severity."""
        return next(symbol for name, symbol in STRENGTHS.values() if name == self.strength_name)

    def caption(self, item):
        """e.g. ``fgsm ε = 0.04`` or ``bias_field severity 3``."""
        return "{} {} {}".format(self.probe, self.symbol, ("= " if self.is_attack else "") + item.text)

    def by_key(self, key):
        return next((item for item in self.strengths if item.key == key), None)

    def segmentations(self):
        """The clean and probed segmentations (none for a classifier)."""
        nodes = [self.clean_segmentation] + [item.segmentation for item in self.strengths]
        return [node for node in nodes if node is not None]


def find_runs(scene) -> List[ResultsRun]:
    """The complete runs (input volume, clean segmentation and at least one probed strength; a classifier's: its
    confidence table instead of the segmentations) in ``scene``."""
    nodes = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
    named = [node for node in nodes if node is not None and node.GetName()]
    runs: Dict[tuple, ResultsRun] = {}
    for node in named:
        match = _PER_STRENGTH.match(node.GetName())
        if not match or not _is_role_class(node, match.group("role")):
            continue
        try:
            strength = float(match.group("value"))
        except ValueError:
            continue
        strength_name = STRENGTHS[match.group("word")][0]
        key = (match.group("volume"), match.group("probe"), strength_name)
        run = runs.setdefault(key, ResultsRun(*key))
        entry = next((item for item in run.strengths if item.text == match.group("value")), None)
        if entry is None:
            entry = ProbedStrength(strength, match.group("value"))
            run.strengths.append(entry)
        setattr(entry, _ROLES[match.group("role")], node)
    complete = []
    for run in runs.values():
        run.volume = _find_volume(named, run.volume_name)
        run.clean_segmentation = next(
            (node for node in named if node.IsA("vtkMRMLSegmentationNode")
             and (_CLEAN_SEGMENTATION.match(node.GetName()) or [None, None])[1] == run.volume_name), None)
        if run.clean_segmentation is None and _find_curve(named, run, "confidence") is not None:
            run.task = "classification"
        run.strengths = sorted((item for item in run.strengths if item.probed is not None
                                and (item.segmentation is not None or run.is_classification)),
                               key=lambda item: item.strength)
        if run.volume is None or not run.strengths or not (run.clean_segmentation or run.is_classification):
            continue
        _attach_tables(run, named)
        if run.is_classification:
            run.saliency = next((node for node in named if node.GetName() == "{} saliency {}".format(
                run.volume_name, run.model) and _is_role_class(node, "saliency")), None)
        run.fragility = next((node for node in named if node.GetName() == "{} fragility {}".format(
            run.volume_name, run.probe) and _is_role_class(node, "fragility")), None)
        complete.append(run)
    return sorted(complete, key=lambda run: (run.volume_name, run.probe, run.strength_name))


def _is_role_class(node, role):
    if role == "segmentation":
        return node.IsA("vtkMRMLSegmentationNode")
    return node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")


def _find_volume(named, volume_name):
    return next((node for node in named if node.GetName() == volume_name and node.IsA("vtkMRMLScalarVolumeNode")
                 and not node.IsA("vtkMRMLLabelMapVolumeNode")), None)


def _find_curve(named, run, quantity):
    """The ``<vol> <model> <probe> <quantity> vs <strength> table`` node of ``run``, or None."""
    prefix, suffix = run.volume_name + " ", " {} {} vs {} table".format(run.probe, quantity, run.strength_name)
    return next((node for node in named if node.IsA("vtkMRMLTableNode") and node.GetName().startswith(prefix)
                 and node.GetName().endswith(suffix)), None)


def _attach_tables(run, named):
    """``<vol> <model> <probe> metrics`` etc.; the model name is what lies between. A classifier's curve (its
    confidence, not the Dice) is the run's ``dice_table`` and ``chart``."""
    curve = "confidence" if run.is_classification else "Dice"
    prefix, suffixes = run.volume_name + " ", {
        "metrics": " {} metrics".format(run.probe),
        "dice_table": " {} {} vs {} table".format(run.probe, curve, run.strength_name),
        "chart": " {} {} vs {}".format(run.probe, curve, run.strength_name),
        "structures": " {} structures".format(run.probe),
    }
    for role, suffix in suffixes.items():
        node_class = "vtkMRMLPlotChartNode" if role == "chart" else "vtkMRMLTableNode"
        for node in named:
            name = node.GetName()
            if node.IsA(node_class) and name.startswith(prefix) and name.endswith(suffix):
                setattr(run, role, node)
                run.model = run.model or name[len(prefix):-len(suffix)]
                break


def require_run(scene, source):
    runs = find_runs(scene)
    if not runs:
        raise InputError("{} holds no medadv results (no '<volume> adversarial <attack> eps <e>' or '<volume> "
                         "corrupted <corruption> severity <s>' volume with its segmentations)".format(source))
    return runs


def table_rows(table_node):
    """The rows of a table node as dicts: numbers as float (NaN and empty as None), text as str."""
    table = table_node.GetTable()
    columns = {}
    for index in range(table.GetNumberOfColumns()):
        column = table.GetColumn(index)
        values = [column.GetValue(row) for row in range(table.GetNumberOfRows())]
        columns[column.GetName()] = _typed(values)
    return [{name: values[row] for name, values in columns.items()} for row in range(table.GetNumberOfRows())]


def _typed(values):
    """Floats stay floats (NaN: None); a text column whose every non-empty cell is a number becomes numbers."""
    def number(value):
        if isinstance(value, str):
            return None if value.strip() == "" else float(value)
        return None if math.isnan(value) else float(value)
    try:
        return [number(value) for value in values]
    except ValueError:
        return [str(value) for value in values]


def segment_legend(segmentation_node):
    """(name, (r, g, b)) per segment."""
    segmentation = segmentation_node.GetSegmentation()
    return [(segmentation.GetNthSegment(index).GetName(), tuple(segmentation.GetNthSegment(index).GetColor()))
            for index in range(segmentation.GetNumberOfSegments())]
