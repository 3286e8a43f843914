"""The viewer's web app (tornado): routes, handlers and the server that runs them.

Routes (``SID`` is a slide id of the catalog, never a path):

- ``/`` the slide list; ``/view/SID`` the viewer page; ``/report`` the run report, linked to the views;
- ``/api/slides``, ``/api/slides/SID``, ``/api/slides/SID/overlays`` JSON;
- ``/api/slides/SID/tiles/I`` stored tile ``I`` as the store holds it (JPEG or PNG);
- ``/dzi/SID.dzi`` and ``/dzi/SID_files/LEVEL/COL_ROW.jpeg`` the Deep Zoom pyramid;
- ``/static/...`` the page's script and style and the bundled OpenSeadragon.

Anything else is a 404; tornado's static handler answers 403 to a path that leaves the
static folder. Slide reads and store reads run in a thread pool, so one slow slide never
blocks the page of another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...errors import ConfigError, SlideReadError, StoreError
from .catalog import Catalog, build_catalog

logger = logging.getLogger(__name__)

__all__ = ["ViewerServer", "make_app"]

_HERE = Path(__file__).parent
STATIC_DIR = _HERE / "static"
TEMPLATE_DIR = _HERE / "templates"
_SID = r"([A-Za-z0-9][A-Za-z0-9_.\-]*)"
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _tornado_web() -> Any:
    import tornado.web

    return tornado.web


def make_app(catalog: Catalog, *, workers: int = 4) -> Any:
    """The tornado ``Application`` serving ``catalog`` (its reads run in ``settings["wsi_convnext_pool"]``)."""
    web = _tornado_web()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsi-view")

    class Base(web.RequestHandler):
        def set_default_headers(self) -> None:
            self.set_header("X-Content-Type-Options", "nosniff")
            self.set_header("Content-Security-Policy", _CSP)
            self.set_header("Referrer-Policy", "no-referrer")

        def view(self, sid: str) -> Any:
            try:
                return catalog.view(sid)
            except KeyError:
                raise web.HTTPError(404) from None
            except StoreError as exc:
                raise web.HTTPError(404, reason="nothing to show") from exc

        async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

        def send_json(self, data: Any) -> None:
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.write(json.dumps(data, allow_nan=False, separators=(",", ":")))

    class Index(Base):
        async def get(self) -> None:
            await self.blocking(catalog.refresh)
            self.render(
                "index.html", root=str(catalog.root), slides=list(catalog.slides.values()), has_run=catalog.has_run
            )

    class View(Base):
        def get(self, sid: str) -> None:
            if sid not in catalog.slides or not catalog.slides[sid].viewable:
                raise web.HTTPError(404)
            self.render("view.html", slide=catalog.slides[sid])

    class Report(Base):
        async def get(self) -> None:
            from ..report import write_report

            if not catalog.has_run:
                raise web.HTTPError(404)
            base = f"{self.request.protocol}://{self.request.host}"

            def render() -> bytes:
                with tempfile.TemporaryDirectory(prefix="wsi-convnext-view-") as tmp:
                    return write_report(catalog.root, path=Path(tmp) / "report.html", viewer_url=base).read_bytes()

            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.write(await self.blocking(render))

    class Slides(Base):
        async def get(self) -> None:
            await self.blocking(catalog.refresh)
            self.send_json([s.summary() for s in catalog.slides.values()])

    class SlideInfo(Base):
        async def get(self, sid: str) -> None:
            view = await self.blocking(self.view, sid)
            self.send_json(view.info())

    class Overlays(Base):
        async def get(self, sid: str) -> None:
            view = await self.blocking(self.view, sid)
            self.send_json(await self.blocking(view.overlays))

    class StoredTile(Base):
        async def get(self, sid: str, index: str) -> None:
            view = await self.blocking(self.view, sid)
            try:
                data, mime = await self.blocking(view.stored_tile, int(index))
            except KeyError:
                raise web.HTTPError(404) from None
            self.set_header("Content-Type", mime)
            self.set_header("Cache-Control", "private, max-age=3600")
            self.write(data)

    class Dzi(Base):
        async def get(self, sid: str) -> None:
            view = await self.blocking(self.view, sid)
            self.set_header("Content-Type", "application/xml")
            self.write(view.deepzoom.grid.dzi_xml("jpeg"))

    class DziTile(Base):
        async def get(self, sid: str, level: str, col: str, row: str) -> None:
            view = await self.blocking(self.view, sid)
            try:
                data = await self.blocking(view.deepzoom.tile, int(level), int(col), int(row))
            except IndexError:
                raise web.HTTPError(404) from None
            except SlideReadError as exc:
                logger.warning("%s", exc)
                raise web.HTTPError(500, reason="slide read failed") from None
            self.set_header("Content-Type", "image/jpeg")
            self.set_header("Cache-Control", "private, max-age=3600")
            self.write(data)

    return web.Application(
        [
            (r"/", Index),
            (rf"/view/{_SID}", View),
            (r"/report", Report),
            (r"/api/slides", Slides),
            (rf"/api/slides/{_SID}", SlideInfo),
            (rf"/api/slides/{_SID}/overlays", Overlays),
            (rf"/api/slides/{_SID}/tiles/(\d+)", StoredTile),
            (rf"/dzi/{_SID}\.dzi", Dzi),
            (rf"/dzi/{_SID}_files/(\d+)/(\d+)_(\d+)\.jpeg", DziTile),
        ],
        static_path=str(STATIC_DIR),
        template_path=str(TEMPLATE_DIR),
        autoescape="xhtml_escape",
        compress_response=True,
        wsi_convnext_pool=pool,
    )


class ViewerServer:
    """Serves :func:`make_app` of PATH on ``host:port`` (``port=0`` picks a free port).

    The socket is bound when the server is created, so a port in use fails here. Use
    :meth:`serve_forever` from a command, or :meth:`start` / :meth:`stop` to run it in a
    background thread (notebooks, tests).

    Raises:
        InputNotFoundError: PATH holds nothing to view.
        ConfigError: The address cannot be bound.
    """

    def __init__(self, path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000) -> None:
        from tornado.netutil import bind_sockets

        self.catalog = build_catalog(path)
        try:
            self._sockets = bind_sockets(port, host, family=socket.AF_UNSPEC)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port or --host") from exc
        bound = self._sockets[0].getsockname()
        self.host, self.port = host, int(bound[1])
        if host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("the viewer listens on %s: anyone who can reach this machine can see these slides", host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open in a browser."""
        shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}/"

    async def _serve(self, ready: Callable[[str], None] | None) -> None:
        from tornado.httpserver import HTTPServer

        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        app = make_app(self.catalog)
        server = HTTPServer(app)
        server.add_sockets(self._sockets)
        if ready is not None:
            ready(self.url)
        try:
            await self._stopped.wait()
        finally:
            server.stop()
            await server.close_all_connections()
            app.settings["wsi_convnext_pool"].shutdown(wait=False, cancel_futures=True)
            self.catalog.close()

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in this thread until :meth:`stop` or Ctrl-C (both return normally); ``on_ready(url)`` once listening."""
        try:
            asyncio.run(self._serve(on_ready))
        except KeyboardInterrupt:
            logger.info("viewer stopped")

    def start(self) -> str:
        """Serve from a daemon thread; returns the URL once listening."""
        started = threading.Event()
        self._thread = threading.Thread(
            target=self.serve_forever, args=(lambda _url: started.set(),), name="wsi-convnext-view", daemon=True
        )
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the viewer did not start within 30 s")
        return self.url

    def stop(self) -> None:
        """Stop serving (from any thread) and close the slides."""
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)
