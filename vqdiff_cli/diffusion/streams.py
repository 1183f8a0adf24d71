"""Counter-based random streams for the fast sampler: every uniform is a hash of (image seed, salt, index).

`torch.rand` with one generator per image costs a kernel launch per image and per step and keeps state on the host.
Here a value is a pure function of its coordinates, so a whole batch draws in one batched expression (and inside a
CUDA graph), an image draws the same numbers alone or in a batch, and the CPU and a GPU draw the same numbers.
The stream is not `torch.rand`'s, so the fast sampler does not reproduce diffusers' tokens for a seed; nothing on a GPU
could, because a CUDA generator's stream never matched diffusers' CPU stream either.

The mixer is a 32-bit integer finaliser (xor-shift, multiply by an odd constant below 2**31, twice; a bijection of
the 32-bit integers), held in int64 and masked to 32 bits, so no product overflows. Each (seed, salt) pair gives two
32-bit keys; a value is mix(mix(index ^ key_a) + key_b), a keyed two-round hash of its index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # odd, < 2**31: x * M < 2**63 for every 32-bit x
_SALT_TWEAK, _KEY_B_TWEAK = 0x9E3779B9, 0x85EBCA6B


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche of 32-bit values held in int64 (any shape)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 15)


def seed_words(seeds: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """(B, 2) int64: the low and high 32 bits of each image's seed (seeds are 0 .. 2**63 - 1)."""
    return torch.tensor([[s & _MASK32, (s >> 32) & _MASK32] for s in seeds], dtype=torch.long, device=device)


def stream_keys(words: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """(B, 2) seed words and a 0-dim int64 salt (step and purpose) -> (B, 2) int64 keys of the stream."""
    key_a = mix32(mix32(mix32((salt + _SALT_TWEAK) & _MASK32) ^ words[:, 0]) ^ words[:, 1])
    key_b = mix32(key_a ^ _KEY_B_TWEAK)
    return torch.stack([key_a, key_b], dim=1)


def random_bits(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, 2) keys and int64 indices below 2**32 of any shape S -> (B, *S) int64 values in [0, 2**32)."""
    shape = (-1,) + (1,) * index.ndim
    key_a, key_b = keys[:, 0].view(shape), keys[:, 1].view(shape)
    return mix32((mix32(index.unsqueeze(0) ^ key_a) + key_b) & _MASK32)


def uniforms(words: torch.Tensor, salt: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(B, *shape) float64 uniforms in the open interval (0, 1), 52 random bits each.

    Two 32-bit values (indices 2i and 2i+1) give 26 bits each; (m + 0.5) / 2**52 is never 0 or 1.
    """
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(2 * count, dtype=torch.long, device=words.device)
    bits = random_bits(stream_keys(words, salt), index).view(words.shape[0], count, 2) >> 6  # (B, count, 2)
    mantissa = (bits[..., 0] << 26) | bits[..., 1]  # < 2**52: exact in float64
    return ((mantissa.double() + 0.5) * 2.0**-52).view(words.shape[0], *shape)
