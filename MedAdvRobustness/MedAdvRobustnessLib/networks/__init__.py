"""Networks: what turns a model file into a differentiable function of the raw volume (loading, preprocessing,
sliding windows, outputs). Torch and MONAI only: no VTK, Slicer, trame or Qt."""
