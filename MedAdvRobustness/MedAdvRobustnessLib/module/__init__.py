"""Module: what the Slicer module computes without its GUI (parameter node in, result nodes out), the
"compare networks" section, and the worker process runs go to."""
