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
