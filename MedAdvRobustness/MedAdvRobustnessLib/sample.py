"""The embedded sample: the MNI152 2009 T1 template at 2 mm with a four-class tissue label map.

The shipped files under ``Resources/Sample`` are derived by :func:`derive_sample` from the copy of the
template and its grey/white matter probability maps inside the ``nilearn`` wheel (see ATTRIBUTION.md).
"""
from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent / "Resources" / "Sample"
SAMPLE_VOLUME = SAMPLE_DIR / "MNI152_T1_2mm.nii.gz"
SAMPLE_LABELS = SAMPLE_DIR / "MNI152_tissue_2mm.nii.gz"
TISSUE_LABELS = ("background", "CSF", "grey matter", "white matter")
# a held-out axial slice for the demo classifier (classification_training.write_sample_slices) and its class
SAMPLE_SLICE = SAMPLE_DIR / "classification" / "MNI152_T1_axial_z+20mm.nii.gz"
SAMPLE_SLICE_CLASS = 1  # lateral ventricles
SAMPLE_SHAPE = (80, 96, 80)
DOWNSAMPLING = 2
NILEARN_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def derive_sample(out_dir):
    """Write the 2 mm sample volume and tissue label map derived from nilearn's MNI152 template."""
    import nibabel as nib
    import nilearn.datasets

    data_dir = Path(nilearn.datasets.__file__).parent / "data"
    t1_image = nib.load(str(data_dir / NILEARN_FILE.format("t1")))
    t1 = np.asarray(t1_image.dataobj, dtype=np.float64)
    gm = np.asarray(nib.load(str(data_dir / NILEARN_FILE.format("gm"))).dataobj, dtype=np.float64) / 255.0
    wm = np.asarray(nib.load(str(data_dir / NILEARN_FILE.format("wm"))).dataobj, dtype=np.float64) / 255.0
    brain = t1 > 0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    scores = np.stack([~brain, csf * brain, gm * brain, wm * brain]).astype(np.float64)

    start = _crop_start(brain)
    t1_small = _block_mean(_crop(t1, start))
    labels_small = np.argmax(_block_mean(_crop(scores, start, leading=1), leading=1), axis=0)
    affine = t1_image.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
    affine[:3, :3] = affine[:3, :3] * DOWNSAMPLING
    affine[:3, 3] += affine[:3, :3] @ np.full(3, 0.5 - 0.5 / DOWNSAMPLING)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    volume = nib.Nifti1Image(np.round(t1_small).astype(np.int16), affine)
    labels = nib.Nifti1Image(labels_small.astype(np.uint8), affine)
    for image in (volume, labels):
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    nib.save(volume, str(out_dir / SAMPLE_VOLUME.name))
    nib.save(labels, str(out_dir / SAMPLE_LABELS.name))
    return out_dir / SAMPLE_VOLUME.name, out_dir / SAMPLE_LABELS.name


def _crop_start(brain):
    """Corner of a SAMPLE_SHAPE box (in 1 mm voxels) centred on the brain, kept inside the image."""
    extent = np.array(SAMPLE_SHAPE) * DOWNSAMPLING
    nonzero = np.argwhere(brain)
    centre = (nonzero.min(0) + nonzero.max(0) + 1) // 2
    start = np.clip(centre - extent // 2, 0, np.array(brain.shape) - extent)
    return tuple(int(s) for s in start)


def _crop(array, start, leading=0):
    extent = np.array(SAMPLE_SHAPE) * DOWNSAMPLING
    region = tuple(slice(s, s + e) for s, e in zip(start, extent))
    return array[(slice(None),) * leading + region]


def _block_mean(array, leading=0):
    """Mean over DOWNSAMPLING^3 blocks of the last three axes."""
    f = DOWNSAMPLING
    shape = array.shape[:leading]
    spatial = array.shape[leading:]
    blocks = array.reshape(shape + tuple(x for n in spatial for x in (n // f, f)))
    axes = tuple(leading + 2 * i + 1 for i in range(3))
    return blocks.mean(axis=axes)
