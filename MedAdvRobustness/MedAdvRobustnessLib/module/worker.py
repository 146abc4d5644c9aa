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

from ..processes import is_alive

JOB, RESULT, ERROR, PROGRESS, CANCEL, ABANDONED, LOG = ("job.pickle", "result.pickle", "error.pickle",
                                                         "progress.json", "cancel", "abandoned", "log.txt")
LIBRARY_PARENT = Path(__file__).resolve().parents[2]


class ProcessRun:
    """``job`` computed in a child process: :meth:`start`, poll :attr:`progress` and :attr:`done`, :meth:`cancel`
    (the job stops at its next check), then :meth:`outcome` once done (or :meth:`abandon` it)."""

    def __init__(self, job):
        self._folder = Path(tempfile.mkdtemp(prefix="medadv-run-"))
        self._process, self._progress, self._cancelled, self._collected = None, (0.0, "starting"), False, False
        try:
            with open(str(self._folder / JOB), "wb") as stream:
                pickle.dump(job, stream, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            self._remove_folder()
            raise

    def start(self):
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(LIBRARY_PARENT)] + [path for path in [environment.get("PYTHONPATH")] if path])
        command = [sys.executable, "-m", "MedAdvRobustnessLib.module.worker", str(self._folder), str(os.getpid())]
        try:
            with open(str(self._folder / LOG), "wb") as log:
                # cwd: a stray module in the application's working directory must not shadow a package
                self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, env=environment, cwd=str(self._folder),
                                                 **_hidden_console())
        except BaseException:
            self._remove_folder()
            raise
        return self

    def cancel(self):
        """Ask the job to stop at its next check; :attr:`cancelled` is true from now on, finished or not."""
        self._cancelled = True
        self._mark(CANCEL)

    def abandon(self):
        """Cancel, and let the child remove the folder: nobody will call :meth:`outcome` (the application quits)."""
        self._mark(ABANDONED)
        self.cancel()
        if self.done:
            self.outcome_or_none()

    @property
    def cancelled(self):
        return self._cancelled

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
        """Once done, once: the job's result, or raises the job's error. The temporary folder is removed."""
        if self._collected:
            raise RuntimeError("the outcome of this run was already collected")
        self._collected = True
        try:
            log = (self._folder / LOG).read_text(errors="replace")
            for line in log.splitlines():
                logging.info("MedAdvRobustness worker: %s", line)
            if (self._folder / RESULT).exists():
                return _load(self._folder / RESULT)
            if (self._folder / ERROR).exists():
                raise _loaded_error(self._folder / ERROR, log)
            raise RuntimeError("the worker process ended with status {} before finishing; {}".format(
                self._process.returncode, _last_lines(log)))
        finally:
            self._remove_folder()

    def outcome_or_none(self):
        """:meth:`outcome` for cleaning up: its error is ignored."""
        try:
            return self.outcome()
        except Exception:
            return None

    def _mark(self, name):
        """Leave the file ``name`` for the child (unless the folder is gone: then nobody reads it)."""
        try:
            (self._folder / name).touch()
        except OSError:
            pass

    def _remove_folder(self):
        shutil.rmtree(str(self._folder), ignore_errors=True)


def _last_lines(log, count=20):
    return "its last output:\n" + "\n".join(log.splitlines()[-count:])


def _loaded_error(path, log):
    """The job's error as pickled by the child, or a RuntimeError if it cannot be loaded here."""
    try:
        return _load(path)
    except Exception as error:
        return RuntimeError("the worker failed and its error cannot be read here ({}); {}".format(error,
                                                                                                _last_lines(log)))


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
    """``error`` if it travels (an Exception that pickles), else a RuntimeError with its text."""
    if isinstance(error, Exception):
        try:
            return pickle.loads(pickle.dumps(error))
        except Exception:
            pass
    return RuntimeError("".join(traceback.format_exception_only(type(error), error)).strip())


def main(folder, application):
    """In the child: run the job of ``folder`` for process ``application``, leaving its result or error there."""
    folder, application = Path(folder), int(application)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    def progress(fraction, message):
        try:
            _dump_atomically([float(fraction), str(message)], folder / PROGRESS, json.dump)
        except OSError:  # Windows refuses to replace a file the application is reading: skip this update
            pass

    def is_cancelled():  # asked by the user, or the application is gone
        return (folder / CANCEL).exists() or not is_alive(application)

    job = _load(folder / JOB)
    (folder / JOB).unlink()  # the inputs can be large: not kept once read
    try:
        _dump_atomically(job(progress=progress, is_cancelled=is_cancelled), folder / RESULT, pickle.dump)
    except BaseException as error:
        traceback.print_exc()
        _dump_atomically(_picklable(error), folder / ERROR, pickle.dump)
    if (folder / ABANDONED).exists() or not is_alive(application):  # nobody will collect the outcome
        shutil.rmtree(str(folder), ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # The outcome is on disk: skip interpreter finalization, where VTK and torch occasionally crash (a crash
    # report on macOS or Windows would alarm the user for nothing).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
