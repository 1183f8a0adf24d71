"""Output file names from templates: `{prompt}` (slugified), `{seed}`, `{index}`, `{step}`.

A template without placeholders names one file; when it would name several files the same, each gets `-0`, `-1`,
... (the image's index in the run) before the suffix.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from ..errors import UsageError, excerpt
from ..options import Job

FIELDS = ("prompt", "seed", "index", "step")
SLUG_MAX = 60


def slugify(text: str, max_length: int = SLUG_MAX) -> str:
    """Lowercase words joined by '-', only [a-z0-9-], at most `max_length` characters (cut at a word break)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > max_length:
        cut = slug[:max_length]
        slug = cut.rsplit("-", 1)[0] if "-" in cut[max_length // 2 :] else cut
    return slug.strip("-") or "image"


class _AnyStep:
    """Stands for every step number when a template is rendered into a pattern."""

    def __format__(self, spec: str) -> str:
        return _ANY_STEP_TEXT


_ANY_STEP_TEXT = "\x00step\x00"
ANY_STEP = _AnyStep()


def check_template(template: str) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise UsageError(f"bad output template '{excerpt(template)}': {e}") from None
    for name in names:
        if name not in FIELDS:
            raise UsageError(
                f"unknown placeholder {{{excerpt(name)}}} in '{excerpt(template)}'",
                hint=f"use {', '.join('{' + f + '}' for f in FIELDS)}",
            )


def render(template: str, job: Job, step: int | _AnyStep = 0) -> str:
    check_template(template)
    try:
        return template.format(prompt=slugify(job.prompt), seed=job.seed, index=job.index, step=step)
    except (ValueError, IndexError, KeyError) as e:
        raise UsageError(f"bad output template '{excerpt(template)}': {e}") from None


def _numbered(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}-{index}{path.suffix}")


def output_paths(template: str, jobs: list[Job], step: int | _AnyStep) -> list[Path]:
    """One path per job; names that would repeat get the job's index appended. `{step}` is the image's final step
    (the number of steps it took), or `ANY_STEP` before that is known. A leading `~` is the home folder (templates
    from the config file never pass through a shell)."""
    rendered = [Path(render(template, job, step)).expanduser() for job in jobs]
    if len(set(rendered)) == len(rendered):
        return rendered
    return [_numbered(path, job.index) for path, job in zip(rendered, jobs, strict=True)]


def step_paths(folder: Path, template: str, job: Job, image_path: Path, num_steps: int) -> list[Path]:
    """Files for the grid before the first step (0) and after every step: the template's name with `{step}` filled
    in, or `<image stem>-step-NNN.png`, inside `folder`."""
    if "{step" in template:
        names = [Path(render(template, job, step)).name for step in range(num_steps + 1)]
        if len(set(names)) == len(names):
            return [folder / name for name in names]
    width = max(3, len(str(num_steps)))
    return [folder / f"{image_path.stem}-step-{i:0{width}d}.png" for i in range(num_steps + 1)]


def literal(text: str) -> str:
    """`text` as a template that renders to itself (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def names_a_step(path: str | Path) -> bool:
    """Whether `path` was rendered with `ANY_STEP`: its name waits for the run's number of steps."""
    return _ANY_STEP_TEXT in str(path)


def shown(path: Path) -> str:
    """A path for people: a step still to come reads `{step}`."""
    return str(path).replace(_ANY_STEP_TEXT, "{step}")


def _name_pattern(name: str) -> str:
    return r"\d+".join(re.escape(part) for part in name.split(_ANY_STEP_TEXT))


def existing_matches(path: Path) -> list[Path]:
    """The files that exist now under a name `path` may take once its step is known (`path` itself if it names no
    step). Only the file name may name a step."""
    if not names_a_step(path.name):
        return [path] if path.exists() else []
    if not path.parent.is_dir():
        return []
    matcher = re.compile(_name_pattern(path.name))
    return sorted(p for p in path.parent.iterdir() if matcher.fullmatch(p.name))


def existing_step_files(folder: Path, template: str, job: Job, image_path: Path) -> list[Path]:
    """Files already in `folder` that `step_paths` could name for this job, whatever the number of steps: the run's
    step count is known only once the model is loaded, and outputs are checked before that."""
    if not folder.is_dir():
        return []
    patterns = [_name_pattern(f"{image_path.stem}-step-") + r"\d{3,}\.png"]
    if "{step" in template:
        patterns.append(_name_pattern(Path(render(template, job, ANY_STEP)).name))
    matcher = re.compile("|".join(f"(?:{p})" for p in patterns))
    return sorted(path for path in folder.iterdir() if matcher.fullmatch(path.name))
