"""A volume as the network sees it: the network input convention and the way back to Slicer's voxel order.

Slicer arrays are indexed (k, j, i). The network sees what MONAI's ``LoadImage`` + ``EnsureChannelFirst`` +
``Orientation("RAS")`` give: axes permuted and flipped (never resampled) so that array axes 0, 1, 2 point
closest to R, A, S. The axis matching follows the closest orthogonal matrix to the direction cosines, strongest
axis first, as nibabel's ``io_orientation`` (which MONAI uses) does.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class GridOrientation:
    """How a (k, j, i) Slicer array maps to the network's RAS-oriented (x, y, z) array."""
    shape_kji: Tuple[int, int, int]
    ijk_axes: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras, shape_kji):
        axes, flips = ras_axes(ijk_to_ras)
        return cls(tuple(int(n) for n in shape_kji), axes, flips)

    @property
    def shape_xyz(self):
        shape_ijk = self.shape_kji[::-1]
        return tuple(shape_ijk[axis] for axis in self.ijk_axes)

    def to_network(self, array_kji):
        """(k, j, i) array → (x, y, z) RAS-oriented array."""
        self._check(array_kji.shape, self.shape_kji)
        oriented = np.transpose(array_kji, (2, 1, 0)).transpose(self.ijk_axes)
        return np.ascontiguousarray(np.flip(oriented, axis=self._flipped_axes()))

    def to_slicer(self, array_xyz):
        """(x, y, z) RAS-oriented array → (k, j, i) array on the node's grid."""
        self._check(array_xyz.shape, self.shape_xyz)
        unflipped = np.flip(array_xyz, axis=self._flipped_axes())
        array_ijk = np.transpose(unflipped, np.argsort(self.ijk_axes))
        return np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0)))

    def tensor_to_ijk(self, tensor):
        """Network-convention (B, C, x, y, z) tensor → the volume's own voxel order (B, C, i, j, k)
        (differentiable: flips and a permutation)."""
        flipped = [axis + 2 for axis in self._flipped_axes()]
        unflipped = torch.flip(tensor, flipped) if flipped else tensor
        return unflipped.permute(0, 1, *[int(axis) + 2 for axis in np.argsort(self.ijk_axes)])

    def tensor_from_ijk(self, tensor):
        """The inverse of :meth:`tensor_to_ijk`."""
        oriented = tensor.permute(0, 1, *[int(axis) + 2 for axis in self.ijk_axes])
        flipped = [axis + 2 for axis in self._flipped_axes()]
        return torch.flip(oriented, flipped) if flipped else oriented

    def network_affine(self, ijk_to_ras):
        """Voxel-to-RAS matrix of the oriented (x, y, z) grid."""
        shape_ijk = self.shape_kji[::-1]
        xyz_to_ijk = np.zeros((4, 4))
        xyz_to_ijk[3, 3] = 1.0
        for x_axis, (ijk_axis, flip) in enumerate(zip(self.ijk_axes, self.flips)):
            xyz_to_ijk[ijk_axis, x_axis] = -1.0 if flip else 1.0
            xyz_to_ijk[ijk_axis, 3] = shape_ijk[ijk_axis] - 1 if flip else 0.0
        return np.asarray(ijk_to_ras, dtype=np.float64) @ xyz_to_ijk

    def _flipped_axes(self):
        return tuple(axis for axis, flip in enumerate(self.flips) if flip)

    @staticmethod
    def _check(shape, expected):
        if tuple(shape) != tuple(expected):
            raise ValueError("array shape {} does not match the grid {}".format(tuple(shape), tuple(expected)))


def ras_axes(ijk_to_ras):
    """For R, A, S in turn: which of i, j, k points closest to it, and whether it points the opposite way."""
    directions = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(directions, axis=0)
    if np.any(norms == 0):
        raise ValueError("degenerate IJK-to-RAS matrix (a zero spacing)")
    u, _, vt = np.linalg.svd(directions / norms)
    closest = u @ vt
    axes, flips = [None] * 3, [False] * 3
    strongest_first = np.argsort(-np.max(closest ** 2, axis=0), kind="stable")
    for ijk_axis in strongest_first:
        column = np.abs(closest[:, ijk_axis])
        column[[axis for axis in range(3) if axes[axis] is not None]] = -1.0
        ras_axis = int(np.argmax(column))
        axes[ras_axis], flips[ras_axis] = int(ijk_axis), bool(closest[ras_axis, ijk_axis] < 0)
    return tuple(axes), tuple(flips)


@dataclass
class Volume:
    """A volume as the network sees it, with what is needed to write results back on its grid: ``array`` is
    (X, Y, Z) for one channel, channel-first (C, X, Y, Z) for several (an RGB image's channels)."""
    name: str
    array: np.ndarray
    ijk_to_ras: np.ndarray
    orientation: GridOrientation
    transform_node_id: str = None

    @classmethod
    def from_array(cls, array_ijk, ijk_to_ras=None, name="volume"):
        """A volume from an (i, j, k) array, or (i, j, k, C) for several channels (as nibabel gives an RGB image),
        and its voxel-to-RAS matrix (nibabel's ``img.get_fdata()`` and ``img.affine``; default: 1 mm voxels along
        R, A, S). The array is copied, never modified."""
        array_ijk = np.asarray(array_ijk)
        if array_ijk.ndim not in (3, 4):
            raise ValueError("a volume is an (i, j, k) or (i, j, k, channels) array, got shape {}".format(
                array_ijk.shape))
        ijk_to_ras = np.eye(4) if ijk_to_ras is None else np.asarray(ijk_to_ras, dtype=np.float64)
        orientation = GridOrientation.from_ijk_to_ras(ijk_to_ras, array_ijk.shape[2::-1])
        if array_ijk.ndim == 3:
            array = orientation.to_network(np.transpose(array_ijk, (2, 1, 0)))
        else:
            array = np.stack([orientation.to_network(np.transpose(array_ijk[..., channel], (2, 1, 0)))
                              for channel in range(array_ijk.shape[3])])
        return cls(name, array.astype(np.float32), ijk_to_ras, orientation)

    @property
    def channels(self):
        return 1 if self.array.ndim == 3 else self.array.shape[0]

    @property
    def intensity_range(self):
        return float(self.array.min()), float(self.array.max())

    @property
    def affine(self):
        """Voxel-to-RAS matrix of the network-convention array."""
        return self.orientation.network_affine(self.ijk_to_ras)

    def as_tensor(self):
        """(1, C, X, Y, Z) float32 tensor of raw intensities."""
        tensor = torch.from_numpy(self.array.astype(np.float32, copy=False))
        return tensor[None, None] if self.array.ndim == 3 else tensor[None]
