"""Long work in a child Python process, polled from the application's main thread.

Inside Slicer the main thread holds Python's GIL while Qt's event loop runs (PythonQt is built without thread
support), so a Python worker *thread* would only advance while the main thread runs Python. A child process runs
at full speed, leaves Slicer responsive, and a crash in native code cannot take the application down. This is how
Slicer's model-running extensions (MONAIAuto3DSeg, TotalSegmentator) run their networks too.

The job is a picklable callable taking ``progress(fraction, message)`` and ``is_cancelled()``. It travels to the
child, and its result or error travels back, as pickles in a private temporary folder that only this process
writes: they are our own objects, never a user's file.
"""
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

JOB, RESULT, ERROR, PROGRESS, CANCEL, LOG = "job.pickle", "result.pickle", "error.pickle", "progress.json", \
    "cancel", "log.txt"
LIBRARY_PARENT = Path(__file__).resolve().parent.parent


class ProcessRun:
    """``job`` computed in a child process: :meth:`start`, poll :attr:`progress` and :attr:`done`, :meth:`cancel`
    (the job stops at its next check), then :meth:`outcome` once done."""

    def __init__(self, job):
        self._folder = Path(tempfile.mkdtemp(prefix="medadv-run-"))
        with open(str(self._folder / JOB), "wb") as stream:
            pickle.dump(job, stream, protocol=pickle.HIGHEST_PROTOCOL)
        self._process = None
        self._progress = (0.0, "starting")

    def start(self):
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(LIBRARY_PARENT)] + [path for path in [environment.get("PYTHONPATH")] if path])
        with open(str(self._folder / LOG), "wb") as log:
            self._process = subprocess.Popen([sys.executable, "-m", "MedAdvRobustnessLib.worker", str(self._folder)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             env=environment, **_hidden_console())
        return self

    def cancel(self):
        (self._folder / CANCEL).touch()

    @property
    def cancelled(self):
        return (self._folder / CANCEL).exists()

    @property
    def pid(self):
        """The child's process ID (None before :meth:`start`)."""
        return self._process.pid if self._process is not None else None

    @property
    def done(self):
        return self._process is not None and self._process.poll() is not None

    @property
    def progress(self):
        """(fraction 0..1, message) last reported by the job."""
        try:
            with open(str(self._folder / PROGRESS)) as stream:
                fraction, message = json.load(stream)
            self._progress = (float(fraction), str(message))
        except (OSError, ValueError):
            pass
        return self._progress

    def wait(self, timeout=None):
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.done

    def outcome(self):
        """Once done: the job's result; raises the job's error (AttackCancelled when cancelled). The temporary
        folder is removed either way."""
        try:
            log = (self._folder / LOG).read_text(errors="replace")
            for line in log.splitlines():
                logging.info("MedAdvRobustness worker: %s", line)
            if (self._folder / RESULT).exists():
                return _load(self._folder / RESULT)
            if (self._folder / ERROR).exists():
                raise _load(self._folder / ERROR)
            raise RuntimeError("the worker process ended with status {} before finishing; its last output:\n{}".format(
                self._process.returncode, "\n".join(log.splitlines()[-20:])))
        finally:
            shutil.rmtree(str(self._folder), ignore_errors=True)


def _hidden_console():
    """Popen arguments that keep Windows from opening a console window for the child (as Slicer's own
    ``launchConsoleProcess`` does)."""
    if os.name != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags, info.wShowWindow = subprocess.STARTF_USESHOWWINDOW, 0  # SW_HIDE
    return {"startupinfo": info}


def _load(path):
    with open(str(path), "rb") as stream:
        return pickle.load(stream)


def _dump_atomically(value, path, write):
    temporary = path.with_name(path.name + ".partial")
    with open(str(temporary), "w" if write is json.dump else "wb") as stream:
        write(value, stream)
    os.replace(str(temporary), str(path))


def _picklable(error):
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError("".join(traceback.format_exception_only(type(error), error)).strip())


def main(folder):
    """In the child: run the job of ``folder``, leaving its result or error there."""
    folder = Path(folder)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parent = os.getppid()

    def progress(fraction, message):
        _dump_atomically([float(fraction), str(message)], folder / PROGRESS, json.dump)

    def is_cancelled():  # asked by the user, or the application is gone
        return (folder / CANCEL).exists() or os.getppid() != parent

    job = _load(folder / JOB)
    (folder / JOB).unlink()  # the inputs can be large: not kept once read
    try:
        _dump_atomically(job(progress=progress, is_cancelled=is_cancelled), folder / RESULT, pickle.dump)
    except BaseException as error:
        traceback.print_exc()
        _dump_atomically(_picklable(error), folder / ERROR, pickle.dump)
    if os.getppid() != parent:  # nobody will collect the outcome
        shutil.rmtree(str(folder), ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
