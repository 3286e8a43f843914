"""Tests for wsi_convnext._image: the one image → uint8 RGB conversion."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_convnext._image import rgb_uint8
from wsi_convnext.errors import ConfigError


def test_uint16_rounds_to_nearest() -> None:
    v = np.arange(0, 65536, dtype=np.uint16)
    rgb, transparent = rgb_uint8(np.repeat(v[None, :, None], 3, axis=2))
    assert transparent is None and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, :, 0], np.round(v / 257.0).astype(np.uint8))
    assert rgb[0, 128, 0] == 0 and rgb[0, 129, 0] == 1 and rgb[0, -1, 0] == 255


def test_float_grey_bool_and_int_inputs() -> None:
    f = np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)
    assert rgb_uint8(f)[0][0, :, 0].tolist() == [0, 128, 255, 255]  # [0, 1] floats, NaN is white
    assert rgb_uint8(f * 255)[0][0, :, 0].tolist() == [0, 128, 255, 255]  # 0-255 floats
    assert rgb_uint8(np.array([[True, False]]))[0][0, :, 1].tolist() == [255, 0]
    assert rgb_uint8(np.array([[-5, 300]], np.int64))[0][0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_alpha_composited_over_white_exactly() -> None:
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, 3] = [0, 128, 255]
    rgb, transparent = rgb_uint8(rgba)
    # round(x * a / 255 + 255 * (1 - a / 255)) with x = 0
    assert rgb[0, :, 0].tolist() == [255, 127, 0]
    assert transparent is not None and transparent.tolist() == [[True, False, False]]
    grey_alpha = np.dstack([np.full((1, 2), 10, np.uint8), np.array([[255, 255]], np.uint8)])
    rgb, transparent = rgb_uint8(grey_alpha)
    assert transparent is None and rgb.tolist() == [[[10, 10, 10], [10, 10, 10]]]


def test_uint8_rgb_is_passed_through_and_bad_inputs_name_the_image() -> None:
    a = np.full((2, 2, 3), 7, np.uint8)
    assert rgb_uint8(a)[0] is a
    with pytest.raises(ConfigError, match=r"^thumb must be an \(H, W, 3\) RGB"):
        rgb_uint8(np.zeros((2, 2, 5), np.uint8), "thumb")
    with pytest.raises(ConfigError, match="thumb must hold"):
        rgb_uint8(np.zeros((2, 2, 3), complex), "thumb")
