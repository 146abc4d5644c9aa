"""Scene: MRML adapters (volumes and label maps to arrays and back, exact geometry), the scene with Slicer's
module logics, results as nodes and files, view layouts."""
