"""Which files a load needs: for each weight component the best file of the variant asked for (and its shards), and
the small files besides; chosen from a folder on disk or from a Hub repository's listing."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PipelineConfig
from ..errors import UsageError, WeightsError
from ..options import VARIANTS
from .layout import CONFIG_FILES, WEIGHT_COMPONENTS, _candidates, read_json


@dataclass(frozen=True)
class WeightFiles:
    """The file(s) holding one component's weights, in one format and variant."""

    paths: tuple[Path, ...]
    variant: str  # "fp16" or "fp32"
    fmt: str  # "safetensors" or "bin"


def _resolve_files(folder: Path, name: str, fmt: str) -> tuple[Path, ...] | None:
    single = folder / name
    if single.is_file():
        return (single,)
    index = folder / f"{name}.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        paths = tuple(folder / s for s in shards)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise WeightsError(f"{index} names missing shard(s): {', '.join(missing)}")
        return paths
    return None


def variant_order(variant: str, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """Variants to try, best first: an explicit one alone; 'auto' prefers fp16 files for half precision."""
    if variant == "fp32":
        return ("fp32",)
    if variant == "fp16":
        return ("fp16",)
    if variant != "auto":
        raise UsageError(f"unknown variant '{variant}'", hint=f"use one of: {', '.join(VARIANTS)}")
    half = dtype in (torch.float16, torch.bfloat16)
    return ("fp16", "fp32") if half else ("fp32", "fp16")


def find_weight_files(root: Path, component: str, variant: str, dtype: torch.dtype | None = None) -> WeightFiles:
    """Pick one component's files; 'auto' takes the variant matching `dtype` (fp32 without one), else the other."""
    folder = root / component
    order = variant_order(variant, dtype)
    for v in order:
        for name, fmt in _candidates(component, v):
            paths = _resolve_files(folder, name, fmt)
            if paths:
                return WeightFiles(paths, v, fmt)
    wanted = " or ".join(n for v in order for n, _ in _candidates(component, v))
    raise WeightsError(f"no weights for {component} in {folder} (looked for {wanted})")


def metadata_files(listing: Collection[str]) -> list[str]:
    """The small files a load needs besides weights: every config and the whole tokenizer folder."""
    wanted = ["model_index.json", *CONFIG_FILES.values()]
    missing = [f for f in wanted if f not in listing]
    if missing:
        raise WeightsError(f"the checkpoint has no {', '.join(missing)}")
    tokenizer = sorted(f for f in listing if f.startswith("tokenizer/"))
    if not tokenizer:
        raise WeightsError("the checkpoint has no tokenizer folder")
    return [*wanted, *tokenizer]


def listed_weight_file(listing: Collection[str], component: str, variant: str, dtype: torch.dtype) -> str:
    """The one file (or shard index) to fetch for a component: best variant first, safetensors before .bin."""
    order = variant_order(variant, dtype)
    for v in order:
        for name, _ in _candidates(component, v):
            for path in (f"{component}/{name}", f"{component}/{name}.index.json"):
                if path in listing:
                    return path
    wanted = " or ".join(n for v in order for n, _ in _candidates(component, v))
    hint = "use --variant auto, or the variant that exists" if variant != "auto" else None
    raise WeightsError(f"the checkpoint has no weights for {component} (looked for {wanted})", hint=hint)


def weight_files_needed(cfg: PipelineConfig) -> tuple[str, ...]:
    """Weight components a load reads: the null embedding only when it is learned."""
    skip = () if cfg.null_embedding.learnable else ("learned_classifier_free_sampling_embeddings",)
    return tuple(c for c in WEIGHT_COMPONENTS if c not in skip)


def shard_files(index_file: Path, component: str) -> list[str]:
    """Repository paths of the shards a downloaded `*.index.json` names."""
    weight_map = read_json(index_file).get("weight_map", {})
    return [f"{component}/{s}" for s in sorted(set(weight_map.values()))]
