"""Viewer: ``medadv view``, a results scene in Slicer's own views in the browser (trame-slicer)."""
