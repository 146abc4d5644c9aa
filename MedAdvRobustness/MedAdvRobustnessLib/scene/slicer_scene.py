"""An MRML scene with Slicer's module logics: the application's inside 3D Slicer, real ones bound here outside it."""
import shutil
import tempfile
import zipfile
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
        _refuse_multi_frame(path)
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


def _refuse_multi_frame(path):
    """Slicer's reader keeps only the first frame of a 4D NIfTI: refuse it rather than lose data silently."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        import nibabel
    except ImportError:
        return
    shape = nibabel.load(str(path)).shape
    if len(shape) > 3 and any(size > 1 for size in shape[3:]):
        raise InputError("{} has {} volumes or components per voxel (shape {}); give a single scalar volume".format(
            path, int(np.prod(shape[3:])), shape))


def _stem(path):
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
