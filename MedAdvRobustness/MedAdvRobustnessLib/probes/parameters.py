"""Probe parameters as dataclass fields: the field's metadata gives its type, help, choices and lower bound, so the
CLI, ``medadv attacks``, the Slicer module's form and bench all read a probe's parameters from its class."""
import math
from dataclasses import dataclass, field, fields
from typing import Optional

from ..errors import InputError


def parameter(default, kind, help, choices=None, minimum=None, optional=False, above=None):
    """A dataclass field that is a probe parameter (``optional``: None is allowed, as it is for a None default;
    ``minimum``: the least value allowed; ``above``: a bound the value must exceed, as a step size 0)."""
    return field(default=default, metadata=dict(kind=kind, help=help, choices=choices, minimum=minimum,
                                                optional=optional or default is None, above=above))


def seed_parameter(help="seed of the probe's random draws"):
    """The ``seed`` every probe takes."""
    return parameter(0, int, help)


@dataclass(frozen=True)
class Parameter:
    """What a form or the command line shows of one parameter."""
    name: str
    default: object
    kind: type
    help: str
    choices: Optional[tuple] = None


def parameter_fields(probe_class):
    """The dataclass fields of ``probe_class`` that are parameters."""
    return [item for item in fields(probe_class) if "kind" in item.metadata]


def describe_parameter(item):
    meta = item.metadata
    return Parameter(item.name, item.default, meta["kind"], meta["help"], meta.get("choices"))


def check_parameters(probe):
    """Refuse a value outside its choices, below its minimum, not above its ``above`` bound, or not finite
    (InputError naming the parameter)."""
    for item in parameter_fields(type(probe)):
        meta, value = item.metadata, getattr(probe, item.name)
        if value is None and meta.get("optional"):
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise InputError("{} {}: {!r} is not one of {}".format(probe.name, item.name, value,
                                                                   ", ".join(meta["choices"])))
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError("{} {} must be a finite number, got {}".format(probe.name, item.name, value))
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2 ** 63:
            raise InputError("{} {} must be below 2**63, got {}".format(probe.name, item.name, value))
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise InputError("{} {} must be at least {:g}, got {:g}".format(probe.name, item.name, meta["minimum"],
                                                                           value))
        if meta.get("above") is not None and not value > meta["above"]:
            raise InputError("{} {} must be greater than {:g}, got {:g}".format(probe.name, item.name, meta["above"],
                                                                               value))


def convert(probe_name, item, value):
    """``value`` (text from a form or ``--param``, or a Python value) as the parameter's type."""
    meta = item.metadata
    kind = meta["kind"]
    if isinstance(value, str):
        text = value.strip()
        if meta.get("optional") and text.lower() in ("none", ""):
            return None
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(text)
                return text.lower() in ("true", "1", "yes", "on")
            return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except (ValueError, OverflowError):
            raise InputError("{} parameter {}: cannot read {!r} as {}".format(probe_name, item.name, value,
                                                                            kind.__name__))
    if value is None:
        if meta.get("optional"):
            return None
        raise InputError("{} parameter {} cannot be none".format(probe_name, item.name))
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and number and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if kind is float and number:
        return float(value)
    raise InputError("{} parameter {} must be {}, got {!r}".format(probe_name, item.name, kind.__name__, value))


def value_text(value):
    """A parameter value as ``medadv attacks`` and the module's form show it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "{:g}".format(value) if isinstance(value, float) else str(value)
