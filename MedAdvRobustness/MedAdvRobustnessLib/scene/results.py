"""Write a :class:`~..evaluation.records.RobustnessResult` into an MRML scene and into a results folder."""
import csv
import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import slicer

from ..errors import InputError
from ..processes import is_alive
from .slicer_scene import captured_stderr, check_volume_file, full_disk_error, named_write_error, sync_file
from .nodes import add_color_table, add_label_map_node, add_line_chart, add_segmentation_node, add_table_node, \
    add_volume_node
MEAN_COLOR = (0.1, 0.1, 0.1)
RUN_FILE = "run.json"  # how the results were made: see pipeline.run_record
STRENGTH_WORDS = {"epsilon": ("eps", "adversarial"), "severity": ("severity", "corrupted")}


def epsilon_text(epsilon):
    return "{:g}".format(epsilon)


def outcome_title(result, outcome):
    """``clean``, ``<attack> eps <e>`` or ``<corruption> severity <s>``: how nodes and figures name an outcome."""
    if outcome.strength == 0:
        return "clean"
    return "{} {} {}".format(result.probe_name, STRENGTH_WORDS[result.strength_name][0],
                             epsilon_text(outcome.strength))


def add_result_nodes(slicer_scene, result):
    """Adversarial (or corrupted) volume, perturbation and segmentation per strength, clean segmentation, metrics
    and chart.

    Returns the new nodes by role (``probed``/``perturbation``/``segmentation`` map the strength to a node).
    """
    scene, volume = slicer_scene.scene, result.volume
    title = "{} {} {}".format(volume.name, result.model_name, result.probe_name)
    colors = add_color_table(scene, result.labels, "{} {} labels".format(volume.name, result.model_name))
    nodes = {"probed": {}, "perturbation": {}, "segmentation": {}, "colors": colors}
    for outcome in result.outcomes:
        suffix = outcome_title(result, outcome)
        if outcome.strength > 0:
            nodes["probed"][outcome.strength] = add_volume_node(
                scene, outcome.probed, volume, "{} {} {}".format(
                    volume.name, STRENGTH_WORDS[result.strength_name][1], suffix))
            nodes["perturbation"][outcome.strength] = add_volume_node(
                scene, outcome.probed - volume.array, volume, "{} perturbation {}".format(volume.name, suffix))
        name = "{} segmentation {}".format(volume.name, suffix)
        label_map = add_label_map_node(scene, outcome.prediction, volume, name + " label map", result.labels, colors)
        nodes["segmentation"][outcome.strength] = add_segmentation_node(slicer_scene, label_map, name)
        scene.RemoveNode(label_map)
    nodes["metrics"] = add_table_node(scene, result.rows, result.columns, title + " metrics")
    nodes["curve"], nodes["chart"] = add_dice_curve(scene, result, title)
    return nodes


def dice_curve_rows(result):
    """Rows of the strength and Dice per label and mean (against the reference if given, else the clean
    prediction)."""
    key, against = result.strength_name, result.against
    curve = {}
    for row in result.rows:
        curve.setdefault(row[key], {key: row[key]})[row["label"]] = row["dice_" + against]
    return [curve[strength] for strength in sorted(curve)], against


def add_dice_curve(scene, result, title):
    rows, against = dice_curve_rows(result)
    key = result.strength_name
    columns = [key] + [label.name for label in result.labels[1:]] + ["mean"]
    table = add_table_node(scene, rows, columns, "{} Dice vs {} table".format(title, key))
    series = [(label.name, label.color) for label in result.labels[1:]] + [("mean", MEAN_COLOR)]
    chart = add_line_chart(scene, table, key, series, "{} Dice vs {}".format(title, key), result.strength_label,
                           "Dice against {}".format(against))
    return table, chart


def write_metrics_csv(result, path):
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=result.columns, extrasaction="ignore")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in result.columns})
    write_text_checked(path, text.getvalue())


def write_text_checked(path, text):
    """Write a text file and flush it to the disk: a full disk or a failing device raises OSError here, naming the
    file."""
    try:
        with open(str(path), "w", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        raise named_write_error(error, path)


def write_volume_file(array_xyz, like, path, label_map=False):
    """Write a network-convention array on the grid of ``like`` with Slicer's writer (same geometry), checked
    complete on the disk (Slicer's writer reports success on a full disk)."""
    scratch = slicer.vtkMRMLScene()
    node_class = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
    array = array_xyz.astype("int16") if label_map else array_xyz
    write_node(add_volume_node(scratch, array, like, "scratch", node_class, display=False), path)
    check_written_volume(path)


def write_node(node, path):
    """Write ``node`` with its default storage node (Slicer's writer for the file's type), its messages held back;
    OSError where the writer fails."""
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    with captured_stderr():
        written = storage.WriteData(node)
    if not written:
        raise full_disk_error(path) or OSError(errno.EIO, "Slicer's writer failed", str(path))


def check_written_volume(path):
    """Refuse a written volume file that the disk holds incompletely (its header's voxels are not all there)."""
    sync_file(path)
    try:
        check_volume_file(path, complete_only=True)
    except InputError:
        raise full_disk_error(path) or OSError(errno.EIO, "written incompletely (is the disk full?)", str(path))


def check_png(path):
    """Refuse a PNG file that does not end with its IEND chunk (written incompletely)."""
    sync_file(path)
    with open(str(path), "rb") as stream:
        stream.seek(max(0, os.path.getsize(str(path)) - 12))
        if b"IEND" not in stream.read():
            raise full_disk_error(path) or OSError(errno.EIO, "written incompletely (is the disk full?)", str(path))


def write_result_files(result, out_dir):
    """``adversarial_<eps>.nii.gz`` (``corrupted_<severity>``) and ``prediction_<...>.nii.gz`` per strength (0:
    clean), their label names and colours (``labels.ctbl`` for Slicer, ``labels.itksnap.txt`` for ITK-SNAP),
    ``metrics.csv``, and for corruptions ``rood_summary.json``."""
    out_dir = Path(out_dir)
    volume_prefix = STRENGTH_WORDS[result.strength_name][1]
    for outcome in result.outcomes:
        strength = epsilon_text(outcome.strength)
        write_volume_file(outcome.probed, result.volume, out_dir / "{}_{}.nii.gz".format(volume_prefix, strength))
        write_volume_file(outcome.prediction, result.volume, out_dir / "prediction_{}.nii.gz".format(strength),
                          label_map=True)
    write_color_table(result.labels, out_dir / LABELS_TABLE)
    write_text_checked(out_dir / ITKSNAP_LABELS, itksnap_labels(result.labels))
    write_metrics_csv(result, out_dir / "metrics.csv")
    summary = result.rood_summary()
    if summary is not None:
        write_text_checked(out_dir / "rood_summary.json", json.dumps(summary, indent=2) + "\n")


LABELS_TABLE, ITKSNAP_LABELS = "labels.ctbl", "labels.itksnap.txt"


def write_color_table(labels, path):
    """The labels' names and colours as a Slicer colour table file (``.ctbl``), written by Slicer's own writer."""
    scratch = slicer.vtkMRMLScene()  # kept while the node is written: a node's storage needs its scene
    write_node(add_color_table(scratch, labels, "labels"), path)
    sync_file(path)


def itksnap_labels(labels):
    """An ITK-SNAP label description file: index, colour (0-255), opacity, visibility, mesh visibility, name."""
    lines = ["# ITK-SnAP Label Description File (written by medadv)",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL"]
    for label in labels:
        red, green, blue = (int(round(255 * channel)) for channel in label.color[:3])
        visible = 0 if label.value == 0 else 1
        lines.append("{:5d} {:5d} {:4d} {:4d} {:8g} {:2d} {:2d}    \"{}\"".format(
            label.value, red, green, blue, float(visible), visible, visible, label.name.replace('"', "'")))
    return "\n".join(lines) + "\n"


def write_run_file(record, path):
    """``run.json``: the record of how the results were made (JSON, no NaN)."""
    write_text_checked(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def check_output_dir(out_dir):
    """The results folder, absolute: new or an empty folder, not a link, in a writable folder (or one that can be
    created there) and on its file system (the results are staged next to it and moved in by a rename), so that
    nothing of the user's is overwritten and no finished run is left stranded in its staging folder."""
    if not str(out_dir).strip():
        raise InputError("the results folder is empty text: give a folder name")
    given = Path(out_dir)
    out_dir = Path(os.path.abspath(str(given)))
    check_name_length(given, out_dir)
    if given.is_symlink():
        raise InputError("{} is a symbolic link{}: give a new or empty folder itself, not a link".format(
            given, "" if given.exists() else " to nothing"))
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("{} is a file: the results need a folder (give a new or empty folder)".format(given))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError("output folder {} exists and is not empty".format(given))
    parent = out_dir.parent
    dangling = next((folder for folder in [parent] + list(parent.parents)
                     if folder.is_symlink() and not folder.exists()), None)
    if dangling is not None:
        raise InputError("cannot create {}: {} is a symbolic link to nothing".format(given, dangling))
    existing = next(folder for folder in [parent] + list(parent.parents) if folder.exists())
    if not existing.is_dir():
        raise InputError("cannot create {}: {} is not a folder".format(given, existing))
    if not os.access(str(existing), os.W_OK | os.X_OK):
        raise InputError("cannot create {}: the folder {} is not writable (read-only or no permission)".format(
            given, existing))
    if out_dir.exists() and out_dir.stat().st_dev != parent.stat().st_dev:
        raise InputError("{} is a mount point (another file system than {}): the results are staged in {} and "
                         "moved into place, which cannot cross file systems; give a new folder inside it".format(
                             given, parent, parent))
    return out_dir


NAME_MAX = 255  # bytes of one file name on the common file systems (ext4, XFS, APFS, NTFS)
STAGING_EXTRA = len(".") + len(".partial-") + 8  # the staging folder's name around the results folder's


def check_name_length(given, out_dir):
    """Refuse a results folder name too long for its staging folder's name (``.NAME.partial-XXXXXXXX``)."""
    length = len(os.fsencode(out_dir.name))
    if length + STAGING_EXTRA > NAME_MAX:
        raise InputError("the folder name of {} is {} bytes long; with its staging folder's {} more it passes the "
                         "{}-byte limit of a file name: give a name of at most {} bytes".format(
                             given, length, STAGING_EXTRA, NAME_MAX, NAME_MAX - STAGING_EXTRA))


OWNER_FILE = ".medadv-owner"  # in a staging folder: the process id of the run writing it


class StagedOutput:
    """Write into a hidden sibling folder; move it into place only when everything succeeded (else remove it).

    The staging folder records its owner's process id; staging folders of runs that died without cleaning up
    (SIGKILL, power loss) are removed by the next run writing into the same parent folder, whatever its name.
    """

    def __init__(self, out_dir):
        self.out_dir = check_output_dir(out_dir)
        parent = self.out_dir.parent
        self.created = [folder for folder in reversed([parent] + list(parent.parents)) if not folder.exists()]
        self.staging = None

    def __enter__(self):
        prefix = "." + self.out_dir.name + ".partial-"
        try:
            for folder in self.created:  # the missing folders above DIR: removed again if the run fails
                folder.mkdir()
            remove_stale_staging(self.out_dir.parent)
            self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=str(self.out_dir.parent)))
            write_text_checked(self.staging / OWNER_FILE, str(os.getpid()))
        except BaseException:
            self._remove_staging()
            raise
        return self.staging

    def __exit__(self, kind, error, trace):
        if kind is not None:
            self._remove_staging()
            return False
        try:
            self._move_into_place()
        except OSError as failure:
            self._remove_staging()
            raise OSError(failure.errno, "cannot move the results into place ({}); nothing was kept".format(
                failure.strerror or failure), str(self.out_dir))
        return False

    def _remove_staging(self):
        """Remove the staging folder and the folders created for it (where still empty)."""
        if self.staging is not None:
            shutil.rmtree(str(self.staging), ignore_errors=True)
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break

    def _move_into_place(self):
        (self.staging / OWNER_FILE).unlink()
        os.chmod(str(self.staging), 0o777 & ~_umask())
        if self.out_dir.exists():
            self.out_dir.rmdir()  # still empty (else: refused, nothing of the user's is replaced)
        self.staging.rename(self.out_dir)


def remove_stale_staging(folder):
    """Remove the staging folders (``.NAME.partial-*`` holding :data:`OWNER_FILE`) in ``folder`` whose owner
    process is gone; anything else is left alone."""
    for staging in Path(folder).glob(".*.partial-*"):
        try:
            owner = int((staging / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or not yet claimed: leave it
        if not is_alive(owner) and not staging.is_symlink():
            shutil.rmtree(str(staging), ignore_errors=True)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
