"""Architecture configs read from a diffusers-format checkpoint's JSON files.

Each `from_diffusers` names every key it reads and raises `WeightsError` on a value we do not implement, instead of
splatting the dict into a constructor. Nothing here knows file names or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import WeightsError, excerpt

_DOWN_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
_UP_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


def _get(d: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise WeightsError(f"{where}: config has no '{key}'")
    return default


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise WeightsError(f"{where}: unsupported configuration: {what}")


@dataclass(frozen=True)
class TransformerConfig:
    """The discrete (vector-embedding) path of diffusers' `Transformer2DModel` with adaptive LayerNorm."""

    num_vector_embeds: int  # K: codebook entries + the mask class
    sample_size: int  # the token grid is sample_size x sample_size
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    cross_attention_dim: int
    num_embeds_ada_norm: int  # rows of the timestep embedding in each AdaLayerNorm
    attention_bias: bool = True
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_latent_pixels(self) -> int:
        return self.sample_size * self.sample_size

    @property
    def mask_id(self) -> int:
        return self.num_vector_embeds - 1

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> TransformerConfig:
        w = "transformer/config.json"
        _require(d.get("in_channels") is None, w, "continuous input (in_channels is set)")
        _require(d.get("patch_size") is None, w, "patch input (patch_size is set)")
        _require(
            _get(d, "activation_fn", w, "geglu") == "geglu-approximate",
            w,
            f"activation_fn={excerpt(repr(d.get('activation_fn')))} (only 'geglu-approximate')",
        )
        num_embeds_ada_norm = _get(d, "num_embeds_ada_norm", w, None)
        norm_type = _get(d, "norm_type", w, "layer_norm")
        # The hub's config has no norm_type: diffusers then switches "layer_norm" to "ada_norm" because
        # num_embeds_ada_norm is set. A config saved by newer diffusers says "ada_norm" outright.
        if norm_type == "layer_norm" and num_embeds_ada_norm is not None:
            norm_type = "ada_norm"
        _require(
            norm_type == "ada_norm" and num_embeds_ada_norm is not None,
            w,
            f"norm_type={excerpt(repr(norm_type))} (only adaptive LayerNorm with num_embeds_ada_norm)",
        )
        for flag in ("only_cross_attention", "double_self_attention", "upcast_attention", "use_linear_projection"):
            _require(not _get(d, flag, w, False), w, f"{flag}=true")
        _require(_get(d, "attention_type", w, "default") == "default", w, "attention_type")
        cross = _get(d, "cross_attention_dim", w)
        _require(cross is not None, w, "no cross_attention_dim (text conditioning is required)")
        return cls(
            num_vector_embeds=int(_get(d, "num_vector_embeds", w)),
            sample_size=int(_get(d, "sample_size", w)),
            num_layers=int(_get(d, "num_layers", w, 1)),
            num_attention_heads=int(_get(d, "num_attention_heads", w, 16)),
            attention_head_dim=int(_get(d, "attention_head_dim", w, 88)),
            cross_attention_dim=int(cross),
            num_embeds_ada_norm=int(num_embeds_ada_norm),
            attention_bias=bool(_get(d, "attention_bias", w, False)),
            norm_eps=float(_get(d, "norm_eps", w, 1e-5)),
            norm_elementwise_affine=bool(_get(d, "norm_elementwise_affine", w, True)),
        )


@dataclass(frozen=True)
class VQVAEConfig:
    """diffusers' `VQModel`: encoder, vector quantizer and decoder with group norm."""

    in_channels: int
    out_channels: int
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    num_vq_embeddings: int
    vq_embed_dim: int
    norm_num_groups: int
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        factor: int = 2 ** (len(self.block_out_channels) - 1)  # int ** int is typed Any (a negative power is a float)
        return factor

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> VQVAEConfig:
        w = "vqvae/config.json"
        _require(_get(d, "act_fn", w, "silu") == "silu", w, f"act_fn={excerpt(repr(d.get('act_fn')))}")
        _require(_get(d, "norm_type", w, "group") == "group", w, f"norm_type={excerpt(repr(d.get('norm_type')))}")
        _require(not _get(d, "lookup_from_codebook", w, False), w, "lookup_from_codebook=true")
        down = tuple(_get(d, "down_block_types", w, ["DownEncoderBlock2D"]))
        up = tuple(_get(d, "up_block_types", w, ["UpDecoderBlock2D"]))
        channels = tuple(int(c) for c in _get(d, "block_out_channels", w, [64]))
        _require(all(b in _DOWN_BLOCKS for b in down), w, f"down_block_types={list(down)}")
        _require(all(b in _UP_BLOCKS for b in up), w, f"up_block_types={list(up)}")
        _require(len(down) == len(channels) == len(up), w, "block lists of different lengths")
        _require(len(channels) > 0, w, "empty block lists")
        latent = int(_get(d, "latent_channels", w, 3))
        embed_dim = _get(d, "vq_embed_dim", w, None)
        return cls(
            in_channels=int(_get(d, "in_channels", w, 3)),
            out_channels=int(_get(d, "out_channels", w, 3)),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=channels,
            layers_per_block=int(_get(d, "layers_per_block", w, 1)),
            latent_channels=latent,
            num_vq_embeddings=int(_get(d, "num_vq_embeddings", w, 256)),
            vq_embed_dim=int(embed_dim) if embed_dim is not None else latent,
            norm_num_groups=int(_get(d, "norm_num_groups", w, 32)),
            mid_block_add_attention=bool(_get(d, "mid_block_add_attention", w, True)),
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """diffusers' `VQDiffusionScheduler`: the linear cumulative mask-and-replace schedule."""

    num_vec_classes: int
    num_train_timesteps: int = 100
    alpha_cum_start: float = 0.99999
    alpha_cum_end: float = 0.000009
    gamma_cum_start: float = 0.000009
    gamma_cum_end: float = 0.99999

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> SchedulerConfig:
        w = "scheduler/scheduler_config.json"
        cfg = cls(
            num_vec_classes=int(_get(d, "num_vec_classes", w)),
            num_train_timesteps=int(_get(d, "num_train_timesteps", w, 100)),
            alpha_cum_start=float(_get(d, "alpha_cum_start", w, 0.99999)),
            alpha_cum_end=float(_get(d, "alpha_cum_end", w, 0.000009)),
            gamma_cum_start=float(_get(d, "gamma_cum_start", w, 0.000009)),
            gamma_cum_end=float(_get(d, "gamma_cum_end", w, 0.99999)),
        )
        _require(cfg.num_train_timesteps >= 2, w, "num_train_timesteps < 2")
        return cfg


@dataclass(frozen=True)
class NullEmbeddingConfig:
    """`LearnedClassifierFreeSamplingEmbeddings`: the learned unconditional text embedding, if any."""

    learnable: bool
    hidden_size: int | None = None
    length: int | None = None

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> NullEmbeddingConfig:
        w = "learned_classifier_free_sampling_embeddings/config.json"
        learnable = bool(_get(d, "learnable", w))
        hidden = _get(d, "hidden_size", w, None)
        length = _get(d, "length", w, None)
        if learnable:
            _require(hidden is not None and length is not None, w, "learnable without hidden_size and length")
        return cls(learnable, int(hidden) if hidden is not None else None, int(length) if length is not None else None)


@dataclass(frozen=True)
class PipelineConfig:
    """All architecture configs of one checkpoint, checked against each other."""

    transformer: TransformerConfig
    vqvae: VQVAEConfig
    scheduler: SchedulerConfig
    null_embedding: NullEmbeddingConfig
    text_encoder: dict[str, Any]  # passed to transformers' CLIPTextConfig

    def __post_init__(self) -> None:
        t, v, s = self.transformer, self.vqvae, self.scheduler
        if t.num_vector_embeds != v.num_vq_embeddings + 1:
            raise WeightsError(
                f"transformer has {t.num_vector_embeds} classes but the VQ-VAE codebook has {v.num_vq_embeddings} "
                "entries (expected codebook + 1 mask class)"
            )
        if s.num_vec_classes != t.num_vector_embeds:
            raise WeightsError(
                f"scheduler num_vec_classes={s.num_vec_classes} differs from the transformer's {t.num_vector_embeds}"
            )
        if t.num_embeds_ada_norm < s.num_train_timesteps:
            raise WeightsError(
                f"transformer embeds {t.num_embeds_ada_norm} timesteps but the scheduler has {s.num_train_timesteps}"
            )
        hidden = int(self.text_encoder.get("hidden_size", 512))
        if t.cross_attention_dim != hidden:
            raise WeightsError(
                f"transformer cross_attention_dim={t.cross_attention_dim} differs from the text encoder's "
                f"hidden_size={hidden}"
            )
        n = self.null_embedding
        if n.learnable and n.hidden_size != hidden:
            raise WeightsError(f"learned null embedding width {n.hidden_size} differs from the text width {hidden}")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.num_train_timesteps

    @property
    def image_size(self) -> int:
        """Native image side in pixels: token grid side x the VQ-VAE's downsampling factor."""
        return self.transformer.sample_size * self.vqvae.downsample_factor
