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


def test_ct_sized_gradient_goes_to_the_order_statistics_a_stable_sort_names(ct_volume):
    """On 17.3 M tied voxels the gradient of each percentile goes to the voxels at positions floor(q(n-1)) and the
    next one of a stable sort, with weights (1 - frac, frac)."""
    flat = ct_volume.reshape(1, 1, -1).clone().requires_grad_(True)
    q = 0.005
    gradient, = torch.autograd.grad(percentiles(flat, (q,))[0].sum(), flat)
    order = np.argsort(flat.detach().numpy().ravel(), kind="stable")
    position = q * (flat.shape[-1] - 1)
    below, frac = int(np.floor(position)), position - np.floor(position)
    expected = {int(order[below]): 1.0 - frac}
    expected[int(order[below + 1])] = expected.get(int(order[below + 1]), 0.0) + frac
    found = {int(i): float(gradient.ravel()[i]) for i in torch.nonzero(gradient.ravel()).ravel()}
    assert found.keys() <= expected.keys()
    for index, weight in expected.items():
        assert found.get(index, 0.0) == pytest.approx(weight, abs=1e-6)
