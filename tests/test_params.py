"""Parameter objects that validate themselves (wsi_convnext.params)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from wsi_convnext.errors import ConfigError
from wsi_convnext.params import ParameterError, at_least, check_params, fraction, one_of, param, positive_finite


@dataclass(frozen=True)
class _Params:
    size: int = param(8, check=at_least(8), doc="edge in px")
    share: float = param(0.5, check=fraction)
    mpp: float | None = param(None, check=positive_finite)
    kind: str = param("a", check=one_of(lambda: _KINDS))

    def __post_init__(self) -> None:
        check_params(self)


_KINDS = ["a", "b"]


def test_a_bad_value_is_a_parameter_error_that_front_ends_can_name() -> None:
    with pytest.raises(ParameterError) as info:
        _Params(size=4)
    exc = info.value
    assert isinstance(exc, ConfigError) and isinstance(exc, ValueError)
    assert (exc.name, exc.problem, exc.value) == ("size", "must be at least 8", 4)
    assert str(exc) == "size must be at least 8, got 4"
    assert exc.as_flag() == "--size must be at least 8, got 4"
    assert exc.render("'tile.size'") == "'tile.size' must be at least 8, got 4"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"share": 1.5}, "must be between 0 and 1"),
        ({"mpp": float("inf")}, "must be positive and finite"),
        ({"mpp": 0}, "must be positive and finite"),
        ({"size": True}, "must be at least 8"),  # a bool is not a number here
        ({"kind": "c"}, "must be one of 'a', 'b'"),
    ],
)
def test_checks(kwargs: dict, problem: str) -> None:
    with pytest.raises(ParameterError, match=problem):
        _Params(**kwargs)


def test_numpy_numbers_and_none_pass_and_choices_are_read_each_time() -> None:
    assert _Params(size=np.int64(16), share=np.float32(0.25)).size == 16
    assert _Params(mpp=None).mpp is None
    _KINDS.append("c")
    try:
        assert _Params(kind="c").kind == "c"
    finally:
        _KINDS.remove("c")
