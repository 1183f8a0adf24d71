"""Comparing two pipelines' outputs: half precision against float32, within stated tolerances.

The tiny transformer's log-probabilities reach about -11, so one rounding of a value that size is 11 * 2^-11 = 0.0054
in float16 and 11 * 2^-8 = 0.043 in bfloat16. Measured differences from float32: 0.007 (float16) and 0.07
(bfloat16), a few roundings deep, and 0.0035 for float32 on float16-rounded weights; the tolerance is 5 roundings.
Decoded pixels: measured 1 (float16) and 5 (bfloat16) levels of 255.
"""

from __future__ import annotations

import torch

from vqdiff_cli import VQDiffusion

HALF_LOG_P_TOLERANCE = {"float16": 5 * 11 * 2**-11, "bfloat16": 5 * 11 * 2**-8}
HALF_PIXEL_TOLERANCE = {"float16": 3, "bfloat16": 10}


def half_log_p_error(pipe: VQDiffusion, reference: VQDiffusion) -> float:
    """Largest |log p(x_0 | x_t)| difference of two pipelines' transformers on random inputs at t = 0, 50, 99
    (NaN when either gives NaN: it then fails every `<` bound)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (3, 16), generator=g)
    context = torch.randn(3, 77, 32, generator=g)
    diffs = []
    with torch.inference_mode():
        for t in (0, 50, 99):
            ours = pipe.components.transformer(x, context.to(pipe.dtype), t)
            assert ours.dtype == torch.float32  # the diffusion math runs in float32 whatever the network's dtype
            diffs.append((ours - reference.components.transformer(x, context, t)).abs().max())
    return torch.stack(diffs).max().item()  # max propagates NaN


def agreement(grids: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The fraction of tokens that are the same in two lists of grids (chance is 1 in 16 for the tiny model)."""
    same = sum(int((g == e).sum()) for g, e in zip(grids, expected, strict=True))
    return same / sum(e.numel() for e in expected)
