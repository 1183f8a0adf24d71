"""Speed measurements of vqdiff and, side by side on the very same weights, of diffusers' `VQDiffusionPipeline`.

`run_bench` returns a `BenchReport` (plain data, `to_json()`); it never prints. It measures, per dtype and batch size:
* phases: text encoding, one transformer forward (doubled under guidance), one step of the sampling math (guidance,
  truncation, posterior, sample) at a few representative timesteps, and the VQ decode to images;
* end to end (prompts to decoded images) at each step count, unless a run is estimated to take longer than
  `max_run_seconds` (then only the estimate derived from the phases is given, labelled as derived).
Every figure is the median of `repeats` timed runs after `warmup` untimed ones; engines alternate run by run.
With `vs_diffusers`, diffusers' modules are built on the meta device and take our tensors with `assign=True`, so both
pipelines read the same weights from the same memory.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch

from . import __version__
from .accel import Acceleration
from .api import GenerateOptions, ModelSource, VQDiffusion
from .config import TransformerConfig
from .device import DTYPES, device_name, native_dtypes, resolve_device
from .diffusion.fast import fast_step, step_coefficients
from .diffusion.sampler import sample_step
from .diffusion.streams import seed_words
from .errors import UsageError
from .weights import read_json

SCHEMA = "vqdiff.bench/1"
REFERENCE, FAST, DIFFUSERS = "vqdiff-reference", "vqdiff-fast", "diffusers"
PHASES = ("text", "transformer", "sampling", "decode")

# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched in order on the device
# name. The "about 790 TFLOP/s" for an H100/H200 is an achievable figure, not the datasheet peak used here.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
PEAK_SOURCE = "NVIDIA datasheet, dense bf16/fp16 tensor core"


@dataclass(frozen=True)
class BenchSettings:
    steps: tuple[int, ...] = (100, 25, 10)
    batches: tuple[int, ...] = (1, 4, 16)
    dtypes: tuple[str, ...] = ()  # empty: every dtype worth running on the device
    diffusers_dtypes: tuple[str, ...] = ()  # empty: the same as `dtypes`
    samplers: tuple[str, ...] = ()  # "reference", "fast"; empty: fast on CUDA, both elsewhere
    repeats: int = 3
    warmup: int = 1
    phases_only: bool = False
    vs_diffusers: bool = False
    guidance_scale: float = 5.0
    truncation_rate: float = 1.0
    sampling_timesteps: tuple[int, ...] = (99, 50, 1)  # the step math is also timed at t = 0 (the final step)
    transformer_timestep: int = 50
    max_run_seconds: float = 300.0
    prompt: str = "a teddy bear playing in the pool"
    seed: int = 0
    peak_tflops: float | None = None  # overrides the table above

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError("--repeats must be at least 1 and --warmup at least 0")
        if not self.steps or min(self.steps) < 1 or not self.batches or min(self.batches) < 1:
            raise UsageError("--steps and --batch need positive values")
        for dt in (*self.dtypes, *self.diffusers_dtypes):
            if dt not in DTYPES:
                raise UsageError(f"unknown dtype '{dt}'", hint=f"use one of: {', '.join(DTYPES)}")
        for s in self.samplers:
            if s not in ("reference", "fast"):
                raise UsageError(f"unknown sampler '{s}'", hint="use reference or fast")


@dataclass
class PhaseResult:
    engine: str
    dtype: str
    batch: int
    phase: str
    timestep: int | None
    runs_s: list[float]
    median_s: float
    per_image_s: float
    tflops: float | None = None  # transformer only: achieved model TFLOP/s
    peak_fraction: float | None = None  # of the device's dense peak (GPUs only)
    peak_memory_bytes: int | None = None


@dataclass
class EndToEnd:
    engine: str
    dtype: str
    batch: int
    steps: int
    kind: str  # "measured" or "derived" (text + steps x (forward + sampling) + decode, from the phases)
    median_s: float  # one batch, prompts to images
    s_per_image: float
    images_per_s: float
    runs_s: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None


@dataclass
class Speedup:
    engine: str
    dtype: str
    baseline: str
    baseline_dtype: str
    batch: int
    steps: int
    kind: str  # "measured" when both sides were measured end to end, else "derived"
    ratio: float  # baseline seconds / our seconds: above 1 means faster than the baseline


@dataclass
class BenchReport:
    created: str
    versions: dict[str, str | None]
    device: dict[str, Any]
    model: dict[str, Any]
    settings: dict[str, Any]
    phases: list[PhaseResult] = field(default_factory=list)
    end_to_end: list[EndToEnd] = field(default_factory=list)
    speedups: list[Speedup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    command: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}


# -- FLOPs and peaks ----------------------------------------------------------------------------------------------


def transformer_flops(cfg: TransformerConfig, text_len: int = 77) -> float:
    """FLOPs of one forward for one image: 2 x multiply-adds of every matmul, attention included."""
    d, n, ff = cfg.inner_dim, cfg.num_latent_pixels, 4 * cfg.inner_dim
    per_token = 2 * (4 * d * d + 2 * d * d + 2 * d * ff)  # self q, k, v, out; cross q, out; feed-forward
    per_token += 2 * 2 * (n + text_len) * d  # q k^T and attention x v, self and cross
    per_block = n * per_token + 2 * 2 * text_len * cfg.cross_attention_dim * d + 2 * 2 * d * 2 * d  # text k, v; norms
    return float(cfg.num_layers * per_block + 2 * n * d * (cfg.num_vector_embeds - 1))


def device_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


# -- measuring ----------------------------------------------------------------------------------------------------


class PeakMemory:
    """CUDA: the allocator's peak. CPU: the process's peak resident set (Linux), reset through /proc when allowed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak is then the process's
                Path("/proc/self/clear_refs").write_text("5", encoding="ascii")

    def read(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            status = Path("/proc/self/status").read_text(encoding="ascii")
        except OSError:
            return None
        m = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(m.group(1)) * 1024 if m else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    runs: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device
) -> dict[str, tuple[list[float], int | None]]:
    """Time each callable `repeats` times after `warmup` untimed calls, alternating between them run by run."""
    memory = PeakMemory(device)
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, int | None] = dict.fromkeys(runs)
    for _ in range(repeats):
        for key, fn in runs.items():
            _sync(device)
            memory.reset()
            start = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - start)
            peak = memory.read()
            if peak is not None:
                peaks[key] = max(peak, peaks[key] or 0)
    return {k: (times[k], peaks[k]) for k in runs}


# -- the engines --------------------------------------------------------------------------------------------------


class Engine(Protocol):
    name: str

    def prepare(self, prompts: list[str]) -> None: ...  # text conditioning for the phase runs
    def text(self, prompts: list[str]) -> Any: ...
    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor: ...
    def sampling(self, out: torch.Tensor, x_t: torch.Tensor, t: int, s: int | None) -> torch.Tensor: ...
    def decode(self, tokens: torch.Tensor) -> Any: ...
    def generate(self, prompts: list[str], steps: int) -> Any: ...


class OurEngine:
    """vqdiff with the reference (diffusers-order) or the fast sampler, each phase as that sampler runs it."""

    def __init__(self, pipe: VQDiffusion, sampler: str, settings: BenchSettings) -> None:
        self.pipe, self.sampler, self.settings = pipe, sampler, settings
        self.name = FAST if sampler == "fast" else REFERENCE
        self.guided = settings.guidance_scale != 1.0
        self.rows: torch.Tensor | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def text(self, prompts: list[str]) -> Any:
        with torch.inference_mode():
            context = self.pipe.text_context(prompts, self.guided)
            rows = context.cond if context.uncond is None else torch.cat([context.uncond, context.cond])
            rows = rows.to(self.pipe.dtype)
            kv = self.pipe.components.transformer.context_kv(rows) if self.sampler == "fast" else None
        return rows, kv

    def prepare(self, prompts: list[str]) -> None:
        self.rows, self.kv = self.text(prompts)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        transformer = self.pipe.components.transformer
        x = torch.cat([x, x]) if self.guided else x
        if self.sampler == "fast":
            return transformer.logits(x, self.rows, torch.tensor(t, device=x.device), self.kv)
        return transformer(x, self.rows, t)

    @torch.inference_mode()
    def sampling(self, out: torch.Tensor, x_t: torch.Tensor, t: int, s: int | None) -> torch.Tensor:
        st = self.settings
        seeds = [st.seed + b for b in range(x_t.shape[0])]
        if self.sampler == "fast":
            coef = torch.tensor(step_coefficients(self.pipe.schedule, t, s), dtype=torch.float64, device=x_t.device)
            scale = st.guidance_scale if self.guided else None
            words, salt = seed_words(seeds, x_t.device), torch.tensor(2 * t, device=x_t.device)
            return fast_step(out, x_t, coef, words, salt, scale, st.truncation_rate, s is None)
        log_p = out.chunk(2) if self.guided else (out,)
        generators = [torch.Generator(x_t.device).manual_seed(seed) for seed in seeds]
        return torch.cat(
            [
                sample_step(
                    tuple(p[b : b + 1] for p in log_p),
                    x_t[b : b + 1],
                    t,
                    s,
                    self.pipe.schedule,
                    st.guidance_scale,
                    st.truncation_rate,
                    generators[b : b + 1],
                )
                for b in range(x_t.shape[0])
            ]
        )

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

    name = DIFFUSERS

    def __init__(self, pipe: Any, settings: BenchSettings) -> None:
        self.pipe, self.settings = pipe, settings
        self.guided = settings.guidance_scale > 1.0  # diffusers' own rule
        self.rows: torch.Tensor | None = None

    def text(self, prompts: list[str]) -> Any:
        with torch.inference_mode():
            return self.pipe._encode_prompt(prompts, 1, self.guided)

    def prepare(self, prompts: list[str]) -> None:
        self.rows = self.text(prompts)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        x = torch.cat([x, x]) if self.guided else x
        return self.pipe.transformer(
            x, encoder_hidden_states=self.rows, timestep=torch.tensor(t, device=x.device)
        ).sample

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
        return self.pipe.scheduler.step(out, timestep=t, sample=x_t, generator=generator).prev_sample

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
    text_model = comps.text.text_model
    if dtype != torch.float32:  # diffusers feeds the text states to the transformer as they come
        text_model = copy.deepcopy(text_model).to(dtype)
    null_cfg = comps.config.null_embedding
    null = LearnedClassifierFreeSamplingEmbeddings(
        learnable=null_cfg.learnable, hidden_size=null_cfg.hidden_size, length=null_cfg.length
    )
    if comps.text.null_embedding is not None:
        null.embeddings = torch.nn.Parameter(comps.text.null_embedding.detach().to(dtype), requires_grad=False)
    s = comps.config.scheduler
    scheduler = VQDiffusionScheduler(
        num_vec_classes=s.num_vec_classes,
        num_train_timesteps=s.num_train_timesteps,
        alpha_cum_start=s.alpha_cum_start,
        alpha_cum_end=s.alpha_cum_end,
        gamma_cum_start=s.gamma_cum_start,
        gamma_cum_end=s.gamma_cum_end,
    )
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


# -- the benchmark ------------------------------------------------------------------------------------------------


def _diffusers_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:
        return None


def _random_tokens(batch: int, n: int, codes: int, masked: float, seed: int, device: torch.device) -> torch.Tensor:
    """(B, N) ids: the mask (id `codes`) with probability `masked`, else a random code; as x_t at that level."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, codes, (batch, n), generator=g)
    ids[torch.rand(batch, n, generator=g) < masked] = codes
    return ids.to(device)


@dataclass
class _Load:
    """How to get our pipeline in a dtype: from a checkpoint folder, or built with random weights."""

    model: Path | None
    configs: dict[str, dict[str, Any]]
    device: torch.device
    acceleration: Acceleration
    seed: int

    def pipeline(self, dtype: str) -> VQDiffusion:
        if self.model is not None:
            return VQDiffusion.from_pretrained(
                self.model,
                device=str(self.device),
                dtype=dtype,
                compile=self.acceleration.compile,
                cuda_graphs=self.acceleration.cuda_graphs,
            )
        from .synthetic import random_components

        components = random_components(self.configs, self.device, DTYPES[dtype], self.seed)
        source = ModelSource("random weights (shipped configs)", Path("."))
        return VQDiffusion(components, self.device, DTYPES[dtype], source, self.acceleration)


def _checkpoint_configs(model: Path) -> dict[str, dict[str, Any]]:
    names = {
        "transformer": "transformer/config.json",
        "vqvae": "vqvae/config.json",
        "scheduler": "scheduler/scheduler_config.json",
        "learned_classifier_free_sampling_embeddings": "learned_classifier_free_sampling_embeddings/config.json",
        "text_encoder": "text_encoder/config.json",
    }
    return {k: read_json(model / v) for k, v in names.items()}


def run_bench(
    settings: BenchSettings,
    *,
    model: Path | None = None,
    architecture: str = "ithq",
    device: str = "auto",
    acceleration: Acceleration | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure vqdiff (and diffusers with `settings.vs_diffusers`) on a checkpoint folder or on random weights."""
    from .synthetic import architecture_configs

    say = on_progress or (lambda _msg: None)
    dev = resolve_device(device)
    if settings.vs_diffusers and _diffusers_version() is None:
        raise UsageError("--vs-diffusers needs diffusers", hint="pip install diffusers==0.42.1")
    dtypes = settings.dtypes or native_dtypes(dev)
    theirs_dtypes = (settings.diffusers_dtypes or dtypes) if settings.vs_diffusers else ()
    samplers = settings.samplers or (("fast",) if dev.type == "cuda" else ("reference", "fast"))
    acceleration = acceleration or Acceleration()
    configs = _checkpoint_configs(model) if model is not None else architecture_configs(architecture)
    load = _Load(model, configs, dev, acceleration, settings.seed)

    peak = settings.peak_tflops if settings.peak_tflops is not None else None
    name = device_name(dev)
    if peak is None and dev.type == "cuda":
        peak = device_peak_tflops(name)
    report = BenchReport(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        versions={
            "vqdiff": __version__,
            "torch": torch.__version__,
            "diffusers": _diffusers_version() if settings.vs_diffusers else None,
            "python": platform.python_version(),
        },
        device={
            "type": dev.type,
            "name": name,
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "peak_tflops": peak,
            "peak_source": (
                None if peak is None else ("--peak-tflops" if settings.peak_tflops is not None else PEAK_SOURCE)
            ),
        },
        model={},
        settings={**asdict(settings), "dtypes": list(dtypes), "diffusers_dtypes": list(theirs_dtypes)},
    )
    for dtype in dict.fromkeys((*dtypes, *theirs_dtypes)):
        say(f"building the {dtype} model" + (" and diffusers' pipeline on the same weights" if theirs_dtypes else ""))
        pipe = load.pipeline(dtype)
        if not report.model:
            cfg = pipe.config.transformer
            report.model = {
                "source": str(model) if model is not None else f"random weights, '{architecture}' configs",
                "transformer_parameters": sum(p.numel() for p in pipe.components.transformer.parameters()),
                "layers": cfg.num_layers,
                "width": cfg.inner_dim,
                "tokens": cfg.num_latent_pixels,
                "classes": cfg.num_vector_embeds,
                "tflop_per_image_forward": transformer_flops(cfg) / 1e12,
            }
        engines: list[Engine] = [OurEngine(pipe, s, settings) for s in samplers] if dtype in dtypes else []
        if dtype in theirs_dtypes:
            theirs, note = diffusers_pipeline(pipe, configs, DTYPES[dtype])
            engines.append(DiffusersEngine(theirs, settings))
            if note:
                report.notes.append(note)
        for batch in settings.batches:
            _bench_batch(report, engines, pipe, dtype, batch, settings, dev, say)
        report.notes.extend(n for n in pipe.acceleration_notes if n not in report.notes)
        del engines, pipe
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report.speedups = _speedups(report.end_to_end)
    return report


def _bench_batch(
    report: BenchReport,
    engines: Sequence[Engine],
    pipe: VQDiffusion,
    dtype: str,
    batch: int,
    st: BenchSettings,
    dev: torch.device,
    say: Callable[[str], None],
) -> None:
    cfg = pipe.config.transformer
    codes = cfg.num_vector_embeds - 1
    prompts = [st.prompt if i == 0 else f"{st.prompt} {i}" for i in range(batch)]  # distinct: no shared encoding
    flops = transformer_flops(cfg) * batch * (2 if st.guidance_scale != 1.0 else 1)
    peak_tflops = report.device["peak_tflops"]
    by = {e.name: e for e in engines}
    results: dict[tuple[str, str, int | None], PhaseResult] = {}

    def record(phase: str, t: int | None, timed: dict[str, tuple[list[float], int | None]]) -> None:
        for engine, (runs, peak) in timed.items():
            median = statistics.median(runs)
            result = PhaseResult(engine, dtype, batch, phase, t, runs, median, median / batch, peak_memory_bytes=peak)
            if phase == "transformer":
                result.tflops = flops / median / 1e12
                result.peak_fraction = result.tflops / peak_tflops if peak_tflops else None
            report.phases.append(result)
            results[(engine, phase, t)] = result

    say(f"{dtype}, batch {batch}: text encoding")
    record("text", None, measure({n: (lambda e=e: e.text(prompts)) for n, e in by.items()}, st.warmup, st.repeats, dev))
    for engine in engines:
        engine.prepare(prompts)

    say(f"{dtype}, batch {batch}: transformer forward")
    t_fwd = st.transformer_timestep
    x = _random_tokens(batch, cfg.num_latent_pixels, codes, float(pipe.schedule.cumprod_ct[t_fwd]), st.seed, dev)
    outputs: dict[str, torch.Tensor] = {}

    def forward(e: Engine) -> None:
        outputs[e.name] = e.forward(x, t_fwd)

    record(
        "transformer", t_fwd, measure({n: (lambda e=e: forward(e)) for n, e in by.items()}, st.warmup, st.repeats, dev)
    )

    for t in (*st.sampling_timesteps, 0):
        s = None if t == 0 else t - 1
        say(f"{dtype}, batch {batch}: sampling math at t={t}")
        x_t = _random_tokens(batch, cfg.num_latent_pixels, codes, float(pipe.schedule.cumprod_ct[t]), st.seed + t, dev)
        runs = {n: (lambda e=e, x_t=x_t, t=t, s=s: e.sampling(outputs[e.name], x_t, t, s)) for n, e in by.items()}
        record("sampling", t, measure(runs, st.warmup, st.repeats, dev))

    say(f"{dtype}, batch {batch}: VQ decode")
    tokens = _random_tokens(batch, cfg.num_latent_pixels, codes, 0.0, st.seed, dev)
    record(
        "decode", None, measure({n: (lambda e=e: e.decode(tokens)) for n, e in by.items()}, st.warmup, st.repeats, dev)
    )
    outputs.clear()

    for steps in st.steps:
        estimates = {}
        for name in by:
            posterior = [results[(name, "sampling", t)].median_s for t in st.sampling_timesteps]
            seconds = (
                results[(name, "text", None)].median_s
                + steps * results[(name, "transformer", t_fwd)].median_s
                + (steps - 1) * statistics.fmean(posterior)
                + results[(name, "sampling", 0)].median_s
                + results[(name, "decode", None)].median_s
            )
            estimates[name] = seconds
            report.end_to_end.append(
                EndToEnd(name, dtype, batch, steps, "derived", seconds, seconds / batch, batch / seconds)
            )
        if st.phases_only:
            continue
        runnable = {n: e for n, e in by.items() if estimates[n] <= st.max_run_seconds}
        for n in by.keys() - runnable.keys():
            report.notes.append(
                f"{n} {dtype} batch {batch} steps {steps}: not run end to end (about {estimates[n]:.0f} s a run, "
                f"above --max-run-seconds {st.max_run_seconds:.0f}); the derived estimate stands in"
            )
        if not runnable:
            continue
        say(f"{dtype}, batch {batch}: end to end, {steps} steps")
        timed = measure(
            {n: (lambda e=e, steps=steps: e.generate(prompts, steps)) for n, e in runnable.items()},
            st.warmup,
            st.repeats,
            dev,
        )
        for name, (runs, peak) in timed.items():
            median = statistics.median(runs)
            report.end_to_end.append(
                EndToEnd(name, dtype, batch, steps, "measured", median, median / batch, batch / median, runs, peak)
            )


def _speedups(rows: list[EndToEnd]) -> list[Speedup]:
    """Each vqdiff configuration against diffusers at the same batch and steps, in every dtype diffusers ran."""
    best: dict[tuple[str, str, int, int], EndToEnd] = {}
    for row in rows:  # a measured figure replaces the derived one
        key = (row.engine, row.dtype, row.batch, row.steps)
        if key not in best or row.kind == "measured":
            best[key] = row
    out = []
    for (engine, dtype, batch, steps), ours in best.items():
        if engine == DIFFUSERS:
            continue
        for (other, base_dtype, b, st), base in best.items():
            if other != DIFFUSERS or b != batch or st != steps:
                continue
            kind = "measured" if ours.kind == base.kind == "measured" else "derived"
            out.append(Speedup(engine, dtype, DIFFUSERS, base_dtype, batch, steps, kind, base.median_s / ours.median_s))
    return out
