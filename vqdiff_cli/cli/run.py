"""The part of a sampling command after parsing: resolve settings, plan and check every output before the model
loads, then load once, sample, and write each image (with metadata) as soon as it is finished.

`generate`, `inpaint` and `vary` differ only in how they call the API; they share this.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..files import check_folder_writable, check_suffix, check_writable
from ..options import GenerateOptions, Job, plan_jobs, random_seed
from . import naming
from .common import load_resolved
from .console import Output, StepProgress
from .settings import DEFAULT_OUTPUT, Resolved, SettingFlags, load, with_origin

if TYPE_CHECKING:
    import numpy as np

    from ..pipeline.pipeline import GeneratedImage, StepEvent, VQDiffusion

Sampler = Callable[..., Iterator["GeneratedImage"]]


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; '-' is stdin; blank lines and lines starting with '#' are skipped."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8-sig")  # -sig: drop a BOM
    except FileNotFoundError:
        raise UsageError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {path}: {e}") from None
    prompts = [line.strip() for line in text.removeprefix("\ufeff").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"prompts file {path} has no prompts (blank lines and # comments are skipped)")
    return prompts


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """What a sampling command asks besides its settings: how many images from which seed, and what to write."""

    num_images: int = GenerateOptions.num_images
    seed: int | None = None  # None: a random one, reported
    overwrite: bool = False
    metadata: bool = True
    offline: bool = False
    save_tokens: Path | None = None
    trajectory: Path | None = None
    animate: str | None = None  # a template like --output
    save_steps: Path | None = None
    compile: bool | None = None
    cuda_graphs: bool | None = None
    threads: int | None = None

    @property
    def acceleration(self) -> dict[str, Any]:
        """What `load_resolved` takes besides the settings."""
        return {"compile": self.compile, "cuda_graphs": self.cuda_graphs, "threads": self.threads}


@dataclass
class RunPlan:
    """Everything a sampling run will do, resolved and checked."""

    mode: str
    prompts: list[str]
    settings: Resolved
    options: GenerateOptions
    jobs: list[Job]
    request: RunRequest
    extra_files: list[Path] = field(default_factory=list)  # written by the command itself (e.g. a token mask)
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    outputs: list[Path] | None = field(init=False)  # None: one PNG to stdout
    animations: list[Path] | None = field(init=False)
    _rendered: dict[tuple[str, int], list[Path]] = field(default_factory=dict, repr=False)  # names with a {step}

    def __post_init__(self) -> None:
        template, animate = self.settings["output"], self.request.animate  # templates are checked as names are made
        self.outputs = None if template == "-" else naming.output_paths(template, self.jobs, naming.ANY_STEP)
        self.animations = naming.output_paths(animate, self.jobs, naming.ANY_STEP) if animate else None

    @property
    def seed_was_random(self) -> bool:
        return self.request.seed is None

    @classmethod
    def build(
        cls,
        out: Output,
        *,
        mode: str,
        prompts: list[str],
        flags: SettingFlags,
        request: RunRequest,
        image_settings: dict[str, Any] | None = None,
        default_output: str | None = None,
        extra_files: tuple[Path, ...] = (),
    ) -> RunPlan:
        """Resolve the settings (`default_output`, the command's own, stands in for the built-in default name), plan
        the run's images and name and check every output, all before the model loads."""
        defaults = {"output": default_output} if default_output is not None else None
        settings = load(flags, image=image_settings, defaults=defaults)
        seed = random_seed() if request.seed is None else request.seed
        try:
            options = GenerateOptions(
                steps=settings["steps"],
                stride=settings["stride"],
                guidance_scale=settings["guidance"],
                truncation_rate=settings["truncation"],
                seed=seed,
                num_images=request.num_images,
                batch_size=settings["batch_size"],
                sampler=settings["sampler"],
            )
        except UsageError as e:
            raise with_origin(e, settings) from None
        jobs = plan_jobs(prompts, seed, request.num_images)
        if settings["output"] == "-" and len(jobs) > 1:
            raise UsageError(f"-o - writes one PNG to stdout, but this run makes {len(jobs)} images")
        if settings["output"] == "-" and out.json_mode:
            raise UsageError("-o - and --json both want stdout; choose one")
        plan = cls(mode, prompts, settings, options, jobs, request, list(extra_files))
        plan.check_outputs()
        return plan

    @property
    def keeps_trajectory(self) -> bool:
        r = self.request
        return bool(r.trajectory or self.animations or r.save_steps)

    def files(self) -> list[Path]:
        """Every file the run writes but the --save-steps frames; a name with `{step}` is still to be filled in."""
        paths = [*(self.outputs or []), *(self.animations or [])]
        paths += [p for p in (self.request.save_tokens, self.request.trajectory) if p is not None]
        return paths + self.extra_files

    def check_outputs(self) -> None:
        """Every file this run writes is new (or --overwrite) and its folder writable; no name is used twice. A name
        whose `{step}` is still to come clashes with any file it could become."""
        formats = [(self.outputs or [], ".png", "an image"), (self.animations or [], ".gif", "an animation")]
        tokens = (self.request.save_tokens, self.request.trajectory)
        formats += [([p], ".npy", "a token file") for p in tokens if p is not None]
        for group, suffix, what in formats:
            for path in group:
                check_suffix(Path(naming.shown(path)), suffix, what)
        paths = self.files()
        seen: set[Path] = set()
        for path in paths:
            if path in seen:
                raise UsageError(f"two outputs of this run are both named {naming.shown(path)}")
            seen.add(path)
            if naming.names_a_step(path.parent):
                raise UsageError(f"{{step}} names files, not folders: {naming.shown(path)}")
            for existing in naming.existing_matches(path):
                check_writable(existing, self.request.overwrite)
            check_writable(path, overwrite=True)  # the folder
        steps = self.request.save_steps
        if steps is None:
            return
        check_folder_writable(steps)  # a file there, or a read-only place, is refused
        for job in self.jobs if not self.request.overwrite else ():
            frames = naming.existing_step_files(steps, self.settings["output"], job, self.image_path(job))
            if frames:
                check_writable(frames[0], overwrite=False)

    def image_path(self, job: Job, num_steps: int | None = None) -> Path:
        """Where an image goes once it took `num_steps` steps (None: not known yet), and so the name its
        --save-steps frames take (stdout's image is named as by default)."""
        if not self.outputs:
            return Path(naming.render(DEFAULT_OUTPUT, job))
        return self._named(self.outputs, self.settings["output"], job, num_steps)

    def animation_path(self, job: Job, num_steps: int) -> Path:
        assert self.animations is not None
        assert self.request.animate is not None
        return self._named(self.animations, self.request.animate, job, num_steps)

    def _named(self, paths: list[Path], template: str, job: Job, num_steps: int | None) -> Path:
        if num_steps is None or not naming.names_a_step(paths[job.index]):
            return paths[job.index]
        if (template, num_steps) not in self._rendered:
            self._rendered[template, num_steps] = naming.output_paths(template, self.jobs, num_steps)
        return self._rendered[template, num_steps][job.index]

    def print_dry_run(self, out: Output) -> None:
        seeds = f"{self.jobs[0].seed}..{self.jobs[-1].seed}" if len(self.jobs) > 1 else str(self.jobs[0].seed)
        outputs = [naming.shown(p) for p in self.outputs] if self.outputs is not None else ["-"]
        if out.json_mode:
            out.record(
                {
                    "mode": self.mode,
                    "settings": self.settings.rows(),
                    "prompts": self.prompts,
                    "seeds": [j.seed for j in self.jobs],
                    "seed_random": self.seed_was_random,
                    "outputs": outputs,
                    "files": [naming.shown(p) for p in self.files()],
                    "metadata": self.request.metadata,
                }
            )
            return
        out.result(
            f"{self.mode}: {len(self.jobs)} image(s) from {len(self.prompts)} prompt(s), seeds {seeds}"
            + (" (random)" if self.seed_was_random else "")
        )
        for line in self.settings.table():
            out.result(line)
        for path in outputs:
            out.result(f"  -> {path}")


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
    }


def execute(out: Output, plan: RunPlan, sample: Sampler) -> None:
    """Load the model, run `sample(pipe, options, trajectory=..., on_step=...)`, write everything. Images are written
    as they come; only the token grids that --save-tokens and --trajectory write at the end are kept."""
    pipe = load_resolved(out, plan.settings, offline=plan.request.offline, **plan.request.acceleration)
    if plan.seed_was_random:
        out.info(f"seed {plan.jobs[0].seed} (random)")
    writer = _Writer(out, plan, pipe)
    started = time.perf_counter()
    with out.progress(len(plan.jobs), plan.mode) as bar:
        for result in sample(pipe, plan.options, trajectory=plan.keeps_trajectory, on_step=_on_step(bar)):
            writer.write(result)
    writer.finish()
    out.info(f"{writer.done} image(s) in {time.perf_counter() - started:.1f} s")


def _on_step(bar: StepProgress) -> Callable[[StepEvent], None]:
    """Progress: a step of a batch of images advances the bar by the batch's size."""

    def on_step(event: StepEvent) -> None:
        bar.set_total(event.num_steps * event.total_images)
        first = event.images_done + 1
        last = event.images_done + event.batch_size
        images = (
            f"image {first}/{event.total_images}" if first == last else f"images {first}-{last}/{event.total_images}"
        )
        bar.update(event.batch_size, f"step {event.step}/{event.num_steps} {images}")

    return on_step


class _Writer:
    """Writes each finished image (PNG with metadata, or stdout), its visuals and its report line; warns once about
    each acceleration fallback the library noted (and lists them in --json records); keeps the token grids that
    --save-tokens and --trajectory write at the end."""

    def __init__(self, out: Output, plan: RunPlan, pipe: VQDiffusion) -> None:
        self.out, self.plan, self.pipe = out, plan, pipe
        self.meta_settings = _settings_for_metadata(plan, pipe)
        self.max_tokens = pipe.components.text.max_length
        self.done = 0
        self.warned = 0  # acceleration fallbacks warned about so far
        self.token_grids: list[np.ndarray] = []  # for --save-tokens
        self.trajectories: list[np.ndarray] = []  # for --trajectory
        self.batch_started = time.perf_counter()

    def write(self, result: GeneratedImage) -> None:
        from .. import metadata
        from ..images import png_bytes, save_png

        plan, out = self.plan, self.out
        fallbacks = self.pipe.acceleration_notes  # why compile or CUDA graphs fell back, each reason once
        for note in fallbacks[self.warned :]:
            out.warn(note)
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
            extra=plan.extra_metadata,
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
            out.warn(
                f"prompt longer than the text encoder's {self.max_tokens} tokens; dropped: {result.truncated_prompt!r}"
            )
        _write_visuals(plan, self.pipe, result)
        elapsed = time.perf_counter() - self.batch_started
        if out.json_mode:
            settings = {k: v for k, v in record.items() if k not in ("prompt", "seed", "index")}
            out.record(
                {
                    "path": path_text,
                    "prompt": result.prompt,
                    "seed": result.seed,
                    "index": result.index,
                    "mode": plan.mode,
                    "settings": settings,
                    "fallbacks": fallbacks,
                    "time_s": round(elapsed, 3),
                }
            )
        elif plan.outputs is not None:
            out.result(path_text)
        self.done += 1
        if plan.request.save_tokens is not None:
            self.token_grids.append(result.tokens.numpy())
        if plan.request.trajectory is not None and result.trajectory is not None:
            self.trajectories.append(result.trajectory.numpy())
        if self.done % plan.options.batch_size == 0:
            self.batch_started = time.perf_counter()

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
