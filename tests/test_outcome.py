"""The one result shape (Outcome) and the one "run this, record a failure" helper (attempt)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from wsi_convnext.errors import NoTissueError
from wsi_convnext.outcome import MAX_ERROR, Outcome, attempt, failure_fields


@dataclass(frozen=True)
class _Result(Outcome):
    name: str
    tiles: int = 0


def test_attempt_returns_the_value_or_a_one_line_failure() -> None:
    ok = attempt(lambda x: x * 2, 21, what="double")
    assert not ok.failed and ok.value == 42 and ok.seconds >= 0

    def boom() -> None:
        raise NoTissueError("slide.svs: no tissue found\n  try --min-tissue 0.1\n" + "x" * 2000)

    bad = attempt(boom, what="tile of slide")
    assert bad.failed and bad.value is None
    assert bad.failure is not None
    assert bad.failure["status"] == "failed" and bad.failure["error_type"] == "NoTissueError"
    assert "\n" not in bad.failure["error"] and len(bad.failure["error"]) == MAX_ERROR
    assert bad.failure["error"].startswith("slide.svs: no tissue found try --min-tissue 0.1")
    # Any result type built on Outcome takes the failure's fields as they are.
    r = _Result("s1", **bad.failure)
    assert r.failed and r.error_type == "NoTissueError" and r.tiles == 0


def test_attempt_records_unexpected_errors_and_lets_interrupts_through() -> None:
    a = attempt(lambda: {}["missing"], what="lookup")
    assert a.failure is not None and a.failure["error_type"] == "KeyError" and a.failure["error"] == "'missing'"

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attempt(interrupted, what="interrupted")


def test_outcome_status_is_checked_and_fields_are_keyword_only() -> None:
    with pytest.raises(ValueError, match="status must be one of done, skipped, failed"):
        _Result("s", status="exploded")
    assert _Result("s", tiles=3).status == "done"
    f = failure_fields(RuntimeError(""), 1.5)
    assert f == {"status": "failed", "error_type": "RuntimeError", "error": "RuntimeError('')", "seconds": 1.5}
