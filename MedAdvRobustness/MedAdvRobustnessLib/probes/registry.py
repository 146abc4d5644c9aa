"""Every probe by name, and the one way to build one: :func:`make_probe`.

A new attack is one :class:`~.attacks.Attack` subclass in :data:`~.attacks.ATTACKS`; a new corruption one entry of
the :data:`~.corruptions.CORRUPTIONS` table. The CLI, ``medadv attacks``, the Slicer module's form, the viewer and
bench read the probes and their parameters from here.
"""
from ..errors import InputError
from . import attacks, corruptions, minimal
from .parameters import convert, parameter_fields

attacks.ATTACKS.update(minimal.ATTACKS)  # the minimal-perturbation attacks on classifiers (DeepFool, JSMA)


def probe_names():
    """Every attack (alphabetically), then every corruption (ROOD-MRI's ten first)."""
    return sorted(attacks.ATTACKS) + list(corruptions.CORRUPTIONS)


def is_corruption(name):
    return name in corruptions.CORRUPTIONS


def probe_kind(name):
    """``"attack"`` or ``"corruption"``."""
    probe_class(name)
    return "corruption" if is_corruption(name) else "attack"


def probe_class(name):
    """The class of the probe ``name`` (:class:`~.corruptions.CorruptionProbe` for every corruption)."""
    if name in attacks.ATTACKS:
        return attacks.ATTACKS[name]
    if is_corruption(name):
        return corruptions.CorruptionProbe
    raise InputError("unknown probe {!r}; the attacks are {} and the corruptions {}".format(
        name, ", ".join(sorted(attacks.ATTACKS)), ", ".join(corruptions.CORRUPTIONS)))


def make_probe(name, **params):
    """The probe ``name`` with ``params`` (values may be text, as from a form or ``--param key=value``)."""
    cls = probe_class(name)
    kind = probe_kind(name)
    known = {item.name: item for item in parameter_fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError("{} {} has no parameter {}; its parameters are {}".format(
            kind, name, ", ".join(unknown), ", ".join(sorted(known))))
    values = {key: convert("{} {}".format(kind, name), known[key], value) for key, value in params.items()}
    return cls(name, **values) if kind == "corruption" else cls(**values)


def probe_parameters(name):
    """The parameters (name, library default, type, help, choices) the probe ``name`` takes."""
    return probe_class(name).parameters()


def probe_summary(name):
    """One line on what the probe ``name`` does (and what its strengths are)."""
    return make_probe(name).summary


def describe_probes():
    """Every attack and every corruption with its parameters and defaults (``medadv attacks``)."""
    return attacks.describe_attacks() + "\n" + corruptions.describe_corruptions()
