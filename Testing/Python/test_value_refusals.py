"""Values no run can use are refused with one line (issue 14): argparse errors, model.json fields, study threads,
attack step sizes, a plain Python pickle given as a model, a network grid too large for memory."""
import json
import re
import pickle
import warnings

import numpy as np
import pytest
import torch

from MedAdvRobustnessLib import cli
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import (ModelDescription, PlainPickle, SegmentationModel, describe,
                                                 load_checkpoint, load_model, network_grid_shape)
from MedAdvRobustnessLib.probes.registry import make_probe
from MedAdvRobustnessLib.study.definition import resolve_study


def error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv, start, end", [
    (["run", "--volume", "v.nii.gz"],
     "medadv: error: the following arguments are required: --model, --out", " (see medadv run --help)"),
    (["frobnicate"], "medadv: error: argument COMMAND: invalid choice: 'frobnicate' (choose from ",
     " (see medadv --help)"),  # how argparse quotes the choices depends on the Python version
    (["bench", "--out", "o", "--workers", "0"],
     "medadv: error: argument --workers: must be at least 1, got 0", " (see medadv bench --help)"),
])
def test_argparse_errors_are_one_line_with_status_2(capsys, argv, start, end):
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert line.startswith(start) and line.endswith(end), line


@pytest.mark.parametrize("fields, expected", [
    ({"pad_divisible": -4}, "pad_divisible must be a whole number of voxels of at least 1 (or one per axis), got -4"),
    ({"pad_divisible": 0}, "pad_divisible must be a whole number of voxels of at least 1 (or one per axis), got 0"),
    ({"preprocessing": [{"pad_divisible": [16, 0, 16]}]}, "pad_divisible must be a whole number of voxels of at "
                                                         "least 1 (or one per axis), got [16, 0, 16]"),
    ({"intensity": {"type": "percentile", "lower": 99.5, "upper": 0.5}}, "intensity percentile: lower and upper "
     "must be percentiles with 0 <= lower < upper <= 100, got lower 99.5, upper 0.5"),
    ({"intensity": [{"type": "percentile", "lower": 0, "upper": 120}]}, "got lower 0, upper 120"),
    ({"intensity": {"type": "zscore", "std": 0}},
     "intensity zscore: a fixed std must be positive (it divides the volume), got 0"),
    ({"intensity": {"type": "zscore", "mean": [0, 0], "std": [1.0, 0.0]}}, "a fixed std must be positive (it "
                                                                          "divides the volume), got [1.0, 0.0]"),
    ({"window": {"roi_size": [0, 0, 0]}},
     "window roi_size must be whole numbers of voxels of at least 1, one per axis, got [0, 0, 0]"),
    ({"window": {"roi_size": [32, -1, 32]}}, "got [32, -1, 32]"),
    ({"window": {"roi_size": [32, 32, 32], "overlap": 1.0}},
     "window overlap must lie in [0, 1) (a share of the window), got 1.0"),
    ({"window": {"roi_size": [32, 32, 32], "overlap": -0.25}}, "got -0.25"),
    ({"window": {"roi_size": [32, 32, 32], "sw_batch_size": 0}},
     "window sw_batch_size must be a whole number of at least 1, got 0"),
    ({"intensity": {"type": "range", "a_min": 5, "a_max": 5, "b_min": 0, "b_max": 1}},
     "intensity range: a_min and a_max must be two different numbers (the window they span divides the volume), "
     "got 5 and 5"),
    ({"intensity": {"type": "minmax", "min": 3, "max": 3}}, "intensity minmax: min and max must be two different"),
    ({"in_channels": 0}, "in_channels must be a whole number of at least 1, got 0"),
    ({"in_channels": "one"}, "in_channels must be a whole number of at least 1, got 'one'"),
    ({"crop": {"threshold": 0, "margin": -5}}, "crop margin must be whole voxels of at least 0 (or one per axis), "
                                               "got -5"),
    ({"labels": [{"value": 1, "name": "a"}, {"value": 1, "name": "b"}]}, "label value 1 is given twice"),
    ({"spacing": "NaN"}, "spacing must be three positive numbers (mm along x, y, z), got 'NaN'"),
])
def test_model_json_values_are_refused_naming_field_and_value(tmp_path, fields, expected):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(dict({"name": "net"}, **fields)))
    with pytest.raises(InputError) as refused:
        ModelDescription.from_json(path)
    message = str(refused.value)
    assert message.startswith("{}: ".format(path)) and expected in message and "\n" not in message


def test_model_json_sound_values_still_load():
    description = ModelDescription.from_dict({
        "name": "net", "pad_divisible": [16, 8, 1], "window": {"roi_size": [32, 32, 32], "overlap": 0.0},
        "intensity": [{"type": "percentile", "lower": 0.5, "upper": 99.5}, {"type": "zscore", "std": 2.0}]})
    assert description.pad_divisible == [16, 8, 1] and description.window["overlap"] == 0.0


@pytest.mark.parametrize("threads", [0, -2])
def test_study_threads_below_one_are_refused(threads):
    study = {"networks": ["demo"], "cases": ["sample"], "probes": [{"attack": "fgsm", "epsilons": [0.01]}],
             "threads": threads}
    with pytest.raises(InputError, match=r"^study: threads must be at least 1 \(torch threads per cell\), got "
                                         "{}$".format(threads)):
        resolve_study(study)


@pytest.mark.parametrize("attack, name", [("pgd", "step_size"), ("segpgd", "step_size"), ("cospgd", "step_size"),
                                          ("apgd-ce", "step_size"), ("apgd-dlr", "momentum"), ("dag", "gamma")])
@pytest.mark.parametrize("value", [0, -0.5])
def test_step_sizes_must_be_positive(attack, name, value):
    with pytest.raises(InputError, match=r"^{} {} must be greater than 0, got {:g}$".format(attack, name, value)):
        make_probe(attack, **{name: value})
    assert getattr(make_probe(attack, **{name: 0.01}), name) == 0.01


def test_step_size_zero_on_the_command_line(tmp_path, capsys):
    assert cli.main(["demo", "--attack", "pgd", "--step-size", "0", "--out", str(tmp_path / "out")]) == 2
    assert error_line(capsys) == "medadv: error: pgd step_size must be greater than 0, got 0"
    assert not (tmp_path / "out").exists()


class Effect:
    """Unpickling this creates the file ``marker``: the proof that a load ran code stored in the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])  # 2: torch.load(weights_only=False) ran it
def test_plain_pickle_is_named_and_never_unpickled(tmp_path, trust, protocol):
    marker, path = tmp_path / "ran", tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(Effect(str(marker)), protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warnings about the pickle protocol would fail here
        with pytest.raises(PlainPickle) as refused:
            load_model(path, trust_checkpoint=trust)
    assert str(refused.value).startswith("{} is a plain Python pickle, not a PyTorch checkpoint or TorchScript "
                                         "file; it was not unpickled".format(path))
    assert not marker.exists()


def test_torch_files_of_both_formats_still_load(tmp_path):
    weights = torch.nn.Conv3d(1, 2, 1).state_dict()
    torch.save(weights, tmp_path / "zip.pt")
    torch.save(weights, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert torch.equal(load_checkpoint(tmp_path / name)["weight"], weights["weight"])


def tiny_model(**fields):
    return SegmentationModel(torch.nn.Conv3d(1, 2, 1), ModelDescription(name="tiny", **fields))


def test_network_grid_shape_is_the_prepared_shape():
    model = tiny_model(preprocessing=[{"spacing": [1.5, 1.0, 2.0]}, {"center_crop": [14, 30, 9]},
                                      {"pad_size": [16, 32, 8]}, {"resize": [11, 20, 7]}, {"pad_divisible": 4}])
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    with model.on_grid(affine):
        inputs, _plan = model.prepare(torch.zeros(1, 1, 10, 12, 9))
    assert network_grid_shape(model, (10, 12, 9), affine) == tuple(inputs.shape[2:])


def test_a_network_grid_too_large_for_memory_is_refused_before_running():
    model = tiny_model(spacing=[0.001, 0.001, 0.001])
    with model.on_grid(np.diag([10.0, 10.0, 10.0, 1.0])):
        with pytest.raises(InputError) as refused:
            describe(model, torch.zeros(1, 1, 10, 10, 10))
    message = str(refused.value)
    assert message.startswith("model tiny: the volume's 10x10x10 voxels become 90001x90001x90001 at the network's "
                              "grid (0.001x0.001x0.001 mm), which need about ") and "\n" not in message


@pytest.mark.parametrize("probe, expected", [
    ({"attack": "cw", "strengths": [0.01]}, "study: unknown attack 'cw'; known attacks: apgd-ce, "),
    ({"corruption": ["noise"], "severities": [1]}, "study: unknown corruption ['noise']; known corruptions: "),
])
def test_a_study_probe_of_unknown_name_is_named_first(probe, expected):
    from MedAdvRobustnessLib.study.definition import resolve_study
    with pytest.raises(InputError) as raised:
        resolve_study({"networks": ["demo-unet"], "cases": ["sample"], "probes": [probe]})
    assert str(raised.value).startswith(expected), str(raised.value)


@pytest.mark.parametrize("architecture, expected", [
    ({"name": "UNett"}, "architecture: unknown MONAI architecture 'UNett'"),
    ({"name": "UNet", "args": {"spatial_dims": 3}}, "architecture: cannot build UNet with {'spatial_dims': 3}"),
])
def test_an_architecture_that_cannot_be_built_names_model_json(tmp_path, architecture, expected):
    from MedAdvRobustnessLib import load_model
    (tmp_path / "model.pt").write_bytes(b"")
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"name": "net", "architecture": architecture, "weights": "model.pt"}))
    with pytest.raises(InputError) as refused:
        load_model(str(tmp_path))
    assert str(refused.value).startswith("{}: {}".format(path, expected)), str(refused.value)


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty; it describes the network as a JSON object"),
    (b'{"name": "r\xe9seau"}', "it is not UTF-8 text (byte 0xe9 at position 11); save it as UTF-8"),
])
def test_an_empty_or_non_utf8_model_json_is_one_clear_line(tmp_path, content, expected):
    path = tmp_path / "model.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(expected)):
        ModelDescription.from_json(path)
