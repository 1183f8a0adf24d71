"""What one sampling run takes and gives: `GenerateOptions` (the per-run settings, whose defaults are the CLI's
and the README's), `GeneratedImage`, the per-step `StepEvent`, and `ModelSource` (where the weights came from)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .diffusion.sampler import plan_timesteps
from .errors import UsageError, excerpt

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 1000.0  # far beyond any useful scale (3 to 10); keeps the guided scores finite in float16
SAMPLERS = ("auto", "reference", "fast")


def random_seed() -> int:
    """The seed of a run that names none (reported with its results, so the run can be repeated)."""
    return secrets.randbelow(2**31)


@dataclass(frozen=True)
class Job:
    """One image of a run: its prompt, its seed and its place in the run."""

    prompt: str
    seed: int
    index: int


def plan_jobs(prompts: Sequence[str], seed: int, num_images: int) -> list[Job]:
    """The run's images in order: every image of the first prompt, then of the next; image i has seed `seed + i`."""
    jobs = [Job(p, seed + i, i) for i, p in enumerate(p for p in prompts for _ in range(num_images))]
    if jobs and jobs[-1].seed > MAX_SEED:
        raise UsageError(f"--seed {seed} leaves no room for {len(jobs)} consecutive seeds", hint="use a smaller seed")
    return jobs


@dataclass(frozen=True)
class GenerateOptions:
    """Per-run sampling settings. These defaults are the CLI's and the README's."""

    steps: int | None = None  # timesteps visited, spread over the whole chain; None: every one (T)
    stride: int | None = None  # or: the gap between visited timesteps
    guidance_scale: float = 5.0  # classifier-free guidance; 1 turns it off
    truncation_rate: float = 1.0  # keep the classes holding this much probability mass
    seed: int | None = None  # image i gets seed + i; None: a random seed, reported in the results
    num_images: int = 1  # per prompt
    batch_size: int = 1  # images per network call
    # "reference": diffusers' op order, per image (bit-identical to diffusers on CPU float32); "fast": batched
    # closed-form sampler with its own noise stream (the same distribution, different tokens); "auto": fast on CUDA
    sampler: str = "auto"

    def __post_init__(self) -> None:
        if self.steps is not None and self.stride is not None:
            raise UsageError("give --steps or --stride, not both")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if self.stride is not None and self.stride < 1:
            raise UsageError(f"--stride must be at least 1, got {self.stride}")
        if not 0 <= self.guidance_scale <= MAX_GUIDANCE:  # NaN fails too
            raise UsageError(f"--guidance must be between 0 and {MAX_GUIDANCE:g}, got {self.guidance_scale}")
        if not 0 < self.truncation_rate <= 1:
            raise UsageError(f"--truncation must be in (0, 1], got {self.truncation_rate}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.num_images < 1:
            raise UsageError(f"--num-images must be at least 1, got {self.num_images}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler '{excerpt(self.sampler)}'", hint=f"use one of: {', '.join(SAMPLERS)}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def timesteps(self, num_train_timesteps: int, start: int | None = None) -> tuple[int, ...]:
        """Visited timesteps from `start` (default T-1); a partial chain keeps the full chain's density."""
        top = num_train_timesteps - 1 if start is None else start
        if self.steps is not None and self.steps > num_train_timesteps:
            raise UsageError(f"--steps must be between 1 and {num_train_timesteps} for this model, got {self.steps}")
        if self.stride is not None and self.stride >= num_train_timesteps:
            raise UsageError(f"--stride must be below {num_train_timesteps} for this model, got {self.stride}")
        steps = self.steps
        if steps is not None and top < num_train_timesteps - 1:
            steps = max(1, round(steps * (top + 1) / num_train_timesteps))
        return plan_timesteps(top, steps=steps, stride=self.stride)


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
