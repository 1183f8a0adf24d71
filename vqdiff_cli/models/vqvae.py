"""The VQ-VAE: images -> codebook token grids (encode) and token grids -> images (decode).

Module and attribute names mirror diffusers' `VQModel` checkpoint keys (`encoder.down_blocks.0.resnets.0.conv1`,
`quantize.embedding.weight`, `decoder.up_blocks.0.attentions.0.to_q`, ...). Images are (B, 3, H, W) in [-1, 1];
token grids are (B, h, w) int64 with h = H / downsample_factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQVAEConfig

_EPS = 1e-6  # every GroupNorm of the VQ-VAE


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h: torch.Tensor = self.group_norm(x.view(b, c, height * width)).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(h).unsqueeze(1)  # (B, 1, HW, C): one head
        k = self.to_k(h).unsqueeze(1)
        v = self.to_v(h).unsqueeze(1)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = self.to_out[0](h)
        return h.transpose(1, 2).reshape(b, c, height, width) + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom, as the original VQGAN
        return out


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return out


class EncoderBlock(nn.Module):
    """`DownEncoderBlock2D` / `AttnDownEncoderBlock2D`."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, attention: bool, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        self.attentions = nn.ModuleList([AttentionBlock(out_ch, groups) for _ in range(layers)]) if attention else None
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nn.Module):
    """`UpDecoderBlock2D` / `AttnUpDecoderBlock2D`."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, attention: bool, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        self.attentions = nn.ModuleList([AttentionBlock(out_ch, groups) for _ in range(layers)]) if attention else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet, (attention, resnet)."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        out: torch.Tensor = self.resnets[1](x)
        return out


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            last = i == len(ch) - 1
            attention = kind == "AttnDownEncoderBlock2D"
            self.down_blocks.append(EncoderBlock(prev, ch[i], cfg.layers_per_block, groups, attention, not last))
            prev = ch[i]
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        out: torch.Tensor = self.conv_out(F.silu(self.conv_norm_out(x)))
        return out


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        rev = list(reversed(ch))
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList()
        prev = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            last = i == len(ch) - 1
            attention = kind == "AttnUpDecoderBlock2D"
            self.up_blocks.append(DecoderBlock(prev, rev[i], cfg.layers_per_block + 1, groups, attention, not last))
            prev = rev[i]
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        out: torch.Tensor = self.conv_out(F.silu(self.conv_norm_out(x)))
        return out


class VectorQuantizer(nn.Module):
    """Nearest codebook entry per position (Euclidean distance)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) latents -> (B, h, w) codebook indices."""
        b, e, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).contiguous().view(-1, e).float()  # (B*h*w, E); distances in float32
        idx = torch.argmin(torch.cdist(flat, self.embedding.weight.float()), dim=1)
        return idx.view(b, height, width)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, E, h, w) codebook vectors."""
        vectors: torch.Tensor = self.embedding(indices)  # (B, h, w, E)
        return vectors.permute(0, 3, 1, 2).contiguous()


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.vq_embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.vq_embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.vq_embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) token ids."""
        return self.quantize.indices(self.quant_conv(self.encoder(images)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) token ids -> (B, 3, h*f, w*f) images, unclamped, roughly in [-1, 1]."""
        images: torch.Tensor = self.decoder(self.post_quant_conv(self.quantize.lookup(tokens)))
        return images
