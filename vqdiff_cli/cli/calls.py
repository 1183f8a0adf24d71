"""What `--dry-run` says about the network calls a batch will make, before any model loads: the model's configs are
read where they already are (a local folder, vqdiff's cache, the Hub cache; the shipped architecture for the default
model), and the calls counted as the pipeline counts them (`pipeline.planned_network_calls`).

A command says where its chain starts and how many tokens are masked there (`CallBasis`): generation starts at T-1
with every token masked; inpainting at its start step with the regenerated tokens; a variation at its start step
with a number drawn at random, so its count under a budgeted reveal is the one for the expected number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VqdiffError
from ..options import DEFAULT_MODEL, GenerateOptions

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..diffusion.schedule import MaskAndReplaceSchedule


@dataclass(frozen=True)
class Start:
    """Where a batch's chain starts: the timestep (None: T-1) and the masked candidates (None: every token)."""

    step: int | None = None
    masked: int | None = None
    expected: bool = False  # `masked` is an expectation (a variation's start draw)


# (the model's architecture, its schedule) -> where the chain starts
CallBasis = Callable[["PipelineConfig", "MaskAndReplaceSchedule"], Start | None]


def local_config(settings: Any) -> PipelineConfig | None:
    """The model's architecture if it can be read without loading or fetching anything, else None."""
    from ..checkpoint.cache import ModelCache
    from ..checkpoint.hub import Hub, is_commit, is_repo_id
    from ..checkpoint.layout import pipeline_config, read_pipeline_config
    from ..checkpoint.random import shipped_configs

    model = str(settings["model"])
    try:
        path = Path(model).expanduser()
        if path.is_dir():
            return read_pipeline_config(path)
        if not is_repo_id(model):
            return None
        revision = settings["revision"] or "main"
        cache = ModelCache(Path(settings["cache_dir"]) if settings["cache_dir"] else None)
        commit = revision if is_commit(revision) else cache.read_ref(model, revision)
        for entry in cache.entries(model):
            if commit is None or entry.key.commit == commit:
                return read_pipeline_config(entry.path)
        hub = Hub.from_env()
        commit = hub.cached_commit(model, revision)
        snapshot = hub.cached_snapshot(model, commit) if commit else None
        if snapshot is not None:
            return read_pipeline_config(snapshot[0])
        if model == DEFAULT_MODEL:
            return pipeline_config(shipped_configs())
    except (VqdiffError, OSError, ValueError, KeyError):
        return None
    return None


def dry_run_calls(settings: Any, options: GenerateOptions, basis: CallBasis | None) -> dict[str, Any]:
    """{"network_calls": per batch or None, "timesteps": visited or None, "expected": bool, "why": text}."""
    config = local_config(settings)
    if config is None:
        return {"network_calls": None, "timesteps": None, "expected": False, "why": "the model's configs are not here"}
    from ..diffusion.schedule import MaskAndReplaceSchedule
    from ..pipeline.pipeline import planned_network_calls

    schedule = MaskAndReplaceSchedule.from_config(config.scheduler)
    try:
        start = basis(config, schedule) if basis is not None else Start()
        if start is None:
            return {"network_calls": 0, "timesteps": 0, "expected": False, "why": "nothing to sample"}
        timesteps = options.timesteps(config.num_train_timesteps, start=start.step)
    except VqdiffError as e:
        return {"network_calls": None, "timesteps": None, "expected": False, "why": e.message}
    calls = planned_network_calls(schedule, config.transformer.num_latent_pixels, timesteps, options, start.masked)
    return {
        "network_calls": calls,
        "timesteps": len(timesteps),
        "expected": start.expected and options.budgeted,
        "why": "",
    }


def calls_line(found: dict[str, Any]) -> str:
    """The dry run's line, e.g. "network calls: 100 per batch (100 timesteps)"."""
    if found["network_calls"] is None:
        return f"  network calls: known once the model loads ({found['why']})"
    about = "about " if found["expected"] else ""
    return f"  network calls: {about}{found['network_calls']} per batch ({found['timesteps']} timesteps)"
