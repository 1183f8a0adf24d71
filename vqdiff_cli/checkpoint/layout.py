"""The layout of a diffusers-format VQ-Diffusion checkpoint folder: its components, config files, weight file names
and variants, and the key renames between older files and vqdiff's modules, both ways.

A folder holds `model_index.json` and one sub-folder per component. Weights come as `.safetensors` or pickled `.bin`,
optionally as the `fp16` variant (`*.fp16.safetensors`, `*.fp16.bin`) or sharded with an `*.index.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..errors import WeightsError

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

_STEMS = {"text_encoder": ("model", "pytorch_model")}  # transformers' names; diffusers components use the rest
_DIFFUSERS_STEMS = ("diffusion_pytorch_model",)
_OLD_VQ_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_VQ_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"missing file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return data


def _candidates(component: str, variant: str) -> Iterable[tuple[str, str]]:
    """(file name, format) in order of preference for one variant; safetensors first."""
    stems = _STEMS.get(component, _DIFFUSERS_STEMS)
    infix = ".fp16" if variant == "fp16" else ""
    for fmt in ("safetensors", "bin"):
        for stem in stems:
            if component == "text_encoder" and (fmt, stem) in (("safetensors", "pytorch_model"), ("bin", "model")):
                continue  # transformers writes model.safetensors and pytorch_model.bin
            yield f"{stem}{infix}.{fmt}", fmt


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
