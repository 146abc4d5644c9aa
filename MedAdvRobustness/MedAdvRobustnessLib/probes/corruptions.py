"""Corrupted MRI acquisitions at five severities (the ROOD-MRI families) and the ROOD-MRI robustness summary.

One call shape::

    corrupted = corrupt(name, volume, severity, seed=0, spacing=(1, 1, 1))

``volume`` is a (1, C, X, Y, Z) floating-point tensor of raw intensities in the network convention, ``severity``
1..5, ``spacing`` the voxel size in mm along X, Y, Z (:func:`spacing_from_affine` reads it from a Volume's affine).
The result has the same shape, dtype and grid and stays in the volume's own intensity units; the input is never
modified, and the same ``seed`` gives the same result (computed in float32). Random draws depend on the seed only:
the severity scales them (or uses more of them), so for one seed a higher severity is the same corruption, stronger.

Spatial corruptions (affine, elastic deformation, and the motion artefact) move the image only: the reference
labels stay where they are. This probes the network's robustness to a corrupted acquisition of the same anatomy, so
a Dice drop counts the anatomy the network no longer finds where it is. :func:`corrupt_with_labels` instead moves
the labels with the image (nearest interpolation; affine and elastic only: motion's k-space centre holds the unmoved
anatomy), for augmentation or to separate geometry from appearance. :func:`to_subject_frame` brings a mask on the
deformed image's grid back to the subject's own grid (the clean volume's, where its labels lie).

Severity table (Boone et al., 2023: the values of their roodmri package, except where marked "*")::

    family                     parameters at severities 1, 2, 3, 4, 5
    affine                     rotation about each axis up to 6, 12, 18, 24, 30 degrees and translation along each
                               axis up to 8, 16, 24, 32, 40 mm (uniform draws), about the grid centre
    anisotropic_downsampling   one random axis sampled every 2.8, 4.6, 6.4, 8.2, 10 voxels (nearest plane, random
                               first position), linear in between: slices factor x spacing apart
    bias_field                 exp of a degree-3 Legendre polynomial over the field of view, rescaled to geometric
                               mean 1 over the signal, coefficients uniform in +-0.3, 0.6, 0.9, 1.2, 1.5
    contrast_compression       gamma 0.86, 0.72, 0.58, 0.44, 0.30 over the intensity range (MONAI AdjustContrast)
    contrast_expansion         gamma 1.4, 1.8, 2.2, 2.6, 3.0 over the intensity range
    elastic_deformation      * largest displacement 3, 6, 9, 12, 15 mm of a field smooth over 20 mm (Gaussian sigma)
    ghosting                   3, 5, 7, 9, 11 ghosts, intensity 0.5, 1.0, 1.5, 2.0, 2.5, along X or Y (random)
    motion                     2, 4, 6, 8, 10 movements, each up to 1, 2, 3, 4, 5 degrees and 2, 4, 6, 8, 10 mm
    rician_noise             * sigma 0.06, 0.12, 0.18, 0.24, 0.30 of the intensity range (max - min)
    smoothing                  Gaussian sigma 0.8, 1.6, 2.4, 3.2, 4.0 mm
    gibbs_ringing            * k-space cut to a sphere of radius (1 - alpha) x half its diagonal, alpha 0.35 .. 0.75
    kspace_spikes            * 1, 2, 3, 4, 5 spikes of 0.1, 0.2, 0.3, 0.4, 0.5 x the k-space centre's magnitude

Where roodmri's values are not used: its Rician sigma is 0.16 .. 0.8 x the image's standard deviation, which is
0.365 of the range on the embedded sample (whence 0.06 .. 0.30); its elastic field (TorchIO, 7 control points)
reaches 6 .. 30 mm and folds at the higher levels, ours stays invertible (Jacobian > 0.3 on the sample); Gibbs
ringing and k-space spikes are not in ROOD-MRI. Ghosting starts its comb of k-space planes next to the centre
(TorchIO starts at the border and keeps the centre), so that the artefact grows with the severity.

MRI-physics corruptions (bias field, Rician noise, k-space artefacts) act on the signal above the volume's minimum
(the background of a magnitude image), and k-space artefacts return the magnitude image a scanner reconstructs.
Parameters come from TorchIO's or MONAI's transforms; TorchIO itself is not a dependency: MONAI provides the rest,
and the three TorchIO-only artefacts (motion, ghosting, anisotropic sampling) are short k-space or slice code here.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from monai.transforms import (AdjustContrast, Affine, GaussianSmooth, GibbsNoise, KSpaceSpikeNoise, RandBiasField,
                              RandRicianNoise, Resample, Resize)
from monai.transforms.utils import create_grid, create_rotate, create_translate
from monai.utils import convert_to_tensor

from ..errors import InputError
from .base import Probe
from .parameters import check_parameters, seed_parameter

SEVERITIES = (1, 2, 3, 4, 5)
ROOD_ALPHA = 2.0 / 3.0
ELASTIC_SMOOTHNESS_MM = 20.0
ELASTIC_GRID_STEPS = 4
ELASTIC_INVERSE_STEPS = 50  # at most, fixed-point iterations inverting the elastic field
ELASTIC_INVERSE_TOLERANCE = 1e-3  # voxels: the iteration stops once no point moves further
SPIKE_MIN_OFFSET = 4
MAX_MOVEMENTS = 10
MAX_SPIKES = 5


@dataclass(frozen=True)
class Corruption:
    """One corruption family: what it models and its parameters at severities 1..5 (``levels[s - 1]``)."""
    name: str
    description: str
    levels: Tuple[dict, ...]
    apply: Optional[Callable] = None
    deformation: Optional[Callable] = None
    random: bool = True  # whether the seed changes the result

    @property
    def spatial(self):
        """True when the corruption moves the anatomy (and :func:`corrupt_with_labels` moves the labels)."""
        return self.deformation is not None


def corrupt(name, volume, severity, seed=0, spacing=(1.0, 1.0, 1.0)):
    """``volume`` (1, C, X, Y, Z) corrupted by family ``name`` at ``severity`` 1..5, same shape, dtype and grid.

    Spatial families (affine, elastic deformation, motion) corrupt the image only: the reference labels still
    describe the subject, so a Dice drop measures the network's robustness to a corrupted acquisition of the same
    anatomy. Use :func:`corrupt_with_labels` to move the labels with the image.
    """
    corrupted, _ = _corrupt_image(*_prepare(name, volume, severity, seed, spacing))
    return _as_volume(corrupted, volume)


def to_subject_frame(name, moved, severity, seed=0, spacing=(1.0, 1.0, 1.0)):
    """An (X, Y, Z) mask or label map on the grid of ``corrupt(name, ..., severity, seed, spacing)`` brought back to
    the subject's own grid (the clean volume's): each subject voxel takes the deformed voxel that shows it.

    Nearest voxel of the exact inverse (affine: the inverse voxel matrix; elastic: ``o = p - displacement(o)``
    solved by fixed-point iteration); a subject voxel that no deformed voxel shows (moved out of the field of
    view) gets 0 (False). A family that does not move the anatomy returns a copy.
    """
    moved = np.asarray(moved)
    if moved.ndim != 3 or not (moved.dtype == bool or np.issubdtype(moved.dtype, np.integer)):
        raise InputError("the map to bring back must be a boolean or integer (X, Y, Z) array, got {} {}".format(
            moved.dtype, moved.shape))
    corruption, parameters, rng, spacing = _checked(name, severity, seed, spacing)
    if not corruption.spatial:
        return moved.copy()
    return _pull_back(moved, corruption.deformation(moved.shape, parameters, rng, spacing).shown_at())


def corrupt_with_labels(name, volume, labels, severity, seed=0, spacing=(1.0, 1.0, 1.0)):
    """``(volume, labels)`` corrupted together: spatial families move the labels the same way (nearest).

    ``labels`` is a label tensor whose last three axes are X, Y, Z; it comes back with its shape and dtype. The
    volume is exactly ``corrupt(name, volume, severity, seed, spacing)``. Other families (motion included: its
    k-space centre holds the unmoved anatomy) return a copy of the labels.
    """
    prepared = _prepare(name, volume, severity, seed, spacing)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape[-3:]) != tuple(volume.shape[-3:]):
        raise InputError("labels must be a tensor on the volume's grid {}".format(tuple(volume.shape[-3:])))
    corrupted, deform = _corrupt_image(*prepared)
    return _as_volume(corrupted, volume), labels.clone() if deform is None else _move_labels(deform, labels)


def _move_labels(deform, labels):
    """``labels`` (last three axes X, Y, Z) moved by the deformation (nearest), with their shape and dtype."""
    label_grid = labels.detach().reshape((1,) + tuple(labels.shape[-3:])).to(torch.float32)
    return deform(label_grid, "nearest").round().to(labels.dtype).reshape(labels.shape)


@dataclass(frozen=True)
class CorruptionProbe(Probe):
    """A corruption family as a probe: its strengths are severities 1..5, its one parameter the seed."""
    name: str = field()  # required (Probe's class attribute is not its default)
    seed: int = seed_parameter("seed of the corruption's random draws")
    strength_name = "severity"
    strength_label = "severity (1-5)"

    def __post_init__(self):
        _corruption(self.name)
        check_parameters(self)

    @property
    def summary(self):
        return "MRI corruption at severities 1-5: {}".format(_corruption(self.name).description)

    @property
    def moves_anatomy(self):
        return _corruption(self.name).spatial

    def draws_from_seed(self):
        return _corruption(self.name).random

    def check_strengths(self, severities):
        """Sorted distinct severities, each one of 1..5."""
        values = sorted({_check_severity(int(s) if float(s) == int(s) else s) for s in severities})
        if not values:
            raise InputError("give at least one severity")
        return values

    def apply(self, inputs, severity, spacing, label_maps):
        """The corrupted volume at ``severity``, each (X, Y, Z) label map moved with it where it moves (one draw of
        the deformation for all), and that deformation (None for a family that does not move the anatomy)."""
        corrupted, deform = _corrupt_image(*_prepare(self.name, inputs, severity, self.seed, spacing))
        moved = list(label_maps) if deform is None else [_move_labels(deform, labels) for labels in label_maps]
        return _as_volume(corrupted, inputs), moved, deform

    def outcome(self, sweep, severity, report):
        moved_maps = [sweep.clean_prediction] + ([] if sweep.reference is None else [sweep.reference])
        corrupted, moved, deform = self.apply(sweep.inputs, severity, sweep.spacing,
                                              [torch.from_numpy(m) for m in moved_maps])
        if sweep.region is not None:
            corrupted = torch.where(sweep.region[None], corrupted, sweep.inputs)
        outcome = sweep.outcome(float(severity), corrupted)
        if deform is not None:
            outcome.clean_prediction = moved[0].numpy()
            outcome.reference = moved[1].numpy() if sweep.reference is not None else None
            outcome.changed = _pull_back(outcome.prediction != outcome.clean_prediction, deform.shown_at())
        report(1, 1)
        return outcome


def describe_corruptions():
    """Every corruption family with its parameters at severities 1..5 (for ``medadv attacks``)."""
    lines = ["corruptions (--corruption NAME --severity S [S ...] [--seed N]):"]
    for corruption in CORRUPTIONS.values():
        lines.append("  {}: {}".format(corruption.name, corruption.description))
        for key in corruption.levels[0]:
            lines.append("      {} at severities 1-5: {}".format(
                key, ", ".join("{:g}".format(level[key]) for level in corruption.levels)))
    return "\n".join(lines) + "\n"


def corruption_names():
    """The corruption families, ROOD-MRI's ten first."""
    return list(CORRUPTIONS)


def corruption_parameters(name, severity):
    """The parameters of family ``name`` at ``severity`` 1..5."""
    return dict(_corruption(name).levels[_check_severity(severity) - 1])


def spacing_from_affine(affine):
    """Voxel size in mm along each grid axis of a voxel-to-RAS matrix (e.g. ``Volume.affine``)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def rood_summary(scores_by_severity, clean_score, alpha=ROOD_ALPHA):
    """ROOD-MRI summary of one metric (higher is better, e.g. Dice) over the severities of one corruption.

    With weights ``w_s = alpha**s / sum(alpha**t for t present)`` over the severities s (1..5) present::

        weighted_mean = sum(w_s * score_s)
        degradation   = clean_score - weighted_mean          (the mean drop, weighted toward mild corruptions)
        overall       = (clean_score + sum(alpha**s * score_s)) / (1 + sum(alpha**s))   (clean at severity 0)

    Boone et al., "ROOD-MRI: Benchmarking the robustness of deep learning segmentation models to
    out-of-distribution and corrupted data in MRI", NeuroImage, 2023 (arXiv:2203.06060), with alpha = 2/3. For a
    lower-is-better metric (a distance) the degradation is negative when the metric worsens.
    """
    if not scores_by_severity:
        raise InputError("give the score at one severity at least")
    if not alpha > 0:
        raise InputError("alpha must be positive, got {}".format(alpha))
    powers = {_check_severity(s): alpha ** s for s in scores_by_severity}
    total = sum(powers.values())
    weighted_sum = sum(powers[int(s)] * float(score) for s, score in scores_by_severity.items())
    weighted_mean = weighted_sum / total
    return dict(weighted_mean=weighted_mean, degradation=float(clean_score) - weighted_mean,
                overall=(float(clean_score) + weighted_sum) / (1.0 + total))


def _corrupt_image(corruption, parameters, image, rng, spacing):
    """The corrupted (C, X, Y, Z) image and, for a spatial family, the deformation that made it (else None)."""
    if not corruption.spatial:
        return corruption.apply(image, parameters, rng, spacing), None
    deform = corruption.deformation(tuple(image.shape[1:]), parameters, rng, spacing)
    return deform(image, "bilinear"), deform


# Spatial families: each returns a _Deformation.

@dataclass(frozen=True)
class _Deformation:
    """``deform(image (C, X, Y, Z) float32, mode)``: the deformed image; ``shown_at()``: (3, X, Y, Z) float64, the
    (fractional) voxel of the deformed image that shows each voxel of the subject."""
    move: Callable
    shown_at: Callable

    def __call__(self, image, mode):
        return self.move(image, mode)


def _affine_deformation(shape, parameters, rng, spacing):
    rotation = rng.uniform(-1.0, 1.0, 3) * parameters["max_rotation_deg"]
    translation = rng.uniform(-1.0, 1.0, 3) * parameters["max_translation_mm"]
    matrix = _rigid_voxel_matrix(rotation, translation, spacing)
    return _Deformation(lambda image, mode: _resample(image, matrix, mode),
                        lambda: _affine_shown_at(shape, np.linalg.inv(matrix)))


def _affine_shown_at(shape, inverse):
    """Voxel ``o`` of the deformed image shows the subject at ``matrix (o - c) + c`` (c: the grid centre), so subject
    voxel ``p`` is shown at ``inverse (p - c) + c``."""
    centred = create_grid(shape, homogeneous=True, backend="numpy", dtype=np.float64).reshape(4, -1)
    return (inverse @ centred)[:3].reshape((3,) + tuple(shape)) + _centre(shape)


def _elastic_deformation(shape, parameters, rng, spacing):
    """Noise on a grid of ELASTIC_GRID_STEPS nodes per smoothness length, Gaussian-smoothed, interpolated to the
    volume and scaled so that the largest displacement is exactly ``max_displacement_mm``."""
    smoothness = parameters["smoothness_mm"]
    extent = [(n - 1) * s for n, s in zip(shape, spacing)]
    coarse = [max(2, int(np.ceil(e * ELASTIC_GRID_STEPS / smoothness)) + 1) for e in extent]
    steps = [max(e, 1e-6) / (m - 1) for e, m in zip(extent, coarse)]
    noise = torch.from_numpy(rng.uniform(-1.0, 1.0, [3] + coarse).astype(np.float32))
    field = _plain(GaussianSmooth(sigma=[smoothness / step for step in steps])(noise))
    field = _plain(Resize(shape, mode="trilinear", align_corners=True)(field))
    field = field / field.norm(dim=0).max() * parameters["max_displacement_mm"]
    grid = torch.as_tensor(create_grid(shape, homogeneous=False, backend="torch", dtype=torch.float32))
    field = field / torch.tensor(spacing, dtype=torch.float32).reshape(3, 1, 1, 1)  # voxels
    sampled = grid + field
    return _Deformation(lambda image, mode: _resample_grid(image, sampled, mode),
                        lambda: _elastic_shown_at(grid, field))


def _elastic_shown_at(grid, field):
    """Voxel ``o`` of the deformed image shows the subject at ``o + field(o)``: subject voxel ``p`` is shown at the
    ``o`` with ``o = p - field(o)``, iterated from ``o = p`` (a contraction where the field's gradient is below 1)."""
    shown = grid.clone()
    sample = Resample(mode="bilinear", padding_mode="border", dtype=torch.float32)
    for _ in range(ELASTIC_INVERSE_STEPS):
        previous, shown = shown, grid - _plain(sample(field, shown))
        if float((shown - previous).abs().max()) < ELASTIC_INVERSE_TOLERANCE:
            break
    return shown.numpy().astype(np.float64) + _centre(tuple(grid.shape[1:]))


def _centre(shape):
    """(3, 1, 1, 1): the centre of a grid in voxel indices (MONAI's centred coordinates are index - centre)."""
    return ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0).reshape(3, 1, 1, 1)


def _pull_back(moved, shown_at):
    """``moved[round(shown_at)]`` per subject voxel, 0 where that voxel is off the grid."""
    index = np.rint(shown_at)
    inside = np.all((index >= 0) & (index <= np.reshape(moved.shape, (3, 1, 1, 1)) - 1), axis=0)
    result = np.zeros(moved.shape, dtype=moved.dtype)
    result[inside] = moved[tuple(index[:, inside].astype(np.int64))]
    return result


def _rigid_voxel_matrix(rotation_deg, translation_mm, spacing):
    """Centred output-to-input voxel matrix of a rotation (about the grid centre) and translation in mm."""
    physical = create_translate(3, translation_mm) @ create_rotate(3, np.deg2rad(rotation_deg))
    scale = np.diag(list(spacing) + [1.0])
    return np.linalg.inv(scale) @ physical @ scale


def _resample(image, matrix, mode):
    """``image`` under a centred voxel matrix; outside the field of view is the image's minimum (background)."""
    low = image.min()
    moved = Affine(affine=torch.as_tensor(matrix, dtype=torch.float32), mode=mode, padding_mode="zeros",
                   image_only=True)(image - low)
    return _plain(moved) + low


def _resample_grid(image, grid, mode):
    """``image`` sampled at ``grid`` (3, X, Y, Z) centred voxel coordinates; the image's minimum outside."""
    low = image.min()
    moved = Resample(mode=mode, padding_mode="zeros", dtype=torch.float32)(image - low, grid.to(image.device))
    return _plain(moved) + low


# Intensity families and artefacts: each is ``apply(image (C, X, Y, Z) float32, parameters, rng, spacing)``.

def _anisotropic_downsampling(image, parameters, rng, spacing):
    """Thick slices every ``factor`` voxels along a random axis, from a random first position, each the nearest
    voxel plane (as TorchIO's RandomAnisotropy); the planes between are interpolated linearly."""
    axis = 1 + int(rng.integers(3))
    factor = parameters["factor"]
    size = image.shape[axis]
    positions = np.arange(rng.uniform() * factor, size - 0.5, factor)
    if len(positions) == 0:
        positions = np.array([0.0])
    slices = image.index_select(axis, torch.as_tensor(np.round(positions).astype(np.int64), device=image.device))
    where = np.clip((np.arange(size) - positions[0]) / factor, 0.0, len(positions) - 1)
    below = np.floor(where).astype(np.int64)
    above = np.minimum(below + 1, len(positions) - 1)
    weight_shape = [1, 1, 1, 1]
    weight_shape[axis] = size
    weight = torch.as_tensor(where - below, dtype=image.dtype, device=image.device).reshape(weight_shape)
    lower = slices.index_select(axis, torch.as_tensor(below, device=image.device))
    upper = slices.index_select(axis, torch.as_tensor(above, device=image.device))
    return lower * (1.0 - weight) + upper * weight


def _bias_field(image, parameters, rng, spacing):
    """MONAI's bias field, rescaled to geometric mean 1 over the signal so the overall brightness is kept."""
    limit = parameters["max_coefficient"]
    field = RandBiasField(degree=3, coeff_range=(-limit, limit), prob=1.0)
    field.set_random_state(seed=_monai_seed(rng))
    biased = _above_minimum(image, field)
    low = image.min()
    signal, biased_signal = image - low, biased - low
    inside = signal > 0
    log_gain = torch.log(biased_signal[inside] / signal[inside]).mean()
    return low + biased_signal * torch.exp(-log_gain)


def _contrast(image, parameters, rng, spacing):
    return _plain(AdjustContrast(gamma=parameters["gamma"])(image))


def _rician_noise(image, parameters, rng, spacing):
    sigma = parameters["sigma_fraction"] * float(image.max() - image.min())
    noise = RandRicianNoise(prob=1.0, mean=0.0, std=sigma, relative=False, sample_std=False)
    noise.set_random_state(seed=_monai_seed(rng))
    return _above_minimum(image, noise)


def _smoothing(image, parameters, rng, spacing):
    sigma = [parameters["sigma_mm"] / s for s in spacing]
    return _above_minimum(image, GaussianSmooth(sigma=sigma))


def _gibbs_ringing(image, parameters, rng, spacing):
    return _magnitude_of(_above_minimum(image, GibbsNoise(alpha=parameters["alpha"])), image)


def _kspace_spikes(image, parameters, rng, spacing):
    shape = tuple(image.shape[1:])
    locations = [_spike_location(shape, rng) for _ in range(MAX_SPIKES)][:parameters["spikes"]]
    centre_magnitude = float((image - image.min()).sum(dim=(1, 2, 3)).abs().max())
    log_magnitude = float(np.log(parameters["relative_magnitude"] * centre_magnitude + 1e-10))
    spikes = KSpaceSpikeNoise(loc=locations, k_intensity=[log_magnitude] * len(locations))
    return _magnitude_of(_above_minimum(image, spikes), image)


def _spike_location(shape, rng):
    """A k-space index (after fftshift) at least SPIKE_MIN_OFFSET lines from the centre along some axis."""
    while True:
        offsets = [int(rng.integers(-(n // 2), n - n // 2)) for n in shape]
        if max(abs(o) for o in offsets) >= SPIKE_MIN_OFFSET:
            return tuple(n // 2 + o for n, o in zip(shape, offsets))


def _ghosting(image, parameters, rng, spacing):
    """Every ``ghosts``-th k-space plane along X or Y (random) scaled by 1 - intensity * e^(i phase) (random phase):
    copies of the image shifted by multiples of 1/ghosts of the field of view. As in TorchIO, but the comb starts
    next to the k-space centre (the centre itself is kept), so that the artefact grows with the severity."""
    axis = 1 + int(rng.integers(2))
    phase = rng.uniform(0.0, 2.0 * np.pi)
    spectrum = _spectrum(image - image.min())
    size = spectrum.shape[axis]
    offset = torch.arange(size, device=image.device) - size // 2
    planes = (offset - 1) % parameters["ghosts"] == 0
    scaled = complex(1.0 - parameters["intensity"] * np.exp(1j * phase))
    gain = torch.where(planes, torch.tensor(scaled), torch.tensor(1.0 + 0.0j))
    view = [1, 1, 1, 1]
    view[axis] = size
    return _magnitude_image(spectrum * gain.reshape(view).to(spectrum.dtype), image)


def _motion(image, parameters, rng, spacing):
    """TorchIO's k-space motion model: k-space segments along Z (the slowest phase encoding) come from the anatomy
    in successive rigid poses; the segment holding the k-space centre from the unmoved anatomy."""
    rotations = rng.uniform(-1.0, 1.0, (MAX_MOVEMENTS, 3)) * parameters["max_rotation_deg"]
    translations = rng.uniform(-1.0, 1.0, (MAX_MOVEMENTS, 3)) * parameters["max_translation_mm"]
    count = parameters["movements"]
    poses = [_resample(image, _rigid_voxel_matrix(r, t, spacing), "bilinear")
             for r, t in zip(rotations[:count], translations[:count])]
    low = image.min()
    depth = image.shape[-1]
    bounds = np.round(np.linspace(0, depth, count + 2)).astype(int)
    reference = int(np.searchsorted(bounds, depth // 2, side="right")) - 1
    sources = poses[:reference] + [image] + poses[reference:]
    segments = [_spectrum_planes(source - low, start, stop)
                for source, start, stop in zip(sources, bounds[:-1], bounds[1:])]
    return _magnitude_image(torch.cat(segments, dim=-1), image)


def _spectrum_planes(image, start, stop):
    """Planes start..stop-1 along Z of ``_spectrum(image)``, transforming X and Y of those planes only."""
    along_z = torch.fft.fftshift(torch.fft.fft(image, dim=3), dim=3)[..., start:stop]
    return torch.fft.fftshift(torch.fft.fftn(along_z, dim=(1, 2)), dim=(1, 2))


def _spectrum(image):
    return torch.fft.fftshift(torch.fft.fftn(image, dim=(1, 2, 3)), dim=(1, 2, 3))


def _magnitude_image(spectrum, image):
    """The magnitude of the image of a (shifted) spectrum of the signal above ``image``'s minimum, as a scanner
    reconstructs it, back in ``image``'s intensities."""
    signal = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(1, 2, 3)), dim=(1, 2, 3))
    return signal.abs().to(torch.float32) + image.min()


def _magnitude_of(result, image):
    """The magnitude of a real-part result of MONAI's k-space transforms (its signal above ``image``'s minimum)."""
    low = image.min()
    return (result - low).abs() + low


def _above_minimum(image, transform):
    """``transform`` applied to the signal above the image's minimum, returned in the image's intensities."""
    low = image.min()
    return _plain(transform(image - low)).to(torch.float32) + low


def _plain(tensor):
    return convert_to_tensor(tensor, track_meta=False)


def _monai_seed(rng):
    return int(rng.integers(2 ** 31))


def _levels(**values):
    """Five parameter dicts from per-parameter sequences of five values."""
    return tuple({key: _scalar(value[i]) for key, value in values.items()} for i in range(len(SEVERITIES)))


def _scalar(value):
    return value.item() if isinstance(value, np.generic) else value


def _corruption(name):
    if name not in CORRUPTIONS:
        raise InputError("unknown corruption {!r}; expected one of {}".format(name, ", ".join(CORRUPTIONS)))
    return CORRUPTIONS[name]


def _check_severity(severity):
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise InputError("severity must be one of 1, 2, 3, 4, 5, got {!r}".format(severity))
    return int(severity)


def _prepare(name, volume, severity, seed, spacing):
    if not isinstance(volume, torch.Tensor) or volume.dim() != 5 or volume.shape[0] != 1:
        raise InputError("expected a (1, C, X, Y, Z) tensor, got {}".format(
            tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__))
    if not volume.is_floating_point():
        raise InputError("expected a floating-point volume, got {}".format(volume.dtype))
    corruption, parameters, rng, spacing = _checked(name, severity, seed, spacing)
    return corruption, parameters, volume.detach()[0].to(torch.float32), rng, spacing


def _checked(name, severity, seed, spacing):
    """The family, its parameters at ``severity``, the random generator of ``seed`` and the spacing, checked."""
    corruption = _corruption(name)
    parameters = corruption.levels[_check_severity(severity) - 1]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("seed must be a non-negative integer, got {!r}".format(seed))
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise InputError("spacing must be three positive sizes in mm, got {}".format(spacing))
    return corruption, parameters, np.random.default_rng(int(seed)), spacing


def _as_volume(result, like):
    return _plain(result).reshape(like.shape).to(dtype=like.dtype, device=like.device)


_SEVERITY_STEPS = np.arange(1, 6, dtype=np.float64)

CORRUPTIONS = {corruption.name: corruption for corruption in (
    Corruption("affine", "rigid mispositioning: rotation about and translation along each axis, uniform in +-max",
               _levels(max_rotation_deg=6.0 * _SEVERITY_STEPS, max_translation_mm=8.0 * _SEVERITY_STEPS),
               deformation=_affine_deformation),
    Corruption("anisotropic_downsampling", "thick slices: one random axis sampled at factor x its spacing "
               "(nearest), interpolated back (linear)",
               _levels(factor=(2.8, 4.6, 6.4, 8.2, 10.0)), apply=_anisotropic_downsampling),
    Corruption("bias_field", "smooth multiplicative intensity inhomogeneity: exp of a degree-3 Legendre polynomial, "
               "coefficients uniform in +-max_coefficient",
               _levels(max_coefficient=(0.3, 0.6, 0.9, 1.2, 1.5)), apply=_bias_field),
    Corruption("contrast_compression", "gamma < 1 on the intensity range: bright tissues pushed together",
               _levels(gamma=(0.86, 0.72, 0.58, 0.44, 0.30)), apply=_contrast, random=False),
    Corruption("contrast_expansion", "gamma > 1 on the intensity range: bright tissues pulled apart",
               _levels(gamma=(1.4, 1.8, 2.2, 2.6, 3.0)), apply=_contrast, random=False),
    Corruption("elastic_deformation", "smooth random displacement field (Gaussian-smoothed noise) with the given "
               "largest displacement",
               _levels(max_displacement_mm=3.0 * _SEVERITY_STEPS, smoothness_mm=(ELASTIC_SMOOTHNESS_MM,) * 5),
               deformation=_elastic_deformation),
    Corruption("ghosting", "every n-th k-space plane along X or Y scaled by (1 - intensity): n ghosts",
               _levels(ghosts=(3, 5, 7, 9, 11), intensity=(0.5, 1.0, 1.5, 2.0, 2.5)), apply=_ghosting),
    Corruption("motion", "rigid movements during the scan: k-space segments along Z from moved copies",
               _levels(movements=(2, 4, 6, 8, 10), max_rotation_deg=1.0 * _SEVERITY_STEPS,
                       max_translation_mm=2.0 * _SEVERITY_STEPS), apply=_motion),
    Corruption("rician_noise", "Rician (magnitude) noise with sigma as a fraction of the intensity range",
               _levels(sigma_fraction=(0.06, 0.12, 0.18, 0.24, 0.30)), apply=_rician_noise),
    Corruption("smoothing", "Gaussian blur with sigma in mm",
               _levels(sigma_mm=(0.8, 1.6, 2.4, 3.2, 4.0)), apply=_smoothing, random=False),
    Corruption("gibbs_ringing", "k-space truncated to a sphere (MONAI GibbsNoise): ringing at edges",
               _levels(alpha=(0.35, 0.45, 0.55, 0.65, 0.75)), apply=_gibbs_ringing, random=False),
    Corruption("kspace_spikes", "spikes in k-space (herringbone stripes), magnitude relative to the k-space centre",
               _levels(spikes=(1, 2, 3, 4, 5), relative_magnitude=(0.1, 0.2, 0.3, 0.4, 0.5)), apply=_kspace_spikes),
)}
