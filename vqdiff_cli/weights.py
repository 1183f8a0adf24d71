"""The one module that knows a diffusers-format checkpoint folder: file names, variants, key names, strict loading.

A folder holds `model_index.json` and one sub-folder per component. Weights come as `.safetensors` or pickled `.bin`
(read with `torch.load(weights_only=True)`, never unrestricted pickle), optionally as the `fp16` variant
(`*.fp16.safetensors`, `*.fp16.bin`) or sharded with an `*.index.json`.

It also decides which files of a repository listing a load needs (`files_to_fetch`); `convert.py` writes the
converted copy of a folder that the cache keeps.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from .config import NullEmbeddingConfig, PipelineConfig, SchedulerConfig, TransformerConfig, VQVAEConfig
from .errors import UsageError, WeightsError, excerpt

if TYPE_CHECKING:
    from .models.text import TextConditioning
    from .models.transformer import DiffusionTransformer
    from .models.vqvae import VQVAE

COMPONENTS = (
    "vqvae",
    "transformer",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "learned_classifier_free_sampling_embeddings",
)
WEIGHT_COMPONENTS = ("vqvae", "transformer", "text_encoder", "learned_classifier_free_sampling_embeddings")
VARIANTS = ("auto", "fp16", "fp32")
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
        raise WeightsError(f"missing file: {excerpt(path)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {excerpt(path)}: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{excerpt(path)} is not a JSON object")
    return data


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


def read_pipeline_config(root: Path) -> PipelineConfig:
    check_model_index(root)
    files = {c: root / f for c, f in CONFIG_FILES.items()}
    return PipelineConfig(
        transformer=TransformerConfig.from_diffusers(read_json(files["transformer"])),
        vqvae=VQVAEConfig.from_diffusers(read_json(files["vqvae"])),
        scheduler=SchedulerConfig.from_diffusers(read_json(files["scheduler"])),
        null_embedding=NullEmbeddingConfig.from_diffusers(
            read_json(files["learned_classifier_free_sampling_embeddings"])
        ),
        text_encoder=read_json(files["text_encoder"]),
    )


@dataclass(frozen=True)
class WeightFiles:
    """The file(s) holding one component's weights, in one format and variant."""

    paths: tuple[Path, ...]
    variant: str  # "fp16" or "fp32"
    fmt: str  # "safetensors" or "bin"


def _candidates(component: str, variant: str) -> Iterable[tuple[str, str]]:
    """(file name, format) in order of preference for one variant; safetensors first."""
    stems = _STEMS.get(component, _DIFFUSERS_STEMS)
    infix = ".fp16" if variant == "fp16" else ""
    for fmt in ("safetensors", "bin"):
        for stem in stems:
            if component == "text_encoder" and (fmt, stem) in (("safetensors", "pytorch_model"), ("bin", "model")):
                continue  # transformers writes model.safetensors and pytorch_model.bin
            yield f"{stem}{infix}.{fmt}", fmt


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
            raise WeightsError(f"{excerpt(index)} names missing shard(s): {', '.join(missing)}")
        return paths
    return None


def variant_order(variant: str, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """Variants to try, best first: an explicit one alone; 'auto' prefers fp16 files for half precision."""
    if variant == "fp32":
        return ("fp32",)
    if variant == "fp16":
        return ("fp16",)
    if variant != "auto":
        raise UsageError(f"unknown variant '{excerpt(variant)}'", hint=f"use one of: {', '.join(VARIANTS)}")
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
    raise WeightsError(f"no weights for {component} in {excerpt(folder)} (looked for {wanted})")


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
            raise WeightsError(
                f"cannot read weights from {excerpt(path)}: {type(e).__name__}: {e}".splitlines()[0]
            ) from None
        if not isinstance(part, Mapping) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise WeightsError(f"{excerpt(path)} does not hold a flat state dict of tensors")
        state.update(part)
    return state


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
    from .models.text import TextConditioning, build_clip_text_model, restore_position_ids
    from .models.transformer import DiffusionTransformer
    from .models.vqvae import VQVAE

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


# -- choosing files from a repository listing ---------------------------------------------------------------------


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
