"""MedAdvRobustness: how far a medical image segmentation network can be trusted, under adversarial attacks and
realistic MRI corruptions, in the volume's own intensity space and grid.

The public API, importable without MRML, VTK, trame, Qt or matplotlib (each name is imported when first used)::

    from MedAdvRobustnessLib import Volume, load_model, make_probe, run_sweep
    model = load_model("demo")                          # or a model folder, a MONAI bundle, TorchScript
    volume = Volume.from_array(image.get_fdata(), image.affine)      # e.g. a nibabel image
    result = run_sweep(model, volume, make_probe("pgd", steps=10), [0.01, 0.02])
    result.mean_dice(0.02, "clean")                     # result.rows: every metric per strength and label

The layers: :mod:`.networks` (loading, differentiable preprocessing, inference), :mod:`.probes` (attacks and
corruptions behind one protocol), :mod:`.evaluation` (sweep, metrics, records), :mod:`.scene` (MRML adapters),
:mod:`.study` (bench), :mod:`.module` (the Slicer module's logic), :mod:`.viewer` (the browser viewer).
"""
import importlib

_EXPORTS = {
    "InputError": "errors",
    "Volume": "networks.volume",
    "load_model": "networks.models", "SegmentationModel": "networks.models", "ModelDescription": "networks.models",
    "Label": "networks.models",
    "Probe": "probes.base", "Parameter": "probes.parameters",
    "Attack": "probes.attacks", "AttackCancelled": "probes.attacks", "ATTACKS": "probes.attacks",
    "CorruptionProbe": "probes.corruptions", "CORRUPTIONS": "probes.corruptions",
    "make_probe": "probes.registry", "probe_names": "probes.registry",
    "run_sweep": "evaluation.sweep", "Outcome": "evaluation.records", "RobustnessResult": "evaluation.records",
    "run_study": "study.execution", "StudyRun": "study.execution",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError("module {!r} has no attribute {!r}".format(__name__, name))
    value = getattr(importlib.import_module("." + _EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
