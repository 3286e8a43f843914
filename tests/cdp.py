"""Drive a real headless Chromium through the Chrome DevTools Protocol (tornado's websocket client).

Used by the viewer tests: load a page, evaluate JavaScript, click at page coordinates, take
screenshots and record the HTTP status of every response the page received.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def find_chromium() -> str | None:
    """A headless-capable Chromium on PATH (Debian's `chromium` or `chromium-headless-shell`)."""
    for name in ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with one page, controlled synchronously.

    Attributes:
        responses: ``(url, status)`` of every HTTP response the page received.
        console: Console messages and exceptions the page logged.
    """

    def __init__(self, exe: str, profile: Path, *, width: int = 1200, height: int = 800) -> None:
        self.proc = subprocess.Popen(
            [
                exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Debian's `chromium` is a shell wrapper: close() ends the whole group
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            targets = json.loads(r.read())
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        self.loop = asyncio.new_event_loop()
        self._id = 0
        self.responses: list[tuple[str, int]] = []
        self.console: list[str] = []
        from tornado.websocket import websocket_connect

        async def connect() -> Any:
            return await websocket_connect(ws_url, max_message_size=256 << 20)

        try:
            self.ws = self.loop.run_until_complete(connect())
            for method in ("Page.enable", "Network.enable", "Runtime.enable"):
                self.send(method)
            self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Network.responseReceived":
            self.responses.append((params["response"]["url"], int(params["response"]["status"])))
        elif method == "Runtime.exceptionThrown":
            self.console.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events arriving meanwhile are recorded)."""

        async def call() -> dict[str, Any]:
            self._id += 1
            await self.ws.write_message(json.dumps({"id": self._id, "method": method, "params": params}))
            while True:
                raw = await asyncio.wait_for(self.ws.read_message(), 60)
                if raw is None:
                    raise RuntimeError("chromium closed the DevTools connection")
                msg = json.loads(raw)
                if msg.get("id") == self._id:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})
                self._event(msg)

        return self.loop.run_until_complete(call())

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def js(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (promises awaited) and return its JSON value."""
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        """Poll until ``expression`` is truthy in the page."""
        deadline = time.monotonic() + timeout
        while not self.js(f"!!({expression})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {expression!r}; console: {self.console[-5:]}")
            time.sleep(0.2)

    def click(self, x: float, y: float) -> None:
        """A real left click (press + release) at page coordinates."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def screenshot(self) -> np.ndarray:
        """The viewport as (H, W, 3) uint8 RGB."""
        from PIL import Image

        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    def close(self) -> None:
        """Close the connection and end the browser."""
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if getattr(self, "loop", None) is not None:
            self.loop.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(10)
                time.sleep(0.5)  # the browser's children leave after the wrapper
            except subprocess.TimeoutExpired:
                continue
