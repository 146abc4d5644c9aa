"""Percentile normalisation beyond 2^24 voxels: :func:`preprocessing.percentiles` gives torch.quantile's values
and gradients on small inputs, numpy.percentile's and MONAI's on a CT-sized volume, where torch.quantile
refuses."""
import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRangePercentiles

from MedAdvRobustnessLib.networks.preprocessing import normalize_intensity, percentiles

FRACTIONS = (0.0, 0.005, 0.5, 0.995, 1.0)
CT_SHAPE = (512, 512, 66)  # 17.3 M voxels > 2^24


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 4096])
def test_values_equal_torch_quantile(n, dtype, ties):
    generator = torch.Generator().manual_seed(n)
    flat = torch.rand((2, 3, n), generator=generator, dtype=torch.float64) * 400.0 + 100.0
    flat = (flat.div(40.0).round() if ties else flat).to(dtype)  # ties: 11 distinct values
    expected = torch.quantile(flat, torch.tensor(FRACTIONS, dtype=dtype), dim=2, keepdim=True)
    got = percentiles(flat, FRACTIONS)
    for fraction, value, reference in zip(FRACTIONS, got, expected):
        assert value.shape == (2, 3, 1) and value.dtype == dtype
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=0, msg="q = {}".format(fraction))


def test_gradient_equals_torch_quantile():
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn((2, 2, 301), generator=generator, dtype=torch.float64)
    weights = torch.randn(len(FRACTIONS), generator=generator, dtype=torch.float64)
    flat.requires_grad_(True)
    ours = sum(w * p.sum() for w, p in zip(weights, percentiles(flat, FRACTIONS)))
    (grad,) = torch.autograd.grad(ours, flat)
    quantiles = torch.quantile(flat, torch.tensor(FRACTIONS, dtype=flat.dtype), dim=2, keepdim=True)
    (expected,) = torch.autograd.grad((weights.view(-1, 1, 1, 1) * quantiles).sum(), flat)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    # per row, positions 0, 1.5, 150, 298.5, 300: one voxel each at the whole ones, two at the others
    assert int((grad != 0).sum()) == 4 * 7


def test_fraction_outside_unit_interval_is_refused():
    with pytest.raises(ValueError):
        percentiles(torch.zeros(1, 1, 5), (1.5,))


@pytest.fixture(scope="module")
def ct_volume():
    """A (1, 1, 512, 512, 66) float32 volume of integer CT-like intensities (many ties), seeded."""
    volume = torch.rand((1, 1) + CT_SHAPE, generator=torch.Generator().manual_seed(0))
    return volume.mul_(4000.0).sub_(1024.0).round_()


def test_ct_sized_values_equal_numpy_percentile(ct_volume):
    low, high = percentiles(ct_volume.flatten(start_dim=2), (0.005, 0.995))
    expected = np.percentile(ct_volume.numpy().ravel(), [0.5, 99.5])
    np.testing.assert_allclose([float(low), float(high)], expected, rtol=1e-6)


def test_ct_sized_normalisation_equals_monai(ct_volume):
    spec = {"type": "percentile", "lower": 0.5, "upper": 99.5, "b_min": 0, "b_max": 1, "clip": True}
    ours = normalize_intensity(ct_volume, spec)
    monai = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0, b_max=1, clip=True)(ct_volume[0])
    assert ours.shape == ct_volume.shape
    assert float((ours[0] - torch.as_tensor(monai)).abs().max()) <= 1e-5


def test_ct_sized_gradient_of_a_tied_percentile_is_zero(ct_volume):
    """On 17.3 M integer voxels the 0.5 % value is held by thousands of voxels: moving one alone leaves it, so no
    voxel gets a gradient (torch.quantile would give it all to one)."""
    flat = ct_volume.reshape(1, 1, -1).clone().requires_grad_(True)
    low, = percentiles(flat, (0.005,))
    assert int((flat.detach() == low.detach()).sum()) > 1000
    gradient, = torch.autograd.grad(low.sum(), flat)
    assert not bool(gradient.any())


@pytest.mark.parametrize("fraction, voxels_with_gradient", [(0.0, 0), (0.3, 1), (0.5, 0), (0.995, 1)])
def test_gradient_is_what_moving_one_voxel_does(fraction, voxels_with_gradient):
    """Per voxel, the gradient equals the change of the percentile when that voxel alone moves a little (upwards
    for the minimum, which a tie at the bottom holds against raising one voxel): 0 for the voxels of a tie."""
    generator = torch.Generator().manual_seed(3)
    flat = (torch.rand((1, 1, 401), generator=generator, dtype=torch.float64) * 10).round()  # 11 values: ties
    flat[0, 0, :200] += torch.rand(200, generator=generator, dtype=torch.float64) * 0.5  # values of their own
    gradient, = torch.autograd.grad(percentiles(flat.requires_grad_(True), (fraction,))[0].sum(), flat)
    assert int((gradient != 0).sum()) == voxels_with_gradient  # a tied and an untied order statistic each
    step = 1e-6
    with torch.no_grad():
        base = float(percentiles(flat, (fraction,))[0])
        for voxel in range(flat.shape[-1]):
            for sign in ((1.0,) if fraction == 0.0 else (1.0, -1.0)):
                moved = flat.clone()
                moved[0, 0, voxel] += sign * step
                change = (float(percentiles(moved, (fraction,))[0]) - base) / (sign * step)
                assert change == pytest.approx(float(gradient[0, 0, voxel]), abs=1e-6), (voxel, sign)
