"""Probes: attacks and corruptions behind one protocol (:class:`~.base.Probe`), their parameters, and the
registry that builds them by name. Torch and MONAI only."""
