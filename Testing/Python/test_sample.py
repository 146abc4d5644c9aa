"""The shipped sample is exactly what the derivation from nilearn's MNI152 template gives."""
import nibabel as nib
import numpy as np
import pytest

from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_SHAPE, SAMPLE_VOLUME, derive_sample


def test_shipped_sample_matches_its_derivation(tmp_path):
    pytest.importorskip("nilearn")
    volume_path, labels_path = derive_sample(tmp_path)
    for shipped, derived in ((SAMPLE_VOLUME, volume_path), (SAMPLE_LABELS, labels_path)):
        shipped_image, derived_image = nib.load(str(shipped)), nib.load(str(derived))
        assert np.array_equal(np.asarray(shipped_image.dataobj), np.asarray(derived_image.dataobj))
        assert np.allclose(shipped_image.affine, derived_image.affine)


def test_sample_is_a_brain_with_four_tissue_classes():
    volume = np.asarray(nib.load(str(SAMPLE_VOLUME)).dataobj)
    labels = np.asarray(nib.load(str(SAMPLE_LABELS)).dataobj)
    assert volume.shape == labels.shape == SAMPLE_SHAPE
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    means = [volume[labels == value].mean() for value in (1, 2, 3)]
    assert means[0] < means[1] < means[2], "T1 contrast: CSF darker than grey matter darker than white matter"
