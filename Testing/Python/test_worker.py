"""Runs compute in a child process: it advances while the caller holds Python's GIL (as Slicer's main thread does
in Qt's event loop), errors come back with their type, a dead worker is reported, a cancelled job that does not stop
is ended with its whole process tree (behind a launcher, as PythonSlicer is), and nothing is left behind (cooperative
cancel: see test_module_logic).

Real MRML (slicer-core) on the embedded sample, the module's logic as the widget drives it.
"""
import ctypes
import functools
import ctypes.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from MedAdvRobustnessLib.module import logic as module_logic

from MedAdvRobustnessLib.module import worker
from MedAdvRobustnessLib.probes.attacks import AttackCancelled
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME

FGSM = '{"fgsm": {}}'
DEADLINE_SECONDS = 180


def hold_the_gil(seconds):
    """Sleep in C without releasing the GIL (ctypes.PyDLL keeps it), as PythonQt's main thread does."""
    libc = ctypes.PyDLL(ctypes.util.find_library("c"))
    libc.usleep(int(seconds * 1e6))


def run_folders():
    return set(Path(tempfile.gettempdir()).glob("medadv-run-*"))


@pytest.fixture
def sample(slicer_scene):
    module_logic.parameter_node(slicer_scene.scene)  # as the widget has it before Apply
    return slicer_scene, slicer_scene.load_volume(SAMPLE_VOLUME), slicer_scene.load_volume(SAMPLE_LABELS,
                                                                                             label_map=True)


def start_fgsm(slicer_scene, volume, labels, **changes):
    settings = module_logic.ProbeSettings(inputVolume=volume, referenceNode=labels, probe="fgsm",
                                          probeParameters=FGSM, epsilons="0.02", **changes)
    node = module_logic.parameter_node(slicer_scene.scene)
    module_logic.write_settings(node, settings)
    return module_logic.start_run(slicer_scene, node)


def test_a_run_finishes_while_the_caller_holds_the_gil(sample):
    """The caller runs Python only for a moment every half second, like the widget's timer; a worker thread would
    get the GIL only in those moments and crawl. The worker process finishes regardless."""
    slicer_scene, volume, labels = sample
    folders_before = run_folders()
    started = time.monotonic()
    run = start_fgsm(slicer_scene, volume, labels)
    while not run.done and time.monotonic() - started < DEADLINE_SECONDS:
        hold_the_gil(0.5)
    elapsed = time.monotonic() - started
    assert run.done, "the worker did not finish within {} s while the caller held the GIL".format(DEADLINE_SECONDS)
    nodes = run.finish()
    print("FGSM on the sample in a worker process, caller holding the GIL: {:.1f} s".format(elapsed))
    assert sorted(nodes["probed"]) == [0.02]
    assert run_folders() == folders_before, "the worker's temporary folder was left behind"


def test_an_error_in_the_worker_reaches_the_caller_with_its_type_and_adds_nothing(sample):
    slicer_scene, volume, labels = sample
    before = slicer_scene.scene.GetNumberOfNodes()
    run = start_fgsm(slicer_scene, volume, labels, networkKind="torchscript", networkPath=str(SAMPLE_VOLUME))
    run.wait(DEADLINE_SECONDS)
    with pytest.raises(InputError):
        run.finish()
    assert slicer_scene.scene.GetNumberOfNodes() == before


def test_a_worker_that_dies_is_reported_and_adds_nothing(sample):
    slicer_scene, volume, labels = sample
    before, folders_before = slicer_scene.scene.GetNumberOfNodes(), run_folders()
    run = start_fgsm(slicer_scene, volume, labels)
    os.kill(run._process.pid, signal.SIGKILL)
    run.wait(DEADLINE_SECONDS)
    with pytest.raises(RuntimeError, match="ended with status -9 before finishing"):
        run.finish()
    assert slicer_scene.scene.GetNumberOfNodes() == before
    assert run_folders() == folders_before


APPLICATION = """
import os, sys, time
from MedAdvRobustnessLib.module import logic as module_logic
from MedAdvRobustnessLib.module import worker
from MedAdvRobustnessLib.probes.attacks import AttackCancelled
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
scene = SlicerScene.standalone()
volume, labels = scene.load_volume(SAMPLE_VOLUME), scene.load_volume(SAMPLE_LABELS, label_map=True)
node = module_logic.parameter_node(scene.scene)
module_logic.write_settings(node, module_logic.ProbeSettings(inputVolume=volume, referenceNode=labels, probe="pgd",
                                                             probeParameters='{"pgd": {"steps": "500"}}'))
run = module_logic.start_run(scene, node)
while "step 1/" not in run.progress[1]:
    time.sleep(0.1)
print(run._process._folder, flush=True)
os._exit(0)  # the application is gone without finishing the run
"""


def test_a_worker_whose_application_is_gone_stops_and_removes_its_folder(tmp_path):
    script = tmp_path / "application.py"
    script.write_text(APPLICATION)
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=DEADLINE_SECONDS)
    assert completed.returncode == 0, completed.stderr
    folder = Path(completed.stdout.strip())
    deadline = time.monotonic() + DEADLINE_SECONDS
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists(), "the orphaned worker neither stopped nor removed {}".format(folder)


def test_a_cancel_that_comes_after_the_worker_finished_still_adds_nothing(sample):
    slicer_scene, volume, labels = sample
    before, folders_before = slicer_scene.scene.GetNumberOfNodes(), run_folders()
    run = start_fgsm(slicer_scene, volume, labels)
    assert run.wait(DEADLINE_SECONDS)
    run.cancel()  # e.g. the scene closed between the worker's end and the widget's next poll
    with pytest.raises(AttackCancelled):
        run.finish()
    assert slicer_scene.scene.GetNumberOfNodes() == before
    assert run_folders() == folders_before


def test_an_abandoned_run_removes_its_folder(sample):
    slicer_scene, volume, labels = sample
    folders_before = run_folders()
    run = start_fgsm(slicer_scene, volume, labels)
    run.abandon()  # the application quits: nobody will call finish()
    run.wait(DEADLINE_SECONDS)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while run_folders() != folders_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run_folders() == folders_before


def test_what_cannot_travel_or_start_leaves_nothing_and_collects_once(monkeypatch):
    folders_before = run_folders()
    with pytest.raises(Exception):
        worker.ProcessRun(lambda progress, is_cancelled: None)  # a lambda does not pickle
    monkeypatch.setattr(worker.sys, "executable", "/no/such/python")
    with pytest.raises(FileNotFoundError, match=r"cannot start the worker process: .*/no/such/python"):
        worker.ProcessRun(functools.partial(len, [])).start()
    monkeypatch.setattr(worker.sys, "executable", "")  # Slicer sets it to "" when no PythonSlicer is on PATH
    with pytest.raises(FileNotFoundError, match="sys.executable is empty"):
        worker.ProcessRun(functools.partial(len, [])).start()
    assert run_folders() == folders_before
    assert isinstance(worker._picklable(KeyboardInterrupt()), RuntimeError)  # never raised as such in the caller
    assert isinstance(worker._picklable(InputError("bad")), InputError)


def test_outcome_is_collected_once():
    run = worker.ProcessRun(functools.partial(sorted, [3, 1, 2], key=None)).start()
    assert run.wait(DEADLINE_SECONDS)
    with pytest.raises(TypeError):  # sorted() takes no progress/is_cancelled: the job's own error comes back
        run.outcome()
    with pytest.raises(RuntimeError, match="already collected"):
        run.outcome()


def test_outside_slicer_the_worker_runs_this_interpreter():
    assert worker.python_executable() == sys.executable


# A job that ignores cancel (as a long forward pass does until it ends) and starts a process of its own.
STUBBORN_JOB = """
import os, subprocess, sys, time


def ignore_cancel(pid_file, progress=None, is_cancelled=None):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pid_file + ".partial", "w") as stream:
        stream.write("{} {}".format(os.getpid(), child.pid))
    os.replace(pid_file + ".partial", pid_file)
    time.sleep(600)
"""
# Like PythonSlicer (a launcher that runs the real interpreter as its child, not by exec)
LAUNCHER = """#!/bin/sh
"{python}" "$@"
status=$?
exit $status
"""


def running(pid):
    """Whether process ``pid`` exists and is not a zombie (an orphan may wait for a reaper in a container)."""
    try:
        with open("/proc/{}/stat".format(pid)) as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture
def stubborn_job(tmp_path, monkeypatch):
    """(job, pid file): the job runs in the worker behind a launcher script; the pid file names the interpreter
    and the process the job started, once both run."""
    if not os.path.isdir("/proc"):
        pytest.skip("reads /proc to see which processes run")
    (tmp_path / "stubborn.py").write_text(STUBBORN_JOB)
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(LAUNCHER.format(python=sys.executable))
    launcher.chmod(0o755)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker adds the library in front
    monkeypatch.setattr(worker, "python_executable", lambda: str(launcher))
    import stubborn
    pid_file = tmp_path / "pids"
    return functools.partial(stubborn.ignore_cancel, str(pid_file)), pid_file


def started_processes(run, pid_file):
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), "the job did not start"
    interpreter, grandchild = (int(value) for value in pid_file.read_text().split())
    processes = [run.pid, interpreter, grandchild]
    assert interpreter != run.pid and all(running(pid) for pid in processes)
    return processes


def test_a_cancel_the_job_ignores_ends_the_whole_process_tree_after_the_grace_period(stubborn_job, monkeypatch):
    job, pid_file = stubborn_job
    monkeypatch.setattr(worker, "CANCEL_GRACE_SECONDS", 1.0)
    folders_before = run_folders()
    run = worker.ProcessRun(job).start()
    processes = started_processes(run, pid_file)
    run.cancel()
    cancelled = time.monotonic()
    time.sleep(0.5)
    assert not run.done, "ended before the grace period"
    while not run.done and time.monotonic() - cancelled < 30:  # the widget's timer polls done
        time.sleep(0.1)
    assert run.done
    assert time.monotonic() - cancelled >= worker.CANCEL_GRACE_SECONDS
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in processes if running(pid)] == [], "launcher, interpreter, the job's own process"
    assert run.outcome_or_none() is None
    assert run_folders() == folders_before


def test_abandoning_a_job_that_ignores_cancel_ends_its_tree_and_removes_its_folder(stubborn_job):
    job, pid_file = stubborn_job
    folders_before = run_folders()
    run = worker.ProcessRun(job).start()
    processes = started_processes(run, pid_file)
    started = time.monotonic()
    run.abandon()  # the application quits
    assert time.monotonic() - started < worker.ABANDON_WAIT_SECONDS + 10
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in processes if running(pid)] == []
    assert run_folders() == folders_before
