"""``medadv view`` end to end: a results folder served by trame-slicer, looked at in a real headless Chromium.

The server runs as a subprocess in its own process group on a loopback port it picks itself (``--port 0``, the
address is read from its output); Chromium is driven over the DevTools protocol. Every wait polls the page (the
views' images and the app's state) with a deadline; nothing sleeps a fixed time. Screenshots and the views' images
are kept under ``test-artifacts/viewer/`` (emptied first). A missing Chromium fails the test wherever
``scripts/system-packages.sh`` could have installed it (apt-get present, or ``CI`` set); it skips only elsewhere.
``MEDADV_UPDATE_SCREENSHOTS=1`` also writes the README's ``Resources/Screenshots/viewer.png``.
"""
import asyncio
import base64
import gc
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headless_chromium import HeadlessChromium, end_process_group, end_with_parent, find_chromium, group_alive
from conftest import MEDADV as SHARED_MEDADV
from MedAdvRobustnessLib import cli
from MedAdvRobustnessLib.viewer.serve import (build_app, drop_closed_connection_logs, ignore_closed_connections,
                                              is_loopback, scene_file)
from MedAdvRobustnessLib.viewer.page import metric_columns
from MedAdvRobustnessLib.viewer.scene import find_runs, segment_legend

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "viewer"
README_SCREENSHOT = ROOT / "Resources" / "Screenshots" / "viewer.png"
MEDADV = Path(SHARED_MEDADV)
# Generous deadlines for a loaded 2-core machine without GPU (measured under a load average of 15: server start-up
# about 25 s, each change of the views under 5 s).
SERVER_START_TIMEOUT = 180
BROWSER_START_TIMEOUT = 60
RENDER_TIMEOUT = 90
SHUTDOWN_TIMEOUT = 15
INTERRUPT_TIMEOUT = 60  # Ctrl+C: the server stops, then the interpreter frees the scene (about 6 s here)
WIDTH, HEIGHT = 1600, 1000
SLICE_VIEWS, THREE_D_VIEWS = ("Clean", "Attacked"), ("Clean3D", "Attacked3D")

# Per view (by its data-view caption): the displayed image's size, where it lies on the page, and a digest and
# content measures of its pixels (read back through a canvas; the images are same-origin blob URLs).
VIEWS_JS = r"""
((withImages) => {
  const views = {};
  for (const label of document.querySelectorAll('[data-view]')) {
    const img = label.parentElement.querySelector('img');
    if (!img || !img.complete || !img.naturalWidth) { views[label.dataset.view] = null; continue; }
    const box = img.getBoundingClientRect();
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let bright = 0, colourful = 0, digest = 0;
    for (let i = 0; i < data.length; i += 4) {
      const r = data[i], g = data[i + 1], b = data[i + 2];
      if (r + g + b > 120) bright++;
      if (Math.max(r, g, b) - Math.min(r, g, b) > 60) colourful++;
      digest = (Math.imul(digest, 31) + r * 65536 + g * 256 + b) | 0;
    }
    const pixels = data.length / 4;
    views[label.dataset.view] = {
      width: img.naturalWidth, height: img.naturalHeight, shownWidth: box.width, shownHeight: box.height,
      x: box.x, y: box.y, bright: bright / pixels, colourful: colourful / pixels, digest: digest,
      png: withImages ? canvas.toDataURL('image/png') : null};
  }
  return views;
})(%s)
"""


def medadv(*args, timeout=600):
    command = [str(MEDADV)] if MEDADV.is_file() else [sys.executable, "-m", "MedAdvRobustnessLib.cli"]
    return subprocess.run(command + [str(arg) for arg in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer") / "demo-output" / time.strftime("%Y%m%d-%H%M%S")  # as scripts/demo
    completed = medadv("demo", "--out", out, "--epsilon", "0.01", "0.04", "--attack", "fgsm")
    assert completed.returncode == 0, completed.stderr
    return out


@pytest.fixture(scope="module")
def viewer_url(results_dir, tmp_path_factory):
    """``medadv view`` on a free loopback port. Afterwards it gets Ctrl+C (SIGINT), as a user stops it, and must
    exit by itself with status 0 within a deadline; its whole process group is then ended and checked gone."""
    logs = tmp_path_factory.mktemp("viewer-logs")
    server, stdout_path, stderr_path = start_viewer(results_dir, logs)
    try:
        url = _wait_for_address(server, stdout_path, stderr_path)
        yield url
        assert server.poll() is None, "the server died during the test: " + stderr_path.read_text()[-3000:]
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=INTERRUPT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail("medadv view did not stop within {} s of Ctrl+C".format(INTERRUPT_TIMEOUT))
        assert server.returncode == 0 and "Traceback" not in stderr_path.read_text(), stderr_path.read_text()[-3000:]
    finally:
        started = time.monotonic()
        end_process_group(server, timeout=SHUTDOWN_TIMEOUT)
        assert time.monotonic() - started < 3 * SHUTDOWN_TIMEOUT
        assert group_alive(server.pid) == [], "processes of the viewer server left behind"


def run_probe_on_page(browser, probe, defaults, strengths, shown_key):
    """Pick ``probe`` in the page's form, wait for its default strengths, give ``strengths``, press run, and wait
    until the new (second) run is shown at ``shown_key``."""
    browser.evaluate("window.trame.state.set('new_probe', '{}')".format(probe))
    browser.wait_for("window.trame.state.get('new_strengths') === '{}'".format(defaults), timeout=RENDER_TIMEOUT,
                     what="the probe's default strengths")
    browser.evaluate("window.trame.state.set('new_strengths', '{}')".format(strengths))
    browser.wait_for("window.trame.state.get('new_strengths') === '{}'".format(strengths), timeout=RENDER_TIMEOUT,
                     what="the strengths")
    click(browser, "medadv-run-probe")
    browser.wait_for("window.trame.state.get('shown_strength_key') === '{}' && "
                     "(window.trame.state.get('run_items') || []).length === 2".format(shown_key), timeout=300,
                     what="the new run")


def start_viewer(results, logs):
    """``medadv view RESULTS`` on a free loopback port in a process group of its own, its output in ``logs``:
    (the process, its stdout path, its stderr path)."""
    stdout_path, stderr_path = logs / "stdout.txt", logs / "stderr.txt"
    command = [str(MEDADV)] if MEDADV.is_file() else [sys.executable, "-m", "MedAdvRobustnessLib.cli"]
    with open(str(stdout_path), "w") as stdout, open(str(stderr_path), "w") as stderr:
        server = subprocess.Popen(command + ["view", str(results), "--host", "127.0.0.1", "--port", "0"],
                                  stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True,
                                  preexec_fn=end_with_parent)
    return server, stdout_path, stderr_path


def _wait_for_address(server, stdout_path, stderr_path):
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        match = re.search(r"open (http://\S+/)", stdout_path.read_text())
        if match:
            return match.group(1)
        if server.poll() is not None:
            pytest.fail("medadv view exited with status {}: {}".format(server.returncode,
                                                                       stderr_path.read_text()[-3000:]))
        time.sleep(0.2)
    pytest.fail("medadv view printed no address within {} s".format(SERVER_START_TIMEOUT))


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        missing = "chromium is not installed (scripts/system-packages.sh installs it)"
        if os.environ.get("CI") or shutil.which("apt-get"):
            pytest.fail(missing)
        pytest.skip(missing)
    shutil.rmtree(str(ARTIFACTS), ignore_errors=True)  # no screenshots of an earlier run among this run's
    chromium = HeadlessChromium(width=WIDTH, height=HEIGHT, timeout=BROWSER_START_TIMEOUT)
    try:
        yield chromium
    finally:
        pid = chromium.process.pid
        chromium.close(timeout=SHUTDOWN_TIMEOUT)
        assert group_alive(pid) == [], "chromium processes left behind"


# ------------------------------------------------------------------------------------------------------- helpers

def views_state(browser, with_images=False):
    """The views as :data:`VIEWS_JS` measures them; their PNGs only if asked (encoding them on every poll would
    load a slow machine)."""
    return browser.evaluate(VIEWS_JS % ("true" if with_images else "false")) or {}


def wait_for_views(browser, condition, what, timeout=RENDER_TIMEOUT):
    """Poll until every view shows an image at its displayed size, ``condition(views)`` holds, and the images
    are the same on two polls in a row (the server has finished streaming); return the views."""
    deadline = time.monotonic() + timeout
    previous, views = None, None
    while time.monotonic() < deadline:
        views = views_state(browser)
        ready = all(views.get(name) and abs(views[name]["width"] - round(views[name]["shownWidth"])) <= 2
                    and abs(views[name]["height"] - round(views[name]["shownHeight"])) <= 2
                    for name in SLICE_VIEWS + THREE_D_VIEWS)
        if ready and condition(views):
            digests = {name: views[name]["digest"] for name in views if views[name]}
            if digests == previous:
                views = views_state(browser, with_images=True)
                if {name: views[name]["digest"] for name in views if views[name]} == digests:
                    return views
            previous = digests
        else:
            previous = None
        time.sleep(0.4)
    summary = {name: view and {key: view[key] for key in view if key != "png"} for name, view in (views or {}).items()}
    raise TimeoutError("{} not reached within {} s; views: {}".format(what, timeout, summary))


def state(browser, name):
    return browser.evaluate("window.trame.state.get({!r})".format(name))


def click(browser, element_id):
    assert browser.evaluate("(() => {{ const e = document.getElementById({!r}); if (!e) return false; e.click(); "
                            "return true; }})()".format(element_id)), "no element #" + element_id


def image(view):
    from PIL import Image
    data = base64.b64decode(view["png"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def keep(browser, views, name):
    """Screenshot of the page and the image of every view, under test-artifacts/viewer/<name>*.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(ARTIFACTS / "{}.png".format(name))
    for view_name, view in views.items():
        if view:
            (ARTIFACTS / "{}-{}.png".format(name, view_name)).write_bytes(
                base64.b64decode(view["png"].split(",", 1)[1]))


def changed(a, b, threshold=6):
    """Pixels where any channel differs by more than ``threshold`` (images cropped to a common size)."""
    rows, cols = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return np.abs(a[:rows, :cols] - b[:rows, :cols]).max(axis=2) > threshold


def dilate(mask, radius):
    grown = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            grown |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return grown


def slices_not_blank(views):
    return all(views[name]["bright"] > 0.15 for name in SLICE_VIEWS) and all(
        views[name]["colourful"] > 0.02 for name in THREE_D_VIEWS)


# --------------------------------------------------------------------------------------------------------- tests

def test_results_scene_is_found_by_node_names(results_dir):
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene
    runs = find_runs(SlicerScene.read_mrb(results_dir / "scene.mrb").scene)
    assert len(runs) == 1
    run = runs[0]
    assert (run.volume_name, run.model, run.probe, run.strength_name) == ("MNI152_T1_2mm", "demo-unet", "fgsm",
                                                                          "epsilon")
    assert [item.text for item in run.strengths] == ["0.01", "0.04"]
    assert all(item.probed and item.perturbation and item.segmentation for item in run.strengths)
    assert run.clean_segmentation.GetName() == "MNI152_T1_2mm segmentation clean"
    assert run.metrics.GetName() == "MNI152_T1_2mm demo-unet fgsm metrics"
    assert run.dice_table.GetName() == "MNI152_T1_2mm demo-unet fgsm Dice vs epsilon table"
    assert run.chart.GetName() == "MNI152_T1_2mm demo-unet fgsm Dice vs epsilon"


def test_view_refuses_what_is_not_a_results_folder(tmp_path, results_dir, capsys):
    assert scene_file(results_dir) == (results_dir / "scene.mrb").absolute()
    assert scene_file(results_dir / "scene.mrb") == (results_dir / "scene.mrb").absolute()
    assert cli.main(["view", str(tmp_path), "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert error.strip().startswith("medadv: error:") and "scene.mrb" in error
    (tmp_path / "notes.txt").write_text("not a scene")
    assert cli.main(["view", str(tmp_path / "notes.txt"), "--port", "0"]) == 2
    assert ".mrb" in capsys.readouterr().err
    assert cli.main(["view", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["view", str(results_dir), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli.main(["view", str(results_dir), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1 port" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")


def test_view_refuses_a_model_that_does_not_exist(results_dir, capsys):
    assert cli.main(["view", str(results_dir), "--port", "0", "--model", "/no/such/model"]) == 2
    assert "--model: not found: /no/such/model" in capsys.readouterr().err


def test_a_closed_browser_tab_is_not_reported_but_other_loop_errors_are():
    loop = asyncio.new_event_loop()
    reported = []
    loop.default_exception_handler = reported.append
    try:
        ignore_closed_connections(loop, {"message": "send", "exception": ConnectionResetError("closing transport")})
        assert reported == []
        ignore_closed_connections(loop, {"message": "bug", "exception": ValueError("bug")})
        assert [context["message"] for context in reported] == ["bug"]
    finally:
        loop.close()


def test_wslink_logs_of_a_closed_connection_are_dropped_but_other_errors_are_kept():
    """wslink logs an error it handles as plain records (no exc_info); the filter looks at the error in hand."""
    kept = []
    logger = logging.getLogger("medadv-test-wslink")
    logger.addFilter(drop_closed_connection_logs)
    logger.addHandler(logging.Handler())
    logger.handlers[-1].emit = lambda record: kept.append(record.getMessage())
    for error in (ConnectionResetError("Cannot write to closing transport"), ValueError("a real bug")):
        try:
            raise error
        except Exception as handled:
            logger.error("Exception raised")
            logger.error(repr(handled))
    assert kept == ["Exception raised", "ValueError('a real bug')"]


def test_metrics_table_takes_any_extra_column():
    rows = [{"model": "m", "attack": "fgsm", "epsilon": 0.0, "label": "CSF", "dice_clean": 1.0, "hd95_clean": 0.0,
             "ssim": 1.0, "dice_reference": None, "nsd_clean": 0.25, "note": "text"},
            {"model": "m", "attack": "fgsm", "epsilon": 0.04, "label": "CSF", "dice_clean": 0.5, "hd95_clean": 9.5,
             "ssim": 0.6, "dice_reference": None, "nsd_clean": None, "note": ""}]
    columns = [name for name, _title, _format in metric_columns(rows)]
    assert columns == ["epsilon", "label", "dice_clean", "hd95_clean", "nsd_clean", "ssim", "note"]  # known, then new
    assert metric_columns([]) == []


def test_a_scene_with_an_attack_and_a_corruption(results_dir, tmp_path):
    """What the Slicer module leaves after two probes: a corruption run (severities, its extra metric columns) next
    to the attack in one scene; the page offers both and switches every view and panel between them."""
    from MedAdvRobustnessLib.probes.corruptions import CorruptionProbe
    from MedAdvRobustnessLib.networks.models import load_model
    from MedAdvRobustnessLib.pipeline import run_on_nodes
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

    slicer_scene = SlicerScene.read_mrb(results_dir / "scene.mrb")
    volume, reference = (slicer_scene.scene.GetFirstNodeByName(name)
                         for name in ("MNI152_T1_2mm", "MNI152_tissue_2mm"))
    run_on_nodes(slicer_scene, volume, load_model("demo"), CorruptionProbe("contrast_compression"), [3], reference)
    slicer_scene.write_mrb(tmp_path / "two-runs.mrb")

    app = build_app(tmp_path / "two-runs.mrb")
    state = app.server.state
    assert [(run.probe, run.strength_name) for run in app.runs] == [("contrast_compression", "severity"),
                                                                      ("fgsm", "epsilon")]
    corruption = app.runs[0]
    assert app.run is corruption and [item.text for item in corruption.strengths] == ["3"]
    assert all(item.probed and item.perturbation and item.segmentation for item in corruption.strengths)
    assert corruption.metrics and corruption.dice_table and corruption.chart and corruption.model == "demo-unet"
    assert (state.strength_key, state.strength_label) == ("3", "contrast_compression severity 3")
    assert app.attacked_view.get_background_volume_id() == corruption.strengths[-1].probed.GetID()
    corruption_chart = state.chart_src
    assert corruption_chart.startswith("data:image/png;base64,")
    titles = [title for _name, title, _format in metric_columns(app.metrics[0])]
    assert titles[:2] == ["severity", "label"] and {"HD95 ref mm", "ASD ref mm", "SSIM", "Dice ref"} <= set(titles)
    assert [name for name, _color in segment_legend(corruption.clean_segmentation)] == ["CSF", "grey matter",
                                                                                         "white matter"]

    state.ready()  # as when served: changes of the state call the app
    state.run_index = 1
    state.flush()
    attack = app.runs[1]
    assert app.run is attack and state.run_title == attack.title
    assert (state.shown_strength_key, state.strength_label) == ("0_04", "fgsm ε = 0.04")
    assert app.attacked_view.get_background_volume_id() == attack.strengths[-1].probed.GetID()
    assert state.chart_src.startswith("data:image/png;base64,") and state.chart_src != corruption_chart
    assert all(not item.segmentation.GetDisplayNode().GetVisibility() for item in corruption.strengths)
    assert attack.clean_segmentation.GetDisplayNode().GetVisibility()  # the same clean prediction: one node

    # The links between views survive Python's cycle collector (their VTK observers once were freed by it: a crash).
    gc.collect()
    state.intensity_window = [0, 100]
    state.flush()
    gc.collect()
    probed_display = attack.strengths[0].probed.GetDisplayNode()
    assert (probed_display.GetWindowLevelMin(), probed_display.GetWindowLevelMax()) == (0, 100)


def test_a_classifier_run_shows_its_class_per_strength_and_its_confidence_curve(tmp_path):
    """The demo classifier's FGSM run on the held-out slice, as the module leaves it: found without segmentations,
    the predicted class and probability in the view captions per strength, the confidence chart, the classifier's
    columns in the table."""
    from MedAdvRobustnessLib.networks.models import load_model
    from MedAdvRobustnessLib.pipeline import run_on_nodes
    from MedAdvRobustnessLib.probes.registry import make_probe
    from MedAdvRobustnessLib.sample import SAMPLE_SLICE
    from MedAdvRobustnessLib.scene.slicer_scene import SlicerScene

    slicer_scene = SlicerScene.standalone()
    volume = slicer_scene.load_volume(SAMPLE_SLICE)
    result, _ = run_on_nodes(slicer_scene, volume, load_model("demo-classifier"), make_probe("fgsm"), [0.01, 0.05])
    slicer_scene.write_mrb(tmp_path / "classifier.mrb")

    app = build_app(tmp_path / "classifier.mrb")
    state, run = app.server.state, app.runs[0]
    assert (run.task, run.model, run.probe) == ("classification", "demo-classifier", "fgsm")
    assert [item.text for item in run.strengths] == ["0.01", "0.05"] and run.clean_segmentation is None
    assert run.saliency is not None and run.chart.GetName().endswith("fgsm confidence vs epsilon")
    assert state.chart_src.startswith("data:image/png;base64,")
    names = [name for name, _title, _format in metric_columns(app.metrics[0])]
    assert names[:3] == ["epsilon", "predicted_name", "confidence"]

    def caption(row):
        return "{} (p {:.2f})".format(row["predicted_name"], row["confidence"])

    clean, weaker, strongest = result.rows
    assert state.clean_label == "clean · " + caption(clean)
    assert state.strength_label == "fgsm ε = 0.05 · " + caption(strongest)
    assert app.attacked_view.get_background_volume_id() == run.strengths[-1].probed.GetID()
    state.ready()
    state.strength_key = run.strengths[0].key
    state.flush()
    assert state.strength_label == "fgsm ε = 0.01 · " + caption(weaker)
    assert app.attacked_view.get_background_volume_id() == run.strengths[0].probed.GetID()


def test_a_probe_started_on_the_page_joins_the_runs(results_dir):
    """The page's new-probe form, as its buttons drive it: Rician noise at severity 2 on the shown volume with the
    results' own network; the run appears, is selected and shown; a repeat, bad strengths and a cancelled run add
    nothing."""
    app = build_app(results_dir)
    state = app.server.state
    state.ready()
    scene = app.slicer_app.scene
    assert app.model_source == "demo-unet"  # built in: no --model needed
    state.new_probe = "rician_noise"
    state.flush()
    assert (state.new_strengths, state.new_strengths_label) == ("1 3 5", "severities (1-5)")
    state.new_strengths = "2"
    app.start_probe()
    assert state.probe_running
    app.probe_job.wait(timeout=300)
    app.finish_probe()
    state.flush()
    assert not state.probe_running and state.probe_message == "done: MNI152_T1_2mm demo-unet rician_noise"
    noise = app.runs[-1]
    assert [(run.probe, run.strength_name) for run in app.runs] == [("fgsm", "epsilon"), ("rician_noise", "severity")]
    assert app.run is noise and state.run_index == 1 and [item["title"] for item in state.run_items] == [
        run.title for run in app.runs]
    assert (state.shown_strength_key, state.strength_label) == ("2", "rician_noise severity 2")
    assert app.attacked_view.get_background_volume_id() == noise.strengths[0].probed.GetID()
    rows = app.metrics[-1]
    assert all(row["dice_reference"] is not None for row in rows)  # the scene's reference label map was used
    clean, noisy = (row["dice_reference"] for row in rows if row["label"] == "mean")
    assert noisy < clean
    state.intensity_window = [0, 100]  # the new run's volume is linked to the clean one's window
    state.flush()
    probed = noise.strengths[0].probed.GetDisplayNode()
    assert (probed.GetWindowLevelMin(), probed.GetWindowLevelMax()) == (0, 100)

    count = scene.GetNumberOfNodes()
    for probe, strengths, message in (("rician_noise", "3", "already has a rician_noise run"),
                                      ("pgd", "0.02 lots", "epsilons must be numbers"),
                                      ("bias_field", "7", "severit")):
        state.new_probe = probe
        state.flush()
        state.new_strengths = strengths
        app.start_probe()
        assert app.probe_job is None and message in state.probe_message, state.probe_message
    state.new_probe, state.new_strengths = "pgd", "0.02"
    app.start_probe()
    app.cancel_probe()
    app.probe_job.wait(timeout=300)
    app.finish_probe()
    assert state.probe_message == "cancelled: nothing was added" and scene.GetNumberOfNodes() == count
    assert len(app.runs) == 2


def test_views_in_headless_chromium(viewer_url, browser):
    assert re.match(r"http://127\.0\.0\.1:\d+/$", viewer_url)
    browser.navigate(viewer_url)
    browser.wait_for("!!(window.trame && window.trame.state && window.trame.state.get('shown_strength_key'))",
                     timeout=RENDER_TIMEOUT, what="the app's state")
    assert state(browser, "shown_strength_key") == "0_04"  # the largest epsilon first

    # 1. Every view renders: brain slices in both slice views, coloured segment surfaces in both 3D views.
    views = wait_for_views(browser, slices_not_blank, "rendered views")
    browser.wait_for("document.getElementById('medadv-chart').naturalWidth > 0", timeout=RENDER_TIMEOUT,
                     what="the Dice chart")
    keep(browser, views, "01-eps-0.04-overlay")
    if os.environ.get("MEDADV_UPDATE_SCREENSHOTS"):
        shutil.copyfile(str(ARTIFACTS / "01-eps-0.04-overlay.png"), str(README_SCREENSHOT))
    for name in SLICE_VIEWS:
        pixels = image(views[name])
        assert pixels.std() > 20, "{} view is flat".format(name)
    clean_segmented = image(views["Clean"])
    legend = browser.evaluate("document.getElementById('medadv-legend').textContent")
    assert all(name in legend for name in ("CSF", "grey matter", "white matter")), legend
    assert browser.evaluate("document.getElementById('medadv-chart').naturalWidth") > 0, "no Dice chart"
    headers = browser.evaluate("[...document.querySelectorAll('#medadv-metrics th')]"
                               ".map(th => th.textContent.trim())")
    assert headers[:4] == ["ε", "label", "Dice ref", "Dice clean"], headers
    shown_rows = ("[...document.querySelectorAll('#medadv-metrics tbody tr')].filter(row => row.offsetParent)"
                  ".map(row => [...row.cells].slice(0, 2).map(cell => cell.textContent.trim()))")
    assert browser.evaluate(shown_rows) == [["0", "mean"], ["0.01", "mean"], ["0.04", "mean"]]
    click(browser, "medadv-per-label")
    browser.wait_for(shown_rows + ".length === 12", timeout=RENDER_TIMEOUT, what="every label's metrics")

    # 2. Clean and attacked differ exactly where the perturbation is. Without the overlay and the outlines the two
    # views show the clean and the adversarial volume on the same slice with the same window/level; the pixels
    # where the overlay (perturbation != 0) shows are those where they may differ.
    click(browser, "medadv-perturbation")
    click(browser, "medadv-segmentations")
    browser.wait_for("window.trame.state.get('show_perturbation') === false && "
                     "window.trame.state.get('show_segmentations') === false", timeout=RENDER_TIMEOUT, what="toggles")
    plain = wait_for_views(browser, lambda v: v["Attacked"]["digest"] != views["Attacked"]["digest"]
                           and v["Clean"]["digest"] != views["Clean"]["digest"], "views without overlays")
    keep(browser, plain, "02-eps-0.04-plain")
    clean, attacked = image(plain["Clean"]), image(plain["Attacked"])
    overlay = changed(image(views["Attacked"]), attacked)  # overlay and outlines
    perturbed = overlay & ~changed(clean_segmented, clean)  # less the outlines (same place in both views)
    differs = changed(clean, attacked, threshold=3)
    assert perturbed.mean() > 0.05, "the perturbation overlay shows on {:.1%} of the view".format(perturbed.mean())
    assert differs.mean() > 0.02, "clean and attacked views are the same"
    assert only_near(differs, dilate(overlay, 2))
    assert differs[perturbed].mean() > 0.3, "the attacked view differs on only {:.1%} of the perturbed pixels".format(
        differs[perturbed].mean())
    mean_difference_large = np.abs(clean - attacked).mean()
    near_perturbation = dilate(overlay, 2)

    # 3. Switching epsilon switches the attacked views (slice and 3D) and leaves the clean ones.
    click(browser, "strength-0_01")
    browser.wait_for("window.trame.state.get('shown_strength_key') === '0_01'", timeout=RENDER_TIMEOUT,
                     what="epsilon switch")
    small = wait_for_views(browser, lambda v: v["Attacked"]["digest"] != plain["Attacked"]["digest"]
                           and v["Attacked3D"]["digest"] != plain["Attacked3D"]["digest"], "views at epsilon 0.01")
    keep(browser, small, "03-eps-0.01-plain")
    assert small["Clean"]["digest"] == plain["Clean"]["digest"], "the clean view changed with epsilon"
    assert small["Clean3D"]["digest"] == plain["Clean3D"]["digest"], "the clean 3D view changed with epsilon"
    attacked_small = image(small["Attacked"])
    assert changed(attacked_small, attacked).mean() > 0.01
    assert only_near(changed(clean, attacked_small, threshold=3), near_perturbation)
    mean_difference_small = np.abs(clean - attacked_small).mean()
    assert 0 < mean_difference_small < mean_difference_large, (mean_difference_small, mean_difference_large)
    assert "0.01" in browser.evaluate("document.querySelector('[data-view=\"Attacked\"]').textContent")
    highlighted = browser.evaluate("[...document.querySelectorAll('#medadv-metrics tr.bg-red-lighten-4')]"
                                   ".map(row => row.dataset.strength)")
    assert highlighted and set(highlighted) == {"0_01"}

    # 4. Linked window/level: a narrower window on the clean volume applies to the attacked one as well.
    browser.evaluate("window.trame.state.set('intensity_window', [0, 100])")
    narrow = wait_for_views(browser, lambda v: v["Clean"]["digest"] != small["Clean"]["digest"]
                            and v["Attacked"]["digest"] != small["Attacked"]["digest"], "narrower window")
    keep(browser, narrow, "04-eps-0.01-window")
    clean_narrow, attacked_narrow = image(narrow["Clean"]), image(narrow["Attacked"])
    assert clean_narrow.mean() > clean.mean() + 20 and attacked_narrow.mean() > attacked_small.mean() + 20
    assert np.abs(clean_narrow - attacked_narrow).mean() < 2 * mean_difference_small + 5
    assert only_near(changed(clean_narrow, attacked_narrow, threshold=3), near_perturbation)

    # 5. Linked slice views: scrolling the clean view moves the attacked one to the same slice.
    slice_before = state(browser, "Clean__SliderState__value")
    assert state(browser, "Attacked__SliderState__value") == slice_before
    box = narrow["Clean"]
    center = {"x": box["x"] + box["shownWidth"] / 2, "y": box["y"] + box["shownHeight"] / 2}
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", **center)
    for _ in range(5):
        browser.call("Input.dispatchMouseEvent", type="mouseWheel", deltaX=0, deltaY=120, **center)
    scrolled = wait_for_views(browser, lambda v: v["Clean"]["digest"] != narrow["Clean"]["digest"]
                              and v["Attacked"]["digest"] != narrow["Attacked"]["digest"], "scrolled slice views")
    keep(browser, scrolled, "05-eps-0.01-scrolled")
    slice_after = browser.wait_for(
        "(() => { const value = window.trame.state.get('Clean__SliderState__value'); return value !== %s && "
        "window.trame.state.get('Attacked__SliderState__value') === value && [value]; })()" % json.dumps(slice_before),
        timeout=RENDER_TIMEOUT, what="the same slice in both views")[0]
    assert slice_after != slice_before
    assert np.abs(image(scrolled["Clean"]) - image(scrolled["Attacked"])).mean() < 2 * mean_difference_small + 5

    # 6. The page itself (not just the images) shows the slices: the screenshot crops are not blank.
    from PIL import Image
    page = np.asarray(Image.open(str(ARTIFACTS / "01-eps-0.04-overlay.png")).convert("L")).astype(float)
    for name in SLICE_VIEWS:
        view = views[name]
        top, left = int(view["y"]), int(view["x"])
        crop = page[top:top + int(view["shownHeight"]), left:left + int(view["shownWidth"])]
        assert crop.size and crop.std() > 20 and (crop > 40).mean() > 0.15, name

    # 7. The fragility overlay: colours on the clean view where the labels change, the legend and the table.
    rows = browser.evaluate("[...document.querySelectorAll('#medadv-structures tbody tr')]"
                            ".map(row => row.cells[0].textContent.trim())")
    assert rows == ["CSF", "grey matter", "white matter"], rows
    before = wait_for_views(browser, lambda v: True, "views before the fragility overlay")
    click(browser, "medadv-fragility")
    coloured = wait_for_views(browser, lambda v: v["Clean"]["digest"] != before["Clean"]["digest"],
                              "the fragility overlay")
    keep(browser, coloured, "06-fragility")
    legend = browser.evaluate("document.getElementById('medadv-fragility-legend').textContent")
    assert "0.01" in legend and "0.04" in legend and "never" in legend, legend
    overlay = changed(image(before["Clean"]), image(coloured["Clean"]))
    assert 0.01 < overlay.mean() < 0.9, "the overlay covers {:.1%} of the clean view".format(overlay.mean())
    assert coloured["Attacked"]["digest"] == before["Attacked"]["digest"], "the overlay is on the clean view only"


def test_the_fragility_overlay_follows_its_switch(results_dir):
    app = build_app(results_dir)
    run, state = app.runs[0], app.server.state
    assert run.fragility is not None and run.fragility.GetName() == "MNI152_T1_2mm fragility fgsm"
    assert [row["label"] for row in app.structures[0]] == ["CSF", "grey matter", "white matter"]
    assert not app.clean_view.get_foreground_volume_id()
    state.ready()
    state.show_fragility = True
    state.flush()
    assert app.clean_view.get_foreground_volume_id() == run.fragility.GetID()
    state.show_fragility = False
    state.flush()
    assert not app.clean_view.get_foreground_volume_id()


def only_near(differences, region, share=0.98):
    """At least ``share`` of the differing pixels lie in ``region``."""
    rows, cols = min(differences.shape[0], region.shape[0]), min(differences.shape[1], region.shape[1])
    differences, region = differences[:rows, :cols], region[:rows, :cols]
    inside = (differences & region).sum() / max(differences.sum(), 1)
    assert inside >= share, "{:.1%} of the clean/attacked differences lie outside the perturbation".format(1 - inside)
    return True


def test_probe_from_the_page_in_headless_chromium(viewer_url, browser):
    """In the browser: pick a corruption, press run; the new run is offered and shown in every view."""
    browser.navigate(viewer_url)
    browser.wait_for("!!(window.trame && window.trame.state && window.trame.state.get('shown_strength_key'))",
                     timeout=RENDER_TIMEOUT, what="the app's state")
    before = wait_for_views(browser, slices_not_blank, "rendered views")
    run_probe_on_page(browser, "rician_noise", "1 3 5", "4", "4")
    after = wait_for_views(browser, lambda v: v["Attacked"]["digest"] != before["Attacked"]["digest"]
                           and slices_not_blank(v), "the new run's views")
    keep(browser, after, "06-new-probe-rician-noise-4")
    assert browser.evaluate("!!document.getElementById('medadv-run')"), "no run selector after the new run"
    assert "rician_noise severity 4" in browser.evaluate(
        "document.querySelector('[data-view=\"Attacked\"]').textContent")
    assert "done" in browser.evaluate("document.getElementById('medadv-probe-message').textContent")


@pytest.fixture(scope="module")
def classifier_results(tmp_path_factory):
    """``medadv demo --task classification``: the demo classifier's FGSM run on the sample slice, its class given."""
    out = tmp_path_factory.mktemp("viewer-classifier") / "classifier"
    completed = medadv("demo", "--task", "classification", "--attack", "fgsm", "--epsilon", "0.05", "--out", out)
    assert completed.returncode == 0, completed.stderr
    return out


def test_a_classifier_probe_started_on_the_page_joins_the_runs(classifier_results):
    """The page's new-probe form on a classifier's results: DeepFool at epsilon 0.1 with the results' own
    classifier on the shown slice; the run appears, is selected, its caption gives the predicted class of a direct
    sweep and its table keeps the results' true class."""
    from MedAdvRobustnessLib.evaluation.sweep import run_sweep
    from MedAdvRobustnessLib.networks.models import load_model
    from MedAdvRobustnessLib.probes.registry import make_probe
    from MedAdvRobustnessLib.scene.nodes import volume_from_node
    app = build_app(classifier_results)
    state = app.server.state
    state.ready()
    assert app.model_source == "demo-classifier"
    true_class = app.metrics[0][0]["label"]
    state.new_probe = "deepfool"
    state.flush()
    state.new_strengths = "0.1"
    app.start_probe()
    app.probe_job.wait(timeout=300)
    app.finish_probe()
    state.flush()
    assert state.probe_message.startswith("done: "), state.probe_message
    new = app.runs[-1]
    assert sorted(run.probe for run in app.runs) == ["deepfool", "fgsm"] and app.run is new
    assert (new.task, new.model, new.clean_segmentation) == ("classification", "demo-classifier", None)
    rows = app.metrics[-1]
    assert [row["label"] for row in rows] == [true_class, true_class]
    model, volume = load_model("demo-classifier"), volume_from_node(new.volume)
    with model.on_grid(volume):  # as the page's worker runs it
        direct = run_sweep(model, volume, make_probe("deepfool"), [0.1], int(true_class)).rows
    assert [row["predicted"] for row in rows] == [row["predicted"] for row in direct]
    assert state.strength_label == "deepfool ε = 0.1 · {} (p {:.2f})".format(rows[1]["predicted_name"],
                                                                           rows[1]["confidence"])
    assert app.attacked_view.get_background_volume_id() == new.strengths[0].probed.GetID()


@pytest.fixture
def classifier_viewer_url(classifier_results, tmp_path):
    """``medadv view`` of the classifier's results on a free loopback port; its process group ended afterwards."""
    server, stdout_path, stderr_path = start_viewer(classifier_results, tmp_path)
    try:
        yield _wait_for_address(server, stdout_path, stderr_path)
        assert server.poll() is None, "the server died during the test: " + stderr_path.read_text()[-3000:]
    finally:
        end_process_group(server, timeout=SHUTDOWN_TIMEOUT)
        assert group_alive(server.pid) == [], "processes of the viewer server left behind"


def test_a_classifier_probe_from_the_page_in_headless_chromium(classifier_viewer_url, browser):
    """In the browser: pick DeepFool, give its epsilon, press run; the new run is offered and the attacked view
    shows its image with its predicted class in the caption."""
    browser.navigate(classifier_viewer_url)
    browser.wait_for("!!(window.trame && window.trame.state && window.trame.state.get('shown_strength_key'))",
                     timeout=RENDER_TIMEOUT, what="the app's state")
    before = browser.wait_for("(() => { const v = %s; return v.Attacked && v; })()" % (VIEWS_JS % "false"),
                              timeout=RENDER_TIMEOUT, what="the attacked view's image")["Attacked"]
    browser.evaluate("window.trame.state.set('new_strengths', 'none yet')")
    run_probe_on_page(browser, "deepfool", "0.01 0.02", "0.1", "0_1")  # the server resets the strengths
    caption = "document.querySelector('[data-view=\"Attacked\"]').textContent"
    shown = browser.wait_for("(() => {{ const text = {}; return text.includes('deepfool') && text; }})()".format(
        caption), timeout=RENDER_TIMEOUT, what="the new run's caption")
    assert re.search(r"deepfool ε = 0\.1 · .+ \(p [01]\.\d\d\)", shown), shown
    after = browser.wait_for("(() => {{ const v = {}; return v.Attacked && v.Attacked.digest !== {} && v; }})()"
                             .format(VIEWS_JS % "false", before["digest"]), timeout=RENDER_TIMEOUT,
                             what="the new run's attacked image")
    assert after["Attacked"]["bright"] > 0.05, after["Attacked"]  # the slice, not an empty view
    keep(browser, views_state(browser, with_images=True), "07-new-probe-classifier-deepfool-0.1")
    assert "done" in browser.evaluate("document.getElementById('medadv-probe-message').textContent")
