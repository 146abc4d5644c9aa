"""The remaining refusals of issue 14 through the real ``medadv`` command: a SIGTERM during a bench, a study file
that is not UTF-8, damaged Analyze/NIfTI pairs, NaN or zero spacing in NRRD and MetaImage headers, a model or bench
output folder holding the user's files, and a named pipe given as a file. Each is one ``medadv: error:`` line
(exit 2), nothing is left behind and the inputs are byte-identical."""
import hashlib
import os
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import MEDADV
from MedAdvRobustnessLib import cli

FGSM = ["--model", "demo", "--attack", "fgsm", "--epsilon", "0.01"]


def digests(folder):
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()}


def one_error_line(capsys, argv):
    """Run ``medadv ARGV`` in this process: exit 2 after exactly one ``medadv: error:`` line, which it returns."""
    status = cli.main([str(item) for item in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("medadv: error: "), lines
    return lines[0]


def refused_run(capsys, tmp_path, volume, expected):
    """``medadv run`` on ``volume`` is refused with ``expected`` in its line; nothing is written, inputs intact."""
    before = digests(tmp_path)
    out = tmp_path / "results"
    line = one_error_line(capsys, ["run", "--volume", volume] + FGSM + ["--out", out])
    assert expected in line, line
    assert digests(tmp_path) == before and not out.exists()
    assert not [path for path in tmp_path.iterdir() if ".partial-" in path.name]
    return line


def small_volume():
    return (np.arange(20 * 24 * 16, dtype=np.float32).reshape(20, 24, 16) % 97) + 1.0


def analyze_pair(folder, name="pair", array=None, kind=nib.Nifti1Pair, cut=0):
    """``NAME.hdr`` + ``NAME.img`` of ``array`` (default :func:`small_volume`); ``cut``: bytes cut off the ``.img``."""
    header = folder / (name + ".hdr")
    nib.save(kind(small_volume() if array is None else array, np.eye(4)), str(header))
    data = folder / (name + ".img")
    data.write_bytes(data.read_bytes()[:data.stat().st_size - cut])
    return header


def with_nan(array):
    array = array.copy()
    array[3, 4, 5] = np.nan
    return array


PAIRS = {  # name: (make the pair, the file given, what the line says)
    "truncated .img (NIfTI pair)": (lambda f: analyze_pair(f, cut=3000), ".hdr",
                                    "(data file {folder}/pair.img) is truncated or damaged: it holds 27,720 of the "
                                    "30,720 bytes its header declares"),
    "truncated .img given as the .img": (lambda f: analyze_pair(f, cut=3000), ".img",
                                         "is truncated or damaged: it holds 27,720 of the 30,720 bytes"),
    "truncated .img (Analyze 7.5)": (lambda f: analyze_pair(f, kind=nib.AnalyzeImage, cut=100), ".hdr",
                                     "is truncated or damaged: it holds 30,620 of the 30,720 bytes"),
    "NaN voxel (NIfTI pair)": (lambda f: analyze_pair(f, array=with_nan(small_volume())), ".hdr",
                               "has 1 NaN or infinite voxel(s), the first at (i, j, k) = (3, 4, 5)"),
    "NaN voxel (Analyze 7.5)": (lambda f: analyze_pair(f, array=with_nan(small_volume()), kind=nib.AnalyzeImage),
                                ".hdr", "has 1 NaN or infinite voxel(s), the first at (i, j, k) = (3, 4, 5)"),
    ".img without its .hdr": (lambda f: (analyze_pair(f).unlink(), f / "pair.hdr")[1], ".img",
                              "is not a readable NIfTI or Analyze image"),
}


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_a_damaged_analyze_or_nifti_pair_is_refused(tmp_path, capsys, case):
    make, suffix, expected = PAIRS[case]
    given = make(tmp_path).with_suffix(suffix)
    refused_run(capsys, tmp_path, given, expected.format(folder=tmp_path))


def test_a_sound_pair_is_read_with_its_voxels(tmp_path):
    from MedAdvRobustnessLib.scene.nodes import volume_from_node
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
    volume = volume_from_node(SlicerScene.standalone().load_volume(analyze_pair(tmp_path)))
    assert np.array_equal(np.sort(np.asarray(volume.array).ravel()), np.sort(small_volume().ravel()))


def nrrd_header_file(folder, name, geometry):
    """A raw float NRRD of :func:`small_volume` (stored i fastest) with the ``geometry`` header lines."""
    header = "NRRD0004\ntype: float\ndimension: 3\n{}sizes: 20 24 16\nendian: little\nencoding: raw\n\n".format(
        "".join(line + "\n" for line in geometry))
    path = folder / name
    path.write_bytes(header.encode() + small_volume().astype("<f4").tobytes("F"))
    return path


def metaimage_header_file(folder, name, spacing):
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nElementSpacing = {}\n"
              "DimSize = 20 24 16\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n".format(spacing))
    path = folder / name
    path.write_bytes(header.encode() + small_volume().astype("<f4").tobytes("F"))
    return path


LPS = "space: left-posterior-superior"
SPACINGS = {  # name: (make the file, what the line says)
    "NaN spacings (.nrrd)": (lambda f: nrrd_header_file(f, "nan.nrrd", ["spacings: nan 1 1"]),
                             "gives spacing nan along axis i (spacings)"),
    "zero spacings (.nrrd)": (lambda f: nrrd_header_file(f, "zero.nrrd", ["spacings: 1 0 1"]),
                              "gives spacing 0.0 along axis j (spacings)"),
    "zero space direction (.nrrd)": (
        lambda f: nrrd_header_file(f, "flat.nrrd", [LPS, "space directions: (1,0,0) (0,1,0) (0,0,0)"]),
        "gives spacing 0.0 along axis k (space directions)"),
    "NaN space direction (.nrrd)": (
        lambda f: nrrd_header_file(f, "nandir.nrrd", [LPS, "space directions: (nan,0,0) (0,1,0) (0,0,1)"]),
        "gives spacing nan along axis i (space directions)"),
    "zero ElementSpacing (.mha)": (lambda f: metaimage_header_file(f, "zero.mha", "0 1 1"),
                                   "gives spacing 0.0 along axis i (ElementSpacing)"),
    "NaN ElementSpacing (.mha)": (lambda f: metaimage_header_file(f, "nan.mha", "1 1 nan"),
                                  "gives spacing nan along axis k (ElementSpacing)"),
}


@pytest.mark.parametrize("case", sorted(SPACINGS))
def test_a_nan_or_zero_spacing_names_the_file_and_the_spacing(tmp_path, capsys, case):
    make, expected = SPACINGS[case]
    volume = make(tmp_path)
    line = refused_run(capsys, tmp_path, volume, expected)
    assert str(volume) in line and "set the real spacing in the file" in line


def test_a_volume_with_valid_nrrd_spacings_is_read_at_them(tmp_path):
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
    node = SlicerScene.standalone().load_volume(nrrd_header_file(tmp_path, "fine.nrrd", ["spacings: 0.5 2 1.5"]))
    assert np.allclose(node.GetSpacing(), (0.5, 2.0, 1.5))


def test_a_named_pipe_is_called_not_a_regular_file(tmp_path, capsys):
    pipe = tmp_path / "scan.nii.gz"
    os.mkfifo(str(pipe))
    line = refused_run(capsys, tmp_path, pipe, "{} is not a regular file (a named pipe)".format(pipe))
    assert "not found" not in line
    study = tmp_path / "study.json"
    os.mkfifo(str(study))
    assert "{} is not a regular file (a named pipe)".format(study) in one_error_line(
        capsys, ["bench", study, "--out", tmp_path / "bench"])
    assert "case {}: volume {} is not a regular file".format("scan", pipe) in one_error_line(
        capsys, ["bench", "--networks", "demo", "--cases", pipe, "--attacks", "fgsm", "--epsilons", "0.01",
                 "--out", tmp_path / "bench"])
    assert not (tmp_path / "bench").exists()


def test_a_study_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    study = tmp_path / "study.json"
    study.write_bytes(b'{"networks": ["demo"], "cases": ["sample"], "probes": [{"attack": "fgsm", "name": "caf\xe9"}]}')
    line = one_error_line(capsys, ["bench", study, "--out", tmp_path / "bench"])
    assert "cannot read study {}: it is not UTF-8 text (byte 0xe9 at position 86)".format(study) in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["study.json"]


def users_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my own notes")
    (folder / "results.csv").write_text("my own,table\n")
    return folder


def test_bench_refuses_an_out_folder_of_the_user_s_own_files(tmp_path, capsys):
    folder = users_folder(tmp_path)
    before = digests(tmp_path)
    line = one_error_line(capsys, ["bench", "--networks", "demo", "--cases", "sample", "--attacks", "fgsm",
                                   "--epsilons", "0.01", "--out", folder])
    assert "output folder {} holds files that are not a study's outputs (notes.txt, results.csv)".format(folder) in line
    assert digests(tmp_path) == before and sorted(p.name for p in folder.iterdir()) == ["notes.txt", "results.csv"]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert "output folder {} is a file".format(notes) in one_error_line(
        capsys, ["bench", "--networks", "demo", "--cases", "sample", "--attacks", "fgsm", "--epsilons", "0.01",
                 "--out", notes])
    assert notes.read_text() == "mine"


def test_train_refuses_an_existing_model_folder_before_training(tmp_path, capsys):
    folder = users_folder(tmp_path)
    before = digests(tmp_path)
    start = time.time()
    for task in ("segmentation", "classification"):
        line = one_error_line(capsys, ["train", "--out", folder, "--iterations", "1", "--task", task])
        assert "model folder {} exists and is not empty".format(folder) in line, line
    assert time.time() - start < 10  # refused before any training
    assert digests(tmp_path) == before
    assert not [path for path in tmp_path.iterdir() if ".partial-" in path.name]


def test_sigterm_during_a_bench_is_one_line_and_leaves_no_partial_cell(tmp_path):
    out = tmp_path / "bench"
    process = subprocess.Popen([MEDADV, "bench", "--networks", "demo", "--cases", "sample", "--attacks", "fgsm",
                                "--epsilons", "0.01", "0.02", "0.04", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()  # the first cell's progress line: the second cell is running
    assert first.startswith("[1/3] "), first + process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 143, errors
    stored = sorted(path.name for path in (out / "cells").iterdir())
    assert not [name for name in stored if name.startswith(".")], stored  # no temporary file of a cut-off write
    records = [name[:-len(".json")] for name in stored if name.endswith(".json")]
    assert 1 <= len(records) < 3 and all(key + ".npz" in stored for key in records), stored  # each cell whole
    lines = errors.strip().splitlines()
    assert "Traceback" not in errors and all(line.startswith("[2/3] ") for line in lines[:-1]), errors
    assert lines[-1] == "medadv: terminated (SIGTERM); the {} cell(s) finished so far are kept in {} (the same " \
        "command goes on from them)".format(len(records), out / "cells"), errors
    assert not (out / "report.html").exists() and not (out / "study.json").exists()


def nifti_with_nan_origin(folder):
    """A NIfTI whose sform's x offset (srow_x[3], byte 292) is NaN, the qform unset."""
    image = nib.Nifti1Image(small_volume(), np.eye(4))
    image.header.set_qform(None, code=0)
    path = folder / "nan-origin.nii"
    nib.save(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[292:296] = np.float32(np.nan).tobytes()
    path.write_bytes(bytes(raw))
    return path


GEOMETRIES = {  # a damaged position: one line, not numpy's "SVD did not converge"
    "NaN sform offset (.nii)": (nifti_with_nan_origin, "has a NaN or infinite position or direction"),
    "origin 1e308 (.nrrd)": (lambda f: nrrd_header_file(f, "far.nrrd", [
        LPS, "space directions: (1,0,0) (0,1,0) (0,0,1)", "space origin: (1e308,1e308,1e308)"]),
        "has a position or voxel size of 1e+308 mm in its geometry, beyond any scanner"),
}


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_a_nan_or_absurd_position_is_one_line(tmp_path, capsys, case):
    make, expected = GEOMETRIES[case]
    refused_run(capsys, tmp_path, make(tmp_path), expected)


def test_labels_that_are_no_list_in_model_json_are_one_line(tmp_path, capsys):
    import json
    import shutil
    from MedAdvRobustnessLib.networks.models import MODELS_DIR
    model = tmp_path / "model"
    shutil.copytree(str(MODELS_DIR / "demo-unet"), str(model))
    description = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps(dict(description, labels=42)))
    volume = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(small_volume(), np.eye(4)), str(volume))
    line = one_error_line(capsys, ["run", "--volume", volume, "--model", model, "--attack", "fgsm", "--epsilon",
                                   "0.01", "--out", tmp_path / "results"])
    assert "labels must be a list of names" in line and "got 42" in line, line


@pytest.mark.parametrize("delay", [0.5, 1.5])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, delay):
    """SIGINT while VTK and torch are still importing (before any work): exit 130, one line, no traceback."""
    out = tmp_path / "results"
    process = subprocess.Popen([str(MEDADV), "demo", "--attack", "fgsm", "--epsilon", "0.01", "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert process.returncode == 130 and lines == ["medadv: interrupted (Ctrl-C); nothing was written"], stderr
    assert not out.exists() and not [path for path in tmp_path.iterdir() if ".partial-" in path.name]
