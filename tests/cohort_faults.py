"""Test-only fault injection for cohort runs: stage wrappers that crash, stall or raise on one slide.

Nothing of this is in the library. A fault is ``STAGE:SLIDE_ID:MODE``; several are joined
with ``;``. MODE ``exit`` kills the worker process (``os._exit``, after 0.25 s, like a crash
partway) every time, ``exit-after=SECONDS`` likewise after SECONDS, ``exit-once=MARKER``
only if the file MARKER does not exist yet (and creates it), ``sleep=SECONDS`` stalls,
``raise`` raises RuntimeError.

* In-process tests pass ``faulty_stages(spec)`` to ``run_cohort(stages=...)`` and make this
  module importable on the workers with :func:`install_on_workers` (a Dask worker plugin
  that uploads this file, also to workers that restart after a crash).
* As a script it runs the real CLI with faulty stages registered::

      python tests/cohort_faults.py 'embed:gen2:sleep=600' run CONFIG.toml
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Fault:
    stage: str
    slide_id: str
    mode: str


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, spec.split(";")):
        stage, slide_id, mode = item.split(":", 2)
        faults.append(Fault(stage, slide_id, mode))
    return faults


def _apply(fault: Fault) -> None:
    mode = fault.mode
    if mode == "exit" or mode.startswith("exit-after="):
        time.sleep(float(mode.split("=", 1)[1]) if "=" in mode else 0.25)
        os._exit(17)
    elif mode.startswith("exit-once="):
        marker = Path(mode.split("=", 1)[1])
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        time.sleep(0.25)
        os._exit(17)
    elif mode.startswith("sleep="):
        time.sleep(float(mode.split("=", 1)[1]))
    elif mode == "raise":
        raise RuntimeError(f"injected failure in {fault.stage} of {fault.slide_id}")
    else:
        raise ValueError(f"unknown fault mode {mode!r}")


class FaultyStage:
    """A stage function that misbehaves on the slides named in ``faults``, then runs ``fn``."""

    def __init__(self, fn: Any, faults: list[Fault]) -> None:
        self.fn = fn
        self.faults = faults

    def __call__(self, slide: Any, config: Any, state: Mapping[str, Any]) -> Any:
        for fault in self.faults:
            if fault.slide_id == slide.slide_id:
                _apply(fault)
        return self.fn(slide, config, state)


def faulty_stages(spec: str) -> dict[str, Any]:
    """Registered stage specs with faults injected, by name (for ``run_cohort(stages=...)``)."""
    from wsi_convnext.cohort import get_stage

    faults = parse_faults(spec)
    out = {}
    for name in dict.fromkeys(f.stage for f in faults):
        registered = get_stage(name)
        out[name] = replace(registered, fn=FaultyStage(registered.fn, [f for f in faults if f.stage == name]))
    return out


def install_on_workers(client: Any) -> None:
    """Make this module importable on every worker of ``client``, now and after restarts."""
    client.upload_file(__file__)


def main(argv: list[str]) -> None:
    from wsi_convnext.cli import app
    from wsi_convnext.cohort import register_stage

    for spec in faulty_stages(argv[0]).values():
        register_stage(spec, replace=True)
    app(argv[1:], prog_name="wsi-convnext")


if __name__ == "__main__":
    main(sys.argv[1:])
