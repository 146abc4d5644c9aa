"""The viewer's linked views: both slice views on one plane, one window/level per volume and its probed volumes,
both 3D cameras together; every copy without echo."""
import vtk


class ViewLinks:
    """Mixin of :class:`~.app.ResultsViewer`: needs ``clean_view``, ``attacked_view``, ``clean_3d``, ``attacked_3d``,
    ``runs``, ``_syncing``, ``_observers``, ``_window_groups`` and ``_chart_key``."""

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
            new = [] if displays is not None else [display_node(run.volume)]
            new += [display_node(item.probed) for item in run.strengths]
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


def display_node(volume_node):
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    return display


def _callback(method, argument):
    """A VTK observer calling ``method(caller, argument)``."""
    def observer(caller, _event):
        method(caller, argument)
    return observer
