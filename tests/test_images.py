"""images.py: feathering and dilation that end, high-bit-depth images, and token files that are not .npy arrays."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vqdiff_cli.cli import app
from vqdiff_cli.errors import UsageError
from vqdiff_cli.images import load_rgb, load_tokens, to_rgb, to_tensor
from vqdiff_cli.masks import dilate, feather, mask_values, tokens_to_regenerate


def finishes(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    """fn()'s result, failing the test (instead of hanging it) when fn runs longer than `seconds`."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    return result[0]


# -- feather and dilate -------------------------------------------------------------------------------------------


def chebyshev_feather(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The documented rule, by brute force: 1 - d / (pixels + 1) at chessboard distance d <= pixels, else 0."""
    ys, xs = np.nonzero(mask)
    alpha = np.zeros(mask.shape, np.float32)
    if not len(ys):
        return alpha
    for y, x in np.ndindex(*mask.shape):
        d = int(np.max(np.stack([np.abs(ys - y), np.abs(xs - x)]), axis=0).min())
        if d <= pixels:
            alpha[y, x] = 1.0 - d / (pixels + 1)
    return alpha


@pytest.fixture
def blobs() -> np.ndarray:
    mask = np.zeros((12, 20), bool)
    mask[2:4, 3:6] = True
    mask[9, 17] = True
    return mask


@pytest.mark.parametrize("pixels", [0, 1, 2, 4, 7, 19, 20, 50])
def test_feather_follows_the_ring_rule(blobs, pixels):
    assert (feather(blobs, pixels) == chebyshev_feather(blobs, pixels)).all()


def test_feather_of_a_huge_width_stops_when_the_image_is_covered(blobs):
    pixels = 100_000_000
    alpha = finishes(lambda: feather(blobs, pixels))
    assert (alpha == chebyshev_feather(blobs, pixels)).all()
    assert (alpha > 0).all()  # every pixel is within the feather
    assert (finishes(lambda: feather(np.zeros((16, 16), bool), pixels)) == 0).all()  # an empty mask stays empty


def test_dilate_and_grow_stop_when_nothing_changes():
    grid = np.zeros((4, 4), bool)
    grid[0, 0] = True
    assert finishes(lambda: dilate(grid, 100_000_000)).all()
    assert not finishes(lambda: dilate(np.zeros((4, 4), bool), 100_000_000)).any()
    coverage = grid.astype(float)
    assert finishes(lambda: tokens_to_regenerate(coverage, "any", 100_000_000)).all()
    assert dilate(grid, 2).sum() == 9 and dilate(grid, 2)[:3, :3].all()  # small steps as before


# -- high-bit-depth images ----------------------------------------------------------------------------------------


def grey_of(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image)
    assert image.mode == "RGB" and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    return rgb[..., 0]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    grey = grey_of(load_rgb(tmp_path / "g16.png"))
    assert (grey == np.rint(values / 257)).all()
    assert grey.min() == 0 and grey.max() == 255 and 120 <= np.median(grey) <= 135  # not almost white


def test_32_bit_integer_images(tmp_path):
    values = np.linspace(0, 65535, 64).round().astype(np.int32).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "i.tif")
    image = Image.open(tmp_path / "i.tif")
    assert image.mode == "I"
    assert (grey_of(load_rgb(tmp_path / "i.tif")) == np.rint(values / 257)).all()  # the 16-bit range
    wide = np.array([[-5, 0, 2**30, 2**31 - 1]], np.int32)
    assert grey_of(to_rgb(Image.fromarray(wide))).tolist() == [[0, 0, 128, 255]]  # the int32 range


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),  # 0..1
        ([0.0, 0.5, 128.0, 255.0], [0, 0, 128, 255]),  # 0..255
        ([-1.0, np.nan, 300.0, 2.0], [0, 0, 255, 2]),  # out of range: clipped; NaN: black
    ],
)
def test_float_images(tmp_path, values, expected):
    image = Image.fromarray(np.array([values], np.float32))
    assert image.mode == "F"
    assert grey_of(to_rgb(image)).tolist() == [expected]
    image.save(tmp_path / "f.tif")
    assert grey_of(load_rgb(tmp_path / "f.tif")).tolist() == [expected]


def test_float_masks_use_the_same_rule():
    ones = np.array([[0.0, 0.4, 0.6, 1.0]], np.float32)
    assert (mask_values(Image.fromarray(ones)) >= 0.5).tolist() == [[False, False, True, True]]
    assert (mask_values(Image.fromarray(ones * 255)) >= 0.5).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "RGBA", "LA"])
def test_8_bit_images_are_unchanged(tmp_path, mode):
    y, x = np.mgrid[0:8, 0:8]
    rgb = Image.fromarray(np.stack([x * 30, y * 30, (x + y) * 15], axis=-1).astype(np.uint8))
    image = rgb.convert(mode)
    assert (np.asarray(to_rgb(image)) == np.asarray(image.convert("RGB"))).all()
    image.save(tmp_path / "a.tiff")
    if mode not in ("RGBA", "LA"):  # (load_rgb flattens transparency onto white)
        assert (np.asarray(load_rgb(tmp_path / "a.tiff")) == np.asarray(image.convert("RGB"))).all()


def test_to_tensor_scales_16_bit_images():
    values = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    expected = to_tensor([Image.fromarray(np.rint(values / 257).astype(np.uint8)).convert("RGB")])
    assert (to_tensor([Image.fromarray(values)]) == expected).all()


# -- token files --------------------------------------------------------------------------------------------------


def read_error(path: Path) -> UsageError:
    with pytest.raises(UsageError) as info:
        load_tokens(path)
    assert "pickle" not in str(info.value) and "pickle" not in (info.value.hint or "")
    return info.value


def test_token_files_that_are_not_npy_arrays(tmp_path):
    np.savez(tmp_path / "t.npz", np.zeros((4, 4), np.int64))
    error = read_error(tmp_path / "t.npz")
    assert str(error) == f"cannot read token file {tmp_path / 't.npz'}: not a .npy array (an .npz archive)"
    assert error.hint and "numpy.save" in error.hint
    Image.new("RGB", (4, 4)).save(tmp_path / "p.png")
    assert str(read_error(tmp_path / "p.png")).endswith("p.png: not a .npy file (a PNG image)")
    (tmp_path / "junk.npy").write_bytes(b"neither this nor that")
    assert str(read_error(tmp_path / "junk.npy")).endswith("junk.npy: not a .npy file")
    (tmp_path / "empty.npy").write_bytes(b"")
    assert str(read_error(tmp_path / "empty.npy")).endswith("empty.npy: not a .npy file (it is empty)")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "holds Python objects; token grids must be integers" in str(read_error(tmp_path / "objects.npy"))
    (tmp_path / "cut.npy").write_bytes((b"\x93NUMPY" + bytes(200))[:20])
    assert "cannot read token file" in str(read_error(tmp_path / "cut.npy"))


def test_token_files_still_read(tmp_path):
    grid = np.arange(16, dtype=np.int32).reshape(4, 4)
    np.save(tmp_path / "g.npy", grid)
    assert load_tokens(tmp_path / "g.npy").tolist() == [grid.tolist()]
    np.save(tmp_path / "f.npy", grid.astype(float))
    with pytest.raises(UsageError, match="float64 values"):
        load_tokens(tmp_path / "f.npy")


def test_decode_command_names_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "none.toml"))
    np.savez(tmp_path / "t.npz", np.zeros((4, 4), np.int64))
    Image.new("RGB", (4, 4)).save(tmp_path / "p.png")
    for name, what in (("t.npz", "not a .npy array (an .npz archive)"), ("p.png", "not a .npy file (a PNG image)")):
        result = CliRunner().invoke(app, ["decode", name])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and f"cannot read token file {name}: {what}" in lines[0], result.stderr
        assert "Traceback" not in result.output and "AttributeError" not in result.output
