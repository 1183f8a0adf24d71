"""The training loop both stages share, on accelerate: one command line on a CPU, a GPU, or many GPUs and machines
(`accelerate launch`, `torchrun`), with mixed precision, gradient accumulation and clipping, an EMA of the weights,
atomic checkpoints (the last K kept; run_folder.py), exact resume, Ctrl-C, `train_log.jsonl` and a loss curve.

A stage is a `Task`: its trainable parts (one AdamW over all of them), the losses of one micro-batch, what it adds to a
checkpoint, validation and export. Every random draw of a stage comes from its own seeded generators, made for the
whole global batch on every rank (each rank takes its slice), so one process and N processes with the same global
batch see the same examples, timesteps and noise; the data position is the step itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import UsageError
from . import require_train_extra
from .plot import write_loss_curve
from .run_folder import (
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    LOG_FILE,
    LOSS_CURVE,
    append_log,
    checkpoint_dirs,
    load_checkpoint,
    prepare_output,
    read_log,
    trainable_state,
    truncate_log,
    write_checkpoint,
)
from .task import LoopOptions, Progress, ProgressCallback, Run, Task, TrainingInterrupted, TrainResult

if TYPE_CHECKING:
    from accelerate import Accelerator

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

    if options.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here", hint="use --device cpu (or auto)")

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
            truncate_log(output, run.step)
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
                    append_log(output / LOG_FILE, record)
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
