"""The VQ-VAE stage: diffusers' `VQModel` architecture (our `models/vqvae.py`) trained from scratch with an L1
reconstruction loss, the codebook and commitment terms of a straight-through vector quantizer, and, from
`disc_start` on, a patch discriminator with the hinge loss and VQGAN's adaptive weight. Codes left unused for a while
are re-initialised from encoder outputs; the log reports codebook usage and perplexity; each validation writes a
reconstruction grid and the PSNR on held-out images.

The result is a diffusers `VQModel` folder (config.json + safetensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQVAEConfig
from ..errors import UsageError
from ..images import save_png, to_pil
from ..models.vqvae import VQVAE
from . import data
from .export import export_vqvae
from .loop import start_run, train
from .plot import grid
from .run_folder import LOG_FILE, append_log
from .task import LoopOptions, ProgressCallback, Run, StepResult, TrainResult

COMMITMENT = 0.25  # beta of the commitment term (VQ-VAE, VQGAN)
MAX_ADAPTIVE_WEIGHT = 1e4
HOLDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class VQVAEStageOptions:
    data: Path
    resolution: int = 256
    downsample: int = 8
    codebook_size: int = 1024
    embed_dim: int = 64
    channels: int = 64
    layers_per_block: int = 2
    norm_groups: int = 32  # of every GroupNorm; must divide --channels (few groups keep flat colours apart)
    disc: bool = True
    disc_start: int = 2000
    disc_weight: float = 0.8
    revive_every: int = 100  # steps between dead-code re-initialisations (0: never)
    strict: bool = False
    validation_images: int = 8

    def __post_init__(self) -> None:
        f = self.downsample
        if f < 1 or f & (f - 1):
            raise UsageError(f"--downsample must be a power of 2, got {f}")
        if self.resolution % f or self.resolution < f:
            raise UsageError(f"--resolution {self.resolution} is not a multiple of --downsample {f}")
        for name in ("codebook_size", "embed_dim", "channels", "layers_per_block"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.norm_groups < 1 or self.channels % self.norm_groups:
            raise UsageError(f"--norm-groups {self.norm_groups} does not divide --channels {self.channels}")
        if self.codebook_size < 2:
            raise UsageError("--codebook-size must be at least 2")
        if self.disc_start < 0 or self.revive_every < 0 or self.disc_weight < 0:
            raise UsageError("--disc-start, --disc-weight and --revive-every cannot be negative")

    def vqvae_config(self) -> VQVAEConfig:
        """Levels of width channels x (1, 2, 4, 4, ...), one per halving plus one; attention at the coarsest."""
        levels = int(math.log2(self.downsample)) + 1
        widths = tuple(self.channels * min(2**i, 4) for i in range(levels))
        return VQVAEConfig(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (levels - 1),
            block_out_channels=widths,
            layers_per_block=self.layers_per_block,
            latent_channels=self.embed_dim,
            num_vq_embeddings=self.codebook_size,
            vq_embed_dim=self.embed_dim,
            norm_num_groups=self.norm_groups,
        )


# -- the vector quantizer in training --------------------------------------------------------------------------


@dataclass
class Quantized:
    z_q: torch.Tensor  # (B, E, h, w) straight-through: the codes forward, the encoder's gradient backward
    indices: torch.Tensor  # (B, h, w)
    codebook_loss: torch.Tensor  # ||sg(z_e) - e||^2: moves the codes to the encoder outputs
    commitment_loss: torch.Tensor  # ||z_e - sg(e)||^2: keeps the encoder near its codes


def quantize(z_e: torch.Tensor, codebook: torch.Tensor) -> Quantized:
    """Nearest code per position (as `VectorQuantizer.indices`), with the two VQ-VAE losses."""
    b, e, h, w = z_e.shape
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, e)
    indices = torch.argmin(torch.cdist(flat.float().detach(), codebook.float().detach()), dim=1)
    codes = codebook[indices].view(b, h, w, e).permute(0, 3, 1, 2)
    codebook_loss = F.mse_loss(codes, z_e.detach())
    commitment_loss = F.mse_loss(z_e, codes.detach())
    z_q = z_e + (codes - z_e).detach()
    return Quantized(z_q, indices.view(b, h, w), codebook_loss, commitment_loss)


def perplexity(indices: torch.Tensor, num_codes: int) -> float:
    """exp(entropy) of the code frequencies: how many codes are in effective use."""
    counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
    p = counts / counts.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [-1, 1], in dB (on the 8-bit-rounded [0, 1] images)."""
    x = ((a.float().clamp(-1, 1) + 1) * 127.5).round() / 255
    y = ((b.float().clamp(-1, 1) + 1) * 127.5).round() / 255
    mse = float(F.mse_loss(x, y))
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


class Autoencoder(nn.Module):
    """The VQ-VAE with a training forward (data parallelism needs the work inside a `forward`)."""

    def __init__(self, vqvae: VQVAE) -> None:
        super().__init__()
        self.vqvae = vqvae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Quantized, torch.Tensor]:
        """(B, 3, H, W) -> (reconstruction, quantized latents, encoder outputs z_e)."""
        v = self.vqvae
        z_e: torch.Tensor = v.quant_conv(v.encoder(images))
        q = quantize(z_e, v.quantize.embedding.weight)
        recon: torch.Tensor = v.decoder(v.post_quant_conv(q.z_q))
        return recon, q, z_e


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (pix2pix / VQGAN) with group norms instead of batch norms, so that its output does
    not depend on the batch (one process and several then train alike)."""

    def __init__(self, resolution: int, width: int = 64) -> None:
        super().__init__()
        depth = max(1, min(3, int(math.log2(resolution)) - 4))  # 16-32 px: 1, 64 px: 2, 128 px and up: 3
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, depth + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < depth else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), nn.GroupNorm(math.gcd(32, out), out)]
            layers.append(nn.LeakyReLU(0.2))
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.main(images)  # (B, 1, h', w') realness per patch
        return out

    @torch.no_grad()
    def initialise(self, generator: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: |grad of the reconstruction loss| / |grad of the GAN loss| at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight: torch.Tensor = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()


# -- the task ------------------------------------------------------------------------------------------------------


@dataclass
class VQVAETask:
    """The `Task` of the VQ-VAE stage (see loop.py)."""

    options: VQVAEStageOptions
    images: data.ImageSet
    train_indices: list[int]
    held_out: list[int]
    autoencoder: Autoencoder
    discriminator: PatchDiscriminator | None
    data_digest: str
    seed: int
    kind: str = "vqvae"
    generator: torch.Generator = field(init=False)
    usage: torch.Tensor = field(init=False)  # code counts since the last revival (this rank)
    candidates: torch.Tensor | None = field(init=False, default=None)  # the last batch's encoder outputs (N, E)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + 1)
        self.usage = torch.zeros(self.options.codebook_size, dtype=torch.long)

    @property
    def config(self) -> VQVAEConfig:
        return self.options.vqvae_config()

    def parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"vqvae": self.autoencoder.train()}
        if self.discriminator is not None:
            parts["discriminator"] = self.discriminator.train()
        return parts

    def ema_parts(self) -> tuple[str, ...]:
        return ("vqvae",)

    def run_config(self) -> dict[str, Any]:
        o = self.options
        return {
            "data": self.data_digest,
            "vqvae": asdict(self.config),
            "resolution": o.resolution,
            "disc": o.disc,
            "disc_start": o.disc_start,
            "disc_weight": o.disc_weight,
            "revive_every": o.revive_every,
        }

    def micro_step(self, run: Run, step: int, micro: int) -> StepResult:
        place = step * run.options.grad_accum + micro
        order = data.batch_indices(len(self.train_indices), run.global_batch, place, run.options.seed)
        idx = [self.train_indices[i] for i in order][run.local_slice()]
        real = self.images.batch(idx).to(run.device)
        recon, q, z_e = run.models["vqvae"](real)
        rec_loss = (real - recon).abs().mean()
        loss = rec_loss + q.codebook_loss + COMMITMENT * q.commitment_loss
        terms = {
            "rec": float(rec_loss.detach()),
            "codebook": float(q.codebook_loss.detach()),
            "perplexity": perplexity(q.indices, self.options.codebook_size),
        }
        losses: dict[str, torch.Tensor] = {}
        gan_on = self.discriminator is not None and step >= self.options.disc_start
        if gan_on:
            disc = run.unwrapped("discriminator")
            disc.requires_grad_(False)  # the generator's adversarial term reaches the generator only
            try:
                gan_loss = -disc(recon).mean()
            finally:
                disc.requires_grad_(True)
            last = _vqvae(run).decoder.conv_out.weight
            weight = adaptive_weight(rec_loss, gan_loss, last) * self.options.disc_weight
            loss = loss + weight * gan_loss
            scores = run.models["discriminator"](torch.cat([real, recon.detach()]))  # one forward (data parallel)
            d_loss = hinge_d_loss(*scores.chunk(2))
            losses["discriminator"] = d_loss
            terms.update(
                {"gan": float(gan_loss.detach()), "disc": float(d_loss.detach()), "disc_weight": float(weight)}
            )
        losses["vqvae"] = loss
        terms["loss"] = float(loss.detach())
        self.usage += torch.bincount(q.indices.flatten().cpu(), minlength=self.options.codebook_size)
        self.candidates = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        return StepResult(losses, terms, len(idx))

    @torch.no_grad()
    def after_update(self, run: Run, step: int) -> dict[str, float]:
        """Every `revive_every` steps: codes no image used since the last time take the place of random encoder
        outputs of the last batch (the same choice on every rank)."""
        every = self.options.revive_every
        if not every or (step + 1) % every or self.candidates is None:
            return {}
        usage = self.usage.to(run.device)
        candidates = self.candidates
        if run.world_size > 1:
            usage = run.accelerator.reduce(usage, reduction="sum")
            candidates = run.accelerator.gather(candidates)
        dead = (usage == 0).nonzero().squeeze(1).cpu()
        used = float((usage > 0).float().mean())
        self.usage.zero_()
        if dead.numel():
            pick = torch.randint(0, candidates.shape[0], (dead.numel(),), generator=self.generator)
            codebook = _vqvae(run).quantize.embedding.weight
            codebook[dead.to(codebook.device)] = candidates[pick.to(candidates.device)].to(codebook.dtype)
        return {"usage": used, "revived": float(dead.numel())}

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "usage": self.usage}

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.usage = state["usage"].clone()

    def reconstruct(self, run: Run, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        model = run.unwrapped("vqvae")
        model.eval()
        try:
            with torch.no_grad():
                real = self.images.batch(indices).to(run.device)
                vqvae = _vqvae(run)
                recon = vqvae.decode(vqvae.encode(real))
        finally:
            model.train()
        return real, recon

    def validate(self, run: Run, step: int) -> None:
        """A grid of held-out originals over their reconstructions, and the PSNR on every held-out image."""
        shown = self.held_out or self.train_indices
        real, recon = self.reconstruct(run, shown[: self.options.validation_images])
        pictures = to_pil(torch.cat([real, recon]))
        folder = run.output / "validation"
        folder.mkdir(exist_ok=True)
        save_png(grid(pictures, len(pictures) // 2), folder / f"step-{step:08d}.png", overwrite=True)
        scores = [psnr(*self.reconstruct(run, shown[i : i + 16])) for i in range(0, len(shown), 16)]
        finite = [s for s in scores if math.isfinite(s)]
        value = sum(finite) / len(finite) if finite else math.inf
        append_log(run.output / LOG_FILE, {"step": step, "psnr": value, "held_out": len(self.held_out)})

    def export(self, run: Run) -> None:
        vqvae = _vqvae(run)
        export_vqvae(run.output, self.config, vqvae.state_dict(), self.options.resolution)


def _vqvae(run: Run) -> VQVAE:
    model = run.unwrapped("vqvae")
    assert isinstance(model, Autoencoder)
    return model.vqvae


def build_vqvae_task(
    options: VQVAEStageOptions, seed: int, device: torch.device, on_event: Callable[[str], None] | None = None
) -> VQVAETask:
    say = on_event or (lambda message: None)
    images = data.load_images(options.data, options.resolution, need_captions=False, strict=options.strict)
    if images.skipped:
        say("warning: " + data.describe_skipped(images.skipped, options.data))
    train_indices, held_out = data.holdout_split(len(images), HOLDOUT_FRACTION, seed)
    say(f"{len(train_indices)} training image(s), {len(held_out)} held out, at {options.resolution} px")
    cfg = options.vqvae_config()
    vqvae = _random_vqvae(cfg, seed)
    disc = None
    if options.disc:
        disc = PatchDiscriminator(options.resolution)
        disc.initialise(torch.Generator().manual_seed(seed + 2))
    digest = data.files_digest(options.data, images.examples)
    autoencoder = Autoencoder(vqvae).to(device)
    disc = disc.to(device) if disc is not None else None
    return VQVAETask(options, images, train_indices, held_out, autoencoder, disc, digest, seed)


def _random_vqvae(cfg: VQVAEConfig, seed: int) -> VQVAE:
    """PyTorch's default initialisation, drawn from a seeded generator that leaves the global one as it was (torch
    has no generator argument for module constructors), and VQGAN's uniform(-1/K, 1/K) codebook."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vqvae = VQVAE(cfg)
        bound = 1 / cfg.num_vq_embeddings
        with torch.no_grad():
            vqvae.quantize.embedding.weight.uniform_(-bound, bound)
    return vqvae


def train_vqvae(
    options: VQVAEStageOptions,
    loop: LoopOptions,
    output: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_event: Callable[[str], None] | None = None,
    on_progress: ProgressCallback | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """`vqdiff train vqvae`: check the run folder, load the images, train, export the VQModel folder."""
    written = ("config.json", "diffusion_pytorch_model.safetensors")
    accelerator = start_run(loop, output, resume=resume, overwrite=overwrite, written=written)
    task = build_vqvae_task(options, loop.seed, accelerator.device, on_event)
    return train(task, loop, output, resume=resume, accelerator=accelerator, on_progress=on_progress, on_step=on_step)
