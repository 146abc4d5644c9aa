"""Long work in a child Python process, polled from the application's main thread.

Inside Slicer the main thread holds Python's GIL while Qt's event loop runs (PythonQt is built without thread
support), so a Python worker *thread* would only advance while the main thread runs Python. A child process runs
at full speed, leaves Slicer responsive, and a crash in native code cannot take the application down. This is how
Slicer's model-running extensions (MONAIAuto3DSeg, TotalSegmentator) run their networks too.

The job is a picklable callable taking ``progress(fraction, message)`` and ``is_cancelled()``. It travels to the
child, and its result or error travels back, as pickles in a private temporary folder that only this process
writes: they are our own objects, never a user's file.

Inside Slicer the child is started with ``PythonSlicer`` (next to the application's executable, else on PATH),
elsewhere with this interpreter. ``PythonSlicer`` is a launcher that runs the interpreter as its own child, and a
job may start processes too: the child gets a process group of its own (a new process group on Windows), and a
cancel that the job has not honoured within :data:`CANCEL_GRACE_SECONDS` (a long forward pass checks only between
iterations) ends that whole tree.
"""
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ..processes import is_alive

JOB, RESULT, ERROR, PROGRESS, CANCEL, ABANDONED, LOG = ("job.pickle", "result.pickle", "error.pickle",
                                                         "progress.json", "cancel", "abandoned", "log.txt")
LIBRARY_PARENT = Path(__file__).resolve().parents[2]
CANCEL_GRACE_SECONDS = 10.0  # a cancelled job still running after this long is ended, with every process it started
ABANDON_WAIT_SECONDS = 3.0  # the application quits: how long it waits for an abandoned job to stop by itself
PYTHON_SLICER = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"


def python_executable():
    """The interpreter for the worker: inside Slicer ``PythonSlicer`` next to the application's executable or on
    PATH (Slicer's launcher puts its ``bin`` folder there), then ``sys.executable`` (in Slicer: the PythonSlicer
    found at startup). Raises FileNotFoundError, naming what was looked for, when none exists."""
    candidates = []
    try:
        import slicer
        application_folder = slicer.app.applicationDirPath()
    except (ImportError, AttributeError):  # not inside the Slicer application (slicer-core, plain Python)
        application_folder = None
    if application_folder:
        candidates += [os.path.join(application_folder, PYTHON_SLICER), shutil.which("PythonSlicer")]
    candidates.append(sys.executable)
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    looked = ("{} in {} or on PATH, nor ".format(PYTHON_SLICER, application_folder) if application_folder else "")
    raise FileNotFoundError("cannot start the worker process: found neither {}this Python interpreter ({}); "
                            "reinstall Slicer or start it with its own launcher".format(
                                looked, sys.executable or "sys.executable is empty"))


class ProcessRun:
    """``job`` computed in a child process: :meth:`start`, poll :attr:`progress` and :attr:`done`, :meth:`cancel`
    (the job stops at its next check), then :meth:`outcome` once done (or :meth:`abandon` it)."""

    def __init__(self, job):
        self._folder = Path(tempfile.mkdtemp(prefix="medadv-run-"))
        self._process, self._progress, self._cancelled, self._collected = None, (0.0, "starting"), False, False
        self._cancelled_at = None
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
        try:
            command = [python_executable(), "-m", "MedAdvRobustnessLib.module.worker", str(self._folder),
                       str(os.getpid())]
            with open(str(self._folder / LOG), "wb") as log:
                # cwd: a stray module in the application's working directory must not shadow a package
                self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, env=environment, cwd=str(self._folder),
                                                 **_own_process_group(), **_hidden_console())
        except BaseException:
            self._remove_folder()
            raise
        return self

    def cancel(self):
        """Ask the job to stop at its next check; :attr:`cancelled` is true from now on, finished or not. A job
        still running :data:`CANCEL_GRACE_SECONDS` later is ended with its process tree (see :attr:`done`)."""
        if not self._cancelled:
            self._cancelled, self._cancelled_at = True, time.monotonic()
        self._mark(CANCEL)

    def abandon(self):
        """Cancel for good: nobody will call :meth:`outcome` (the application quits). Waits
        :data:`ABANDON_WAIT_SECONDS` for the job to stop, ends its process tree if it has not, and removes the
        folder (the child removes it itself if it outlives this process)."""
        self._mark(ABANDONED)
        self.cancel()
        if self._process is None:
            self._remove_folder()
            return
        self.wait(ABANDON_WAIT_SECONDS)
        if not self.done:
            self._end_tree()
        if self.done and not self._collected:
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
        """Whether the child has ended. Polling this (the widget's timer does) also ends a cancelled child that
        outlived the grace period, with every process it started."""
        if self._process is None:
            return False
        if self._process.poll() is None and self._cancelled and \
                time.monotonic() - self._cancelled_at > CANCEL_GRACE_SECONDS:
            self._end_tree()
        return self._process.poll() is not None

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
        """Wait for the child to end, at most ``timeout`` seconds (None: as long as it takes; a cancelled child
        ends at the latest after the grace period). Returns :attr:`done`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            step = 0.1 if self._cancelled else remaining  # cancelled: come back to enforce the grace period
            if remaining is not None:
                step = min(step, remaining)
            try:
                self._process.wait(step)
            except subprocess.TimeoutExpired:
                pass
        return self.done

    def _end_tree(self):
        """End the child and every process it started: its process group (POSIX), ``taskkill /T`` (Windows)."""
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_hidden_console())
        else:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except OSError:  # already gone
                pass
        try:
            self._process.kill()
        except OSError:
            pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            logging.warning("MedAdvRobustness: worker process %s did not end", self._process.pid)

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
        _remove_tree(self._folder)


def _remove_tree(folder, attempts=20):
    """Remove ``folder``; on Windows a file that a process just closed can refuse for a moment: try again."""
    for _ in range(attempts):
        shutil.rmtree(str(folder), ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.1)


def _last_lines(log, count=20):
    return "its last output:\n" + "\n".join(log.splitlines()[-count:])


def _loaded_error(path, log):
    """The job's error as pickled by the child, or a RuntimeError if it cannot be loaded here."""
    try:
        return _load(path)
    except Exception as error:
        return RuntimeError("the worker failed and its error cannot be read here ({}); {}".format(error,
                                                                                                _last_lines(log)))


def _own_process_group():
    """Popen arguments that give the child a process group of its own, so that its whole tree can be ended."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


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
        _release_log()
        _remove_tree(folder)


def _release_log():
    """Point stdout and stderr (the folder's log file) at the null device: Windows removes no open file."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    for descriptor in (1, 2):
        os.dup2(null, descriptor)
    os.close(null)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # The outcome is on disk: skip interpreter finalization, where VTK and torch occasionally crash (a crash
    # report on macOS or Windows would alarm the user for nothing).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
