"""``medadv bench``: a 2 networks x 2 cases x 2 probes x 2 strengths study through the CLI (local workers) and a
Dask LocalCluster gives the same table; a killed study resumes without recomputing; the robustness score."""
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import MEDADV
from MedAdvRobustnessLib.study import cases, cells, definition, execution, outputs, scores
from MedAdvRobustnessLib.errors import InputError
from MedAdvRobustnessLib.networks.models import build_network
from MedAdvRobustnessLib.sample import SAMPLE_LABELS, SAMPLE_VOLUME

TINY = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
                                 "strides": [2], "num_res_units": 0}}


def tiny_network(folder, seed, labels=("background", "CSF", "grey matter", "white matter"), **fields):
    """A small untrained MONAI UNet saved as a model folder (whole-volume input, no resampling unless ``spacing``
    is among ``fields``)."""
    folder.mkdir()
    architecture = dict(TINY, args=dict(TINY["args"], out_channels=len(labels)))
    save_weights(folder / "model.pt", architecture, seed)
    description = dict({"name": folder.name, "labels": list(labels), "output_activation": "logits",
                        "architecture": architecture, "pad_divisible": 2,
                        "intensity": {"type": "percentile", "lower": 0.0, "upper": 99.5}}, **fields)
    (folder / "model.json").write_text(json.dumps(description))
    return folder


def save_weights(path, architecture, seed):
    torch.manual_seed(seed)
    torch.save(build_network(architecture).state_dict(), str(path))


def half_size_case(folder, name, flip):
    """The sample at 4 mm (every other voxel), optionally mirrored, as a NIfTI pair NAME + NAME_seg."""
    image, labels = nib.load(str(SAMPLE_VOLUME)), nib.load(str(SAMPLE_LABELS))
    affine = image.affine.copy()
    affine[:3, :3] *= 2
    for data, suffix, dtype in ((image.get_fdata(), "", np.float32), (labels.get_fdata(), "_seg", np.int16)):
        data = data[::2, ::2, ::2]
        data = data[::-1].copy() if flip else data
        nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(folder / "{}{}.nii.gz".format(name, suffix)))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cases = root / "cases"
    cases.mkdir()
    half_size_case(cases, "straight", flip=False)
    half_size_case(cases, "mirrored", flip=True)
    networks = [str(tiny_network(root / name, seed)) for name, seed in (("tiny-a", 1), ("tiny-b", 2))]
    path = root / "study.json"
    path.write_text(json.dumps({
        "networks": networks, "cases": ["cases"],
        "probes": [{"attack": "fgsm", "epsilons": [0.01, 0.04]},
                   {"corruption": "bias_field", "severities": [2, 5]}]}))
    return path


def read_table(path):
    with open(str(path)) as stream:
        return list(csv.DictReader(stream))


def test_cli_and_dask_cluster_give_identical_tables(study, tmp_path):
    """Local worker processes, then ``--scheduler ADDRESS`` of a Dask cluster whose workers run two cells at once
    (threads, as ``dask worker`` does by default)."""
    from distributed import LocalCluster
    completed = subprocess.run([MEDADV, "bench", str(study), "--out", str(tmp_path / "cli"), "--workers", "2"],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    assert "16 cell(s) computed, 0 found stored" in completed.stdout
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        completed = subprocess.run([MEDADV, "bench", str(study), "--out", str(tmp_path / "dask"),
                                    "--scheduler", cluster.scheduler_address],
                                   capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    assert "16 cell(s) computed, 0 found stored" in completed.stdout
    processes = {json.loads(path.read_text())["pid"] for path in (tmp_path / "dask" / "cells").glob("*.json")}
    assert len(processes) >= 2 and os.getpid() not in processes  # the cells ran in the cluster's workers
    cli_table, dask_table = read_table(tmp_path / "cli" / "results.csv"), read_table(tmp_path / "dask" / "results.csv")
    assert cli_table == dask_table
    # 2 networks x 2 cases x 2 probes x (clean + 2 strengths) x (3 tissues + mean)
    assert len(cli_table) == 2 * 2 * 2 * 3 * 4
    assert {row["network"] for row in cli_table} == {"tiny-a", "tiny-b"}
    assert {row["case"] for row in cli_table} == {"straight", "mirrored"}
    summary = read_table(tmp_path / "cli" / "summary.csv")
    overall = [row for row in summary if row["probe"] == "overall"]
    assert len(overall) == 2 and all(0 <= float(row["robustness_score"]) <= 1 for row in overall)
    assert all(row["rood_degradation"] for row in overall)
    report = (tmp_path / "cli" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3  # fgsm and bias_field curves, scatter
    provenance = json.loads((tmp_path / "cli" / "study.json").read_text())
    assert len({network["hash"] for network in provenance["study"]["networks"]}) == 2
    assert provenance["versions"]["torch"] == torch.__version__


@pytest.fixture(scope="module")
def resumed(study, tmp_path_factory):
    """``medadv bench`` killed (SIGKILL) once it has stored its first cell(s), then run again twice in its folder."""
    out = tmp_path_factory.mktemp("resumed")
    process = subprocess.Popen([MEDADV, "bench", str(study), "--out", str(out), "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((out / "cells").glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=60)
    stored = sorted(p.name for p in (out / "cells").glob("*.json"))
    outputs_after_kill = (out / "results.csv").exists()
    (out / "cells" / ".half-written.json.tmp").write_text('{"key": ')  # what a kill during a write leaves
    before = {name: (out / "cells" / name).stat().st_mtime_ns for name in stored}
    run = execution.run_study(str(study), out)
    after = {name: (out / "cells" / name).stat().st_mtime_ns for name in stored}
    again = execution.run_study(str(study), out)
    return dict(stored=stored, outputs_after_kill=outputs_after_kill, before=before, after=after, run=run,
                again=again, returncode=process.returncode)


def test_killed_study_resumes_without_recomputing(resumed):
    assert resumed["returncode"] == -signal.SIGKILL  # killed, not finished
    assert 1 <= len(resumed["stored"]) < 16 and not resumed["outputs_after_kill"]
    run, again = resumed["run"], resumed["again"]
    finished = [name[:-len(".json")] for name in resumed["stored"]]
    assert sorted(run.reused) == sorted(finished) and len(run.computed) == 16 - len(finished)
    assert not set(run.computed) & set(finished)
    assert resumed["after"] == resumed["before"]  # the stored cells were not written again
    assert again.computed == [] and len(again.reused) == 16


def test_study_in_a_scene(resumed, slicer_scene):
    summary, charts = outputs.add_study_nodes(slicer_scene.scene, resumed["again"].records)
    assert summary.GetNumberOfRows() == 2 * 2 + 2  # (network, probe) rows and one overall row per network
    assert [chart.GetNumberOfPlotSeriesNodes() for chart in charts] == [2, 2]


@pytest.mark.parametrize("strengths, dices, expected", [
    ([0, 0.01, 0.02], [0.8, 0.8, 0.8], 1.0),          # unaffected
    ([0, 0.02], [0.8, 0.0], 0.5),                      # linear fall to nothing
    ([0, 0.01, 0.02], [0.8, 0.0, 0.0], 0.25),          # lost at the first epsilon
    ([0, 0.01, 0.03], [0.5, 0.25, 0.0], 0.25),         # uneven steps: (0.75 * 0.01 + 0.25 * 0.02) / 0.03 ... below
    ([0.02, 0, 0.01], [0.4, 0.8, 0.6], 0.75),          # unsorted input, half lost at the end
    ([0, 0.01], [0.5, 0.7], 1.0),                      # better than clean counts as unaffected
    ([0, 0.01], [0.0, 0.0], 0.0),                      # no clean Dice
])
def test_robustness_score_on_hand_made_curves(strengths, dices, expected):
    if strengths == [0, 0.01, 0.03]:
        expected = (0.01 * (1 + 0.5) / 2 + 0.02 * (0.5 + 0) / 2) / 0.03
    assert scores.robustness_score(strengths, dices) == pytest.approx(expected)


def test_summary_averages_over_cases_with_their_spread():
    def rows(case, dices):
        return [{"network": "net", "case": case, "probe": "fgsm", "kind": "attack", "strength": strength,
                 "label": "mean", "dice": dice, "against": "reference"} for strength, dice in zip((0.0, 0.02), dices)]
    summary = scores.summary_rows(rows("a", (0.8, 0.4)) + rows("b", (0.6, 0.6)))
    fgsm = next(row for row in summary if row["probe"] == "fgsm")
    assert fgsm["cases"] == 2 and fgsm["clean_dice"] == pytest.approx(0.7) and fgsm["dice"] == "0.7000 0.5000"
    assert fgsm["clean_dice_sd"] == pytest.approx(math.sqrt(0.02))  # 0.8 and 0.6
    assert fgsm["robustness_score"] == pytest.approx((0.75 + 1.0) / 2)  # half lost linearly; unaffected
    assert fgsm["robustness_score_sd"] == pytest.approx(math.sqrt(2 * 0.125 ** 2))
    single = next(row for row in scores.summary_rows(rows("a", (0.8, 0.4))) if row["probe"] == "fgsm")
    assert single["clean_dice_sd"] is None and single["robustness_score_sd"] is None


def test_robustness_score_needs_the_clean_point():
    with pytest.raises(InputError, match="strength 0"):
        scores.robustness_score([0.01, 0.02], [0.5, 0.4])


def test_bad_studies_are_refused_clearly(study, tmp_path):
    good = definition.load_study(study)
    for change, message in ((dict(probes=[{"attack": "nope", "epsilons": [0.1]}]), "unknown attack"),
                            (dict(probes=[{"corruption": "bias_field", "severities": [7]}]), "severit"),
                            (dict(networks=["/no/such/model"]), "network not found"),
                            (dict(cases=["heldout:0"]), "heldout:N"),
                            (dict(colour="red"), "unknown key")):
        with pytest.raises(InputError, match=message):
            execution.run_study(dict(good, **change), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_folder_cases_pair_volumes_with_references(study):
    found = cases.folder_cases(study.parent / "cases")
    assert [(case["name"], Path(case["reference"]).name) for case in found] == [
        ("mirrored", "mirrored_seg.nii.gz"), ("straight", "straight_seg.nii.gz")]


def test_heldout_cases_are_seeded_variants_training_never_saw():
    first, labels = cases.heldout_volume(1)
    again, labels_again = cases.heldout_volume(1)
    second, _ = cases.heldout_volume(2)
    sample = nib.load(str(SAMPLE_VOLUME)).get_fdata()
    assert np.array_equal(first.array, again.array) and np.array_equal(labels, labels_again)
    assert not np.allclose(first.array, second.array)
    assert first.array.shape == sample.shape and set(np.unique(labels)) == {0, 1, 2, 3}
    assert not np.array_equal(labels, nib.load(str(SAMPLE_LABELS)).get_fdata().astype(np.int64))


def test_yaml_study_reads_like_json(study):
    yaml_study = study.with_name("study.yaml")
    yaml_study.write_text("networks: [tiny-a, tiny-b]\ncases: [cases]\nprobes:\n"
                          "  - {attack: fgsm, epsilons: [0.01, 0.04]}\n"
                          "  - {corruption: bias_field, severities: [2, 5]}\n")
    assert definition.resolve_study(definition.load_study(yaml_study)) == definition.resolve_study(definition.load_study(study))


def test_training_is_reproducible(tmp_path):
    """The same recipe and seed give the same weights (what makes the shipped networks reproducible)."""
    from MedAdvRobustnessLib.training import train
    for name in ("first", "second"):
        train(tmp_path / name, iterations=3, architecture="segresnet", name=name, progress=lambda line: None)
    first, second = (torch.load(str(tmp_path / name / "model.pt"), weights_only=True) for name in ("first", "second"))
    assert list(first) == list(second)
    assert all(torch.equal(first[key], second[key]) for key in first)
    third = tmp_path / "other-seed"
    train(third, iterations=3, seed=1, architecture="segresnet", name="other", progress=lambda line: None)
    other = torch.load(str(third / "model.pt"), weights_only=True)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_training_another_family_writes_a_loadable_model_folder(tmp_path):
    from MedAdvRobustnessLib.networks.models import load_model
    from MedAdvRobustnessLib.training import train
    with pytest.raises(InputError, match="unknown architecture"):
        train(tmp_path / "none", iterations=2, architecture="resnet")
    train(tmp_path / "slices", iterations=2, architecture="slicewise2d", name="slices", progress=lambda line: None)
    log = json.loads((tmp_path / "slices" / "training.json").read_text())
    assert log["iterations"] == 2 and log["architecture"]["slicewise"] and set(log["dice_on_sample"]) == {
        "CSF", "grey matter", "white matter"}
    model = load_model(str(tmp_path / "slices"))  # a 3D wrapper of the 2D network, as TorchScript
    assert isinstance(model.network, torch.jit.ScriptModule) and model.description.window is None
    volume = torch.rand(1, 1, 16, 24, 8, requires_grad=True)
    outputs = model(volume)
    outputs[:, 1].sum().backward()
    assert outputs.shape == (1, 4, 16, 24, 8) and float(volume.grad.abs().sum()) > 0


def test_network_hash_covers_the_weights_its_description_names(tmp_path):
    """Given as its model.json, or as a folder whose model.json names weights outside it, a network's hash changes
    with its weights."""
    folder = tiny_network(tmp_path / "net", 1)
    (tmp_path / "shared").mkdir()
    save_weights(tmp_path / "shared" / "weights.pt", TINY, 1)
    outside = tiny_network(tmp_path / "outside", 1, weights="../shared/weights.pt")
    (outside / "model.pt").unlink()
    sources = [str(folder / "model.json"), str(outside)]
    before = [definition._network(source)["hash"] for source in sources]
    save_weights(folder / "model.pt", TINY, 2)
    save_weights(tmp_path / "shared" / "weights.pt", TINY, 2)
    after = [definition._network(source)["hash"] for source in sources]
    assert before[0] != after[0] and before[1] != after[1]


def test_network_without_a_source_is_refused_clearly(tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"networks": [{"name": "x"}], "cases": ["sample"],
                                "probes": [{"attack": "fgsm", "epsilons": [0.01]}]}))
    with pytest.raises(InputError, match="a network needs a source"):
        execution.run_study(str(path), tmp_path / "out")


def test_probe_options_next_to_a_study_file_are_refused_not_ignored(study, tmp_path, capsys):
    from MedAdvRobustnessLib import cli
    assert cli.main(["bench", str(study), "--out", str(tmp_path / "out"), "--epsilons", "0.1", "--seed", "0"]) == 2
    assert "give a study file or --epsilons/--seed, not both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_line_lists_make_the_same_cells_as_the_study_file(study, tmp_path, capsys):
    """--networks/--cases/--attacks/--epsilons give the cells the study file gives for the same grid (stored cells
    of one are found by the other)."""
    from MedAdvRobustnessLib import cli
    root, out = study.parent, tmp_path / "out"
    file_study = tmp_path / "study.json"
    file_study.write_text(json.dumps({"networks": [str(root / "tiny-a")], "cases": [str(root / "cases")],
                                      "probes": [{"attack": "fgsm", "epsilons": [0.02]}]}))
    assert cli.main(["bench", str(file_study), "--out", str(out)]) == 0
    assert "2 cell(s) computed, 0 found stored" in capsys.readouterr().out
    assert cli.main(["bench", "--networks", str(root / "tiny-a"), "--cases", str(root / "cases"), "--attacks", "fgsm",
                     "--epsilons", "0.02", "--out", str(out)]) == 0
    assert "0 cell(s) computed, 2 found stored" in capsys.readouterr().out
    # progress on stderr, the summary on stdout; -q: no progress
    assert cli.main(["bench", str(file_study), "--out", str(tmp_path / "again")]) == 0
    printed = capsys.readouterr()
    assert "[1/2]" in printed.err and "[1/2]" not in printed.out and "2 cell(s) computed" in printed.out
    assert cli.main(["bench", str(file_study), "--out", str(tmp_path / "quiet"), "-q"]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and "2 cell(s) computed" in printed.out


def test_another_device_keys_its_cells_apart_and_a_gpu_out_of_memory_says_what_to_do():
    network, case = {"name": "n", "source": "demo", "hash": "h"}, {"name": "c"}
    attack = {"kind": "attack", "probe": "fgsm", "params": {"seed": 0}, "name": "fgsm"}
    task = {"network": network, "case": case, "probe": attack, "strength": 0.02}
    assert cells.cell_key(dict(task, device="cpu")) == cells.cell_key(task) == "n__c__fgsm__0.02__f51c88f785d3"
    assert cells.cell_key(dict(task, device="cuda")) != cells.cell_key(task)
    error = cells._cell_error(dict(task, device="cuda"), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried "
                                                                                    "to allocate 2.00 GiB"))
    assert isinstance(error, InputError) and "the GPU ran out of memory" in str(error)
    assert "--device cpu" in str(error) and "cell failed (network n, case c, probe fgsm" in str(error)


def test_cell_key_changes_when_a_default_of_the_probe_changes(study, monkeypatch):
    """A stored cell is not reused when the library's default of a setting the study does not write changes."""
    from MedAdvRobustnessLib.probes.attacks import ATTACKS
    task = cells.study_cells(definition.resolve_study(definition.load_study(str(study))))[0]
    assert task["probe"]["name"] == "fgsm" and "grow_voxels" not in task["probe"]["params"]
    before = cells.cell_key(task)
    assert cells.cell_key(task) == before

    @dataclasses.dataclass
    class NewDefaultFGSM(ATTACKS["fgsm"]):
        grow_voxels: int = 2

    monkeypatch.setitem(ATTACKS, "fgsm", NewDefaultFGSM)
    assert cells.cell_key(task) != before


def test_threads_computing_cells_at_once_match_one_by_one(study, tmp_path, monkeypatch):
    """Two threads of one process (a Dask worker's) compute a network at 4 mm on cases at 2 and 4 mm at the same
    time (both inside the runner before either goes on) and get what one thread gets."""
    network = tiny_network(tmp_path / "spaced", 1, spacing=[4.0, 4.0, 4.0])
    cases = study.parent / "cases"
    tasks = cells.study_cells(definition.resolve_study({
        "networks": [str(network)], "probes": [{"attack": "fgsm", "epsilons": [0.02]}],
        "cases": ["sample", {"name": "straight", "volume": str(cases / "straight.nii.gz"),
                             "reference": str(cases / "straight_seg.nii.gz")}]}))
    one_by_one = [json.dumps(cells.compute_cell(task)["rows"]) for task in tasks]
    together, run_sweep = threading.Barrier(2, timeout=120), cells.run_sweep

    def meeting(*args, **kwargs):
        together.wait()
        return run_sweep(*args, **kwargs)
    monkeypatch.setattr(cells, "run_sweep", meeting)
    with ThreadPoolExecutor(max_workers=2) as pool:
        at_once = [json.dumps(record["rows"]) for record in pool.map(cells.compute_cell, tasks)]
    assert at_once == one_by_one


def test_failing_cell_names_itself_and_keeps_the_finished_cells(study, tmp_path):
    two_labels = tiny_network(tmp_path / "two-labels", 1, labels=("background", "brain"))
    cases = study.parent / "cases"
    straight = {"name": "straight", "volume": str(cases / "straight.nii.gz"),
                "reference": str(cases / "straight_seg.nii.gz")}
    with pytest.raises(InputError, match=r"network two-labels, case straight, probe fgsm, strength 0.02\): "
                                         r"the reference holds label 3"):
        execution.run_study({"networks": [str(study.parent / "tiny-a"), str(two_labels)], "cases": [straight],
                         "probes": [{"attack": "fgsm", "epsilons": [0.02]}]}, tmp_path / "out")
    assert [p.name.split("__")[0] for p in (tmp_path / "out" / "cells").glob("*.json")] == ["tiny-a"]


@pytest.fixture(scope="module")
def unreferenced(study, tmp_path_factory):
    """tiny-a under FGSM on the straight case with its reference and on a copy without one, run under umask 002."""
    root = tmp_path_factory.mktemp("unreferenced")
    cases = study.parent / "cases"
    (root / "plain.nii.gz").write_bytes((cases / "straight.nii.gz").read_bytes())
    mask = os.umask(0o002)
    try:
        execution.run_study({"networks": [str(study.parent / "tiny-a")], "probes": [{"attack": "fgsm", "epsilons": [0.02]}],
                         "cases": [{"name": "straight", "volume": str(cases / "straight.nii.gz"),
                                    "reference": str(cases / "straight_seg.nii.gz")}, str(root / "plain.nii.gz")]},
                        root / "out")
    finally:
        os.umask(mask)
    return root / "out"


def test_summary_averages_only_dice_against_a_reference(unreferenced):
    results = read_table(unreferenced / "results.csv")
    clean = {(row["case"], row["against"]): float(row["dice"]) for row in results
             if row["label"] == "mean" and float(row["strength"]) == 0}
    assert clean[("plain", "clean")] == 1.0 and clean[("straight", "reference")] < 0.9
    fgsm = next(row for row in read_table(unreferenced / "summary.csv") if row["probe"] == "fgsm")
    assert (fgsm["cases"], fgsm["cases_without_reference"]) == ("1", "1")
    assert float(fgsm["clean_dice"]) == pytest.approx(clean[("straight", "reference")], abs=1e-5)
    assert fgsm["dice_against"] == "reference"
    assert "cases_without_reference" in (unreferenced / "report.html").read_text()


def test_without_any_reference_the_summary_is_against_the_clean_prediction(study, unreferenced, tmp_path):
    """A study of volumes without labels (a radiologist's own scans) still gets a summary: Dice against the clean
    prediction, said so, and no point in the clean-vs-robustness scatter (its clean Dice is 1 by definition)."""
    run = execution.run_study({"networks": [str(study.parent / "tiny-a")],
                           "probes": [{"attack": "fgsm", "epsilons": [0.02]}],
                           "cases": [str(unreferenced.parent / "plain.nii.gz")]}, tmp_path / "out")
    fgsm = next(row for row in read_table(tmp_path / "out" / "summary.csv") if row["probe"] == "fgsm")
    assert (fgsm["dice_against"], fgsm["cases"], fgsm["cases_without_reference"]) == ("clean prediction", "1", "1")
    assert float(fgsm["clean_dice"]) == 1.0 and float(fgsm["dice"].split()[1]) < 1.0
    figures = {path.name for path in (tmp_path / "out" / "figures").glob("*.png")}
    assert "dice_vs_fgsm.png" in figures and "clean_vs_robustness.png" not in figures
    assert len(run.records) == 1


def test_outputs_are_created_with_the_umask(unreferenced):
    outputs = list((unreferenced / "cells").glob("*.json")) + [
        unreferenced / name for name in ("results.csv", "summary.csv", "study.json", "report.html")]
    assert len(outputs) == 6
    assert {oct(path.stat().st_mode & 0o777) for path in outputs} == {oct(0o664)}
    assert not [path for path in unreferenced.rglob(".*") if path.is_file()]  # no temporary file left


def test_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(UnicodeEncodeError):
        outputs._write_csv(tmp_path / "table.csv", [{"a": "\ud800"}], ["a"])  # a lone surrogate: not UTF-8
    assert list(tmp_path.iterdir()) == []


def test_cell_keys_stay_those_earlier_versions_stored():
    """Stored cells are found again after an upgrade: the keys of one attack and one corruption cell, as earlier
    versions computed them."""
    network, case = {"name": "n", "source": "demo", "hash": "h"}, {"name": "c"}
    corruption = {"kind": "corruption", "probe": "ghosting", "params": {"seed": 0}, "name": "ghosting"}
    attack = {"kind": "attack", "probe": "fgsm", "params": {"seed": 0}, "name": "fgsm"}
    assert cells.cell_key({"network": network, "case": case, "probe": corruption, "strength": 1.0}) == \
        "n__c__ghosting__1__ae0f0c7e933f"
    assert cells.cell_key({"network": network, "case": case, "probe": attack, "strength": 0.02}) == \
        "n__c__fgsm__0.02__f51c88f785d3"


FRAGILE_STUDY = {"networks": ["demo-unet-short"], "cases": ["heldout:1"],
                 "probes": [{"attack": "fgsm", "epsilons": [0.01, 0.02, 0.04]},
                            {"corruption": "rician_noise", "severities": [1, 3]}]}


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """A demo network on one held-out case under FGSM (3 epsilons) and Rician noise (2 severities), with its
    network's forward passes counted inside the cells' sweeps and outside them; then run again on its stored cells,
    then again with one cell's changed-voxel file removed."""
    out = tmp_path_factory.mktemp("fragile")
    passes, in_sweep = {"inside": 0, "outside": 0}, []
    real_load, real_sweep = cells.load_model, cells.run_sweep

    def counted_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.network.register_forward_pre_hook(lambda *hook: passes.__setitem__(
            "inside" if in_sweep else "outside", passes["inside" if in_sweep else "outside"] + 1))
        return model

    def counted_sweep(*args, **kwargs):
        in_sweep.append(True)
        try:
            return real_sweep(*args, **kwargs)
        finally:
            in_sweep.pop()
    cells._cache("models").clear()
    cells.load_model, cells.run_sweep = counted_model, counted_sweep
    try:
        first = execution.run_study(FRAGILE_STUDY, out)
        after_first = dict(passes)
        csv_first = (out / "fragility.csv").read_text()
        again = execution.run_study(FRAGILE_STUDY, out)
        after_again = dict(passes)
        removed = sorted((out / "cells").glob("*fgsm__0.02__*.npz"))
        removed[0].unlink()
        third = execution.run_study(FRAGILE_STUDY, out)
    finally:
        cells.load_model, cells.run_sweep = real_load, real_sweep
        cells._cache("models").clear()
    return dict(out=out, first=first, again=again, third=third, after_first=after_first, after_again=after_again,
                csv_first=csv_first, removed=removed[0].name[:-len(".npz")])


@pytest.fixture(scope="module")
def direct_sweep():
    """The bench's FGSM swept over all its epsilons at once by ``run_sweep``, with the cells' thread count."""
    from MedAdvRobustnessLib.evaluation.sweep import run_sweep
    from MedAdvRobustnessLib.networks.models import load_model
    probe = definition.resolve_study(FRAGILE_STUDY)["probes"][0]
    model = load_model("demo-unet-short")
    volume, reference = cases.heldout_volume(1)
    with cells._torch_threads(1), model.on_grid(volume):
        return run_sweep(model, volume, definition.study_probe(probe), probe["strengths"], reference)


def read_map(path):
    from MedAdvRobustnessLib.scene.nodes import volume_from_node
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
    return volume_from_node(SlicerScene.standalone().load_volume(path)).array


def test_bench_fragility_is_that_of_one_sweep_over_all_strengths(fragile, direct_sweep):
    """The map the bench combines from its one-strength cells equals fragility_map of run_sweep over the same
    strengths, exactly; fragility.csv holds fragility_summary of it."""
    from MedAdvRobustnessLib.evaluation.fragility import fragility_map, fragility_summary
    result = direct_sweep
    expected = fragility_map(result)
    written = read_map(fragile["out"] / "fragility" / "demo-unet-short__heldout-1__fgsm.nii.gz")
    assert written.dtype == np.float32 and np.array_equal(written, expected)
    assert set(np.unique(expected)) == {0.0, np.float32(0.01), np.float32(0.02), np.float32(0.04)}
    summary = fragility_summary(result, expected, result.reference)
    row = next(row for row in read_table(fragile["out"] / "fragility.csv") if row["probe"] == "fgsm")
    assert (int(row["voxels"]), int(row["errors"])) == (summary["voxels"], summary["errors"])
    for score, entry in summary["scores"].items():
        assert float(row[score + "_auroc"]) == pytest.approx(entry["auroc"], rel=1e-5)
        assert float(row[score + "_top1"]) == pytest.approx(entry["error_fraction_top_1%"], rel=1e-5)
        assert float(row[score + "_top5"]) == pytest.approx(entry["error_fraction_top_5%"], rel=1e-5)
    network = next(row for row in read_table(fragile["out"] / "summary.csv") if row["probe"] == "fgsm")
    assert float(network["fragility_auroc"]) == pytest.approx(summary["scores"]["fragility"]["auroc"], rel=1e-5)
    assert "Does fragility find the errors?" in (fragile["out"] / "report.html").read_text()


def test_instability_combines_the_probes_maps(fragile, direct_sweep):
    from MedAdvRobustnessLib.evaluation.fragility import instability_map
    from MedAdvRobustnessLib.study.command import fragility_line
    out = fragile["out"]
    maps = [read_map(out / "fragility" / "demo-unet-short__heldout-1__{}.nii.gz".format(probe))
            for probe in ("fgsm", "rician_noise")]
    expected = instability_map(maps, [0.02, 1.0])  # the middle strengths
    written = read_map(out / "instability" / "demo-unet-short__heldout-1.nii.gz")
    assert np.array_equal(written, expected) and set(np.unique(expected)) == {0.0, 0.5, 1.0}
    clean = direct_sweep.clean.prediction
    row, = read_table(out / "instability.csv")
    assert float(row["instability_mean"]) == pytest.approx(float(expected[clean != 0].mean()), rel=1e-5)
    overall = fragile["first"].fragility[("demo-unet-short", "overall")]
    assert overall["instability_mean"] == pytest.approx(float(row["instability_mean"]), rel=1e-5)
    assert "fragility {:.3f}".format(overall["fragility_auroc"]) in fragility_line(overall)


def test_fragility_adds_no_forward_pass(fragile):
    """Every forward pass is one of the cells' sweeps; the run on the stored cells rewrites the fragility with
    none; a cell stored without its changed voxels (as an earlier version stored them) is computed again."""
    first, again = fragile["after_first"], fragile["after_again"]
    # each cell's sweep at its one strength: the clean pass, then FGSM's gradient and prediction (3 cells), the
    # noise's prediction (2 cells); the fragility, instability and scores add none
    assert first == {"inside": 3 * 3 + 2 * 2, "outside": 0}
    assert again == first and fragile["again"].computed == []
    assert (fragile["out"] / "fragility.csv").read_text() == fragile["csv_first"]
    assert fragile["third"].computed == [fragile["removed"]]
