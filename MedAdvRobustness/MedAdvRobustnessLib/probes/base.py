"""The probe protocol: what the sweep needs of an attack or a corruption."""
from .parameters import describe_parameter, parameter_fields


class Probe:
    """An attack or a corruption, applied by :func:`~..evaluation.sweep.run_sweep` at several strengths.

    A probe is a dataclass whose parameter fields (:mod:`.parameters`) are its settings. It says:

    - ``name``, ``summary``: what it is, in a word and in a line;
    - ``strength_name``, ``strength_label``: what its strengths are (``epsilon``, a fraction of the intensity
      range, or ``severity`` 1..5) for columns and axis titles;
    - ``tasks``: the kinds of network it applies to (``segmentation``, ``classification``);
    - ``moves_anatomy``: whether it moves the anatomy (then the sweep compares with the moved reference and clean
      prediction, and it cannot be restricted to a region);
    - :meth:`check_strengths`: the strengths it takes, checked and sorted;
    - :meth:`outcome`: what it makes of the volume at one strength; :meth:`outcomes`: at every strength of a
      sweep (one :meth:`outcome` after another, unless the probe can do them together).
    """
    name = ""
    summary = ""
    strength_name = "epsilon"
    strength_label = "epsilon (fraction of intensity range)"
    tasks = ("segmentation", "classification")
    moves_anatomy = False

    @classmethod
    def parameters(cls):
        """The parameters (name, default, type, help, choices) this probe takes."""
        return [describe_parameter(item) for item in parameter_fields(cls)]

    def settings(self):
        """Every parameter value this probe runs with, defaults included."""
        return {item.name: getattr(self, item.name) for item in parameter_fields(type(self))}

    def check_strengths(self, strengths):
        """The strengths checked and sorted (InputError on a bad one)."""
        raise NotImplementedError

    def draws_from_seed(self):
        """Whether its seed changes what it does (a random start, a random target, a random corruption)."""
        return False

    def outcome(self, sweep, strength, report):
        """The :class:`~..evaluation.records.Outcome` at ``strength`` on the volume of ``sweep`` (a
        :class:`~..evaluation.sweep.Sweep`); ``report(step, steps, loss=None, dice=None)`` tells the progress."""
        raise NotImplementedError

    def outcomes(self, sweep, strengths, report_for):
        """One :class:`~..evaluation.records.Outcome` per strength, in order: :meth:`outcome` at each in turn
        (``sweep.check_cancel()`` before each); ``report_for(indices)`` is the progress report of the strengths at
        those indices (here one at a time)."""
        outcomes = []
        for index, strength in enumerate(strengths):
            sweep.check_cancel()
            outcomes.append(self.outcome(sweep, strength, report_for([index])))
        return outcomes
