"""The engines `vqdiff bench` times: vqdiff with either sampler, and diffusers' pipeline on vqdiff's own tensors.

Each engine runs one phase per call the way its sampler does in a real run (the reference sampler's float64
log-softmax and per-image math, the fast sampler's raw scores and cached text keys and values, diffusers' loop body
line for line), so that phases can be timed side by side and an end-to-end time derived from them. Those phase
calls are eager; where the fast sampler replays its steps from CUDA graphs, `ReplayedStep` times what a run does
instead: one replay of the whole step.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from ..diffusion.fast import step_coefficients
from ..diffusion.sampler import StepTables, chain_tables, sample_batch
from ..diffusion.streams import seed_words
from ..pipeline.fastpath import StepRunner
from ..pipeline.pipeline import GenerateOptions, VQDiffusion
from .report import BASELINE

if TYPE_CHECKING:
    from .report import BenchSettings

REFERENCE, FAST = "vqdiff-reference", "vqdiff-fast"


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of `modules`; shared storage counts once."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class _DeviceConstants:
    """Small device tensors a phase needs (timesteps, coefficients, seeds), made once: a host-to-device copy inside
    a timed run would be timed too."""

    def __init__(self) -> None:
        self._made: dict[tuple[Any, ...], torch.Tensor] = {}

    def get(self, key: tuple[Any, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


class Engine(Protocol):
    name: str

    def model_bytes(self) -> int: ...  # weights and buffers of the modules it runs
    def release(self) -> None: ...  # drop what earlier runs left allocated (buffers, CUDA-graph pools)
    def prepare(self, prompts: list[str]) -> None: ...  # text conditioning for the phase runs
    def text(self, prompts: list[str]) -> Any: ...
    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor: ...
    def sampling(self, out: torch.Tensor, x_t: torch.Tensor, t: int, s: int | None) -> torch.Tensor: ...
    def decode(self, tokens: torch.Tensor) -> Any: ...
    def generate(self, prompts: list[str], steps: int) -> Any: ...
    def replayed_step(self) -> ReplayedStep | None: ...  # after prepare(); None: its steps are not graph replays


class ReplayedStep:
    """One whole step of the fast sampler (network and sampling) for the prepared batch, as a run makes it: replayed
    from the batch shape's CUDA graph (captured at the first call), inputs copied in and the output copied out."""

    def __init__(self, runner: StepRunner, engine: OurEngine) -> None:
        self.runner, self.engine = runner, engine

    @property
    def replayed(self) -> bool:
        """Whether the calls so far were graph replays (False once the shape's capture failed: then eager steps)."""
        return self.runner.cuda_graphs

    @torch.inference_mode()
    def __call__(self, x_t: torch.Tensor, t: int, s: int | None) -> torch.Tensor:
        coef, salt = self.engine.step_inputs(x_t, t, s)  # the runner holds the batch's seed words already
        t_device = self.engine.constants.get(("t", t), lambda: torch.tensor(t, device=x_t.device))
        return self.runner(x_t, t_device, coef, salt, s is None)


class OurEngine:
    """vqdiff with the reference (diffusers-order) or the fast sampler, each phase as that sampler runs it."""

    def __init__(self, pipe: VQDiffusion, sampler: str, settings: BenchSettings) -> None:
        self.pipe, self.sampler, self.settings = pipe, sampler, settings
        self.name = FAST if sampler == "fast" else REFERENCE
        self.guided = settings.guided
        self.rows: torch.Tensor | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.constants = _DeviceConstants()
        self._tables: dict[tuple[int, int | None], StepTables] = {}
        self._replayed: ReplayedStep | None = None

    def model_bytes(self) -> int:
        comps = self.pipe.components
        return module_bytes(comps.transformer, comps.vqvae, comps.text)

    def release(self) -> None:
        self.pipe.release()
        self._replayed = None  # its runner holds the phase's CUDA graphs

    def text(self, prompts: list[str]) -> Any:
        with torch.inference_mode():
            context = self.pipe.text_context(prompts, self.guided)
            rows = context.cond if context.uncond is None else torch.cat([context.uncond, context.cond])
            rows = rows.to(self.pipe.dtype)
            kv = self.pipe.components.transformer.context_kv(rows) if self.sampler == "fast" else None
        return rows, kv

    def prepare(self, prompts: list[str]) -> None:
        self.rows, self.kv = self.text(prompts)
        self._replayed = None
        if self.sampler == "fast" and self.pipe.cuda_graphs:
            st = self.settings
            with torch.inference_mode():
                context = self.pipe.text_context(prompts, self.guided)
                words = self._words(len(prompts), self.pipe.device)
                options = GenerateOptions(guidance_scale=st.guidance_scale, truncation_rate=st.truncation_rate)
                self._replayed = ReplayedStep(self.pipe.fast_step_runner(context, words, options), self)

    def replayed_step(self) -> ReplayedStep | None:
        return self._replayed

    def _words(self, batch: int, device: torch.device) -> torch.Tensor:
        seeds = [self.settings.seed + b for b in range(batch)]
        return self.constants.get(("words", batch), lambda: seed_words(seeds, device))

    def step_inputs(self, x_t: torch.Tensor, t: int, s: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fast step's device inputs from t to s: its coefficients and its noise salt (each made once)."""
        dev, schedule = x_t.device, self.pipe.schedule
        coef = self.constants.get(
            ("coef", t, s),
            lambda: torch.tensor(step_coefficients(schedule, t, s), dtype=torch.float64, device=dev),
        )
        salt = self.constants.get(("salt", t), lambda: torch.tensor(2 * t, device=dev))
        return coef, salt

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        transformer = self.pipe.components.transformer
        rows = cast(torch.Tensor, self.rows)  # set by prepare()
        x = torch.cat([x, x]) if self.guided else x
        t_device = self.constants.get(("t", t), lambda: torch.tensor(t, device=x.device))
        if self.sampler == "fast":
            run_block = self.pipe.fast_kernels().run_block
            return transformer.logits(x, rows, t_device, self.kv, run_block)
        log_p: torch.Tensor = transformer(x, rows, t_device)
        return log_p

    @torch.inference_mode()
    def sampling(self, out: torch.Tensor, x_t: torch.Tensor, t: int, s: int | None) -> torch.Tensor:
        st = self.settings
        seeds = [st.seed + b for b in range(x_t.shape[0])]
        if self.sampler == "fast":
            coef, salt = self.step_inputs(x_t, t, s)
            words = self._words(x_t.shape[0], x_t.device)
            scale = st.guidance_scale if self.guided else None
            step_math = self.pipe.fast_kernels().step_math
            return step_math(out, x_t, coef, words, salt, scale, st.truncation_rate, s is None)
        log_p = out.chunk(2) if self.guided else (out,)
        generators = [torch.Generator(x_t.device).manual_seed(seed) for seed in seeds]
        schedule = self.pipe.schedule
        tables = self._tables.get((t, s))
        if tables is None:  # made once, outside the timed runs, as the sampler makes them once per chain
            tables = self._tables[(t, s)] = chain_tables(schedule, (t,) if s is None else (t, s), x_t.device)[0]
        return sample_batch(log_p, x_t, tables, schedule.num_classes, st.guidance_scale, st.truncation_rate, generators)

    def decode(self, tokens: torch.Tensor) -> Any:
        h, w = self.pipe.token_grid
        return self.pipe.decode(tokens.view(-1, h, w))

    def generate(self, prompts: list[str], steps: int) -> Any:
        st = self.settings
        options = GenerateOptions(
            steps=steps,
            guidance_scale=st.guidance_scale,
            truncation_rate=st.truncation_rate,
            seed=st.seed,
            batch_size=len(prompts),
            sampler=self.sampler,
        )
        return self.pipe.generate(prompts, options)


class DiffusersEngine:
    """diffusers' VQDiffusionPipeline, built from components on our weights; its loop body timed phase by phase."""

    name = BASELINE

    def __init__(self, pipe: Any, settings: BenchSettings) -> None:
        self.pipe, self.settings = pipe, settings
        self.guided = settings.guidance_scale > 1.0  # diffusers' own rule
        self.rows: torch.Tensor | None = None
        self.constants = _DeviceConstants()

    def model_bytes(self) -> int:
        p = self.pipe
        return module_bytes(p.transformer, p.vqvae, p.text_encoder, p.learned_classifier_free_sampling_embeddings)

    def release(self) -> None:
        pass  # diffusers keeps nothing between calls

    def replayed_step(self) -> ReplayedStep | None:
        return None  # diffusers' steps are eager

    def text(self, prompts: list[str]) -> Any:
        with torch.inference_mode():
            return self.pipe._encode_prompt(prompts, 1, self.guided)

    def prepare(self, prompts: list[str]) -> None:
        self.rows = self.text(prompts)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        x = torch.cat([x, x]) if self.guided else x
        t_device = self.constants.get(("t", t), lambda: torch.tensor(t, device=x.device))
        scores: torch.Tensor = self.pipe.transformer(x, encoder_hidden_states=self.rows, timestep=t_device).sample
        return scores

    @torch.inference_mode()
    def sampling(self, out: torch.Tensor, x_t: torch.Tensor, t: int, s: int | None) -> torch.Tensor:
        st = self.settings
        if self.guided:  # the pipeline's loop body, line for line
            uncond, text = out.chunk(2)
            out = uncond + st.guidance_scale * (text - uncond)
            out -= torch.logsumexp(out, dim=1, keepdim=True)
        out = self.pipe.truncate(out, st.truncation_rate).clamp(-70)
        generator = torch.Generator(x_t.device).manual_seed(st.seed)
        # diffusers always steps from t to t - 1 (s is that here), and samples x_0 directly at t = 0
        x_s: torch.Tensor = self.pipe.scheduler.step(out, timestep=t, sample=x_t, generator=generator).prev_sample
        return x_s

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> Any:
        vqvae = self.pipe.vqvae
        side = self.pipe.transformer.height
        shape = (tokens.shape[0], side, side, vqvae.config.vq_embed_dim)
        image = vqvae.decode(vqvae.quantize.get_codebook_entry(tokens, shape=shape), force_not_quantize=True).sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        return self.pipe.numpy_to_pil(image)

    def generate(self, prompts: list[str], steps: int) -> Any:
        st = self.settings
        generator = torch.Generator(self.pipe.transformer.device).manual_seed(st.seed)
        return self.pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=st.guidance_scale,
            truncation_rate=st.truncation_rate,
            generator=generator,
        ).images


def diffusers_pipeline(pipe: VQDiffusion, configs: dict[str, dict[str, Any]], dtype: torch.dtype) -> tuple[Any, str]:
    """diffusers' VQDiffusionPipeline on `pipe`'s own tensors (shared memory), built from components: its
    `from_pretrained` cannot load this pipeline in 0.42.1. Returns the pipeline and a note on what differs."""
    from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion import LearnedClassifierFreeSamplingEmbeddings

    def init_args(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not k.startswith("_")}

    comps = pipe.components
    with torch.device("meta"):
        transformer = Transformer2DModel(**{**init_args(configs["transformer"]), "norm_type": "ada_norm"})
        vqvae = VQModel(**init_args(configs["vqvae"]))
    transformer.load_state_dict(comps.transformer.state_dict(), strict=True, assign=True)
    vqvae.load_state_dict(comps.vqvae.state_dict(), strict=True, assign=True)
    note = ""
    if dtype == torch.bfloat16:  # the pipeline's numpy() of its decoded images fails on bfloat16
        vqvae = vqvae.float()
        note = "diffusers bfloat16: its VQ-VAE runs in float32 (the pipeline cannot turn bfloat16 images into numpy)"
    text_model: torch.nn.Module = comps.text.text_model  # a Module: mypy cannot bind transformers' @wraps-ed `.to`
    if dtype != torch.float32:  # diffusers feeds the text states to the transformer as they come
        text_model = copy.deepcopy(text_model).to(dtype)
    null_cfg = comps.config.null_embedding
    null = LearnedClassifierFreeSamplingEmbeddings(
        learnable=null_cfg.learnable, hidden_size=null_cfg.hidden_size, length=null_cfg.length
    )
    if comps.text.null_embedding is not None:
        null.embeddings = torch.nn.Parameter(comps.text.null_embedding.detach().to(dtype), requires_grad=False)
    s = comps.config.scheduler
    scheduler = VQDiffusionScheduler(**dataclasses.asdict(s))  # SchedulerConfig's fields are its arguments
    # its tables stay on the CPU until set_timesteps moves them; the pipeline's __call__ does, a lone step() does not
    scheduler.set_timesteps(s.num_train_timesteps, device=pipe.device)
    for module in (transformer, vqvae, text_model, null):
        module.eval().requires_grad_(False)
    result = VQDiffusionPipeline(
        vqvae=vqvae,
        text_encoder=text_model,
        tokenizer=comps.text.tokenizer,
        transformer=transformer,
        scheduler=scheduler,
        learned_classifier_free_sampling_embeddings=null.to(pipe.device),
    )
    result.set_progress_bar_config(disable=True)
    return result, note
