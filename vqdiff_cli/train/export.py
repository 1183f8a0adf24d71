"""What training writes for others to load: a diffusers `VQModel` folder, a complete VQ-Diffusion pipeline folder
(through `synthetic.write_pipeline_folder`, the one writer of that layout), and a peft LoRA adapter.

The config dicts are the JSON diffusers and transformers read (`*_json` below are the inverse of
`config.*.from_diffusers`); weights are safetensors with today's key names.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.convert import save_safetensors
from ..checkpoint.random import write_pipeline_folder
from ..config import NullEmbeddingConfig, PipelineConfig, SchedulerConfig, TransformerConfig, VQVAEConfig
from ..files import atomic_write

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these folders are checked against
PIPELINE_INDEX: dict[str, Any] = {
    "_class_name": "VQDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "learned_classifier_free_sampling_embeddings": ["vq_diffusion", "LearnedClassifierFreeSamplingEmbeddings"],
    "scheduler": ["diffusers", "VQDiffusionScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "transformer": ["diffusers", "Transformer2DModel"],
    "vqvae": ["diffusers", "VQModel"],
}
PIPELINE_ENTRIES = ("model_index.json", *(k for k in PIPELINE_INDEX if not k.startswith("_")))
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"


def transformer_json(cfg: TransformerConfig) -> dict[str, Any]:
    return {
        "_class_name": "Transformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "activation_fn": "geglu-approximate",
        "attention_bias": cfg.attention_bias,
        "attention_head_dim": cfg.attention_head_dim,
        "cross_attention_dim": cfg.cross_attention_dim,
        "dropout": 0.0,
        "in_channels": None,
        "norm_elementwise_affine": cfg.norm_elementwise_affine,
        "norm_eps": cfg.norm_eps,
        "norm_num_groups": 32,
        "norm_type": "ada_norm",  # diffusers 0.42.1 cannot load a config without it (parity trap 15)
        "num_attention_heads": cfg.num_attention_heads,
        "num_embeds_ada_norm": cfg.num_embeds_ada_norm,
        "num_layers": cfg.num_layers,
        "num_vector_embeds": cfg.num_vector_embeds,
        "sample_size": cfg.sample_size,
    }


def vqvae_json(cfg: VQVAEConfig, sample_size: int) -> dict[str, Any]:
    return {
        "_class_name": "VQModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": list(cfg.down_block_types),
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.layers_per_block,
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "norm_num_groups": cfg.norm_num_groups,
        "num_vq_embeddings": cfg.num_vq_embeddings,
        "out_channels": cfg.out_channels,
        "sample_size": sample_size,
        "up_block_types": list(cfg.up_block_types),
        "vq_embed_dim": cfg.vq_embed_dim,
    }


def scheduler_json(cfg: SchedulerConfig) -> dict[str, Any]:
    return {
        "_class_name": "VQDiffusionScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "alpha_cum_end": cfg.alpha_cum_end,
        "alpha_cum_start": cfg.alpha_cum_start,
        "gamma_cum_end": cfg.gamma_cum_end,
        "gamma_cum_start": cfg.gamma_cum_start,
        "num_train_timesteps": cfg.num_train_timesteps,
        "num_vec_classes": cfg.num_vec_classes,
    }


def null_embedding_json(cfg: NullEmbeddingConfig) -> dict[str, Any]:
    return {
        "_class_name": "LearnedClassifierFreeSamplingEmbeddings",
        "_diffusers_version": DIFFUSERS_VERSION,
        "hidden_size": cfg.hidden_size,
        "learnable": cfg.learnable,
        "length": cfg.length,
    }


def pipeline_configs(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Every JSON file of a pipeline folder, keyed as `synthetic.write_pipeline_folder` takes them."""
    return {
        "model_index": dict(PIPELINE_INDEX),
        "transformer": transformer_json(cfg.transformer),
        "vqvae": vqvae_json(cfg.vqvae, cfg.image_size),
        "scheduler": scheduler_json(cfg.scheduler),
        "learned_classifier_free_sampling_embeddings": null_embedding_json(cfg.null_embedding),
        "text_encoder": dict(cfg.text_encoder),
    }


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype) for k, v in state.items()}


def export_pipeline(
    folder: Path,
    cfg: PipelineConfig,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    tokenizer_dir: Path,
) -> None:
    """Write the pipeline folder's entries into `folder` (which may hold other files, e.g. a training run).

    Everything is written into a temporary folder beside, then each entry replaces the old one, so an interrupted
    export never leaves a half-written component. `states` holds "transformer", "vqvae", "text_encoder" and, for a
    learned null embedding, "learned_classifier_free_sampling_embeddings" ({"embeddings": (L, D)}).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".export-{uuid.uuid4().hex[:8]}"
    try:

        def copy_tokenizer(target: Path) -> None:
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(tokenizer_dir.iterdir()):
                if f.is_file():
                    shutil.copyfile(f, target / f.name)

        cpu_states = {k: _cpu_state(v) for k, v in states.items()}
        write_pipeline_folder(tmp, pipeline_configs(cfg), cpu_states, copy_tokenizer, "safetensors")
        for entry in PIPELINE_ENTRIES:
            _replace(tmp / entry, folder / entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def export_vqvae(folder: Path, cfg: VQVAEConfig, state: Mapping[str, torch.Tensor], sample_size: int) -> None:
    """A diffusers `VQModel` folder: config.json and diffusion_pytorch_model.safetensors, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tmp = folder / f".{weights.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_safetensors(_cpu_state(state), tmp)
        os.replace(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    text = json.dumps(vqvae_json(cfg, sample_size), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "config.json", lambda f: f.write(text.encode()), overwrite=True)


def export_lora(folder: Path, adapter_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """A peft adapter folder: adapter_config.json and adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / LORA_WEIGHTS
    tmp = folder / f".{weights.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_safetensors(_cpu_state(state), tmp)
        os.replace(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    text = json.dumps(dict(adapter_config), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / LORA_CONFIG, lambda f: f.write(text.encode()), overwrite=True)
