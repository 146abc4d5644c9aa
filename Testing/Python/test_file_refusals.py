"""Issue 14 (reliability): volume files that nibabel and Slicer's reader would read as another image, or that got
a misleading message, are refused in one line naming the field and its value: a NIfTI scaling the readers apply
differently, a NaN qform or sform, a dim[0] outside 1 to 7, complex voxels, a NaN or infinite MetaImage or NRRD
origin or direction, and a .nii.gz whose gzip data end early. A write that meets a full disk names the file and
says so, and leaves no results behind."""
import os
import subprocess
import sys
import zlib

import nibabel as nib
import numpy as np
import pytest

from conftest import can_mount
from MedAdvRobustnessLib import cli
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.scene.results import StagedOutput, write_text_checked
from MedAdvRobustnessLib.scene.slicer_scene import check_volume_file

SHAPE = (20, 24, 16)


def small_volume():
    return (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) % 97) + 1.0


def nifti_file(folder, name, endian="<", **fields):
    """:func:`small_volume` as a .nii whose header ``fields`` are written as given (nibabel's save repairs them);
    no scaling (scl_slope 1, scl_inter 0) unless given."""
    header = nib.Nifti1Header(endianness=endian)
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"], header["scl_slope"], header["scl_inter"] = 352, 1, 0
    for key, value in fields.items():
        header[key] = value
    path = folder / name
    path.write_bytes(header.binaryblock + b"\0" * 4 + small_volume().astype(endian + "f4").tobytes("F"))
    return path


def complex_file(folder, dtype):
    path = folder / "complex.nii"
    nib.save(nib.Nifti1Image(small_volume().astype(dtype), np.eye(4)), str(path))
    return path


def metaimage_file(folder, geometry):
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n{}\n"
              "ElementSpacing = 1 1 1\nDimSize = 20 24 16\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
              .format(geometry))
    path = folder / "geometry.mha"
    path.write_bytes(header.encode() + small_volume().astype("<f4").tobytes("F"))
    return path


def nrrd_file(folder, origin):
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 20 24 16\nspace "
              "directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: {}\nendian: little\nencoding: raw\n\n".format(origin))
    path = folder / "geometry.nrrd"
    path.write_bytes(header.encode() + small_volume().astype("<f4").tobytes("F"))
    return path


REFUSED = {  # name: (make the file, what its one line says)
    "scl_slope NaN with scl_inter 3": (
        lambda f: nifti_file(f, "slope.nii", scl_slope=np.nan, scl_inter=3),
        "has scl_slope nan with scl_inter 3 in its header; nibabel reads the voxels unscaled, Slicer's reader adds "
        "scl_inter"),
    "scl_slope inf with scl_inter -2": (lambda f: nifti_file(f, "slope.nii", scl_slope=np.inf, scl_inter=-2),
                                        "has scl_slope inf with scl_inter -2 in its header"),
    "scl_slope 0 with scl_inter 5": (lambda f: nifti_file(f, "slope.nii", scl_slope=0, scl_inter=5),
                                     "has scl_slope 0 with scl_inter 5 in its header"),
    "scl_inter NaN under scl_slope 2": (
        lambda f: nifti_file(f, "inter.nii", scl_slope=2, scl_inter=np.nan),
        "has scl_inter nan in its header (scl_slope 2); nibabel refuses it, Slicer's reader would take it as 0"),
    "scl_inter -inf under scl_slope 0.5": (lambda f: nifti_file(f, "inter.nii", scl_slope=0.5, scl_inter=-np.inf),
                                           "has scl_inter -inf in its header (scl_slope 0.5)"),
    "NaN quatern_b": (lambda f: nifti_file(f, "q.nii", sform_code=0, quatern_b=np.nan),
                      "has a NaN or infinite position or direction in its header (quatern_b = nan, qform_code 1); "
                      "Slicer's reader would read another geometry or fail: set the file's qform"),
    "infinite qoffset_y, the sform set too": (lambda f: nifti_file(f, "q.nii", qoffset_y=np.inf),
                                              "(qoffset_y = inf, qform_code 1)"),
    "NaN direction in srow_y": (lambda f: nifti_file(f, "s.nii", qform_code=0, sform_code=2, srow_y=[0, np.nan, 0, 0]),
                                "(srow_y = 0 nan 0 0, sform_code 2); Slicer's reader would read another geometry or "
                                "fail: set the file's sform"),
    "dim[0] 9": (lambda f: nifti_file(f, "dim.nii", dim=[9, 20, 24, 16, 1, 1, 1, 1]),
                 "is damaged: its header's dim[0] is 9; NIfTI allows 1 to 7"),
    "dim[0] 9, big-endian": (lambda f: nifti_file(f, "dim.nii", endian=">", dim=[9, 20, 24, 16, 1, 1, 1, 1]),
                             "is damaged: its header's dim[0] is 9; NIfTI allows 1 to 7"),
    "dim[0] 0": (lambda f: nifti_file(f, "dim.nii", dim=[0, 20, 24, 16, 1, 1, 1, 1]),
                 "is damaged: its header's dim[0] is 0; NIfTI allows 1 to 7"),
    "complex64 voxels": (lambda f: complex_file(f, np.complex64),
                         "holds complex voxels (complex64); give a real-valued volume"),
    "complex128 voxels": (lambda f: complex_file(f, np.complex128),
                          "holds complex voxels (complex128); give a real-valued volume"),
    "MetaImage Offset nan": (lambda f: metaimage_file(f, "Offset = nan 0 0"),
                             "has a NaN or infinite position or direction in its header (Offset: nan 0 0)"),
    "MetaImage Position inf": (lambda f: metaimage_file(f, "Position = 0 inf 0"), "(Position: 0 inf 0)"),
    "MetaImage Origin nan": (lambda f: metaimage_file(f, "Origin = 0 0 nan"), "(Origin: 0 0 nan)"),
    "MetaImage TransformMatrix nan": (lambda f: metaimage_file(f, "TransformMatrix = 1 0 0 0 nan 0 0 0 1"),
                                      "(TransformMatrix: 1 0 0 0 nan 0 0 0 1)"),
    "MetaImage Rotation inf": (lambda f: metaimage_file(f, "Rotation = 1 0 0 0 1 0 0 0 inf"),
                               "(Rotation: 1 0 0 0 1 0 0 0 inf)"),
    "NRRD space origin nan": (lambda f: nrrd_file(f, "(nan,0,0)"),
                              "has a NaN or infinite position or direction in its header (space origin: (nan,0,0))"),
    "NRRD space origin inf": (lambda f: nrrd_file(f, "(0,0,inf)"), "(space origin: (0,0,inf))"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_header_the_readers_would_misread_is_refused_in_one_line(tmp_path, case):
    make, expected = REFUSED[case]
    path = make(tmp_path)
    before = path.read_bytes()
    with pytest.raises(InputError) as error:
        check_volume_file(path)
    line = str(error.value)
    assert line.startswith(str(path)) and expected in line and "\n" not in line, line
    assert path.read_bytes() == before


ACCEPTED = {  # headers the readers agree on: read as they are
    "no scaling (scl_slope and scl_inter NaN, as in nibabel's unsaved header)": dict(scl_slope=np.nan,
                                                                                      scl_inter=np.nan),
    "no scaling (scl_slope 0, scl_inter 0)": dict(scl_slope=0, scl_inter=0),
    "scaling 2x + 1": dict(scl_slope=2, scl_inter=1),
    "NaN quaternion under qform_code 0": dict(qform_code=0, quatern_b=np.nan),
    "NaN srow_x under sform_code 0": dict(sform_code=0, srow_x=[np.nan, 0, 0, 0]),
    "big-endian": dict(endian=">"),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_a_header_the_readers_agree_on_is_accepted(tmp_path, case):
    check_volume_file(nifti_file(tmp_path, "fine.nii", **ACCEPTED[case]))


def test_finite_metaimage_and_nrrd_positions_are_accepted(tmp_path):
    check_volume_file(metaimage_file(tmp_path, "Offset = -10 2.5 1e3\nTransformMatrix = 0 1 0 -1 0 0 0 0 1"))
    check_volume_file(nrrd_file(tmp_path, "(-10,2.5,1e3)"))


def half_cut_gz(folder, keep):
    """A .nii.gz of random voxels (they do not compress) cut after ``keep`` of its bytes (a fraction)."""
    whole = folder / "whole.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 40), dtype=np.float32), np.eye(4)), str(whole))
    data = whole.read_bytes()
    cut = folder / "cut.nii.gz"
    cut.write_bytes(data[:int(len(data) * keep)])
    whole.unlink()
    return cut, len(zlib.decompressobj(31).decompress(cut.read_bytes()))


def test_a_half_cut_nii_gz_says_its_gzip_data_end_early_with_what_decompresses(tmp_path):
    cut, decompressed = half_cut_gz(tmp_path, 0.5)
    assert 100000 < decompressed < 256352
    with pytest.raises(InputError) as error:
        check_volume_file(cut)
    assert str(error.value) == (
        "{} is truncated or damaged: it holds {:,} of the 256,352 bytes its header declares for 40x40x40 voxels of "
        "float32 (its gzip data end early, before the end of the stream)".format(cut, decompressed))


def test_a_nii_gz_cut_inside_its_first_bytes_is_called_truncated(tmp_path):
    cut, decompressed = half_cut_gz(tmp_path, 0.001)
    with pytest.raises(InputError) as error:
        check_volume_file(cut)
    assert str(error.value) == "{} is truncated: its gzip data end early, after {:,} decompressed bytes".format(
        cut, decompressed)


def test_medadv_run_refuses_a_nan_quaternion_in_one_line_and_writes_nothing(tmp_path, capsys):
    volume = nifti_file(tmp_path, "q.nii", sform_code=0, quatern_c=np.nan)
    out = tmp_path / "results"
    status = cli.main(["run", "--volume", str(volume), "--model", "demo", "--attack", "fgsm", "--epsilon", "0.01",
                       "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines == ["medadv: error: {} has a NaN or infinite position or direction in its header "
                                     "(quatern_c = nan, qform_code 1); Slicer's reader would read another geometry "
                                     "or fail: set the file's qform".format(volume)], lines
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q.nii"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (writing to it fails with ENOSPC)")
def test_a_write_that_meets_a_full_disk_names_the_file_and_leaves_no_results(tmp_path):
    out = tmp_path / "results"
    with pytest.raises(OSError) as error:
        with StagedOutput(out) as staging:
            (staging / "metrics.csv").symlink_to("/dev/full")  # writing there fails as on a full disk
            write_text_checked(staging / "metrics.csv", "label,dice\n" * 1000)
    assert error.value.filename == str(staging / "metrics.csv") and error.value.errno == 28
    assert error.value.strerror == "the disk is full (No space left on device, ENOSPC)"
    assert list(tmp_path.iterdir()) == []


FILL_DISK = """
import sys, numpy as np, slicer, vtk
from MedAdvRobustnessLib.scene.results import check_written_volume, write_node, write_text_checked
def attempt(write, path):
    try:
        write(path)
    except OSError as error:
        print("{}|{}|{}".format(error.errno, error.filename, error.strerror))
from vtk.util.numpy_support import numpy_to_vtk
image = vtk.vtkImageData()
image.SetDimensions(64, 64, 64)
noise = np.random.default_rng(0).random(64 ** 3, dtype=np.float32)  # 1 MiB that does not compress
image.GetPointData().SetScalars(numpy_to_vtk(noise, deep=True))
scene = slicer.vtkMRMLScene()
node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
node.SetAndObserveImageData(image)
attempt(lambda path: (write_node(node, path), check_written_volume(path)), sys.argv[1] + "/volume.nrrd")
attempt(lambda path: write_text_checked(path, "x" * 200000), sys.argv[1] + "/notes.txt")
"""


@pytest.mark.skipif(not can_mount(), reason="this machine lets no user namespace mount a tmpfs")
def test_slicer_s_writer_and_text_writes_on_a_full_tmpfs_say_the_disk_is_full(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    program = tmp_path / "fill_disk.py"
    program.write_text(FILL_DISK)
    script = "mount -t tmpfs -o size=64k tmpfs '{}' && '{}' '{}' '{}'".format(disk, sys.executable, program, disk)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 2, (done.stdout, done.stderr)
    volume, notes = (line.split("|") for line in lines)
    assert volume[:2] == ["28", "{}/volume.nrrd".format(disk)] and volume[2].startswith("the disk is full ("), volume
    assert notes == ["28", "{}/notes.txt".format(disk), "the disk is full (No space left on device, ENOSPC)"], notes


def test_a_nifti2_file_is_named_as_such(tmp_path):
    """Slicer's reader cannot read NIfTI-2 ("Could not create IO object"): one line saying what the file is."""
    path = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(np.ones((4, 5, 6), np.float32), np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"two.nii is a NIfTI-2 file, which Slicer's volume reader cannot read"):
        check_volume_file(path)
