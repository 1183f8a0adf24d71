"""The Python API: `VQDiffusion` wires the loaded networks to the sampler. The CLI is a thin layer over it.

    from vqdiff_cli import VQDiffusion, GenerateOptions
    pipe = VQDiffusion.from_pretrained("microsoft/vq-diffusion-ithq")  # or a local diffusers-format folder
    images = pipe.generate("a teddy bear in a pool", GenerateOptions(seed=0))

The library never prints and never exits: progress leaves through the `on_step` callback, failures as VqdiffError.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import edit
from . import images as imageio
from .accel import Acceleration
from .config import PipelineConfig
from .device import dtype_name, make_generators, resolve_device, resolve_dtype
from .diffusion.fast import FastPlan, denoise_fast
from .diffusion.sampler import KnownTokens, TextContext, denoise
from .diffusion.schedule import MaskAndReplaceSchedule
from .diffusion.streams import seed_words
from .edit import EditSource, InpaintOptions, InpaintSetup
from .errors import UsageError
from .fastpath import FastSessions, SessionKey

# Re-exported (`X as X`): `vqdiff_cli.__getattr__` and callers import the public API's names from here.
from .generation import GeneratedImage as GeneratedImage
from .generation import GenerateOptions as GenerateOptions
from .generation import Job, plan_jobs, random_seed
from .generation import ModelSource as ModelSource
from .generation import StepCallback as StepCallback
from .generation import StepEvent as StepEvent
from .lora import merge_lora, read_adapter
from .store import LoadCallback, prepare
from .weights import VARIANTS, Components, load_components

PROGRESS_LAG = 2  # with a progress callback on a GPU, the host runs at most this many steps ahead of the device

# per batch: the images' generators and seeds -> (x_t to start from (B, N), tokens to keep or None)
StartFn = Callable[[list[torch.Generator], list[int]], tuple[torch.Tensor, KnownTokens | None]]


class VQDiffusion:
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
    ) -> VQDiffusion:
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
            raise UsageError(f"unknown variant '{variant}'", hint=f"use one of: {', '.join(VARIANTS)}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        prepared = prepare(
            model,
            dtype=dt,
            variant=variant,
            revision=revision,
            offline=offline,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            on_event=on_progress,
        )
        adapter = read_adapter(lora) if lora is not None else None  # checked before the (slow) model load
        components = load_components(prepared.folder, dev, dt, variant)
        if adapter is not None:
            merge_lora(components.transformer, adapter, lora_scale)
        source = ModelSource(prepared.name, prepared.folder, prepared.commit)
        pipe = cls(components, dev, dt, source, Acceleration(compile, cuda_graphs))
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
    def acceleration_notes(self) -> list[str]:
        """Why torch.compile or CUDA graphs were not used, when they were asked for and failed."""
        return self.fast_sessions.notes

    def uses_fast_sampler(self, options: GenerateOptions) -> bool:
        return options.sampler == "fast" or (options.sampler == "auto" and self.device.type == "cuda")

    # -- text-to-image ----------------------------------------------------------------------------------------

    def _denoiser(self) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        transformer = self.components.transformer

        def run(x_t: torch.Tensor, context: torch.Tensor, t: int) -> torch.Tensor:
            log_p: torch.Tensor = transformer(x_t, context.to(self.dtype), t)
            return log_p

        return run

    def generate(
        self,
        prompts: str | Sequence[str],
        options: GenerateOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[GeneratedImage]:
        return list(self.generate_iter(prompts, options, trajectory=trajectory, on_step=on_step))

    def generate_iter(
        self,
        prompts: str | Sequence[str],
        options: GenerateOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> Iterator[GeneratedImage]:
        """Yield images as their batch finishes: `num_images` per prompt, image i seeded with seed + i."""
        options = options or GenerateOptions()
        h, w = self.token_grid

        def all_masked(generators: list[torch.Generator], seeds: list[int]) -> tuple[torch.Tensor, KnownTokens | None]:
            return torch.full((len(generators), h * w), self.mask_id, dtype=torch.long, device=self.device), None

        timesteps = options.timesteps(self.num_train_timesteps)
        yield from self.run_sampling(prompts, options, timesteps, all_masked, trajectory, on_step)

    def run_sampling(
        self,
        prompts: str | Sequence[str],
        options: GenerateOptions,
        timesteps: tuple[int, ...],
        start: StartFn,
        trajectory: bool,
        on_step: StepCallback | None,
    ) -> Iterator[GeneratedImage]:
        """The shared driver: jobs and seeds, then batch by batch from `start`. A prompt is encoded once for all its
        images (they are consecutive), and only the prompts of the batch at hand are held."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list:
            raise UsageError("no prompts given")
        seed = random_seed() if options.seed is None else options.seed
        jobs = plan_jobs(prompt_list, seed, options.num_images)
        states: dict[str, torch.Tensor] = {}
        truncated: dict[str, str] = {}
        for first in range(0, len(jobs), options.batch_size):
            batch = jobs[first : first + options.batch_size]
            needed = list(dict.fromkeys(j.prompt for j in batch))
            unseen = [p for p in needed if p not in states]
            new_states, new_truncated = self._encode_prompts(unseen) if unseen else ({}, {})
            states = {p: states[p] if p in states else new_states[p] for p in needed}
            truncated = {p: truncated[p] if p in truncated else new_truncated[p] for p in needed}
            context = self._context([states[j.prompt] for j in batch], options.guided)
            generators = make_generators([j.seed for j in batch], self.device)
            with torch.inference_mode():
                x_t, known = start(generators, [j.seed for j in batch])
            results = self._sample(
                batch, generators, x_t, context, timesteps, options, len(jobs), trajectory, on_step, known
            )
            for result in results:
                result.truncated_prompt = truncated[result.prompt]
                yield result

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

    @torch.inference_mode()
    def _sample(
        self,
        batch: list[Job],
        generators: list[torch.Generator],
        x_t: torch.Tensor,
        context: TextContext,
        timesteps: tuple[int, ...],
        options: GenerateOptions,
        total: int,
        keep_trajectory: bool,
        on_step: StepCallback | None,
        known: KnownTokens | None = None,
    ) -> list[GeneratedImage]:
        """Denoise one batch from x_t over `timesteps`, decode it, and package the results."""
        h, w = self.token_grid
        seeds = [j.seed for j in batch]
        chain: Iterator[torch.Tensor]
        if not timesteps:  # nothing to sample (a variation of strength 0)
            chain = iter(())
        elif self.uses_fast_sampler(options):
            chain = self._denoise_fast(x_t, context, timesteps, options, seeds, known)
        else:
            chain = denoise(
                self._denoiser(),
                x_t,
                timesteps,
                context,
                self.schedule,
                generators,
                options.guidance_scale,
                options.truncation_rate,
                known,
            )
        steps = [x_t.cpu()] if keep_trajectory else []
        pace: deque[torch.cuda.Event] = deque()
        x = x_t
        for i, x in enumerate(chain):
            if keep_trajectory:
                steps.append(x.cpu())
            if on_step is not None:
                if self.device.type == "cuda":  # keep progress honest without ever letting the GPU idle
                    pace.append(torch.cuda.Event())  # type: ignore[no-untyped-call]  # torch's __new__ is unannotated
                    pace[-1].record(torch.cuda.current_stream(self.device))
                    if len(pace) > PROGRESS_LAG:
                        pace.popleft().synchronize()
                on_step(StepEvent(i + 1, len(timesteps), timesteps[i], batch[0].index, len(batch), total, x))
        tokens = x.view(len(batch), h, w).cpu()
        pictures = self.decode(tokens)
        traj = torch.stack(steps).view(len(steps), len(batch), h, w) if keep_trajectory else None
        return [
            GeneratedImage(
                prompt=job.prompt,
                seed=job.seed,
                index=job.index,
                tokens=tokens[b],
                image=pictures[b],
                timesteps=timesteps,
                trajectory=traj[:, b] if traj is not None else None,
            )
            for b, job in enumerate(batch)
        ]

    # -- editing: inpainting and variations (the work is in edit.py) -------------------------------------------

    def prepare_edit(self, image: Image.Image) -> EditSource:
        """The image at the native size (stretched if it is not square) and its token grid."""
        return edit.prepare_edit(self, image)

    def prepare_inpaint(
        self, image: Image.Image, mask: Image.Image | np.ndarray, options: InpaintOptions | None = None
    ) -> InpaintSetup:
        """Everything inpainting needs before sampling: tokens, the token mask, the start step, the composite."""
        return edit.prepare_inpaint(self, image, mask, options or InpaintOptions())

    def inpaint(
        self,
        image: Image.Image,
        mask: Image.Image | np.ndarray,
        prompts: str | Sequence[str] = "",
        options: GenerateOptions | None = None,
        inpaint_options: InpaintOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[GeneratedImage]:
        """Regenerate the masked part of `image` (white in `mask`) and keep the rest; results at the image's size."""
        setup = self.prepare_inpaint(image, mask, inpaint_options)
        return list(self.inpaint_iter(setup, prompts, options, inpaint_options, trajectory=trajectory, on_step=on_step))

    def inpaint_iter(
        self,
        setup: InpaintSetup,
        prompts: str | Sequence[str] = "",
        options: GenerateOptions | None = None,
        inpaint_options: InpaintOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> Iterator[GeneratedImage]:
        return edit.inpaint_iter(
            self, setup, prompts, options or GenerateOptions(), inpaint_options or InpaintOptions(), trajectory, on_step
        )

    def vary(
        self,
        image: Image.Image,
        prompts: str | Sequence[str] = "",
        strength: float = 0.5,
        options: GenerateOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[GeneratedImage]:
        """Variations: the image's tokens noised to round(strength * (T-1)), then denoised."""
        return list(
            self.vary_iter(self.prepare_edit(image), prompts, strength, options, trajectory=trajectory, on_step=on_step)
        )

    def vary_iter(
        self,
        source: EditSource,
        prompts: str | Sequence[str] = "",
        strength: float = 0.5,
        options: GenerateOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> Iterator[GeneratedImage]:
        return edit.vary_iter(self, source, prompts, strength, options or GenerateOptions(), trajectory, on_step)

    def variation_start(self, strength: float) -> int | None:
        """The timestep round(strength * (T-1)) that a variation starts from; None for strength 0 (no change)."""
        return edit.variation_start(strength, self.num_train_timesteps)

    def _denoise_fast(
        self,
        x_t: torch.Tensor,
        context: TextContext,
        timesteps: tuple[int, ...],
        options: GenerateOptions,
        seeds: list[int],
        known: KnownTokens | None,
    ) -> Iterator[torch.Tensor]:
        if self.device.type == "mps":
            raise UsageError("the fast sampler needs float64, which MPS lacks", hint="use --sampler reference")
        rows = context.cond if context.uncond is None else torch.cat([context.uncond, context.cond])
        key = SessionKey(
            batch=x_t.shape[0],
            guidance_scale=options.guidance_scale if context.guided else None,
            truncation_rate=options.truncation_rate,
            known=known is not None,
            renoise=known is not None and known.renoise,
        )
        words = seed_words(seeds, self.device)
        session = self.fast_sessions.session(self.components.transformer, key, rows.to(self.dtype), words, known)
        return denoise_fast(session.runner, x_t, FastPlan.build(self.schedule, timesteps, self.device))

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
