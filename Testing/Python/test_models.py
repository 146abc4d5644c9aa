"""Bring your own network: TorchScript, model folders (architecture + state dict), MONAI bundles, safe loading,
windowed gradients, resampling to the network's spacing, devices. Tiny networks the tests build and save."""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from conftest import monai_bundle_run, write_bundle as shared_write_bundle
from MedAdvRobustnessLib import cli
from MedAdvRobustnessLib.probes.attacks import FGSM
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import (ModelDescription, SegmentationModel, UnsafeCheckpoint, describe,
                                        detect_activation, load_model)
from MedAdvRobustnessLib.scene.nodes import volume_from_node
from MedAdvRobustnessLib.networks.outputs import voxel_loss
from MedAdvRobustnessLib.pipeline import run_on_files, run_on_nodes
from MedAdvRobustnessLib.sample import SAMPLE_VOLUME
from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
             "num_res_units": 0}
LABEL_NAMES = {"0": "background", "1": "cerebrospinal fluid", "2": "brain tissue"}


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(**UNET_ARGS).eval()


@pytest.fixture(scope="module")
def sample():
    """The embedded sample (80x96x80, 2 mm) as the network sees it."""
    return volume_from_node(SlicerScene.standalone().load_volume(SAMPLE_VOLUME))


def outputs_on(model, volume):
    with torch.no_grad(), model.on_grid(volume):
        return model(volume.as_tensor())


def write_model_folder(folder, network, checkpoint=None, **fields):
    """model.json naming the architecture, and a checkpoint (default: the network's state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict() if checkpoint is None else checkpoint, str(folder / "model.pt"))
    description = dict({"name": "tiny", "architecture": {"name": "UNet", "args": UNET_ARGS}, "weights": "model.pt"},
                       **fields)
    (folder / "model.json").write_text(json.dumps(description))
    return folder


def write_bundle(root, network):
    """The tiny brain bundle: z-score over the non-zero voxels, 48^3 windows, softmax and argmax."""
    return shared_write_bundle(root, network, UNET_ARGS, [{"_target_": "NormalizeIntensityd", "nonzero": True}],
                               (48, 48, 48), [{"_target_": "Activationsd", "softmax": True},
                                              {"_target_": "AsDiscreted", "argmax": True}], LABEL_NAMES)


# ------------------------------------------------------------------------------------------------------ sources
def test_torchscript_file_gives_the_networks_predictions_and_its_activation_is_detected(tmp_path, sample):
    network = torch.nn.Sequential(tiny_unet(), torch.nn.Softmax(dim=1)).eval()
    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.trace(network, torch.zeros(1, 1, 16, 16, 16)), str(path))
    model = load_model(path)
    assert model.description.output_activation is None
    report = describe(model, sample)
    assert report.detected_activation == "softmax" and model.activation == "softmax"
    assert "outputs: softmax (detected: not declared)" in report.lines()
    in_memory = SegmentationModel(network, ModelDescription(name="in memory", output_activation="softmax"))
    loaded, expected = outputs_on(model, sample), outputs_on(in_memory, sample)
    torch.testing.assert_close(loaded, expected)
    assert torch.equal(model.predict(sample.as_tensor()), in_memory.predict(sample.as_tensor()))


@pytest.mark.parametrize("outputs, expected", [
    (torch.randn(1, 3, 4, 4, 4) * 3, "logits"),
    (torch.softmax(torch.randn(1, 3, 4, 4, 4), dim=1), "softmax"),
    (torch.sigmoid(torch.randn(1, 2, 4, 4, 4)), "sigmoid"),
])
def test_output_activation_is_detected(outputs, expected):
    assert detect_activation(outputs) == expected


@pytest.mark.parametrize("wrap", ["state_dict", "checkpoint_dict", "data_parallel"])
def test_architecture_and_state_dict_give_the_networks_predictions(tmp_path, sample, wrap):
    network = tiny_unet()
    weights = network.state_dict()
    checkpoint = {"state_dict": weights, "epoch": 7, "best_metric": 0.9}
    checkpoint = {"state_dict": weights, "checkpoint_dict": checkpoint,
                  "data_parallel": {"module." + key: value for key, value in weights.items()}}[wrap]
    fields = {"intensity": {"type": "percentile", "lower": 1, "upper": 99}, "output_activation": "logits",
              "window": {"roi_size": [48, 48, 48], "overlap": 0.25}}
    folder = write_model_folder(tmp_path / "folder", tiny_unet(seed=1), checkpoint, **fields)
    model = load_model(folder / "model.json" if wrap == "state_dict" else folder)
    in_memory = SegmentationModel(network, ModelDescription.from_dict(dict(fields, name="in memory")))
    torch.testing.assert_close(outputs_on(model, sample), outputs_on(in_memory, sample))


def test_state_dict_that_does_not_fit_the_architecture_is_refused(tmp_path):
    folder = write_model_folder(tmp_path / "folder", UNet(**dict(UNET_ARGS, out_channels=5)))
    with pytest.raises(InputError, match="do not fit the network") as refused:
        load_model(folder)
    message = str(refused.value)  # what differs, in a few words, not torch's list of every tensor
    assert "of another shape (e.g. " in message and "in the file" in message and len(message) < 400, message


def test_monai_bundle_folder_and_zip_give_monai_s_own_outputs_and_label_names(tmp_path, sample):
    network = tiny_unet()
    root = write_bundle(tmp_path / "tiny_brain", network)
    expected = monai_bundle_run(root, network, SAMPLE_VOLUME, postprocessing=False)["pred"][None]
    archive = shutil.make_archive(str(tmp_path / "tiny_brain"), "zip", str(tmp_path), "tiny_brain")
    for source in (root, archive):
        model = load_model(source)
        assert model.description.intensity == {"type": "zscore", "nonzero": True, "mean": None, "std": None}
        assert model.description.window["roi_size"] == [48, 48, 48]
        assert [label.name for label in model.description.labels] == list(LABEL_NAMES.values())
        torch.testing.assert_close(outputs_on(model, sample), expected.as_tensor(), rtol=1e-4, atol=1e-4)


def test_bundle_label_names_reach_the_segmentation_nodes(tmp_path, slicer_scene, sample_nodes):
    model = load_model(write_bundle(tmp_path / "bundle", tiny_unet()))
    volume_node, _labels = sample_nodes
    messages = []
    _result, nodes = run_on_nodes(slicer_scene, volume_node, model, FGSM(), [0.01],
                                  progress=lambda fraction, message: messages.append(message))
    assert "labels: 0 background, 1 cerebrospinal fluid, 2 brain tissue" in messages
    for segmentation_node in nodes["segmentation"].values():
        segmentation = segmentation_node.GetSegmentation()
        names = {segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())}
        assert names and names <= set(LABEL_NAMES.values()) - {"background"}


def test_bundle_whose_config_runs_code_where_it_is_read_needs_trust(tmp_path, sample):
    root = write_bundle(tmp_path / "bundle", tiny_unet())
    config_path = root / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["inferer"]["roi_size"] = "$[48] * 3"
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="--trust-checkpoint"):
        load_model(root)
    assert load_model(root, trust_checkpoint=True).description.window["roi_size"] == [48, 48, 48]


# ------------------------------------------------------------------------------------------------- safe loading
def leave_mark(path):
    """What a malicious checkpoint would run on unpickling (here: write a file)."""
    Path(path).write_text("ran")
    return "harmless"


class CodeOnUnpickling:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return leave_mark, (self.path,)


def test_checkpoint_that_runs_code_is_refused_unless_trusted(tmp_path, sample):
    mark = tmp_path / "code-ran"
    network = tiny_unet()
    checkpoint = {"state_dict": network.state_dict(), "extra": CodeOnUnpickling(str(mark))}
    folder = write_model_folder(tmp_path / "folder", network, checkpoint)
    with pytest.raises(UnsafeCheckpoint) as error:
        load_model(folder)
    assert "--trust-checkpoint" in str(error.value) and "leave_mark" in str(error.value)
    assert not mark.exists()
    model = load_model(folder, trust_checkpoint=True)
    assert mark.exists()
    in_memory = SegmentationModel(network, ModelDescription(name="in memory"))
    torch.testing.assert_close(outputs_on(model, sample), outputs_on(in_memory, sample))


def test_pickled_network_file_loads_only_with_trust(tmp_path, sample):
    mark = tmp_path / "code-ran"
    network = tiny_unet()
    path = tmp_path / "whole-network.pth"
    torch.save({"model": network, "extra": CodeOnUnpickling(str(mark))}, str(path))
    with pytest.raises(UnsafeCheckpoint, match="--trust-checkpoint"):
        load_model(path)
    assert not mark.exists()
    model = load_model(path, trust_checkpoint=True, output_activation="logits")
    assert mark.exists()
    in_memory = SegmentationModel(network, ModelDescription(name="in memory"))
    torch.testing.assert_close(outputs_on(model, sample), outputs_on(in_memory, sample))


def test_cli_runs_a_trusted_checkpoint_on_the_cpu_and_refuses_it_otherwise(tmp_path, capsys):
    network = tiny_unet()
    folder = write_model_folder(tmp_path / "folder", network,
                                {"model": network, "note": CodeOnUnpickling(str(tmp_path / "mark"))},
                                intensity={"type": "zscore"})
    base = ["run", "--volume", str(SAMPLE_VOLUME), "--model", str(folder), "--attack", "fgsm", "--epsilon", "0.01"]
    assert cli.main(base + ["--out", str(tmp_path / "refused")]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists() and not (tmp_path / "mark").exists()
    out = tmp_path / "trusted"
    assert cli.main(base + ["--out", str(out), "--trust-checkpoint", "--device", "cpu"]) == 0
    assert (out / "scene.mrb").is_file() and (tmp_path / "mark").exists()
    assert "outputs: logits (detected: not declared)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(InputError, match="CUDA is not available"):
        load_model("demo", device="cuda")
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), "--attack", "fgsm", "--epsilon", "0.01", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not out.exists()


def test_unknown_device_is_a_clear_error():
    with pytest.raises(InputError, match="device"):
        load_model("demo", device="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here")
def test_cuda_gives_the_cpu_results(sample):
    cpu, cuda = load_model("demo"), load_model("demo", device="cuda")
    torch.testing.assert_close(outputs_on(cuda, sample), outputs_on(cpu, sample), rtol=1e-3, atol=1e-3)
    labels = cpu.predict(sample.as_tensor())
    loss = lambda outputs: voxel_loss(outputs, labels, "logits").mean()  # noqa: E731
    cpu_gradient = cpu.loss_and_gradient(sample.as_tensor(), loss)[1]
    cuda_gradient = cuda.loss_and_gradient(sample.as_tensor(), loss)[1]
    assert cuda_gradient.device.type == "cpu"
    torch.testing.assert_close(cuda_gradient, cpu_gradient, rtol=1e-3, atol=1e-6)


def test_mixed_precision_predicts_almost_the_same_labels(sample):
    full, mixed = load_model("demo"), load_model("demo", amp=True)
    agreement = (full.predict(sample.as_tensor()) == mixed.predict(sample.as_tensor())).float().mean()
    assert float(agreement) > 0.99


# ------------------------------------------------------------------------------------ gradients and resampling
@pytest.mark.parametrize("window", [
    {"roi_size": [16, 16, 16], "overlap": 0.25, "mode": "gaussian"},
    {"roi_size": [16, 20, 24], "overlap": 0.5, "mode": "constant", "sw_batch_size": 3},
    {"roi_size": [48, 48, 48], "overlap": 0.25, "mode": "gaussian"},
], ids=["gaussian", "constant-batched-padded", "one-window"])
def test_windowed_gradient_equals_autograd_through_the_sliding_window(window):
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand((1, 1, 30, 28, 20), generator=generator, dtype=torch.float64) * 200.0
    description = ModelDescription(name="tiny", window=window, spacing=[1.5, 1.5, 1.5],
                                   intensity={"type": "percentile", "lower": 1.0, "upper": 99.0})
    models = {mode: SegmentationModel(tiny_unet().double(), description, gradient_mode=mode)
              for mode in ("windowed", "naive")}
    labels = torch.randint(0, 3, (1, 30, 28, 20), generator=generator)
    loss = lambda outputs: voxel_loss(outputs, labels, "logits").mean()  # noqa: E731
    results = {}
    for mode, model in models.items():
        with model.on_grid([1.0, 1.25, 2.0]):
            results[mode] = model.loss_and_gradient(volume, loss)
    (windowed_loss, windowed, _), (naive_loss, naive, _) = results["windowed"], results["naive"]
    assert windowed_loss == pytest.approx(naive_loss, rel=1e-12)
    assert float(naive.abs().max()) > 0
    torch.testing.assert_close(windowed, naive, rtol=1e-9, atol=1e-12 * float(naive.abs().max()))


def test_attack_through_resampling_is_written_on_the_input_grid_and_reproduces(tmp_path, sample):
    """Network at 3 mm, volume at 2 mm, foreground crop: the adversarial volume is on the input grid and the
    network, run again through the same path on the written file, predicts what the attack reported."""
    folder = write_model_folder(tmp_path / "folder", tiny_unet(), spacing=[3.0, 3.0, 3.0],
                                intensity={"type": "percentile", "lower": 0, "upper": 99.5},
                                crop={"threshold": 0.05, "margin": 2}, pad_divisible=8)
    model = load_model(folder)
    with model.on_grid(sample):
        inputs, plan = model.prepare(sample.as_tensor())
    assert plan["box"] is not None and inputs.shape[2] < 60 and inputs.shape[2] % 8 == 0
    out = tmp_path / "out"
    result = run_on_files(SAMPLE_VOLUME, folder, FGSM(), [0.05], out)
    source = nib.load(str(SAMPLE_VOLUME))
    adversarial = nib.load(str(out / "adversarial_0.05.nii.gz"))
    assert adversarial.shape == source.shape
    np.testing.assert_allclose(adversarial.affine, source.affine, atol=1e-5)
    attacked = nib.load(str(out / "prediction_0.05.nii.gz")).get_fdata()
    clean = nib.load(str(out / "prediction_0.nii.gz")).get_fdata()
    assert (attacked != clean).mean() > 0.01
    rerun = volume_from_node(SlicerScene.standalone().load_volume(out / "adversarial_0.05.nii.gz"))
    with model.on_grid(rerun):
        prediction = model.predict(rerun.as_tensor())[0].numpy()
    np.testing.assert_array_equal(prediction, result.outcomes[1].prediction)
    np.testing.assert_array_equal(prediction, sample.orientation.to_network(attacked.transpose(2, 1, 0)))
