"""The visual-QA web app: a results scene in Slicer's own views, served by trame-slicer.

Clean and attacked volumes side by side in two linked slice views (same slice plane, same window/level), each with
its segmentation as outlines in the segments' names and colours, the perturbation as a colour overlay on the
attacked view, the segment surfaces clean vs attacked in two 3D views, and beside them a strength selector (the
attack's epsilons, or a corruption's severities) that switches every view, the metrics table and the Dice-vs-strength
chart, all read from the scene itself. With a network (``--model``, or the results' own when it is built in), a
new probe can be run from the page on the shown volume (:mod:`.viewer_probe`); its run joins the others.
"""
import asyncio
import base64
import io
import logging
from pathlib import Path

import vtk
from trame.app import TrameApp, asynchronous
from trame.widgets import html
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition, ViewProps
from trame_vuetify.ui.vuetify3 import VAppLayout
from trame_vuetify.widgets import vuetify3 as v3

from ..errors import InputError
from .scene import find_runs, require_run, segment_legend, table_rows

CLEAN_SLICE, ATTACKED_SLICE = "Clean", "Attacked"
CLEAN_3D, ATTACKED_3D = "Clean3D", "Attacked3D"
ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
PERTURBATION_OPACITY = 0.5
SEGMENT_SURFACE_OPACITY = 1.0
LAYOUT_ID = "medadv"
# Metrics table columns shown first, in this order, with a title and a format; any other column of the table (a
# metric added later) follows under its own name; the HIDDEN ones and columns without any value are left out.
METRIC_COLUMNS = (("epsilon", "ε", "{:g}"), ("severity", "severity", "{:g}"), ("label", "label", "{}"),
                  ("dice_reference", "Dice ref", "{:.3f}"), ("dice_clean", "Dice clean", "{:.3f}"),
                  ("hd95_reference", "HD95 ref mm", "{:.1f}"), ("asd_reference", "ASD ref mm", "{:.2f}"),
                  ("hd95_clean", "HD95 clean mm", "{:.1f}"), ("asd_clean", "ASD clean mm", "{:.2f}"),
                  ("linf", "L∞", "{:.2f}"), ("l2", "L2", "{:.1f}"), ("psnr", "PSNR dB", "{:.1f}"),
                  ("ssim", "SSIM", "{:.3f}"))
HIDDEN_METRIC_COLUMNS = ("model", "probe", "attack", "linf_fraction", "l2_fraction")  # attack: older scenes
PROBE_POLL_SECONDS = 0.3


def results_layout():
    """Clean | attacked slice views above clean | attacked 3D views."""
    clean = ViewLayoutDefinition.slice_view("Axial", label=CLEAN_SLICE, color="#4a90d9")
    attacked = ViewLayoutDefinition.slice_view("Axial", label=ATTACKED_SLICE, color="#d9534a")
    clean_3d = ViewLayoutDefinition.threed_view(name=CLEAN_3D, label="clean")
    attacked_3d = ViewLayoutDefinition.threed_view(name=ATTACKED_3D, label="attacked")
    return Layout(LayoutDirection.Vertical, [
        Layout(LayoutDirection.Horizontal, [clean, attacked]),
        Layout(LayoutDirection.Horizontal, [clean_3d, attacked_3d]),
    ], flex_sizes=["3", "2"])


class ResultsViewer(TrameApp):
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

        state = self.server.state
        state.run_index = 0
        state.orientation = "Axial"
        state.show_perturbation = True
        state.perturbation_opacity = PERTURBATION_OPACITY
        state.show_segmentations = True
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
                     "show_segmentations")(self._on_display_change)
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
            display = _display_node(node)
            display.SetAndObserveColorNodeID(self._perturbation_colors.GetID())
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(-reach, reach)
            display.SetInterpolate(False)
        clean_display = _display_node(run.volume)
        clean_display.AutoWindowLevelOff()
        for item in run.strengths:
            probed = _display_node(item.probed)
            probed.AutoWindowLevelOff()
            probed.SetWindowLevel(clean_display.GetWindow(), clean_display.GetLevel())
        for segmentation in [run.clean_segmentation] + [item.segmentation for item in run.strengths]:
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
            for segmentation in [run.clean_segmentation] + [item.segmentation for item in run.strengths]:
                segmentation.GetDisplayNode().SetVisibility(False)
        previous, self.run = self.run, self.runs[index]
        run, state = self.run, self.server.state
        self.clean_view.set_background_volume_id(run.volume.GetID())
        self.clean_view.set_foreground_volume_id(None)
        self._show_segmentation(run.clean_segmentation, self.clean_view, self.clean_3d)
        clean_display = _display_node(run.volume)
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

    # ---------------------------------------------------------------------------------------------------- linking

    def _observe(self, node, method, argument):
        """Call ``method(node, argument)`` on every change of ``node`` (not while another copy is under way). The
        app keeps the node and the observer: Python's cycle collector would otherwise free an observer that only
        VTK still refers to (a crash)."""
        observer = _callback(lambda source, target: self._copy_without_echo(method, source, target), argument)
        node.AddObserver(vtk.vtkCommand.ModifiedEvent, observer)
        self._observers.append((node, observer, argument))

    def _copy_without_echo(self, copy, source, target):
        """Run ``copy(source, target)`` unless a copy is under way (the copy's own changes must not echo back)."""
        if self._syncing:
            return
        self._syncing = True
        try:
            copy(source, target)
        finally:
            self._syncing = False
        self._chart_key = None

    def _link_slice_views(self):
        """Both slice views show the same plane: any change of one slice node (slider, scroll, pan, zoom) is copied."""
        nodes = [self.clean_view.get_view_node(), self.attacked_view.get_view_node()]
        for source, target in (nodes, nodes[::-1]):
            self._observe(source, self._copy_slice, target)

    def _copy_slice(self, source, target):
        modifying = target.StartModify()
        matrix = vtk.vtkMatrix4x4()
        matrix.DeepCopy(source.GetSliceToRAS())
        target.GetSliceToRAS().DeepCopy(matrix)
        target.SetFieldOfView(*source.GetFieldOfView())
        target.SetXYZOrigin(*source.GetXYZOrigin())
        target.SetOrientation(source.GetOrientation())
        target.UpdateMatrices()
        target.EndModify(modifying)

    def _link_window_level(self, runs=None):
        """A clean volume and every probed volume of its runs keep the same window/level, whichever view it was
        changed in (``runs``: link these too, e.g. a new run, into their volume's group)."""
        for run in self.runs if runs is None else runs:
            displays = self._window_groups.get(run.volume.GetID())
            new = [] if displays is not None else [_display_node(run.volume)]
            new += [_display_node(item.probed) for item in run.strengths]
            displays = self._window_groups.setdefault(run.volume.GetID(), [])
            displays.extend(new)  # the observers share this list: every display added later is linked too
            for display in new:
                self._observe(display, self._copy_window_level, displays)

    def _copy_window_level(self, source, displays):
        for display in displays:
            if display is not source and (display.GetWindow(), display.GetLevel()) != (
                    source.GetWindow(), source.GetLevel()):
                display.AutoWindowLevelOff()
                display.SetWindowLevel(source.GetWindow(), source.GetLevel())

    def _link_cameras(self):
        cameras = [view.get_camera_node() for view in (self.clean_3d, self.attacked_3d)]
        if None in cameras:
            return
        for source, target in (cameras, cameras[::-1]):
            self._observe(source, self._copy_camera, target)

    def _copy_camera(self, source, target):
        modifying = target.StartModify()
        target.SetPosition(source.GetPosition())
        target.SetFocalPoint(source.GetFocalPoint())
        target.SetViewUp(source.GetViewUp())
        target.SetParallelScale(source.GetParallelScale())
        target.EndModify(modifying)
        target.ResetClippingRange()

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
        for other in run.strengths:
            if other is not item:
                other.segmentation.GetDisplayNode().SetVisibility(False)
        self._show_segmentation(item.segmentation, self.attacked_view, self.attacked_3d, state.show_segmentations)
        run.clean_segmentation.GetDisplayNode().SetVisibility2D(state.show_segmentations)
        if self._chart_key != item.key:
            state.chart_src, self._chart_key = self._chart(item), item.key
        state.strength_label = run.caption(item)
        for view in (self.clean_view, self.attacked_view, self.clean_3d, self.attacked_3d):
            view.schedule_render()
        state.shown_strength_key = item.key

    def _on_window_change(self, intensity_window, **_):
        """The clean volume's window; the link copies it to every adversarial volume."""
        try:
            low, high = (float(value) for value in intensity_window)
        except (TypeError, ValueError):
            return
        if high > low:
            _display_node(self.run.volume).SetWindowLevelMinMax(low, high)

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
        for segmentation in nodes["segmentation"].values():
            segmentation.GetDisplayNode().SetVisibility(False)
        try:
            new = self._add_new_runs(nodes["segmentation"].get(0.0))
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
        self._perturbation_reach.extend(reaches)  # the three lists stay aligned: extended together
        self.metrics.extend(metrics)
        self.runs.extend(new)
        self._link_window_level(new)
        self._build_ui()
        self.server.state.run_index = len(self.runs) - 1
        return new

    # ----------------------------------------------------------------------------------------------------- chart

    def _chart(self, selected):
        """Dice vs strength from the scene's table and chart nodes (series, colours, titles), as a PNG data URL."""
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        run = self.run
        if run.dice_table is None:
            return ""
        rows = table_rows(run.dice_table)
        series = []
        if run.chart is not None:
            for index in range(run.chart.GetNumberOfPlotSeriesNodes()):
                plot = run.chart.GetNthPlotSeriesNode(index)
                if plot is not None:
                    series.append((plot.GetYColumnName(), plot.GetColor(), plot.GetYColumnName()))
        else:
            series = [(name, None, name) for name in rows[0] if name != run.strength_name] if rows else []
        figure = Figure(figsize=(4.2, 2.9), dpi=100)
        axes = figure.add_subplot()
        x_values = [row.get(run.strength_name) for row in rows]
        for column, color, name in series:
            axes.plot(x_values, [row.get(column) for row in rows], marker="o", label=name, color=color,
                      linewidth=2.2 if column == "mean" else 1.4)
        axes.axvline(selected.strength, color="#d9534a", linestyle="--", linewidth=1)
        axes.set_xlabel(_strength_title(self.run), fontsize=8)
        axes.set_ylabel(run.chart.GetYAxisTitle() if run.chart is not None else "Dice", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower left")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    # --------------------------------------------------------------------------------------------------------- UI

    def _slice_view_ui(self, server, view_id, view):
        create_vertical_slice_view_gutter_ui(server, view_id, view)
        _view_label("clean" if view.name == CLEAN_SLICE else "attacked · {{ strength_label }}", view.name)

    def _three_d_view_ui(self, server, view_id, view):
        create_vertical_view_gutter_ui(server, view_id, view)
        _view_label("clean segments" if view.name == CLEAN_3D else "attacked segments · {{ strength_label }}",
                    view.name)

    def _build_ui(self):
        with VAppLayout(self.server, full_height=True) as self.ui:
            with html.Div(style="display:flex;flex-direction:row;height:100vh;width:100vw;overflow:hidden;"):
                with html.Div(style="flex:1;display:flex;flex-direction:column;min-width:0;"):
                    self.layout_manager.initialize_layout_grid(self.ui)
                with html.Div(classes="pa-3", style="width:460px;overflow-y:auto;font-size:13px;",
                              id="medadv-panel"):
                    html.Div("{{ run_title }}", classes="text-subtitle-1 font-weight-bold", id="medadv-title")
                    html.Div(str(self.scene_path), classes="text-caption text-medium-emphasis mb-2",
                             style="word-break:break-all;")
                    self.server.state.run_items = [{"title": run.title, "value": index}
                                                   for index, run in enumerate(self.runs)]
                    if len(self.runs) > 1:
                        v3.VSelect(v_model=("run_index",), label="run", density="compact", hide_details=True,
                                   items=("run_items",), id="medadv-run")
                    for index, run in enumerate(self.runs):
                        with html.Div(v_if="run_index === {}".format(index)):
                            self._strength_ui(run)
                    html.Div("slice orientation", classes="text-caption mt-2")
                    with v3.VBtnToggle(v_model=("orientation",), mandatory=True, density="compact",
                                       divided=True, variant="outlined"):
                        for orientation in ORIENTATIONS:
                            v3.VBtn(orientation, value=orientation, size="small", id="orientation-" + orientation)
                    v3.VRangeSlider(v_model=("intensity_window",), min=("intensity_range[0]",),
                                    max=("intensity_range[1]",), step=("intensity_range[2]",),
                                    label="window", density="compact", hide_details=True, strict=True,
                                    classes="ml-2 mr-2 mt-2", id="medadv-window")
                    v3.VSwitch(v_model=("show_perturbation",),
                               label=("'perturbation overlay (blue −, red +; full colour at ±' + perturbation_scale "
                                      "+ ')'",),
                               density="compact", hide_details=True, color="red-darken-2", id="medadv-perturbation")
                    v3.VSlider(v_model=("perturbation_opacity",), min=0.1, max=1.0, step=0.05, density="compact",
                               hide_details=True, label="opacity", disabled=("!show_perturbation",),
                               color="red-darken-2", classes="ml-2 mr-2", id="medadv-perturbation-opacity")
                    v3.VSwitch(v_model=("show_segmentations",), label="segmentations in slice views",
                               density="compact", hide_details=True, color="primary", id="medadv-segmentations")
                    for index, run in enumerate(self.runs):
                        with html.Div(v_if="run_index === {}".format(index)):
                            self._legend_ui(run)
                            html.Img(src=("chart_src",), id="medadv-chart", style="width:100%;margin-top:8px;",
                                     alt="Dice vs " + run.strength_name)
                            self._metrics_ui(run, self.metrics[index])
                    self._new_probe_ui()

    def _new_probe_ui(self):
        html.Div("new probe on this volume", classes="text-subtitle-2 mt-4")
        if not self.model_source:
            html.Div("start medadv view with --model to run probes from here", classes="text-caption")
            return
        from ..probes.registry import probe_names
        built_in = "" if self.model_given else " (the built-in network of that name; --model to choose another)"
        html.Div("network: " + self.model_source + built_in, classes="text-caption", style="word-break:break-all;",
                 id="medadv-probe-network")
        v3.VSelect(v_model=("new_probe",), items=("probe_names", probe_names()), label="probe",
                   density="compact", hide_details=True, disabled=("probe_running",), id="medadv-new-probe")
        v3.VTextField(v_model=("new_strengths",), label=("new_strengths_label",), density="compact",
                      hide_details=True, disabled=("probe_running",), classes="mt-1", id="medadv-new-strengths")
        with html.Div(classes="d-flex mt-1", style="gap:8px;"):
            v3.VBtn("run", click=self.start_probe, disabled=("probe_running",), size="small", color="primary",
                    id="medadv-run-probe")
            v3.VBtn("cancel", click=self.cancel_probe, disabled=("!probe_running",), size="small",
                    id="medadv-cancel-probe")
        v3.VProgressLinear(model_value=("probe_progress",), v_show=("probe_running",), color="primary",
                           classes="mt-1")
        html.Div("{{ probe_message }}", classes="text-caption", id="medadv-probe-message")

    def _strength_ui(self, run):
        html.Div(_strength_title(run), classes="text-caption mt-1")
        with v3.VBtnToggle(v_model=("strength_key",), mandatory=True, density="compact", color="red-darken-2",
                           divided=True, variant="outlined", id="medadv-strength"):
            for item in run.strengths:
                v3.VBtn(item.text, value=item.key, id="strength-" + item.key, size="small")

    @staticmethod
    def _legend_ui(run):
        with html.Div(classes="mt-2", id="medadv-legend"):
            for name, color in segment_legend(run.clean_segmentation):
                with html.Span(style="margin-right:12px;white-space:nowrap;"):
                    html.Span(style="display:inline-block;width:11px;height:11px;margin-right:4px;"
                                    "background:{};border:1px solid #444;".format(_css(color)))
                    html.Span(name)

    @staticmethod
    def _metrics_ui(run, rows):
        if not rows:
            return
        html.Div(run.metrics.GetName(), classes="text-caption mt-2")
        has_means = any(row.get("label") == "mean" for row in rows)
        if has_means:
            v3.VSwitch(v_model=("metrics_per_label", False), label="every label (else the mean over labels)",
                       density="compact", hide_details=True, color="primary", id="medadv-per-label")
        columns = metric_columns(rows)
        with html.Div(style="overflow-x:auto;"), v3.VTable(density="compact", id="medadv-metrics",
                                                             style="font-size:12px;"):
            with html.Thead(), html.Tr():
                for name, title, _ in columns:
                    html.Th(title, style="padding:0 4px;white-space:nowrap;",
                            raw_attrs=['data-column="{}"'.format(name)])
            with html.Tbody():
                for row in rows:
                    key = next((item.key for item in run.strengths if item.strength == row.get(run.strength_name)),
                               "")
                    selected = "strength_key === '{}' ? 'bg-red-lighten-4' : ''".format(key) if key else ""
                    shown = {"v_show": "metrics_per_label"} if has_means and row.get("label") != "mean" else {}
                    with html.Tr(classes=(selected,) if selected else "", **shown,
                                 raw_attrs=['data-strength="{}"'.format(key or "0")]):
                        for name, _, pattern in columns:
                            html.Td(_cell(row.get(name), pattern), style="padding:0 4px;white-space:nowrap;")


def _strength_title(run):
    """The chart's x-axis title as the scene has it, e.g. 'epsilon (fraction of intensity range)'."""
    title = run.chart.GetXAxisTitle() if run.chart is not None else ""
    return title or run.strength_name


def metric_columns(rows):
    """(column, title, format) of the metrics table as shown: the known ones in order, then any other column of
    the table under its own name; hidden ones and columns without a single value left out."""
    present = [name for name in rows[0] if name not in HIDDEN_METRIC_COLUMNS
               and any(row.get(name) is not None for row in rows)] if rows else []
    known = [column for column in METRIC_COLUMNS if column[0] in present]
    named = {column[0] for column in known}
    return known + [(name, name, "{:.4g}") for name in present if name not in named]


def _cell(value, pattern):
    if value is None:
        return ""
    if isinstance(value, float):
        return (pattern if pattern != "{}" else "{:g}").format(value)
    return str(value)


def _serving():
    """Whether this runs in the server's event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _callback(method, argument):
    """A VTK observer calling ``method(caller, argument)``."""
    def observer(caller, _event):
        method(caller, argument)
    return observer


def _view_label(text, view_name):
    """The view's caption; ``data-view`` also lets a test find the view's image."""
    html.Div(text, classes="medadv-view-label", raw_attrs=['data-view="{}"'.format(view_name)],
             style="position:absolute;top:6px;right:10px;color:white;font:13px sans-serif;"
                   "text-shadow:0 0 3px black;pointer-events:none;")


def _display_node(volume_node):
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    return display


def _css(color):
    return "rgb({},{},{})".format(*(int(round(255 * channel)) for channel in color[:3]))

