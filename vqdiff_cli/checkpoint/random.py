"""Checkpoints of a real architecture with random weights, for benchmarks and tests; nothing is downloaded.

`write_random_checkpoint` writes a folder in the Hub's layout (fp32 `.bin` files with the old VQ-VAE attention names
and `text_model.`-prefixed CLIP keys, by default) from the configs shipped in `vqdiff_cli/configs/<name>/`, and a
byte-level CLIP tokenizer made up on the spot ("!" is id 0, as in CLIP). The images such a model makes are noise;
its sizes, and so its timings, are the real model's.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..config import PipelineConfig
from ..errors import UsageError, excerpt
from ..options import DEFAULT_ARCHITECTURE
from .layout import CONFIG_FILES, hub_names, pipeline_config, weight_file_name

if TYPE_CHECKING:
    from .load import Components

_M = TypeVar("_M", bound=torch.nn.Module)

_SHIPPED_FILES = {component: f"{component}.json" for component in CONFIG_FILES}  # vqdiff_cli/configs/<name>/


def shipped_configs(name: str = DEFAULT_ARCHITECTURE) -> dict[str, dict[str, Any]]:
    """The JSON configs of a known architecture, keyed by component (plus 'model_index')."""
    folder = resources.files("vqdiff_cli") / "configs" / name
    out = {c: json.loads((folder / f).read_text(encoding="utf-8")) for c, f in _SHIPPED_FILES.items()}
    out["model_index"] = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return out


def configs_from_folder(folder: Path) -> dict[str, dict[str, Any]]:
    """The same JSON files as a shipped architecture, read from `folder` (for made-up architectures)."""
    out: dict[str, dict[str, Any]] = {}
    for component, name in (*_SHIPPED_FILES.items(), ("model_index", "model_index.json")):
        path = folder / name
        try:
            out[component] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the architecture config {excerpt(path)}: {e}".splitlines()[0]) from None
    return out


def architecture_configs(name_or_folder: str) -> dict[str, dict[str, Any]]:
    """A shipped architecture by name ('ithq'), or a folder holding the same JSON files."""
    folder = Path(name_or_folder).expanduser()
    if folder.is_dir():
        return configs_from_folder(folder)
    shipped = resources.files("vqdiff_cli") / "configs"
    names = sorted(p.name for p in shipped.iterdir() if p.is_dir())
    if name_or_folder not in names:
        raise UsageError(
            f"unknown architecture '{excerpt(name_or_folder)}'",
            hint=f"use one of: {', '.join(names)}, or a folder of configs",
        )
    return shipped_configs(name_or_folder)


def byte_symbols() -> list[str]:
    """The 256 symbols of byte-level BPE in CLIP's vocabulary order: the printable Latin-1 bytes (standing for
    themselves, "!" first), then the other bytes, mapped to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def write_clip_tokenizer(
    folder: Path, words: list[str] | None = None, vocab_size: int | None = None, max_length: int = 77
) -> int:
    """A CLIP-style BPE tokenizer: merges that spell out `words`, then filler merges up to `vocab_size` entries;
    prompts are padded to (or cut at) `max_length` tokens.

    Writes vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json; returns the vocabulary size.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = byte_symbols()
    vocab = [*base, *(s + "</w>" for s in base)]
    known = set(vocab)
    merges: list[str] = []

    def add(left: str, right: str) -> str:
        merged = left + right
        line = f"{left} {right}"
        if merged not in known:
            merges.append(line)
            vocab.append(merged)
            known.add(merged)
        return merged

    for word in words or []:  # "teddy": t e -> te, te d -> ted, ted d -> tedd, tedd y</w> -> teddy</w>
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            parts = [add(parts[0], parts[1]), *parts[2:]]
    if vocab_size is not None:
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        for left in [*letters, *base]:
            for right in [*(c + "</w>" for c in letters), *letters, *base]:
                if len(vocab) + 2 >= vocab_size:
                    break
                add(left, right)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    tok_config = {**special, "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    return len(vocab)


@torch.no_grad()
def random_modules(cfg: PipelineConfig, seed: int = 0) -> dict[str, torch.nn.Module | torch.Tensor]:
    """Our networks with random weights (small normal values, so activations stay finite at full depth)."""
    from ..models.text import build_clip_text_model
    from ..models.transformer import DiffusionTransformer
    from ..models.vqvae import VQVAE

    g = torch.Generator().manual_seed(seed)
    text = build_clip_text_model(cfg.text_encoder).to_empty(device="cpu")
    for module in text.modules():  # to_empty left the position ids uninitialised, like every other tensor
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor):
            ids.copy_(torch.arange(ids.shape[-1]).expand(ids.shape))
    modules: dict[str, Any] = {
        "transformer": _empty(DiffusionTransformer, cfg.transformer),
        "vqvae": _empty(VQVAE, cfg.vqvae),
        "text_encoder": text,
    }
    for module in modules.values():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    null = cfg.null_embedding
    if null.learnable:
        modules["learned_classifier_free_sampling_embeddings"] = (
            torch.randn(null.length or 77, null.hidden_size or 512, generator=g) * 0.1
        )
    return modules


def random_components(
    configs: dict[str, dict[str, Any]], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Components:
    """Loaded-model components with random weights, built in memory (the tokenizer goes through a temporary folder).

    Like `load.load_components`: the transformer and VQ-VAE take `dtype`, the text encoder stays float32.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..models.text import TextConditioning
    from ..models.transformer import DiffusionTransformer
    from ..models.vqvae import VQVAE
    from .load import Components

    cfg = pipeline_config(configs)
    modules = random_modules(cfg, seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp), vocab_size=int(configs["text_encoder"].get("vocab_size", 49408)))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)

    def place(name: str, kind: type[_M], target: torch.dtype) -> _M:
        module = modules[name]
        assert isinstance(module, kind)
        return module.to(device=device, dtype=target).eval().requires_grad_(False)

    null = modules.get("learned_classifier_free_sampling_embeddings")
    assert null is None or isinstance(null, torch.Tensor)
    text_model = place("text_encoder", CLIPTextModel, torch.float32)
    text = TextConditioning(tokenizer, text_model, None if null is None else null.to(device))
    variants = dict.fromkeys(("transformer", "vqvae", "text_encoder"), "random")
    transformer, vqvae = place("transformer", DiffusionTransformer, dtype), place("vqvae", VQVAE, dtype)
    return Components(cfg, transformer, vqvae, text, variants)


def _empty(cls: Any, cfg: Any) -> torch.nn.Module:
    """Build on the meta device (no slow default init), then allocate uninitialised CPU memory."""
    with torch.device("meta"):
        module: torch.nn.Module = cls(cfg)
    return module.to_empty(device="cpu")


def write_random_checkpoint(
    folder: Path,
    name: str = DEFAULT_ARCHITECTURE,
    *,
    fmt: str = "bin",
    seed: int = 0,
    configs: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """A diffusers-format folder of the named (or given) architecture with random weights, in the Hub's layout."""
    configs = configs or shipped_configs(name)
    cfg = pipeline_config(configs)
    vocab_size = int(configs["text_encoder"].get("vocab_size", 49408))

    def tokenizer(target: Path) -> None:
        vocab = write_clip_tokenizer(target, vocab_size=vocab_size)
        if vocab != configs["text_encoder"].get("vocab_size", vocab):
            raise ValueError(f"tokenizer has {vocab} entries, text encoder expects {vocab_size}")

    modules = random_modules(cfg, seed)
    states: dict[str, dict[str, torch.Tensor]] = {
        name: hub_names(name, modules[name].state_dict())  # type: ignore[union-attr]
        for name in ("transformer", "vqvae", "text_encoder")
    }
    if "learned_classifier_free_sampling_embeddings" in modules:
        states["learned_classifier_free_sampling_embeddings"] = {
            "embeddings": modules["learned_classifier_free_sampling_embeddings"]  # type: ignore[dict-item]
        }
    return write_pipeline_folder(folder, configs, states, tokenizer, fmt)


def write_pipeline_folder(
    folder: Path,
    configs: dict[str, dict[str, Any]],
    states: dict[str, dict[str, torch.Tensor]],
    write_tokenizer: Callable[[Path], object],
    fmt: str = "safetensors",
) -> Path:
    """Write a diffusers VQ-Diffusion folder in `layout.py`'s layout: model_index.json, each component's config, the
    tokenizer (`write_tokenizer(folder / "tokenizer")`) and each component's weights as one `fmt` ("safetensors" or
    "bin") file. `configs` holds "model_index" and one dict per component; `states` one state dict per weight component.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2), encoding="utf-8")
    for component, file in CONFIG_FILES.items():
        (folder / component).mkdir(exist_ok=True)
        (folder / file).write_text(json.dumps(configs[component], indent=2, sort_keys=True), encoding="utf-8")
    write_tokenizer(folder / "tokenizer")
    for component, state in states.items():
        path = folder / component / weight_file_name(component, fmt)
        if fmt == "bin":
            torch.save(state, path)
        else:
            from .convert import save_safetensors

            save_safetensors(state, path)
    return folder
