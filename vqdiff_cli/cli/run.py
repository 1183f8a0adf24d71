"""The part of a sampling command after parsing: resolve settings, plan and check every output before the model
loads, then load once, sample, and write each image (with metadata) as soon as it is finished.

`generate`, `inpaint` and `vary` differ only in how they call the API; they share this.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..console import Output
from ..errors import UsageError
from ..files import check_folder_writable, check_suffix, check_writable
from ..settings import DEFAULT_OUTPUT, SETTINGS, Resolved, read_config, resolve, with_origin
from . import naming
from .common import load_resolved

if TYPE_CHECKING:
    from ..api import GeneratedImage, GenerateOptions, StepEvent, VQDiffusion

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


@dataclass
class RunPlan:
    """Everything a sampling run will do, resolved and checked."""

    mode: str
    prompts: list[str]
    settings: Resolved
    options: GenerateOptions
    items: list[naming.Item]
    outputs: list[Path] | None  # None: one PNG to stdout
    seed_was_random: bool
    metadata: bool
    overwrite: bool
    save_tokens: Path | None = None
    trajectory: Path | None = None
    animations: list[Path] | None = None
    animate: str | None = None  # the template of `animations`
    save_steps: Path | None = None
    offline: bool = False
    acceleration: dict[str, Any] = field(default_factory=dict)  # compile, cuda_graphs, threads, lora for loading
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    extra_files: list[Path] = field(default_factory=list)  # written by the command itself (e.g. a token mask)
    _rendered: dict[tuple[str, int], list[Path]] = field(default_factory=dict, repr=False)  # names with a {step}

    @classmethod
    def build(
        cls,
        out: Output,
        *,
        mode: str,
        prompts: list[str],
        params: Mapping[str, Any],
        image_settings: dict[str, Any] | None = None,
        default_output: str | None = None,
        extra_files: tuple[Path, ...] = (),
    ) -> RunPlan:
        """`params` are the command's parameters (its `locals()`): those named like a setting are flags (None =
        not given), plus num_images, seed, overwrite, no_metadata and the visual outputs."""
        from ..api import GenerateOptions
        from ..generation import plan_jobs, random_seed

        flags = {k: str(v) if isinstance(v, Path) else v for k, v in params.items() if k in SETTINGS}
        num_images, seed, overwrite = params["num_images"], params["seed"], params["overwrite"]
        config, config_file = read_config()
        settings = resolve(flags, image=image_settings, config=config, config_file=config_file)
        seed_was_random = seed is None
        if seed is None:
            seed = random_seed()
        try:
            options = GenerateOptions(
                steps=settings["steps"],
                stride=settings["stride"],
                guidance_scale=settings["guidance"],
                truncation_rate=settings["truncation"],
                seed=seed,
                num_images=num_images,
                batch_size=settings["batch_size"],
                sampler=settings["sampler"],
            )
        except UsageError as e:
            raise with_origin(e, settings, SETTINGS) from None
        items = [naming.Item(job.prompt, job.seed, job.index) for job in plan_jobs(prompts, seed, num_images)]
        template = settings["output"]
        if default_output is not None and settings.sources["output"] == "default":
            template = default_output
            settings.values["output"] = template
        to_stdout = template == "-"
        if to_stdout and len(items) > 1:
            raise UsageError(f"-o - writes one PNG to stdout, but this run makes {len(items)} images")
        if to_stdout and out.json_mode:
            raise UsageError("-o - and --json both want stdout; choose one")
        outputs = None if to_stdout else naming.output_paths(template, items, naming.ANY_STEP)
        animate = params.get("animate")  # its template is checked as its names are made, below
        plan = cls(
            mode=mode,
            prompts=prompts,
            settings=settings,
            options=options,
            items=items,
            outputs=outputs,
            seed_was_random=seed_was_random,
            metadata=not params.get("no_metadata", False),
            overwrite=overwrite,
            save_tokens=params.get("save_tokens"),
            trajectory=params.get("trajectory"),
            animations=naming.output_paths(animate, items, naming.ANY_STEP) if animate else None,
            animate=animate,
            save_steps=params.get("save_steps"),
            offline=bool(params.get("offline", False)),
            acceleration={k: params.get(k) for k in ("compile", "cuda_graphs", "threads", "lora", "lora_scale")},
            extra_files=list(extra_files),
        )
        plan.check_outputs()
        return plan

    @property
    def keeps_trajectory(self) -> bool:
        return bool(self.trajectory or self.animations or self.save_steps)

    def files(self) -> list[Path]:
        """Every file the run writes but the --save-steps frames; a name with `{step}` is still to be filled in."""
        paths = [*(self.outputs or []), *(self.animations or [])]
        paths += [p for p in (self.save_tokens, self.trajectory) if p is not None]
        return paths + self.extra_files

    def check_outputs(self) -> None:
        """Every file this run writes is new (or --overwrite) and its folder writable; no name is used twice. A name
        whose `{step}` is still to come clashes with any file it could become."""
        formats = [(self.outputs or [], ".png", "an image"), (self.animations or [], ".gif", "an animation")]
        formats += [([p], ".npy", "a token file") for p in (self.save_tokens, self.trajectory) if p is not None]
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
                check_writable(existing, self.overwrite)
            check_writable(path, overwrite=True)  # the folder
        if self.save_steps is None:
            return
        check_folder_writable(self.save_steps)  # a file there, or a read-only place, is refused
        for item in self.items if not self.overwrite else ():
            frames = naming.existing_step_files(self.save_steps, self.settings["output"], item, self.image_path(item))
            if frames:
                check_writable(frames[0], overwrite=False)

    def image_path(self, item: naming.Item, num_steps: int | None = None) -> Path:
        """Where an image goes once it took `num_steps` steps (None: not known yet), and so the name its
        --save-steps frames take (stdout's image is named as by default)."""
        if not self.outputs:
            return Path(naming.render(DEFAULT_OUTPUT, item))
        return self._named(self.outputs, self.settings["output"], item, num_steps)

    def animation_path(self, item: naming.Item, num_steps: int) -> Path:
        assert self.animations is not None
        assert self.animate is not None
        return self._named(self.animations, self.animate, item, num_steps)

    def _named(self, paths: list[Path], template: str, item: naming.Item, num_steps: int | None) -> Path:
        if num_steps is None or not naming.names_a_step(paths[item.index]):
            return paths[item.index]
        if (template, num_steps) not in self._rendered:
            self._rendered[template, num_steps] = naming.output_paths(template, self.items, num_steps)
        return self._rendered[template, num_steps][item.index]

    def print_dry_run(self, out: Output) -> None:
        rows = {k: {"value": self.settings.values[k], "source": self.settings.sources[k]} for k in self.settings.values}
        seeds = f"{self.items[0].seed}..{self.items[-1].seed}" if len(self.items) > 1 else str(self.items[0].seed)
        outputs = [naming.shown(p) for p in self.outputs] if self.outputs is not None else ["-"]
        if out.json_mode:
            out.record(
                {
                    "mode": self.mode,
                    "settings": rows,
                    "prompts": self.prompts,
                    "seeds": [i.seed for i in self.items],
                    "seed_random": self.seed_was_random,
                    "outputs": outputs,
                    "files": [naming.shown(p) for p in self.files()],
                    "metadata": self.metadata,
                }
            )
            return
        width = max(len(k) for k in rows)
        out.result(
            f"{self.mode}: {len(self.items)} image(s) from {len(self.prompts)} prompt(s), seeds {seeds}"
            + (" (random)" if self.seed_was_random else "")
        )
        for key, row in rows.items():
            out.result(f"  {key:<{width}}  {row['value']!s:<32}  {row['source']}")
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
    import numpy as np

    from .. import metadata
    from ..images import png_bytes, save_png, save_tokens

    pipe = load_resolved(out, plan.settings, offline=plan.offline, **plan.acceleration)
    if plan.seed_was_random:
        out.info(f"seed {plan.items[0].seed} (random)")
    meta_settings = _settings_for_metadata(plan, pipe)
    extra = {**plan.extra_metadata, **({"lora": str(pipe.lora[0]), "lora_scale": pipe.lora[1]} if pipe.lora else {})}
    done = 0
    token_grids: list[np.ndarray] = []  # for --save-tokens
    trajectories: list[np.ndarray] = []  # for --trajectory
    started = time.perf_counter()
    with out.progress(len(plan.items), plan.mode) as bar:

        def on_step(event: StepEvent) -> None:
            bar.set_total(event.num_steps * event.total_images)
            first = event.images_done + 1
            last = event.images_done + event.batch_size
            images = (
                f"image {first}/{event.total_images}"
                if first == last
                else f"images {first}-{last}/{event.total_images}"
            )
            bar.update(event.batch_size, f"step {event.step}/{event.num_steps} {images}")

        batch_started = time.perf_counter()
        for result in sample(pipe, plan.options, trajectory=plan.keeps_trajectory, on_step=on_step):
            record = metadata.build(
                meta_settings,
                prompt=result.prompt,
                seed=result.seed,
                index=result.index,
                timesteps=result.timesteps,
                size=result.image.size,
                mode=plan.mode,
                extra=extra,
            )
            text = metadata.png_text(record) if plan.metadata else None
            if plan.outputs is None:
                sys.stdout.buffer.write(png_bytes(result.image, text))
                sys.stdout.buffer.flush()
                path_text = "-"
            else:
                path = plan.image_path(plan.items[result.index], len(result.timesteps))
                save_png(result.image, path, text, overwrite=plan.overwrite)
                path_text = str(path)
            if result.truncated_prompt:
                out.warn(f"prompt longer than the text encoder's 77 tokens; dropped: {result.truncated_prompt!r}")
            _write_visuals(plan, pipe, result)
            elapsed = time.perf_counter() - batch_started
            if out.json_mode:
                out.record(
                    {
                        "path": path_text,
                        "prompt": result.prompt,
                        "seed": result.seed,
                        "index": result.index,
                        "mode": plan.mode,
                        "settings": {k: v for k, v in record.items() if k not in ("prompt", "seed", "index")},
                        "time_s": round(elapsed, 3),
                    }
                )
            elif plan.outputs is not None:
                out.result(path_text)
            done += 1
            if plan.save_tokens is not None:
                token_grids.append(result.tokens.numpy())
            if plan.trajectory is not None and result.trajectory is not None:
                trajectories.append(result.trajectory.numpy())
            if done % plan.options.batch_size == 0:
                batch_started = time.perf_counter()
    if plan.save_tokens is not None:
        save_tokens(np.stack(token_grids), plan.save_tokens, overwrite=plan.overwrite)
    if plan.trajectory is not None:
        grids = np.stack(trajectories, axis=1)
        save_tokens(grids, plan.trajectory, overwrite=plan.overwrite)
    out.info(f"{done} image(s) in {time.perf_counter() - started:.1f} s")


def _write_visuals(plan: RunPlan, pipe: VQDiffusion, result: GeneratedImage) -> None:
    """--animate and --save-steps for one image, from its trajectory."""
    if result.trajectory is None or not (plan.animations or plan.save_steps):
        return
    from ..images import save_gif, save_png

    frames = pipe.render(result.trajectory)
    item = plan.items[result.index]
    if plan.animations is not None:
        save_gif(frames, plan.animation_path(item, len(frames) - 1), overwrite=plan.overwrite)
    if plan.save_steps is not None:
        plan.save_steps.mkdir(parents=True, exist_ok=True)
        image_path = plan.image_path(item, len(frames) - 1)
        for frame, path in zip(
            frames,
            naming.step_paths(plan.save_steps, plan.settings["output"], item, image_path, len(frames) - 1),
            strict=True,
        ):
            if path != image_path:  # the last frame, named like the image itself: it is the image
                save_png(frame, path, overwrite=plan.overwrite)
