"""``medadv --version``, help without torch, ``run.json``, the dask extra's error line and the LICENSE."""
import hashlib
import json
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import monai
import numpy as np
import torch

from conftest import MEDADV
from MedAdvRobustnessLib import cli
from MedAdvRobustnessLib.probes.registry import make_probe
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("run", "demo", "attacks", "train", "view", "bench")

# Every help in one fresh interpreter: which modules did building and printing them import?
HELP_SCRIPT = """
import contextlib, io, json, sys
from MedAdvRobustnessLib import cli
helps = {}
for argv in [["--help"]] + [[command, "--help"] for command in sys.argv[1:]]:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            cli.main(argv)
        except SystemExit as end:
            assert end.code == 0, (argv, end.code)
    helps[" ".join(argv)] = text.getvalue()
print(json.dumps({"helps": helps, "imported": sorted(name for name in ("torch", "monai") if name in sys.modules)}))
"""


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_version_prints_the_installed_distribution():
    completed = subprocess.run([MEDADV, "--version"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "medadv {}\n".format(version("medadvrobustness"))


def test_version_without_the_distribution_is_unknown(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.package_version() == "unknown"  # the package itself has no __version__


def test_every_help_has_an_example_and_imports_neither_torch_nor_monai():
    assert set(cli.build_parser()._subparsers._group_actions[0].choices) == set(COMMANDS)
    completed = subprocess.run([sys.executable, "-c", HELP_SCRIPT] + list(COMMANDS), capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["imported"] == []
    assert len(report["helps"]) == len(COMMANDS) + 1
    for argv, text in report["helps"].items():
        usage, _, rest = text.partition("\n\n")
        assert usage.startswith("usage: medadv"), argv
        description = rest.split("\n\n")[0]
        assert len(description) > 40 and not description.startswith(("options:", "positional")), argv
        examples = text.split("\nexamples:\n")[1].splitlines()
        command = argv.split()[0] if argv != "--help" else ""
        assert examples and examples[0].startswith("  medadv " + command), argv
        assert all(line.startswith("  medadv ") for line in examples), argv
    bench = report["helps"]["bench --help"]
    for option in ("--epsilons E [E ...]", "--severities S [S ...]"):
        assert bench.split(option, 1)[1].split("\n  --")[0].strip(), option  # a help text follows the option
    assert "medadvrobustness[dask]" in bench


def test_the_parser_tables_are_the_registry_s():
    """The options that building the parser reads without torch are those the probe registry gives."""
    assert cli.registry_tables() == cli.static_tables()


def test_run_json_records_the_command_settings_inputs_and_versions(tmp_path):
    from MedAdvRobustnessLib.study.definition import _network
    out = tmp_path / "results"
    argv = ["demo", "--attack", "fgsm", "--epsilon", "0.01", "--out", str(out)]
    completed = subprocess.run([MEDADV] + argv, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == [MEDADV] + argv
    assert record["probe"] == {"name": "fgsm", "kind": "attack", "parameters": make_probe("fgsm").settings()}
    assert record["strengths"] == {"name": "epsilon", "values": [0.01]}
    assert record["seeds"] == {"probe": 0}
    for key, path in (("volume", SAMPLE_VOLUME), ("reference", SAMPLE_LABELS)):
        assert record[key] == {"path": str(Path(path).absolute()), "sha256": sha256(path)}
    assert record["region"] is None
    model = record["model"]
    assert {key: model[key] for key in ("source", "name", "output_activation", "activation", "device", "amp",
                                        "trust_checkpoint", "folds", "mirroring", "skip_untwinned")} == {
        "source": "demo", "name": "demo-unet", "output_activation": None, "activation": "logits", "device": "cpu",
        "amp": False, "trust_checkpoint": False, "folds": None, "mirroring": True, "skip_untwinned": False}
    assert [Path(item["path"]).name for item in model["files"]] == ["model.json", "model.pt"]
    for item in model["files"]:
        assert item["sha256"] == sha256(item["path"])
    assert model["hash"] == _network("demo")["hash"]  # what bench's study.json records for this network
    assert model["loaded_as"] == "built-in demo-unet"
    assert record["model_report"][0] == "model demo-unet (built-in demo-unet)"  # what describe() printed
    assert record["versions"] == {"medadvrobustness": version("medadvrobustness"), "torch": torch.__version__,
                                  "monai": monai.__version__, "numpy": np.__version__,
                                  "python": platform.python_version(), "slicer-core": version("slicer-core")}
    assert not list(tmp_path.glob(".results.partial-*"))  # written in the staging folder, moved with the rest


def test_scheduler_without_distributed_says_which_extra_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` fails as when it is not installed
    out = tmp_path / "study"
    status = cli.main(["bench", "--networks", "demo", "--cases", "sample", "--attacks", "fgsm", "--epsilons", "0.01",
                       "--out", str(out), "--scheduler", "tcp://127.0.0.1:1"])
    errors = capsys.readouterr().err.splitlines()
    assert status == 2 and errors == ['medadv: error: ' + cli.MISSING_DASK]
    assert 'pip install "medadvrobustness[dask]"' in errors[0]
    assert not out.exists()


def test_license_is_the_apache_license_2_0():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text and "http://www.apache.org/licenses/LICENSE-2.0" in text


def test_progress_is_a_bar_with_the_time_left_on_a_terminal_and_nothing_with_quiet(tmp_path):
    """The real command with its stderr on a pseudo-terminal: the bar redraws in place (carriage return) with an
    ETA; the summary (with the critical strengths and how fragility ranks the errors) on stdout. -q: no progress."""
    import os
    import pty
    master, slave = pty.openpty()
    command = [str(MEDADV), "demo", "--attack", "fgsm", "--epsilon", "0.01", "0.02", "--unstable-at", "0.02",
               "--out", str(tmp_path / "bar")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the command closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    stdout, _ = process.communicate(timeout=600)
    os.close(master)
    assert process.returncode == 0, shown.decode(errors="replace")[-2000:]
    text = shown.decode()
    assert "\r\x1b[K[" in text and "ETA" in text and "100%" in text
    assert text.splitlines()[0].startswith("model demo-unet"), "the model report comes first, as lines"
    assert "critical epsilon (Dice against the clean prediction below 0.9): grey matter" in stdout
    assert "errors of the clean prediction" in stdout and "entropy AUROC" in stdout
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
    scene = SlicerScene.read_mrb(tmp_path / "bar" / "scene.mrb").scene
    assert scene.GetFirstNodeByName("MNI152_T1_2mm unstable at <= 0.02 fgsm") is not None
    quiet = subprocess.run(command[:-1] + [str(tmp_path / "quiet"), "-q"], capture_output=True, text=True,
                           timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "" and "mean Dice" in quiet.stdout
    refused = subprocess.run(command[:-1] + [str(tmp_path / "bad"), "--unstable-at", "-1"], capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.strip() == \
        "medadv: error: --unstable-at must be a positive strength, got -1.0"


def test_eta_text():
    assert cli.eta_text(None) == "ETA --" and cli.eta_text(65.4) == "ETA 1:05" and cli.eta_text(3725) == "ETA 1:02:05"


def test_a_gpu_out_of_memory_is_one_line_saying_what_to_do(monkeypatch, capsys, tmp_path):
    from MedAdvRobustnessLib import pipeline

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    monkeypatch.setattr(pipeline, "run_on_files", out_of_memory)
    assert cli.main(["demo", "--attack", "fgsm", "--epsilon", "0.01", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("medadv: error: the GPU ran out of memory; run on the CPU (--device "
                                               "cpu) or give the network a smaller window (roi_size in model.json)")
