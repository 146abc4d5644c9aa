"""Evaluation: the sweep of one probe over its strengths on one volume, the metrics, and the result records.
Torch and MONAI only."""
