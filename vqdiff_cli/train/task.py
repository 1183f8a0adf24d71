"""The vocabulary of a training run: its options (`LoopOptions`, the CLI's defaults), what a stage is (`Task`) and
sees of the running loop (`Run`), what one micro-batch returns, progress and the result."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..errors import ExitStatus, UsageError, VqdiffError

if TYPE_CHECKING:
    from accelerate import Accelerator

MIXED_PRECISION = ("no", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# options that may change when a run is resumed: how long it runs and what it writes, not what it computes
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep", "log_every", "validate_every", "report_to", "device")


class TrainingInterrupted(VqdiffError):
    """Ctrl-C: a checkpoint was written, so `--resume` continues where the run stopped."""

    exit_code = ExitStatus.INTERRUPTED


@dataclass(frozen=True)
class LoopOptions:
    """How long and how a stage trains; the defaults are the CLI's."""

    steps: int = 1000
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 0  # linear warm-up steps, then constant
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.96
    clip_grad: float | None = 1.0
    ema: float | None = None  # EMA decay; the EMA weights are what is exported
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    keep: int = 3
    log_every: int = 10
    validate_every: int | None = None
    seed: int = 0
    device: str = "auto"
    report_to: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.validate_every is not None and self.validate_every < 1:
            raise UsageError(f"--validate-every must be at least 1, got {self.validate_every}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.warmup < 0 or self.weight_decay < 0:
            raise UsageError("--warmup and --weight-decay cannot be negative")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UsageError(f"--clip-grad must be positive, got {self.clip_grad}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise UsageError(f"--ema must be between 0 and 1 (e.g. 0.999), got {self.ema}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(f"unknown --mixed-precision '{self.mixed_precision}'", hint="use no, fp16 or bf16")
        if self.device not in DEVICES:
            raise UsageError(f"unknown --device '{self.device}'", hint=f"use one of: {', '.join(DEVICES)}")
        if self.report_to not in (None, "tensorboard"):
            raise UsageError(f"unknown --report-to '{self.report_to}'", hint="use tensorboard")

    def learning_rate(self, step: int) -> float:
        """Linear warm-up over `warmup` steps, then constant (so a run can be extended by resuming it)."""
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr

    def ema_decay(self, step: int) -> float:
        """The EMA decay at `step`, warmed up as (1 + step) / (10 + step) so early weights fade fast."""
        assert self.ema is not None
        return min(self.ema, (1 + step) / (10 + step))

    def result_settings(self, world_size: int) -> dict[str, Any]:
        """The settings that change the result (what a resumed run must share), with the global batch instead of the
        per-process one: a run may resume on another number of processes with the same global batch."""
        settings = {k: v for k, v in asdict(self).items() if k not in (*RESUMABLE_CHANGES, "batch_size")}
        settings["global_batch"] = self.batch_size * world_size
        return settings


@dataclass
class StepResult:
    """One micro-batch: a loss per trainable part (back-propagated), numbers for the log, images seen."""

    losses: dict[str, torch.Tensor]
    terms: dict[str, float]
    images: int


@dataclass
class Run:
    """What a task sees of the running loop."""

    accelerator: Accelerator
    options: LoopOptions
    output: Path
    models: dict[str, nn.Module]  # as prepared (DDP-wrapped when distributed)
    step: int = 0

    @property
    def device(self) -> torch.device:
        device: torch.device = self.accelerator.device
        return device

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def global_batch(self) -> int:
        return self.options.batch_size * self.world_size

    def local_slice(self) -> slice:
        """This rank's part of a global micro-batch."""
        b = self.options.batch_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def unwrapped(self, name: str) -> nn.Module:
        module: nn.Module = self.accelerator.unwrap_model(self.models[name])
        return module


class Task(Protocol):
    """One training stage."""

    kind: str

    def parts(self) -> dict[str, nn.Module]:
        """The trainable modules (a GAN has two), each called through its own forward (for data parallelism)."""
        ...

    def ema_parts(self) -> tuple[str, ...]:
        """The parts whose EMA is kept (and exported)."""
        ...

    def run_config(self) -> dict[str, Any]:
        """What must be the same for a checkpoint to be resumed (architecture, data, loss settings)."""
        ...

    def micro_step(self, run: Run, step: int, micro: int) -> StepResult: ...

    def after_update(self, run: Run, step: int) -> dict[str, float]:
        """After each optimizer step (e.g. reviving dead codes); returns extra numbers for the log."""
        ...

    def state(self) -> dict[str, Any]:
        """Extra state for a checkpoint: generators, histories."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def validate(self, run: Run, step: int) -> None:
        """Write this step's validation outputs (called on the main process, with EMA weights in place)."""
        ...

    def export(self, run: Run) -> None:
        """Write the result (called on the main process at the end, with EMA weights in place)."""
        ...


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float
    images_per_s: float


ProgressCallback = Callable[[Progress], None]


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    checkpoint: Path | None
    log: list[dict[str, Any]] = field(default_factory=list)
