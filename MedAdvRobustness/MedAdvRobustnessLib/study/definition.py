"""What a study is: the study file or command-line lists, resolved into networks (hashed with their
weights), cases (files, folders, held-out variants of the sample) and probes with their strengths."""
import json
from pathlib import Path

from ..errors import InputError
from ..networks.models import BUILTIN_MODELS, DESCRIPTION_FILE, ModelDescription, MODELS_DIR
from ..probes.attacks import ATTACKS
from ..probes.corruptions import CORRUPTIONS
from ..probes.registry import make_probe
from .cases import HELDOUT_PREFIX, SLICES_PREFIX, hash_files, resolve_cases


STUDY_KEYS = ("networks", "cases", "probes", "seed", "threads")


def load_study(path):
    """The study dictionary of a JSON or YAML file."""
    path = Path(path)
    text = _study_text(path)
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            study = yaml.safe_load(text)
        else:
            study = json.loads(text)
    except Exception as error:  # json's ValueError, yaml.YAMLError
        raise InputError("cannot read study {}: {}".format(path, _one_line(error)))
    if not isinstance(study, dict):
        raise InputError("study {} must be a mapping with networks, cases and probes".format(path))
    base = path.parent
    study = dict(study)
    study["cases"] = [_relative_to(item, base) for item in study.get("cases", [])]
    study["networks"] = _relative_networks(study.get("networks", []), base)
    return study


def _study_text(path):
    """The text of a study file (UTF-8), refused in one line where it is not a readable regular file or not text."""
    from ..scene.slicer_scene import require_regular_file
    require_regular_file(path, "study file")
    try:
        return path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is fine
    except UnicodeDecodeError as error:
        raise InputError("cannot read study {}: it is not UTF-8 text (byte 0x{:02x} at position {}); save it as "
                         "UTF-8".format(path, error.object[error.start], error.start))
    except OSError as error:
        raise InputError("cannot read study {}: {}".format(path, error.strerror or error))


def _one_line(error):
    """A parser's error on one line: YAML's problem and where it is (line and column from 1), else its text."""
    mark = getattr(error, "problem_mark", None)
    if getattr(error, "problem", None) and mark is not None:
        context = " ({})".format(error.context) if getattr(error, "context", None) else ""
        return "line {}, column {}: {}{}".format(mark.line + 1, mark.column + 1, error.problem, context)
    return " ".join(str(error).split())


def _relative_to(item, base):
    """Relative file paths of a study are relative to the study file."""
    if isinstance(item, str) and not item.startswith((HELDOUT_PREFIX, SLICES_PREFIX)) and item != "sample":
        return str(base / item) if not Path(item).is_absolute() else item
    if isinstance(item, dict):
        return {key: (str(base / value) if key in ("volume", "reference") and value and not Path(value).is_absolute()
                      else value) for key, value in item.items()}
    return item


def _relative_networks(networks, base):
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
    seed = _whole_number(study, "seed", 0)
    threads = _whole_number(study, "threads", 1)
    if threads < 1:
        raise InputError("study: threads must be at least 1 (torch threads per cell), got {}".format(threads))
    networks = [_network(item) for item in _non_empty(study, "networks")]
    cases = [case for item in _non_empty(study, "cases") for case in resolve_cases(item)]
    probes = [_probe(item, seed) for item in _non_empty(study, "probes")]
    for kind, items in (("network", networks), ("case", cases), ("probe", probes)):
        names = [item["name"] for item in items]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InputError("study: {} name(s) {} given twice; name them apart".format(kind, ", ".join(repeated)))
    return {"networks": networks, "cases": cases, "probes": probes, "seed": seed, "threads": threads}


def _whole_number(study, key, default):
    value = study.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError("study: {} must be a whole number, got {!r}".format(key, value))
    return value


def _non_empty(study, key):
    items = study.get(key) or []
    if not isinstance(items, list) or not items:
        raise InputError("study: give a non-empty list of {}".format(key))
    return items


# load_model's options a network entry may set, with their defaults (left out of the entry, and so of the cell
# keys, where they are the default)
LOAD_OPTIONS = {"trust_checkpoint": False, "folds": None, "mirroring": True, "skip_untwinned": False}
NETWORK_KEYS = ("name", "source") + tuple(LOAD_OPTIONS)


def _network(item):
    """``{"name", "source", "hash"}`` of a built-in name, a model folder or file (name: the folder's), with the
    :data:`LOAD_OPTIONS` the entry sets to other than their default: ``"trust_checkpoint": true`` where the study
    trusts its checkpoint (see :func:`~.models.load_checkpoint`), an nnU-Net model's ``"folds"`` (a list) and
    ``"mirroring": false``, a bundle's ``"skip_untwinned": true``."""
    options = {}
    if isinstance(item, dict):
        name, source = item.get("name"), item.get("source")
        unknown = sorted(set(item) - set(NETWORK_KEYS))
        if unknown:
            raise InputError("study: network {!r}: unknown key(s) {}; a network is {{\"name\": ..., \"source\": "
                             "..., and optionally {}}}".format(name or source, ", ".join(unknown),
                                                              ", ".join(LOAD_OPTIONS)))
        options = {key: item[key] for key in LOAD_OPTIONS if key in item and item[key] != LOAD_OPTIONS[key]}
        _check_load_options(name or source, options)
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
    network = {"name": str(name or Path(source).name.replace(".json", "")), "source": source,
               "hash": hash_files(files)}
    return dict(network, **options)  # the defaults absent: the cell keys of studies without them stay


def _check_load_options(name, options):
    """One line for a load option of the wrong type."""
    for key in ("trust_checkpoint", "mirroring", "skip_untwinned"):
        if key in options and not isinstance(options[key], bool):
            raise InputError("study: network {!r}: {} must be true or false".format(name, key))
    folds = options.get("folds")
    if folds is not None and (not isinstance(folds, list) or not folds
                              or not all(isinstance(fold, (str, int)) and not isinstance(fold, bool)
                                         for fold in folds)):
        raise InputError("study: network {!r}: folds must be a non-empty list of fold names (\"folds\": [0, 1])".format(
            name))


def _model_files(path):
    """Every file that determines a network: a folder's files, a description and the weights it names."""
    if not path.is_dir():
        return [path, _weights_file(path)] if path.suffix == ".json" else [path]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if (path / DESCRIPTION_FILE).is_file():  # its weights may lie outside the folder
        weights = _weights_file(path / DESCRIPTION_FILE)
        files += [] if weights.resolve() in {p.resolve() for p in files} else [weights]
    return files


def _weights_file(description):
    """The weights file a ``model.json`` names (relative to it), as :func:`~.models.load_model` finds it."""
    weights = description.parent / ModelDescription.from_json(description).weights
    if not weights.is_file():
        raise InputError("study: weights not found: {} (named by {})".format(weights, description))
    return weights


def _probe(item, seed):
    """``{"name", "kind", "probe", "params", "strengths"}`` of ``{"attack": ..., "epsilons": [...], "params": {}}``
    or ``{"corruption": ..., "severities": [...]}``."""
    if not isinstance(item, dict) or ("attack" in item) == ("corruption" in item):
        raise InputError("study: a probe is {{\"attack\": NAME, \"epsilons\": [...]}} or {{\"corruption\": NAME, "
                         "\"severities\": [...]}}, got {!r}".format(item))
    kind = "attack" if "attack" in item else "corruption"
    known = ATTACKS if kind == "attack" else CORRUPTIONS
    if not isinstance(item[kind], str) or item[kind] not in known:
        raise InputError("study: unknown {} {!r}; known {}s: {}".format(kind, item[kind], kind,
                                                                       ", ".join(sorted(known))))
    if not isinstance(item.get("params") or {}, dict):
        raise InputError("study: the params of probe {} must be a mapping of parameter names to values, got "
                         "{!r}".format(item[kind], item["params"]))
    params = dict(item.get("params") or {})
    params.setdefault("seed", seed)
    key = "epsilons" if kind == "attack" else "severities"
    strengths = item.get(key)
    if not strengths:
        raise InputError("study: probe {} needs {}".format(item[kind], key))
    if not isinstance(strengths, list) or not all(isinstance(value, (int, float)) and not isinstance(value, bool)
                                                  for value in strengths):
        raise InputError("study: the {} of probe {} must be a list of numbers, got {!r}".format(
            key, item[kind], strengths))
    probe = {"kind": kind, "probe": str(item[kind]), "params": params}
    strengths = study_probe(probe).check_strengths(strengths)
    name = item.get("name") or probe["probe"]
    return dict(probe, name=str(name), strengths=[float(s) for s in strengths])


def study_probe(probe):
    """The probe of a resolved study probe (``kind``, ``probe`` name, ``params``)."""
    if probe["probe"] not in (ATTACKS if probe["kind"] == "attack" else CORRUPTIONS):
        raise InputError("study: unknown {} {!r}".format(probe["kind"], probe["probe"]))
    return make_probe(probe["probe"], **probe["params"])


def study_from_lists(networks, cases, attacks=(), epsilons=(), corruptions=(), severities=(), params=None, seed=0):
    """A study dictionary from command-line lists (every attack at every epsilon, every corruption at every
    severity)."""
    probes = [{"attack": name, "epsilons": list(epsilons), "params": dict(params or {})} for name in attacks]
    probes += [{"corruption": name, "severities": list(severities)} for name in corruptions]
    return {"networks": list(networks), "cases": list(cases), "probes": probes, "seed": seed}
