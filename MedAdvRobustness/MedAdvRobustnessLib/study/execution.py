"""Running a study: the missing cells in this process, in local worker processes or on a Dask cluster, each
stored atomically as it finishes; cancel between cells."""
import json
from pathlib import Path

from ..errors import InputError
from ..probes.attacks import AttackCancelled
from .cells import cells_folder, compute_cell, study_cells
from .definition import load_study, resolve_study
from .fragility import has_cell_arrays, store_cell_arrays
from .outputs import write_json_atomic, write_outputs


class StudyRun:
    """What :func:`run_study` did: the records of all cells, which it computed now and which it found stored, and
    the fragility per (network, probe) and the instability per network (see :func:`~.fragility.network_fragility`)."""

    def __init__(self, out_dir, records, computed, reused, fragility=None):
        self.out_dir, self.records, self.computed, self.reused = out_dir, records, computed, reused
        self.fragility = fragility or {}


def run_study(study, out_dir, workers=1, scheduler=None, progress=None, is_cancelled=None, device="cpu"):
    """Compute the missing cells of ``study`` (dictionary, or path of a JSON/YAML file) and write the outputs.

    ``workers``: local worker processes (1: in this process). ``scheduler``: address of a Dask distributed
    scheduler (``tcp://host:8786``) or a ``distributed.Client``; its workers need this package and, for file
    cases, the case files at the same paths. ``progress(done, total, record)`` after each stored cell.
    ``is_cancelled()`` true stops the study with AttackCancelled (the cells stored so far are kept). ``device``:
    where the networks run (``cuda``: cells keyed apart from the CPU's).
    """
    if not isinstance(study, dict):
        study = load_study(study)
    resolved = resolve_study(study)
    if int(workers) < 1:
        raise InputError("workers must be at least 1, got {}".format(workers))
    out_dir = Path(out_dir)
    check_study_folder(out_dir, resolved["cases"])
    with cells_folder(out_dir) as cells_dir:
        tasks = study_cells(resolved, device)
        stored = {task["key"]: _read_cell(cells_dir, task) for task in tasks}
        pending = [task for task in tasks if stored[task["key"]] is None]
        records = {key: record for key, record in stored.items() if record is not None}
        reused = sorted(records)
        computed = []

        def finished(record):
            # the arrays before the record: the record marks the cell done
            store_cell_arrays(cells_dir, record["task"], record.pop("arrays"))
            write_json_atomic(cells_dir / (record["key"] + ".json"), record)
            records[record["key"]] = record
            computed.append(record["key"])
            if progress:
                progress(len(records), len(tasks), record)
            if is_cancelled and is_cancelled():
                raise AttackCancelled()

        if scheduler is not None:
            _run_dask(pending, scheduler, finished)
        elif int(workers) > 1 and len(pending) > 1:
            _run_pool(pending, int(workers), finished)
        else:
            for task in pending:
                finished(compute_cell(task, is_cancelled))
        ordered = [records[task["key"]] for task in tasks]
        fragility = write_outputs(out_dir, resolved, ordered)
    return StudyRun(out_dir, ordered, computed, reused, fragility)


STUDY_MARKS = ("cells", "study.json")  # what a study's output folder holds: its cells (from the start), its record


def check_study_folder(out_dir, cases=()):
    """Refuse an output folder that is a file, or that holds files but none of a study's outputs
    (:data:`STUDY_MARKS`) nor the study's own case files: the study would write its tables, figures and report
    among (or over) the user's own files. A new or empty folder, or the folder of an earlier run (whose cells it
    reuses), is fine."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output folder {} is a file: the study needs a folder (a new or empty one, or the folder "
                         "of an earlier run of the study)".format(out_dir))
    if not out_dir.is_dir() or any((out_dir / mark).exists() for mark in STUDY_MARKS):
        return
    cases = _entries_holding_cases(out_dir, cases)
    others = sorted(path.name for path in out_dir.iterdir()
                    if path.name not in cases and not path.name.startswith("."))  # hidden: .DS_Store, ...
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise InputError("output folder {} holds files that are not a study's outputs ({}); the study would write "
                         "among them: give a new or empty folder, or the folder of an earlier run of the study (it "
                         "holds cells/ and study.json)".format(out_dir, shown))


def _entries_holding_cases(out_dir, cases):
    """The names in ``out_dir`` that are, or hold, a case file of the study (its cases may lie in its folder)."""
    folder, names = out_dir.resolve(), set()
    for case in cases:
        for path in (case.get("volume"), case.get("reference")):
            if path:
                try:
                    names.add(Path(path).resolve().relative_to(folder).parts[0])
                except ValueError:  # elsewhere
                    pass
    return names


def _run_pool(tasks, workers, finished):
    """Local worker processes (spawned: no forked torch state); cells are stored as they finish."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(compute_cell, task) for task in tasks]
        try:
            for future in as_completed(futures):
                finished(future.result())
        except BaseException:  # a failed cell, Ctrl-C, SIGTERM: the cells still running are not waited for
            for future in futures:
                future.cancel()
            _stop_workers(pool)
            raise


def _stop_workers(pool):
    """End the pool's worker processes now (the pool's own shutdown would wait for their running cells)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


def _run_dask(tasks, scheduler, finished):
    """The cells as Dask futures on the cluster at ``scheduler``; stored here as they finish."""
    try:
        from distributed import Client, as_completed
    except ImportError:  # an optional dependency: the dask extra
        raise InputError('--scheduler needs Dask distributed: pip install "medadvrobustness[dask]"')
    client = scheduler if isinstance(scheduler, Client) else Client(str(scheduler))
    try:
        futures = client.map(compute_cell, tasks, key=["medadv-cell-" + task["key"] for task in tasks], pure=False)
        try:
            for future in as_completed(futures):
                finished(future.result())
        except BaseException:
            client.cancel(futures)
            raise
    finally:
        if client is not scheduler:
            client.close()


def _read_cell(cells_dir, task):
    """The stored record of a cell, or None: not stored, unreadable, or stored without the arrays of its
    fragility (by an earlier version): computed again."""
    key = task["key"]
    path = cells_dir / (key + ".json")
    if not path.is_file() or not has_cell_arrays(cells_dir, task):
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None  # unreadable (should not happen: cells are written atomically): computed again
    return record if record.get("key") == key else None
