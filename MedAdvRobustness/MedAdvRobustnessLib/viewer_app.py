"""The visual-QA web app: a results scene in Slicer's own views, served by trame-slicer.

Clean and attacked volumes side by side in two linked slice views (same slice plane, same window/level), each with
its segmentation as outlines in the segments' names and colours, the perturbation as a colour overlay on the
attacked view, the segment surfaces clean vs attacked in two 3D views, and beside them an epsilon selector that
switches every view, the metrics table and the Dice-vs-epsilon chart, all read from the scene itself.
"""
import base64
import io
from pathlib import Path

import vtk
from trame.app import TrameApp
from trame.widgets import html
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition, ViewProps
from trame_vuetify.ui.vuetify3 import VAppLayout
from trame_vuetify.widgets import vuetify3 as v3

from .errors import InputError
from .viewer_scene import require_run, segment_legend, table_rows

CLEAN_SLICE, ATTACKED_SLICE = "Clean", "Attacked"
CLEAN_3D, ATTACKED_3D = "Clean3D", "Attacked3D"
ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
PERTURBATION_OPACITY = 0.5
SEGMENT_SURFACE_OPACITY = 1.0
LAYOUT_ID = "medadv"
METRIC_COLUMNS = (("epsilon", "ε", "{:g}"), ("label", "label", "{}"), ("dice_reference", "Dice ref", "{:.3f}"),
                  ("dice_clean", "Dice clean", "{:.3f}"), ("linf", "L∞", "{:.2f}"), ("l2", "L2", "{:.1f}"),
                  ("psnr", "PSNR dB", "{:.1f}"))


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

    def __init__(self, scene_path, server=None, rca_encoder="png", quiet_vtk=True):
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
        self._perturbation_colors = self._add_perturbation_colors()
        self._prepare_display()

        state = self.server.state
        state.trame__title = "medadv view: " + self.run.title
        state.epsilon_key = self.run.epsilons[-1].key
        state.orientation = "Axial"
        state.show_perturbation = True
        state.perturbation_opacity = PERTURBATION_OPACITY
        state.show_segmentations = True
        state.shown_epsilon_key = ""
        state.chart_src = ""
        clean_display = _display_node(self.run.volume)
        self.intensity_range = [float(value) for value in self.run.volume.GetImageData().GetScalarRange()]
        state.intensity_window = [round(clean_display.GetWindowLevelMin(), 2), round(clean_display.GetWindowLevelMax(), 2)]
        self.metrics = table_rows(self.run.metrics) if self.run.metrics is not None else []
        self._build_ui()
        state.change("epsilon_key", "show_perturbation", "perturbation_opacity", "show_segmentations")(self._on_display_change)
        state.change("orientation")(self._on_orientation_change)
        state.change("intensity_window")(self._on_window_change)
        self._show_epsilon(state.epsilon_key)
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

    def _prepare_display(self):
        run = self.run
        for item in run.epsilons:
            if item.perturbation is not None:
                display = _display_node(item.perturbation)
                display.SetAndObserveColorNodeID(self._perturbation_colors.GetID())
                display.AutoWindowLevelOff()
                low, high = item.perturbation.GetImageData().GetScalarRange()
                reach = max(abs(low), abs(high), 1e-6)
                display.SetWindowLevelMinMax(-reach, reach)
                display.SetInterpolate(False)
        clean_display = _display_node(run.volume)
        clean_display.AutoWindowLevelOff()
        for item in run.epsilons:
            adversarial = _display_node(item.adversarial)
            adversarial.AutoWindowLevelOff()
            adversarial.SetWindowLevel(clean_display.GetWindow(), clean_display.GetLevel())
        for segmentation in [run.clean_segmentation] + [item.segmentation for item in run.epsilons]:
            segmentation.CreateDefaultDisplayNodes()
            display = segmentation.GetDisplayNode()
            display.SetVisibility(False)
            display.SetVisibility2DFill(False)
            display.SetVisibility2DOutline(True)
            display.SetSliceIntersectionThickness(2)
            display.SetOpacity3D(SEGMENT_SURFACE_OPACITY)
        # Nothing else of the scene (e.g. the reference label map) is drawn unless asked for.
        self.clean_view.set_background_volume_id(run.volume.GetID())
        self.clean_view.set_foreground_volume_id(None)
        self._show_segmentation(run.clean_segmentation, self.clean_view, self.clean_3d)

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

    def _link_slice_views(self):
        """Both slice views show the same plane: any change of one slice node (slider, scroll, pan, zoom) is copied."""
        nodes = [self.clean_view.get_view_node(), self.attacked_view.get_view_node()]
        for source, target in (nodes, nodes[::-1]):
            source.AddObserver(vtk.vtkCommand.ModifiedEvent, _callback(self._copy_slice, target))

    def _copy_slice(self, source, target):
        if self._syncing:
            return
        self._syncing = True
        try:
            modifying = target.StartModify()
            matrix = vtk.vtkMatrix4x4()
            matrix.DeepCopy(source.GetSliceToRAS())
            target.GetSliceToRAS().DeepCopy(matrix)
            target.SetFieldOfView(*source.GetFieldOfView())
            target.SetXYZOrigin(*source.GetXYZOrigin())
            target.SetOrientation(source.GetOrientation())
            target.UpdateMatrices()
            target.EndModify(modifying)
        finally:
            self._syncing = False
        self._chart_key = None

    def _link_window_level(self):
        """Clean and every adversarial volume keep the same window/level, whichever view it was changed in."""
        displays = [_display_node(self.run.volume)] + [_display_node(item.adversarial) for item in self.run.epsilons]
        for display in displays:
            display.AddObserver(vtk.vtkCommand.ModifiedEvent, _callback(self._copy_window_level, displays))

    def _copy_window_level(self, source, displays):
        if self._syncing:
            return
        self._syncing = True
        try:
            for display in displays:
                if display is not source and (display.GetWindow(), display.GetLevel()) != (
                        source.GetWindow(), source.GetLevel()):
                    display.AutoWindowLevelOff()
                    display.SetWindowLevel(source.GetWindow(), source.GetLevel())
        finally:
            self._syncing = False
        self._chart_key = None

    def _link_cameras(self):
        cameras = [view.get_camera_node() for view in (self.clean_3d, self.attacked_3d)]
        if None in cameras:
            return
        for source, target in (cameras, cameras[::-1]):
            source.AddObserver(vtk.vtkCommand.ModifiedEvent, _callback(self._copy_camera, target))

    def _copy_camera(self, source, target):
        if self._syncing:
            return
        self._syncing = True
        try:
            modifying = target.StartModify()
            target.SetPosition(source.GetPosition())
            target.SetFocalPoint(source.GetFocalPoint())
            target.SetViewUp(source.GetViewUp())
            target.SetParallelScale(source.GetParallelScale())
            target.EndModify(modifying)
            target.ResetClippingRange()
        finally:
            self._syncing = False
        self._chart_key = None

    # --------------------------------------------------------------------------------------------------- switching

    def _on_display_change(self, epsilon_key, **_):
        self._show_epsilon(epsilon_key)

    def _show_epsilon(self, epsilon_key):
        state, run = self.server.state, self.run
        item = run.by_key(epsilon_key) or run.epsilons[-1]
        self.attacked_view.set_background_volume_id(item.adversarial.GetID())
        overlay = item.perturbation if state.show_perturbation and item.perturbation is not None else None
        self.attacked_view.set_foreground_volume_id(overlay.GetID() if overlay is not None else None)
        self.attacked_view.set_foreground_opacity(float(state.perturbation_opacity))
        for other in run.epsilons:
            if other is not item:
                other.segmentation.GetDisplayNode().SetVisibility(False)
        self._show_segmentation(item.segmentation, self.attacked_view, self.attacked_3d, state.show_segmentations)
        run.clean_segmentation.GetDisplayNode().SetVisibility2D(state.show_segmentations)
        if self._chart_key != item.key:
            state.chart_src, self._chart_key = self._chart(item), item.key
        state.epsilon_label = "{} ε = {}".format(run.attack, item.text)
        for view in (self.clean_view, self.attacked_view, self.clean_3d, self.attacked_3d):
            view.schedule_render()
        state.shown_epsilon_key = item.key

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

    # ----------------------------------------------------------------------------------------------------- chart

    def _chart(self, selected):
        """Dice vs epsilon from the scene's table and chart nodes (series, colours, titles), as a PNG data URL."""
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
                    series.append((plot.GetYColumnName(), plot.GetColor(), plot.GetName()))
        else:
            series = [(name, None, name) for name in rows[0] if name != "epsilon"] if rows else []
        figure = Figure(figsize=(4.2, 2.9), dpi=100)
        axes = figure.add_subplot()
        x_values = [row["epsilon"] for row in rows]
        for column, color, name in series:
            axes.plot(x_values, [row.get(column) for row in rows], marker="o", label=name, color=color,
                      linewidth=2.2 if column == "mean" else 1.4)
        axes.axvline(selected.epsilon, color="#d9534a", linestyle="--", linewidth=1)
        axes.set_xlabel(run.chart.GetXAxisTitle() if run.chart is not None else "epsilon", fontsize=8)
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
        _view_label("clean" if view.name == CLEAN_SLICE else "attacked · {{ epsilon_label }}", view.name)

    def _three_d_view_ui(self, server, view_id, view):
        create_vertical_view_gutter_ui(server, view_id, view)
        _view_label("clean segments" if view.name == CLEAN_3D else "attacked segments · {{ epsilon_label }}",
                    view.name)

    def _build_ui(self):
        run = self.run
        with VAppLayout(self.server, full_height=True) as self.ui:
            with html.Div(style="display:flex;flex-direction:row;height:100vh;width:100vw;overflow:hidden;"):
                with html.Div(style="flex:1;display:flex;flex-direction:column;min-width:0;"):
                    self.layout_manager.initialize_layout_grid(self.ui)
                with html.Div(classes="pa-3", style="width:460px;overflow-y:auto;font-size:13px;",
                              id="medadv-panel"):
                    html.Div(run.title, classes="text-subtitle-1 font-weight-bold")
                    html.Div(str(self.scene_path), classes="text-caption text-medium-emphasis mb-2",
                             style="word-break:break-all;")
                    html.Div("ε (fraction of the intensity range)", classes="text-caption mt-1")
                    with v3.VBtnToggle(v_model=("epsilon_key",), mandatory=True, density="compact",
                                       color="red-darken-2", divided=True, variant="outlined", id="medadv-epsilon"):
                        for item in run.epsilons:
                            v3.VBtn(item.text, value=item.key, id="epsilon-" + item.key, size="small")
                    html.Div("slice orientation", classes="text-caption mt-2")
                    with v3.VBtnToggle(v_model=("orientation",), mandatory=True, density="compact",
                                       divided=True, variant="outlined"):
                        for orientation in ORIENTATIONS:
                            v3.VBtn(orientation, value=orientation, size="small", id="orientation-" + orientation)
                    low, high = self.intensity_range
                    v3.VRangeSlider(v_model=("intensity_window",), min=low, max=high, step=(high - low) / 200.0,
                                    label="window", density="compact", hide_details=True, strict=True,
                                    classes="ml-2 mr-2 mt-2", id="medadv-window")
                    v3.VSwitch(v_model=("show_perturbation",), label="perturbation overlay (blue −, red +)",
                               density="compact", hide_details=True, color="red-darken-2", id="medadv-perturbation")
                    v3.VSlider(v_model=("perturbation_opacity",), min=0.1, max=1.0, step=0.05, density="compact",
                               hide_details=True, label="opacity", disabled=("!show_perturbation",),
                               color="red-darken-2", classes="ml-2 mr-2", id="medadv-perturbation-opacity")
                    v3.VSwitch(v_model=("show_segmentations",), label="segmentations in slice views",
                               density="compact", hide_details=True, color="primary", id="medadv-segmentations")
                    self._legend_ui()
                    html.Img(src=("chart_src",), id="medadv-chart", style="width:100%;margin-top:8px;",
                             alt="Dice vs epsilon")
                    self._metrics_ui()

    def _legend_ui(self):
        with html.Div(classes="mt-2", id="medadv-legend"):
            for name, color in segment_legend(self.run.clean_segmentation):
                with html.Span(style="margin-right:12px;white-space:nowrap;"):
                    html.Span(style="display:inline-block;width:11px;height:11px;margin-right:4px;"
                                    "background:{};border:1px solid #444;".format(_css(color)))
                    html.Span(name)

    def _metrics_ui(self):
        run = self.run
        if not self.metrics:
            return
        html.Div(run.metrics.GetName() if run.metrics is not None else "metrics", classes="text-caption mt-2")
        columns = [column for column in METRIC_COLUMNS if column[0] in self.metrics[0]]
        with v3.VTable(density="compact", id="medadv-metrics", style="font-size:12px;"):
            with html.Thead(), html.Tr():
                for _, title, _ in columns:
                    html.Th(title, style="padding:0 4px;")
            with html.Tbody():
                for row in self.metrics:
                    key = next((item.key for item in run.epsilons if item.epsilon == row.get("epsilon")), "")
                    selected = "epsilon_key === '{}' ? 'bg-red-lighten-4' : ''".format(key) if key else ""
                    with html.Tr(classes=(selected,) if selected else "",
                                 raw_attrs=['data-epsilon="{}"'.format(key or "0")]):
                        for name, _, pattern in columns:
                            value = row.get(name)
                            text = "" if value is None else (pattern.format(value) if isinstance(value, float)
                                                             else str(value))
                            html.Td(text, style="padding:0 4px;")


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

