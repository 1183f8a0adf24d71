"""What a run is asked: `GenerateOptions`, `InpaintOptions`, the jobs of a run, and every choice and default that the
CLI, the API, the config file and the README read (this is their one source). Plain Python: no torch, no PIL."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UsageError, excerpt

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 1000.0  # far beyond any useful scale (3 to 10); keeps the guided scores finite in float16
MAX_PURITY_WEIGHT = 100.0  # (1 + r) times a log-probability stays far inside float32
SAMPLERS = ("auto", "reference", "fast")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
VARIANTS = ("auto", "fp16", "fp32")
MASK_MODES = ("any", "half", "all")
KNOWN_MODES = ("restore", "renoise")
# How masked tokens are revealed at t > 0: "posterior" samples every position from the posterior (VQ-Diffusion v1);
# "random" and "purity" reveal a budget of masked positions per timestep, chosen uniformly or by purity (Improved
# VQ-Diffusion's high-quality and purity sampling), with tokens drawn from the x_0 prediction.
REVEALS = ("posterior", "random", "purity")
# How a strided chain takes its posterior: "exact" (the multi-step posterior q(x_s | x_t, x_0)) or "original"
# (microsoft/VQ-Diffusion's sample_fast: a one-step posterior at t - stride + 1, the network told the true t)
STRIDE_MODES = ("exact", "original")
DEFAULT_PURITY_WEIGHT = 1.0  # r of Improved VQ-Diffusion's Eq. 11: prior_weight=1 in the original README's example
DEFAULT_MODEL = "microsoft/vq-diffusion-ithq"
DEFAULT_ARCHITECTURE = "ithq"  # the configs shipped in vqdiff_cli/configs/, for random-weight models
DEFAULT_STRENGTH = 0.5  # how far a variation noises the image: 0 keeps it, 1 is plain generation


def random_seed() -> int:
    """The seed of a run that names none (reported with its results, so the run can be repeated)."""
    return secrets.randbelow(2**31)


@dataclass(frozen=True)
class Job:
    """One image of a run: its prompt, its seed and its place in the run."""

    prompt: str
    seed: int
    index: int


Prompts = str | Sequence[str] | Sequence[Job]  # a prompt, prompts, or the jobs of a run planned already


def plan_jobs(prompts: Sequence[str], seed: int, num_images: int) -> list[Job]:
    """The run's images in order: every image of the first prompt, then of the next; image i has seed `seed + i`."""
    jobs = [Job(p, seed + i, i) for i, p in enumerate(p for p in prompts for _ in range(num_images))]
    if jobs and jobs[-1].seed > MAX_SEED:
        raise UsageError(f"--seed {seed} leaves no room for {len(jobs)} consecutive seeds", hint="use a smaller seed")
    return jobs


def batch_around(job: Job, batch_size: int, position: int) -> list[Job]:
    """The batch image `job` was made in, rebuilt to re-run it exactly: `batch_size` images of its prompt, `job` at
    `position`, the others with the seeds its neighbours had (job.seed - position + i).

    Every op treats an image of a batch alone (matmul rows, attention and norms per image, noise drawn per image), so
    the other images' prompts and seeds do not change its numbers; the batch's shape does on a GPU, where the
    libraries pick their kernels (and so the rounding of float16 and bfloat16 sums) by problem size.
    """
    if not 0 <= position < batch_size:
        raise UsageError(f"batch position {position} is not in a batch of {batch_size}")
    first = job.seed - position
    if first < 0 or first + batch_size - 1 > MAX_SEED:
        raise UsageError(  # possible only with metadata edited by hand, or a --seed given with --same-batch
            f"seed {job.seed} at position {position} of a batch of {batch_size} leaves no seeds for the rest"
        )
    return [job if i == position else Job(job.prompt, first + i, job.index) for i in range(batch_size)]


def as_jobs(prompts: Prompts, seed: int | None, num_images: int) -> list[Job]:
    """The jobs of a run: `prompts` as they are when they are jobs (planned before, as the CLI plans a run to name its
    outputs), else planned here from `seed` (a random one when None) and `num_images`."""
    given = [prompts] if isinstance(prompts, str) else list(prompts)
    if not given:
        raise UsageError("no prompts given")
    jobs = [p for p in given if isinstance(p, Job)]
    if len(jobs) == len(given):
        return jobs
    if jobs:
        raise UsageError("give prompts or jobs, not both")
    texts = [p for p in given if isinstance(p, str)]
    return plan_jobs(texts, random_seed() if seed is None else seed, num_images)


def plan_timesteps(start: int, steps: int | None = None, stride: int | None = None) -> tuple[int, ...]:
    """The visited timesteps, descending from `start` and ending at 0.

    `steps` N spreads N timesteps evenly over [0, start] (rounded half up; N = start + 1 visits every one, N = 1
    visits only `start`); `stride` D visits start, start - D, ... and then 0 if that was not reached.
    """
    if steps is not None and stride is not None:
        raise ValueError("give steps or stride, not both")
    if stride is not None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        visited = list(range(start, -1, -stride))
        return tuple(visited if visited[-1] == 0 else [*visited, 0])
    n = start + 1 if steps is None else steps
    if not 1 <= n <= start + 1:
        raise ValueError(f"steps must be between 1 and {start + 1}, got {n}")
    if n == 1:
        return (start,)
    return tuple((2 * start * (n - 1 - i) + (n - 1)) // (2 * (n - 1)) for i in range(n))


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
    reveal: str = "posterior"  # one of REVEALS
    purity_weight: float = DEFAULT_PURITY_WEIGHT  # r: sharpens confident positions (purity reveal only); 0: none
    tokens_per_call: int | None = None  # random/purity: at most this many tokens revealed per network call
    stride_mode: str = "exact"  # one of STRIDE_MODES

    def __post_init__(self) -> None:
        if self.steps is not None and self.stride is not None:
            raise UsageError("give --steps or --stride, not both", about=("steps", "stride"))
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}", about=("steps",))
        if self.stride is not None and self.stride < 1:
            raise UsageError(f"--stride must be at least 1, got {self.stride}", about=("stride",))
        if not 0 <= self.guidance_scale <= MAX_GUIDANCE:  # NaN fails too
            raise UsageError(
                f"--guidance must be between 0 and {MAX_GUIDANCE:g}, got {self.guidance_scale}", about=("guidance",)
            )
        if not 0 < self.truncation_rate <= 1:
            raise UsageError(f"--truncation must be in (0, 1], got {self.truncation_rate}", about=("truncation",))
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}", about=("seed",))
        if self.num_images < 1:
            raise UsageError(f"--num-images must be at least 1, got {self.num_images}", about=("num_images",))
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}", about=("batch_size",))
        if self.sampler not in SAMPLERS:
            hint = f"use one of: {', '.join(SAMPLERS)}"
            raise UsageError(f"unknown sampler '{excerpt(self.sampler)}'", hint=hint, about=("sampler",))
        self._check_reveal()

    def _check_reveal(self) -> None:
        if self.reveal not in REVEALS:
            hint = f"use one of: {', '.join(REVEALS)}"
            raise UsageError(f"unknown --reveal '{excerpt(self.reveal)}'", hint=hint, about=("reveal",))
        if self.stride_mode not in STRIDE_MODES:
            hint = f"use one of: {', '.join(STRIDE_MODES)}"
            raise UsageError(f"unknown --stride-mode '{excerpt(self.stride_mode)}'", hint=hint, about=("stride_mode",))
        if not 0 <= self.purity_weight <= MAX_PURITY_WEIGHT:  # NaN fails too
            raise UsageError(
                f"--purity-weight must be between 0 and {MAX_PURITY_WEIGHT:g}, got {self.purity_weight}",
                about=("purity_weight",),
            )
        if self.tokens_per_call is not None and self.tokens_per_call < 1:
            raise UsageError(
                f"--tokens-per-call must be at least 1, got {self.tokens_per_call}", about=("tokens_per_call",)
            )
        if self.tokens_per_call is not None and self.reveal == "posterior":
            raise UsageError(
                "--tokens-per-call applies to a budgeted reveal, not to --reveal posterior",
                hint="add --reveal random or --purity",
                about=("tokens_per_call", "reveal"),
            )
        if self.stride_mode == "original" and self.reveal != "posterior":
            raise UsageError(
                f"--stride-mode original changes the posterior, which --reveal {self.reveal} does not sample from",
                hint="use --stride-mode exact (the default) with --reveal random or --purity",
                about=("stride_mode", "reveal"),
            )

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def budgeted(self) -> bool:
        """Whether steps before the last reveal a budget of masked positions (random or purity reveal)."""
        return self.reveal != "posterior"

    def timesteps(self, num_train_timesteps: int, start: int | None = None) -> tuple[int, ...]:
        """Visited timesteps from `start` (default T-1); a partial chain keeps the full chain's density."""
        top = num_train_timesteps - 1 if start is None else start
        if self.steps is not None and self.steps > num_train_timesteps:
            raise UsageError(
                f"--steps must be between 1 and {num_train_timesteps} for this model, got {self.steps}",
                about=("steps",),
            )
        if self.stride is not None and self.stride >= num_train_timesteps:
            raise UsageError(
                f"--stride must be below {num_train_timesteps} for this model, got {self.stride}", about=("stride",)
            )
        steps = self.steps
        if steps is not None and top < num_train_timesteps - 1:
            steps = max(1, round(steps * (top + 1) / num_train_timesteps))
        return plan_timesteps(top, steps=steps, stride=self.stride)


@dataclass(frozen=True)
class InpaintOptions:
    """How the mask becomes a token mask, where sampling starts, and how the result is put back."""

    mask_mode: str = "any"  # a token is regenerated when any / at least half / all of its patch is painted
    grow: int = 0  # then dilate the token mask by this many tokens
    start_step: int | None = None  # default: the t whose gamma-bar_t is closest to the masked fraction
    known: str = "restore"  # known tokens after every step: restored, or re-noised to the current level
    feather: int = 4  # pixels over which the composite fades out beyond the painted area
    composite: bool = True  # paste into the original through the mask; False returns the plain decode

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise UsageError(
                f"unknown --mask-mode '{excerpt(self.mask_mode)}'", hint=f"use one of: {', '.join(MASK_MODES)}"
            )
        if self.grow < 0:
            raise UsageError(f"--grow must be >= 0, got {self.grow}")
        if self.known not in KNOWN_MODES:
            raise UsageError(f"unknown --known '{excerpt(self.known)}'", hint=f"use one of: {', '.join(KNOWN_MODES)}")
        if self.feather < 0:
            raise UsageError(f"--feather must be >= 0, got {self.feather}")
        if self.start_step is not None and self.start_step < 0:
            raise UsageError(f"--start-step must be >= 0, got {self.start_step}")


def check_strength(strength: float) -> None:
    if not 0 <= strength <= 1:
        raise UsageError(f"--strength must be between 0 and 1, got {strength}")
