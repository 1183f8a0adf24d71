"""Making a planned run: load the model once, then make this process's batches round by round, writing each image
(PNG with metadata) and its visuals as soon as it is finished. In a run over several processes, every round ends with
all of them meeting (`distributed.Group`): a failure in one stops all, and rank 0 reports what all of them made, in
job order, and keeps the progress bar of the whole run.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import metadata
from ..distributed import Group, World
from ..errors import excerpt
from ..options import Job
from . import naming
from .common import load_resolved
from .console import Output, StepProgress
from .run import RunPlan

if TYPE_CHECKING:
    import numpy as np

    from ..pipeline.pipeline import GeneratedImage, StepEvent, VQDiffusion

Sampler = Callable[..., Iterator["GeneratedImage"]]  # (pipe, jobs, options, trajectory=, on_step=)


def _settings_for_metadata(plan: RunPlan, pipe: VQDiffusion) -> dict[str, Any]:
    s = plan.settings.values
    return {
        "model": pipe.source.name,
        "revision": pipe.source.revision,
        "model_path": str(pipe.source.path),
        "variant": s["variant"],  # as requested (auto follows the dtype): what a re-run asks for
        "weights_variant": pipe.components.variants.get("transformer"),  # the files that were read
        "sampler": "fast" if pipe.uses_fast_sampler(plan.options) else "reference",
        "device": pipe.device.type,
        "dtype": pipe.dtype_name,
        "steps": s["steps"],
        "stride": s["stride"],
        "guidance": s["guidance"],
        "truncation": s["truncation"],
        **metadata.reveal_settings(plan.options),
    }


def execute(out: Output, plan: RunPlan, sample: Sampler, group: Group | None = None) -> None:
    """Load the model, run `sample(pipe, jobs, options, trajectory=..., on_step=...)` over this process's batches
    (but those made before), round by round, and write everything. Images are written as they come; only the token
    grids that --save-tokens and --trajectory write at the end are kept. In a run over several processes (`group`),
    the loading and every round end with all of them meeting: a failure in one stops all, and after each round rank
    0 reports what all of them made, in job order."""
    group = group or Group(plan.world)
    progress = _Progress(plan.world)
    with _stopped_as_interrupted():
        with group.stage() as loaded:
            pipe = load_resolved(
                out, plan.settings, offline=plan.request.offline, device=_device(plan), **_acceleration(plan)
            )
            writer = _Writer(out, plan, pipe)
            plan.confirm_made_before(writer.meta_settings)
            to_compute = [job for batch in plan.batches if not writer.all_made_before(batch) for job in batch]
            images = sample(pipe, to_compute, plan.options, trajectory=plan.keeps_trajectory, on_step=progress.on_step)
            loaded.payload = (len(plan.share) - len(plan.made_before), len(plan.made_before))
        progress.total = sum(made for made, _ in loaded.gathered)
        kept = sum(kept for _, kept in loaded.gathered)
        if plan.seed_was_random:
            out.info(f"seed {plan.jobs[0].seed} (random)")
        if kept:
            out.info(f"{kept} image(s) made before with these settings: kept")
        started = time.perf_counter()
        with out.progress(progress.total, plan.mode) as bar:
            progress.bar = bar
            for r in range(plan.rounds):
                try:
                    with group.stage() as finished:
                        written: list[Report] = []  # filled as images are written: a failure keeps those
                        finished.payload = written
                        if r < len(plan.batches):
                            writer.write_batch(plan.batches[r], images, written)
                finally:  # said even when the round failed somewhere: these images were written
                    gathered = [reports or [] for reports in finished.gathered]
                    progress.after_round(gathered)
                    for report in (report for reports in gathered for report in reports):
                        report.say(out)
        writer.finish()
    processes = f" by {plan.world.size} processes" if plan.world.size > 1 else ""
    out.info(f"{progress.done} image(s) in {time.perf_counter() - started:.1f} s{processes}")


def _device(plan: RunPlan) -> str:
    """This process's device: with several processes, each on its own GPU (bound to it, so that whatever runs on the
    current device, such as CUDA graphs, runs there too)."""
    device = plan.world.device(plan.settings["device"])
    if device != plan.settings["device"] and device.startswith("cuda:"):
        import torch

        from ..errors import DeviceError

        count = torch.cuda.device_count()
        if plan.world.local_rank >= count:
            raise DeviceError(
                f"{plan.world.local_size} processes on this machine but {count} CUDA GPU(s): each needs its own",
                hint=f"start at most {count} per machine (torchrun --nproc-per-node {count})",
            )
        torch.cuda.set_device(torch.device(device))
    return device


def _acceleration(plan: RunPlan) -> dict[str, Any]:
    """What `load_resolved` takes besides the settings. Processes sharing a machine split its CPUs between them unless
    --threads says otherwise (torchrun sets OMP_NUM_THREADS=1 for each of them when it is unset: that is not a
    choice made by the user, so it is not followed)."""
    from ..device import available_cpus

    request, world = plan.request, plan.world
    threads = request.threads
    if threads is None and world.local_size > 1:
        threads = world.cpu_threads(available_cpus())
    return {**request.acceleration, "threads": threads}


@contextmanager
def _stopped_as_interrupted() -> Iterator[None]:
    """SIGTERM (torchrun stopping its processes after Ctrl-C or a failure, a scheduler preempting a job) stops the run
    as Ctrl-C does: the finished images stay, no half-written file is left, the exit status is 130."""

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup is not interrupted again
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Progress:
    """The run's progress bar (rank 0's): the denoising steps of the images still to make on every process; this
    process's own advance step by step, the others' after each round."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.total = 0  # images to make, on every process
        self.done = 0
        self.steps = 0  # per image, once known
        self.bar = StepProgress(None, None)

    def _count_steps(self, steps: int) -> None:
        if steps and not self.steps:
            self.steps = steps
            self.bar.set_total(steps * self.total)

    def on_step(self, event: StepEvent) -> None:
        self._count_steps(event.num_steps)
        if self.world.size > 1:
            detail = f"step {event.step}/{event.num_steps}, {self.done}/{self.total} done"
        else:
            first, last = self.done + 1, self.done + event.batch_size
            images = f"image {first}/{self.total}" if first == last else f"images {first}-{last}/{self.total}"
            detail = f"step {event.step}/{event.num_steps} {images}"
        self.bar.update(event.batch_size, detail)

    def after_round(self, gathered: list[list[Report]]) -> None:
        for rank, reports in enumerate(gathered):
            made = [r for r in reports if r.made]
            self.done += len(made)
            if rank != self.world.rank and made:
                self._count_steps(made[0].steps)
                self.bar.update(sum(r.steps for r in made), f"{self.done}/{self.total} done")


@dataclass
class Report:
    """What rank 0 says of one image of the run: its path on stdout, or its --json record; its warnings."""

    record: dict[str, Any]  # for --json
    line: str | None = None  # for stdout otherwise
    warnings: list[str] = field(default_factory=list)
    steps: int = 0  # the denoising steps it took; 0: made before, kept
    made: bool = True

    def say(self, out: Output) -> None:
        for warning in self.warnings:
            out.warn(warning)
        if out.json_mode:
            out.record(self.record)
        elif self.line is not None:
            out.result(self.line)


class _Writer:
    """Writes each finished image (PNG with metadata, or stdout) and its visuals, and makes its report (with a
    warning, once, for each acceleration fallback the library noted; --json records list them); keeps the token grids
    that --save-tokens and --trajectory write at the end."""

    def __init__(self, out: Output, plan: RunPlan, pipe: VQDiffusion) -> None:
        self.out, self.plan, self.pipe = out, plan, pipe
        self.meta_settings = _settings_for_metadata(plan, pipe)
        lora = {"lora": str(pipe.lora[0]), "lora_scale": pipe.lora[1]} if pipe.lora else {}
        self.extra_metadata = {**plan.extra_metadata, **lora}
        self.max_tokens = pipe.components.text.max_length
        self.warned = 0  # acceleration fallbacks warned about so far
        self.token_grids: list[np.ndarray] = []  # for --save-tokens
        self.trajectories: list[np.ndarray] = []  # for --trajectory
        self.batch_started = time.perf_counter()

    def all_made_before(self, batch: list[Job]) -> bool:
        return all(job.index in self.plan.made_before for job in batch)

    def write_batch(self, batch: list[Job], images: Iterator[GeneratedImage], reports: list[Report]) -> None:
        """Make `batch` (the next batch of `images`) and write its images but those made before, adding a report for
        each image to `reports`; a batch whose images were all made before is not made again. A batch is made whole,
        as in a one-process run, for the same pixels."""
        if self.all_made_before(batch):
            reports += [self._kept(job) for job in batch]
            return
        self.batch_started = time.perf_counter()
        for job in batch:
            result = next(images)
            assert result.index == job.index, (result.index, job.index)
            reports.append(self._kept(job) if job.index in self.plan.made_before else self.write(result))

    def _kept(self, job: Job) -> Report:
        assert self.plan.outputs is not None
        path = str(self.plan.outputs[job.index])
        record = {"path": path, "prompt": job.prompt, "seed": job.seed, "index": job.index, "mode": self.plan.mode}
        return Report({**record, "made_before": True}, made=False)

    def write(self, result: GeneratedImage) -> Report:
        from ..images import png_bytes, save_png

        plan = self.plan
        fallbacks = list(self.pipe.acceleration_notes)  # why compile or CUDA graphs fell back, each reason once
        warnings = fallbacks[self.warned :]
        self.warned = len(fallbacks)
        record = metadata.build(
            self.meta_settings,
            prompt=result.prompt,
            seed=result.seed,
            index=result.index,
            timesteps=result.timesteps,
            size=result.image.size,
            mode=plan.mode,
            batch=(result.batch_size, result.batch_index),
            extra=self.extra_metadata,
            network_calls=result.network_calls,
        )
        text = metadata.png_text(record) if plan.request.metadata else None
        if plan.outputs is None:
            sys.stdout.buffer.write(png_bytes(result.image, text))
            sys.stdout.buffer.flush()
            path_text = "-"
        else:
            path = plan.image_path(plan.jobs[result.index], len(result.timesteps))
            save_png(result.image, path, text, overwrite=plan.request.overwrite)
            path_text = str(path)
        if result.truncated_prompt:
            dropped = excerpt(result.truncated_prompt)
            warnings.append(f"prompt longer than the text encoder's {self.max_tokens} tokens; dropped: '{dropped}'")
        _write_visuals(plan, self.pipe, result)
        elapsed = time.perf_counter() - self.batch_started
        if plan.request.save_tokens is not None:
            self.token_grids.append(result.tokens.numpy())
        if plan.request.trajectory is not None and result.trajectory is not None:
            self.trajectories.append(result.trajectory.numpy())
        settings = {k: v for k, v in record.items() if k not in ("prompt", "seed", "index")}
        json_record = {
            "path": path_text,
            "prompt": result.prompt,
            "seed": result.seed,
            "index": result.index,
            "mode": plan.mode,
            "settings": settings,
            "fallbacks": fallbacks,
            "time_s": round(elapsed, 3),
        }
        line = path_text if plan.outputs is not None else None
        return Report(json_record, line, warnings, steps=len(result.timesteps))

    def finish(self) -> None:
        import numpy as np

        from ..images import save_tokens

        request = self.plan.request
        if request.save_tokens is not None:
            save_tokens(np.stack(self.token_grids), request.save_tokens, overwrite=request.overwrite)
        if request.trajectory is not None:
            save_tokens(np.stack(self.trajectories, axis=1), request.trajectory, overwrite=request.overwrite)


def _write_visuals(plan: RunPlan, pipe: VQDiffusion, result: GeneratedImage) -> None:
    """--animate and --save-steps for one image, from its trajectory."""
    steps = plan.request.save_steps
    if result.trajectory is None or not (plan.animations or steps):
        return
    from ..images import save_gif, save_png

    frames = pipe.render(result.trajectory)
    job = plan.jobs[result.index]
    if plan.animations is not None:
        save_gif(frames, plan.animation_path(job, len(frames) - 1), overwrite=plan.request.overwrite)
    if steps is not None:
        steps.mkdir(parents=True, exist_ok=True)
        image_path = plan.image_path(job, len(frames) - 1)
        for frame, path in zip(
            frames,
            naming.step_paths(steps, plan.settings["output"], job, image_path, len(frames) - 1),
            strict=True,
        ):
            if path != image_path:  # the last frame, named like the image itself: it is the image
                save_png(frame, path, overwrite=plan.request.overwrite)
