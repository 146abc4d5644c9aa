"""Cells: one (network, case, probe, strength) each, keyed by everything that determines its result, computed by
the sweep in any process (a local worker, a Dask worker or this one)."""
import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..evaluation.records import ClassificationResult
from ..evaluation.sweep import network_task, run_sweep
from ..networks.models import TRUST_HINT, load_model, network_input_error
from ..probes.attacks import AttackCancelled
from .cases import case_file_matrix, check_one_task, heldout_slice_volume, heldout_volume, is_class_case, load_case
from .definition import LOAD_OPTIONS, study_probe
from .fragility import cell_arrays
from .outputs import versions


def study_cells(resolved, device="cpu"):
    """Every cell of a resolved study as a plain (picklable, JSON-able) task dictionary, in a fixed order; the
    networks run on ``device``. A study mixing classifier cases (images with a class) and segmentation cases is
    refused."""
    check_one_task(resolved["cases"])
    cells = []
    for network in resolved["networks"]:
        for case in resolved["cases"]:
            for probe in resolved["probes"]:
                for strength in probe["strengths"]:
                    task = {"network": network, "case": case, "probe": {k: v for k, v in probe.items()
                                                                        if k != "strengths"},
                            "strength": strength, "threads": resolved["threads"], "device": str(device)}
                    task["key"] = cell_key(task)
                    cells.append(task)
    return cells


def cell_key(task):
    """File name of a cell: readable names and a hash of everything that determines its result."""
    spec = {"network": task["network"], "case": task["case"], "probe": task["probe"],
            "settings": probe_settings(task["probe"]), "strength": task["strength"]}
    if task.get("device", "cpu") != "cpu":  # another device's arithmetic: not the CPU's cells (whose keys stay)
        spec["device"] = task["device"]
    spec = json.dumps(spec, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    text = "{}__{}__{}__{:g}__{}".format(task["network"]["name"], task["case"]["name"], task["probe"]["name"],
                                         task["strength"], digest)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def probe_settings(probe):
    """Every parameter the probe is made with, defaults included: a cell stored before a default changed is not
    reused."""
    made = study_probe(probe)
    return {item.name: getattr(made, item.name) for item in dataclasses.fields(made)}


@contextmanager
def cells_folder(out_dir):
    """``OUT/cells``, made with the folders above it that are missing; if the block fails, those it made are
    removed again where still empty (a failed first cell leaves no empty ``OUT/cells``; stored cells are kept)."""
    cells = Path(out_dir) / "cells"
    created = [folder for folder in [cells] + list(cells.parents) if not folder.exists()]
    cells.mkdir(parents=True, exist_ok=True)
    try:
        yield cells
    except BaseException:
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


BENCH_TRUST_HINT = ("load it only if you trust where it comes from, with \"trust_checkpoint\": true in the "
                    "study file's entry of network {} ({{\"name\": ..., \"source\": ..., \"trust_checkpoint\": "
                    "true}})")
_CACHE = threading.local()  # per thread (a Dask worker runs cells in threads): on_grid changes a model
_THREADS = {"lock": threading.Lock(), "cells": 0, "before": None}


def compute_cell(task, is_cancelled=None):
    """Run one cell (in any process or thread: local worker, Dask worker, or this one) and return its record, with
    ``arrays``: what the fragility needs of its predictions (:func:`~.fragility.cell_arrays`).
    ``is_cancelled()`` (this process only) stops it at its next iteration with AttackCancelled; any other error
    says which cell failed."""
    from ..pipeline import use_file_matrix
    start = time.time()
    try:
        with _torch_threads(max(1, int(task.get("threads", 1)))):  # the same arithmetic in every worker
            model = _cached_model(task["network"], task.get("device", "cpu"))
            volume, reference = _cached_case(task["case"])
            use_file_matrix(model, case_file_matrix(task["case"]))  # the case's file, as medadv run reads it
            with model.on_grid(volume):
                _check_network_kind(model, volume, task)
                result = run_sweep(model, volume, study_probe(task["probe"]), [task["strength"]], reference,
                                   is_cancelled=is_cancelled)
            _check_result_kind(result, task)
    except AttackCancelled:
        raise
    except Exception as error:
        raise _cell_error(task, error) from error
    if isinstance(result, ClassificationResult):
        rows, arrays = [_class_row(task, row, result.strength_name) for row in result.rows], class_arrays(result)
    else:
        rows = [_table_row(task, row, result.strength_name, result.against) for row in result.rows]
        arrays = cell_arrays(result)
    return {"key": task["key"], "task": task, "rows": rows, "seconds": round(time.time() - start, 3),
            "host": socket.gethostname(), "pid": os.getpid(), "versions": versions(),
            "arrays": arrays}  # stored beside the record by the study, not in it


def _check_network_kind(model, volume, task):
    """Refuse a segmentation network given a classifier's case (an image and its class): its one forward pass on
    the image says what it is."""
    if not is_class_case(task["case"]):
        return
    with torch.no_grad():
        kind = network_task(model, model(volume.as_tensor()))
    if kind != "classification":
        raise InputError("network {} is a segmentation network but the case is an image with a class (for "
                         "classifiers); compare segmenters on volumes in a study of their own".format(
                             task["network"]["name"]))


def _check_result_kind(result, task):
    """Refuse a classifier's result on a segmentation case (a volume without a class)."""
    if isinstance(result, ClassificationResult) and not is_class_case(task["case"]):
        raise InputError("network {} is a classifier: give its cases as images with their class "
                         "(heldout-slices:N, or {{\"volume\": ..., \"class\": K}})".format(task["network"]["name"]))


def class_arrays(result):
    """What a classifier's cell stores beside its record (as :func:`~.fragility.cell_arrays` for a segmenter): whether
    the attacked prediction differs from the clean one, the clean class and the entropy of the clean
    probabilities (nats)."""
    probabilities = result.clean.probabilities.astype("float64")
    entropy = -sum(float(p) * math.log(p) for p in probabilities if p > 0)
    changed = result.outcomes[1].prediction != result.clean.prediction
    return {"changed": np.packbits(np.array([bool(changed)])), "clean": np.array([result.clean.prediction],
                                                                                 dtype=np.int16),
            "entropy": np.array([entropy], dtype=np.float32)}


def _class_row(task, row, strength_name):
    """A classifier's row of the results table: the true class as ``label``, whether the prediction is
    ``correct``, and the sweep's columns."""
    out = {"network": task["network"]["name"], "case": task["case"]["name"], "probe": task["probe"]["name"],
           "kind": task["probe"]["kind"], "strength": row[strength_name], "label": row["label"],
           "task": "classification", "correct": row["predicted"] == row["label"]}
    out.update({key: value for key, value in row.items() if key not in ("model", "attack", strength_name, "label")})
    return out


@contextmanager
def _torch_threads(wanted):
    """torch's thread count (one per process) at ``wanted`` while cells run, restored after the last one."""
    with _THREADS["lock"]:
        if _THREADS["cells"] == 0:
            _THREADS["before"] = torch.get_num_threads()
        _THREADS["cells"] += 1
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
    try:
        yield
    finally:
        with _THREADS["lock"]:
            _THREADS["cells"] -= 1
            if _THREADS["cells"] == 0 and torch.get_num_threads() != _THREADS["before"]:
                torch.set_num_threads(_THREADS["before"])


def _cell_error(task, error):
    """``error`` with the cell it stopped in front of its message (an InputError stays one, and says how a study
    trusts a checkpoint; a network that does not fit the case's channels becomes one)."""
    model = _cache("models").get(_model_key(task["network"]) + (task.get("device", "cpu"),))
    if isinstance(error, RuntimeError) and model is not None:
        error = network_input_error(model, error) or error
    if is_out_of_memory(error):
        error = InputError("the GPU ran out of memory ({}); run on the CPU (--device cpu) or give the network a "
                           "smaller window (roi_size)".format(" ".join(str(error).split())[:160]))
    text = str(error) if isinstance(error, InputError) else _one_line_reason(error)
    text = text.replace(TRUST_HINT, BENCH_TRUST_HINT.format(task["network"]["name"]))
    message = "cell failed (network {}, case {}, probe {}, strength {:g}): {}".format(
        task["network"]["name"], task["case"]["name"], task["probe"]["name"], task["strength"], text)
    return (InputError if isinstance(error, InputError) else RuntimeError)(message)


def _one_line_reason(error):
    """An error's reason on one line: TorchScript's last line (the error raised inside), else type and first line."""
    lines = str(error).strip().splitlines() or [""]
    if isinstance(error, torch.jit.Error):
        return lines[-1][:300]
    return "{}: {}".format(type(error).__name__, lines[0])[:300]


def is_out_of_memory(error):
    """Whether ``error`` is torch's GPU out-of-memory error."""
    return type(error).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(error)


def _table_row(task, row, strength_name, against):
    out = {"network": task["network"]["name"], "case": task["case"]["name"], "probe": task["probe"]["name"],
           "kind": task["probe"]["kind"], "strength": row[strength_name], "label": row["label"],
           "dice": row["dice_" + against], "against": against}
    out.update({key: value for key, value in row.items() if key not in ("model", "probe", strength_name, "label")})
    return out


def _cache(name):
    """This thread's cache ``name`` (a dictionary)."""
    if not hasattr(_CACHE, name):
        setattr(_CACHE, name, {})
    return getattr(_CACHE, name)


def _cached_model(network, device="cpu"):
    models, key = _cache("models"), _model_key(network) + (device,)
    if key not in models:
        models.clear()
        options = {key: network.get(key, default) for key, default in LOAD_OPTIONS.items()}
        if options["folds"] is not None:
            options["folds"] = [str(fold) for fold in options["folds"]]
        models[key] = load_model(network["source"], device=device, **options)
    return models[key]


def _model_key(network):
    return (network["source"], network["hash"]) + tuple(json.dumps(network.get(key, default))
                                                        for key, default in LOAD_OPTIONS.items())


def _cached_case(case):
    cases, key = _cache("cases"), json.dumps(case, sort_keys=True)
    if key not in cases:
        if len(cases) > 8:
            cases.clear()
        cases[key] = _load_case(case)
    return cases[key]


def _load_case(case):
    """(volume, reference) of a case: the reference is a label map, or a classifier case's class."""
    if "slice" in case:
        return heldout_slice_volume(case), case["class"]
    if case.get("heldout"):
        return heldout_volume(case["heldout"])
    volume, reference = load_case(case)
    return (volume, case["class"]) if is_class_case(case) else (volume, reference)
