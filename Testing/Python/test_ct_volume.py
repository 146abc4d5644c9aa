"""A CT-sized volume (512x512x66, more than 2^24 voxels, where torch.quantile refuses) through percentile
normalisation, sliding windows and the window-by-window input gradient of an attack."""
import numpy as np
import torch

from MedAdvRobustnessLib.networks.models import ModelDescription, SegmentationModel
from MedAdvRobustnessLib.probes.registry import make_probe

SHAPE = (512, 512, 66)


def test_fgsm_on_a_ct_sized_volume_with_percentiles_and_windows():
    assert int(np.prod(SHAPE)) > 2 ** 24
    generator = torch.Generator().manual_seed(0)
    volume = torch.randint(-1024, 2000, (1, 1) + SHAPE, generator=generator).float()
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Tanh(),
                                  torch.nn.Conv3d(2, 2, 1)).eval()
    description = ModelDescription(name="ct", intensity={"type": "percentile", "lower": 0.5, "upper": 99.5,
                                                         "b_min": 0.0, "b_max": 1.0, "clip": True},
                                   window={"roi_size": [256, 256, 66], "overlap": 0.0, "mode": "constant"})
    model = SegmentationModel(network, description).eval()
    labels = model.predict(volume)
    epsilon = 0.01 * 3024
    probed, record = make_probe("fgsm")(model, volume, labels, epsilon, (-1024.0, 1999.0))
    delta = probed - volume
    assert float(delta.abs().max()) <= epsilon and float(delta.abs().max()) > 0
    assert np.isfinite(record.losses[0])
