"""Shared fixtures: real MRML scenes from slicer-core and the embedded sample."""
import pytest
import vtk

from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME
from MedAdvRobustnessLib.scene import SlicerScene

vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())


@pytest.fixture
def slicer_scene():
    """A new standalone scene bound to real vtkSlicer*Logic objects."""
    return SlicerScene.standalone()


@pytest.fixture
def sample_nodes(slicer_scene):
    """The embedded sample volume and its tissue label map, loaded with Slicer's reader."""
    volume = slicer_scene.load_volume(SAMPLE_VOLUME)
    labels = slicer_scene.load_volume(SAMPLE_LABELS, label_map=True)
    return volume, labels
