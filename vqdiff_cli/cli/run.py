"""The part of a sampling command after parsing: resolve settings, plan the run's images and check every output, all
before the model loads.

`generate`, `inpaint` and `vary` differ only in how they call the API; they share this. A run spread over processes
(torchrun, or --shard) plans the same job list in each, and each checks and makes its own batches (`distributed`);
`rounds.execute` makes them. With --skip-existing, the images made before with the same settings are found here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import metadata
from ..distributed import Shard, World, shard_batches
from ..errors import OutputError, UsageError, excerpt
from ..files import check_folder_writable, check_suffix, check_writable
from ..options import GenerateOptions, Job, plan_jobs, random_seed
from . import naming
from .calls import CallBasis, calls_line, dry_run_calls
from .console import Output
from .settings import DEFAULT_OUTPUT, Resolved, SettingFlags, generate_options, load


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; '-' is stdin; blank lines and lines starting with '#' are skipped."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8-sig")  # -sig: drop a BOM
    except FileNotFoundError:
        raise UsageError(f"prompts file not found: {excerpt(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {excerpt(path)}: {e}") from None
    prompts = [line.strip() for line in text.removeprefix("\ufeff").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"prompts file {excerpt(path)} has no prompts (blank lines and # comments are skipped)")
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
    lora: Path | None = None  # a LoRA adapter folder merged at load time
    lora_scale: float | None = None
    skip_existing: bool = False  # keep the images made before with these settings
    shard: Shard = field(default_factory=Shard)  # --shard: the share of the run this command makes
    seed_random: bool = False  # `seed` was drawn at random for this run (by its first process, for all of them)

    @property
    def acceleration(self) -> dict[str, Any]:
        """What `load_resolved` takes besides the settings."""
        return {
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "threads": self.threads,
            "lora": self.lora,
            "lora_scale": self.lora_scale,
        }


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
    world: World = field(default_factory=World)  # this process among those of a launch
    call_basis: CallBasis | None = None  # for --dry-run: where a batch's chain starts (default: generation's start)
    outputs: list[Path] | None = field(init=False)  # None: one PNG to stdout
    animations: list[Path] | None = field(init=False)
    batches: list[list[Job]] = field(init=False)  # this process's: batches[r] is its batch of round r
    rounds: int = field(init=False)  # rounds of the run: as many as its processes' longest list of batches
    made_before: dict[int, dict[str, Any]] = field(init=False, default_factory=dict)  # --skip-existing: index -> record
    _rendered: dict[tuple[str, int], list[Path]] = field(default_factory=dict, repr=False)  # names with a {step}

    def __post_init__(self) -> None:
        template, animate = self.settings["output"], self.request.animate  # templates are checked as names are made
        self.outputs = None if template == "-" else naming.output_paths(template, self.jobs, naming.ANY_STEP)
        self.animations = naming.output_paths(animate, self.jobs, naming.ANY_STEP) if animate else None
        shared = shard_batches(self.jobs, self.options.batch_size, self.request.shard)  # this command's share
        self.rounds = -(-len(shared) // self.world.size)
        self.batches = shared[self.world.rank :: self.world.size]

    @property
    def seed_was_random(self) -> bool:
        return self.request.seed is None or self.request.seed_random

    @property
    def share(self) -> list[Job]:
        """The jobs this process makes (all of them in a run of one process)."""
        return [job for batch in self.batches for job in batch]

    @property
    def spread(self) -> bool:
        """Whether this run is one share of several (--shard, or several processes)."""
        return self.request.shard.count > 1 or self.world.size > 1

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
        world: World | None = None,
    ) -> RunPlan:
        """Resolve the settings (`default_output`, the command's own, stands in for the built-in default name), plan
        the run's images and name and check every output, all before the model loads. A command that can be spread
        over processes passes its `world`; the others run in one process only."""
        if world is None and World.from_env().size > 1:
            raise UsageError(f"`vqdiff {mode}` runs in one process", hint="torchrun spreads `vqdiff generate`")
        defaults = {"output": default_output} if default_output is not None else None
        settings = load(flags, image=image_settings, defaults=defaults)
        seed = random_seed() if request.seed is None else request.seed
        options = generate_options(settings, seed=seed, num_images=request.num_images)
        jobs = plan_jobs(prompts, seed, request.num_images)
        if settings["output"] == "-" and len(jobs) > 1:
            raise UsageError(f"-o - writes one PNG to stdout, but this run makes {len(jobs)} images")
        if settings["output"] == "-" and out.json_mode:
            raise UsageError("-o - and --json both want stdout; choose one")
        plan = cls(mode, prompts, settings, options, jobs, request, list(extra_files), world=world or World())
        plan.check_spread()
        plan.check_outputs()
        return plan

    def check_spread(self) -> None:
        """What a share of a run, and a run that keeps the images made before, cannot write: one file for all the
        images (a share has only some of them), or stdout."""
        why = "--shard or several processes" if self.spread else "--skip-existing"
        for flag, path in (("--save-tokens", self.request.save_tokens), ("--trajectory", self.request.trajectory)):
            if path is not None and (self.spread or self.request.skip_existing):
                raise UsageError(f"{flag} writes one file for the whole run: not with {why}", hint=f"drop {flag}")
        if self.outputs is None and (self.spread or self.request.skip_existing):
            raise UsageError(f"-o - writes to stdout: not with {why}", hint="give -o a file name template")
        if self.request.skip_existing and self.outputs and naming.names_a_step(self.outputs[0]):
            raise UsageError(
                "--skip-existing needs the image names before the model loads; {step} in -o is known only after",
                hint="drop {step} from -o",
            )

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
        """Every file this run writes is new (or --overwrite; or, with --skip-existing, an image made before with the
        same settings, which is kept) and its folder writable; no name is used twice. A name whose `{step}` is still
        to come clashes with any file it could become. On disk, only this process's share is looked at: the other
        shares are their processes' (and another --shard may be making them meanwhile)."""
        formats = [(self.outputs or [], ".png", "an image"), (self.animations or [], ".gif", "an animation")]
        tokens = (self.request.save_tokens, self.request.trajectory)
        formats += [([p], ".npy", "a token file") for p in tokens if p is not None]
        for group, suffix, what in formats:
            for path in group:
                check_suffix(Path(naming.shown(path)), suffix, what)
        seen: set[Path] = set()
        for path in self.files():
            if path in seen:
                raise UsageError(f"two outputs of this run are both named {excerpt(naming.shown(path))}")
            seen.add(path)
            if naming.names_a_step(path.parent):
                raise UsageError(f"{{step}} names files, not folders: {excerpt(naming.shown(path))}")
        if self.request.skip_existing:
            self._find_made_before()
        to_make = [job for job in self.share if job.index not in self.made_before]
        for path in self._files_of(to_make):
            check_writable(path, overwrite=True)  # the folder, and a name the file system can take
            for existing in naming.existing_matches(path):
                check_writable(existing, self.request.overwrite)
        steps = self.request.save_steps
        if steps is None:
            return
        check_folder_writable(steps)  # a file there, or a read-only place, is refused
        for job in to_make if not self.request.overwrite else ():
            frames = naming.existing_step_files(steps, self.settings["output"], job, self.image_path(job))
            if frames:
                check_writable(frames[0], overwrite=False)

    def _files_of(self, jobs: list[Job]) -> list[Path]:
        """The files that making `jobs` writes (and the run's own files, when it is not spread)."""
        paths = [paths[job.index] for paths in (self.outputs, self.animations) if paths for job in jobs]
        paths += [p for p in (self.request.save_tokens, self.request.trajectory) if p is not None]
        return paths + self.extra_files

    def _find_made_before(self) -> None:
        """--skip-existing: the images of this share whose file exists and is an image vqdiff made with the settings
        known before the model loads (the rest is compared once it is loaded: `confirm_made_before`). Any other file
        there is an error, unless --overwrite replaces it."""
        assert self.outputs is not None
        planned = {key: self.settings[key] for key in ("model", "variant", "steps", "stride")}
        planned |= {"guidance": self.settings["guidance"], "truncation": self.settings["truncation"]}
        planned |= metadata.reveal_settings(self.options)
        for job in self.share:
            path = self.outputs[job.index]
            if not path.exists():
                continue
            found = _made_by_vqdiff(path, self.request.overwrite)
            if found is None:
                continue
            differences = metadata.differences(found, self.record(planned, job), metadata.KNOWN_BEFORE_LOADING)
            if not differences:
                self.made_before[job.index] = found
            elif not self.request.overwrite:
                raise _made_otherwise(path, differences)

    def confirm_made_before(self, settings: dict[str, Any]) -> None:
        """--skip-existing, once the model is loaded: the images found made before must also have been made from the
        files this run reads (repo, revision, folder, weights), on the same kind of device, in the same dtype and
        with the same sampler (`settings`, as the metadata of this run's images holds them). Those that differ are an
        error, or are made again with --overwrite."""
        assert self.outputs is not None or not self.made_before
        for index, found in list(self.made_before.items()):
            differences = metadata.differences(found, self.record(settings, self.jobs[index]))
            if not differences:
                continue
            if not self.request.overwrite:
                raise _made_otherwise(self.outputs[index], differences)  # type: ignore[index]
            del self.made_before[index]

    def record(self, settings: dict[str, Any], job: Job) -> dict[str, Any]:
        """The metadata record of `job`'s image but for what only its making gives (the visited steps, the size)."""
        return metadata.build(
            settings,
            prompt=job.prompt,
            seed=job.seed,
            index=job.index,
            timesteps=(),
            size=(0, 0),
            mode=self.mode,
            batch=self._batch_of(job),
            extra=self.extra_metadata,
        )

    def _batch_of(self, job: Job) -> tuple[int, int]:
        """The size of the batch `job`'s image is made in, and its position there (as its metadata records them)."""
        for batch in self.batches:
            for position, member in enumerate(batch):
                if member.index == job.index:
                    return len(batch), position
        raise AssertionError(f"job {job.index} is not in this process's batches")

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
        """The settings and this process's outputs (its share's, when the run is spread)."""
        seeds = f"{self.jobs[0].seed}..{self.jobs[-1].seed}" if len(self.jobs) > 1 else str(self.jobs[0].seed)
        outputs = [naming.shown(self.outputs[j.index]) for j in self.share] if self.outputs is not None else ["-"]
        kept = [naming.shown(self.image_path(self.jobs[i])) for i in sorted(self.made_before)]
        share = self.request.shard.within(self.world.shard)
        calls = dry_run_calls(self.settings, self.options, self.call_basis)
        if out.json_mode:
            out.record(
                {
                    "mode": self.mode,
                    "settings": self.settings.rows(),
                    "prompts": self.prompts,
                    "seeds": [j.seed for j in self.jobs],
                    "seed_random": self.seed_was_random,
                    "share": str(share),
                    "outputs": outputs,
                    "made_before": kept,
                    "files": [naming.shown(p) for p in self.files()],
                    "metadata": self.request.metadata,
                    "network_calls": calls["network_calls"],  # per batch; None: not known before the model loads
                    "network_calls_expected": calls["expected"],  # an expectation (a variation's random start)
                    "timesteps": calls["timesteps"],
                }
            )
            return
        out.result(
            f"{self.mode}: {len(self.jobs)} image(s) from {len(self.prompts)} prompt(s), seeds {seeds}"
            + (" (random)" if self.seed_was_random else "")
            + (f"; share {share}: {len(self.share)} of them" if self.spread else "")
        )
        for line in self.settings.table():
            out.result(line)
        out.result(calls_line(calls))
        for path in outputs:
            out.result(f"  -> {path}" + (" (made before: kept)" if path in kept else ""))


def _made_by_vqdiff(path: Path, overwrite: bool) -> dict[str, Any] | None:
    """The metadata record of the image at `path`, which must be a complete PNG that vqdiff made; None when it is
    not but --overwrite replaces it."""
    from ..errors import VqdiffError
    from ..images import read_png_text

    try:
        text = read_png_text(path)  # decodes the whole image: a truncated file fails here
    except VqdiffError:
        what = "is not a complete PNG"
    else:
        try:
            return metadata.parse(text, str(path))
        except VqdiffError:
            what = "holds no vqdiff metadata"
    if overwrite:
        return None
    raise OutputError(f"{path} already exists and {what}", hint="pass --overwrite to replace it, or choose another -o")


def _made_otherwise(path: Path, differences: list[str]) -> OutputError:
    shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
    return OutputError(
        f"{path} already exists, made with other settings ({shown})",
        hint="pass --overwrite to make it again, or choose another -o",
    )
