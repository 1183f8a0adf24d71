"""The one module that knows a diffusers-format checkpoint folder: file names, variants, key names, strict loading.

A folder holds `model_index.json` and one sub-folder per component. Weights come as `.safetensors` or pickled `.bin`
(read with `torch.load(weights_only=True)`, never unrestricted pickle), optionally as the `fp16` variant
(`*.fp16.safetensors`, `*.fp16.bin`) or sharded with an `*.index.json`.

It also decides which files of a repository listing a load needs (`files_to_fetch`), and writes a converted copy of a
folder with every component as one safetensors file in the dtype it will run in (`write_converted`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import NullEmbeddingConfig, PipelineConfig, SchedulerConfig, TransformerConfig, VQVAEConfig
from .errors import UsageError, WeightsError

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
        raise WeightsError(f"missing file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return data


def check_model_index(root: Path) -> dict[str, Any]:
    """model_index.json, with every component the pipeline needs."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise WeightsError(
            f"{root} is not a diffusers VQ-Diffusion checkpoint: it has no model_index.json",
            hint="pass a folder saved in diffusers' format, or a Hub repo id such as microsoft/vq-diffusion-ithq",
        )
    index = read_json(index_path)
    name = index.get("_class_name")
    if name not in (None, "VQDiffusionPipeline"):
        raise WeightsError(f"{root} holds a {name}, not a VQDiffusionPipeline")
    missing = [c for c in COMPONENTS if c not in index]
    if missing:
        hint = None
        if "learned_classifier_free_sampling_embeddings" in missing:
            hint = (
                "the Hub's old 'fp16' branch lacks the learned null embeddings; use revision 'main' with "
                "--variant fp16 instead"
            )
        raise WeightsError(f"{root}/model_index.json lists no {', '.join(missing)} component", hint=hint)
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


def read_state_dict(files: WeightFiles) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files.paths:
        try:
            if files.fmt == "safetensors":
                from safetensors.torch import load_file

                part = load_file(str(path), device="cpu")
            else:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # corrupt, truncated or not a weights file: one clear message
            raise WeightsError(f"cannot read weights from {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
        if not isinstance(part, Mapping) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise WeightsError(f"{path} does not hold a flat state dict of tensors")
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


def rename_keys(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the names older files use onto the current ones."""
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


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str, dtype: torch.dtype) -> None:
    """Fill a (meta-device) module from `state`; any missing, unexpected or mis-shaped tensor is one clear error."""
    check_shapes(where, _shapes(module.state_dict()), _shapes(state))
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
    transformer: nn.Module
    vqvae: nn.Module
    text: nn.Module
    variants: dict[str, str]  # component -> "fp16" / "fp32" files that were read


def _load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        raise WeightsError(f"missing tokenizer folder: {folder}")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise WeightsError(f"cannot load the CLIP tokenizer from {folder}: {e}".splitlines()[0]) from None


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
        check_null_embedding(cfg, _shapes(state))
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
        raise WeightsError(f"cannot read {path}: {e.strerror or e}") from None
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
    from .models.text import build_clip_text_model
    from .models.transformer import DiffusionTransformer
    from .models.vqvae import VQVAE

    if component == "learned_classifier_free_sampling_embeddings":
        return {"embeddings": (cfg.null_embedding.length or 0, cfg.null_embedding.hidden_size or 0)}
    module: nn.Module
    if component == "text_encoder":
        module = build_clip_text_model(cfg.text_encoder)
    else:
        with torch.device("meta"):
            module = DiffusionTransformer(cfg.transformer) if component == "transformer" else VQVAE(cfg.vqvae)
    return _shapes(module.state_dict())


def _check_component(cfg: PipelineConfig, component: str, found: Mapping[str, tuple[int, ...]]) -> None:
    if component == "learned_classifier_free_sampling_embeddings":
        check_null_embedding(cfg, found)
    else:
        check_shapes(component, expected_shapes(cfg, component), rename_shapes(component, found))


def rename_shapes(component: str, found: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {new: shape for k, shape in found.items() if (new := renamed_key(component, k)) is not None}


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
        stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
        out = dst / component / f"{stem}{'.fp16' if files.variant == 'fp16' else ''}.safetensors"
        header = safetensors_header(files.paths[0]) if files.fmt == "safetensors" and len(files.paths) == 1 else None
        link = header is not None and _float_dtypes(header) <= {_ST_DTYPES[target]}
        if on_component is not None:
            on_component(component, not link)
        if header is not None and link:
            _check_component(cfg, component, _header_shapes(header))
            _link_or_copy(files.paths[0], out)
        else:
            state = read_state_dict(files)
            _check_component(cfg, component, _shapes(state))
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
