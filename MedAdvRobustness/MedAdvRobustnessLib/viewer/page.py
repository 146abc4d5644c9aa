"""The viewer's page: the layout of its four views, the side panel (runs, strengths, overlays, legend, chart,
metrics table, new probe) and the Dice chart."""
import base64
import io

from trame.widgets import html
from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import VAppLayout
from trame_vuetify.widgets import vuetify3 as v3

from .scene import segment_legend, table_rows

CLEAN_SLICE, ATTACKED_SLICE = "Clean", "Attacked"
CLEAN_3D, ATTACKED_3D = "Clean3D", "Attacked3D"
ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
# Metrics table columns shown first, in this order, with a title and a format; any other column of the table (a
# metric added later) follows under its own name; the HIDDEN ones and columns without any value are left out.
METRIC_COLUMNS = (("epsilon", "ε", "{:g}"), ("severity", "severity", "{:g}"), ("label", "label", "{}"),
                  ("predicted_name", "predicted", "{}"), ("confidence", "p", "{:.3f}"),  # a classifier's
                  ("label_probability", "p label", "{:.3f}"), ("flipped", "flipped", "{:g}"),
                  ("dice_reference", "Dice ref", "{:.3f}"), ("dice_clean", "Dice clean", "{:.3f}"),
                  ("hd95_reference", "HD95 ref mm", "{:.1f}"), ("asd_reference", "ASD ref mm", "{:.2f}"),
                  ("hd95_clean", "HD95 clean mm", "{:.1f}"), ("asd_clean", "ASD clean mm", "{:.2f}"),
                  ("nsd_reference", "surface Dice ref", "{:.3f}"), ("nsd_clean", "surface Dice clean", "{:.3f}"),
                  ("linf", "L∞", "{:.2f}"), ("l2", "L2", "{:.1f}"), ("psnr", "PSNR dB", "{:.1f}"),
                  ("ssim", "SSIM", "{:.3f}"))
HIDDEN_METRIC_COLUMNS = ("model", "probe", "attack", "linf_fraction", "l2_fraction",  # attack: older scenes
                         "predicted")  # a classifier's class index: its name is shown


class ResultsPage:
    """Mixin of :class:`~.app.ResultsViewer`: the page of its ``server`` for its ``runs``, ``metrics``,
    ``layout_manager`` and ``model_source``."""

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

    def _slice_view_ui(self, server, view_id, view):
        create_vertical_slice_view_gutter_ui(server, view_id, view)
        _view_label("{{ clean_label }}" if view.name == CLEAN_SLICE else "attacked · {{ strength_label }}",
                    view.name)

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
                            self._fragility_ui(run)
                            self._legend_ui(run)
                            html.Img(src=("chart_src",), id="medadv-chart", style="width:100%;margin-top:8px;",
                                     alt="Dice vs " + run.strength_name)
                            self._metrics_ui(run, self.metrics[index])
                            self._structures_ui(run, self.structures[index])
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
    def _fragility_ui(run):
        """The fragility overlay's switch and its colour legend (the strength of each voxel's first change)."""
        if run.fragility is None:
            return
        from ..scene.fragility import fragility_colours
        v3.VSwitch(v_model=("show_fragility",), label="fragility overlay on the clean view",
                   density="compact", hide_details=True, color="deep-purple", id="medadv-fragility")
        with html.Div(v_show=("show_fragility",), classes="text-caption", id="medadv-fragility-legend"):
            html.Span("first change at {}: ".format(_strength_symbol(run)))
            for item, colour in zip(run.strengths, fragility_colours(len(run.strengths))):
                with html.Span(style="margin-right:10px;white-space:nowrap;"):
                    html.Span(style="display:inline-block;width:11px;height:11px;margin-right:3px;"
                                    "background:{};border:1px solid #444;".format(_css(colour)))
                    html.Span(item.text)
            html.Span("(never: transparent)")

    @staticmethod
    def _structures_ui(run, rows):
        """The fragile structures: per label its voxels, the fraction changed at each strength, the critical one."""
        if not rows:
            return
        html.Div("fragile structures ({} where Dice against the clean prediction falls below 0.9)".format(
            run.strength_name), classes="text-caption mt-2")
        columns = [name for name in rows[0] if name in ("label", "voxels") or name.startswith(("changed_",
                                                                                                "critical_"))]
        with html.Div(style="overflow-x:auto;"), v3.VTable(density="compact", id="medadv-structures",
                                                             style="font-size:12px;"):
            with html.Thead(), html.Tr():
                for name in columns:
                    html.Th(name.replace("changed_", "changed at ").replace("critical_", "critical "),
                            style="padding:0 4px;white-space:nowrap;")
            with html.Tbody():
                for row in rows:
                    with html.Tr():
                        for name in columns:
                            value = row.get(name)
                            pattern = "{:.3g}" if name.startswith(("changed_", "critical_")) else "{}"
                            html.Td(_cell(value, pattern), style="padding:0 4px;white-space:nowrap;")

    @staticmethod
    def _legend_ui(run):
        if run.clean_segmentation is None:  # a classifier: its classes are in the table and the view captions
            return
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


def _strength_symbol(run):
    return "ε" if run.strength_name == "epsilon" else run.strength_name


def _cell(value, pattern):
    if value is None:
        return ""
    if isinstance(value, float):
        return (pattern if pattern != "{}" else "{:g}").format(value)
    return str(value)


def _view_label(text, view_name):
    """The view's caption; ``data-view`` also lets a test find the view's image."""
    html.Div(text, classes="medadv-view-label", raw_attrs=['data-view="{}"'.format(view_name)],
             style="position:absolute;top:6px;right:10px;color:white;font:13px sans-serif;"
                   "text-shadow:0 0 3px black;pointer-events:none;")


def _css(color):
    return "rgb({},{},{})".format(*(int(round(255 * channel)) for channel in color[:3]))
