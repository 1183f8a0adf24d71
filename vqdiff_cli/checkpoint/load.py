"""Loading a diffusers-format checkpoint folder: its weight files (`.safetensors`, or pickled `.bin` read with
`torch.load(weights_only=True)`, never unrestricted pickle) and strict, shape-checked filling of the networks.

File names, key names and configs come from `layout.py`, the choice of files from `select.py`; `convert.py` writes the
converted copy of a folder that the cache keeps.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import PipelineConfig
from ..errors import UnreadableFileError, WeightsError, excerpt
from .layout import read_pipeline_config, rename_keys
from .select import WeightFiles, find_weight_files

if TYPE_CHECKING:
    from ..models.text import TextConditioning
    from ..models.transformer import DiffusionTransformer
    from ..models.vqvae import VQVAE


def read_state_dict(files: WeightFiles) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files.paths:
        try:
            if files.fmt == "safetensors":
                from safetensors.torch import load_file

                part = load_file(str(path), device="cpu")
            else:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:  # torch's restricted unpickler refused an object (its advice: run it anyway)
            raise WeightsError(
                f"{excerpt(path)} holds pickled objects that are not plain tensors, and vqdiff never runs such code",
                hint="get the weights as .safetensors, or a copy saved as plain tensors from a source you trust",
            ) from None
        except Exception as e:  # corrupt, truncated or not a weights file: one clear message
            message = f"cannot read weights from {excerpt(path)}: {type(e).__name__}: {e}".splitlines()[0]
            raise UnreadableFileError(message, path) from None
        if not isinstance(part, Mapping) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise WeightsError(f"{excerpt(path)} does not hold a flat state dict of tensors")
        state.update(part)
    return state


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_shapes(where: str, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> None:
    """Any missing, unexpected or mis-shaped tensor is one clear error naming the keys."""
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in expected.keys() & found.keys() if found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {_names(wrong, 3)}")
    if problems:
        raise WeightsError(f"{where} weights do not match its config: " + "; ".join(problems))


def tensor_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str, dtype: torch.dtype) -> None:
    """Fill a (meta-device) module from `state`; any missing, unexpected or mis-shaped tensor is one clear error."""
    check_shapes(where, tensor_shapes(module.state_dict()), tensor_shapes(state))
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(converted, strict=True, assign=True)


def check_null_embedding(cfg: PipelineConfig, found: Mapping[str, tuple[int, ...]]) -> None:
    shape = (cfg.null_embedding.length, cfg.null_embedding.hidden_size)
    if dict(found) != {"embeddings": shape}:
        raise WeightsError(
            f"learned_classifier_free_sampling_embeddings: expected one tensor 'embeddings' of shape {shape}, "
            f"found {_names(f'{k} {v}' for k, v in found.items()) or 'nothing'}"
        )


@dataclass
class Components:
    """The loaded networks of one checkpoint, on their device."""

    config: PipelineConfig
    transformer: DiffusionTransformer
    vqvae: VQVAE
    text: TextConditioning
    variants: dict[str, str]  # component -> "fp16" / "fp32" files that were read


def _load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        raise WeightsError(f"missing tokenizer folder: {excerpt(folder)}")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise WeightsError(f"cannot load the CLIP tokenizer from {excerpt(folder)}: {e}".splitlines()[0]) from None


def load_components(root: Path, device: torch.device, dtype: torch.dtype, variant: str = "auto") -> Components:
    """Build every network from its config on the meta device and fill it strictly from the files under `root`.

    The transformer and VQ-VAE take `dtype`; the text encoder and null embedding stay float32 (they run once per
    prompt, and their states are cast when they enter the transformer).
    """
    from ..models.text import TextConditioning, build_clip_text_model, restore_position_ids
    from ..models.transformer import DiffusionTransformer
    from ..models.vqvae import VQVAE

    cfg = read_pipeline_config(root)

    def files_for(component: str) -> WeightFiles:
        return find_weight_files(root, component, variant, dtype)

    variants: dict[str, str] = {}

    def fill(module: nn.Module, component: str, target: torch.dtype) -> nn.Module:
        files = files_for(component)
        variants[component] = files.variant
        load_strict(module, rename_keys(component, read_state_dict(files)), component, target)
        if component == "text_encoder":
            restore_position_ids(module)
        return module.to(device).eval().requires_grad_(False)

    with torch.device("meta"):
        transformer = DiffusionTransformer(cfg.transformer)
        vqvae = VQVAE(cfg.vqvae)
    fill(transformer, "transformer", dtype)
    fill(vqvae, "vqvae", dtype)

    text_model = build_clip_text_model(cfg.text_encoder)
    fill(text_model, "text_encoder", torch.float32)

    null = None
    if cfg.null_embedding.learnable:
        files = files_for("learned_classifier_free_sampling_embeddings")
        state = read_state_dict(files)
        check_null_embedding(cfg, tensor_shapes(state))
        variants["learned_classifier_free_sampling_embeddings"] = files.variant
        null = state["embeddings"].float().to(device)
    tokenizer = _load_tokenizer(root / "tokenizer")
    text = TextConditioning(tokenizer, text_model, null)
    return Components(cfg, transformer, vqvae, text, variants)
