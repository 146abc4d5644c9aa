"""Module: what the Slicer module computes without its GUI (parameter node in, result nodes out), the
"compare networks" section, the worker process runs go to, and the packages the module needs."""
import sys

LIBRARY = "MedAdvRobustnessLib"


def unload_library():
    """Remove the library's modules from ``sys.modules``, so that the next import reads them from disk again.

    Slicer's *Reload* re-executes only the module file; the worker process always imports the library from disk.
    The widget calls this before reloading, so that the module and its worker run the same code. Returns the names
    removed."""
    names = sorted(name for name in sys.modules if name == LIBRARY or name.startswith(LIBRARY + "."))
    for name in names:
        del sys.modules[name]
    return names
