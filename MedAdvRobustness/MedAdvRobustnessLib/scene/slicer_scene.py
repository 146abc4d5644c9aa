"""An MRML scene with Slicer's module logics: the application's inside 3D Slicer, real ones bound here outside it."""
import bz2
import errno
import gzip
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import slicer

from ..errors import InputError

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img", ".vtk", ".mgz")



def in_slicer_application():
    return hasattr(slicer, "app")


LABEL_MAP, SINGLE_FILE = 1, 4  # AddArchetypeVolume's loading options: without SINGLE_FILE, files named like a
# numbered series (scan_1.nii.gz, scan_2.nii.gz) are read together as one volume


class SlicerScene:
    """A scene with its volumes and segmentations logics."""

    def __init__(self, scene, volumes_logic, segmentations_logic, keep_alive=()):
        self.scene = scene
        self.volumes_logic = volumes_logic
        self.segmentations_logic = segmentations_logic
        self._keep_alive = keep_alive

    @classmethod
    def current(cls):
        """The application's scene inside 3D Slicer, otherwise a new standalone scene."""
        if in_slicer_application():
            return cls(slicer.mrmlScene, slicer.modules.volumes.logic(), slicer.modules.segmentations.logic())
        return cls.standalone()

    @classmethod
    def standalone(cls, scene=None):
        """A (new) scene bound to real vtkSlicer*Logic objects, as the application binds them."""
        scene = scene or slicer.vtkMRMLScene()
        application_logic = slicer.vtkSlicerApplicationLogic()
        application_logic.SetMRMLScene(scene)
        color_logic = application_logic.GetColorLogic()
        color_logic.SetMRMLScene(scene)
        color_logic.AddDefaultColorNodes()
        application_logic.SetModuleLogic("Colors", color_logic)
        logics = [_bind(logic, name, scene, application_logic) for name, logic in (
            ("Volumes", slicer.vtkSlicerVolumesLogic()),
            ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()))]
        return cls(scene, logics[0], logics[1], keep_alive=(application_logic, color_logic))

    def load_volume(self, path, name=None, label_map=False):
        """Read a volume file with Slicer's reader (NIfTI, NRRD, MetaImage, ...)."""
        path = Path(path)
        check_volume_file(path)
        name = name or _stem(path)
        with captured_stderr() as messages:  # the reader's ERR lines: their gist goes into the one error line
            node = self.volumes_logic.AddArchetypeVolume(str(path), name, (LABEL_MAP if label_map else 0) | SINGLE_FILE)
        if node is None:
            reason = reader_reason(messages[0])
            raise InputError("Slicer's volume reader cannot read {}{}".format(path, ": " + reason if reason else ""))
        return node

    def save_node(self, node, path):
        """Write a volume or segmentation node to a file (format from the suffix), geometry included."""
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(str(path))
        with captured_stderr():
            written = storage.WriteData(node)
        if not written:
            raise InputError("cannot write {} to {}".format(node.GetName(), path))

    def write_mrb(self, path):
        """Save the scene and all its data as a Medical Reality Bundle, checked complete (a zip whose directory,
        at its end, reads back)."""
        with captured_stderr():
            written = self.scene.WriteToMRB(str(Path(path).absolute()))
        if not written:
            raise full_disk_error(path) or OSError(errno.EIO, "cannot write the scene bundle", str(path))
        try:
            with zipfile.ZipFile(str(path)) as bundle:
                bundle.namelist()
        except (OSError, zipfile.BadZipFile):
            raise full_disk_error(path) or OSError(errno.EIO, "the scene bundle was written incompletely (is the disk "
                                                              "full?)", str(path))
        sync_file(path)

    @classmethod
    def read_mrb(cls, path):
        """A new standalone scene with the nodes and data of a ``.mrb`` file."""
        result = cls.standalone()
        extracted = tempfile.mkdtemp(prefix="medadv-mrb-")
        try:
            try:
                with zipfile.ZipFile(str(path)) as bundle:
                    bundle.extractall(extracted)
            except (zipfile.BadZipFile, EOFError) as error:
                raise InputError("{} is not a readable scene bundle (.mrb: a zip file): {}".format(path, error))
            scene_files = sorted(Path(extracted).rglob("*.mrml"))
            if not scene_files:
                raise InputError("{} holds no .mrml scene".format(path))
            result.scene.SetURL(str(scene_files[0]))
            if not result.scene.Connect():
                raise InputError("cannot read the scene in {}".format(path))
        finally:
            shutil.rmtree(extracted, ignore_errors=True)
        return result


def _bind(logic, name, scene, application_logic):
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(application_logic)
    application_logic.SetModuleLogic(name, logic)
    return logic


def check_volume_file(path, complete_only=False):
    """Refuse a NIfTI, NRRD or MetaImage file that Slicer's reader would read as another image or fail on with a
    page of messages: damaged headers, fewer voxel bytes than the header declares, NaN or infinite voxels, more
    voxels than this machine's memory can hold (``complete_only``: the header and the byte count only). Other
    formats: see :func:`~.nodes.volume_from_node`."""
    path = Path(path)
    require_regular_file(path, "volume file", "give a volume file (NIfTI, NRRD, MetaImage, ...)")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        check_nifti_file(path, complete_only)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_layout(path, _nrrd_layout(path), complete_only)
    elif name.endswith((".mha", ".mhd")):
        _check_layout(path, _metaimage_layout(path), complete_only)


FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def require_regular_file(path, what="file", hint=None):
    """Refuse a path that is missing, a folder, or not a regular file (a named pipe, device or socket: reading one
    would wait or read endlessly), each in one line; ``what`` names it in the missing case."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError("{} not found: {}".format(what, path))
    except OSError as error:
        raise InputError("cannot read {}: {}".format(path, error.strerror or error))
    hint = "; " + hint if hint else ""
    if stat.S_ISDIR(mode):
        raise InputError("{} is a folder{}".format(path, hint))
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in FILE_KINDS if test(mode)), "a special file")
        raise InputError("{} is not a regular file ({}){}".format(path, kind, hint))


NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")  # single files and pairs (NIfTI-1 pairs, Analyze 7.5)


def check_nifti_file(path, complete_only=False):
    """Refuse a NIfTI file, or a ``.hdr``/``.img`` pair (NIfTI-1 or Analyze 7.5), that Slicer's reader would read as
    something else: several volumes (it keeps the first), fewer voxel bytes than the header declares (it
    zero-fills them), NaN or infinite voxels (it turns them into 0), or more voxels than this machine's memory can
    hold."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return
    stored_header = _stored_nifti_header(path)
    if stored_header is not None:
        _check_stored_header(path, stored_header)
    image = _load_nifti(path)
    if type(image).__name__ == "Nifti2Image":
        raise InputError("{} is a NIfTI-2 file, which Slicer's volume reader cannot read; save it as NIfTI-1 "
                         "(nibabel: nib.Nifti1Image(image.dataobj, image.affine, image.header))".format(path))
    data_file = Path(image.file_map["image"].filename)
    header_file = Path(image.file_map["header"].filename) if "header" in image.file_map else data_file
    where = path if data_file == path else "{} (data file {})".format(path, data_file)
    if not data_file.is_file():
        raise InputError("{} names the data file {}, which does not exist".format(path, data_file))
    header = _raw_nifti_header(header_file, type(image.header))
    shape, dtype = tuple(int(n) for n in header["dim"][1:1 + len(image.shape)]), image.get_data_dtype()
    _check_sizes(path, shape, dtype)
    _check_spacing(path, header, min(len(shape), 3))
    if len(shape) > 3 and shape[3] > 1 or len(shape) > 5 and any(size > 1 for size in shape[5:]):
        raise InputError("{} holds {} volumes (shape {}); give a single volume".format(
            path, int(np.prod(shape[3:4] + shape[5:])), shape))
    components = shape[4] if len(shape) > 4 else 1  # a vector volume (an RGB image): X, Y, Z, 1, C
    voxels = math.prod(shape[:3]) * components
    offset = int(header.get_data_offset())
    declared = offset + voxels * dtype.itemsize
    stored, whole = _stored_bytes(data_file, declared)
    if 0 < offset and offset >= stored and whole:
        raise InputError("{} is damaged: its header puts the voxel data at byte {:,} (vox_offset), at or past the end "
                         "of the file's {:,} bytes".format(where, offset, stored))
    if stored < declared:
        _refuse_truncated(where, stored, declared, shape[:3], dtype, cut_short=not whole)
    if complete_only:
        return
    _check_memory(path, shape, voxels)
    if np.issubdtype(dtype, np.floating) or image.header.get_slope_inter()[0] not in (None, 1.0):
        _check_finite(path, np.asanyarray(image.dataobj), "Slicer's reader would read them as 0")


def _load_nifti(path):
    """nibabel's image of a NIfTI file or pair (its voxels not read yet); one line where it cannot read it."""
    import nibabel
    kind = "NIfTI image" if path.name.lower().endswith((".nii", ".nii.gz")) else "NIfTI or Analyze image"
    try:
        with _quiet_logger("nibabel.global"):  # its header repairs ("setting 0 dims to 1"): refused below instead
            return nibabel.load(str(path))
    except Exception as error:
        decompressed = _gzip_cut_short(path)
        if decompressed:
            raise InputError("{} is truncated: its gzip data end early, after {:,} decompressed bytes".format(
                path, decompressed))
        raise InputError("{} is not a readable {} ({})".format(path, kind, str(error).splitlines()[0]))


def _gzip_cut_short(path):
    """The bytes a ``.gz`` file decompresses to where its gzip data end early (0: not so, or nothing at all)."""
    if not path.name.lower().endswith(".gz"):
        return 0
    try:
        count, whole = _gzip_size(path)
    except (OSError, zlib.error):
        return 0
    return 0 if whole else count


def _stored_nifti_header(path):
    """The NIfTI-1, NIfTI-2 or Analyze 7.5 header of a file or pair as stored, in the byte order its sizeof_hdr
    gives (nibabel guesses it from dim[0], and so misreads a damaged dim[0]); None where there is none to read
    (nibabel's load then says why)."""
    import nibabel
    header_file = _nifti_header_file(path)
    if header_file is None:
        return None
    try:
        with _open_maybe_gzip(header_file) as stream:
            block = stream.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for order, endian in (("little", "<"), ("big", ">")):
        size = int.from_bytes(block[:4], order, signed=True)
        if size in (348, 540) and len(block) >= size:
            nifti = block[344:346] in (b"n+", b"ni") if size == 348 else block[4:6] in (b"n+", b"ni")
            kind = nibabel.Nifti2Header if size == 540 else nibabel.Nifti1Header if nifti else nibabel.AnalyzeHeader
            return kind(block[:size], endianness=endian, check=False)
    return None


def _nifti_header_file(path):
    """The file holding the header: the file itself, or the ``.hdr`` of a ``.img`` (None where it is missing)."""
    if not path.name.lower().endswith(".img"):
        return path
    header = path.with_name(path.name[:-4] + (".HDR" if path.name.endswith(".IMG") else ".hdr"))
    return header if header.is_file() else None


def _open_maybe_gzip(path):
    return gzip.open(str(path), "rb") if path.name.lower().endswith(".gz") else open(str(path), "rb")


QFORM_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
SFORM_FIELDS = ("srow_x", "srow_y", "srow_z")


def _check_stored_header(path, header):
    """Refuse header fields that nibabel and Slicer's reader misread or read differently: a dim[0] outside 1 to 7,
    complex voxels, a scaling they read differently, and a NaN or infinite qform or sform (where its code is
    set)."""
    kind = "Analyze 7.5" if type(header).__name__ == "AnalyzeHeader" else "NIfTI"
    dimensions = int(header["dim"][0])
    if not 1 <= dimensions <= 7:
        raise InputError("{} is damaged: its header's dim[0] is {}; {} allows 1 to 7".format(path, dimensions, kind))
    try:
        dtype = header.get_data_dtype()
    except Exception:  # an unknown datatype code: nibabel's load says so
        return
    if dtype.kind == "c":
        raise InputError("{} holds complex voxels ({}); give a real-valued volume (its magnitude or real "
                         "part)".format(path, dtype.name))
    _check_scaling(path, header)
    if kind == "NIfTI":
        _check_forms(path, header)


def _check_scaling(path, header):
    """Refuse a voxel scaling that nibabel and Slicer's reader (ITK) read differently: a scl_slope of 0 or not
    finite (no scaling, for both) with a scl_inter other than 0 (ITK adds it, nibabel does not), and a scl_inter
    that is not finite under a real scl_slope (nibabel refuses it, ITK takes it as 0)."""
    if "scl_slope" not in header.keys():
        return
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    no_scaling = slope == 0 or not math.isfinite(slope)
    if no_scaling and math.isfinite(inter) and inter != 0:
        raise InputError("{} has scl_slope {:g} with scl_inter {:g} in its header; nibabel reads the voxels unscaled, "
                         "Slicer's reader adds scl_inter: set the real scl_slope (1: add scl_inter) or scl_inter "
                         "0".format(path, slope, inter))
    if not no_scaling and not math.isfinite(inter):
        raise InputError("{} has scl_inter {:g} in its header (scl_slope {:g}); nibabel refuses it, Slicer's reader "
                         "would take it as 0: set the real scl_inter".format(path, inter, slope))


def _check_forms(path, header):
    """Refuse a qform (qform_code > 0) or sform (sform_code > 0) with a NaN or infinite value: Slicer's reader
    would read another geometry (the identity, for a qform) or fail."""
    for code, fields in (("qform_code", QFORM_FIELDS), ("sform_code", SFORM_FIELDS)):
        if int(header[code]) <= 0:
            continue
        for field in fields:
            values = np.atleast_1d(np.asarray(header[field], dtype=np.float64))
            if not np.all(np.isfinite(values)):
                raise InputError("{} has a NaN or infinite position or direction in its header ({} = {}, {} {}); "
                                 "Slicer's reader would read another geometry or fail: set the file's {}".format(
                                     path, field, " ".join("{:g}".format(v) for v in values), code,
                                     int(header[code]), code[:5]))


@contextmanager
def _quiet_logger(name):
    """Hold back what the logger ``name`` says while the block runs."""
    logger = logging.getLogger(name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _raw_nifti_header(path, header_type):
    """The NIfTI header as the file stores it (nibabel's load replaces a zero spacing by 1)."""
    from nibabel.openers import ImageOpener
    with ImageOpener(str(path)) as stream:
        return header_type.from_fileobj(stream, check=False)


def _check_sizes(path, shape, dtype):
    """Refuse a header's sizes below 1 along an axis, or too many voxels for a 64-bit byte count."""
    for axis, size in enumerate(shape):
        if size < 1:
            raise InputError("{} is damaged: its header gives size {} along axis {} (sizes {}); each must be 1 or "
                             "more".format(path, size, "ijk"[axis] if axis < 3 else axis, " ".join(map(str, shape))))
    if math.prod(shape) * dtype.itemsize >= 2 ** 63:
        raise InputError("{} is damaged: its header sizes {} overflow (more bytes than a 64-bit count "
                         "holds)".format(path, " ".join(map(str, shape))))


def _check_spacing(path, header, axes):
    """Refuse a NIfTI spacing of 0 (or not finite) along one of the first ``axes`` axes, in the sform (where it
    is set) or in pixdim (where the qform, or nothing, gives the grid): nibabel, ITK and Slicer's reader take it as
    1 mm, which would make every distance in mm a guess."""
    sources = []
    forms = "sform_code" in header.keys()  # NIfTI; an Analyze 7.5 header has pixdim only
    if forms and header["sform_code"] > 0:
        sources.append(("sform", np.linalg.norm(header.get_sform()[:3, :3], axis=0)))
    if not forms or header["qform_code"] > 0 or header["sform_code"] <= 0:
        sources.append(("pixdim", np.asarray(header["pixdim"][1:4], dtype=np.float64)))
    for source, spacing in sources:
        for axis, value in enumerate(spacing[:axes]):
            if not np.isfinite(value) or value == 0:
                raise InputError("{} gives spacing {} along axis {} ({}); nibabel, ITK and Slicer would take it as "
                                 "1 mm: set the real spacing in the file".format(path, value, "ijk"[axis], source))


def _refuse_truncated(path, stored, declared, shape, dtype, cut_short=False):
    """``cut_short``: its compressed data end before the end of their stream (``stored``: what they decompress
    to)."""
    raise InputError("{} is truncated or damaged: it holds {:,} of the {:,} bytes its header declares for {} "
                     "voxels of {}{}".format(path, stored, declared, "x".join(str(n) for n in shape), dtype,
                                             " (its gzip data end early, before the end of the stream)"
                                             if cut_short else ""))


# NRRD and MetaImage: the header fields that say where the voxels are and how many bytes they take.
NRRD_TYPES = {"int8": "i1", "signed char": "i1", "uint8": "u1", "uchar": "u1", "unsigned char": "u1",
              "int16": "i2", "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2",
              "uint16": "u2", "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2",
              "int32": "i4", "int": "i4", "signed int": "i4", "uint32": "u4", "uint": "u4", "unsigned int": "u4",
              "int64": "i8", "longlong": "i8", "long long": "i8", "long long int": "i8", "signed long long": "i8",
              "signed long long int": "i8", "uint64": "u8", "ulonglong": "u8", "unsigned long long": "u8",
              "unsigned long long int": "u8", "float": "f4", "double": "f8"}
NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
METAIMAGE_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
                   "MET_UINT": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4",
                   "MET_DOUBLE": "f8"}
HEADER_LINES = 10000
METAIMAGE_GEOMETRY = ("Offset", "Position", "Origin", "TransformMatrix", "Rotation", "Orientation")  # MetaIO's names


def _header_lines(stream):
    """The text lines of a header at the start of ``stream`` (binary), up to a blank line or the end, each as it
    stands; the stream is left where the lines end."""
    for _ in range(HEADER_LINES):
        line = stream.readline(1 << 16)
        if not line or not line.strip():
            return
        yield line.decode("latin-1").rstrip("\r\n")


def _nrrd_layout(path):
    """Where and how a NRRD file's voxels are stored, from its header; None where this check does not apply
    (ASCII or hex data, several data files, an unknown type): the reader then reads it as it does."""
    with open(str(path), "rb") as stream:
        if not stream.read(8).startswith(b"NRRD000"):
            raise InputError("{} is not a readable NRRD image (it does not start with NRRD000)".format(path))
        stream.readline()
        fields = {}
        for line in _header_lines(stream):
            key, separator, value = line.partition(":")
            if separator and not line.startswith("#") and not value.startswith("="):
                fields[key.strip().lower().replace(" ", "")] = value.strip()
        offset = stream.tell()
    try:
        shape = tuple(int(n) for n in fields["sizes"].split())
        kind, encoding = fields["type"].lower(), fields.get("encoding", "raw").lower()
        skip, line_skip = int(fields.get("byteskip", 0)), int(fields.get("lineskip", 0))
    except KeyError as error:
        raise InputError("{} is not a readable NRRD image (its header has no {} field)".format(path, error))
    except ValueError as error:
        raise InputError("{} is not a readable NRRD image ({})".format(path, error))
    _check_nrrd_spacing(path, fields, len(shape))
    if "spaceorigin" in fields:
        _check_header_geometry(path, _numbers(path, re.sub(r"[(),]", " ", fields["spaceorigin"]), "NRRD"),
                               "space origin", fields["spaceorigin"])
    data_file = fields.get("datafile")
    if (kind not in NRRD_TYPES or encoding not in NRRD_ENCODINGS or line_skip
            or (data_file and (data_file.upper().startswith("LIST") or " " in data_file or "%" in data_file))):
        return None
    endian = ">" if fields.get("endian", "little").lower() == "big" else "<"
    return {"shape": shape, "dtype": np.dtype(endian + NRRD_TYPES[kind]), "encoding": NRRD_ENCODINGS[encoding],
            "file": path.parent / data_file if data_file else path, "offset": 0 if data_file else offset,
            "skip": skip}


SPATIAL_KINDS = ("domain", "space")  # NRRD axis kinds with a spacing (the others: components, time, ...)


def _check_nrrd_spacing(path, fields, dimension):
    """Refuse a NRRD header whose space directions or spacings give a spatial axis a spacing of 0 or NaN (teem then
    fails with a message about something else, or takes NaN as 1 mm). Spatial axes: those of kind domain or space,
    else the last three."""
    kinds = fields.get("kinds", "").split()
    if len(kinds) == dimension:
        spatial = [axis for axis, kind in enumerate(kinds) if kind.lower() in SPATIAL_KINDS]
    else:
        spatial = list(range(max(0, dimension - 3), dimension))
    if "spacedirections" in fields:
        vectors = re.findall(r"\(([^)]*)\)|(none)", fields["spacedirections"])
        lengths = [None if vector == "" else _vector_length(path, vector) for vector, _ in vectors]
        if len(lengths) == dimension:  # with the lengths of the non-spatial axes ("none")
            lengths = [lengths[axis] for axis in spatial]
        _check_header_spacing(path, [value for value in lengths if value is not None], "space directions")
    elif "spacings" in fields:
        spacings = _numbers(path, fields["spacings"], "NRRD")
        if len(spacings) == dimension:
            _check_header_spacing(path, [spacings[axis] for axis in spatial], "spacings")


def _vector_length(path, text):
    return float(np.linalg.norm(_numbers(path, text.replace(",", " "), "NRRD")))


def _numbers(path, text, kind):
    try:
        return [float(value) for value in text.split()]
    except ValueError as error:
        raise InputError("{} is not a readable {} image ({})".format(path, kind, error))


def _check_header_spacing(path, spacing, field):
    """Refuse a spacing of 0 or not finite along an axis (``field``: the header field that gives it)."""
    for axis, value in enumerate(spacing):
        if not math.isfinite(value) or value == 0:
            raise InputError("{} gives spacing {} along axis {} ({}); the readers would fail or take it as 1 mm: set "
                             "the real spacing in the file".format(path, value, "ijk"[axis] if axis < 3 else axis,
                                                                   field))


def _check_header_geometry(path, values, field, text):
    """Refuse a NaN or infinite value in the header ``field`` of a position or directions (``text``: as stored):
    the readers would read another geometry (MetaIO takes a NaN origin as 0) or fail."""
    if not all(math.isfinite(value) for value in values):
        raise InputError("{} has a NaN or infinite position or direction in its header ({}: {}); the readers would "
                         "read another geometry or fail: set the file's origin and directions".format(
                             path, field, text))


def _metaimage_layout(path):
    """Where and how a MetaImage (.mha/.mhd) file's voxels are stored, from its header; None where this check does
    not apply (ASCII data, a list of files, an unknown element type)."""
    fields, offset = {}, None
    with open(str(path), "rb") as stream:
        for line in _header_lines(stream):
            key, separator, value = line.partition("=")
            if not separator:
                break
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                offset = stream.tell()
                break
    if offset is None or "dimsize" not in fields or "elementtype" not in fields:
        raise InputError("{} is not a readable MetaImage (its header has no DimSize, ElementType or "
                         "ElementDataFile)".format(path))
    try:
        shape = tuple(int(n) for n in fields["dimsize"].split())
        channels = int(fields.get("elementnumberofchannels", 1))
        skip = int(fields.get("headersize", 0))
    except ValueError as error:
        raise InputError("{} is not a readable MetaImage ({})".format(path, error))
    spacing_field = "elementspacing" if "elementspacing" in fields else "elementsize"
    if spacing_field in fields:
        _check_header_spacing(path, _numbers(path, fields[spacing_field], "MetaImage"),
                              {"elementspacing": "ElementSpacing", "elementsize": "ElementSize"}[spacing_field])
    for field in METAIMAGE_GEOMETRY:
        if field.lower() in fields:
            _check_header_geometry(path, _numbers(path, fields[field.lower()], "MetaImage"), field,
                                   fields[field.lower()])
    data_file = fields["elementdatafile"]
    true = ("true", "1")
    if (fields["elementtype"].upper() not in METAIMAGE_TYPES or fields.get("binarydata", "true").lower() not in true
            or data_file.upper().startswith("LIST") or "%" in data_file or " " in data_file):
        return None
    big = (fields.get("binarydatabyteordermsb") or fields.get("elementbyteordermsb") or "false").lower() in true
    local = data_file.upper() == "LOCAL"
    return {"shape": ((channels,) if channels > 1 else ()) + shape,
            "dtype": np.dtype((">" if big else "<") + METAIMAGE_TYPES[fields["elementtype"].upper()]),
            "encoding": "zlib" if fields.get("compresseddata", "false").lower() in true else "raw",
            "file": path if local else path.parent / data_file, "offset": offset if local else 0,
            "skip": 0 if local else skip}


def _check_layout(path, layout, complete_only=False):
    """Refuse voxel data shorter than its header declares, too large for memory, or holding NaN or infinity."""
    if layout is None:
        return
    shape, dtype, data = layout["shape"], layout["dtype"], layout["file"]
    _check_sizes(path, shape, dtype)
    if not data.is_file():
        raise InputError("{} names the data file {}, which does not exist".format(path, data))
    voxels = math.prod(shape)
    declared = voxels * dtype.itemsize
    if layout["encoding"] == "raw" and layout["skip"] < 0:  # the data are the file's last bytes
        layout = dict(layout, offset=max(0, data.stat().st_size - declared), skip=0)
    head = max(layout["skip"], 0) if layout["encoding"] != "raw" else 0  # skipped after decompression
    stored = _data_bytes(layout, declared + head) - head
    if stored < declared:
        where = path if data == path else "{} (data file {})".format(path, data)
        _refuse_truncated(where, max(stored, 0), declared, shape, dtype)
    if complete_only:
        return
    _check_memory(path, shape[-3:], voxels)
    if dtype.kind == "f":
        array = np.frombuffer(_data(layout, declared + head)[head:], dtype=dtype).reshape(shape[::-1]).T
        _check_finite(path, np.moveaxis(array, 0, -1) if array.ndim > 3 else array)  # (i, j, k[, component])


def _data_bytes(layout, wanted):
    """How many bytes of voxel data the file holds (decompressed), counting no further than ``wanted``."""
    if layout["encoding"] == "raw":
        return layout["file"].stat().st_size - layout["offset"] - layout["skip"]
    return sum(len(chunk) for chunk in _decompressed(layout, wanted))


def _data(layout, wanted):
    """The first ``wanted`` bytes of voxel data (decompressed)."""
    if layout["encoding"] == "raw":
        with open(str(layout["file"]), "rb") as stream:
            stream.seek(layout["offset"] + layout["skip"])
            return stream.read(wanted)
    return b"".join(_decompressed(layout, wanted))


def _decompressed(layout, wanted):
    """The decompressed voxel data (gzip, zlib or bzip2) in chunks, no further than ``wanted`` bytes; it stops
    where the stream ends early (what came before is all there is). Once ``wanted`` bytes are there, the rest of
    the stream is read to its end and its checksum: damaged data is refused rather than read as another image."""
    decompressor = bz2.BZ2Decompressor() if layout["encoding"] == "bzip2" else zlib.decompressobj(47)
    count = 0
    with open(str(layout["file"]), "rb") as stream:
        stream.seek(layout["offset"])
        while not decompressor.eof:
            block = stream.read(1 << 20)
            if not block:
                return
            try:
                chunk = decompressor.decompress(block)
            except (OSError, EOFError, ValueError, zlib.error) as error:  # a stream cut short only runs out
                raise InputError("{} is damaged: its compressed voxel data cannot be decompressed ({}); Slicer's "
                                 "reader would read another image or fail".format(layout["file"], error))
            keep = chunk[:max(wanted - count, 0)]
            count += len(chunk)
            if keep:
                yield keep


MEMORY_BYTES_PER_VOXEL = 64  # float32 copies of a volume during a run (scene, network input, attack state)


def _check_memory(path, shape, voxels):
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    need = voxels * MEMORY_BYTES_PER_VOXEL
    if need > available:
        raise InputError("{}: {} voxels need about {:.1f} GiB of memory for a run, and {:.1f} GiB are free".format(
            path, "x".join(str(n) for n in shape[:3]), need / 2 ** 30, available / 2 ** 30))


def _stored_bytes(path, wanted):
    """How many bytes the file holds (decompressed, for .gz), counting no further than ``wanted``, and whether
    that is all of it (False: a gzip stream that ends early)."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size, True
    try:
        count, whole = _gzip_size(path)
    except (OSError, zlib.error) as error:  # corrupt data, or a CRC or length that does not match
        raise InputError("{} is damaged: its gzip data fails gzip's own check ({}); Slicer's reader would read "
                         "another image".format(path, error))
    return min(count, wanted), whole


def _gzip_size(path):
    """The bytes a gzip file decompresses to, read to its end (gzip checks each member's CRC and length there), and
    whether its data are whole (False: they end early; the count is what decompressed before)."""
    count = 0
    with gzip.open(str(path), "rb") as stream:
        try:
            while True:
                chunk = stream.read1(1 << 24)  # one decompression step: what it gave is counted before a cut
                if not chunk:
                    return count, True
                count += len(chunk)
        except EOFError:
            return count, False


def _check_finite(path, array, why="the probes and metrics need finite voxels"):
    """Refuse NaN and infinite voxels of ``array`` (indexed i, j, k), with their count and the first one."""
    bad = ~np.isfinite(array)
    count = int(np.count_nonzero(bad))
    if count:
        first = tuple(int(v) for v in np.argwhere(bad)[0][:3])
        raise InputError("{} has {:,} NaN or infinite voxel(s), the first at (i, j, k) = {}; replace them in the "
                         "file ({})".format(path, count, first, why))


def _stem(path):
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


_STDERR_LOCK = threading.RLock()


@contextmanager
def captured_stderr():
    """Hold what the C++ readers and writers print on the standard error (VTK's and ITK's ERR lines) while the
    block runs; the list it yields then holds that text."""
    messages = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:  # one thread at a time: the descriptor is shared
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield messages
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            messages.append(capture.read().decode("utf-8", "replace"))


READER_REASONS = (r"\[nrrd\] (_nrrd\w+: \S.*)", r"(MetaImage: .+)", r"Description: (?:ITK ERROR: )?(.+)",
                  r"(Could not create IO object.+)", r"(Failed to instantiate a file reader)")


def reader_reason(text):
    """The line of a reader's messages that says why it failed: the last match of the first of
    :data:`READER_REASONS` that matches (teem's innermost NRRD message, MetaIO's, ITK's, ...)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    for pattern in READER_REASONS:
        found = re.findall(pattern, text)
        if found:
            return " ".join(found[-1].split())[:300]
    return ""


def sync_file(path):
    """Flush a written file to the disk, so that a full disk or a failing device shows here, not later (an OSError
    naming the file)."""
    try:
        descriptor = os.open(str(path), os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows syncs writable ones
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        raise named_write_error(error, path)


FULL_DISK_BYTES = 1 << 20  # free space below this, after a writer failed: the disk is full


def named_write_error(error, path):
    """The OSError ``error`` of writing ``path`` as one naming the file; a full disk (ENOSPC, EDQUOT) said so."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OSError(errno.ENOSPC, "the disk is full (No space left on device, ENOSPC)", str(path))
    if error.filename:
        return error
    return OSError(error.errno, error.strerror or str(error), str(path))


def full_disk_error(path):
    """An ENOSPC OSError naming ``path`` where the disk holding it has (almost) no space left, else None: why a
    writer that reports no reason (VTK's, ITK's) failed."""
    try:
        free = shutil.disk_usage(str(Path(path).absolute().parent)).free
    except OSError:
        return None
    if free >= FULL_DISK_BYTES:
        return None
    return OSError(errno.ENOSPC, "the disk is full ({:,} bytes free; No space left on device, ENOSPC)".format(free),
                   str(path))
