"""Inpainting and variations: the token-mask rule, the start step, kept tokens and pixels, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqdiff_cli import GenerateOptions
from vqdiff_cli.cli import app
from vqdiff_cli.config import SchedulerConfig
from vqdiff_cli.diffusion.sampler import start_step_for
from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule
from vqdiff_cli.errors import UsageError
from vqdiff_cli.masks import mask_to_image_size, mask_values, token_coverage, tokens_to_regenerate
from vqdiff_cli.options import InpaintOptions


def grid_for(mask: np.ndarray, mode: str, grow: int = 0, grid: tuple[int, int] = (8, 8)) -> np.ndarray:
    return tokens_to_regenerate(token_coverage(mask, grid), mode, grow)


# -- the token-mask rule on hand-made masks ---------------------------------------------------------------------


def test_one_pixel():
    mask = np.zeros((64, 64), bool)
    mask[20, 41] = True  # token row 2, column 5 (8 px tokens)
    expected = np.zeros((8, 8), bool)
    expected[2, 5] = True
    assert (grid_for(mask, "any") == expected).all()
    assert not grid_for(mask, "half").any()
    assert not grid_for(mask, "all").any()
    grown = grid_for(mask, "any", grow=1)
    assert grown.sum() == 9 and grown[1:4, 4:7].all()


def test_one_pixel_at_high_resolution_is_not_lost():
    """A painted pixel of a 1000 px image still marks its token: coverage is computed at the mask's resolution."""
    mask = np.zeros((1000, 1000), bool)
    mask[999, 0] = True
    marked = grid_for(mask, "any", grid=(32, 32))
    assert marked.sum() == 1 and marked[31, 0]


def test_thin_line():
    mask = np.zeros((64, 64), bool)
    mask[30, :] = True  # one pixel high, inside token row 3
    assert (grid_for(mask, "any") == np.eye(8, dtype=bool)[3][:, None].repeat(8, 1)).all()
    assert not grid_for(mask, "half").any()
    assert not grid_for(mask, "all").any()


def test_full_and_half_patches():
    mask = np.zeros((64, 64), bool)
    mask[8:16, 16:24] = True  # exactly token (1, 2)
    for mode in ("any", "half", "all"):
        marked = grid_for(mask, mode)
        assert marked.sum() == 1 and marked[1, 2], mode
    mask = np.zeros((64, 64), bool)
    mask[8:16, 20:28] = True  # the right half of (1, 2) and the left half of (1, 3)
    assert grid_for(mask, "any").sum() == 2
    assert grid_for(mask, "half").sum() == 2
    assert grid_for(mask, "all").sum() == 0


@pytest.mark.parametrize("mode", ["1", "L", "LA", "RGB", "RGBA", "P", "I;16"])
def test_every_image_mode(mode):
    white = np.zeros((16, 16), bool)
    white[4:8, 2:10] = True
    if mode == "RGBA":  # painted strokes are opaque on a transparent layer; the colour does not matter
        arr = np.zeros((16, 16, 4), np.uint8)
        arr[..., 3] = white * 255
        image = Image.fromarray(arr)
    elif mode == "LA":
        arr = np.zeros((16, 16, 2), np.uint8)
        arr[..., 1] = white * 255
        image = Image.merge("LA", [Image.fromarray(arr[..., 0]), Image.fromarray(arr[..., 1])])
    elif mode == "I;16":
        image = Image.fromarray((white * 65535).astype(np.uint16))
        assert image.mode.startswith("I")
    else:
        image = Image.fromarray(white.astype(np.uint8) * 255, "L").convert(mode)
    assert ((mask_values(image) >= 0.5) == white).all()


def test_opaque_rgba_uses_luminance():
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 3] = 255
    arr[2:4, 2:4, :3] = 255
    assert (mask_values(Image.fromarray(arr)) >= 0.5).sum() == 4


# -- masks of another size than the image ------------------------------------------------------------------------


def test_shrinking_a_mask_keeps_every_painted_pixel():
    rng = np.random.default_rng(0)
    for mh, mw, h, w in ((160, 160, 16, 16), (100, 75, 16, 12), (37, 50, 24, 32), (33, 33, 32, 32)):
        for y, x in zip(rng.integers(0, mh, 20), rng.integers(0, mw, 20), strict=True):
            mask = np.zeros((mh, mw), bool)
            mask[y, x] = True
            shrunk = mask_to_image_size(mask, (w, h))
            assert shrunk.shape == (h, w) and shrunk.sum() == 1
            assert shrunk[int((y + 0.5) * h / mh), int((x + 0.5) * w / mw)]
    full = np.ones((48, 64), bool)
    assert mask_to_image_size(full, (32, 24)).all()
    assert not mask_to_image_size(~full, (32, 24)).any()


def test_enlarging_a_mask_is_nearest_neighbour_as_before():
    rng = np.random.default_rng(1)
    mask = rng.random((12, 16)) > 0.5
    nearest = Image.fromarray(mask.astype(np.uint8) * 255).resize((44, 33), Image.Resampling.NEAREST)
    assert (mask_to_image_size(mask, (44, 33)) == (np.asarray(nearest) >= 128)).all()
    assert mask_to_image_size(mask, (16, 12)) is mask


def test_one_pixel_of_a_larger_mask_is_inpainted(tiny_pipe):
    """A 160x160 mask on a 16x16 image: its single white pixel marks one token and is composited."""
    image = Image.new("RGB", (16, 16), (200, 50, 50))
    mask = np.zeros((160, 160), bool)
    mask[57, 83] = True  # token (1, 2) of the 4x4 grid; pixel (5, 8) of the image
    setup = tiny_pipe.prepare_inpaint(image, mask, InpaintOptions(feather=0))
    expected = np.zeros((4, 4), bool)
    expected[1, 2] = True
    assert (setup.regenerate.numpy() == expected).all()
    assert setup.alpha is not None and setup.alpha.shape == (16, 16)
    assert setup.alpha[5, 8] == 1 and setup.alpha.sum() == 1
    as_image = Image.fromarray(mask.astype(np.uint8) * 255)
    assert (tiny_pipe.prepare_inpaint(image, as_image).regenerate.numpy() == expected).all()


def test_token_coverage_is_measured_at_the_mask_resolution(tiny_pipe):
    """40% of token (0, 0) painted at 160 px is not half, though shrinking the mask to 16 px would make it 50%."""
    image = Image.new("RGB", (16, 16), (20, 90, 160))
    mask = np.zeros((160, 160), bool)
    mask[0:16, 0:40] = True  # 16 of the token's 40 rows
    mask[120:, 120:] = True  # all of token (3, 3)
    half = tiny_pipe.prepare_inpaint(image, mask, InpaintOptions(mask_mode="half")).regenerate.numpy()
    assert half.sum() == 1 and half[3, 3]
    anywhere = tiny_pipe.prepare_inpaint(image, mask, InpaintOptions(mask_mode="any")).regenerate.numpy()
    assert anywhere.sum() == 2 and anywhere[0, 0] and anywhere[3, 3]


def test_prepare_edit_scales_a_16_bit_image(tiny_pipe):
    values = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    eight_bit = Image.fromarray(np.rint(values / 257).astype(np.uint8)).convert("RGB")
    source = tiny_pipe.prepare_edit(Image.fromarray(values))
    assert (np.asarray(source.original) == np.asarray(eight_bit)).all()
    assert torch.equal(source.tokens, tiny_pipe.prepare_edit(eight_bit).tokens)


# -- the start step ---------------------------------------------------------------------------------------------


def test_start_step_matches_the_schedule():
    schedule = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=4097, num_train_timesteps=100))
    for fraction in (0.0, 0.01, 0.1, 0.25, 0.5, 0.73, 0.99, 1.0):
        t = start_step_for(schedule, fraction)
        gaps = np.abs(schedule.cumprod_ct - fraction)
        assert gaps[t] == gaps.min()
    assert start_step_for(schedule, 0.5) in (49, 50)
    assert start_step_for(schedule, 1.0) == 99
    assert start_step_for(schedule, 0.0) == 0


def test_setup_start_step_and_override(tiny_pipe):
    image = Image.new("RGB", (16, 16), (200, 50, 50))
    mask = np.zeros((16, 16), bool)
    mask[:8, :] = True  # half the tokens
    setup = tiny_pipe.prepare_inpaint(image, mask)
    assert setup.masked_fraction == 0.5
    assert setup.start_step == start_step_for(tiny_pipe.schedule, 0.5)
    assert tiny_pipe.prepare_inpaint(image, mask, InpaintOptions(start_step=40)).start_step == 40
    with pytest.raises(UsageError, match="between 0 and 99"):
        tiny_pipe.prepare_inpaint(image, mask, InpaintOptions(start_step=100))


# -- sampling keeps what it should --------------------------------------------------------------------------------


@pytest.fixture
def photo() -> Image.Image:
    y, x = np.mgrid[0:24, 0:32]
    arr = np.stack([x * 7, y * 9, (x * y) % 255], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture
def painted() -> np.ndarray:
    mask = np.zeros((24, 32), bool)
    mask[4:16, 7:25] = True
    return mask


@pytest.mark.parametrize("mode", ["any", "half", "all"])
@pytest.mark.parametrize("known", ["restore", "renoise"])
def test_known_tokens_and_pixels_are_kept(tiny_pipe, photo, painted, mode, known):
    options = InpaintOptions(mask_mode=mode, known=known, feather=2)
    setup = tiny_pipe.prepare_inpaint(photo, painted, options)
    results = tiny_pipe.inpaint(
        photo, painted, "a red ball", GenerateOptions(seed=3, num_images=2, batch_size=2), options, trajectory=True
    )
    keep = ~setup.regenerate
    original = np.asarray(photo)
    outside = setup.alpha == 0
    assert outside.any() and (~outside).any()
    for result in results:
        assert torch.equal(result.tokens[keep], setup.tokens[keep])
        assert result.image.size == photo.size
        assert (np.asarray(result.image)[outside] == original[outside]).all()
    # restore: known tokens are in place after every step too; renoise re-draws them from q(x_s | x_0) on the way,
    # masked with probability gamma-bar_s (tests/test_schedule.py checks that law on many tokens)
    trajectory = results[0].trajectory.view(len(results[0].trajectory), -1)
    flat_keep = keep.flatten()
    original_known = setup.tokens.flatten()[flat_keep]
    on_the_way = trajectory[1:-1, flat_keep]
    if known == "restore":
        assert (trajectory[:, flat_keep] == original_known).all()
    else:
        assert (trajectory[0, flat_keep] == tiny_pipe.mask_id).any()  # the start draw, q(x_t | x_0)
        levels = tiny_pipe.schedule.cumprod_ct[list(results[0].timesteps[1:])]
        expected = float(levels.sum()) * len(original_known)
        assert 0.3 * expected < int((on_the_way == tiny_pipe.mask_id).sum()) < 3 * expected
        assert (trajectory[-1, flat_keep] == original_known).all()
    assert setup.regenerate.any()


def test_first_state_masks_exactly_the_token_mask(tiny_pipe, photo, painted):
    setup = tiny_pipe.prepare_inpaint(photo, painted)
    result = tiny_pipe.inpaint(photo, painted, "", GenerateOptions(seed=1, steps=5), trajectory=True)[0]
    first = result.trajectory[0]
    assert ((first == tiny_pipe.mask_id) == setup.regenerate).all()
    assert result.timesteps[0] == setup.start_step


def test_no_composite_returns_the_plain_decode(tiny_pipe, photo, painted):
    setup = tiny_pipe.prepare_inpaint(photo, painted, InpaintOptions(composite=False))
    assert setup.alpha is None
    result = tiny_pipe.inpaint(photo, painted, "", GenerateOptions(seed=1, steps=5), InpaintOptions(composite=False))[0]
    expected = tiny_pipe.decode(result.tokens[None])[0].resize(photo.size, Image.Resampling.LANCZOS)
    assert (np.asarray(result.image) == np.asarray(expected)).all()


def test_whole_image_mask_warns_and_starts_at_t_max(tiny_pipe, photo):
    setup = tiny_pipe.prepare_inpaint(photo, np.ones((24, 32), bool))
    assert setup.start_step == 99
    assert any("every token" in w for w in setup.warnings)


# -- variations ---------------------------------------------------------------------------------------------------


def test_strength_zero_returns_the_original_tokens(tiny_pipe, photo):
    source = tiny_pipe.prepare_edit(photo)
    result = tiny_pipe.vary(photo, "", 0.0, GenerateOptions(seed=4))[0]
    assert torch.equal(result.tokens, source.tokens)
    assert result.image.size == photo.size
    assert result.timesteps == ()


def test_strength_one_is_plain_generation(tiny_pipe, photo):
    varied = tiny_pipe.vary(photo, "a cat", 1.0, GenerateOptions(seed=4, steps=20))[0]
    generated = tiny_pipe.generate("a cat", GenerateOptions(seed=4, steps=20))[0]
    assert torch.equal(varied.tokens, generated.tokens)


def test_strength_sets_the_start(tiny_pipe, photo):
    result = tiny_pipe.vary(photo, "", 0.5, GenerateOptions(seed=4), trajectory=True)[0]
    assert result.timesteps[0] == round(0.5 * 99) == tiny_pipe.variation_start(0.5)
    assert result.timesteps == tuple(range(result.timesteps[0], -1, -1))
    masked = (result.trajectory[0] == tiny_pipe.mask_id).float().mean()
    assert 0 < masked < 1  # partly noised
    with pytest.raises(UsageError):
        tiny_pipe.vary(photo, "", 1.5)


# -- the commands and their errors --------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, photo, painted, monkeypatch, tiny):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQDIFF_MODEL", str(tiny.path))
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("VQDIFF_DEVICE", "cpu")  # the commands' results are compared with tiny_pipe's (CPU, float32)
    photo.save(tmp_path / "photo.png")
    Image.fromarray(painted.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("mode", ["any", "half", "all"])
def test_inpaint_command_keeps_tokens(files, tiny_pipe, photo, painted, mode):
    r = run(
        "inpaint",
        "photo.png",
        "--mask",
        "mask.png",
        "-p",
        "a red ball",
        "--mask-mode",
        mode,
        "--seed",
        "9",
        "--steps",
        "10",
        "--save-tokens",
        "t.npy",
        "--save-token-mask",
        "tm.png",
        "--feather",
        "0",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == ["photo-inpaint-9.png"]
    setup = tiny_pipe.prepare_inpaint(photo, painted, InpaintOptions(mask_mode=mode, feather=0))
    tokens = np.load(files / "t.npy")[0]
    keep = ~setup.regenerate.numpy()
    assert (tokens[keep] == setup.tokens.numpy()[keep]).all()
    token_mask = np.asarray(Image.open(files / "tm.png")) > 127
    assert (token_mask[::4, ::4] == setup.regenerate.numpy()).all()
    out = np.asarray(Image.open(files / "photo-inpaint-9.png"))
    assert out.shape == (24, 32, 3)
    assert (out[~painted] == np.asarray(photo)[~painted]).all()  # feather 0: every unpainted pixel is the original's
    info = run("info", "--json", "photo-inpaint-9.png")
    assert '"mode": "inpaint"' in info.stdout and f'"mask_mode": "{mode}"' in info.stdout
    rerun = run("generate", "--from-image", "photo-inpaint-9.png")
    assert rerun.exit_code == 2 and "made by `vqdiff inpaint`" in _error(rerun)


def test_vary_command(files, tiny_pipe, photo):
    """The command's tokens and images are the API's: the same seeds give the same variations, strength 0 the
    photo's own tokens."""
    r = run("vary", "photo.png", "--strength", "0.3", "--seed", "2", "-n", "2", "--save-tokens", "v.npy")
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == ["photo-vary-2.png", "photo-vary-3.png"]
    expected = tiny_pipe.vary(photo, "", 0.3, GenerateOptions(seed=2, num_images=2))
    assert (np.load(files / "v.npy") == np.stack([e.tokens.numpy() for e in expected])).all()
    for name, e in zip(r.stdout.split(), expected, strict=True):
        assert (np.asarray(Image.open(files / name)) == np.asarray(e.image)).all()
    r = run("vary", "photo.png", "--strength", "0", "--save-tokens", "zero.npy", "-o", "zero.png")
    assert r.exit_code == 0
    assert (np.load(files / "zero.npy")[0] == tiny_pipe.prepare_edit(photo).tokens.numpy()).all()
    r = run("vary", "photo.png", "--strength", "2")
    assert r.exit_code == 2


def _error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_error_paths(files):
    r = run("inpaint", "photo.png", "--mask", "nothere.png")
    assert r.exit_code == 2 and "image not found: nothere.png" in _error(r)
    (files / "junk.png").write_bytes(b"not an image")
    r = run("inpaint", "photo.png", "--mask", "junk.png")
    assert r.exit_code == 2 and "cannot read image junk.png" in _error(r)
    Image.new("L", (32, 24), 0).save(files / "empty.png")
    r = run("inpaint", "photo.png", "--mask", "empty.png")
    assert r.exit_code == 2 and "is empty" in _error(r)
    line = np.zeros((24, 32), np.uint8)
    line[10, :] = 255
    Image.fromarray(line).save(files / "line.png")
    r = run("inpaint", "photo.png", "--mask", "line.png", "--mask-mode", "all", "--steps", "2")
    assert r.exit_code == 2 and "covers no whole token with --mask-mode all" in _error(r)
    Image.new("L", (20, 20), 255).save(files / "square.png")
    r = run("inpaint", "photo.png", "--mask", "square.png")
    assert r.exit_code == 2 and "aspect ratios differ" in _error(r)
    Image.new("RGB", (3, 3)).save(files / "tiny.png")
    Image.new("L", (3, 3), 255).save(files / "tinymask.png")
    r = run("inpaint", "tiny.png", "--mask", "tinymask.png")
    assert r.exit_code == 2 and "must be at least 4x4" in _error(r)
    r = run("inpaint", "photo.png", "--mask", "mask.png", "--mask-mode", "most")
    assert r.exit_code == 2 and "unknown --mask-mode" in _error(r)
    r = run("inpaint", "photo.png", "--mask", "mask.png", "--known", "sometimes")
    assert r.exit_code == 2
    assert not list(files.glob("photo-inpaint-*"))


def test_mask_at_another_size_with_the_same_aspect(files, tiny_pipe, photo):
    """A 64x48 mask on the 32x24 photo: tokens outside its token mask and pixels outside its feathered, shrunk
    mask are the photo's."""
    big = np.zeros((48, 64), np.uint8)
    big[10:28, 18:38] = 255
    Image.fromarray(big).save(files / "big.png")
    r = run("inpaint", "photo.png", "--mask", "big.png", "--seed", "1", "--steps", "3", "--save-tokens", "t.npy")
    assert r.exit_code == 0, r.output
    setup = tiny_pipe.prepare_inpaint(photo, big > 127)
    keep = ~setup.regenerate.numpy()
    assert keep.any() and (~keep).any()
    assert (np.load(files / "t.npy")[0][keep] == setup.tokens.numpy()[keep]).all()
    outside = setup.alpha == 0
    assert outside.any() and (~outside).any()
    assert (np.asarray(Image.open(files / "photo-inpaint-1.png"))[outside] == np.asarray(photo)[outside]).all()
    expected = tiny_pipe.inpaint(photo, big > 127, "", GenerateOptions(seed=1, steps=3))[0]
    assert (np.asarray(Image.open(files / "photo-inpaint-1.png")) == np.asarray(expected.image)).all()


def test_thin_stroke_on_a_larger_mask_and_a_huge_feather(files):
    """A 320x240 mask with one white pixel on the 32x24 photo is not 'empty'; --feather 100000000 ends."""
    big = np.zeros((240, 320), np.uint8)
    big[100, 170] = 255  # token (1, 2) of the 4x4 grid
    Image.fromarray(big).save(files / "stroke.png")
    r = run(
        "inpaint",
        "photo.png",
        "--mask",
        "stroke.png",
        "--seed",
        "1",
        "--steps",
        "3",
        "--feather",
        "100000000",
        "--save-token-mask",
        "tm.png",
    )
    assert r.exit_code == 0, r.output
    token_mask = saved_token_mask(files / "tm.png")
    expected = np.zeros((4, 4), bool)
    expected[1, 2] = True
    assert (token_mask == expected).all()


def test_16_bit_image_command(files, photo):
    grey = np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)
    Image.fromarray(grey).save(files / "grey16.png")
    Image.fromarray(np.rint(grey / 257).astype(np.uint8)).save(files / "grey8.png")
    for name in ("grey16", "grey8"):
        r = run("vary", f"{name}.png", "--strength", "0", "--save-tokens", f"{name}.npy", "-o", f"{name}-out.png")
        assert r.exit_code == 0, r.output
    assert (np.load(files / "grey16.npy") == np.load(files / "grey8.npy")).all()


def test_whole_mask_warns(files, tiny_pipe):
    """A mask over every token is plain generation from the prompt, as the warning says: generate's tokens."""
    Image.new("L", (32, 24), 255).save(files / "all.png")
    r = run(
        "inpaint",
        "photo.png",
        "--mask",
        "all.png",
        "-p",
        "a cat",
        "--seed",
        "1",
        "--steps",
        "3",
        "--save-tokens",
        "t.npy",
    )
    assert r.exit_code == 0
    assert "warning: the mask covers every token" in r.stderr
    generated = tiny_pipe.generate("a cat", GenerateOptions(seed=1, steps=3))[0]
    assert (np.load(files / "t.npy")[0] == generated.tokens.numpy()).all()


@pytest.mark.parametrize("known", ["restore", "renoise"])
def test_fast_sampler_keeps_known_tokens_and_pixels(tiny_pipe, photo, painted, known):
    options = InpaintOptions(known=known, feather=2)
    setup = tiny_pipe.prepare_inpaint(photo, painted, options)
    results = tiny_pipe.inpaint(
        photo, painted, "a red ball", GenerateOptions(seed=5, num_images=2, sampler="fast"), options
    )
    keep = ~setup.regenerate
    outside = setup.alpha == 0
    for result in results:
        assert torch.equal(result.tokens[keep], setup.tokens[keep])
        assert (np.asarray(result.image)[outside] == np.asarray(photo)[outside]).all()


def test_fast_sampler_variations(tiny_pipe, photo):
    source = tiny_pipe.prepare_edit(photo)
    fast = GenerateOptions(seed=4, steps=20, sampler="fast")
    assert torch.equal(tiny_pipe.vary(photo, "", 0.0, fast)[0].tokens, source.tokens)
    varied = tiny_pipe.vary(photo, "a cat", 1.0, fast)[0]
    assert torch.equal(varied.tokens, tiny_pipe.generate("a cat", fast)[0].tokens)
    assert tiny_pipe.vary(photo, "", 0.5, fast)[0].tokens.shape == (4, 4)


def test_command_measures_coverage_at_the_mask_resolution(files):
    """Token (0, 0) is 40% painted on the 320x240 mask (50% if the mask were shrunk to 32x24 first): not half."""
    big = np.zeros((240, 320), np.uint8)
    big[0:24, 0:80] = 255  # 24 of token (0, 0)'s 60 rows
    big[180:, 240:] = 255  # all of token (3, 3)
    Image.fromarray(big).save(files / "partial.png")
    r = run(
        "inpaint",
        "photo.png",
        "--mask",
        "partial.png",
        "--mask-mode",
        "half",
        "--steps",
        "2",
        "--save-token-mask",
        "tm.png",
    )
    assert r.exit_code == 0, r.output
    token_mask = saved_token_mask(files / "tm.png")
    expected = np.zeros((4, 4), bool)
    expected[3, 3] = True
    assert (token_mask == expected).all()


def saved_token_mask(path: Path) -> np.ndarray:
    """The (4, 4) token mask of `--save-token-mask` (a 16 px image, 4 px a token)."""
    return np.asarray(Image.open(path))[::4, ::4] > 127


def test_steps_keep_their_density_from_a_partial_start(files, tiny_pipe, photo, painted):
    """README: `--steps 50` from t = 49 visits 25 timesteps (every other one), as it visits every other one of 100."""
    expected = GenerateOptions(steps=50).timesteps(100, start=49)
    assert len(expected) == 25 and expected[0] == 49 and expected[-1] == 0
    assert {a - b for a, b in itertools.pairwise(expected)} <= {2, 3}
    assert GenerateOptions(steps=100).timesteps(100, start=49) == tuple(range(49, -1, -1))
    assert GenerateOptions(stride=10).timesteps(100, start=49) == (49, 39, 29, 19, 9, 0)
    result = tiny_pipe.inpaint(photo, painted, "", GenerateOptions(seed=1, steps=50), InpaintOptions(start_step=49))
    assert result[0].timesteps == expected
    r = run("inpaint", "photo.png", "--mask", "mask.png", "--start-step", "49", "--steps", "50", "--json")
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    assert settings["timesteps"] == list(expected) and settings["num_steps"] == 25
    r = run("vary", "photo.png", "--strength", "0.5", "--steps", "50", "--json", "-o", "v.png")
    assert r.exit_code == 0, r.output
    visited = json.loads(r.stdout)["settings"]["timesteps"]
    assert visited[0] == 50 and len(visited) in (25, 26)  # 51 levels at the density of 50 in 100


def test_a_non_square_image_is_stretched_with_a_warning(files, tiny_pipe):
    """README: a non-square image is stretched (not cropped) to the model's square, with a warning, and the result
    comes back at the image's size; a nearly square one (ratio up to 1.25) is stretched without one."""
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 40, 3), dtype=np.uint8))
    source = tiny_pipe.prepare_edit(wide)
    assert source.warnings == ["the 40x16 image is stretched to 16x16 for the model and back afterwards"]
    assert (np.asarray(source.native) == np.asarray(wide.resize((16, 16), Image.Resampling.LANCZOS))).all()
    assert tiny_pipe.prepare_edit(Image.new("RGB", (20, 16))).warnings == []
    wide.save(files / "wide.png")
    mask = np.zeros((16, 40), np.uint8)
    mask[:, :20] = 255
    Image.fromarray(mask).save(files / "wide-mask.png")
    for args in (["inpaint", "wide.png", "--mask", "wide-mask.png"], ["vary", "wide.png", "--strength", "0.4"]):
        r = run(*args, "--steps", "3", "--seed", "1", "-o", f"{args[0]}-out.png")
        assert r.exit_code == 0, r.output
        assert "warning: the 40x16 image is stretched to 16x16 for the model and back afterwards" in r.stderr
        assert Image.open(files / f"{args[0]}-out.png").size == (40, 16)


@pytest.mark.parametrize("edit", ["inpaint-restore", "inpaint-renoise", "vary"])
def test_reference_sampler_edit_alone_equals_in_a_batch(tiny_pipe, photo, painted, edit):
    """Image i of a batch (seed S + i) is the image made alone with seed S + i, start draw and re-noising included."""

    def run(options: GenerateOptions):
        if edit == "vary":
            return tiny_pipe.vary(photo, "a red ball", 0.6, options)
        known = InpaintOptions(known=edit.removeprefix("inpaint-"))
        return tiny_pipe.inpaint(photo, painted, "a red ball", options, known)

    batch = run(GenerateOptions(seed=30, num_images=3, batch_size=3, sampler="reference", steps=12))
    assert [r.seed for r in batch] == [30, 31, 32]
    assert not torch.equal(batch[0].tokens, batch[1].tokens) or not torch.equal(batch[1].tokens, batch[2].tokens)
    for r in batch:
        alone = run(GenerateOptions(seed=r.seed, sampler="reference", steps=12))[0]
        assert torch.equal(alone.tokens, r.tokens), r.seed
        assert (np.asarray(alone.image) == np.asarray(r.image)).all()
