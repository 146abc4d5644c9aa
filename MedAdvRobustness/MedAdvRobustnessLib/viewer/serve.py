"""``medadv view DIR``: visual QA of a results folder in the browser, on Slicer's own core (trame-slicer).

The page shows the scene ``medadv run`` wrote (``DIR/scene.mrb``, or any ``.mrb`` given directly), loaded through
trame-slicer's IO manager, in Slicer's slice and 3D views; see :mod:`.app`. The server listens on the
loopback interface unless told otherwise and runs until interrupted (Ctrl+C).
"""
import asyncio
import ipaddress
import itertools
import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import InputError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
ENCODERS = ("png", "jpeg", "turbo-jpeg", "webp")
MISSING_VIEWER = ("the browser viewer needs trame-slicer: pip install 'medadvrobustness[viewer]' "
                  "(or: pip install 'trame-slicer[standalone]==2.0.0')")


def add_view_command(commands):
    """The ``view`` subcommand of ``medadv`` (kept here so that cli.py only registers it)."""
    view = commands.add_parser(
        "view", help="open a results folder (or .mrb) in Slicer's views in the browser",
        description="Serve a results folder (its scene.mrb) or a .mrb file as a web page on Slicer's core "
                    "(trame-slicer) and print its address; open that address in a browser on this machine. On a "
                    "remote machine, forward the port first (ssh -L 8080:127.0.0.1:8080 HOST) and open "
                    "http://localhost:8080/. Ctrl+C stops the server.")
    view.add_argument("results", metavar="DIR", help="results folder written by 'medadv run/demo', or a .mrb file")
    view.add_argument("--host", default=DEFAULT_HOST,
                      help="address to listen on (default {}: this machine only)".format(DEFAULT_HOST))
    view.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help="port (default {}; 0: any free port)".format(DEFAULT_PORT))
    view.add_argument("--model", metavar="SOURCE",
                      help="network for new probes run from the page (anything --model of 'medadv run' takes; "
                           "default: the results' network when it is a built-in one)")
    view.add_argument("--encoder", choices=ENCODERS, default="png",
                      help="image encoding of the views (default png: lossless, so that what you see is what the "
                           "voxels hold)")
    view.set_defaults(handler=_view)
    return view


def _view(args):
    serve(args.results, host=args.host, port=args.port, encoder=args.encoder, model=args.model)
    return 0


def scene_file(results):
    """``results`` is a results folder (its ``scene.mrb``) or a ``.mrb`` file."""
    path = Path(results)
    if path.is_dir():
        path = path / "scene.mrb"
        if not path.is_file():
            raise InputError("{} holds no scene.mrb; is it a folder written by 'medadv run'?".format(results))
    elif not path.is_file():
        raise InputError("not found: {}".format(results))
    elif path.suffix.lower() != ".mrb":
        raise InputError("{} is neither a results folder nor a .mrb scene bundle".format(results))
    import zipfile
    if not zipfile.is_zipfile(str(path)):
        raise InputError("{} is not a readable scene bundle (.mrb: a zip file): damaged or of another kind".format(
            path))
    return path.absolute()


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host, port):
    """A clear error before loading anything if ``port`` is taken (or ``host`` is not an address of this machine)."""
    if port == 0:
        return
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise InputError("cannot listen on {} port {} ({}); choose another with --port (0: any free port)".format(
            host, port, error.strerror or error))


_APP_NUMBERS = itertools.count(1)


def build_app(results, encoder="png", server=None, model=None):
    """The trame app for a results folder or ``.mrb`` (not started); ``model``: the network of new probes."""
    path = scene_file(results)
    try:
        from .app import ResultsViewer
    except ImportError as error:
        raise InputError("{} ({})".format(MISSING_VIEWER, error))
    if server is None:  # a server of its own (trame keeps one per name: two apps would share their state)
        from trame.app import get_server
        server = get_server("medadv-view-{}".format(next(_APP_NUMBERS)), client_type="vue3")
    return ResultsViewer(path, server=server, rca_encoder=encoder, model_source=model)


def ignore_closed_connections(loop, context):
    """Event-loop error handler: a browser tab closed while an image was being sent is normal, not an error."""
    if isinstance(context.get("exception"), ConnectionResetError):
        return
    loop.default_exception_handler(context)


def drop_closed_connection_logs(record):
    """Logging filter: wslink logs an error it is handling as three records without the exception attached, and
    aiohttp its request handler's error with it; where that error is a closed connection (a browser tab closed
    mid-send), they are dropped."""
    attached = record.exc_info[1] if record.exc_info else None
    return not isinstance(attached or sys.exc_info()[1], ConnectionResetError)


def serve(results, host=DEFAULT_HOST, port=DEFAULT_PORT, encoder="png", model=None):
    """Serve the viewer until interrupted; prints the address once it listens."""
    if not 0 <= port <= 65535:
        raise InputError("--port must lie in 0..65535")
    check_port_free(host, port)
    if not is_loopback(host):
        print("medadv view: warning: listening on {}, not only on this machine; the scene is served without any "
              "access control".format(host), file=sys.stderr)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        # Headless: render offscreen through EGL (Mesa llvmpipe without a GPU) instead of trying X first.
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    app = build_app(results, encoder=encoder, model=model)
    for logger in ("wslink.protocol", "aiohttp.server"):
        logging.getLogger(logger).addFilter(drop_closed_connection_logs)
    server = app.server
    # The medadv command line is ours: trame must not parse sys.argv (--port/--host are given explicitly).
    os.environ["TRAME_ARGS"] = ""

    def announce(**_):
        asyncio.get_running_loop().set_exception_handler(ignore_closed_connections)
        shown = "[{}]".format(host) if ":" in host else host
        print("medadv view: {} ({})".format(app.run.title, app.scene_path), flush=True)
        print("medadv view: open http://{}:{}/ (Ctrl+C to stop)".format(shown, server.port), flush=True)

    server.controller.on_server_ready.add(announce)
    server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0,
                 disable_logging=True)

