"""Where the transformer stage's parts come from: a frozen VQ-VAE (a VQModel folder, a pipeline folder or a Hub id),
a CLIP text encoder and tokenizer (a pipeline's, or a tokenizer built from the captions with the config of a small
text model trained from scratch), and the LoRA layers that fine-tune a transformer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint.layout import read_json, rename_keys
from ..checkpoint.load import load_strict, read_state_dict
from ..checkpoint.random import write_clip_tokenizer
from ..checkpoint.select import find_weight_files
from ..config import VQVAEConfig
from ..errors import UsageError
from ..models.text import TextConditioning, build_clip_text_model, restore_position_ids
from ..models.transformer import DiffusionTransformer, TransformerBlock
from ..models.vqvae import VQVAE

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TEXT_LENGTH = 77  # CLIP's: the most positions a text encoder trained from scratch gets
LORA_TARGETS = r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.ff\.net\.(0\.proj|2)"
_WORD = re.compile(r"[^\W\d_]+|\d|[^\s\w]+", re.UNICODE)  # CLIP's pre-tokenizer split: letters, digits, punctuation


# -- loading ---------------------------------------------------------------------------------------------


def prepared_folder(model: str, offline: bool, cache_dir: Path | None) -> Path:
    """A local pipeline folder, or a Hub repo id fetched into the caches (float32 weights)."""
    from ..checkpoint.resolve import prepare

    return prepare(model, dtype="float32", offline=offline, cache_dir=cache_dir).folder


def load_vqvae(source: str, offline: bool = False, cache_dir: Path | None = None) -> tuple[VQVAE, int]:
    """A VQModel folder (config.json + weights) or a pipeline folder / Hub id (its vqvae/), and its native size."""
    path = Path(source).expanduser()
    if not path.exists() and "/" in source and not source.startswith((".", "/")):
        path = prepared_folder(source, offline, cache_dir)
    if not path.is_dir():
        raise UsageError(f"--vqvae {source}: not a folder")
    native = None
    if (path / "model_index.json").is_file():
        from ..checkpoint.layout import read_pipeline_config

        native = read_pipeline_config(path).image_size
        path = path / "vqvae"
    if not (path / "config.json").is_file():
        raise UsageError(f"--vqvae {source}: no config.json (expected a diffusers VQModel folder)")
    raw = read_json(path / "config.json")
    cfg = VQVAEConfig.from_diffusers(raw)
    with torch.device("meta"):
        vqvae = VQVAE(cfg)
    files = find_weight_files(path.parent, path.name, "auto")
    load_strict(vqvae, rename_keys("vqvae", read_state_dict(files)), "vqvae", torch.float32)
    return vqvae.eval().requires_grad_(False), native or int(raw.get("sample_size", 32))


def load_text(source: str, offline: bool, cache_dir: Path | None) -> tuple[TextConditioning, dict[str, Any], Path]:
    """The CLIP text encoder and tokenizer of a pipeline folder or Hub id: (text, its config, its tokenizer folder)."""
    from transformers import CLIPTokenizer

    path = Path(source).expanduser()
    if not path.exists():
        path = prepared_folder(source, offline, cache_dir)
    config = read_json(path / "text_encoder" / "config.json")
    text_model = build_clip_text_model(config)
    state = rename_keys("text_encoder", read_state_dict(find_weight_files(path, "text_encoder", "auto")))
    load_strict(text_model, state, "text_encoder", torch.float32)
    restore_position_ids(text_model)
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    return TextConditioning(tokenizer, text_model, None), config, path / "tokenizer"


def caption_words(captions: list[str]) -> list[str]:
    """The distinct words of the captions as CLIP's tokenizer splits them (lower-cased), most frequent first."""
    counts: dict[str, int] = {}
    for caption in captions:
        for word in _WORD.findall(caption.lower()):
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))


def build_tokenizer(folder: Path, captions: list[str]) -> CLIPTokenizer:
    """A CLIP-format BPE tokenizer whose merges spell out every caption word (other text falls back to bytes), padding
    to the longest caption's length (with its start and end tokens) rounded up to a multiple of 8, at most
    TEXT_LENGTH: the cross-attention then reads mostly caption positions, not padding that a text encoder trained
    from scratch has not yet learned to fill (on the shapes data: 24 positions instead of 77)."""
    from transformers import CLIPTokenizer

    words = caption_words(captions)
    write_clip_tokenizer(folder, words)
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    longest = max((len(ids) for ids in tokenizer(captions).input_ids), default=2)
    length = min(TEXT_LENGTH, -(-longest // 8) * 8)
    write_clip_tokenizer(folder, words, max_length=length)
    fitted: CLIPTokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return fitted


def text_config(vocab_size: int, width: int, layers: int, length: int = TEXT_LENGTH) -> dict[str, Any]:
    """The `CLIPTextConfig` of a small text encoder trained from scratch (bos/eos are the vocabulary's last two)."""
    return {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": vocab_size - 2,
        "dropout": 0.0,
        "eos_token_id": vocab_size - 1,
        "hidden_act": "quick_gelu",
        "hidden_size": width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4 * width,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": length,
        "model_type": "clip_text_model",
        "num_attention_heads": max(1, width // 64),
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "projection_dim": width,
        "vocab_size": vocab_size,
    }


# -- LoRA ------------------------------------------------------------------------------------------------------------


def init_lora(transformer: DiffusionTransformer, rank: int, alpha: int, seed: int) -> dict[str, Any]:
    """Inject peft LoRA layers (seeded) into the attention and feed-forward projections, freeze everything else;
    returns the adapter's config as JSON types."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(lora, transformer)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_A" in name:  # peft's init draws from the global generator; ours is seeded
                bound = 1 / p.shape[1] ** 0.5
                p.uniform_(-bound, bound, generator=g)
            p.requires_grad_("lora_" in name)
    config: dict[str, Any] = lora.to_dict()  # type: ignore[no-untyped-call]
    config["target_modules"] = LORA_TARGETS
    plain: dict[str, Any] = json.loads(
        json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )
    return plain  # JSON types only: it goes into adapter_config.json and every checkpoint


def scale_cross_attention(transformer: DiffusionTransformer) -> None:
    """Multiply a fresh transformer's cross-attention key and value weights by sqrt(text width).

    The text states are L2-normalised per position (unit norm, as VQ-Diffusion's), while the image states entering
    every other projection are layer-normalised (unit variance per channel, norm sqrt(width)). With one init for all
    weights, the text's keys and values start sqrt(text width) times smaller than the image's (about 11x at width
    128), attention over the text is uniform and carries almost no gradient; scaled, they start at the image's scale.
    On the shapes data this made the text matter about 5x sooner (CE at t = T - 1 with true against shuffled
    captions after 250 steps), and without it 1600 steps had not made the model read its captions at all.
    """
    factor = math.sqrt(transformer.config.cross_attention_dim)
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            assert isinstance(block, TransformerBlock)
            block.attn2.to_k.weight.mul_(factor)
            block.attn2.to_v.weight.mul_(factor)
