"""Slicer view layouts of the module (plain MRML layout XML; no torch), and moving their slice views."""

COMPARISON_LAYOUT_ID = 58231
CLEAN_VIEW, ATTACKED_VIEW = "MedAdvClean", "MedAdvAttacked"

# Own slice views rather than Red/Yellow: Slicer applies a layout's "default" view properties only to views it
# creates, so reusing Yellow would keep it sagittal (and then unlinkable to an axial Red), and "relayout"
# properties would change the user's Red and Yellow views for every other layout too.
COMPARISON_LAYOUT = """
<layout type="vertical" split="true">
 <item splitSize="600"><layout type="horizontal" split="true">
  <item><view class="vtkMRMLSliceNode" singletontag="{clean}">
   <property name="orientation" action="default">Axial</property>
   <property name="viewlabel" action="default">Clean</property>
   <property name="viewcolor" action="default">#4A90D9</property></view></item>
  <item><view class="vtkMRMLSliceNode" singletontag="{attacked}">
   <property name="orientation" action="default">Axial</property>
   <property name="viewlabel" action="default">Attacked</property>
   <property name="viewcolor" action="default">#E3572D</property></view></item>
 </layout></item>
 <item splitSize="400"><layout type="horizontal" split="true">
  <item><view class="vtkMRMLPlotViewNode" singletontag="PlotView1">
   <property name="viewlabel" action="default">P</property></view></item>
  <item><view class="vtkMRMLTableViewNode" singletontag="TableView1">
   <property name="viewlabel" action="default">T</property></view></item>
 </layout></item>
</layout>
""".format(clean=CLEAN_VIEW, attacked=ATTACKED_VIEW)


def jump_slices_to(scene, ras, view_names):
    """Centre the slice views named ``view_names`` (their layout names) of ``scene`` on the RAS point ``ras``
    (``vtkMRMLSliceNode.JumpSliceByCentering``). Returns the slice nodes moved, in the order of ``view_names``;
    a view the scene does not have is skipped."""
    slices = scene.GetNodesByClass("vtkMRMLSliceNode")
    by_name = {}
    for index in range(slices.GetNumberOfItems()):
        node = slices.GetItemAsObject(index)
        by_name.setdefault(node.GetLayoutName(), node)
    moved = [by_name[name] for name in view_names if name in by_name]
    for node in moved:
        node.JumpSliceByCentering(*(float(value) for value in ras))
    return moved


def view_nodes(scene, class_name, view_names):
    """The nodes of ``class_name`` (slice or slice composite nodes) of ``scene`` named ``view_names`` (their layout
    names), in that order; ValueError naming a view the scene does not have."""
    nodes = scene.GetNodesByClass(class_name)
    by_name = {}
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        by_name.setdefault(node.GetLayoutName(), node)
    missing = [name for name in view_names if name not in by_name]
    if missing:
        raise ValueError("the scene has no {} for the view {!r}".format(class_name, missing[0]))
    return [by_name[name] for name in view_names]


def show_outlines(segmentation, slice_node):
    """Show ``segmentation`` as outlines (no fill), ``slice_node`` added to the views its display is shown in."""
    display = segmentation.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.AddViewNodeID(slice_node.GetID())


def show_comparison(scene, nodes, fit_view=None):
    """Set up the comparison views of a segmentation run's ``nodes`` (by role) in ``scene``: the clean view
    (CLEAN_VIEW) shows the input under the fragility map (opacity 0.7; the perturbation at 0.4 without one), the
    attacked view (ATTACKED_VIEW) the most strongly probed volume under its perturbation (0.4); linked slices, the
    attacked one in the clean one's orientation; each view its segmentation as outlines, the other segmentations
    hidden; the "unstable" segmentation in the clean view only; both views centred on ``nodes["focus"]``.
    ``fit_view(view_name)``, if given, is called for each view once its volumes are set, before that centring (the
    application fits its slice widget there)."""
    strongest = max(nodes["probed"])
    perturbation, fragility = nodes["perturbation"][strongest], nodes.get("fragility")
    views = ((CLEAN_VIEW, nodes["input"], nodes["segmentation"][0.0],
              perturbation if fragility is None else fragility),
             (ATTACKED_VIEW, nodes["probed"][strongest], nodes["segmentation"][strongest], perturbation))
    names = [view[0] for view in views]
    slices = dict(zip(names, view_nodes(scene, "vtkMRMLSliceNode", names)))
    composites = dict(zip(names, view_nodes(scene, "vtkMRMLSliceCompositeNode", names)))
    for segmentation in nodes["segmentation"].values():
        segmentation.GetDisplayNode().SetVisibility(False)
    # Linked slices need one orientation: the attacked view follows the clean one (the user may change it).
    slices[ATTACKED_VIEW].SetOrientation(slices[CLEAN_VIEW].GetOrientation())
    for view_name, background, segmentation, overlay in views:
        composite = composites[view_name]
        composite.SetBackgroundVolumeID(background.GetID() if background else None)
        composite.SetForegroundVolumeID(overlay.GetID())
        composite.SetForegroundOpacity(0.7 if overlay is fragility else 0.4)
        composite.SetLinkedControl(True)
        show_outlines(segmentation, slices[view_name])
        if fit_view is not None:
            fit_view(view_name)
    if nodes.get("unstable") is not None:  # to review in the Segment Editor: outlines in the clean view
        unstable_display = nodes["unstable"].GetDisplayNode()
        unstable_display.SetVisibility2DFill(False)
        unstable_display.SetViewNodeIDs([slices[CLEAN_VIEW].GetID()])
    if nodes.get("focus") is not None:
        jump_slices_to(scene, nodes["focus"], names)
