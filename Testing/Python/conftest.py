"""Shared fixtures: real MRML scenes from slicer-core and the embedded sample; the test process's exit."""
import os
import sys

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


_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's status once everything is reported, without interpreter finalization.

    Once in about six full runs here, the interpreter crashed (SIGSEGV) while freeing what the suite left behind
    (VTK render windows and scenes of the in-process viewer apps, torch and OpenMP state of worker threads) after
    every test had passed and the summary was printed; the cause is not found. The commands themselves are tested
    in subprocesses whose exit status the tests check, so this skips nothing that is tested.
    """
    if "status" in _EXIT and not os.environ.get("MEDADV_TEST_FINALIZE"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
