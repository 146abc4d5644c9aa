"""Find the nodes of a results scene by the names :mod:`.results` gives them (no trame, no rendering here).

``medadv run`` writes, per attacked volume ``<vol>``, attack ``<attack>`` and model ``<model>``:

- ``<vol>``: the input volume,
- ``<vol> adversarial <attack> eps <e>`` and ``<vol> perturbation <attack> eps <e>`` per epsilon,
- ``<vol> segmentation clean`` and ``<vol> segmentation <attack> eps <e>``,
- ``<vol> <model> <attack> metrics``, ``<vol> <model> <attack> Dice vs epsilon table`` (tables) and
  ``<vol> <model> <attack> Dice vs epsilon`` (chart).
"""
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .errors import InputError

_PER_EPSILON = re.compile(r"^(?P<volume>.+) (?P<role>adversarial|perturbation|segmentation) (?P<attack>\S+) "
                          r"eps (?P<epsilon>[0-9.eE+-]+)$")
_CLEAN_SEGMENTATION = re.compile(r"^(?P<volume>.+) segmentation clean$")


@dataclass
class AttackedEpsilon:
    epsilon: float
    text: str
    adversarial: object = None
    perturbation: object = None
    segmentation: object = None

    @property
    def key(self):
        """A name usable in HTML ids and trame state values."""
        return self.text.replace(".", "_").replace("-", "m").replace("+", "")


@dataclass
class ResultsRun:
    """One attack sweep of one volume: the nodes the viewer shows."""
    volume_name: str
    attack: str
    volume: object = None
    clean_segmentation: object = None
    epsilons: List[AttackedEpsilon] = field(default_factory=list)
    metrics: object = None
    dice_table: object = None
    chart: object = None
    model: str = ""

    @property
    def title(self):
        return " ".join(part for part in (self.volume_name, self.model, self.attack) if part)

    def by_key(self, key):
        return next((item for item in self.epsilons if item.key == key), None)


def find_runs(scene) -> List[ResultsRun]:
    """The complete runs (input volume, clean segmentation and at least one attacked epsilon) in ``scene``."""
    nodes = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
    named = [node for node in nodes if node is not None and node.GetName()]
    runs: Dict[tuple, ResultsRun] = {}
    for node in named:
        match = _PER_EPSILON.match(node.GetName())
        if not match or not _is_role_class(node, match.group("role")):
            continue
        try:
            epsilon = float(match.group("epsilon"))
        except ValueError:
            continue
        run = runs.setdefault((match.group("volume"), match.group("attack")),
                              ResultsRun(match.group("volume"), match.group("attack")))
        entry = next((item for item in run.epsilons if item.text == match.group("epsilon")), None)
        if entry is None:
            entry = AttackedEpsilon(epsilon, match.group("epsilon"))
            run.epsilons.append(entry)
        setattr(entry, match.group("role"), node)
    complete = []
    for (volume_name, attack), run in runs.items():
        run.volume = _find_volume(named, volume_name)
        run.clean_segmentation = next(
            (node for node in named if node.IsA("vtkMRMLSegmentationNode")
             and (_CLEAN_SEGMENTATION.match(node.GetName()) or [None, None])[1] == volume_name), None)
        run.epsilons = sorted((item for item in run.epsilons if item.adversarial is not None
                               and item.segmentation is not None), key=lambda item: item.epsilon)
        if run.volume is None or run.clean_segmentation is None or not run.epsilons:
            continue
        _attach_tables(run, named)
        complete.append(run)
    return sorted(complete, key=lambda run: (run.volume_name, run.attack))


def _is_role_class(node, role):
    if role == "segmentation":
        return node.IsA("vtkMRMLSegmentationNode")
    return node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")


def _find_volume(named, volume_name):
    return next((node for node in named if node.GetName() == volume_name and node.IsA("vtkMRMLScalarVolumeNode")
                 and not node.IsA("vtkMRMLLabelMapVolumeNode")), None)


def _attach_tables(run, named):
    """``<vol> <model> <attack> metrics`` etc.; the model name is what lies between."""
    prefix, suffixes = run.volume_name + " ", {
        "metrics": " {} metrics".format(run.attack),
        "dice_table": " {} Dice vs epsilon table".format(run.attack),
        "chart": " {} Dice vs epsilon".format(run.attack),
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
        raise InputError("{} holds no medadv results (no '<volume> adversarial <attack> eps <e>' volume with its "
                         "segmentations)".format(source))
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


def chart_series(chart_node, scene):
    """(y column, colour, title) of each series of a chart node, with the chart's axis titles."""
    series = []
    if chart_node is None:
        return series
    for index in range(chart_node.GetNumberOfPlotSeriesNodes()):
        plot = chart_node.GetNthPlotSeriesNode(index)
        if plot is not None:
            series.append((plot.GetYColumnName(), tuple(plot.GetColor()), plot.GetName()))
    return series


def segment_legend(segmentation_node):
    """(name, (r, g, b)) per segment."""
    segmentation = segmentation_node.GetSegmentation()
    return [(segmentation.GetNthSegment(index).GetName(), tuple(segmentation.GetNthSegment(index).GetColor()))
            for index in range(segmentation.GetNumberOfSegments())]


def epsilon_from_row(row) -> Optional[float]:
    value = row.get("epsilon")
    return None if value is None else float(value)
