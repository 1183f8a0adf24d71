"""Which files a load needs: for each weight component the best file of the variant asked for (and its shards), and
the small files besides (configs, tokenizer). One chain chooses them, from a folder on disk or a Hub listing."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PipelineConfig
from ..errors import MissingFilesError, UsageError, WeightsError, excerpt
from ..options import VARIANTS
from .layout import CONFIG_FILES, WEIGHT_COMPONENTS, candidates, check_model_index, read_json, read_pipeline_config

SMALL_FILES = ("model_index.json", *CONFIG_FILES.values())  # with every file of the tokenizer folder


@dataclass(frozen=True)
class WeightFiles:
    """The file(s) holding one component's weights, in one format and variant."""

    paths: tuple[Path, ...]
    variant: str  # "fp16" or "fp32"
    fmt: str  # "safetensors" or "bin"


def variant_order(variant: str, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """Variants to try, best first: an explicit one alone; 'auto' prefers fp16 files for half precision."""
    if variant == "fp32":
        return ("fp32",)
    if variant == "fp16":
        return ("fp16",)
    if variant != "auto":
        raise UsageError(
            f"unknown variant '{excerpt(variant)}'", hint=f"use one of: {', '.join(VARIANTS)}", about=("variant",)
        )
    half = dtype in (torch.float16, torch.bfloat16)
    return ("fp16", "fp32") if half else ("fp32", "fp16")


def _choose(
    component: str, variant: str, dtype: torch.dtype | None, exists: Callable[[str], bool]
) -> tuple[str, str, str] | str:
    """The path (a file, or a shard index) of one component's weights that `exists`, best variant first and
    safetensors before .bin, with its variant and format; else the names looked for."""
    order = variant_order(variant, dtype)
    for v in order:
        for name, fmt in candidates(component, v):
            for path in (f"{component}/{name}", f"{component}/{name}.index.json"):
                if exists(path):
                    return path, v, fmt
    return " or ".join(n for v in order for n, _ in candidates(component, v))


def find_weight_files(root: Path, component: str, variant: str, dtype: torch.dtype | None = None) -> WeightFiles:
    """Pick one component's files in a folder; 'auto' takes the variant matching `dtype` (fp32 without one), else
    the other."""
    chosen = _choose(component, variant, dtype, lambda path: (root / path).is_file())
    if isinstance(chosen, str):
        raise WeightsError(f"no weights for {component} in {excerpt(root / component)} (looked for {chosen})")
    path, v, fmt = chosen
    if not path.endswith(".index.json"):
        return WeightFiles((root / path,), v, fmt)
    paths = tuple(root / s for s in shard_files(root / path, component))
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise WeightsError(f"{excerpt(root / path)} names missing shard(s): {', '.join(missing)}")
    return WeightFiles(paths, v, fmt)


def is_small_file(path: str) -> bool:
    """A file a load needs besides weights: model_index.json, a config, or a file of the tokenizer folder."""
    return path in SMALL_FILES or path.startswith("tokenizer/")


def metadata_files(listing: Collection[str]) -> list[str]:
    """The small files a load needs besides weights: every config and the whole tokenizer folder."""
    missing = [f for f in SMALL_FILES if f not in listing]
    if missing:
        raise MissingFilesError(f"no {', '.join(missing)}")
    tokenizer = sorted(f for f in listing if f.startswith("tokenizer/"))
    if not tokenizer:
        raise MissingFilesError("no tokenizer folder")
    return [*SMALL_FILES, *tokenizer]


def listed_weight_file(listing: Collection[str], component: str, variant: str, dtype: torch.dtype) -> str:
    """The one file (or shard index) to fetch for a component: best variant first, safetensors before .bin."""
    chosen = _choose(component, variant, dtype, lambda path: path in listing)
    if isinstance(chosen, str):
        hint = "use --variant auto, or the variant that exists" if variant != "auto" else None
        raise MissingFilesError(f"no weights for {component} (looked for {chosen})", hint=hint)
    return chosen[0]


def weight_files_needed(cfg: PipelineConfig) -> tuple[str, ...]:
    """Weight components a load reads: the null embedding only when it is learned."""
    skip = () if cfg.null_embedding.learnable else ("learned_classifier_free_sampling_embeddings",)
    return tuple(c for c in WEIGHT_COMPONENTS if c not in skip)


def shard_files(index_file: Path, component: str) -> list[str]:
    """Repository paths of the shards a `*.index.json` names."""
    weight_map = read_json(index_file).get("weight_map", {})
    return [f"{component}/{s}" for s in sorted(set(weight_map.values()))]


def files_needed(
    listing: Collection[str],
    folder: Path,
    variant: str,
    dtype: torch.dtype,
    have: Callable[[list[str]], object] = lambda paths: None,
) -> list[str]:
    """Every file a load of `folder` reads, chosen from `listing` (paths in the repository), stage by stage: the small
    files, then the weight files the configs call for, then the shards their indexes name. `have(paths)` is called
    with each stage before the next one reads it (a download fetches the files there). MissingFilesError names what
    `listing` lacks."""
    if "model_index.json" not in listing:
        raise MissingFilesError("no model_index.json")
    have(["model_index.json"])
    check_model_index(folder)
    small = metadata_files(listing)
    have(small)
    cfg = read_pipeline_config(folder)
    big = [listed_weight_file(listing, c, variant, dtype) for c in weight_files_needed(cfg)]
    have(big)
    shards = [s for path in big if path.endswith(".index.json") for s in shard_files(folder / path, path.split("/")[0])]
    missing = [s for s in shards if s not in listing]
    if missing:
        raise MissingFilesError(f"no {', '.join(missing)} (named by its shard index)")
    have(shards)
    return [*small, *big, *shards]
