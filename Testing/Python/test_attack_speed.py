"""The faster attack paths give what the slower ones gave: windowed gradients with kept windows (all, some, none)
equal to recomputing every window and to autograd; the float32 L-infinity projection equal to the float64 one; the
confusion-count Dice equal to MONAI's; the tail selection of percentiles equal to a stable sort; a batch of
strengths equal to one strength at a time; the input gradients of stride-1 convolutions, taken as forward
convolutions, equal to PyTorch's backward."""
import numpy as np
import pytest
import torch

from conftest import SHAPE, random_volume, tiny_model
from MedAdvRobustnessLib.evaluation.metrics import dice_per_label, mean_dice
from MedAdvRobustnessLib.networks.convolutions import input_gradient_convolutions, swappable
from MedAdvRobustnessLib.networks.models import ModelDescription, SegmentationModel
from MedAdvRobustnessLib.networks.outputs import voxel_loss
from MedAdvRobustnessLib.networks.preprocessing import order_indices
from MedAdvRobustnessLib.networks.windowed import OUTPUT_BUFFERS, parse_bytes
from MedAdvRobustnessLib.probes.attacks import PGD, foreground_dice, linf_limits, project_linf

WINDOWS = [
    {"roi_size": [16, 16, 16], "overlap": 0.25, "mode": "gaussian"},
    {"roi_size": [16, 20, 24], "overlap": 0.5, "mode": "constant", "sw_batch_size": 3},
]


def small_windowed_model(window, mode="windowed"):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                                  torch.nn.Conv3d(4, 3, 3, padding=1)).double()
    description = ModelDescription(name="small", window=window, output_activation="logits",
                                   intensity={"type": "percentile", "lower": 1.0, "upper": 99.0})
    return SegmentationModel(network, description, gradient_mode=mode).eval()


@pytest.mark.parametrize("window", WINDOWS, ids=["gaussian", "constant-batched-padded"])
def test_kept_windows_give_the_recomputed_gradient(window):
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand((1, 1, 30, 28, 20), generator=generator, dtype=torch.float64) * 200.0
    labels = torch.randint(0, 3, (1, 30, 28, 20), generator=generator)
    loss = lambda outputs: voxel_loss(outputs, labels, "logits").mean()  # noqa: E731
    naive = small_windowed_model(window, "naive").loss_and_gradient(volume, loss)[1]
    model = small_windowed_model(window)
    model.memory_budget = 0
    _, recomputed, outputs = model.loss_and_gradient(volume, loss)
    report = model.gradient_report
    assert report["mode"] == "none kept" and report["kept"] == 0 and report["batches"] >= 2
    reserve = OUTPUT_BUFFERS * int(np.prod([max(i, r) for i, r in zip(volume.shape[2:], window["roi_size"])])) \
        * outputs.shape[1] * outputs.element_size()
    assert report["reserve"] == reserve
    budgets = {"all kept": 10 ** 12, "some kept": reserve + 2 * report["window_bytes"]}
    for mode, budget in budgets.items():
        model.memory_budget = budget
        _, gradient, _ = model.loss_and_gradient(volume, loss)
        assert model.gradient_report["mode"] == mode
        if mode == "some kept":
            assert model.gradient_report["kept"] == 1
        torch.testing.assert_close(gradient, recomputed, rtol=1e-12, atol=1e-12 * float(recomputed.abs().max()))
    torch.testing.assert_close(recomputed, naive, rtol=1e-9, atol=1e-12 * float(naive.abs().max()))
    _, record = PGD(steps=1)(model, volume, labels, 5.0, (0.0, 200.0))
    assert record.details["windows"]["mode"] == "some kept"


def test_the_memory_budget_default_and_flag_reach_the_gradient(tmp_path, monkeypatch, capsys):
    """Default: half the memory available now; ``--memory-budget`` sets the model's, and the run says which mode
    ran (its progress line and run.json)."""
    import json
    from MedAdvRobustnessLib import cli
    from MedAdvRobustnessLib.networks import windowed
    assert windowed.default_memory_budget("cpu") == pytest.approx(windowed.available_memory("cpu") / 2, rel=0.05)
    window = WINDOWS[0]
    model = small_windowed_model(window)
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand((1, 1, 30, 28, 20), generator=generator, dtype=torch.float64) * 200.0
    loss = lambda outputs: outputs.square().mean()  # noqa: E731
    model.loss_and_gradient(volume, loss)
    assert model.gradient_report["budget"] == pytest.approx(windowed.available_memory("cpu") / 2, rel=0.1)
    assert model.gradient_report["mode"] == "all kept"
    seen = []
    original = SegmentationModel.loss_and_gradient

    def spy(self, point, loss_fn):
        seen.append(self.memory_budget)
        return original(self, point, loss_fn)

    monkeypatch.setattr(SegmentationModel, "loss_and_gradient", spy)
    import shutil
    from MedAdvRobustnessLib.networks.models import MODELS_DIR
    from MedAdvRobustnessLib.sample import SAMPLE_VOLUME
    folder = tmp_path / "demo-in-windows"  # the demo in 48^3 windows: several over the 2 mm sample
    shutil.copytree(str(MODELS_DIR / "demo-unet"), str(folder))
    description = json.loads((folder / "model.json").read_text())
    description["window"]["roi_size"] = [48, 48, 48]
    (folder / "model.json").write_text(json.dumps(description))
    out = tmp_path / "out"
    code = cli.main(["run", "--volume", str(SAMPLE_VOLUME), "--model", str(folder), "--attack", "fgsm",
                     "--epsilon", "0.01", "--memory-budget", "1K", "--out", str(out)])
    assert code == 0 and seen and set(seen) == {1024}
    printed = capsys.readouterr()
    assert "windowed gradient: none kept (0 of 12 window batches kept, 12 recomputed" in printed.out + printed.err
    record = json.loads((out / "run.json").read_text())["model"]
    assert record["memory_budget"] == 1024 and record["windowed_gradient"]["mode"] == "none kept"


def test_memory_sizes_parse():
    assert parse_bytes("8G") == 8 * 2 ** 30 and parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes("2e9") == 2 * 10 ** 9 and parse_bytes("1.5 GB") == int(1.5 * 2 ** 30)
    with pytest.raises(ValueError):
        parse_bytes("lots")


@pytest.mark.parametrize("with_region", [False, True])
def test_float32_projection_equals_the_float64_one(with_region):
    generator = torch.Generator().manual_seed(3)
    original = (torch.rand((2, 1) + SHAPE, generator=generator) * 1000.0 - 100.0)
    original[0, 0, 0, 0, :4] = torch.tensor([-100.0, 900.0, 0.1, 1e-30])
    region = (torch.rand((2, 1) + SHAPE, generator=generator) > 0.3) if with_region else None
    bounds = (-90.0, 850.5)
    for epsilon in (0.1, 4.84, 33.3333):
        lower, upper = linf_limits(original, epsilon, bounds, region)
        for scale in (0.5, 1.0, 3.0):
            candidate = original + scale * epsilon * (torch.rand(original.shape, generator=generator) * 2 - 1)
            expected = project_linf(candidate, original, epsilon, bounds)
            if region is not None:
                expected = torch.where(region, expected, original)
            assert torch.equal(torch.minimum(torch.maximum(candidate, lower), upper), expected)


@pytest.mark.parametrize("count", [5, 20])  # pair indices in uint8 (up to 16 labels), else int32
def test_confusion_dice_equals_monai(count):
    generator = torch.Generator().manual_seed(4)
    outputs = torch.randn((2, count) + SHAPE, generator=generator)
    labels = torch.randint(0, count - 1, (2,) + SHAPE, generator=generator)  # the last label absent from them
    labels[1][labels[1] == 2] = 0
    prediction = outputs.max(dim=1).indices
    expected = [mean_dice(dice_per_label(prediction[b], labels[b], count)) for b in range(2)]
    assert foreground_dice(outputs, "logits", labels) == expected


@pytest.mark.parametrize("ties", [False, True])
def test_tail_selection_picks_what_a_stable_sort_puts_there(ties):
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn((3, 2000), generator=generator, dtype=torch.float64)
    rows = rows.mul(2).round() if ties else rows
    ranks = [0, 1, 9, 10, 700, 1000, 1989, 1990, 1998, 1999]  # both tails, kthvalue, the extremes
    order = np.argsort(rows.numpy(), axis=1, kind="stable")
    assert torch.equal(order_indices(rows, ranks), torch.from_numpy(order[:, ranks]))


def test_pgd_record_is_unchanged_by_the_single_loss():
    """The losses recorded are those of the points the gradients were taken at, one per evaluation."""
    model = tiny_model()
    volume = random_volume()
    labels = torch.randint(0, 4, (1,) + SHAPE, generator=torch.Generator().manual_seed(6))
    low, high = float(volume.min()), float(volume.max())
    points = []
    original = model.loss_and_gradient

    def spy(point, loss_fn):
        points.append(point.clone())
        return original(point, loss_fn)

    model.loss_and_gradient = spy
    _, record = PGD(steps=3)(model, volume, labels, 0.03 * (high - low), (low, high))
    with torch.no_grad():
        expected = [float(voxel_loss(model(p), labels, "logits").mean()) for p in points]
    assert record.losses == pytest.approx(expected, rel=1e-6) and len(record.dice) == 3


def convolution_layers():
    """Every kind of stride-1 convolution the swap takes (odd, even and 1 kernels, zero to kernel - 1 padding, 2D
    and 3D, with and without bias) and the kinds it leaves to PyTorch."""
    taken = [torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.Conv3d(3, 2, (1, 2, 5), padding=(0, 1, 4), bias=False),
             torch.nn.Conv3d(2, 2, 1), torch.nn.Conv2d(2, 3, (3, 4), padding=(2, 0))]
    left = [torch.nn.Conv3d(2, 2, 3, stride=2, padding=1), torch.nn.Conv3d(2, 2, 3, dilation=2, padding=2),
            torch.nn.Conv3d(2, 2, 3, groups=2, padding=1), torch.nn.Conv3d(2, 2, 3, padding=1, padding_mode="reflect"),
            torch.nn.Conv3d(2, 2, 3, padding="same"), torch.nn.ConvTranspose3d(2, 2, 3, padding=1)]
    return taken, left


def test_stride_one_input_gradients_equal_pytorch_backward():
    torch.manual_seed(7)
    taken, left = convolution_layers()
    assert all(swappable(layer) for layer in taken) and not any(swappable(layer) for layer in left)
    for layer in taken + left:
        layer.double()
        shape = (2, layer.in_channels) + ((7, 6) if isinstance(layer, torch.nn.Conv2d) else (7, 6, 9))
        inputs = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        expected_outputs = layer(inputs)
        cotangent = torch.randn_like(expected_outputs)
        expected, = torch.autograd.grad(expected_outputs, inputs, cotangent)
        with input_gradient_convolutions(layer, torch.device("cpu")):
            assert ("forward" in vars(layer)) == any(layer is swapped for swapped in taken)
            outputs = layer(inputs)
            gradient, = torch.autograd.grad(outputs, inputs, cotangent)
        assert "forward" not in vars(layer)  # PyTorch's own forward again after the block
        assert torch.equal(outputs, expected_outputs)  # the same forward call
        torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)


def test_swapped_convolutions_are_restored_after_an_error_and_left_alone_on_cuda_and_with_amp():
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Conv3d(2, 2, 3, padding=1))
    with pytest.raises(RuntimeError):
        with input_gradient_convolutions(network, torch.device("cpu")):
            assert all("forward" in vars(layer) for layer in network)
            raise RuntimeError("stopped")
    assert not any("forward" in vars(layer) for layer in network)
    with input_gradient_convolutions(network, torch.device("cuda")):  # a fast backward there: nothing changes
        assert not any("forward" in vars(layer) for layer in network)
    with input_gradient_convolutions(network, torch.device("cpu"), amp=True):  # autocast's dtypes: PyTorch's own
        assert not any("forward" in vars(layer) for layer in network)


def test_attack_gradient_equals_plain_autograd_on_the_demo_network():
    """The demo UNet (stride-1, strided and transposed convolutions): the gradient of ``loss_and_gradient`` equals
    autograd through the plain network, and the outputs are bit for bit the same."""
    from MedAdvRobustnessLib.networks.models import load_model
    model = load_model("demo")
    generator = torch.Generator().manual_seed(8)
    volume = torch.rand((1, 1, 40, 48, 40), generator=generator) * 500.0
    with torch.no_grad():
        labels = model.predict(volume)
    loss = lambda outputs: voxel_loss(outputs, labels, model.activation).mean()  # noqa: E731
    point = volume.clone().requires_grad_(True)
    expected_outputs = model(point)
    expected, = torch.autograd.grad(loss(expected_outputs), point)
    _, gradient, outputs = model.loss_and_gradient(volume, loss)
    assert torch.equal(outputs, expected_outputs.detach())
    torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_pgd_on_the_demo_is_the_same_with_and_without_the_convolution_swap(monkeypatch):
    """3 PGD steps on the 2 mm sample: the swap changes the gradient by float rounding only. Where a voxel's
    gradient is at the rounding (about 1e-13 of a largest 0.07, a background voxel) its sign may flip and its step
    go the other way (measured: 297 of 614,400 voxels), as any change of rounding (threads, CPU) would do; the
    losses and Dice stay within 1e-4, the predictions differ on 197 voxels (0.03 %)."""
    import contextlib
    import nibabel as nib
    from MedAdvRobustnessLib.networks import models
    from MedAdvRobustnessLib.sample import SAMPLE_VOLUME
    model = models.load_model("demo")
    image = nib.as_closest_canonical(nib.load(str(SAMPLE_VOLUME)))
    volume = torch.from_numpy(image.get_fdata(dtype="float32"))[None, None]
    labels = model.predict(volume)
    low, high = float(volume.min()), float(volume.max())
    epsilon = 0.02 * (high - low)
    swapped, record = PGD(steps=3)(model, volume, labels, epsilon, (low, high))
    monkeypatch.setattr(models, "input_gradient_convolutions", lambda *args: contextlib.nullcontext())
    plain, plain_record = PGD(steps=3)(model, volume, labels, epsilon, (low, high))
    differing = int((swapped != plain).sum())
    assert float((swapped - volume).abs().max()) > 0.0
    assert differing <= volume.numel() // 500, differing  # 0.2 %: four times what was measured
    assert record.losses == pytest.approx(plain_record.losses, rel=1e-4)
    assert record.dice == pytest.approx(plain_record.dice, abs=1e-4)
    same = float((model.predict(swapped) == model.predict(plain)).float().mean())
    assert same >= 0.999, same  # measured 0.99968
