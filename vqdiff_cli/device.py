"""Device and dtype resolution, and per-image random generators. Resolved once, passed everywhere; no global state."""

from __future__ import annotations

import torch

from .errors import DeviceError, UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then the CPU; 'cuda:1' style indices are accepted."""
    base = name.split(":", 1)[0]
    if base not in DEVICES:
        raise UsageError(f"unknown device '{name}'", hint=f"use one of: {', '.join(DEVICES)}")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was requested but no CUDA GPU is available", hint="use --device cpu")
    if base == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' was requested but MPS is not available", hint="use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"invalid device '{name}'") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU and float16 on a GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'", hint=f"use one of: {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def make_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per image, seeded with that image's seed, on the device that draws the noise."""
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        gens.append(g)
    return gens
