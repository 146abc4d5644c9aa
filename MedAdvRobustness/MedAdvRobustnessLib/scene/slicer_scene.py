"""An MRML scene with Slicer's module logics: the application's inside 3D Slicer, real ones bound here outside it."""
import gzip
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import slicer

from ..errors import InputError

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img", ".vtk", ".mgz")



def in_slicer_application():
    return hasattr(slicer, "app")


class SlicerScene:
    """A scene with its volumes and segmentations logics."""

    def __init__(self, scene, volumes_logic, segmentations_logic, keep_alive=()):
        self.scene = scene
        self.volumes_logic = volumes_logic
        self.segmentations_logic = segmentations_logic
        self._keep_alive = keep_alive

    @classmethod
    def current(cls):
        """The application's scene inside 3D Slicer, otherwise a new standalone scene."""
        if in_slicer_application():
            return cls(slicer.mrmlScene, slicer.modules.volumes.logic(), slicer.modules.segmentations.logic())
        return cls.standalone()

    @classmethod
    def standalone(cls, scene=None):
        """A (new) scene bound to real vtkSlicer*Logic objects, as the application binds them."""
        scene = scene or slicer.vtkMRMLScene()
        application_logic = slicer.vtkSlicerApplicationLogic()
        application_logic.SetMRMLScene(scene)
        color_logic = application_logic.GetColorLogic()
        color_logic.SetMRMLScene(scene)
        color_logic.AddDefaultColorNodes()
        application_logic.SetModuleLogic("Colors", color_logic)
        logics = [_bind(logic, name, scene, application_logic) for name, logic in (
            ("Volumes", slicer.vtkSlicerVolumesLogic()),
            ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()))]
        return cls(scene, logics[0], logics[1], keep_alive=(application_logic, color_logic))

    def load_volume(self, path, name=None, label_map=False):
        """Read a volume file with Slicer's reader (NIfTI, NRRD, MetaImage, ...)."""
        path = Path(path)
        if not path.is_file():
            raise InputError("file not found: {}".format(path))
        check_nifti_file(path)
        name = name or _stem(path)
        node = self.volumes_logic.AddArchetypeVolume(str(path), name, 1 if label_map else 0)
        if node is None:
            raise InputError("Slicer's volume reader cannot read {}".format(path))
        return node

    def save_node(self, node, path):
        """Write a volume or segmentation node to a file (format from the suffix), geometry included."""
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(node):
            raise InputError("cannot write {} to {}".format(node.GetName(), path))

    def write_mrb(self, path):
        """Save the scene and all its data as a Medical Reality Bundle."""
        if not self.scene.WriteToMRB(str(Path(path).absolute())):
            raise InputError("cannot write scene bundle {}".format(path))

    @classmethod
    def read_mrb(cls, path):
        """A new standalone scene with the nodes and data of a ``.mrb`` file."""
        result = cls.standalone()
        extracted = tempfile.mkdtemp(prefix="medadv-mrb-")
        try:
            with zipfile.ZipFile(str(path)) as bundle:
                bundle.extractall(extracted)
            scene_files = sorted(Path(extracted).rglob("*.mrml"))
            if not scene_files:
                raise InputError("{} holds no .mrml scene".format(path))
            result.scene.SetURL(str(scene_files[0]))
            if not result.scene.Connect():
                raise InputError("cannot read the scene in {}".format(path))
        finally:
            shutil.rmtree(extracted, ignore_errors=True)
        return result


def _bind(logic, name, scene, application_logic):
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(application_logic)
    application_logic.SetModuleLogic(name, logic)
    return logic


def check_nifti_file(path):
    """Refuse a NIfTI file that Slicer's reader would read as something else: several volumes (it keeps the first),
    fewer voxel bytes than the header declares (it zero-fills them), NaN or infinite voxels (it turns them into 0),
    or more voxels than this machine's memory can hold. Nothing else is checked for other formats."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel
    try:
        image = nibabel.load(str(path))
    except Exception as error:
        raise InputError("{} is not a readable NIfTI image ({})".format(path, str(error).splitlines()[0]))
    shape, dtype = image.shape, image.get_data_dtype()
    if len(shape) > 3 and any(size > 1 for size in shape[3:]):
        raise InputError("{} has {} volumes or components per voxel (shape {}); give a single scalar volume".format(
            path, int(np.prod(shape[3:])), shape))
    voxels = int(np.prod(shape[:3], dtype=np.int64))
    declared = int(image.header.get_data_offset()) + voxels * dtype.itemsize
    stored = _stored_bytes(path, declared)
    if stored < declared:
        raise InputError("{} is truncated or damaged: it holds {:,} of the {:,} bytes its header declares for {} "
                         "voxels of {}".format(path, stored, declared, "x".join(str(n) for n in shape[:3]), dtype))
    _check_memory(path, shape, voxels)
    if np.issubdtype(dtype, np.floating) or image.header.get_slope_inter()[0] not in (None, 1.0):
        _check_finite(path, np.asanyarray(image.dataobj))


MEMORY_BYTES_PER_VOXEL = 64  # float32 copies of a volume during a run (scene, network input, attack state)


def _check_memory(path, shape, voxels):
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    need = voxels * MEMORY_BYTES_PER_VOXEL
    if need > available:
        raise InputError("{}: {} voxels need about {:.1f} GiB of memory for a run, and {:.1f} GiB are free".format(
            path, "x".join(str(n) for n in shape[:3]), need / 2 ** 30, available / 2 ** 30))


def _stored_bytes(path, wanted):
    """How many bytes the file holds (decompressed, for .gz), counting no further than ``wanted``."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size
    count = 0
    try:
        with gzip.open(str(path), "rb") as stream:
            while count < wanted:
                chunk = stream.read(min(1 << 24, wanted - count))
                if not chunk:
                    break
                count += len(chunk)
    except (EOFError, OSError, zlib.error):
        return count  # the compressed stream ends early or is corrupt: what came before it is all there is
    return count


def _check_finite(path, array):
    bad = ~np.isfinite(array)
    count = int(np.count_nonzero(bad))
    if count:
        first = tuple(int(v) for v in np.argwhere(bad)[0][:3])
        raise InputError("{} has {:,} NaN or infinite voxel(s), the first at (i, j, k) = {}; Slicer's reader would "
                         "read them as 0: replace them in the file".format(path, count, first))


def _stem(path):
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
