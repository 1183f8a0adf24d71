"""The Python API: `VQDiffusion` wires the loaded networks to the sampler. The CLI is a thin layer over it.

    from vqdiff_cli import VQDiffusion, GenerateOptions
    pipe = VQDiffusion.from_pretrained("microsoft/vq-diffusion-ithq")  # or a local diffusers-format folder
    images = pipe.generate("a teddy bear in a pool", GenerateOptions(seed=0))

The library never prints and never exits: progress leaves through the `on_step` callback, failures as VqdiffError.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..diffusion.fast import FastPlan, denoise_fast
from ..diffusion.reveal import RevealRule, network_calls, reveal_ratios
from ..diffusion.sampler import KnownTokens, RevealPlan, TextContext, denoise, posterior_levels
from ..diffusion.schedule import MaskAndReplaceSchedule
from ..diffusion.start import Noise, StartFn, all_masked, inpaint_start, variation_start
from ..errors import UsageError
from ..masks import FittedMask

# Re-exported (`X as X`): `vqdiff_cli.__getattr__` and callers import the public API's names from here.
from ..options import DEFAULT_STRENGTH, InpaintOptions, Job, Prompts, as_jobs
from ..options import GenerateOptions as GenerateOptions
from . import editing
from .editing import EditSource, InpaintSetup
from .fastpath import SessionKey, StepRunner
from .model import LoadedModel
from .outputs import GeneratedImage as GeneratedImage
from .outputs import ModelSource as ModelSource
from .outputs import StepCallback as StepCallback
from .outputs import StepEvent as StepEvent

PROGRESS_LAG = 2  # with a progress callback on a GPU, the host runs at most this many steps ahead of the device


def reveal_rule(options: GenerateOptions) -> RevealRule | None:
    """The budgeted reveal `options` ask for; None for the posterior reveal."""
    if not options.budgeted:
        return None
    return RevealRule(options.reveal, options.purity_weight, options.tokens_per_call)


def reveal_plan(
    schedule: MaskAndReplaceSchedule,
    num_tokens: int,
    timesteps: Sequence[int],
    options: GenerateOptions,
    masked: Sequence[int],
) -> RevealPlan | None:
    """A batch's budgeted reveal, from each image's masked candidates at the start; None for the posterior reveal."""
    rule = reveal_rule(options)
    if rule is None:
        return None
    ratios = reveal_ratios(schedule.cumprod_ct, timesteps, num_tokens, masked, rule.per_call)
    return RevealPlan(rule, ratios, tuple(masked))


def planned_network_calls(
    schedule: MaskAndReplaceSchedule,
    num_tokens: int,
    timesteps: Sequence[int],
    options: GenerateOptions,
    masked: int | None = None,
) -> int:
    """Network calls a batch makes over `timesteps` (each runs the whole batch, both guidance halves at once):
    one per visited timestep for the posterior reveal; for a budgeted one, as `reveal.network_calls` counts them
    for images that start with `masked` candidates (default: every token)."""
    plan = reveal_plan(schedule, num_tokens, timesteps, options, [num_tokens if masked is None else masked])
    if plan is None:
        return len(timesteps)
    return network_calls(len(timesteps), plan.masked, plan.ratios, plan.rule.per_call)


class VQDiffusion(LoadedModel):
    """A loaded VQ-Diffusion checkpoint on one device and dtype, and its tasks: text-to-image, inpainting and
    variations (loading, text conditioning and token <-> image conversions come from `LoadedModel`)."""

    def uses_fast_sampler(self, options: GenerateOptions) -> bool:
        return options.sampler == "fast" or (options.sampler == "auto" and self.device.type == "cuda")

    # -- text-to-image ----------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompts,
        options: GenerateOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[GeneratedImage]:
        return list(self.generate_iter(prompts, options, trajectory=trajectory, on_step=on_step))

    def generate_iter(
        self,
        prompts: Prompts,
        options: GenerateOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> Iterator[GeneratedImage]:
        """Yield images as their batch finishes: `num_images` per prompt, image i seeded with seed + i (or the jobs of a
        run planned with `plan_jobs`, as they are)."""
        options = options or GenerateOptions()
        n = self.config.transformer.num_latent_pixels

        def start(noise: Noise) -> tuple[torch.Tensor, KnownTokens | None]:
            return all_masked(noise.batch, n, self.mask_id, self.device), None

        timesteps = options.timesteps(self.num_train_timesteps)
        yield from self.run_sampling(prompts, options, timesteps, start, trajectory, on_step)

    # -- editing: inpainting and variations (before and after sampling: editing.py) --------------------------

    def prepare_edit(self, image: Image.Image) -> EditSource:
        """The image at the native size (stretched if it is not square) and its token grid."""
        return editing.prepare_edit(
            image, self.config.image_size, self.token_grid, lambda native: self.encode([native])[0]
        )

    def prepare_inpaint(
        self, image: Image.Image, mask: Image.Image | np.ndarray | FittedMask, options: InpaintOptions | None = None
    ) -> InpaintSetup:
        """Everything inpainting needs before sampling: tokens, the token mask, the start step, the composite."""
        return editing.prepare_inpaint(self.prepare_edit(image), mask, options or InpaintOptions(), self.schedule)

    def inpaint(
        self,
        image: Image.Image,
        mask: Image.Image | np.ndarray | FittedMask,
        prompts: Prompts = "",
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
        prompts: Prompts = "",
        options: GenerateOptions | None = None,
        inpaint_options: InpaintOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> Iterator[GeneratedImage]:
        """Regenerate the masked tokens from `setup.start_step`, keeping the others; results at the original size."""
        options = options or GenerateOptions()
        renoise = (inpaint_options or InpaintOptions()).known == "renoise"
        x_0 = setup.tokens.view(1, -1).to(self.device)
        regenerate = setup.regenerate.view(1, -1).to(self.device)

        def start(noise: Noise) -> tuple[torch.Tensor, KnownTokens | None]:
            return inpaint_start(noise, x_0, regenerate, self.schedule, setup.start_step, renoise)

        timesteps = options.timesteps(self.num_train_timesteps, start=setup.start_step)
        for result in self.run_sampling(prompts, options, timesteps, start, trajectory, on_step):
            result.image = editing.put_back(setup, result.image)
            yield result

    def vary(
        self,
        image: Image.Image,
        prompts: Prompts = "",
        strength: float = DEFAULT_STRENGTH,
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
        prompts: Prompts = "",
        strength: float = DEFAULT_STRENGTH,
        options: GenerateOptions | None = None,
        *,
        trajectory: bool = False,
        on_step: StepCallback | None = None,
    ) -> Iterator[GeneratedImage]:
        """Noise the image's tokens with the forward process to round(strength * (T-1)) and denoise from there.

        Strength 0 returns the encoded tokens unchanged; strength 1 starts from the all-mask grid, which is plain
        generation (the same tokens as `generate` with the same seed and prompt)."""
        options = options or GenerateOptions()
        t0 = self.variation_start(strength)
        x_0 = source.tokens.view(1, -1).to(self.device)

        def start(noise: Noise) -> tuple[torch.Tensor, KnownTokens | None]:
            return variation_start(noise, x_0, self.schedule, t0), None

        timesteps = () if t0 is None else options.timesteps(self.num_train_timesteps, start=t0)
        for result in self.run_sampling(prompts, options, timesteps, start, trajectory, on_step):
            result.image = editing.put_back(source, result.image)
            yield result

    def network_calls(
        self, options: GenerateOptions | None = None, start: int | None = None, masked: int | None = None
    ) -> int:
        """Network calls a batch makes with `options`: from `start` (default T-1) with `masked` candidates (default
        every token; inpainting: the regenerated ones)."""
        options = options or GenerateOptions()
        timesteps = options.timesteps(self.num_train_timesteps, start=start)
        return planned_network_calls(
            self.schedule, self.config.transformer.num_latent_pixels, timesteps, options, masked
        )

    def variation_start(self, strength: float) -> int | None:
        """The timestep round(strength * (T-1)) that a variation starts from; None for strength 0 (no change)."""
        return editing.variation_start(strength, self.num_train_timesteps)

    # -- the driver every task shares -------------------------------------------------------------------------

    def run_sampling(
        self,
        prompts: Prompts,
        options: GenerateOptions,
        timesteps: tuple[int, ...],
        start: StartFn,
        trajectory: bool,
        on_step: StepCallback | None,
    ) -> Iterator[GeneratedImage]:
        """The shared driver: jobs and seeds, then batch by batch from `start`. A prompt is encoded once for all its
        images (they are consecutive), and only the prompts of the batch at hand are held."""
        jobs = as_jobs(prompts, options.seed, options.num_images)
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
            noise = Noise.for_seeds([j.seed for j in batch], self.device, self.uses_fast_sampler(options))
            with torch.inference_mode():
                x_t, known = start(noise)
            results = self._sample(
                batch, noise, x_t, context, timesteps, options, len(jobs), trajectory, on_step, known
            )
            for result in results:
                result.truncated_prompt = truncated[result.prompt]
                yield result

    @torch.inference_mode()
    def _sample(
        self,
        batch: list[Job],
        noise: Noise,
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
        chain: Iterator[torch.Tensor]
        levels = posterior_levels(timesteps, options.stride_mode, options.stride)
        reveal = None
        if options.budgeted and timesteps:  # each image's candidates at the start: read once, before the loop
            candidates = x_t == self.mask_id
            if known is not None:
                candidates &= known.regenerate
            masked = [int(m) for m in candidates.sum(dim=1).tolist()]
            reveal = reveal_plan(self.schedule, x_t.shape[1], timesteps, options, masked)
        calls = (
            len(timesteps)
            if reveal is None
            else network_calls(len(timesteps), reveal.masked, reveal.ratios, reveal.rule.per_call)
        )
        if not timesteps:  # nothing to sample (a variation of strength 0)
            chain = iter(())
        elif noise.words is not None:  # the fast sampler
            chain = self._denoise_fast(x_t, context, timesteps, options, noise.words, known, levels, reveal)
        else:
            assert noise.generators is not None
            chain = denoise(
                self._denoiser(),
                x_t,
                timesteps,
                context,
                self.schedule,
                noise.generators,
                options.guidance_scale,
                options.truncation_rate,
                known,
                levels,
                reveal,
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
                batch_size=len(batch),
                batch_index=b,
                network_calls=calls,
            )
            for b, job in enumerate(batch)
        ]

    def _denoise_fast(
        self,
        x_t: torch.Tensor,
        context: TextContext,
        timesteps: tuple[int, ...],
        options: GenerateOptions,
        words: torch.Tensor,
        known: KnownTokens | None,
        levels: list[tuple[int, int] | None] | None = None,
        reveal: RevealPlan | None = None,
    ) -> Iterator[torch.Tensor]:
        masked0 = None if reveal is None else torch.tensor(reveal.masked, dtype=torch.long, device=self.device)
        runner = self.fast_step_runner(context, words, options, known, masked0)
        return denoise_fast(runner, x_t, FastPlan.build(self.schedule, timesteps, self.device, levels, reveal))

    def fast_step_runner(
        self,
        context: TextContext,
        words: torch.Tensor,
        options: GenerateOptions,
        known: KnownTokens | None = None,
        masked0: torch.Tensor | None = None,
    ) -> StepRunner:
        """The fast sampler's whole step (network and sampling) for a batch, as `generate` runs it: replayed from a
        CUDA graph where graphs are on (`runner.cuda_graphs` says whether they still are). `words`: the batch's
        (B, 2) seed words; the runner is kept for the batch's shape and reloaded with these inputs."""
        if self.device.type == "mps":
            raise UsageError("the fast sampler needs float64, which MPS lacks", hint="use --sampler reference")
        rows = context.cond if context.uncond is None else torch.cat([context.uncond, context.cond])
        key = SessionKey(
            batch=words.shape[0],
            guidance_scale=options.guidance_scale if context.guided else None,
            truncation_rate=options.truncation_rate,
            known=known is not None,
            renoise=known is not None and known.renoise,
            reveal=reveal_rule(options),
        )
        if key.reveal is not None and masked0 is None:  # e.g. `vqdiff bench`: every token masked
            masked0 = torch.full((words.shape[0],), self.config.transformer.num_latent_pixels, device=self.device)
        session = self.fast_sessions.session(
            self.components.transformer, key, rows.to(self.dtype), words, known, masked0
        )
        return session.runner
