"""``medadv bench``: networks x cases x probes x strengths, resumable, on local workers or a Dask cluster.

A study (JSON or YAML file, or command-line lists) names the networks (built-in names or model folders), the cases
(volume files with optional reference label maps, folders of them, or held-out variants of the embedded sample)
and the probes (attacks at epsilons, corruptions at severities). Every (network, case, probe, strength) cell is
computed by :func:`compute_cell` with the runner and stored as one JSON file (written atomically) under
``cells/``: a study run again computes only the missing cells. The results table, the summary per network, the
figures and ``report.html`` are written from the stored cells; :func:`add_study_nodes` puts the summary and
the curves into an MRML scene as table and chart nodes.
"""
import base64
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InputError

STUDY_KEYS = ("networks", "cases", "probes", "seed", "threads")
CASE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
REFERENCE_MARKERS = ("_seg", "_label", "_labels", "-label", "_reference")
HELDOUT_PREFIX = "heldout:"
HELDOUT_RECIPE = (("elastic_deformation", 3), ("affine", 1), ("bias_field", 2))
HELDOUT_SEED = 1000
TABLE_KEYS = ("network", "case", "probe", "kind", "strength", "label")
SUMMARY_COLUMNS = ("network", "probe", "kind", "dice_against", "cases", "cases_without_reference", "clean_dice",
                   "clean_dice_sd", "strengths", "dice", "robustness_score", "robustness_score_sd",
                   "rood_degradation", "rood_degradation_sd", "rood_overall")


# ----------------------------------------------------------------------------------------------------- the study
def load_study(path):
    """The study dictionary of a JSON or YAML file."""
    path = Path(path)
    if not path.is_file():
        raise InputError("study file not found: {}".format(path))
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            study = yaml.safe_load(text)
        else:
            study = json.loads(text)
    except Exception as error:  # json's ValueError, yaml.YAMLError
        raise InputError("cannot read study {}: {}".format(path, error))
    if not isinstance(study, dict):
        raise InputError("study {} must be a mapping with networks, cases and probes".format(path))
    base = path.parent
    study = dict(study)
    study["cases"] = [_relative_to(item, base) for item in study.get("cases", [])]
    study["networks"] = _relative_networks(study.get("networks", []), base)
    return study


def _relative_to(item, base):
    """Relative file paths of a study are relative to the study file."""
    if isinstance(item, str) and not item.startswith(HELDOUT_PREFIX) and item != "sample":
        return str(base / item) if not Path(item).is_absolute() else item
    if isinstance(item, dict):
        return {key: (str(base / value) if key in ("volume", "reference") and value and not Path(value).is_absolute()
                      else value) for key, value in item.items()}
    return item


def _relative_networks(networks, base):
    from ..networks.models import BUILTIN_MODELS
    if isinstance(networks, dict):
        networks = [{"name": name, "source": source} for name, source in networks.items()]
    fixed = []
    for item in networks:
        source = item.get("source") if isinstance(item, dict) else item
        if not isinstance(source, str):
            fixed.append(item)  # refused by resolve_study with the other study errors
            continue
        if source not in BUILTIN_MODELS and not Path(source).is_absolute():
            source = str(base / source)
        fixed.append(dict(item, source=source) if isinstance(item, dict) else source)
    return fixed


def resolve_study(study):
    """Check a study dictionary and resolve it: networks with sources and hashes, cases, probes with strengths."""
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown:
        raise InputError("study: unknown key(s) {}; known keys: {}".format(", ".join(unknown), ", ".join(STUDY_KEYS)))
    seed = int(study.get("seed", 0))
    networks = [_network(item) for item in _non_empty(study, "networks")]
    cases = [case for item in _non_empty(study, "cases") for case in _cases(item)]
    probes = [_probe(item, seed) for item in _non_empty(study, "probes")]
    for kind, items in (("network", networks), ("case", cases), ("probe", probes)):
        names = [item["name"] for item in items]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InputError("study: {} name(s) {} given twice; name them apart".format(kind, ", ".join(repeated)))
    return {"networks": networks, "cases": cases, "probes": probes, "seed": seed,
            "threads": int(study.get("threads", 1))}


def _non_empty(study, key):
    items = study.get(key) or []
    if not isinstance(items, list) or not items:
        raise InputError("study: give a non-empty list of {}".format(key))
    return items


def _network(item):
    """``{"name", "source", "hash"}`` of a built-in name, a model folder or file (name: the folder's)."""
    from ..networks.models import BUILTIN_MODELS, DESCRIPTION_FILE, MODELS_DIR
    if isinstance(item, dict):
        name, source = item.get("name"), item.get("source")
    else:
        name, source = None, item
    if not source:
        raise InputError("study: a network needs a source (built-in name or model folder), got {!r}".format(item))
    source = str(source)
    if source in BUILTIN_MODELS:
        files = _model_files(MODELS_DIR / BUILTIN_MODELS[source] / DESCRIPTION_FILE)
    else:
        path = Path(source)
        if not path.exists():
            raise InputError("study: network not found: {} (built-in names: {})".format(
                source, ", ".join(sorted(BUILTIN_MODELS))))
        files = _model_files(path)
        source = str(path.resolve())
    return {"name": str(name or Path(source).name.replace(".json", "")), "source": source, "hash": _hash_files(files)}


def _model_files(path):
    """Every file that determines a network: a folder's files, a description and the weights it names."""
    from ..networks.models import DESCRIPTION_FILE
    if not path.is_dir():
        return [path, _weights_file(path)] if path.suffix == ".json" else [path]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if (path / DESCRIPTION_FILE).is_file():  # its weights may lie outside the folder
        weights = _weights_file(path / DESCRIPTION_FILE)
        files += [] if weights.resolve() in {p.resolve() for p in files} else [weights]
    return files


def _weights_file(description):
    """The weights file a ``model.json`` names (relative to it), as :func:`~.models.load_model` finds it."""
    from ..networks.models import ModelDescription
    weights = description.parent / ModelDescription.from_json(description).weights
    if not weights.is_file():
        raise InputError("study: weights not found: {} (named by {})".format(weights, description))
    return weights


def _cases(item):
    """Cases of one study entry: ``heldout:N``, ``sample``, a folder, a volume file, or ``{name, volume,
    reference}``."""
    if isinstance(item, dict):
        if not item.get("volume"):
            raise InputError("study: a case needs a volume, got {!r}".format(item))
        return [_file_case(item["volume"], item.get("reference"), item.get("name"))]
    item = str(item)
    if item.startswith(HELDOUT_PREFIX):
        try:
            count = int(item[len(HELDOUT_PREFIX):])
        except ValueError:
            count = 0
        if count < 1:
            raise InputError("study: {!r}: give heldout:N with N >= 1 held-out variants of the sample".format(item))
        return [heldout_case(index) for index in range(1, count + 1)]
    if item == "sample":
        from ..sample import SAMPLE_LABELS, SAMPLE_VOLUME
        return [_file_case(SAMPLE_VOLUME, SAMPLE_LABELS, "sample")]
    path = Path(item)
    if path.is_dir():
        return folder_cases(path)
    return [_file_case(path, None, None)]


def heldout_case(index):
    """Held-out variant ``index`` of the sample: a seeded elastic deformation, rotation and bias field it was never
    trained on (labels moved with the image); see :func:`heldout_volume`."""
    from ..sample import SAMPLE_LABELS, SAMPLE_VOLUME
    recipe = [list(step) for step in HELDOUT_RECIPE]
    return {"name": "heldout-{}".format(index), "heldout": index, "recipe": recipe,
            "hash": _hash_files([SAMPLE_VOLUME, SAMPLE_LABELS], extra=json.dumps([recipe, HELDOUT_SEED]))}


def folder_cases(folder):
    """Cases of a folder: each volume file, with the file of the same stem + ``_seg``/``_label``/``-label``/...
    as its reference label map."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and _case_stem(p) is not None)
    stems = {_case_stem(p): p for p in files}
    cases = []
    for stem, path in sorted(stems.items()):
        if any(stem.endswith(marker) for marker in REFERENCE_MARKERS):
            continue
        reference = next((stems[stem + marker] for marker in REFERENCE_MARKERS if stem + marker in stems), None)
        cases.append(_file_case(path, reference, stem))
    if not cases:
        raise InputError("no volume files ({}) in {}".format(", ".join(CASE_SUFFIXES), folder))
    return cases


def _case_stem(path):
    name = path.name
    for suffix in CASE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return None


def _file_case(volume, reference, name):
    volume = Path(volume)
    if not volume.is_file():
        raise InputError("study: case volume not found: {}".format(volume))
    if reference is not None and not Path(reference).is_file():
        raise InputError("study: reference not found: {}".format(reference))
    files = [volume] + ([Path(reference)] if reference is not None else [])
    return {"name": str(name or _case_stem(volume) or volume.stem), "volume": str(volume.resolve()),
            "reference": str(Path(reference).resolve()) if reference is not None else None,
            "hash": _hash_files(files)}


def _probe(item, seed):
    """``{"name", "kind", "probe", "params", "strengths"}`` of ``{"attack": ..., "epsilons": [...], "params": {}}``
    or ``{"corruption": ..., "severities": [...]}``."""
    if not isinstance(item, dict) or ("attack" in item) == ("corruption" in item):
        raise InputError("study: a probe is {{\"attack\": NAME, \"epsilons\": [...]}} or {{\"corruption\": NAME, "
                         "\"severities\": [...]}}, got {!r}".format(item))
    kind = "attack" if "attack" in item else "corruption"
    params = dict(item.get("params") or {})
    params.setdefault("seed", seed)
    strengths = item.get("epsilons" if kind == "attack" else "severities")
    if not strengths:
        raise InputError("study: probe {} needs {}".format(item[kind], "epsilons" if kind == "attack" else
                                                           "severities"))
    probe = {"kind": kind, "probe": str(item[kind]), "params": params}
    strengths = make_probe(probe).check_strengths(strengths)
    name = item.get("name") or probe["probe"]
    return dict(probe, name=str(name), strengths=[float(s) for s in strengths])


def make_probe(probe):
    """The attack or :class:`~.corruptions.CorruptionProbe` of a resolved probe."""
    if probe["kind"] == "attack":
        from ..probes.attacks import make_attack
        return make_attack(probe["probe"], **probe["params"])
    from ..probes.corruptions import CorruptionProbe
    params = dict(probe["params"])
    seed = int(params.pop("seed", 0))
    if params:
        raise InputError("corruption {} takes only a seed, got {}".format(probe["probe"], ", ".join(params)))
    return CorruptionProbe(probe["probe"], seed=seed)


def study_from_lists(networks, cases, attacks=(), epsilons=(), corruptions=(), severities=(), params=None, seed=0):
    """A study dictionary from command-line lists (every attack at every epsilon, every corruption at every
    severity)."""
    probes = [{"attack": name, "epsilons": list(epsilons), "params": dict(params or {})} for name in attacks]
    probes += [{"corruption": name, "severities": list(severities)} for name in corruptions]
    return {"networks": list(networks), "cases": list(cases), "probes": probes, "seed": seed}


# ------------------------------------------------------------------------------------------------------- cells
def study_cells(resolved):
    """Every cell of a resolved study as a plain (picklable, JSON-able) task dictionary, in a fixed order."""
    cells = []
    for network in resolved["networks"]:
        for case in resolved["cases"]:
            for probe in resolved["probes"]:
                for strength in probe["strengths"]:
                    task = {"network": network, "case": case, "probe": {k: v for k, v in probe.items()
                                                                        if k != "strengths"},
                            "strength": strength, "threads": resolved["threads"]}
                    task["key"] = cell_key(task)
                    cells.append(task)
    return cells


def cell_key(task):
    """File name of a cell: readable names and a hash of everything that determines its result."""
    spec = json.dumps({"network": task["network"], "case": task["case"], "probe": task["probe"],
                       "settings": probe_settings(task["probe"]), "strength": task["strength"]}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    text = "{}__{}__{}__{:g}__{}".format(task["network"]["name"], task["case"]["name"], task["probe"]["name"],
                                         task["strength"], digest)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def probe_settings(probe):
    """Every parameter the probe is made with, defaults included: a cell stored before a default changed is not
    reused."""
    made = make_probe(probe)
    return {item.name: getattr(made, item.name) for item in dataclasses.fields(made)}


_CACHE = threading.local()  # per thread (a Dask worker runs cells in threads): on_grid changes a model
_THREADS = {"lock": threading.Lock(), "cells": 0, "before": None}


def compute_cell(task, is_cancelled=None):
    """Run one cell (in any process or thread: local worker, Dask worker, or this one) and return its record.
    ``is_cancelled()`` (this process only) stops it at its next iteration with AttackCancelled; any other error
    says which cell failed."""
    from ..probes.attacks import AttackCancelled
    from ..evaluation.sweep import run_sweep
    start = time.time()
    try:
        with _torch_threads(max(1, int(task.get("threads", 1)))):  # the same arithmetic in every worker
            model = _cached_model(task["network"])
            volume, reference = _cached_case(task["case"])
            with model.on_grid(volume):
                result = run_sweep(model, volume, make_probe(task["probe"]), [task["strength"]], reference,
                                   is_cancelled=is_cancelled)
    except AttackCancelled:
        raise
    except Exception as error:
        raise _cell_error(task, error) from error
    rows = [_table_row(task, row, result.strength_name, result.against) for row in result.rows]
    return {"key": task["key"], "task": task, "rows": rows, "seconds": round(time.time() - start, 3),
            "host": socket.gethostname(), "pid": os.getpid(), "versions": versions()}


@contextmanager
def _torch_threads(wanted):
    """torch's thread count (one per process) at ``wanted`` while cells run, restored after the last one."""
    import torch
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
    """``error`` with the cell it stopped in front of its message (an InputError stays one)."""
    text = str(error) if isinstance(error, InputError) else "{}: {}".format(type(error).__name__, error)
    message = "cell failed (network {}, case {}, probe {}, strength {:g}): {}".format(
        task["network"]["name"], task["case"]["name"], task["probe"]["name"], task["strength"], text)
    return (InputError if isinstance(error, InputError) else RuntimeError)(message)


def _table_row(task, row, strength_name, against):
    out = {"network": task["network"]["name"], "case": task["case"]["name"], "probe": task["probe"]["name"],
           "kind": task["probe"]["kind"], "strength": row[strength_name], "label": row["label"],
           "dice": row["dice_" + against], "against": against}
    out.update({key: value for key, value in row.items() if key not in ("model", "attack", strength_name, "label")})
    return out


def _cache(name):
    """This thread's cache ``name`` (a dictionary)."""
    if not hasattr(_CACHE, name):
        setattr(_CACHE, name, {})
    return getattr(_CACHE, name)


def _cached_model(network):
    from ..networks.models import load_model
    models, key = _cache("models"), (network["source"], network["hash"])
    if key not in models:
        models.clear()
        models[key] = load_model(network["source"])
    return models[key]


def _cached_case(case):
    cases, key = _cache("cases"), json.dumps(case, sort_keys=True)
    if key not in cases:
        if len(cases) > 8:
            cases.clear()
        cases[key] = heldout_volume(case["heldout"]) if case.get("heldout") else _load_case(case)
    return cases[key]


def _load_case(case):
    from ..scene.nodes import labels_from_node, volume_from_node
    from ..scene.slicer_scene import SlicerScene
    scene = SlicerScene.standalone()
    volume = volume_from_node(scene.load_volume(case["volume"], name=case["name"]))
    reference = None
    if case.get("reference"):
        reference = labels_from_node(scene.load_volume(case["reference"], label_map=True), volume)
    return volume, reference


def heldout_volume(index):
    """The sample deformed elastically, rotated and given a bias field (:data:`HELDOUT_RECIPE`, seed
    ``HELDOUT_SEED + index``), its labels moved with it: a (Volume, labels) pair training never saw."""
    import torch
    from ..probes.corruptions import corrupt_with_labels, spacing_from_affine
    from ..sample import SAMPLE_LABELS, SAMPLE_VOLUME
    volume, labels = _load_case({"name": "sample", "volume": str(SAMPLE_VOLUME), "reference": str(SAMPLE_LABELS)})
    image, moved = volume.as_tensor(), torch.from_numpy(labels.astype(np.int64))
    spacing = spacing_from_affine(volume.affine)
    for step, (family, severity) in enumerate(HELDOUT_RECIPE):
        image, moved = corrupt_with_labels(family, image, moved, severity, HELDOUT_SEED + 10 * index + step, spacing)
    array = np.ascontiguousarray(image[0, 0].numpy().astype(np.float32))
    return dataclasses.replace(volume, name="heldout-{}".format(index), array=array), moved.numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------------------ running
class StudyRun:
    """What :func:`run_study` did: the records of all cells, which it computed now and which it found stored."""

    def __init__(self, out_dir, records, computed, reused):
        self.out_dir, self.records, self.computed, self.reused = out_dir, records, computed, reused


def run_study(study, out_dir, workers=1, scheduler=None, progress=None, is_cancelled=None):
    """Compute the missing cells of ``study`` (dictionary, or path of a JSON/YAML file) and write the outputs.

    ``workers``: local worker processes (1: in this process). ``scheduler``: address of a Dask distributed
    scheduler (``tcp://host:8786``) or a ``distributed.Client``; its workers need this package and, for file
    cases, the case files at the same paths. ``progress(done, total, record)`` after each stored cell.
    ``is_cancelled()`` true stops the study with AttackCancelled (the cells stored so far are kept).
    """
    from ..probes.attacks import AttackCancelled
    if not isinstance(study, dict):
        study = load_study(study)
    resolved = resolve_study(study)
    if int(workers) < 1:
        raise InputError("workers must be at least 1, got {}".format(workers))
    out_dir = Path(out_dir)
    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    tasks = study_cells(resolved)
    stored = {task["key"]: _read_cell(cells_dir, task["key"]) for task in tasks}
    pending = [task for task in tasks if stored[task["key"]] is None]
    records = {key: record for key, record in stored.items() if record is not None}
    reused = sorted(records)
    computed = []

    def finished(record):
        _write_json_atomic(cells_dir / (record["key"] + ".json"), record)
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
    write_outputs(out_dir, resolved, ordered)
    return StudyRun(out_dir, ordered, computed, reused)


def _run_pool(tasks, workers, finished):
    """Local worker processes (spawned: no forked torch state); cells are stored as they finish."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(compute_cell, task) for task in tasks]
        try:
            for future in as_completed(futures):
                finished(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _run_dask(tasks, scheduler, finished):
    """The cells as Dask futures on the cluster at ``scheduler``; stored here as they finish."""
    from distributed import Client, as_completed
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


def _read_cell(cells_dir, key):
    path = cells_dir / (key + ".json")
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None  # unreadable (should not happen: cells are written atomically): computed again
    return record if record.get("key") == key else None


def _write_json_atomic(path, data):
    _write_atomic(path, json.dumps(data, indent=1, default=_json_default))


def _write_atomic(path, text):
    """Write to a temporary file in the same folder, then rename: a reader sees the whole file or none. The file
    is created as open() creates one (permissions from the umask); a failed write leaves nothing behind."""
    temporary = path.with_name(".{}.{}.tmp".format(path.name, uuid.uuid4().hex[:12]))
    try:
        with open(str(temporary), "x", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(str(temporary), str(path))
    except BaseException:
        if temporary.exists():
            temporary.unlink()
        raise


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(type(value).__name__)


# ------------------------------------------------------------------------------------------------------ scores
def robustness_score(strengths, dices):
    """Area under the Dice-vs-strength curve relative to the clean Dice, normalised to [0, 1].

    ``strengths`` start at 0 (the clean volume); the curve ``min(dice / clean dice, 1)`` is integrated with the
    trapezoid rule from 0 to the largest strength and divided by it: 1 for a network the probe does not affect,
    0 for one that loses everything at once.
    """
    pairs = sorted(zip((float(s) for s in strengths), (float(d) for d in dices)))
    if len(pairs) < 2 or pairs[0][0] != 0.0 or pairs[-1][0] <= 0.0:
        raise InputError("a robustness score needs the clean Dice (strength 0) and one strength above 0 at least")
    clean = pairs[0][1]
    if not clean > 0:
        return 0.0
    xs = [s for s, _ in pairs]
    ys = [min(max(d / clean, 0.0), 1.0) for _, d in pairs]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2.0 for i in range(len(xs) - 1))
    return area / xs[-1]


def table_rows(records):
    """The long-format table: one row per network, case, probe, strength, label; the clean rows (strength 0)
    once per network, case and probe."""
    rows, seen = [], set()
    for record in records:
        for row in record["rows"]:
            key = tuple(row[k] for k in TABLE_KEYS)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def curves(rows):
    """Mean-label Dice per (network, probe, kind), case and strength, from :func:`scored_rows`."""
    per_case = {}
    for row in scored_rows(rows):
        per_case[(row["network"], row["probe"], row["kind"], row["case"], float(row["strength"]))] = row["dice"]
    grouped = {}
    for (network, probe, kind, case, strength), dice in per_case.items():
        grouped.setdefault((network, probe, kind), {}).setdefault(case, {})[strength] = dice
    return grouped


def scored_rows(rows):
    """The mean-label rows that Dice is averaged over, never mixing two kinds of Dice: per (network, probe, kind),
    the rows against the reference when any case has one, else (no case has one) those against the clean
    prediction."""
    referenced = _referenced_groups(rows)
    return [row for row in rows if row["label"] == "mean" and row["dice"] is not None
            and (row.get("against") == "reference") == (_group(row) in referenced)]


def _referenced_groups(rows):
    """The (network, probe, kind) groups with Dice against a reference."""
    return {_group(row) for row in rows if row.get("against") == "reference"}


def _group(row):
    return row["network"], row["probe"], row["kind"]


def summary_rows(rows):
    """Per network and probe: clean Dice, Dice per strength, robustness score (attacks) and ROOD degradation
    (corruptions), each averaged over the cases (see :func:`scored_rows`; ``dice_against`` says against what, and
    ``cases_without_reference`` how many cases were left out for want of a reference), with the standard deviation
    over them (``_sd``, from two cases on); then one ``overall`` row per network."""
    referenced, unreferenced = _referenced_groups(rows), {}
    for row in rows:
        if row.get("against") != "reference":
            unreferenced.setdefault(_group(row), set()).add(row["case"])
    out = [dict(_probe_summary(key, by_case), dice_against="reference" if key in referenced else "clean prediction",
                cases_without_reference=len(unreferenced.get(key, ()))) for key, by_case in curves(rows).items()]
    for network in _unique(row["network"] for row in out):
        out.append(_overall_summary(network, [row for row in out if row["network"] == network]))
    return out


def _probe_summary(key, by_case):
    """The summary row of one (network, probe, kind) from its Dice per case and strength."""
    from ..probes.corruptions import rood_summary
    network, probe, kind = key
    strengths = sorted({s for values in by_case.values() for s in values})
    complete = {case: values for case, values in by_case.items() if set(values) == set(strengths)}
    scores, degradations, overalls = [], [], []
    for values in complete.values():
        ordered = [values[s] for s in strengths]
        scores.append(robustness_score(strengths, ordered))
        if kind == "corruption":
            summary = rood_summary({int(s): values[s] for s in strengths if s > 0}, values[0.0])
            degradations.append(summary["degradation"])
            overalls.append(summary["overall"])
    dice = [_mean([values[s] for values in complete.values()]) for s in strengths]
    cleans = [values[0.0] for values in complete.values() if 0.0 in values]
    return {"network": network, "probe": probe, "kind": kind, "cases": len(complete),
            "clean_dice": dice[0] if dice else None, "clean_dice_sd": _sd(cleans),
            "strengths": " ".join("{:g}".format(s) for s in strengths),
            "dice": " ".join("{:.4f}".format(d) for d in dice), "robustness_score": _mean(scores),
            "robustness_score_sd": _sd(scores), "rood_degradation": _mean(degradations),
            "rood_degradation_sd": _sd(degradations), "rood_overall": _mean(overalls)}


def _overall_summary(network, mine):
    """The ``overall`` row of a network from its probe rows (those against the reference, if any are)."""
    mine = [row for row in mine if row["dice_against"] == "reference"] or mine
    attacks = [row for row in mine if row["kind"] == "attack"]
    corruptions = [row for row in mine if row["kind"] == "corruption"]
    return {"network": network, "probe": "overall", "kind": "", "dice_against": mine[0]["dice_against"],
            "cases": max(row["cases"] for row in mine),
            "cases_without_reference": max(row["cases_without_reference"] for row in mine),
            "clean_dice": _mean([row["clean_dice"] for row in mine]), "strengths": "", "dice": "",
            "robustness_score": _mean([row["robustness_score"] for row in attacks]),
            "rood_degradation": _mean([row["rood_degradation"] for row in corruptions]),
            "rood_overall": _mean([row["rood_overall"] for row in corruptions])}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _sd(values):
    """Sample standard deviation; None for fewer than two values."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _unique(items):
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


# ------------------------------------------------------------------------------------------------------ outputs
def versions():
    """Versions of what computes the cells."""
    import monai
    import torch
    try:
        from importlib.metadata import version
        package = version("medadvrobustness")
    except Exception:
        package = "unknown"
    return {"medadvrobustness": package, "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def write_outputs(out_dir, resolved, records):
    """``results.csv``, ``summary.csv``, ``study.json`` (provenance), ``figures/`` and ``report.html``."""
    out_dir = Path(out_dir)
    rows = table_rows(records)
    summary = summary_rows(rows)
    _write_csv(out_dir / "results.csv", rows, _columns(rows))
    _write_csv(out_dir / "summary.csv", summary, SUMMARY_COLUMNS)
    heldout = {"recipe": [list(step) for step in HELDOUT_RECIPE],
               "seeds": "{} + 10 x case index + step (0, 1, 2)".format(HELDOUT_SEED)}
    provenance = {"study": resolved, "versions": versions(), "cells": len(records), "heldout_cases": heldout,
                  "cell_versions": _unique(json.dumps(r["versions"], sort_keys=True) for r in records),
                  "seconds_computing": round(sum(r["seconds"] for r in records), 1)}
    _write_json_atomic(out_dir / "study.json", provenance)
    figures = write_figures(out_dir / "figures", rows, summary)
    shown = [path for path in figures if path.name != "overview.png"]  # the same panels, side by side
    write_html(out_dir / "report.html", resolved, summary, shown, provenance)


def _columns(rows):
    columns = list(TABLE_KEYS) + ["dice", "against"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def _write_csv(path, rows, columns):
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell_text(row.get(key)) for key in columns})
    _write_atomic(path, stream.getvalue())


def _cell_text(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "{:.6g}".format(value) if math.isfinite(value) else str(value)
    return value


def write_figures(folder, rows, summary):
    """One Dice-vs-strength plot per probe (all networks, mean over cases, range shaded), the scatter of clean
    Dice against robustness score, and ``overview.png`` with all of them side by side; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grouped = curves(rows)
    probes = _unique(key[1] for key in grouped)
    overall = [row for row in summary if row["probe"] == "overall" and row["robustness_score"] is not None
               and row["dice_against"] == "reference"]  # clean Dice against the clean prediction is always 1
    paths = []
    for probe in probes:
        figure, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
        _plot_probe(ax, grouped, probe)
        paths.append(_save(figure, folder / "dice_vs_{}.png".format(re.sub(r"[^A-Za-z0-9_-]+", "_", probe))))
        plt.close(figure)
    if overall:
        figure, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
        _plot_scatter(ax, overall)
        paths.append(_save(figure, folder / "clean_vs_robustness.png"))
        plt.close(figure)
    panels = len(probes) + (1 if overall else 0)
    if not panels:
        return paths
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.0), constrained_layout=True, squeeze=False)
    for ax, probe in zip(axes[0], probes):
        _plot_probe(ax, grouped, probe)
    if overall:
        _plot_scatter(axes[0][-1], overall)
    paths.append(_save(figure, folder / "overview.png"))
    plt.close(figure)
    return paths


def _plot_probe(ax, grouped, probe):
    kind = None
    for (network, name, kind_of), by_case in grouped.items():
        if name != probe:
            continue
        kind = kind_of
        strengths = sorted({s for values in by_case.values() for s in values})
        table = np.array([[values.get(s, np.nan) for s in strengths] for values in by_case.values()])
        line, = ax.plot(strengths, np.nanmean(table, axis=0), marker="o", label=network)
        if len(table) > 1:
            ax.fill_between(strengths, np.nanmin(table, axis=0), np.nanmax(table, axis=0), alpha=0.15,
                            color=line.get_color())
    ax.set_xlabel("epsilon (fraction of intensity range)" if kind == "attack" else "severity (0: clean)")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.set_title("{}: mean over cases, range shaded".format(probe), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_scatter(ax, overall):
    for row in overall:
        ax.scatter(row["clean_dice"], row["robustness_score"], s=50)
        ax.annotate(row["network"], (row["clean_dice"], row["robustness_score"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=9)
    ax.set_xlabel("clean Dice (mean over cases)")
    ax.set_ylabel("robustness score (normalised AUC, attacks)")
    ax.set_title("generalizability vs robustness", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.25)


def _save(figure, path):
    figure.savefig(str(path), dpi=90)
    return path


STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #bbb;"
         "padding:3px 8px;font-size:13px}figure{display:inline-block;margin:1em}img{max-width:560px}")


def write_html(path, resolved, summary, figures, provenance):
    """A single offline HTML file: the summary table, the figures embedded, the study and its provenance."""
    import html
    images = "".join('<figure><img alt="{0}" src="data:image/png;base64,{1}"><figcaption>{0}</figcaption></figure>'
                     .format(html.escape(p.name), base64.b64encode(p.read_bytes()).decode()) for p in figures)
    header = "".join("<th>{}</th>".format(html.escape(c)) for c in SUMMARY_COLUMNS)
    body = "".join("<tr>{}</tr>".format("".join("<td>{}</td>".format(html.escape(str(_cell_text(row.get(c)))))
                                                for c in SUMMARY_COLUMNS)) for row in summary)
    text = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>medadv bench</title><style>{}"
            "</style></head><body><h1>Networks compared: clean Dice and robustness</h1>"
            "<p>Robustness score: area under the Dice-vs-epsilon curve relative to the clean Dice, normalised to "
            "[0, 1]. ROOD degradation: clean Dice minus the severity-weighted mean Dice (alpha 2/3). Dice is against "
            "the reference label map; cases without one (cases_without_reference) are left out of the averages, "
            "unless no case has one: then Dice is against the clean prediction (dice_against), and the clean Dice "
            "(1) is left out of the scatter.</p>"
            "<table><tr>{}</tr>{}</table>{}<h2>Study and provenance</h2><pre>{}</pre></body></html>").format(
        STYLE, header, body, images, html.escape(json.dumps(provenance, indent=1, default=str)))
    _write_atomic(path, text)


def add_study_nodes(scene, records):
    """The study in an MRML scene (the Slicer module's view of it): the summary table, and per probe a table of
    the mean Dice of every network against the strength with its chart. Returns (summary table, charts)."""
    from ..networks.models import PALETTE
    from ..scene.nodes import add_line_chart, add_table_node
    rows = table_rows(records)
    summary = add_table_node(scene, summary_rows(rows), SUMMARY_COLUMNS, "bench summary")
    grouped = curves(rows)
    charts = []
    for probe in _unique(key[1] for key in grouped):
        means, kind = {}, None
        for (network, name, kind_of), by_case in grouped.items():
            if name == probe:
                kind = kind_of
                for strength in sorted({s for values in by_case.values() for s in values}):
                    means.setdefault(strength, {"strength": strength})[network] = _mean(
                        [values.get(strength) for values in by_case.values()])
        networks = _unique(key[0] for key in grouped if key[1] == probe)
        table = add_table_node(scene, [means[s] for s in sorted(means)], ["strength"] + networks,
                               "bench {} Dice table".format(probe))
        series = [(network, PALETTE[1 + index % (len(PALETTE) - 1)]) for index, network in enumerate(networks)]
        charts.append(add_line_chart(scene, table, "strength", series, "bench {} Dice".format(probe),
                                     "epsilon" if kind == "attack" else "severity", "mean foreground Dice"))
    return summary, charts


def write_heldout_cases(folder, count):
    """Write held-out variants 1..count of the sample as NIfTI pairs (``heldout-N.nii.gz``, ``heldout-N_seg``)."""
    from ..scene.results import write_volume_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(1, count + 1):
        volume, labels = heldout_volume(index)
        write_volume_file(volume.array, volume, folder / "heldout-{}.nii.gz".format(index))
        write_volume_file(labels, volume, folder / "heldout-{}_seg.nii.gz".format(index), label_map=True)


def _hash_files(files, extra=""):
    digest = hashlib.sha256(extra.encode())
    for path in files:
        digest.update(Path(path).name.encode())
        with open(str(path), "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------- CLI
def add_bench_command(commands):
    """``medadv bench``: registered by cli.py."""
    bench = commands.add_parser("bench", help="compare networks on cases under attacks and corruptions "
                                              "(resumable grid, local workers or a Dask cluster)")
    bench.add_argument("study", nargs="?", help="study file (JSON or YAML) with networks, cases and probes")
    bench.add_argument("--out", required=True, help="study folder (cells/ kept: run again to resume)")
    bench.add_argument("--networks", nargs="+", default=[], help="built-in names or model folders")
    bench.add_argument("--cases", nargs="+", default=[],
                       help="volume files, folders of NIfTI/NRRD pairs (NAME + NAME_seg), 'sample', or heldout:N")
    bench.add_argument("--attacks", nargs="+", default=[], help="attacks, each at every --epsilons")
    bench.add_argument("--epsilons", nargs="+", type=float, default=[])
    bench.add_argument("--corruptions", nargs="+", default=[], help="corruptions, each at every --severities")
    bench.add_argument("--severities", nargs="+", type=int, default=[])
    bench.add_argument("--steps", type=int, help="steps of the iterative attacks")
    bench.add_argument("--seed", type=int, help="seed of the probes' random draws (default 0)")
    bench.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    bench.add_argument("--scheduler", help="Dask distributed scheduler address (tcp://host:8786) to run the cells on")
    bench.add_argument("--write-cases", metavar="DIR", help="also write the held-out cases as NIfTI pairs to DIR")
    bench.set_defaults(handler=_bench)


def _bench(args):
    if args.study:
        listed = [option for option, value in (("--networks", args.networks), ("--cases", args.cases),
                                                ("--attacks", args.attacks), ("--epsilons", args.epsilons),
                                                ("--corruptions", args.corruptions), ("--severities", args.severities),
                                                ("--steps", args.steps), ("--seed", args.seed)) if value not in (None, [])]
        if listed:
            raise InputError("give a study file or {}, not both: the study file sets them".format("/".join(listed)))
        study = load_study(args.study)
    else:
        params = {"steps": args.steps} if args.steps else {}
        study = study_from_lists(args.networks, args.cases, args.attacks, args.epsilons, args.corruptions,
                                 args.severities, params, 0 if args.seed is None else args.seed)
    if args.write_cases:
        resolve_study(study)  # bad input refused before anything is written
        count = sum(int(c[len(HELDOUT_PREFIX):]) for c in study["cases"] if str(c).startswith(HELDOUT_PREFIX))
        write_heldout_cases(args.write_cases, count)

    def report(done, total, record):
        print("[{}/{}] {} ({:.1f} s)".format(done, total, record["key"], record["seconds"]), flush=True)

    run = run_study(study, args.out, workers=args.workers, scheduler=args.scheduler, progress=report)
    print("{} cell(s) computed, {} found stored; {}".format(len(run.computed), len(run.reused),
                                                           Path(args.out) / "report.html"))
    for row in summary_rows(table_rows(run.records)):
        if row["probe"] == "overall":
            print("{:<24} clean Dice {}  robustness {}  ROOD degradation {}".format(
                row["network"], _fmt(row["clean_dice"]), _fmt(row["robustness_score"]), _fmt(row["rood_degradation"])))
    return 0


def _fmt(value):
    return "-" if value is None else "{:.3f}".format(value)
