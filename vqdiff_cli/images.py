"""The one module that knows pixels and image/token files: PIL <-> tensors, PNG output, token grids as .npy."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import UsageError, excerpt
from .files import atomic_write

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def _reading(path: Path, kind: str) -> Iterator[None]:
    """Turn the ways reading a file fails into one-line usage errors naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise UsageError(f"{kind} not found: {excerpt(path)}") from None
    except IsADirectoryError:
        raise UsageError(f"{excerpt(path)} is a directory, not {'an' if kind[0] in 'aeiou' else 'a'} {kind}") from None
    except (UnidentifiedImageError, OSError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read {kind} {excerpt(path)}: {e}") from None


def open_image(path: Path | str) -> Image.Image:
    """Read any image Pillow knows, fully, or raise a UsageError naming the file."""
    path = Path(path)
    with _reading(path, "image"), Image.open(path) as im:
        im.load()
        return im.copy()


INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
INT32_MAX = 2**31 - 1


def float_scale(values: np.ndarray) -> float:
    """The value that means white in a float ("F") image: 1.0 when every value is at most 1 (0..1 data), else 255."""
    return 1.0 if not values.size or float(np.nanmax(values)) <= 1.0 else 255.0


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB, with high-bit-depth greyscale scaled down rather than clipped.

    Pillow's own conversion clips 16-bit, 32-bit and float values to 0..255, so a 16-bit image turns almost white.
    Instead: I;16 (16-bit) values are divided by 257 (65535 -> 255); "I" (32-bit integer) values are read as
    16-bit when none exceeds 65535 (a 16-bit PNG or TIFF read as "I"), otherwise over 0..2**31-1; "F" (float)
    values are read as 0..1 when none exceeds 1, otherwise as 0..255, like float masks (`mask_values`). Negative
    values and NaN become black, values above the range white; the result is rounded to the nearest 8-bit level.
    Every other mode is converted by Pillow (alpha is dropped; `load_rgb` flattens it onto white first).
    """
    if image.mode in INT16_MODES or image.mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        if image.mode == "F":
            top = float_scale(values)
        elif image.mode == "I" and values.size and values.max() > 65535:
            top = float(INT32_MAX)
        else:
            top = 65535.0
        grey = np.rint(np.clip(values / top, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path | str) -> Image.Image:
    """Read an image as 8-bit RGB: transparency is flattened onto white, high bit depths are scaled (`to_rgb`)."""
    im = open_image(path)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return to_rgb(im)


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and crop the centre to size x size."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.LANCZOS) if (new_w, new_h) != (w, h) else image
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return resized.crop((left, top, left + size, top + size))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    import torch

    arrays = np.stack([np.asarray(to_rgb(im), dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) decoder output -> PIL images: (x/2 + 0.5) clamped to [0, 1], then rounded to 8 bits."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype("uint8")]


def png_bytes(image: Image.Image, text: Mapping[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: Path, text: Mapping[str, str] | None = None, overwrite: bool = False) -> None:
    data = png_bytes(image, text)
    atomic_write(Path(path), lambda f: f.write(data), overwrite=overwrite)


def save_tokens(tokens: np.ndarray, path: Path, overwrite: bool = False) -> None:
    """Integer token grids as .npy: (N, H, W) for images, (steps + 1, N, H, W) for trajectories."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens.astype(np.int64)))
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()), overwrite=overwrite)


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def _not_npy(path: Path, head: bytes) -> UsageError:
    """The error for a token file that is not a .npy file, naming what it is where that is easy to tell."""
    if not head:
        what, hint = "not a .npy file (it is empty)", None
    elif head.startswith(ZIP_MAGIC):
        what, hint = "not a .npy array (an .npz archive)", "extract one array and write it with numpy.save"
    else:
        what, hint = "not a .npy file", "token grids are .npy arrays, as written by `vqdiff encode` or --save-tokens"
        with contextlib.suppress(Exception), Image.open(path) as im:
            what = f"not a .npy file (a {im.format} image)"
            hint = "make token grids from images with `vqdiff encode`"
    return UsageError(f"cannot read token file {excerpt(path)}: {what}", hint=hint)


def load_tokens(path: Path | str) -> np.ndarray:
    """A .npy of integer token grids, (H, W) or (N, H, W); returned as (N, H, W) int64.

    Only plain .npy arrays are read (never with pickling): an .npz archive, an image or any other file, and a .npy
    of Python objects are usage errors that say so.
    """
    path = Path(path)
    with _reading(path, "token file"), path.open("rb") as f:
        head = f.read(len(NPY_MAGIC))
        if head != NPY_MAGIC:
            raise _not_npy(path, head)
        f.seek(0)
        try:
            arr: np.ndarray = np.load(f, allow_pickle=False)
        except ValueError as e:
            if "pickle" not in str(e):
                raise
            raise UsageError(f"{excerpt(path)} holds Python objects; token grids must be integers") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise UsageError(f"{excerpt(path)} holds {arr.dtype} values; token grids must be integers")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise UsageError(f"{excerpt(path)} has shape {arr.shape}; expected (H, W) or (N, H, W) token grids")
    return arr.astype(np.int64)


def read_png_text(path: Path | str) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, without decoding its pixels."""
    path = Path(path)
    with _reading(path, "image"), Image.open(path) as im:
        if im.format != "PNG":
            raise UsageError(f"{excerpt(path)} is a {im.format} image; metadata is read from PNG files")
        im.load()  # text chunks after the image data are read on load
        return {str(k): str(v) for k, v in getattr(im, "text", {}).items()}


MASK_GREY = (128, 128, 128)


def grey_out(image: Image.Image, masked: np.ndarray, factor: int) -> Image.Image:
    """Paint the pixel patch of every masked token (an (h, w) bool grid) a neutral grey."""
    if not masked.any():
        return image
    pixels = np.asarray(image.convert("RGB")).copy()
    patch = np.kron(masked.astype(np.uint8), np.ones((factor, factor), dtype=np.uint8)).astype(bool)
    pixels[patch] = MASK_GREY
    return Image.fromarray(pixels)


def save_gif(
    frames: list[Image.Image], path: Path, frame_ms: int = 80, hold_ms: int = 1500, overwrite: bool = False
) -> None:
    """An animated GIF that loops, holding the last frame a little longer."""
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    buf = io.BytesIO()
    frames[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=durations,
        loop=0,
        optimize=False,
        disposal=1,
    )
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()), overwrite=overwrite)
