"""masks.fit_mask: an inpainting mask is checked against its image once, before the model loads, and what the check
made (the mask at the image's size) is used for the composite, not made again."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vqdiff_cli import masks
from vqdiff_cli.cli import app
from vqdiff_cli.errors import UsageError
from vqdiff_cli.options import InpaintOptions


def test_fit_mask_checks_the_aspect_ratio_and_that_something_is_painted():
    with pytest.raises(UsageError, match="aspect ratios differ"):
        masks.fit_mask(np.ones((10, 30), bool), (20, 20))
    with pytest.raises(UsageError, match=r"the mask m\.png is empty"):
        masks.fit_mask(np.zeros((40, 40), bool), (20, 20), "the mask m.png")
    fitted = masks.fit_mask(Image.fromarray(np.full((40, 40), 255, np.uint8)), (20, 20))
    assert fitted.painted.shape == (40, 40) and fitted.at_image.shape == (20, 20) and fitted.image_size == (20, 20)


def count_resizes(monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    real = masks.mask_to_image_size

    def counting(mask, image_size):  # type: ignore[no-untyped-def]
        calls.append(image_size)
        return real(mask, image_size)

    monkeypatch.setattr(masks, "mask_to_image_size", counting)
    return calls


def test_a_fitted_mask_is_not_fitted_again(tiny_pipe, monkeypatch):
    photo = Image.fromarray(np.full((24, 32, 3), 90, np.uint8))
    painted = np.zeros((24, 32), bool)
    painted[:12] = True
    fitted = masks.fit_mask(painted, photo.size)
    calls = count_resizes(monkeypatch)
    setup = tiny_pipe.prepare_inpaint(photo, fitted, InpaintOptions(feather=0))
    assert calls == []
    assert (setup.alpha == fitted.at_image).all()
    tiny_pipe.prepare_inpaint(photo, painted, InpaintOptions(feather=0))  # a plain array is fitted here, once
    assert calls == [photo.size]


def test_the_inpaint_command_fits_the_mask_once(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "none.toml"))
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save("photo.png")
    mask = np.zeros((48, 64), np.uint8)  # twice the image's size: fitting it resizes
    mask[:20] = 255
    Image.fromarray(mask).save("mask.png")
    calls = count_resizes(monkeypatch)
    args = ["inpaint", "photo.png", "--mask", "mask.png", "--model", str(tiny.path), "--steps", "2", "--seed", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert calls == [(32, 24)]
