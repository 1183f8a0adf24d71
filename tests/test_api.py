"""The Python API: seeds, batches, trajectories, encode/decode, option validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff_cli import GenerateOptions
from vqdiff_cli.errors import UsageError

from .compare import HALF_LOG_P_TOLERANCE, HALF_PIXEL_TOLERANCE, agreement, half_log_p_error


def test_image_in_a_batch_equals_the_same_seed_alone(tiny_pipe):
    batch = tiny_pipe.generate(["a cat", "a dog"], GenerateOptions(seed=10, num_images=2, batch_size=3))
    assert [r.seed for r in batch] == [10, 11, 12, 13]
    assert [r.prompt for r in batch] == ["a cat", "a cat", "a dog", "a dog"]
    for r in batch:
        alone = tiny_pipe.generate(r.prompt, GenerateOptions(seed=r.seed))[0]
        assert torch.equal(alone.tokens, r.tokens)
    assert not torch.equal(batch[0].tokens, batch[1].tokens)


def test_each_prompt_is_encoded_once_and_only_while_its_images_run(tiny_pipe, monkeypatch):
    encode = tiny_pipe._encode_prompts
    calls: list[list[str]] = []

    def counting(prompts):
        calls.append(list(prompts))
        return encode(prompts)

    monkeypatch.setattr(tiny_pipe, "_encode_prompts", counting)
    prompts = ["a cat", "a dog", "a hat"]
    results = list(tiny_pipe.generate_iter(prompts, GenerateOptions(seed=1, steps=2, num_images=3, batch_size=2)))
    assert [r.prompt for r in results] == [p for p in prompts for _ in range(3)]
    assert calls == [["a cat"], ["a dog"], ["a hat"]]  # batches: cat cat | cat dog | dog dog | hat hat | hat


def test_random_seed_is_reported_and_reproduces(tiny_pipe):
    first = tiny_pipe.generate("a hat", GenerateOptions(steps=20))[0]
    again = tiny_pipe.generate("a hat", GenerateOptions(steps=20, seed=first.seed))[0]
    assert torch.equal(first.tokens, again.tokens)


def test_no_global_rng_is_touched(tiny_pipe):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    tiny_pipe.generate("a hat", GenerateOptions(seed=0, steps=5))
    assert torch.equal(torch.rand(3), before)


def test_trajectory_and_progress(tiny_pipe):
    events = []
    out = tiny_pipe.generate("a red ball", GenerateOptions(seed=2, stride=10), trajectory=True, on_step=events.append)[
        0
    ]
    assert out.timesteps == (99, 89, 79, 69, 59, 49, 39, 29, 19, 9, 0)
    assert out.trajectory.shape == (12, 4, 4)
    assert (out.trajectory[0] == 16).all()  # all masked before the first step
    assert torch.equal(out.trajectory[-1], out.tokens)
    assert (out.tokens < 16).all()
    assert [e.step for e in events] == list(range(1, 12))
    assert [e.timestep for e in events] == list(out.timesteps)


def test_single_step_goes_straight_to_x0(tiny_pipe):
    out = tiny_pipe.generate("a red ball", GenerateOptions(seed=2, steps=1), trajectory=True)[0]
    assert out.timesteps == (99,)
    assert (out.tokens < 16).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"stride": 0},
        {"steps": 3, "stride": 2},
        {"guidance_scale": -1.0},
        {"guidance_scale": float("inf")},
        {"guidance_scale": float("nan")},
        {"guidance_scale": 1e300},
        {"truncation_rate": 0.0},
        {"truncation_rate": 1.5},
        {"num_images": 0},
        {"batch_size": 0},
        {"seed": -1},
    ],
)
def test_invalid_options(kwargs):
    with pytest.raises(UsageError):
        GenerateOptions(**kwargs)


def test_steps_above_t_rejected(tiny_pipe):
    with pytest.raises(UsageError, match="between 1 and 100"):
        tiny_pipe.generate("x", GenerateOptions(steps=101))


def _diffusers_tokens(tiny, picture: Image.Image) -> torch.Tensor:
    """diffusers' VQModel: encoder, then its nearest-codebook quantizer, on the picture's pixels as they are."""
    pixels = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = tiny.vqvae.encode(pixels / 127.5 - 1).latents
        _, _, (_, _, ids) = tiny.vqvae.quantize(latents)
    side = picture.size[0] // 4
    return ids.view(picture.size[1] // 4, side)


def test_encode_decode_round_trip(tiny, tiny_pipe, image_file, monkeypatch):
    """A random VQ-VAE is no autoencoder (decode then encode gives back about 1 token in 16, chance, and its encoder
    picks 1 to 3 codes per picture), so the round trip is checked against diffusers at every stage: the tokens of a
    picture, the pixels of grids (one of them with every code), and the tokens of those pixels again."""
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    picture = Image.open(image_file)  # 24x20: resized (shorter side to 16) and centre-cropped, as documented
    fitted = picture.resize((19, 16), Image.Resampling.LANCZOS).crop((1, 0, 17, 16))
    vqvae = tiny_pipe.components.vqvae
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(vqvae, "encode", lambda pixels: seen.append(pixels) or type(vqvae).encode(vqvae, pixels))
    grids = tiny_pipe.encode([noise, picture])
    # the encoder saw the fitted picture's pixels, scaled to [-1, 1] (the tiny encoder is too coarse to tell)
    assert torch.equal(seen[1][0], torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    monkeypatch.undo()
    assert torch.equal(grids[0], _diffusers_tokens(tiny, noise))
    assert torch.equal(grids[1], _diffusers_tokens(tiny, fitted))
    every_code = torch.randperm(16, generator=torch.Generator().manual_seed(5)).view(4, 4)
    stack = torch.stack([*grids, every_code])
    decoded = tiny_pipe.decode(stack)
    with torch.no_grad():
        emb = tiny.vqvae.quantize.get_codebook_entry(stack.view(3, -1), shape=(3, 4, 4, 4))
        reference = ((tiny.vqvae.decode(emb, force_not_quantize=True).sample / 2 + 0.5).clamp(0, 1) * 255).numpy()
    for image, ref in zip(decoded, reference, strict=True):
        assert image.size == (16, 16)
        assert np.abs(np.asarray(image, dtype=np.float32) - ref.transpose(1, 2, 0)).max() <= 0.5 + 1e-3  # rounding
    again = tiny_pipe.encode(decoded)
    assert all(torch.equal(g, _diffusers_tokens(tiny, im)) for g, im in zip(again, decoded, strict=True))
    with pytest.raises(UsageError, match="multiples of 4"):
        tiny_pipe.encode([Image.new("RGB", (10, 8))], keep_size=True)
    wide = Image.fromarray(np.random.default_rng(4).integers(0, 256, (8, 24, 3), dtype=np.uint8))
    kept = tiny_pipe.encode([wide], keep_size=True)[0]
    assert kept.shape == (2, 6) and torch.equal(kept, _diffusers_tokens(tiny, wide))


def test_decode_rejects_out_of_range_ids(tiny_pipe):
    with pytest.raises(UsageError, match=r"0\.\.15"):
        tiny_pipe.decode(torch.full((4, 4), 16))
    with pytest.raises(UsageError):
        tiny_pipe.decode(torch.full((4, 4), -1))


def test_decoded_image_size(tiny_pipe):
    images = tiny_pipe.decode(torch.zeros(2, 3, 5, dtype=torch.long))
    assert [im.size for im in images] == [(20, 12), (20, 12)]
    assert np.asarray(images[0]).dtype == np.uint8


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu(tiny, tiny_pipe, dtype, image_file):
    """Every path runs in half precision on the CPU and gives what float32 gives, within the rounding of the type:
    log-probabilities and pixels within the tolerances of tests/compare.py, and the sampled tokens mostly the same
    (measured: 94 to 100% the same; a broken network would agree on about 1 in 16, chance)."""
    from vqdiff_cli import VQDiffusion

    pipe = VQDiffusion.from_pretrained(tiny.path, device="cpu", dtype=dtype)
    for name in ("transformer", "vqvae"):  # each weight is the float32 one rounded to the dtype, once
        half, full = (getattr(p.components, name).state_dict() for p in (pipe, tiny_pipe))
        assert all(torch.equal(half[k], v.to(getattr(torch, dtype))) for k, v in full.items()), name
    assert half_log_p_error(pipe, tiny_pipe) < HALF_LOG_P_TOLERANCE[dtype]
    grid = torch.randperm(16, generator=torch.Generator().manual_seed(1)).view(1, 4, 4)
    pixels = [np.asarray(p.decode(grid)[0], dtype=np.int16) for p in (pipe, tiny_pipe)]
    assert np.abs(pixels[0] - pixels[1]).max() <= HALF_PIXEL_TOLERANCE[dtype]
    picture = Image.open(image_file)
    mask = np.zeros((20, 24), bool)
    mask[5:15, 5:15] = True
    options = GenerateOptions(seed=1, steps=3, num_images=2, batch_size=2)
    for run in (
        lambda p: p.generate("a cat", options),
        lambda p: p.inpaint(picture, mask, "a cat", options),
        lambda p: p.vary(picture, "a cat", 0.5, options),
    ):
        half, full = run(pipe), run(tiny_pipe)
        assert agreement([r.tokens for r in half], [r.tokens for r in full]) >= 0.75
        assert all(r.image.size == f.image.size for r, f in zip(half, full, strict=True))
    assert agreement(pipe.encode([picture]), tiny_pipe.encode([picture])) >= 0.75
