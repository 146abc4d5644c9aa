"""Bad input through the real ``medadv`` command: one error line, the right exit status, nothing left behind, the
inputs byte-identical. Damaged files are refused rather than read as another image; Ctrl-C and SIGTERM clean up;
a staging folder left by a killed run is removed by the next run."""
import gzip
import hashlib
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import MEDADV
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


def not_gzip(folder):
    path = folder / "plain.nii.gz"  # a .gz name on bytes that are not gzip
    path.write_bytes(os.urandom(2000))
    return path


CASES = {  # name: (make the file, what the one error line says)
    "truncated .nii.gz": (truncated_gz, "is truncated or damaged: it holds"),
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
    before = digest(volume)
    out = tmp_path / "results"
    start = time.time()
    done = subprocess.run([MEDADV, "run", "--volume", str(volume)] + FGSM + ["--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("medadv: error: "), done.stderr
    assert expected in lines[0], lines[0]
    assert time.time() - start < 60  # refused before anything large is allocated
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert digest(volume) == before


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
                                                         (signal.SIGTERM, 143, "terminated")])
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
    assert _stored_bytes(path, size) == size and _stored_bytes(path, 10) == 10


@pytest.mark.parametrize("content, expected", [
    (os.urandom(3000), "cannot read {} as a PyTorch checkpoint: the file is damaged or of another kind"),
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
