"""The layout of a diffusers-format VQ-Diffusion checkpoint folder: its components, its config files (read into a
`PipelineConfig` here), weight file names and variants, and the key renames between older files and vqdiff's
modules, both ways.

A folder holds `model_index.json` and one sub-folder per component. Weights come as `.safetensors` or pickled `.bin`,
optionally as the `fp16` variant (`*.fp16.safetensors`, `*.fp16.bin`) or sharded with an `*.index.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..config import NullEmbeddingConfig, PipelineConfig, SchedulerConfig, TransformerConfig, VQVAEConfig
from ..errors import UnreadableFileError, WeightsError, excerpt

COMPONENTS = (
    "vqvae",
    "transformer",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "learned_classifier_free_sampling_embeddings",
)
WEIGHT_COMPONENTS = ("vqvae", "transformer", "text_encoder", "learned_classifier_free_sampling_embeddings")
FLOAT32_COMPONENTS = ("text_encoder", "learned_classifier_free_sampling_embeddings")  # run in float32 at any dtype
CONFIG_FILES = {
    "transformer": "transformer/config.json",
    "vqvae": "vqvae/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "learned_classifier_free_sampling_embeddings": "learned_classifier_free_sampling_embeddings/config.json",
    "text_encoder": "text_encoder/config.json",
}

_OLD_VQ_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_VQ_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_VQ_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"missing file: {excerpt(path)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFileError(f"cannot read {excerpt(path)}: {e}", path) from None
    if not isinstance(data, dict):
        raise WeightsError(f"{excerpt(path)} is not a JSON object")
    return data


def weight_file_name(component: str, fmt: str, variant: str = "fp32") -> str:
    """The file one component's weights are in, in a format ("safetensors" or "bin") and variant ("fp16" or "fp32"):
    diffusers' name, and transformers' for the text encoder (model.safetensors, pytorch_model.bin)."""
    if component == "text_encoder":
        stem = "model" if fmt == "safetensors" else "pytorch_model"
    else:
        stem = "diffusion_pytorch_model"
    return f"{stem}{'.fp16' if variant == 'fp16' else ''}.{fmt}"


def candidates(component: str, variant: str) -> Iterator[tuple[str, str]]:
    """(file name, format) in order of preference for one variant; safetensors first."""
    for fmt in ("safetensors", "bin"):
        yield weight_file_name(component, fmt, variant), fmt


def renamed_key(component: str, key: str) -> str | None:
    """The current name of a key older files use (the only renames vqdiff needs); None for a key to drop."""
    if component == "vqvae":
        m = _OLD_VQ_KEY.match(key)
        if m:
            return f"{m.group(1)}.{_OLD_VQ_ATTENTION[m.group(2)]}.{m.group(3)}"
    elif component == "text_encoder":
        key = key.removeprefix("text_model.")
        if key == "embeddings.position_ids":
            return None  # a buffer transformers recomputes
    return key


T = TypeVar("T")


def rename_keys(component: str, state: Mapping[str, T]) -> dict[str, T]:
    """Map the names older files use onto the current ones (of tensors, or of anything else keyed alike)."""
    return {new: v for k, v in state.items() if (new := renamed_key(component, k)) is not None}


def hub_names(component: str, state: Mapping[str, T]) -> dict[str, T]:
    """The names the Hub's 2022 fp32 files use, the other way from `rename_keys`: the VQ-VAE's attention projections
    as query/key/value/proj_attn, the CLIP text encoder's keys under `text_model.`."""
    if component == "text_encoder":
        return {f"text_model.{k}": v for k, v in state.items()}
    if component != "vqvae":
        return dict(state)
    old = {new: name for name, new in _OLD_VQ_ATTENTION.items()}
    out = {}
    for key, value in state.items():
        m = _NEW_VQ_KEY.match(key)
        out[f"{m.group(1)}.{old[m.group(2)]}.{m.group(3)}" if m else key] = value
    return out


def check_model_index(root: Path) -> dict[str, Any]:
    """model_index.json, with every component the pipeline needs."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise WeightsError(
            f"{excerpt(root)} is not a diffusers VQ-Diffusion checkpoint: it has no model_index.json",
            hint="pass a folder saved in diffusers' format, or a Hub repo id such as microsoft/vq-diffusion-ithq",
        )
    index = read_json(index_path)
    name = index.get("_class_name")
    if name not in (None, "VQDiffusionPipeline"):
        raise WeightsError(f"{excerpt(root)} holds a {name}, not a VQDiffusionPipeline")
    missing = [c for c in COMPONENTS if c not in index]
    if missing:
        hint = None
        if "learned_classifier_free_sampling_embeddings" in missing:
            hint = (
                "the Hub's old 'fp16' branch lacks the learned null embeddings; use revision 'main' with "
                "--variant fp16 instead"
            )
        raise WeightsError(f"{excerpt(root)}/model_index.json lists no {', '.join(missing)} component", hint=hint)
    return index


def read_configs(root: Path) -> dict[str, dict[str, Any]]:
    """Every component's config file of the folder, by component."""
    return {component: read_json(root / file) for component, file in CONFIG_FILES.items()}


def pipeline_config(configs: Mapping[str, dict[str, Any]]) -> PipelineConfig:
    """The architecture the config files (by component) describe, checked."""
    return PipelineConfig(
        transformer=TransformerConfig.from_diffusers(configs["transformer"]),
        vqvae=VQVAEConfig.from_diffusers(configs["vqvae"]),
        scheduler=SchedulerConfig.from_diffusers(configs["scheduler"]),
        null_embedding=NullEmbeddingConfig.from_diffusers(configs["learned_classifier_free_sampling_embeddings"]),
        text_encoder=configs["text_encoder"],
    )


def read_pipeline_config(root: Path) -> PipelineConfig:
    check_model_index(root)
    return pipeline_config(read_configs(root))
