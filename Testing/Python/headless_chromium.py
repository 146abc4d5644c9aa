"""A headless Chromium driven over the DevTools protocol (loopback only), for end-to-end tests of the web viewer.

Chromium runs in its own process group with a fresh, empty profile folder; :meth:`HeadlessChromium.close` ends the
whole group. The DevTools endpoint listens on 127.0.0.1 on a port Chromium picks (``--remote-debugging-port=0``).
"""
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-default-browser-check",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


def find_chromium():
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsError(RuntimeError):
    pass


class HeadlessChromium:
    """One browser, one page; ``call`` sends a DevTools command and waits for its answer."""

    def __init__(self, width=1600, height=1000, timeout=30.0):
        import websocket  # websocket-client

        executable = find_chromium()
        if executable is None:
            raise FileNotFoundError("chromium is not installed")
        self.profile = tempfile.mkdtemp(prefix="medadv-chromium-")
        self.process = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, "--user-data-dir=" + self.profile,
             "--window-size={},{}".format(width, height), "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=end_with_parent)
        self._ids = itertools.count(1)
        self.socket = None
        try:
            port = self._devtools_port(timeout)
            page = self._page_target(port, timeout)
            self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                                      suppress_origin=True)
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout):
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DevToolsError("chromium exited with status {}: {}".format(
                    self.process.returncode, self.process.stderr.read().decode(errors="replace")[-2000:]))
            if port_file.is_file():
                lines = port_file.read_text().splitlines()
                if lines and lines[0].strip().isdigit():
                    return int(lines[0])
            time.sleep(0.1)
        raise DevToolsError("chromium did not open its DevTools port within {:.0f} s".format(timeout))

    @staticmethod
    def _page_target(port, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:{}/json/list".format(port), timeout=5) as answer:
                    pages = [target for target in json.load(answer) if target.get("type") == "page"]
            except OSError:  # not answering yet
                pages = []
            if pages:
                return pages[0]
            time.sleep(0.1)
        raise DevToolsError("chromium shows no page")

    def call(self, method, **params):
        message_id = next(self._ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise DevToolsError("{}: {}".format(method, message["error"]))
                return message.get("result", {})

    def evaluate(self, expression):
        """The value of a JavaScript expression (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError("{} raised {}".format(expression[:80], result["exceptionDetails"]))
        return result["result"].get("value")

    def navigate(self, url):
        self.call("Page.navigate", url=url)

    def wait_for(self, expression, timeout, interval=0.25, what=None):
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError("{} not reached within {:.0f} s (last value {!r})".format(what or expression, timeout,
                                                                                      value))

    def screenshot(self, path, clip=None):
        """A PNG of the viewport (or of ``clip``: x, y, width, height in CSS pixels), written to ``path``."""
        params = {"format": "png", "captureBeyondViewport": False}
        if clip is not None:
            params["clip"] = dict(zip(("x", "y", "width", "height"), clip), scale=1)
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        Path(path).write_bytes(data)
        return path

    def close(self, timeout=10):
        if self.socket is not None:
            try:
                self.socket.close()
            except Exception:
                pass
        end_process_group(self.process, timeout)
        shutil.rmtree(self.profile, ignore_errors=True)


def end_with_parent():
    """For ``preexec_fn``: the child gets SIGTERM when the test process dies (Linux), so that a killed test run
    leaves no server or browser behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def end_process_group(process, timeout=10):
    """SIGTERM the process group of ``process`` (started with start_new_session), then SIGKILL; reap it."""
    if process is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=timeout)
            if not group_alive(process.pid):
                break
        except subprocess.TimeoutExpired:
            continue
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def group_alive(pgid):
    """The live (not zombie) processes of the process group ``pgid``, from /proc (or a signal probe elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    alive = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive
