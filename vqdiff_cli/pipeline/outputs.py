"""What a sampling run gives back: `GeneratedImage`, the per-step `StepEvent` (and its callback type), and
`ModelSource` (where the weights came from)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image


@dataclass(frozen=True)
class ModelSource:
    """Where the weights came from, for metadata: a Hub repo id (with its commit) or a local folder."""

    name: str  # the repo id, or the folder as given
    path: Path  # the folder read: vqdiff's cache entry for a Hub model, else the local folder
    revision: str | None = None  # Hub models: the commit hash of the files


@dataclass
class GeneratedImage:
    prompt: str
    seed: int
    index: int  # position in the run: prompt-major, then image number
    tokens: torch.Tensor  # (H, W) int64 on the CPU
    image: Image.Image
    timesteps: tuple[int, ...]
    trajectory: torch.Tensor | None = None  # (steps + 1, H, W): the start grid, then the grid after every step
    truncated_prompt: str = ""  # prompt text beyond the text encoder's length, dropped
    # The batch it was sampled in: how many images (the last batch of a run can be smaller than its batch size) and
    # its position there. On a GPU the network's float16/bfloat16 numbers depend on the batch's shape, so the same
    # image needs the same batch size (its noise does not: each image draws its own).
    batch_size: int = 1
    batch_index: int = 0
    network_calls: int = 0  # transformer calls the batch took (a budgeted reveal can take several per timestep)


@dataclass(frozen=True)
class StepEvent:
    """Reported after every denoising step."""

    step: int  # 1-based, within the current batch
    num_steps: int
    timestep: int
    images_done: int  # images finished before this batch
    batch_size: int
    total_images: int
    tokens: torch.Tensor = field(repr=False)  # (B, N) current grids of the batch


StepCallback = Callable[[StepEvent], None]
