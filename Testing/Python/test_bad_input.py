"""Bad input through the real ``medadv`` command: one error line, the right exit status, nothing left behind, the
inputs byte-identical. Damaged files are refused rather than read as another image; Ctrl-C and SIGTERM clean up;
a staging folder left by a killed run is removed by the next run."""
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import MEDADV, can_mount
from MedAdvRobustnessLib.sample import SAMPLE_VOLUME
from MedAdvRobustnessLib.scene.results import OWNER_FILE, StagedOutput

FGSM = ["--model", "demo", "--attack", "fgsm", "--epsilon", "0.01"]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_volume():
    return (np.arange(20 * 24 * 16, dtype=np.float32).reshape(20, 24, 16) % 97) + 1.0


def truncated_gz(folder):
    path = folder / "whole.nii.gz"
    nib.save(nib.Nifti1Image(small_volume(), np.eye(4)), str(path))
    data = path.read_bytes()
    cut = folder / "truncated.nii.gz"
    cut.write_bytes(data[:len(data) // 2])
    return cut


def truncated_nii(folder):
    path = folder / "whole.nii"
    nib.save(nib.Nifti1Image(small_volume(), np.eye(4)), str(path))
    cut = folder / "truncated.nii"
    cut.write_bytes(path.read_bytes()[:-3000])
    return cut


def non_finite(folder):
    array = small_volume()
    array[3, 4, 5], array[6, 7, 8] = np.nan, np.inf
    path = folder / "nan.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def huge_header(folder):
    header = nib.Nifti1Header()
    header.set_data_shape((1200, 1200, 1200))
    header.set_data_dtype(np.float32)
    path = folder / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4000)  # 4 KB claiming 6.9 GB of voxels
    return path


def empty_file(folder):
    path = folder / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def text_file(folder):
    path = folder / "notes.nii"
    path.write_text("not an image\n")
    return path


def corrupt_gzip(folder):
    """A .nii.gz with bytes flipped in the middle of its compressed data: the length is right, gzip's CRC is not."""
    path = folder / "whole.nii.gz"
    nib.save(nib.Nifti1Image(small_volume(), np.eye(4)), str(path))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - value for value in data[middle:middle + 8])
    damaged = folder / "flipped.nii.gz"
    damaged.write_bytes(bytes(data))
    return damaged


def not_gzip(folder):
    path = folder / "plain.nii.gz"  # a .gz name on bytes that are not gzip
    path.write_bytes(os.urandom(2000))
    return path


def nrrd_file(folder, name, array_kji, encoding="raw", detached=False, cut=0):
    """A NRRD file (``.nhdr`` + ``.raw``: ``detached``) of a float32 (k, j, i) array; ``cut``: bytes cut off the
    end of the data."""
    data = array_kji.astype("<f4").tobytes()
    data = gzip.compress(data) if encoding == "gzip" else data
    data = data[:len(data) - cut]
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: {}\nspace directions: "
              "(1,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: {}\n".format(
                  " ".join(str(n) for n in array_kji.shape[::-1]), encoding))
    path = folder / name
    if detached:
        (folder / (name + ".raw")).write_bytes(data)
        path.write_text(header + "data file: {}.raw\n".format(name))
    else:
        path.write_bytes(header.encode() + b"\n" + data)
    return path


def metaimage_file(folder, name, array_kji, compressed=False, cut=0, sizes=None):
    """A MetaImage ``.mha`` file of a float32 (k, j, i) array (zlib-compressed: ``compressed``)."""
    data = array_kji.astype("<f4").tobytes()
    data = zlib.compress(data) if compressed else data
    data = data[:len(data) - cut]
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              "CompressedData = {}\nDimSize = {}\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n".format(
                  compressed, sizes or " ".join(str(n) for n in array_kji.shape[::-1])))
    path = folder / name
    path.write_bytes(header.encode() + data)
    return path


def with_non_finite(array_kji):
    array = array_kji.copy()
    array[5, 4, 3], array[8, 7, 6] = np.nan, -np.inf  # (i, j, k) = (3, 4, 5) first
    return array


def kji():
    return np.ascontiguousarray(small_volume().transpose())


CASES = {  # name: (make the file, what the one error line says)
    "truncated .nrrd (raw)": (lambda f: nrrd_file(f, "cut.nrrd", kji(), cut=3000),
                              "is truncated or damaged: it holds 27,720 of the 30,720 bytes"),
    "truncated .nrrd (gzip)": (lambda f: nrrd_file(f, "cut.nrrd", kji(), "gzip", cut=200),
                               "is truncated or damaged: it holds"),
    "truncated .nhdr + .raw": (lambda f: nrrd_file(f, "cut.nhdr", kji(), detached=True, cut=100),
                               "(data file {volume}.raw) is truncated or damaged"),
    "NaN and infinite voxels (.nrrd)": (lambda f: nrrd_file(f, "nan.nrrd", with_non_finite(kji()), "gzip"),
                                        "has 2 NaN or infinite voxel(s), the first at (i, j, k) = (3, 4, 5)"),
    "NaN and infinite voxels (.mha)": (lambda f: metaimage_file(f, "nan.mha", with_non_finite(kji())),
                                       "has 2 NaN or infinite voxel(s), the first at (i, j, k) = (3, 4, 5)"),
    "truncated .mha (zlib)": (lambda f: metaimage_file(f, "cut.mha", kji(), compressed=True, cut=100),
                              "is truncated or damaged"),
    ".mha header far larger than the file": (lambda f: metaimage_file(f, "huge.mha", kji(), sizes="1200 1200 1200"),
                                             "of the 6,912,000,000 bytes its header declares"),
    "random bytes named .nrrd": (lambda f: (f / "noise.nrrd").write_bytes(os.urandom(3000)) and f / "noise.nrrd",
                                 "is not a readable NRRD image"),
    "a NRRD header Slicer's reader refuses": (
        lambda f: (f / "odd.nrrd").write_bytes(nrrd_file(f, "x.nrrd", kji()).read_bytes().replace(
            b"space: left-posterior-superior\n", b"").replace(b"encoding", b"space: left-posterior-superior\nencoding"))
        and f / "odd.nrrd", "Slicer's volume reader cannot read {volume}: _nrrdReadNrrdParse_space_directions: "),
    "truncated .nii.gz": (truncated_gz, "is truncated or damaged: it holds"),
    "bytes flipped inside a .nii.gz": (corrupt_gzip, "is damaged: its gzip data fails gzip's own check"),
    "truncated .nii": (truncated_nii, "is truncated or damaged: it holds"),
    "NaN and infinite voxels": (non_finite, "has 2 NaN or infinite voxel(s), the first at (i, j, k) = (3, 4, 5)"),
    "header far larger than the file": (huge_header, "is truncated or damaged"),
    "empty file": (empty_file, "is not a readable NIfTI image"),
    "text named .nii": (text_file, "is not a readable NIfTI image"),
    "random bytes named .nii.gz": (not_gzip, "is not a readable NIfTI image"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_volume_is_refused_in_one_line_and_nothing_is_left(tmp_path, case):
    make, expected = CASES[case]
    volume = make(tmp_path)
    inputs = {path: digest(path) for path in tmp_path.iterdir()}
    out = tmp_path / "results"
    start = time.time()
    line = one_error_line([MEDADV, "run", "--volume", str(volume)] + FGSM + ["--out", str(out)])
    assert expected.format(volume=volume) in line, line
    assert time.time() - start < 240  # refused before anything large is allocated
    assert_nothing_left(tmp_path, out)
    assert {path: digest(path) for path in inputs} == inputs


def one_error_line(command, status=2):
    """Run ``command``; it must exit with ``status`` after exactly one ``medadv: error:`` line and no traceback."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status and len(lines) == 1 and lines[0].startswith("medadv: error: "), done.stderr
    return lines[0]


def assert_nothing_left(folder, out):
    assert not os.path.lexists(str(out)) and not [p for p in folder.iterdir() if ".partial-" in p.name]


def test_the_memory_check_names_the_size_and_what_is_free(tmp_path):
    from MedAdvRobustnessLib.errors import InputError
    from MedAdvRobustnessLib.scene import slicer_scene
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(small_volume(), np.eye(4)), str(path))
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(InputError, match=r"4000x4000x4000 voxels need about .* GiB of memory .* GiB are free"):
        slicer_scene._check_memory(path, (4000, 4000, 4000), 4000 ** 3)
    slicer_scene._check_memory(path, (20, 24, 16), 20 * 24 * 16)  # small: fine
    assert free > 0


def start_demo(tmp_path, out):
    """A running ``medadv demo`` with the default SIGINT disposition (a background job ignores SIGINT)."""
    code = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.argv[1], sys.argv[1:])")
    command = [sys.executable, "-c", code, MEDADV, "demo", "--attack", "pgd", "--epsilon", "0.01", "0.02",
               "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_staging(tmp_path, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if [p for p in tmp_path.iterdir() if ".partial-" in p.name]:
            time.sleep(1.0)  # into the work
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("signal_number, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                         (signal.SIGTERM, 143, "terminated"),
                                                         (signal.SIGHUP, 129, "the terminal hung up"),
                                                         (signal.SIGQUIT, 131, "quit (SIGQUIT")])
def test_ctrl_c_and_sigterm_end_in_one_line_and_leave_nothing(tmp_path, signal_number, status, word):
    out = tmp_path / "results"
    process = start_demo(tmp_path, out)
    assert wait_for_staging(tmp_path, process), process.communicate()[1]
    process.send_signal(signal_number)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == status, errors
    assert errors.strip().splitlines()[-1].startswith("medadv: {}".format(word)) and "Traceback" not in errors
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_killed_run_s_staging_folder_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "results"
    process = start_demo(tmp_path, out)
    assert wait_for_staging(tmp_path, process)
    process.kill()
    process.wait()
    stale = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(stale) == 1 and (stale[0] / OWNER_FILE).is_file()  # SIGKILL: nothing could clean up
    alive = tmp_path / ".results.partial-other"  # a staging folder of a run that is still going: kept
    alive.mkdir()
    (alive / OWNER_FILE).write_text(str(os.getpid()))
    with StagedOutput(out) as staging:
        (staging / "file.txt").write_text("done")
    assert not stale[0].exists() and alive.exists()
    assert sorted(p.name for p in out.iterdir()) == ["file.txt"]  # the owner file does not reach the results


def test_medadv_attacks_into_a_closed_pipe_ends_quietly():
    done = subprocess.run("{} attacks | head -c 10 > /dev/null; echo ${{PIPESTATUS[0]}}".format(MEDADV),
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stdout.strip() in ("0", "141")


def test_an_output_folder_the_system_refuses_is_one_error_line(tmp_path):
    out = "/proc/medadv-results"
    done = subprocess.run([MEDADV, "run", "--volume", str(SAMPLE_VOLUME)] + FGSM + ["--out", out],
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("medadv: error: "), done.stderr
    assert "/proc" in lines[0]


def test_gzip_check_reads_a_sound_file_whole(tmp_path):
    from MedAdvRobustnessLib.scene.slicer_scene import _stored_bytes
    path = tmp_path / "sound.nii.gz"
    nib.save(nib.Nifti1Image(small_volume(), np.eye(4)), str(path))
    with gzip.open(str(path), "rb") as stream:
        size = len(stream.read())
    assert _stored_bytes(path, size) == (size, True) and _stored_bytes(path, 10) == (10, True)


@pytest.mark.parametrize("content, expected", [
    (np.random.default_rng(0).bytes(3000), "cannot read {} as a PyTorch checkpoint: the file is damaged or of another kind"),
    (b"just some text\n", "cannot read {} as a PyTorch checkpoint: the file is damaged or of another kind"),
])
def test_a_damaged_model_file_is_called_damaged_not_unsafe(tmp_path, content, expected):
    model = tmp_path / "model.pt"
    model.write_bytes(content)
    done = subprocess.run([MEDADV, "run", "--volume", str(SAMPLE_VOLUME), "--model", str(model), "--attack", "fgsm",
                           "--epsilon", "0.01", "--out", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and expected.format(model) in lines[0], done.stderr
    assert "--trust-checkpoint" not in lines[0]


def test_out_at_a_file_is_called_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    done = subprocess.run([MEDADV, "run", "--volume", str(SAMPLE_VOLUME)] + FGSM + ["--out", str(target)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "{} is a file: the results need a folder".format(target) in done.stderr
    assert target.read_text() == "mine"


def small_nifti(path, affine=np.eye(4), labels=False):
    array = (small_volume() % 3).astype(np.int16) if labels else small_volume()
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


class TwoChannelNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, inputs):
        return self.conv(inputs)


def test_a_network_wanting_other_input_channels_is_named_with_both_counts(tmp_path):
    model = tmp_path / "two-channels.pt"
    torch.jit.save(torch.jit.script(TwoChannelNetwork()), str(model))
    volume = small_nifti(tmp_path / "volume.nii.gz")
    out = tmp_path / "results"
    line = one_error_line([MEDADV, "run", "--volume", str(volume), "--model", str(model), "--attack", "fgsm",
                           "--epsilon", "0.01", "--out", str(out)])
    assert "model two-channels (TorchScript {})".format(model) in line, line
    assert "first convolution takes 2 input channel(s) but the volume gives 1" in line, line
    assert_nothing_left(tmp_path, out)


def test_an_unknown_intensity_type_names_the_file_the_value_and_the_known_ones(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    description = folder / "model.json"
    description.write_text(json.dumps({"name": "mine", "intensity": [{"type": "zscore"}, {"type": "zscroe"}],
                                       "architecture": {"name": "UNet", "args": {}}}))
    before = digest(description)
    out = tmp_path / "results"
    line = one_error_line([MEDADV, "run", "--volume", str(SAMPLE_VOLUME), "--model", str(folder), "--attack", "fgsm",
                           "--epsilon", "0.01", "--out", str(out)])
    assert "{}: unknown intensity type 'zscroe'; known types: none, percentile, zscore".format(description) in line
    assert_nothing_left(tmp_path, out)
    assert digest(description) == before


def test_architecture_arguments_monai_refuses_are_one_line(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"name": "mine", "architecture": {"name": "UNet", "args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4], "strides": []}}}))
    torch.save({}, str(folder / "model.pt"))
    out = tmp_path / "results"
    line = one_error_line([MEDADV, "run", "--volume", str(SAMPLE_VOLUME), "--model", str(folder), "--attack", "fgsm",
                           "--epsilon", "0.01", "--out", str(out)])
    assert "cannot build UNet with" in line and "the length of `channels` should be no less than 2" in line, line
    assert_nothing_left(tmp_path, out)


def test_a_bench_case_that_is_not_an_image_is_refused_before_any_cell(tmp_path):
    (tmp_path / "notes.nii.gz").write_text("not an image\n")
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"networks": ["demo-unet"], "cases": [
        "sample", {"name": "p7", "volume": "notes.nii.gz"}], "probes": [{"attack": "fgsm", "epsilons": [0.01]}]}))
    out = tmp_path / "bench"
    start = time.time()
    line = one_error_line([MEDADV, "bench", str(study), "--out", str(out)])
    assert "study: case p7: volume {} is not a readable NIfTI image".format(tmp_path / "notes.nii.gz") in line, line
    assert time.time() - start < 240 and not out.exists()


def test_bench_says_how_a_study_trusts_a_checkpoint_and_then_loads_it(tmp_path):
    from MedAdvRobustnessLib.study import cells
    from MedAdvRobustnessLib.study.definition import resolve_study
    model = tmp_path / "pickled.pt"
    torch.save(torch.nn.Conv3d(1, 2, 3, padding=1), str(model))  # a pickled network: only trusted
    study = tmp_path / "study.json"
    network = {"name": "pickled", "source": "pickled.pt"}
    study.write_text(json.dumps({"networks": [network], "cases": ["sample"],
                                 "probes": [{"attack": "fgsm", "epsilons": [0.01]}]}))
    out = tmp_path / "bench"
    line = one_error_line([MEDADV, "bench", str(study), "--out", str(out)])
    assert "refusing to load {}".format(model) in line and "--trust-checkpoint" not in line, line
    assert '"trust_checkpoint": true in the study file\'s entry of network pickled' in line, line
    trusted = resolve_study({"networks": [dict(network, source=str(model), trust_checkpoint=True)],
                             "cases": ["sample"], "probes": [{"attack": "fgsm", "epsilons": [0.01]}]})
    assert cells._cached_model(trusted["networks"][0]).source == "pickled network {}".format(model)
    untrusted = resolve_study({"networks": [str(model)], "cases": ["sample"],
                               "probes": [{"attack": "fgsm", "epsilons": [0.01]}]})
    assert "trust_checkpoint" not in untrusted["networks"][0]  # the cell keys of existing studies stay


def test_a_grid_mismatch_of_the_same_shape_says_what_differs_and_names_the_region(tmp_path):
    volume = small_nifti(tmp_path / "volume.nii.gz")
    moved = np.diag([2.0, 2.0, 2.0, 1.0])
    moved[:3, 3] = (10, 0, 0)
    reference = small_nifti(tmp_path / "labels.nii.gz", moved, labels=True)
    out = tmp_path / "results"
    line = one_error_line([MEDADV, "run", "--volume", str(volume), "--reference", str(reference)] + FGSM +
                          ["--out", str(out)])
    assert "reference labels is on another grid than volume volume: spacing (2, 2, 2) vs (1, 1, 1)" in line, line
    assert "origin (10, 0, 0) vs (0, 0, 0) (reference vs volume)" in line, line
    assert "direction" not in line, line
    line = one_error_line([MEDADV, "run", "--volume", str(volume), "--region", str(reference)] + FGSM +
                          ["--out", str(out)])
    assert line.startswith("medadv: error: region labels is on another grid"), line
    assert_nothing_left(tmp_path, out)


NEEDS_MOUNT = pytest.mark.skipif(not can_mount(), reason="this machine lets no user namespace mount a tmpfs "
                                                         "(unshare -rm mount -t tmpfs failed)")


def in_mount_namespace(mounts, command):
    """Run ``command`` where each ``(folder, options)`` of ``mounts`` is a fresh tmpfs; what it printed, its exit
    status, and what the mounted folders held after it (they vanish with the namespace)."""
    script = "".join("mount -t tmpfs -o {} tmpfs {} || exit 99\n".format(options, folder) for folder, options in mounts)
    script += " ".join("'{}'".format(part) for part in command) + "\necho status=$? >&2\n"
    script += "".join("ls -A {} | sed 's/^/left: /' >&2\n".format(folder) for folder, _options in mounts)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    status = [line for line in lines if line.startswith("status=")]
    assert status, done.stderr
    return ([line for line in lines if not line.startswith(("status=", "left: "))], int(status[0][7:]),
            [line[6:] for line in lines if line.startswith("left: ")])


@NEEDS_MOUNT
def test_a_full_disk_ends_in_one_line_and_leaves_nothing(tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    before = digest(SAMPLE_VOLUME)
    lines, status, left = in_mount_namespace([(disk, "size=300k")], [MEDADV, "demo", "--attack", "fgsm", "--epsilon",
                                                                     "0.01", "--out", str(disk / "results")])
    errors = [line for line in lines if not line.startswith("[")]  # the progress lines come before
    assert status == 2 and len(errors) == 1 and errors[0].startswith("medadv: error: cannot write"), lines
    assert "written incompletely (is the disk full?)" in errors[0] or "No space left" in errors[0], errors
    assert left == [] and digest(SAMPLE_VOLUME) == before


@NEEDS_MOUNT
@pytest.mark.parametrize("options, out, expected", [
    ("ro,size=64k", "{disk}/results", "the folder {disk} is not writable (read-only or no permission)"),
    ("size=64k", "{disk}", "{disk} is a mount point (another file system than {parent})"),
])
def test_an_output_folder_on_a_read_only_or_other_file_system_is_refused_first(tmp_path, options, out, expected):
    disk = tmp_path / "disk"
    disk.mkdir()
    lines, status, left = in_mount_namespace([(disk, options)], [MEDADV, "run", "--volume", str(SAMPLE_VOLUME)] +
                                             FGSM + ["--out", out.format(disk=disk)])
    assert status == 2 and len(lines) == 1 and lines[0].startswith("medadv: error: "), lines
    assert expected.format(disk=disk, parent=tmp_path) in lines[0], lines[0]
    assert left == [] and sorted(p.name for p in tmp_path.iterdir()) == ["disk"]


def make_link_to_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "results").symlink_to(tmp_path / "real")
    return tmp_path / "results"


def make_dangling_link(tmp_path):
    (tmp_path / "results").symlink_to(tmp_path / "nowhere")
    return tmp_path / "results"


def make_parent_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt" / "results"


OUTPUT_PATHS = {  # name: (make the --out path, what the one error line says)
    "a link to a folder": (make_link_to_folder, "{out} is a symbolic link: give a new or empty folder itself"),
    "a dangling link": (make_dangling_link, "{out} is a symbolic link to nothing"),
    "under a dangling link": (lambda tmp: make_dangling_link(tmp) / "run",
                              "cannot create {out}: {tmp}/results is a symbolic link to nothing"),
    "in a file": (make_parent_file, "cannot create {out}: {tmp}/notes.txt is not a folder"),
    "a 250-character name": (lambda tmp: tmp / ("r" * 250), "is 250 bytes long; with its staging folder's 18 more"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_PATHS))
def test_an_output_path_that_cannot_work_is_refused_before_the_work(tmp_path, case):
    make, expected = OUTPUT_PATHS[case]
    out = make(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    start = time.time()
    line = one_error_line([MEDADV, "run", "--volume", str(SAMPLE_VOLUME)] + FGSM + ["--out", str(out)])
    assert expected.format(out=out, tmp=tmp_path) in line, line
    assert time.time() - start < 240 and sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_failed_run_removes_the_folders_it_created_above_the_output(tmp_path):
    volume = nrrd_file(tmp_path, "cut.nrrd", kji(), cut=3000)
    out = tmp_path / "new" / "deeper" / "results"
    line = one_error_line([MEDADV, "run", "--volume", str(volume)] + FGSM + ["--out", str(out)])
    assert "is truncated or damaged" in line and not (tmp_path / "new").exists(), line


def test_results_that_cannot_be_moved_into_place_are_not_left_in_the_staging_folder(tmp_path):
    out = tmp_path / "results"
    with pytest.raises(OSError, match="cannot move the results into place .*; nothing was kept"):
        with StagedOutput(out) as staging:
            (staging / "metrics.csv").write_text("done")
            out.mkdir()
            (out / "someone-else.txt").write_text("theirs")  # DIR filled while the run went on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert sorted(p.name for p in out.iterdir()) == ["someone-else.txt"]


def test_grid_differences_name_only_what_differs_with_both_values():
    from MedAdvRobustnessLib.scene.nodes import grid_differences
    flipped = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert grid_differences(np.eye(4), flipped) == ["direction (1, 0, 0, 0, 1, 0, 0, 0, 1) vs "
                                                    "(-1, 0, 0, 0, -1, 0, 0, 0, 1)"]
    assert grid_differences(flipped, flipped) == []


def test_a_network_that_outputs_nan_or_fails_on_the_volume_is_one_line(tmp_path):
    class Failing(torch.nn.Module):
        def forward(self, x):
            if x.shape[-1] > 0:
                raise RuntimeError("boom inside the network")
            return x

    for name, network, expected in (
            ("nan.pt", torch.nn.Sequential(torch.nn.Conv3d(1, 3, 1), torch.nn.Threshold(1e9, float("nan"))),
             "outputs NaN or infinite values on this volume"),
            ("fails.pt", Failing(), "fails on this volume (80x96x80 input): builtins.RuntimeError: boom inside the network")):
        model = tmp_path / name
        torch.jit.script(network).save(str(model))
        out = tmp_path / "results"
        line = one_error_line([MEDADV, "run", "--volume", str(SAMPLE_VOLUME), "--model", str(model), "--attack",
                               "fgsm", "--epsilon", "0.01", "--out", str(out)])
        assert expected in line, line
        assert_nothing_left(tmp_path, out)


def test_an_empty_out_a_damaged_scene_and_a_volume_beyond_float32_are_one_line(tmp_path):
    assert "the results folder is empty text" in one_error_line([MEDADV, "run", "--volume", str(SAMPLE_VOLUME)] +
                                                                FGSM + ["--out", ""])
    scene = tmp_path / "scene.mrb"
    scene.write_bytes(os.urandom(3000))
    assert "is not a readable scene bundle" in one_error_line([MEDADV, "view", str(scene), "--port", "0"])
    huge = tmp_path / "huge-values.nii.gz"
    nib.save(nib.Nifti1Image(small_volume().astype(np.float64) * 1e300, np.eye(4)), str(huge))
    out = tmp_path / "results"
    assert "has voxels beyond the float32 range" in one_error_line([MEDADV, "run", "--volume", str(huge)] + FGSM +
                                                                   ["--out", str(out)])
    assert_nothing_left(tmp_path, out)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_ssim_of_a_single_slice_is_the_2d_ssim_of_that_slice(axis):
    from monai.metrics import SSIMMetric
    from skimage.metrics import structural_similarity as reference_ssim
    from MedAdvRobustnessLib.evaluation.metrics import structural_similarity
    generator = torch.Generator().manual_seed(axis)
    image = torch.rand(40, 32, generator=generator) * 100
    noisy = image + torch.randn(image.shape, generator=generator) * 10
    expected = float(SSIMMetric(spatial_dims=2, data_range=100.0, win_size=7)(noisy[None, None], image[None, None]))
    independent = reference_ssim(image.double().numpy(), noisy.double().numpy(), data_range=100.0, sigma=1.5,
                                 gaussian_weights=True, truncate=2.0, use_sample_covariance=False)  # 7x7 as well
    volume, probed = image.unsqueeze(axis), noisy.unsqueeze(axis)
    assert structural_similarity(volume, probed, 100.0) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(independent, abs=5e-3)  # MONAI's kernel differs slightly from scikit-image's
    assert structural_similarity(volume, volume, 100.0) == pytest.approx(1.0)
    slices = torch.stack([image, noisy, image], dim=axis), torch.stack([noisy, image, image], dim=axis)
    assert structural_similarity(*slices, 100.0) == pytest.approx((2 * expected + 1) / 3, abs=1e-6)  # per slice


def test_ssim_refuses_a_volume_with_one_long_axis_and_a_one_slice_run_works(tmp_path):
    from MedAdvRobustnessLib.errors import InputError
    from MedAdvRobustnessLib.evaluation.metrics import structural_similarity
    with pytest.raises(InputError, match=r"the volume \(64x3x1\) is too small for SSIM"):
        structural_similarity(torch.zeros(64, 3, 1), torch.zeros(64, 3, 1), 1.0)
    volume = tmp_path / "slice.nii.gz"  # a 2D image as Slicer loads it
    nib.save(nib.Nifti1Image((np.arange(64 * 64, dtype=np.float32).reshape(64, 64, 1) % 97) + 1, np.eye(4)),
             str(volume))
    done = subprocess.run([MEDADV, "run", "--volume", str(volume)] + FGSM + ["--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    with open(str(tmp_path / "out" / "metrics.csv")) as table:
        import csv
        rows = [row for row in csv.DictReader(table) if row["label"] == "mean"]
    assert float(rows[0]["ssim"]) == 1 and 0 < float(rows[-1]["ssim"]) < 1


def nifti_header_file(folder, name, **fields):
    """``small_volume()`` as a .nii with header ``fields`` written as given (nibabel's save would repair them)."""
    header = nib.Nifti1Image(small_volume(), np.eye(4)).header
    header["vox_offset"] = 352
    for key, value in fields.items():
        header[key] = value
    path = folder / name
    path.write_bytes(header.binaryblock + b"\0" * 4 + small_volume().tobytes("F"))
    return path


def nrrd_sizes_file(folder, sizes):
    path = folder / "sizes.nrrd"
    path.write_bytes("NRRD0004\ntype: float\ndimension: 3\nsizes: {}\nencoding: raw\n\n".format(sizes).encode() +
                     small_volume().tobytes())
    return path


HEADERS = {  # name: (make the file, what the error says)
    "negative NIfTI dimension": (lambda f: nifti_header_file(f, "neg.nii", dim=[3, 20, -24, 16, 1, 1, 1, 1]),
                                 "its header gives size -24 along axis j (sizes 20 -24 16)"),
    "vox_offset past the end": (lambda f: nifti_header_file(f, "offset.nii", vox_offset=1e7),
                                "puts the voxel data at byte 10,000,000 (vox_offset), at or past the end of the "
                                "file's 31,072 bytes"),
    "zero spacing (pixdim)": (lambda f: nifti_header_file(f, "flat.nii", pixdim=[1, 1, 1, 0, 1, 1, 1, 1],
                                                          sform_code=0, qform_code=1),
                              "gives spacing 0.0 along axis k (pixdim); nibabel, ITK and Slicer would take it as 1 mm"),
    "zero spacing (sform)": (lambda f: nifti_header_file(f, "flat.nii", srow_y=[0, 0, 0, 0], sform_code=2),
                             "gives spacing 0.0 along axis j (sform)"),
    "negative NRRD size": (lambda f: nrrd_sizes_file(f, "16 -24 20"), "its header gives size -24 along axis j"),
    "overflowing NRRD sizes": (lambda f: nrrd_sizes_file(f, "16 24 99999999999999999999"),
                               "its header sizes 16 24 99999999999999999999 overflow"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_an_impossible_header_is_refused_with_what_it_says(tmp_path, case):
    from MedAdvRobustnessLib.errors import InputError
    from MedAdvRobustnessLib.scene.slicer_scene import check_volume_file
    make, expected = HEADERS[case]
    with pytest.raises(InputError) as error:
        check_volume_file(make(tmp_path))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_zero_spacing_is_refused_by_medadv_run(tmp_path):
    volume = HEADERS["zero spacing (pixdim)"][0](tmp_path)
    out = tmp_path / "results"
    assert "along axis k (pixdim)" in one_error_line([MEDADV, "run", "--volume", str(volume)] + FGSM +
                                                     ["--out", str(out)])
    assert_nothing_left(tmp_path, out)


def test_stale_staging_folders_of_dead_runs_are_removed_whatever_their_name(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    folders = {name: tmp_path / name for name in (".old-run.partial-abc", ".other.partial-x", ".live.partial-y",
                                                  "mine.partial-1")}
    for name, folder in folders.items():
        folder.mkdir()
    for name in (".old-run.partial-abc", "mine.partial-1"):
        (folders[name] / OWNER_FILE).write_text(str(dead.pid))  # "mine...": no leading dot, not a staging folder
    (folders[".live.partial-y"] / OWNER_FILE).write_text(str(os.getpid()))
    with StagedOutput(tmp_path / "results") as staging:
        (staging / "file.txt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.partial-x", ".live.partial-y",
                                                                 "mine.partial-1", "results"])


def test_a_study_whose_first_cell_fails_leaves_no_folder(tmp_path):
    from MedAdvRobustnessLib.study.execution import run_study

    class Failing(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom inside the network")

    model = tmp_path / "fails.pt"
    torch.jit.script(Failing()).save(str(model))
    out = tmp_path / "new" / "out"
    one_line = r"cell failed \(network fails.pt, .*\): builtins.RuntimeError: boom inside the network$"
    with pytest.raises(RuntimeError, match=one_line):
        run_study({"networks": [str(model)], "cases": ["sample"], "probes": [{"attack": "fgsm", "epsilons": [0.01]}]},
                  out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fails.pt"]


def test_heldout_beyond_the_limit_and_a_multi_line_yaml_error_are_one_line(tmp_path):
    from MedAdvRobustnessLib.errors import InputError
    from MedAdvRobustnessLib.study.cases import resolve_cases
    from MedAdvRobustnessLib.study.definition import load_study
    start = time.time()
    with pytest.raises(InputError, match=r"give heldout:N with N from 1 to 100 "):
        resolve_cases("heldout:1000000000")
    assert time.time() - start < 5
    study = tmp_path / "study.yaml"
    study.write_text("networks: [demo\ncases:\n  - sample\n")
    with pytest.raises(InputError) as error:
        load_study(study)
    assert "\n" not in str(error.value) and "line 2, column 6: expected ',' or ']'" in str(error.value)


def test_train_refuses_a_file_as_out_and_prints_no_library_warnings(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert "{} is a file: give a folder".format(target) in one_error_line(
        [MEDADV, "train", "--out", str(target), "--iterations", "1"])
    done = subprocess.run([MEDADV, "train", "--out", str(tmp_path / "net"), "--iterations", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "" and target.read_text() == "mine"
