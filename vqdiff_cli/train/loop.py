"""The training loop both stages share, on accelerate: one command line on a CPU, a GPU, or many GPUs and machines
(`accelerate launch`, `torchrun`), with mixed precision, gradient accumulation and clipping, an EMA of the weights,
atomic checkpoints (the last K kept), exact resume, Ctrl-C, `train_log.jsonl` and a loss curve.

A stage is a `Task`: its trainable parts (one optimizer each), the losses of one micro-batch, what it adds to a
checkpoint, validation and export. Every random draw of a stage comes from its own seeded generators, made for the
whole global batch on every rank (each rank takes its slice), so one process and N processes with the same global
batch see the same examples, timesteps and noise; the data position is the step itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..errors import ExitStatus, UsageError, VqdiffError
from . import require_train_extra
from .plot import write_loss_curve

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINT_FORMAT = 1
CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
LOSS_CURVE = "loss.png"
MIXED_PRECISION = ("no", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
_STEP_DIR = re.compile(r"^step-(\d+)$")
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


# -- checkpoints ---------------------------------------------------------------------------------------------------


def checkpoint_dirs(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the finished checkpoints of a run, oldest first."""
    folder = output / CHECKPOINTS
    found = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        m = _STEP_DIR.match(entry.name)
        if m and (entry / "state.pt").is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}  # saved at once: no copy


def write_checkpoint(output: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """checkpoints/step-NNNNNNNN/state.pt, written into a temporary folder and renamed in one step; then only the
    newest `keep` are kept."""
    folder = output / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: saved -> current' for every setting that differs (nested dicts compared key by key)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint of this vqdiff version")
    diff = differences(state.get("config", {}), config)
    if diff:
        shown = "; ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
        raise UsageError(
            f"the checkpoint {path.name} was made with other settings: {shown}",
            hint="resume with the same settings, or start a new run in another folder",
        )
    return state


# -- EMA -----------------------------------------------------------------------------------------------------------


class EMA:
    """An exponential moving average of a module's trainable parameters, kept in float32."""

    def __init__(self, module: nn.Module) -> None:
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """The EMA weights in place of the trained ones, for validation and export."""
        saved = {}
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in self.shadow:
                    saved[name] = p.detach().clone()
                    p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])


# -- Ctrl-C --------------------------------------------------------------------------------------------------------


class StopFlag:
    """SIGINT sets a flag that the loop reads between steps (so a step is never cut in half); a second Ctrl-C
    stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


# -- the run folder ------------------------------------------------------------------------------------------------

RUN_ENTRIES = (CHECKPOINTS, LOG_FILE, CONFIG_FILE, LOSS_CURVE, "validation", "tensorboard")


def prepare_output(
    output: Path, *, resume: bool, overwrite: bool, written: tuple[str, ...] = (), clear: bool = True
) -> None:
    """Check the run folder before any work: new or empty, or a run to `resume`; `overwrite` clears what an earlier
    run wrote there (its checkpoints, logs and the `written` result entries), leaving other files alone. With
    `clear=False` it only checks (data-parallel ranks check; the main process then clears)."""
    from ..errors import OutputError
    from ..files import check_folder_writable

    if output.exists() and not output.is_dir():
        raise OutputError(f"{output} is a file, not a folder for the training run")
    check_folder_writable(output)
    if resume:
        if overwrite:
            raise UsageError("--resume continues the run in the folder; --overwrite starts it over: choose one")
        if not checkpoint_dirs(output):
            raise UsageError(f"{output} holds no checkpoint to resume", hint="leave out --resume to start a run")
        return
    entries = [e for e in output.iterdir() if not e.name.startswith(".")] if output.is_dir() else []
    if entries and not overwrite:
        hint = "pass --resume to continue its run, or --overwrite to start over" if checkpoint_dirs(output) else None
        raise OutputError(
            f"{output} is not empty", hint=hint or "choose a new folder, or pass --overwrite to clear an earlier run"
        )
    for name in (*RUN_ENTRIES, *written) if clear else ():
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def start_run(
    options: LoopOptions, output: Path, *, resume: bool, overwrite: bool, written: tuple[str, ...]
) -> Accelerator:
    """The accelerator of a run whose folder every rank has checked and the main process has cleared."""
    accelerator = make_accelerator(options, output)
    prepare_output(output, resume=resume, overwrite=overwrite, written=written, clear=False)
    accelerator.wait_for_everyone()  # every rank has seen the folder as it was before the main process clears it
    if accelerator.is_main_process:
        prepare_output(output, resume=resume, overwrite=overwrite, written=written)
    accelerator.wait_for_everyone()
    return accelerator


# -- the loop ------------------------------------------------------------------------------------------------------


def make_accelerator(options: LoopOptions, output: Path) -> Accelerator:
    require_train_extra()
    from accelerate import Accelerator

    log_with = None
    if options.report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise UsageError("--report-to tensorboard needs tensorboard", hint="pip install tensorboard")
        log_with = "tensorboard"
    # accelerate keeps its settings (mixed precision, ...) in a process-wide singleton that refuses other values: a
    # second run in one process (the Python API, the tests) starts from fresh settings. The distributed state stays.
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if callable(reset):
        reset(reset_partial_state=False)
    try:
        return Accelerator(
            cpu=options.device == "cpu",
            mixed_precision=options.mixed_precision,
            log_with=log_with,
            project_dir=str(output),
        )
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"cannot train with these settings: {e}".splitlines()[0]) from None


def _log_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_log(output: Path) -> list[dict[str, Any]]:
    path = output / LOG_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def _truncate_log(output: Path, step: int) -> None:
    """Drop the log lines of steps after `step` (written after the checkpoint a run resumes from)."""
    rows = [r for r in read_log(output) if int(r.get("step", 0)) <= step]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    tmp = output / f".{LOG_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output / LOG_FILE)


def _grad_norm(parameters: list[nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def train(
    task: Task,
    options: LoopOptions,
    output: Path,
    *,
    resume: bool = False,
    accelerator: Accelerator | None = None,
    on_progress: ProgressCallback | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `task` for `options.steps` optimizer steps (continuing from the newest checkpoint with `resume`), then
    export. `on_step(step)` runs after each step (tests use it to send Ctrl-C)."""
    accelerator = accelerator or make_accelerator(options, output)
    parts = task.parts()
    names = list(parts)
    # one optimizer, a parameter group per part: a GAN's two players step together (each loss reaches only its
    # own player's weights), and mixed precision has one gradient scaler to unscale and update
    groups = [{"params": [p for p in parts[n].parameters() if p.requires_grad], "name": n} for n in names]
    optimizer = torch.optim.AdamW(
        groups, lr=options.lr, betas=(options.beta1, options.beta2), weight_decay=options.weight_decay
    )
    prepared = accelerator.prepare(*(parts[n] for n in names), optimizer)
    models = dict(zip(names, prepared[: len(names)], strict=True))
    optimizer = prepared[-1]
    run = Run(accelerator, options, output, models)
    emas = {n: EMA(run.unwrapped(n)) for n in task.ema_parts()} if options.ema is not None else {}
    config = {"kind": task.kind, "task": task.run_config(), "loop": options.result_settings(run.world_size)}

    resumed_from = None
    found = checkpoint_dirs(output)
    if resume and found:
        state = load_checkpoint(found[-1][1], config)
        for name in names:
            module = run.unwrapped(name)
            expected = set(trainable_state(module))
            if set(state["models"][name]) != expected:
                raise UsageError(f"checkpoint {found[-1][1].name} does not hold the trainable weights of {name}")
            module.load_state_dict(state["models"][name], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        for name, ema in emas.items():
            ema.shadow = {k: v.to(accelerator.device) for k, v in state["ema"][name].items()}
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        task.load_state(state["task"])
        run.step = resumed_from = int(state["step"])
        if run.is_main:
            _truncate_log(output, run.step)
    if run.is_main:
        output.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (output / CONFIG_FILE).write_text(text, encoding="utf-8")
    if options.report_to:
        accelerator.init_trackers("vqdiff-train", config={k: str(v) for k, v in asdict(options).items()})

    def checkpoint() -> Path | None:
        accelerator.wait_for_everyone()
        path = None
        if run.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": run.step,
                "config": config,
                "models": {n: trainable_state(run.unwrapped(n)) for n in names},
                "optimizer": optimizer.state_dict(),
                "ema": {n: e.shadow for n, e in emas.items()},
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "task": task.state(),
            }
            path = write_checkpoint(output, run.step, state, options.keep)
        accelerator.wait_for_everyone()
        return path

    def with_ema(action: Callable[[], None]) -> None:
        with contextlib.ExitStack() as stack:
            for name, ema in emas.items():
                stack.enter_context(ema.applied(run.unwrapped(name)))
            action()

    last_checkpoint = found[-1][1] if resumed_from is not None else None
    sums: dict[str, float] = {}
    latest: dict[str, float] = {}
    images = 0
    count = 0
    rate = math.nan  # images per second over the last log window
    window_start = time.perf_counter()
    with StopFlag() as stop:
        while run.step < options.steps:
            step = run.step
            lr = options.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(options.grad_accum):
                last = micro == options.grad_accum - 1
                with contextlib.ExitStack() as stack:
                    if not last:
                        for model in models.values():
                            stack.enter_context(accelerator.no_sync(model))
                    with accelerator.autocast():
                        result = task.micro_step(run, step, micro)
                    for loss in result.losses.values():
                        accelerator.backward(loss / options.grad_accum)
                for key, value in result.terms.items():
                    sums[key] = sums.get(key, 0.0) + value / options.grad_accum
                images += result.images * run.world_size
            accelerator.unscale_gradients()  # once for all parts (fp16); a no-op otherwise
            norms = {}
            for name in names:
                params = [p for p in run.unwrapped(name).parameters() if p.requires_grad]
                if options.clip_grad is not None:
                    norms[name] = float(torch.nn.utils.clip_grad_norm_(params, options.clip_grad))
                else:
                    norms[name] = _grad_norm(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            extra = task.after_update(run, step)
            for name, ema in emas.items():
                ema.update(run.unwrapped(name), options.ema_decay(step))
            run.step += 1
            count += 1
            latest.update(extra)  # occasional numbers (e.g. codes revived): their latest value, not a mean
            if run.step % options.log_every == 0 or run.step == options.steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                means = torch.tensor([sums[k] / count for k in sorted(sums)], device=accelerator.device)
                means = accelerator.reduce(means, reduction="mean") if run.world_size > 1 else means
                record: dict[str, Any] = {"step": run.step}
                record.update({k: float(v) for k, v in zip(sorted(sums), means.tolist(), strict=True)})
                record.update(latest)
                record["lr"] = lr
                record.update({f"grad_norm_{n}" if len(names) > 1 else "grad_norm": v for n, v in norms.items()})
                record["images_per_s"] = images / elapsed
                if run.is_main:
                    _log_line(output / LOG_FILE, record)
                if options.report_to:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=run.step)
                sums, latest, images, count, window_start = {}, {}, 0, 0, time.perf_counter()
                rate = record["images_per_s"]
            if on_progress is not None and run.is_main:
                on_progress(Progress(run.step, options.steps, result.terms.get("loss", math.nan), rate))
            if (options.validate_every and run.step % options.validate_every == 0) or run.step == options.steps:
                if run.is_main:
                    with_ema(lambda: task.validate(run, run.step))
                    write_loss_curve(read_log(output), output / LOSS_CURVE)
                accelerator.wait_for_everyone()
            if run.step % options.checkpoint_every == 0 or run.step == options.steps:
                last_checkpoint = checkpoint()
            if on_step is not None:
                on_step(run.step)
            stopping = stop.requested
            if run.world_size > 1:
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
                stopping = bool(accelerator.reduce(flag, reduction="max").item())
            if stopping and run.step < options.steps:
                path = checkpoint() if run.step % options.checkpoint_every else last_checkpoint
                raise TrainingInterrupted(
                    f"interrupted at step {run.step}; checkpoint written to {path}",
                    hint="continue with the same command and --resume",
                )
    if run.is_main:
        with_ema(lambda: task.export(run))
        write_loss_curve(read_log(output), output / LOSS_CURVE)
    accelerator.wait_for_everyone()
    if options.report_to:
        accelerator.end_training()
    return TrainResult(run.step, resumed_from, last_checkpoint, read_log(output) if run.is_main else [])
