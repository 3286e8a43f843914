"""A Dask worker plugin that imports the run's stage modules when a worker starts (imports dask)."""

from __future__ import annotations

import importlib
import logging

from distributed.diagnostics.plugin import WorkerPlugin

logger = logging.getLogger(__name__)

#: The plugin's name on the scheduler (registering it again replaces it).
WARM_PLUGIN = "wsi-convnext-warm"


class WarmImports(WorkerPlugin):
    """Import ``modules`` on every worker, now and on the ones that join or restart later."""

    name = WARM_PLUGIN

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = tuple(modules)

    def setup(self, worker: object) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional backend may be missing
                logger.debug("warm-up import of %s failed", name, exc_info=True)
