"""Cases of a study: volume files with optional references, folders of them, and held-out variants of the
embedded sample (deformed, rotated and given a bias field), each hashed with its files."""
import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..probes.corruptions import corrupt_with_labels, spacing_from_affine
from ..sample import SAMPLE_LABELS, SAMPLE_VOLUME


CASE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


REFERENCE_MARKERS = ("_seg", "_label", "_labels", "-label", "_reference")


HELDOUT_PREFIX = "heldout:"


HELDOUT_RECIPE = (("elastic_deformation", 3), ("affine", 1), ("bias_field", 2))


HELDOUT_SEED = 1000


HELDOUT_MAX = 100  # held-out variants a study may ask for (each is seeded apart; the sample is one brain)


SLICES_PREFIX = "heldout-slices:"  # held-out axial slices of the demo classifier, each with its class


def resolve_cases(item):
    """Cases of one study entry: ``heldout:N``, ``heldout-slices:N``, ``sample``, a folder, a volume file,
    ``{name, volume, reference}`` or, for classifiers, ``{name, volume, class}``."""
    if isinstance(item, dict):
        if not item.get("volume"):
            raise InputError("study: a case needs a volume, got {!r}".format(item))
        if "class" in item:
            return [_class_case(item)]
        return [_file_case(item["volume"], item.get("reference"), item.get("name"))]
    item = str(item)
    if item.startswith(SLICES_PREFIX):
        return heldout_slice_cases(_count(item, SLICES_PREFIX, len(_heldout_slice_rows()),
                                          "held-out axial slices of the demo classifier"))
    if item.startswith(HELDOUT_PREFIX):
        count = _count(item, HELDOUT_PREFIX, HELDOUT_MAX, "held-out variants of the sample")
        return [heldout_case(index) for index in range(1, count + 1)]
    if item == "sample":
        return [_file_case(SAMPLE_VOLUME, SAMPLE_LABELS, "sample")]
    path = Path(item)
    if path.is_dir():
        return folder_cases(path)
    return [_file_case(path, None, None)]


def _count(item, prefix, most, what):
    """N of ``prefix`` + N, from 1 to ``most``; InputError otherwise."""
    try:
        count = int(item[len(prefix):])
    except ValueError:
        count = 0
    if not 1 <= count <= most:
        raise InputError("study: {!r}: give {}N with N from 1 to {} {}".format(item, prefix, most, what))
    return count


def is_class_case(case):
    """Whether a resolved case is a classifier's (an image and its class) rather than a segmenter's."""
    return "class" in case


def check_one_task(cases):
    """Refuse a study mixing classifier cases (an image and its class) with segmentation cases, in one line."""
    kinds = {is_class_case(case) for case in cases}
    if len(kinds) > 1:
        named = [case["name"] for case in cases if is_class_case(case)][:3]
        others = [case["name"] for case in cases if not is_class_case(case)][:3]
        raise InputError("study: cases {} are images with a class (for classifiers) and cases {} are volumes for "
                         "segmenters; a study compares networks of one kind: run them as two studies".format(
                             ", ".join(named), ", ".join(others)))


def _class_case(item):
    """``{name, volume, class}``: an image file and its true class (a whole number from 0)."""
    label = item["class"]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise InputError("study: the class of case {} must be a class index (0, 1, ...), got {!r}".format(
            item.get("name") or item["volume"], label))
    if item.get("reference") is not None:
        raise InputError("study: case {} gives a class and a reference; a classifier's case has a class only".format(
            item.get("name") or item["volume"]))
    return dict(_file_case(item["volume"], None, item.get("name")), **{"class": label})


@functools.lru_cache(maxsize=1)
def axial_slices():
    """The demo classifier's axial slices (:func:`~..classification_training.axial_slices`), read once; not to be
    modified."""
    from ..classification_training import axial_slices as read_slices
    return read_slices()


def _heldout_slice_rows():
    """The positions, among the demo classifier's axial slices, of those held out from its training."""
    from ..classification_training import split
    return np.flatnonzero(split(axial_slices()[3]))


def heldout_slice_cases(count):
    """``count`` of the demo classifier's held-out axial slices (unaugmented, spread evenly over them from the
    lowest), each with its anatomical level as class; see :func:`heldout_slice_volume`."""
    rows = _heldout_slice_rows()
    classes, indices = axial_slices()[1], axial_slices()[3]
    chosen = rows[np.round(np.linspace(0, len(rows) - 1, count)).astype(int)] if count > 1 else rows[:1]
    return [{"name": "slice-z{}".format(int(indices[row])), "slice": int(indices[row]), "class": int(classes[row]),
             "hash": hash_files([SAMPLE_VOLUME, SAMPLE_LABELS], extra=json.dumps(["axial slice", int(indices[row])]))}
            for row in chosen]


def heldout_slice_volume(case):
    """The Volume of a held-out slice case: axial slice ``case["slice"]`` of the sample averaged to 4 mm in plane
    (40x48x1, its MNI affine), as the demo classifier was trained and scored on."""
    from ..networks.volume import Volume
    slices, _, affines, indices = axial_slices()
    row = int(np.flatnonzero(indices == case["slice"])[0])
    return Volume.from_array(slices[row][:, :, None], affines[row], name=case["name"])


def heldout_case(index):
    """Held-out variant ``index`` of the sample: a seeded elastic deformation, rotation and bias field it was never
    trained on (labels moved with the image); see :func:`heldout_volume`."""
    recipe = [list(step) for step in HELDOUT_RECIPE]
    return {"name": "heldout-{}".format(index), "heldout": index, "recipe": recipe,
            "hash": hash_files([SAMPLE_VOLUME, SAMPLE_LABELS], extra=json.dumps([recipe, HELDOUT_SEED]))}


def folder_cases(folder):
    """Cases of a folder: each volume file, with the file of the same stem + ``_seg``/``_label``/``-label``/...
    as its reference label map."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and _case_stem(p) is not None)
    stems = {_case_stem(p): p for p in files}
    cases = []
    for stem, path in sorted(stems.items()):
        if any(stem.endswith(marker) for marker in REFERENCE_MARKERS):
            continue
        reference = next((stems[stem + marker] for marker in REFERENCE_MARKERS if stem + marker in stems), None)
        cases.append(_file_case(path, reference, stem))
    if not cases:
        raise InputError("no volume files ({}) in {}".format(", ".join(CASE_SUFFIXES), folder))
    return cases


def _case_stem(path):
    name = path.name
    for suffix in CASE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return None


def _file_case(volume, reference, name):
    volume = Path(volume)
    if not volume.exists():  # a folder or a named pipe: refused by check_case_file, saying what it is
        raise InputError("study: case volume not found: {}".format(volume))
    if reference is not None and not Path(reference).exists():
        raise InputError("study: reference not found: {}".format(reference))
    files = [volume] + ([Path(reference)] if reference is not None else [])
    name = str(name or _case_stem(volume) or volume.stem)
    for role, path in zip(("volume", "reference"), files):
        check_case_file(name, role, path)
    return {"name": name, "volume": str(volume.resolve()),
            "reference": str(Path(reference).resolve()) if reference is not None else None,
            "hash": hash_files(files)}


def check_case_file(name, role, path):
    """Refuse, before any cell runs, a case file that is not a sound image (see
    :func:`~..scene.slicer_scene.check_volume_file`), naming the case."""
    from ..scene.slicer_scene import check_volume_file
    try:
        check_volume_file(Path(path))
    except InputError as error:
        raise InputError("study: case {}: {} {}".format(name, role, error))


def load_case(case):
    from ..scene.nodes import labels_from_node, volume_from_node
    from ..scene.slicer_scene import SlicerScene
    scene = SlicerScene.standalone()
    volume = volume_from_node(scene.load_volume(case["volume"], name=case["name"]))
    reference = None
    if case.get("reference"):
        reference = labels_from_node(scene.load_volume(case["reference"], label_map=True), volume)
    return volume, reference


def case_file_matrix(case):
    """The matrix of a case's volume file as the frameworks read it (:func:`~..pipeline.nifti_voxel_to_ras`); None
    for a held-out case or slice (made, not read) or a file that is not NIfTI."""
    from ..pipeline import nifti_voxel_to_ras
    return nifti_voxel_to_ras(case.get("volume"))


def heldout_volume(index):
    """The sample deformed elastically, rotated and given a bias field (:data:`HELDOUT_RECIPE`, seed
    ``HELDOUT_SEED + index``), its labels moved with it: a (Volume, labels) pair training never saw. Made on one
    thread: the corruptions' float sums differ in their last bits with torch's thread count, and a case must be
    the same in every process and on every machine."""
    from .cells import _torch_threads
    volume, labels = load_case({"name": "sample", "volume": str(SAMPLE_VOLUME), "reference": str(SAMPLE_LABELS)})
    image, moved = volume.as_tensor(), torch.from_numpy(labels.astype(np.int64))
    spacing = spacing_from_affine(volume.affine)
    with _torch_threads(1):
        for step, (family, severity) in enumerate(HELDOUT_RECIPE):
            image, moved = corrupt_with_labels(family, image, moved, severity, HELDOUT_SEED + 10 * index + step,
                                               spacing)
    array = np.ascontiguousarray(image[0, 0].numpy().astype(np.float32))
    return dataclasses.replace(volume, name="heldout-{}".format(index), array=array), moved.numpy().astype(np.int64)


def write_heldout_cases(folder, count):
    """Write held-out variants 1..count of the sample as NIfTI pairs (``heldout-N.nii.gz``, ``heldout-N_seg``)."""
    from ..scene.results import write_volume_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(1, count + 1):
        volume, labels = heldout_volume(index)
        write_volume_file(volume.array, volume, folder / "heldout-{}.nii.gz".format(index))
        write_volume_file(labels, volume, folder / "heldout-{}_seg.nii.gz".format(index), label_map=True)


def hash_files(files, extra=""):
    digest = hashlib.sha256(extra.encode())
    for path in files:
        digest.update(Path(path).name.encode())
        with open(str(path), "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
