"""The Python API: seeds, batches, trajectories, encode/decode, option validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff_cli import GenerateOptions
from vqdiff_cli.errors import UsageError


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


def test_encode_decode_round_trip(tiny_pipe, image_file):
    picture = Image.open(image_file)
    grids = tiny_pipe.encode([picture])
    assert grids[0].shape == (4, 4)
    again = tiny_pipe.encode(tiny_pipe.decode(torch.stack(grids)))
    assert again[0].shape == (4, 4)
    with pytest.raises(UsageError, match="multiples of 4"):
        tiny_pipe.encode([Image.new("RGB", (10, 8))], keep_size=True)
    assert tiny_pipe.encode([Image.new("RGB", (24, 8))], keep_size=True)[0].shape == (2, 6)


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
def test_half_precision_on_cpu(tiny, dtype, image_file):
    """Every path runs in half precision on the CPU; the diffusion math stays float32."""
    from vqdiff_cli import VQDiffusion

    pipe = VQDiffusion.from_pretrained(tiny.path, device="cpu", dtype=dtype)
    picture = Image.open(image_file)
    assert pipe.generate("a cat", GenerateOptions(seed=1, steps=3))[0].tokens.shape == (4, 4)
    assert pipe.encode([picture])[0].shape == (4, 4)
    mask = np.zeros((20, 24), bool)
    mask[5:15, 5:15] = True
    assert pipe.inpaint(picture, mask, "", GenerateOptions(seed=1, steps=3))[0].image.size == (24, 20)
    assert pipe.vary(picture, "", 0.5, GenerateOptions(seed=1, steps=3))[0].image.size == (24, 20)
    log_p = pipe.components.transformer(
        torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 77, 32, dtype=pipe.dtype), 5
    )
    assert log_p.dtype == torch.float32
