"""``wsi-convnext view``: a slide viewer in the browser with the pipeline's overlays.

* :mod:`.deepzoom`: Deep Zoom tile math (:class:`DeepZoomGrid`), pixel sources over the
  project's slide readers or a store's thumbnail, JPEG tiles with an LRU cache;
* :mod:`.catalog`: what PATH holds (slides, stores, run outcome, predictions) and one slide's
  view (overlays, stored tiles);
* :mod:`.app`: the tornado web app and :class:`ViewerServer`;
* ``static/``: the page's script and style and OpenSeadragon, bundled from npm by
  ``tools/vendor_openseadragon.sh`` (nothing is fetched at run time).
"""

from __future__ import annotations

from .app import ViewerServer, make_app
from .catalog import Catalog, SlideView, ViewerSlide, build_catalog
from .deepzoom import DeepZoom, DeepZoomGrid, SlideSource, ThumbnailSource, TileCache

__all__ = [
    "Catalog",
    "DeepZoom",
    "DeepZoomGrid",
    "SlideSource",
    "SlideView",
    "ThumbnailSource",
    "TileCache",
    "ViewerServer",
    "ViewerSlide",
    "build_catalog",
    "make_app",
]
