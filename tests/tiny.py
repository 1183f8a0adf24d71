"""Tiny random VQ-Diffusion checkpoints, built with diffusers' own classes and saved in the Hub's layout.

Nothing is downloaded: the CLIP tokenizer is made from a self-written byte-level vocab and merges file. The Hub's
old key names are written out here (shared/reference/vq-diffusion.md section 4), not taken from vqdiff's loader, so
that a wrong rename table in the loader cannot build a fixture that agrees with it; tests/test_weights.py checks that
diffusers and transformers themselves read these files.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqdiff_cli.checkpoint.random import write_clip_tokenizer

WORDS = ["a", "teddy", "bear", "in", "the", "pool", "red", "ball", "cat", "dog", "on", "hat"]

# diffusers' current VQModel attention names -> those of the Hub's fp32 files (diffusers 0.8's AttentionBlock, 2022)
HUB_VQ_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_CURRENT_VQ_KEY = re.compile(r"(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)")
_HUB_VQ_KEY = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")


def hub_vq_state(state: dict[str, Any]) -> dict[str, Any]:
    """A VQModel state dict with the Hub file's names: `<attn>.to_q.weight` -> `<attn>.query.weight`, ..."""
    out = {}
    for key, value in state.items():
        m = _CURRENT_VQ_KEY.fullmatch(key)
        out[f"{m[1]}.{HUB_VQ_ATTENTION[m[2]]}.{m[3]}" if m else key] = value
    return out


def current_vq_state(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `hub_vq_state`: the names today's diffusers saves."""
    back = {old: new for new, old in HUB_VQ_ATTENTION.items()}
    out = {}
    for key, value in state.items():
        m = _HUB_VQ_KEY.fullmatch(key)
        out[f"{m[1]}.{back[m[2]]}.{m[3]}" if m else key] = value
    return out


def write_tokenizer(folder: Path, words: list[str] = WORDS) -> int:
    """vocab.json + merges.txt in CLIP's layout ("!" is id 0); returns the vocabulary size."""
    return write_clip_tokenizer(folder, words)


@dataclass
class TinySpec:
    """Knobs of a tiny checkpoint. Defaults: 4x4 tokens, 16 codes (K = 17), 16 px images, T = 100."""

    sample_size: int = 4
    num_codes: int = 16
    block_out_channels: tuple[int, ...] = (32, 32, 64)
    num_layers: int = 2
    heads: int = 2
    head_dim: int = 8
    text_width: int = 32
    num_train_timesteps: int = 100
    learnable: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TinyCheckpoint:
    """The diffusers objects (the reference) and their files (what vqdiff loads)."""

    path: Path
    spec: TinySpec
    vqvae: Any
    transformer: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    null: Any

    def pipeline(self) -> Any:
        from diffusers import VQDiffusionPipeline

        return VQDiffusionPipeline(
            vqvae=self.vqvae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            transformer=self.transformer,
            scheduler=self.scheduler,
            learned_classifier_free_sampling_embeddings=self.null,
        )


def build_tiny(path: Path, spec: TinySpec | None = None) -> TinyCheckpoint:
    """Random diffusers components, saved as the Hub's layout: fp32 .bin files, old VQ attention names, no norm_type."""
    from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion import LearnedClassifierFreeSamplingEmbeddings
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = spec or TinySpec()
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    assert tokenizer.pad_token_id == 0

    g = torch.manual_seed(spec.seed)
    levels = len(spec.block_out_channels)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=list(spec.block_out_channels),
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
        latent_channels=8,
        num_vq_embeddings=spec.num_codes,
        vq_embed_dim=4,
        norm_num_groups=32,
        sample_size=spec.sample_size,
    )
    with torch.no_grad():  # a codebook spread like real embeddings, so that encoding uses many codes
        vqvae.quantize.embedding.weight.normal_(generator=g)
    transformer = Transformer2DModel(
        num_attention_heads=spec.heads,
        attention_head_dim=spec.head_dim,
        num_layers=spec.num_layers,
        cross_attention_dim=spec.text_width,
        attention_bias=True,
        sample_size=spec.sample_size,
        num_vector_embeds=spec.num_codes + 1,
        activation_fn="geglu-approximate",
        num_embeds_ada_norm=spec.num_train_timesteps,
        norm_num_groups=32,
        norm_type="ada_norm",
    )
    with torch.no_grad():  # sharper predictions than default init, so the tests see real choices
        transformer.out.weight.normal_(std=0.5, generator=g)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=spec.text_width,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=0,
            hidden_act="quick_gelu",
        )
    )
    null = LearnedClassifierFreeSamplingEmbeddings(
        learnable=spec.learnable,
        hidden_size=spec.text_width if spec.learnable else None,
        length=77 if spec.learnable else None,
    )
    if spec.learnable:
        with torch.no_grad():
            null.embeddings.normal_(std=0.1, generator=g)
    scheduler = VQDiffusionScheduler(num_vec_classes=spec.num_codes + 1, num_train_timesteps=spec.num_train_timesteps)
    for m in (vqvae, transformer, text_encoder, null):
        m.eval()

    save_hub_layout(path, vqvae, transformer, text_encoder, scheduler, null)
    return TinyCheckpoint(path, spec, vqvae, transformer, text_encoder, tokenizer, scheduler, null)


def save_hub_layout(path: Path, vqvae: Any, transformer: Any, text_encoder: Any, scheduler: Any, null: Any) -> None:
    """What the Hub's microsoft/vq-diffusion-ithq main branch looks like, at tiny size."""
    index = {
        "_class_name": "VQDiffusionPipeline",
        "_diffusers_version": "0.8.0.dev0",
        "learned_classifier_free_sampling_embeddings": ["vq_diffusion", "LearnedClassifierFreeSamplingEmbeddings"],
        "scheduler": ["diffusers", "VQDiffusionScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "Transformer2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    for name, module in (
        ("vqvae", vqvae),
        ("transformer", transformer),
        ("learned_classifier_free_sampling_embeddings", null),
    ):
        folder = path / name
        folder.mkdir(exist_ok=True)
        config = dict(module.config)
        config.pop("norm_type", None) if name == "transformer" else None  # the Hub's config has no norm_type
        config = {k: v for k, v in config.items() if not k.startswith("_use_default_values")}
        config["_class_name"] = type(module).__name__
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        if name == "vqvae":
            state = hub_vq_state(state)
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    folder = path / "text_encoder"
    folder.mkdir(exist_ok=True)
    text_encoder.config.to_json_file(str(folder / "config.json"))
    state = {f"text_model.{k}": v.detach().clone().contiguous() for k, v in text_encoder.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    scheduler.save_pretrained(str(path / "scheduler"))


def resave(
    src: Path,
    dst: Path,
    *,
    fmt: str = "safetensors",
    variant: str = "fp32",
    new_vq_names: bool = False,
    drop: tuple[str, ...] = (),
) -> Path:
    """A copy of a tiny checkpoint with its weights in another format, variant or key naming."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    for component in ("vqvae", "transformer", "text_encoder", "learned_classifier_free_sampling_embeddings"):
        folder = dst / component
        old = next(folder.glob("*.bin"))
        state = torch.load(old, weights_only=True)
        old.unlink()
        if component == "vqvae" and new_vq_names:
            state = current_vq_state(state)
        if variant == "fp16":
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        stem = {"text_encoder": "model" if fmt == "safetensors" else "pytorch_model"}.get(
            component, "diffusion_pytorch_model"
        )
        name = f"{stem}{'.fp16' if variant == 'fp16' else ''}.{fmt}"
        if fmt == "safetensors":
            save_file(state, str(folder / name))
        else:
            torch.save(state, folder / name)
    for component in drop:
        shutil.rmtree(dst / component, ignore_errors=True)
    return dst
