"""A loaded checkpoint on one device and dtype: its networks and schedule, how it is loaded, and the conversions that
every task uses (prompts to text conditioning, images to tokens and back). `VQDiffusion` adds the tasks on top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import torch
from PIL import Image

from .. import images as imageio
from ..checkpoint.load import Components, load_components
from ..checkpoint.lora import merge_lora, read_adapter
from ..checkpoint.resolve import LoadCallback, prepare
from ..config import PipelineConfig
from ..device import dtype_name, resolve_device
from ..diffusion.sampler import TextContext
from ..diffusion.schedule import MaskAndReplaceSchedule
from ..errors import UsageError, excerpt
from ..options import VARIANTS
from .fastpath import Acceleration, FastKernels, FastSessions
from .outputs import ModelSource


class LoadedModel:
    """A loaded VQ-Diffusion checkpoint on one device and dtype."""

    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        source: ModelSource,
        acceleration: Acceleration | None = None,
    ):
        self.components = components
        self.device = device
        self.dtype = dtype
        self.source = source
        self.schedule = MaskAndReplaceSchedule.from_config(components.config.scheduler)
        self.fast_sessions = FastSessions(acceleration or Acceleration())
        self.lora: tuple[Path, float] | None = None  # the LoRA adapter merged into the transformer, and its scale

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        variant: str = "auto",
        revision: str | None = None,
        offline: bool = False,
        cache_dir: str | Path | None = None,
        on_progress: LoadCallback | None = None,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
    ) -> Self:
        """Load a local diffusers-format folder, or a Hub repo id (e.g. microsoft/vq-diffusion-ithq).

        A Hub model is fetched into the Hub cache the first time (only the files this dtype and variant need), and
        converted once into vqdiff's cache (`cache_dir`, default VQDIFF_CACHE_DIR or the user cache folder); later
        loads memory-map the converted safetensors. `offline` (or HF_HUB_OFFLINE=1) uses cached files only.
        `on_progress` receives download and conversion events.
        `compile` (torch.compile, default off) and `cuda_graphs` (default on for CUDA) speed up the fast sampler;
        either falls back to plain execution when unavailable, noted in `acceleration_notes`.
        `lora` names a LoRA adapter folder (from `vqdiff train transformer --lora`), merged into the transformer's
        weights with `lora_scale` (1: as trained, 0: no effect).
        """
        if variant not in VARIANTS:
            raise UsageError(
                f"unknown variant '{excerpt(variant)}'", hint=f"use one of: {', '.join(VARIANTS)}", about=("variant",)
            )
        dev = resolve_device(device)  # before any download: the model runs here
        prepared = prepare(
            model,
            device=str(dev),
            dtype=dtype,
            variant=variant,
            revision=revision,
            offline=offline,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            on_event=on_progress,
        )
        adapter = read_adapter(lora) if lora is not None else None  # checked before the (slow) model load
        components = load_components(prepared.folder, dev, prepared.dtype, variant)
        if adapter is not None:
            merge_lora(components.transformer, adapter, lora_scale)
        source = ModelSource(prepared.name, prepared.folder, prepared.commit)
        pipe = cls(components, dev, prepared.dtype, source, Acceleration(compile, cuda_graphs))
        pipe.lora = (adapter.folder, lora_scale) if adapter is not None else None
        return pipe

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def config(self) -> PipelineConfig:
        return self.components.config

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def mask_id(self) -> int:
        return self.config.transformer.mask_id

    @property
    def token_grid(self) -> tuple[int, int]:
        side = self.config.transformer.sample_size
        return side, side

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the fast sampler replays its steps from CUDA graphs here (on CUDA unless turned off; a batch shape
        whose capture fails runs without them, noted in `acceleration_notes`)."""
        return self.fast_sessions.acceleration.graphs_on(self.device)

    @property
    def acceleration_notes(self) -> list[str]:
        """Why torch.compile or CUDA graphs were not used, when they were asked for and failed."""
        return self.fast_sessions.notes

    def fast_kernels(self) -> FastKernels:
        """The fast sampler's block and step functions, compiled or not as this model runs them."""
        return self.fast_sessions.kernels(self.components.transformer)

    def release(self) -> None:
        """Drop the fast sampler's per-shape buffers and CUDA graphs (compiled code stays)."""
        self.fast_sessions.clear()

    # -- text -------------------------------------------------------------------------------------------------

    def _denoiser(self) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        transformer = self.components.transformer
        # every timestep on the device once: a step indexes it instead of copying its t from the host
        timesteps = torch.arange(self.num_train_timesteps, device=self.device)

        def run(x_t: torch.Tensor, context: torch.Tensor, t: int) -> torch.Tensor:
            log_p: torch.Tensor = transformer(x_t, context.to(self.dtype), timesteps[t])
            return log_p

        return run

    @torch.inference_mode()
    def _encode_prompts(self, prompts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Each distinct prompt once: its (1, L, D) states and the text that did not fit."""
        states: dict[str, torch.Tensor] = {}
        truncated: dict[str, str] = {}
        for prompt in dict.fromkeys(prompts):
            ids = self.components.text.tokenize([prompt])
            states[prompt], truncated[prompt] = self.components.text.encode_ids(ids.ids), ids.truncated[0]
        return states, truncated

    def text_context(self, prompts: Sequence[str], guided: bool) -> TextContext:
        """Text conditioning of one batch, one prompt per image (what a batch of `generate` feeds the sampler)."""
        states, _ = self._encode_prompts(list(prompts))
        return self._context([states[p] for p in prompts], guided)

    @torch.inference_mode()
    def _context(self, cond: list[torch.Tensor], guided: bool) -> TextContext:
        uncond = self.components.text.unconditional(len(cond)) if guided else None
        return TextContext(torch.cat(cond), uncond)

    # -- tokens <-> images ------------------------------------------------------------------------------------

    def encode(self, pictures: Sequence[Image.Image], keep_size: bool = False) -> list[torch.Tensor]:
        """Images -> (h, w) token grids. By default each is resized and centre-cropped to the native size."""
        factor = self.config.vqvae.downsample_factor
        grids = []
        with torch.inference_mode():
            for picture in pictures:
                if keep_size:
                    w, h = picture.size
                    if w % factor or h % factor:
                        raise UsageError(f"--keep-size needs both sides to be multiples of {factor}, got {w}x{h}")
                else:
                    picture = imageio.fit_square(picture, self.config.image_size)
                pixels = imageio.to_tensor([picture]).to(self.device, self.dtype)
                grids.append(self.components.vqvae.encode(pixels)[0].cpu())
        return grids

    def render(self, grids: torch.Tensor) -> list[Image.Image]:
        """Decode grids that may still hold the mask id (a trajectory): masked tokens show as grey patches."""
        grids = torch.as_tensor(grids)
        masked = grids == self.mask_id
        pictures = self.decode(torch.where(masked, 0, grids))
        factor = self.config.vqvae.downsample_factor
        return [imageio.grey_out(p, m.numpy(), factor) for p, m in zip(pictures, masked, strict=True)]

    def decode(self, tokens: torch.Tensor, batch_size: int = 4) -> list[Image.Image]:
        """(N, h, w) or (h, w) token grids with ids in 0..K-2 -> images."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            tokens = tokens[None]
        codes = self.config.vqvae.num_vq_embeddings
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= codes):
            raise UsageError(f"token ids must be in 0..{codes - 1}, found {int(tokens.min())}..{int(tokens.max())}")
        out: list[Image.Image] = []
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], batch_size):
                chunk = tokens[start : start + batch_size].to(self.device, torch.long)
                out.extend(imageio.to_pil(self.components.vqvae.decode(chunk)))
        return out
