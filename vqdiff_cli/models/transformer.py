"""The discrete diffusion transformer: token ids at timestep t, text states -> log p(x_0) over the K-1 codes.

Attribute names mirror the diffusers checkpoint keys (`transformer_blocks.{i}.attn1.to_q.weight`, ...), and the op
order mirrors diffusers' `Transformer2DModel` so that float32 CPU outputs are bit-identical to it.
Shapes: B batch, N = H*W latent tokens, K classes including the mask, L text tokens, D inner width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TransformerConfig

GELU2_SCALE = 1.702  # the feed-forward activation: x * sigmoid(1.702 x)


class ImagePositionalEmbeddings(nn.Module):
    """Token embedding plus a row and a column embedding (DALL-E style)."""

    def __init__(self, num_embed: int, height: int, width: int, embed_dim: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.emb = nn.Embedding(num_embed, embed_dim)
        self.height_emb = nn.Embedding(height, embed_dim)
        self.width_emb = nn.Embedding(width, embed_dim)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        emb: torch.Tensor = self.emb(index)  # (B, N, D)
        rows: torch.Tensor = self.height_emb(torch.arange(self.height, device=index.device).view(1, self.height))
        cols: torch.Tensor = self.width_emb(torch.arange(self.width, device=index.device).view(1, self.width))
        pos = (rows.unsqueeze(2) + cols.unsqueeze(1)).view(1, self.height * self.width, -1)  # (1, N, D), row-major
        return emb + pos[:, : emb.shape[1], :]


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine parameters, scaled and shifted by an embedding of the timestep (a scalar, or one
    per image in training)."""

    def __init__(self, dim: int, num_embeddings: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(num_embeddings, dim)
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb: torch.Tensor = self.linear(F.silu(self.emb(timestep)))  # 0-dim t: (2D,); training's (B,) t: (B, 2D)
        if temb.ndim == 2:  # one timestep per image (diffusers' AdaLayerNorm cannot take this: it splits the batch)
            temb = temb.unsqueeze(1)  # (B, 1, 2D)
        scale, shift = temb.chunk(2, dim=-1)  # scale first, as in the checkpoint
        normed: torch.Tensor = self.norm(x)
        return normed * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`; self-attention when `context` is None."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, bias: bool, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=True)])

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a fixed context (the text), to compute once and pass as `kv` at every step."""
        return self.to_k(context), self.to_v(context)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        b = x.shape[0]
        context = x if context is None else context
        q = self.to_q(x)
        k, v = self.project_kv(context) if kv is None else kv
        head_dim = k.shape[-1] // self.heads
        q = q.view(b, -1, self.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        k = k.view(b, -1, self.heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        v = v.view(b, -1, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * head_dim).to(q.dtype)
        projected: torch.Tensor = self.to_out[0](out)
        return projected


class ApproximateGELU(nn.Module):
    """`x * sigmoid(1.702 x)` after a projection (the original code's GELU2); not a gated unit."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x * torch.sigmoid(GELU2_SCALE * x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # net.1 is dropout in diffusers; Identity keeps the checkpoint's indices (net.0.proj, net.2).
        self.net = nn.ModuleList([ApproximateGELU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; the first two under timestep-adaptive norms."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim = cfg.inner_dim
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.norm1 = AdaLayerNorm(dim, cfg.num_embeds_ada_norm)
        self.attn1 = Attention(dim, heads, head_dim, cfg.attention_bias)
        self.norm2 = AdaLayerNorm(dim, cfg.num_embeds_ada_norm)
        self.attn2 = Attention(dim, heads, head_dim, cfg.attention_bias, context_dim=cfg.cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        timestep: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self.attn1(self.norm1(x, timestep)) + x
        x = self.attn2(self.norm2(x, timestep), context, context_kv) + x
        ff: torch.Tensor = self.ff(self.norm3(x))
        return ff + x


def call_block(
    block: TransformerBlock,
    x: torch.Tensor,
    context: torch.Tensor,
    timestep: torch.Tensor,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    out: torch.Tensor = block(x, context, timestep, context_kv)
    return out


def fused_block(
    block: TransformerBlock,
    x: torch.Tensor,
    context: torch.Tensor,
    timestep: torch.Tensor,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """`block(x, context, timestep, context_kv)` in fewer passes over the activations, for the fast sampler.

    The same math, not diffusers' op order (so not bit-identical to it; the reference sampler keeps `call_block`):
    * an adaptive norm is one `layer_norm` whose weight and bias are 1 + scale and shift (one timestep per batch),
      instead of a norm, a multiply and an add;
    * the feed-forward's x * sigmoid(1.702 x) is silu(1.702 x) / 1.702; both factors go into the scaling (alpha)
      of the two matmuls around it, so the activation is one silu instead of a multiply, a sigmoid and a multiply.
    In eager CUDA runs these elementwise passes, not the matmuls, are what grows with the batch beyond the FLOPs.
    The fold stores 1.702 x, so it overflows where x alone would not (float16: |x| > 38,486, where the plain form
    stays finite to 65,504): `fast_block_runner` uses it only where `gelu_fold_bound` proves that impossible.
    """
    x = _fused_attention(block, x, context, timestep, context_kv)
    return _fused_feed_forward(block.ff, block.norm3(x)) + x


def fused_block_plain_gelu(
    block: TransformerBlock,
    x: torch.Tensor,
    context: torch.Tensor,
    timestep: torch.Tensor,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """`fused_block` with the feed-forward as the plain block computes it, x * sigmoid(1.702 x) after the projection
    (finite wherever the projection is): for checkpoints whose feed-forward the GELU fold could overflow."""
    x = _fused_attention(block, x, context, timestep, context_kv)
    ff: torch.Tensor = block.ff(block.norm3(x))
    return ff + x


def _fused_attention(
    block: TransformerBlock,
    x: torch.Tensor,
    context: torch.Tensor,
    timestep: torch.Tensor,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The block's two attention sublayers with their residuals, under one-pass adaptive norms."""
    x = block.attn1(_fused_ada_norm(block.norm1, x, timestep)) + x
    attended: torch.Tensor = block.attn2(_fused_ada_norm(block.norm2, x, timestep), context, context_kv)
    return attended + x


def _fused_ada_norm(norm: AdaLayerNorm, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    temb: torch.Tensor = norm.linear(F.silu(norm.emb(timestep)))  # (2D,): one timestep for the whole batch
    scale, shift = temb.chunk(2, dim=0)
    return F.layer_norm(x, (x.shape[-1],), 1 + scale, shift, norm.norm.eps)


def _fused_feed_forward(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    proj = cast(ApproximateGELU, ff.net[0]).proj
    out = cast(nn.Linear, ff.net[2])
    flat = x.reshape(-1, x.shape[-1])
    h = torch.addmm(proj.bias * GELU2_SCALE, flat, proj.weight.t(), alpha=GELU2_SCALE)  # 1.702 (x W^T + b)
    h = F.silu(h, inplace=True)
    y = torch.addmm(out.bias, h, out.weight.t(), alpha=1 / GELU2_SCALE)
    return y.view(*x.shape[:-1], y.shape[-1])


BlockRunner = Callable[
    [TransformerBlock, torch.Tensor, torch.Tensor, torch.Tensor, "tuple[torch.Tensor, torch.Tensor] | None"],
    torch.Tensor,
]

GELU_FOLD_MARGIN = 2.0  # the bound must stay this far below the overflow point (rounding of the norm and the matmul)


def gelu_fold_bound(block: TransformerBlock) -> float:
    """An upper bound of |z| for the feed-forward's pre-activation z = W norm3(x) + b, whatever x is.

    norm3's normalised output n has mean 0 and variance below 1, so ||n||_2 < sqrt(D); with its affine weight g and
    bias c, z_j = sum_i (W_ji g_i) n_i + (W_j . c + b_j), and by Cauchy-Schwarz |z_j| <= ||W_j * g||_2 sqrt(D) +
    |W_j . c + b_j|. Computed in float64 from the stored weights; it holds for every input, not only the ones seen.
    """
    proj = cast(ApproximateGELU, block.ff.net[0]).proj
    weight = proj.weight.detach().double()  # (4D, D)
    dim = weight.shape[1]
    norm = block.norm3
    gain = norm.weight.detach().double() if norm.weight is not None else torch.ones(dim, dtype=torch.float64)
    shift = norm.bias.detach().double() if norm.bias is not None else torch.zeros(dim, dtype=torch.float64)
    bias = proj.bias.detach().double()
    gain, shift, bias = gain.to(weight.device), shift.to(weight.device), bias.to(weight.device)
    bound = (weight * gain).norm(dim=1) * dim**0.5 + (weight @ shift + bias).abs()
    return float(bound.max())


def fast_block_runner(transformer: DiffusionTransformer) -> BlockRunner:
    """`fused_block` when its GELU fold cannot overflow in the model's dtype, else `fused_block_plain_gelu`.

    The fold stores 1.702 z, finite while |z| < max / 1.702 (38,486 in float16). In float16 every block's
    `gelu_fold_bound` is checked against that, with a margin of `GELU_FOLD_MARGIN`. In bfloat16 and float32 the fold
    overflows only past |z| = 2.0e38, where z is within a factor of 1.7 of the type's largest value; no bound is
    computed there.
    """
    dtype = transformer.out.weight.dtype
    limit = torch.finfo(dtype).max / GELU2_SCALE / GELU_FOLD_MARGIN
    if limit > 1e30:
        return fused_block
    safe = all(gelu_fold_bound(block) <= limit for block in transformer._blocks())
    return fused_block if safe else fused_block_plain_gelu


class DiffusionTransformer(nn.Module):
    """p(x_0 | x_t, text): returns float32 log-probabilities of shape (B, K-1, N)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        size = cfg.sample_size
        self.latent_image_embedding = ImagePositionalEmbeddings(cfg.num_vector_embeds, size, size, cfg.inner_dim)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(cfg.inner_dim)
        self.out = nn.Linear(cfg.inner_dim, cfg.num_vector_embeds - 1)

    def _blocks(self) -> Iterable[TransformerBlock]:
        """`transformer_blocks` as what it holds (iterating an `nn.ModuleList` gives a type checker plain Modules)."""
        return cast("Iterable[TransformerBlock]", self.transformer_blocks)

    def context_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention keys and values of the text states (B, L, C): fixed for a whole chain."""
        return [block.attn2.project_kv(context) for block in self._blocks()]

    def logits(
        self,
        x_t: torch.Tensor,
        context: torch.Tensor,
        timestep: int | torch.Tensor,
        context_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        run_block: BlockRunner | None = None,
    ) -> torch.Tensor:
        """Unnormalised scores (B, N, K-1) in the model's dtype.

        `context_kv` from `context_kv(context)` skips the per-call key and value projections of the text (the same
        numbers); `run_block(block, h, context, t, kv)` replaces `block(h, context, t, kv)`, e.g. by `fused_block`,
        compiled or not (one compiled graph serves every block).
        """
        t = torch.as_tensor(timestep, dtype=torch.long, device=x_t.device)  # a scalar t, or (B,) in training
        run = run_block or call_block
        h: torch.Tensor = self.latent_image_embedding(x_t)  # (B, N, D)
        for i, block in enumerate(self._blocks()):
            h = run(block, h, context, t, None if context_kv is None else context_kv[i])
        scores: torch.Tensor = self.out(self.norm_out(h))
        return scores

    def forward(self, x_t: torch.Tensor, context: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        logits = self.logits(x_t, context, timestep).permute(0, 2, 1)  # (B, K-1, N)
        # log-softmax in float64, rounded to float32: what diffusers and the original code do. MPS has no float64:
        # there it is float32 throughout (diffusers cannot run there at all).
        precise = torch.float32 if logits.device.type == "mps" else torch.float64
        return F.log_softmax(logits.to(precise), dim=1).float()
