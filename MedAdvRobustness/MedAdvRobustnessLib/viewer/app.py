"""The visual-QA web app: a results scene in Slicer's own views, served by trame-slicer.

Clean and attacked volumes side by side in two linked slice views (same slice plane, same window/level), each with
its segmentation as outlines in the segments' names and colours, the perturbation as a colour overlay on the
attacked view, the fragility map (the strength at which each voxel's label first changes) as an overlay on the clean
view, the segment surfaces clean vs attacked in two 3D views, and beside them a strength selector (the
attack's epsilons, or a corruption's severities) that switches every view, the metrics table and the Dice-vs-strength
chart, all read from the scene itself. With a network (``--model``, or the results' own when it is built in), a
new probe can be run from the page on the shown volume (:mod:`.probe`); the view links are in :mod:`.links`, the page in :mod:`.page`; its run joins the others.
"""
import asyncio
import logging
from pathlib import Path

import vtk
from trame.app import TrameApp, asynchronous
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import ViewProps

from ..errors import InputError
from .links import ViewLinks, display_node
from .page import ATTACKED_3D, ATTACKED_SLICE, CLEAN_3D, CLEAN_SLICE, ORIENTATIONS, ResultsPage, results_layout
from .scene import find_runs, require_run, table_rows

PERTURBATION_OPACITY = 0.5
SEGMENT_SURFACE_OPACITY = 1.0
LAYOUT_ID = "medadv"
PROBE_POLL_SECONDS = 0.3


class ResultsViewer(ViewLinks, ResultsPage, TrameApp):
    """The app for one results scene (``scene.mrb``), loaded through trame-slicer's IO manager."""

    def __init__(self, scene_path, server=None, rca_encoder="png", quiet_vtk=True, model_source=None):
        super().__init__(server)
        self.scene_path = Path(scene_path)
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        if quiet_vtk:
            # SlicerApp sends VTK's messages to stderr; keep warnings off the terminal as the other commands do.
            vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())
            vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
        if not self.slicer_app.io_manager.load_scene(str(self.scene_path)):
            raise InputError("cannot read the scene in {}".format(self.scene_path))
        self.runs = require_run(self.slicer_app.scene, self.scene_path)
        self.run = self.runs[0]

        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=rca_encoder,
                               slice_view_ui_f=self._slice_view_ui, three_d_view_ui_f=self._three_d_view_ui)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(LAYOUT_ID, results_layout())
        self.layout_manager.set_layout(LAYOUT_ID)
        views = self.slicer_app.view_manager
        self.clean_view, self.attacked_view = views.get_view(CLEAN_SLICE), views.get_view(ATTACKED_SLICE)
        self.clean_3d, self.attacked_3d = views.get_view(CLEAN_3D), views.get_view(ATTACKED_3D)

        self._syncing = False
        self._chart_key = None
        self._observers = []
        self._window_groups = {}
        self.probe_job = None
        from .probe import network_for
        self.model_source = network_for(self.runs, model_source)
        self.model_given = bool(model_source)
        self._perturbation_colors = self._add_perturbation_colors()
        self._perturbation_reach = [self._prepare_display(run) for run in self.runs]
        self.metrics = [table_rows(run.metrics) if run.metrics is not None else [] for run in self.runs]
        self.structures = [table_rows(run.structures) if run.structures is not None else [] for run in self.runs]

        state = self.server.state
        state.run_index = 0
        state.orientation = "Axial"
        state.show_perturbation = True
        state.perturbation_opacity = PERTURBATION_OPACITY
        state.show_segmentations = True
        state.show_fragility = False
        state.clean_label = "clean"
        state.shown_strength_key = ""
        state.chart_src = ""
        state.new_probe = "fgsm"
        state.probe_running = False
        state.probe_progress = 0
        state.probe_message = ""
        self._on_new_probe("fgsm")
        self._select_run(0)
        self._build_ui()
        state.change("strength_key", "show_perturbation", "perturbation_opacity",
                     "show_segmentations", "show_fragility")(self._on_display_change)
        state.change("run_index")(self._on_run_change)
        state.change("orientation")(self._on_orientation_change)
        state.change("intensity_window")(self._on_window_change)
        state.change("new_probe")(lambda new_probe, **_: self._on_new_probe(new_probe))
        self._show_strength(state.strength_key)
        for view in (self.clean_view, self.attacked_view, self.clean_3d, self.attacked_3d):
            view.reset_view()
        self._link_slice_views()
        self._link_window_level()
        self._link_cameras()

    # ----------------------------------------------------------------------------------------------- scene set-up

    def _add_perturbation_colors(self):
        """Blue (negative) - transparent (zero) - red (positive); a display-only node of this session."""
        table = self.slicer_app.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "medadv perturbation colors")
        table.SetTypeToUser()
        table.SetSaveWithScene(False)
        count = 255
        table.SetNumberOfColors(count)
        for index in range(count):
            t = 2.0 * index / (count - 1) - 1.0  # -1 .. 1
            strength = min(1.0, abs(t) / 0.5)
            red, green, blue = (1.0, 1.0 - strength, 1.0 - strength) if t > 0 else (1.0 - strength, 1.0 - strength, 1.0)
            alpha = min(1.0, abs(t) / 0.15)
            table.SetColor(index, "", red, green, blue, alpha)
        return table

    def _prepare_display(self, run):
        """Perturbations in the blue-red colours on one scale per run; probed volumes in the clean one's
        window/level; segmentations as outlines (2D) and surfaces (3D), hidden until shown."""
        perturbations = [item.perturbation for item in run.strengths if item.perturbation is not None]
        reach = max([max(abs(value) for value in node.GetImageData().GetScalarRange()) for node in perturbations]
                    + [1e-6])
        for node in perturbations:
            display = display_node(node)
            display.SetAndObserveColorNodeID(self._perturbation_colors.GetID())
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(-reach, reach)
            display.SetInterpolate(False)
        clean_display = display_node(run.volume)
        clean_display.AutoWindowLevelOff()
        for item in run.strengths:
            probed = display_node(item.probed)
            probed.AutoWindowLevelOff()
            probed.SetWindowLevel(clean_display.GetWindow(), clean_display.GetLevel())
        for segmentation in run.segmentations():
            segmentation.CreateDefaultDisplayNodes()
            display = segmentation.GetDisplayNode()
            display.SetVisibility(False)
            display.SetVisibility2DFill(False)
            display.SetVisibility2DOutline(True)
            display.SetSliceIntersectionThickness(2)
            display.SetOpacity3D(SEGMENT_SURFACE_OPACITY)
        return reach

    def _select_run(self, index):
        """Show run ``index``: its volume and clean segmentation on the clean side, its largest strength, its
        window; nothing of the other runs (nor anything else of the scene, e.g. the reference label map)."""
        for run in self.runs:
            for segmentation in run.segmentations():
                segmentation.GetDisplayNode().SetVisibility(False)
        previous, self.run = self.run, self.runs[index]
        run, state = self.run, self.server.state
        self.clean_view.set_background_volume_id(run.volume.GetID())
        self.clean_view.set_foreground_volume_id(None)
        if run.clean_segmentation is not None:
            self._show_segmentation(run.clean_segmentation, self.clean_view, self.clean_3d)
        state.clean_label = "clean" + self._predicted_text(run, 0.0)
        clean_display = display_node(run.volume)
        low, high = (float(value) for value in run.volume.GetImageData().GetScalarRange())
        state.intensity_range = [low, high, (high - low) / 200.0 or 1.0]
        state.intensity_window = [round(clean_display.GetWindowLevelMin(), 2),
                                  round(clean_display.GetWindowLevelMax(), 2)]
        state.perturbation_scale = "{:.3g}".format(self._perturbation_reach[index])
        state.run_title = run.title
        state.trame__title = "medadv view: " + run.title
        self._chart_key = None
        state.strength_key = run.strengths[-1].key
        return previous is not run and previous.volume is not run.volume

    def _show_segmentation(self, segmentation, slice_view, three_d_view, visible_2d=True):
        if not segmentation.GetSegmentation().ContainsRepresentation("Closed surface"):
            segmentation.CreateClosedSurfaceRepresentation()
        display = segmentation.GetDisplayNode()
        display.SetPreferredDisplayRepresentationName3D("Closed surface")
        display.SetViewNodeIDs([slice_view.get_view_node_id(), three_d_view.get_view_node_id()])
        display.SetVisibility2D(visible_2d)
        display.SetVisibility3D(True)
        display.SetVisibility(True)

    # --------------------------------------------------------------------------------------------------- switching

    def _on_display_change(self, strength_key, **_):
        self._show_strength(strength_key)

    def _on_run_change(self, run_index, **_):
        try:
            index = int(run_index)
        except (TypeError, ValueError):
            return
        if not 0 <= index < len(self.runs) or self.runs[index] is self.run:
            return
        if self._select_run(index):
            self.clean_view.reset_view()
        self._show_strength(self.server.state.strength_key)

    def _show_strength(self, strength_key):
        state, run = self.server.state, self.run
        item = run.by_key(strength_key) or run.strengths[-1]
        self.attacked_view.set_background_volume_id(item.probed.GetID())
        overlay = item.perturbation if state.show_perturbation and item.perturbation is not None else None
        self.attacked_view.set_foreground_volume_id(overlay.GetID() if overlay is not None else None)
        self.attacked_view.set_foreground_opacity(float(state.perturbation_opacity))
        fragility = run.fragility if state.show_fragility else None
        self.clean_view.set_foreground_volume_id(fragility.GetID() if fragility is not None else None)
        self.clean_view.set_foreground_opacity(1.0)
        if not run.is_classification:
            for other in run.strengths:
                if other is not item:
                    other.segmentation.GetDisplayNode().SetVisibility(False)
            self._show_segmentation(item.segmentation, self.attacked_view, self.attacked_3d,
                                    state.show_segmentations)
            run.clean_segmentation.GetDisplayNode().SetVisibility2D(state.show_segmentations)
        if self._chart_key != item.key:
            state.chart_src, self._chart_key = self._chart(item), item.key
        state.strength_label = run.caption(item) + self._predicted_text(run, item.strength)
        for view in (self.clean_view, self.attacked_view, self.clean_3d, self.attacked_3d):
            view.schedule_render()
        state.shown_strength_key = item.key

    def _predicted_text(self, run, strength):
        """`` · <class> (p 0.93)``: a classifier's predicted class at ``strength`` (its metrics row); else empty."""
        if not run.is_classification:
            return ""
        rows = self.metrics[self.runs.index(run)]
        row = next((row for row in rows if row.get(run.strength_name) == strength), None)
        if row is None or row.get("predicted_name") is None or row.get("confidence") is None:
            return ""
        return " · {} (p {:.2f})".format(row["predicted_name"], row["confidence"])

    def _on_window_change(self, intensity_window, **_):
        """The clean volume's window; the link copies it to every adversarial volume."""
        try:
            low, high = (float(value) for value in intensity_window)
        except (TypeError, ValueError):
            return
        if high > low:
            display_node(self.run.volume).SetWindowLevelMinMax(low, high)

    def _on_orientation_change(self, orientation, **_):
        if orientation not in ORIENTATIONS:
            return
        for view in (self.clean_view, self.attacked_view):
            view.set_view_properties(ViewProps(orientation=orientation, label=view.name))
        self.clean_view.reset_view()
        self._copy_slice(self.clean_view.get_view_node(), self.attacked_view.get_view_node())
        for view in (self.clean_view, self.attacked_view):
            view.schedule_render()

    # ------------------------------------------------------------------------------------------- new probe
    def _on_new_probe(self, new_probe):
        from ..probes.registry import is_corruption
        from .probe import DEFAULT_EPSILONS, DEFAULT_SEVERITIES
        state = self.server.state
        corruption = is_corruption(new_probe)
        state.new_strengths = DEFAULT_SEVERITIES if corruption else DEFAULT_EPSILONS
        state.new_strengths_label = "severities (1-5)" if corruption else "epsilons"

    def start_probe(self):
        """Start the page's probe on the shown volume; a poller shows its progress and adds its run when done."""
        from ..scene.slicer_scene import SlicerScene
        from .probe import PageProbe
        state = self.server.state
        if self.probe_job is not None or not self.model_source:
            return
        scene = SlicerScene(self.slicer_app.scene, self.slicer_app.volumes_logic, self.slicer_app.segmentations_logic)
        try:
            self.probe_job = PageProbe(scene, self.model_source, self.run, self.runs, state.new_probe,
                                       state.new_strengths).start()
        except InputError as error:
            state.probe_message = str(error)
            return
        state.probe_running, state.probe_progress = True, 0
        state.probe_message = "loading {}".format(self.model_source)
        if _serving():  # a test without the server's loop calls finish_probe itself
            asynchronous.create_task(self._poll_probe())

    def cancel_probe(self):
        if self.probe_job is not None:
            self.probe_job.cancel()
            self.server.state.probe_message = "cancelling..."

    async def _poll_probe(self):
        job = self.probe_job
        while job is not None and not job.done:
            fraction, message = job.progress
            with self.server.state as state:
                state.probe_progress = round(100 * fraction)
                if not job.cancelled:
                    state.probe_message = message
            await asyncio.sleep(PROBE_POLL_SECONDS)
        with self.server.state:
            self.finish_probe()

    def finish_probe(self):
        """Once the job is done: add its nodes, show its run (or say why not; nothing is added then)."""
        from ..probes.attacks import AttackCancelled
        job, self.probe_job = self.probe_job, None
        state = self.server.state
        state.probe_running = False
        if job is None:
            return
        job.wait()
        try:
            nodes = job.finish()
        except AttackCancelled:
            state.probe_message = "cancelled: nothing was added"
            return
        except InputError as error:
            state.probe_message = str(error)
            return
        except Exception as error:  # shown on the page, details in the log
            logging.exception("medadv view: the probe failed")
            state.probe_message = "the probe failed: {}".format(error)
            return
        # Hidden until a run shows them; the job's clean segmentation is a copy the page may not use.
        segmentations = nodes.get("segmentation", {})  # none for a classifier
        for segmentation in segmentations.values():
            segmentation.GetDisplayNode().SetVisibility(False)
        try:
            new = self._add_new_runs(segmentations.get(0.0))
        except Exception as error:  # the nodes are in the scene, but the page could not show them
            logging.exception("medadv view: the new run cannot be shown")
            state.probe_message = "the probe ran but cannot be shown: {}".format(error)
            return
        state.probe_message = "done: {}".format(", ".join(run.title for run in new))

    def _add_new_runs(self, clean_segmentation=None):
        """Runs of the scene not shown yet (with the probe's own ``clean_segmentation``: its network's, which may
        not be the results'): prepared, linked, offered in the run selector; the last one shown."""
        shown = {(run.volume_name, run.probe, run.strength_name) for run in self.runs}
        new = [run for run in find_runs(self.slicer_app.scene)
               if (run.volume_name, run.probe, run.strength_name) not in shown]
        if not new:
            return new
        for run in new:
            run.clean_segmentation = clean_segmentation or run.clean_segmentation
        reaches = [self._prepare_display(run) for run in new]
        metrics = [table_rows(run.metrics) if run.metrics is not None else [] for run in new]
        structures = [table_rows(run.structures) if run.structures is not None else [] for run in new]
        self._perturbation_reach.extend(reaches)  # the four lists stay aligned: extended together
        self.metrics.extend(metrics)
        self.structures.extend(structures)
        self.runs.extend(new)
        self._link_window_level(new)
        self._build_ui()
        self.server.state.run_index = len(self.runs) - 1
        return new


def _serving():
    """Whether this runs in the server's event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
