"""Converting a checkpoint folder into the one vqdiff's cache keeps: configs and tokenizer copied, every weight
component one safetensors file in the dtype it runs in (shapes checked first; hard-linked when already so); and the
safetensors header check that finds truncated or damaged files.

File names, key names and configs come from `layout.py`, the choice of source files from `select.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PipelineConfig
from ..errors import UnreadableFileError, WeightsError
from .layout import CONFIG_FILES, FLOAT32_COMPONENTS, read_pipeline_config, rename_keys, weight_file_name
from .load import check_null_embedding, check_shapes, read_state_dict, tensor_shapes
from .select import find_weight_files, weight_files_needed

# -- safetensors: inspecting and writing --------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the data it describes fills the file exactly.

    This catches a truncated or overwritten file without reading its tensors.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= length <= size - 8:
                raise WeightsError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(f.read(length))
    except OSError as e:
        raise UnreadableFileError(f"cannot read {path}: {e.strerror or e}", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a safetensors file (bad header)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise WeightsError(f"{path} is not a safetensors file (bad tensor entry)") from None
    if 8 + length + end != size:
        raise WeightsError(f"{path} is truncated or damaged: {size} bytes, its header describes {8 + length + end}")
    return header


def _header_shapes(header: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _float_dtypes(header: Mapping[str, Any]) -> set[str]:
    return {v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"].startswith(("F", "BF"))}


def save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a flat state dict; tensors sharing memory are copied apart (safetensors stores each one once)."""
    from safetensors.torch import save_file

    seen: set[int] = set()  # storages of the tensors kept so far
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        tensor = value.contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(storage)
        out[key] = tensor
    save_file(out, str(path), metadata={"format": "pt"})


# -- converting a folder -------------------------------------------------------------------------------------------


def expected_shapes(cfg: PipelineConfig, component: str) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes the config implies (modules built on the meta device: no memory, no init)."""
    from ..models.text import build_clip_text_model
    from ..models.transformer import DiffusionTransformer
    from ..models.vqvae import VQVAE

    module: nn.Module
    if component == "text_encoder":
        module = build_clip_text_model(cfg.text_encoder)
    else:
        with torch.device("meta"):
            module = DiffusionTransformer(cfg.transformer) if component == "transformer" else VQVAE(cfg.vqvae)
    return tensor_shapes(module.state_dict())


def _check_component(cfg: PipelineConfig, component: str, found: Mapping[str, tuple[int, ...]]) -> None:
    if component == "learned_classifier_free_sampling_embeddings":
        check_null_embedding(cfg, found)
    else:
        check_shapes(component, expected_shapes(cfg, component), rename_keys(component, found))


@dataclass(frozen=True)
class ConvertedWeights:
    component: str
    variant: str  # of the source files
    sources: tuple[Path, ...]
    path: Path  # the written (or linked) safetensors file
    linked: bool  # hard-linked from a safetensors source already in the right dtype


def stored_dtype(component: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a component's tensors are kept in for a run in `dtype`."""
    return torch.float32 if component in FLOAT32_COMPONENTS else dtype


def write_converted(
    src: Path,
    dst: Path,
    dtype: torch.dtype,
    variant: str = "auto",
    on_component: Callable[[str, bool], None] | None = None,
) -> list[ConvertedWeights]:
    """Write into the new folder `dst` a copy of the checkpoint at `src` that loads fast with `load_components`.

    Configs and tokenizer files are copied as they are. Each weight component becomes one safetensors file, under the
    name of the variant it was read from, in the dtype it runs in (`stored_dtype`), after its shapes were checked
    against the configs. A safetensors source already in that dtype is hard-linked (copied across file systems).
    `on_component(name, converting)` is called before each component.
    """
    cfg = read_pipeline_config(src)
    dst.mkdir(parents=True, exist_ok=False)
    for rel in ("model_index.json", *CONFIG_FILES.values()):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    tokenizer = src / "tokenizer"
    for f in sorted(tokenizer.iterdir()) if tokenizer.is_dir() else []:
        if f.is_file():
            (dst / "tokenizer").mkdir(exist_ok=True)
            shutil.copyfile(f, dst / "tokenizer" / f.name)
    done = []
    for component in weight_files_needed(cfg):
        files = find_weight_files(src, component, variant, dtype)
        target = stored_dtype(component, dtype)
        out = dst / component / weight_file_name(component, "safetensors", files.variant)
        header = safetensors_header(files.paths[0]) if files.fmt == "safetensors" and len(files.paths) == 1 else None
        link = header is not None and _float_dtypes(header) <= {_ST_DTYPES[target]}
        if on_component is not None:
            on_component(component, not link)
        if header is not None and link:
            _check_component(cfg, component, _header_shapes(header))
            _link_or_copy(files.paths[0], out)
        else:
            state = read_state_dict(files)
            _check_component(cfg, component, tensor_shapes(state))
            save_safetensors({k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}, out)
            del state
        done.append(ConvertedWeights(component, files.variant, files.paths, out, link))
    return done


def _link_or_copy(src: Path, dst: Path) -> None:
    real = Path(os.path.realpath(src))
    try:
        os.link(real, dst)
    except OSError:
        shutil.copyfile(real, dst)
