"""Tests for wsi_convnext._io: the one canonical-JSON hash (atomic writes are tested with their users)."""

from __future__ import annotations

import hashlib
import json

from wsi_convnext._io import json_sha256


def test_json_sha256_is_sha256_of_sorted_json() -> None:
    obj = {"b": [1, 2.5, (3, 4)], "a": {"y": None, "x": "s"}}
    want = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    assert json_sha256(obj) == want
    assert json_sha256(obj, 16) == want[:16]
    assert json_sha256({"a": {"x": "s", "y": None}, "b": [1, 2.5, [3, 4]]}) == want  # key order, tuples


def test_json_sha256_rounds_floats_only_when_asked() -> None:
    noisy, clean = {"alpha": 0.1 + 0.2, "k": [1e-9]}, {"alpha": 0.3, "k": [0.0]}
    assert json_sha256(noisy) != json_sha256(clean)
    assert json_sha256(noisy, 8, round_floats=6) == json_sha256(clean, 8, round_floats=6)
    # Transform keys (features/<encoder>-<transform key>) stay what they were before the helper.
    assert json_sha256({"alpha": 1.0, "beta": 0.15}, 8, round_floats=6) == "%s" % hashlib.sha256(
        b'{"alpha": 1.0, "beta": 0.15}'
    ).hexdigest()[:8]


def test_json_sha256_writes_what_json_cannot_hold_with_str() -> None:
    from pathlib import Path

    assert json_sha256({"p": Path("a/b")}) == json_sha256({"p": "a/b"})
