"""Speed measurements of vqdiff and, side by side on the very same weights, of diffusers' `VQDiffusionPipeline`.

`run_bench` returns a `BenchReport` (plain data, `to_json()`); it never prints. It measures, per dtype and batch size:
* phases: text encoding, one transformer forward (doubled under guidance), one step of the sampling math (guidance,
  truncation, posterior, sample) at a few representative timesteps, and the VQ decode to images; these run eagerly.
  Where the fast sampler replays its steps from CUDA graphs, also "step": one replay of a whole step at those
  timesteps, which is what its derived end-to-end figures are built from;
* end to end (prompts to decoded images) at each step count, unless a run is estimated to take longer than
  `max_run_seconds` (then only the estimate derived from the phases is given, labelled as derived).
Every figure is the median of `repeats` timed runs after `warmup` untimed ones; engines alternate run by run.
With `vs_diffusers`, diffusers' modules are built on the meta device and take our tensors with `assign=True`, so both
pipelines read the same weights from the same memory.
"""

from __future__ import annotations

import gc
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.layout import read_configs
from ..device import DTYPES, device_name, native_dtypes, resolve_device
from ..errors import UsageError
from ..options import DEFAULT_ARCHITECTURE
from ..pipeline.fastpath import Acceleration
from ..pipeline.pipeline import ModelSource, VQDiffusion
from ..version import __version__
from .engines import DiffusersEngine, Engine, OurEngine, diffusers_pipeline
from .measure import (
    PEAK_SOURCE,
    Timed,
    device_peak_tflops,
    feed_forward_shape,
    matmul_tflops,
    measure,
    sync,
    transformer_flops,
)
from .report import BenchReport, BenchSettings, EndToEnd, PhaseResult, derive_end_to_end, speedups

WARMUP_STEPS = 2  # an end-to-end warm-up run: the first and the final step (both CUDA graphs, every compiled variant)


def run_memory(engine: Engine, prompts: list[str], device: torch.device) -> int:
    """CUDA: the peak memory one cold generate allocates above what was allocated before it (activations, buffers,
    CUDA-graph pools: captures allocate through the counted allocator), after `engine` drops what it kept."""
    engine.release()
    gc.collect()
    torch.cuda.empty_cache()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    engine.generate(prompts, WARMUP_STEPS)
    sync(device)
    return int(torch.cuda.max_memory_allocated(device)) - before


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
        from ..checkpoint.random import random_components

        components = random_components(self.configs, self.device, DTYPES[dtype], self.seed)
        source = ModelSource("random weights (shipped configs)", Path("."))
        return VQDiffusion(components, self.device, DTYPES[dtype], source, self.acceleration)


def run_bench(
    settings: BenchSettings,
    *,
    model: Path | None = None,
    architecture: str = DEFAULT_ARCHITECTURE,
    device: str = "auto",
    acceleration: Acceleration | None = None,
    on_progress: Callable[[str], None] | None = None,
    on_update: Callable[[BenchReport], object] | None = None,
) -> BenchReport:
    """Measure vqdiff (and diffusers with `settings.vs_diffusers`) on a checkpoint folder or on random weights.

    `on_update(report)` is called with the figures so far after each batch size, e.g. to save them: a run cut short
    keeps what it finished.
    """
    from ..checkpoint.random import architecture_configs

    say = on_progress or (lambda _msg: None)
    dev = resolve_device(device)
    if settings.vs_diffusers and _diffusers_version() is None:
        raise UsageError("--vs-diffusers needs diffusers", hint="pip install diffusers==0.42.1")
    dtypes = settings.dtypes or native_dtypes(dev)
    theirs_dtypes = (settings.diffusers_dtypes or dtypes) if settings.vs_diffusers else ()
    samplers = settings.samplers or (("fast",) if dev.type == "cuda" else ("reference", "fast"))
    acceleration = acceleration or Acceleration()
    configs = read_configs(model) if model is not None else architecture_configs(architecture)
    load = _Load(model, configs, dev, acceleration, settings.seed)

    report = _new_report(settings, dev, dtypes, theirs_dtypes)
    for dtype in dict.fromkeys((*dtypes, *theirs_dtypes)):
        say(
            f"building the {dtype} model"
            + (" and diffusers' pipeline on its weights" if dtype in theirs_dtypes else "")
        )
        pipe = load.pipeline(dtype)
        shape = feed_forward_shape(pipe.config.transformer, max(settings.batches), settings.guided)
        say(f"{dtype}: the device's matmul rate on the feed-forward's {shape[0]}x{shape[1]}x{shape[2]} matmul")
        report.device["matmul_tflops"][dtype] = matmul_tflops(dev, DTYPES[dtype], shape)
        report.device["matmul_shape"] = list(shape)
        if not report.model:
            source = str(model) if model is not None else f"random weights, '{architecture}' configs"
            report.model = _model_record(pipe, source)
        engines: list[Engine] = [OurEngine(pipe, s, settings) for s in samplers] if dtype in dtypes else []
        if dtype in theirs_dtypes:
            theirs, note = diffusers_pipeline(pipe, configs, DTYPES[dtype])
            engines.append(DiffusersEngine(theirs, settings))
            if note:
                report.notes.append(note)
        for batch in settings.batches:
            _bench_batch(report, engines, pipe, dtype, batch, settings, dev, say)
            report.notes.extend(n for n in pipe.acceleration_notes if n not in report.notes)
            report.speedups = speedups(report.end_to_end)
            if on_update is not None:
                on_update(report)
        del engines, pipe
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return report


def _new_report(
    settings: BenchSettings, dev: torch.device, dtypes: Sequence[str], theirs_dtypes: Sequence[str]
) -> BenchReport:
    """A report with no figures yet: when, with what versions, on which device (and its peak), asked what."""
    peak = settings.peak_tflops
    name = device_name(dev)
    if peak is None and dev.type == "cuda":
        peak = device_peak_tflops(name)
    return BenchReport(
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
            "matmul_tflops": {},  # dtype -> rate measured on the feed-forward matmul at the largest batch
            "matmul_shape": None,  # its (M, K, N)
        },
        model={},
        settings={**asdict(settings), "dtypes": list(dtypes), "diffusers_dtypes": list(theirs_dtypes)},
    )


def _model_record(pipe: VQDiffusion, source: str) -> dict[str, Any]:
    cfg = pipe.config.transformer
    return {
        "source": source,
        "transformer_parameters": sum(p.numel() for p in pipe.components.transformer.parameters()),
        "layers": cfg.num_layers,
        "width": cfg.inner_dim,
        "tokens": cfg.num_latent_pixels,
        "classes": cfg.num_vector_embeds,
        "tflop_per_image_forward": transformer_flops(cfg) / 1e12,
        "fast_block_folds_gelu": pipe.fast_kernels().folded_gelu,  # False: the fold could overflow (float16)
    }


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
    """Every figure of one dtype and batch size: the phases, then (unless --phases-only) the end-to-end runs that
    the phases estimate to fit in --max-run-seconds."""
    prompts = [st.prompt if i == 0 else f"{st.prompt} {i}" for i in range(batch)]  # distinct: no shared encoding
    by = {e.name: e for e in engines}
    results = _bench_phases(report, by, pipe, dtype, prompts, st, dev, say)
    estimates = derive_end_to_end(report, by, results, dtype, batch, st)
    if not st.phases_only:
        _bench_end_to_end(report, by, estimates, dtype, prompts, st, dev, say)


def _bench_phases(
    report: BenchReport,
    by: Mapping[str, Engine],
    pipe: VQDiffusion,
    dtype: str,
    prompts: list[str],
    st: BenchSettings,
    dev: torch.device,
    say: Callable[[str], None],
) -> dict[tuple[str, str, int | None], PhaseResult]:
    """Text encoding, one transformer forward, the sampling math at a few timesteps and the VQ decode, each timed
    for every engine side by side; recorded in `report` and returned by (engine, phase, timestep)."""
    batch = len(prompts)
    cfg = pipe.config.transformer
    codes = cfg.num_vector_embeds - 1
    flops = transformer_flops(cfg) * batch * (2 if st.guided else 1)
    peak_tflops = report.device["peak_tflops"]
    matmul_rate = report.device["matmul_tflops"].get(dtype)
    results: dict[tuple[str, str, int | None], PhaseResult] = {}

    def record(phase: str, t: int | None, timed: dict[str, Timed], graphs: Mapping[str, bool] | None = None) -> None:
        for engine, m in timed.items():
            median = m.median_s
            result = PhaseResult(engine, dtype, batch, phase, t, m.runs_s, median, median / batch)
            result.peak_memory_bytes, result.peak_reserved_bytes = m.peak_bytes, m.reserved_bytes
            result.cuda_graph = None if graphs is None else graphs[engine]
            if phase == "transformer":
                result.tflops = flops / median / 1e12
                result.peak_fraction = result.tflops / peak_tflops if peak_tflops else None
                result.matmul_fraction = result.tflops / matmul_rate if matmul_rate else None
            report.phases.append(result)
            results[(engine, phase, t)] = result

    say(f"{dtype}, batch {batch}: text encoding")
    record("text", None, measure({n: partial(e.text, prompts) for n, e in by.items()}, st.warmup, st.repeats, dev))
    for engine in by.values():
        engine.prepare(prompts)

    say(f"{dtype}, batch {batch}: transformer forward")
    t_fwd = st.transformer_timestep
    x = _random_tokens(batch, cfg.num_latent_pixels, codes, float(pipe.schedule.cumprod_ct[t_fwd]), st.seed, dev)
    outputs: dict[str, torch.Tensor] = {}

    def forward(e: Engine) -> None:
        outputs[e.name] = e.forward(x, t_fwd)

    def sampling(e: Engine, x_t: torch.Tensor, t: int, s: int | None) -> torch.Tensor:
        return e.sampling(outputs[e.name], x_t, t, s)  # the forward's output, looked up when it runs

    record("transformer", t_fwd, measure({n: partial(forward, e) for n, e in by.items()}, st.warmup, st.repeats, dev))

    for t in (*st.sampling_timesteps, 0):
        s = None if t == 0 else t - 1
        say(f"{dtype}, batch {batch}: sampling math at t={t}")
        x_t = _random_tokens(batch, cfg.num_latent_pixels, codes, float(pipe.schedule.cumprod_ct[t]), st.seed + t, dev)
        runs = {n: partial(sampling, e, x_t, t, s) for n, e in by.items()}
        record("sampling", t, measure(runs, st.warmup, st.repeats, dev))

    replayed = {n: step for n, e in by.items() if (step := e.replayed_step()) is not None}
    for t in (*st.sampling_timesteps, 0) if replayed else ():
        s = None if t == 0 else t - 1
        say(f"{dtype}, batch {batch}: one whole step replayed from its CUDA graph at t={t}")
        x_t = _random_tokens(batch, cfg.num_latent_pixels, codes, float(pipe.schedule.cumprod_ct[t]), st.seed + t, dev)
        runs = {n: partial(step, x_t, t, s) for n, step in replayed.items()}
        timed = measure(runs, max(1, st.warmup), st.repeats, dev)  # an untimed first call captures the graph
        record("step", t, timed, {n: step.replayed for n, step in replayed.items()})
    for name in replayed:
        note = (
            f"{name} on {dev.type}: its transformer and sampling phases are eager calls; its runs replay each step "
            "from a CUDA graph, timed as the 'step' phase, and its derived end-to-end rows come from that"
        )
        if note not in report.notes:
            report.notes.append(note)

    say(f"{dtype}, batch {batch}: VQ decode")
    tokens = _random_tokens(batch, cfg.num_latent_pixels, codes, 0.0, st.seed, dev)
    record("decode", None, measure({n: partial(e.decode, tokens) for n, e in by.items()}, st.warmup, st.repeats, dev))
    outputs.clear()
    return results


def _bench_end_to_end(
    report: BenchReport,
    by: Mapping[str, Engine],
    estimates: Mapping[tuple[str, int], float],
    dtype: str,
    prompts: list[str],
    st: BenchSettings,
    dev: torch.device,
    say: Callable[[str], None],
) -> None:
    """Prompts to images at each step count, for the engines estimated to finish within --max-run-seconds."""
    batch = len(prompts)
    # Once per batch, before the timed runs: on CUDA a cold run per engine that measures its memory, then short
    # warm-up runs (they capture the CUDA graphs and compile what a run of any length needs).
    runnable_at = {
        steps: {n: e for n, e in by.items() if estimates[(n, steps)] <= st.max_run_seconds} for steps in st.steps
    }
    memory: dict[str, tuple[int, int]] = {}
    for name, engine in by.items():
        if not any(name in runnable for runnable in runnable_at.values()):
            continue  # only derived figures for this engine: nothing to warm up
        if dev.type == "cuda":
            say(f"{dtype}, batch {batch}: memory of a cold run ({name})")
            memory[name] = (engine.model_bytes(), run_memory(engine, prompts, dev))
        for _ in range(st.warmup):
            engine.generate(prompts, WARMUP_STEPS)
    for steps, runnable in runnable_at.items():
        for n in by.keys() - runnable.keys():
            report.notes.append(
                f"{n} {dtype} batch {batch} steps {steps}: not run end to end (about {estimates[(n, steps)]:.0f} s "
                f"a run, above --max-run-seconds {st.max_run_seconds:.0f}); the derived estimate stands in"
            )
        if not runnable:
            continue
        say(f"{dtype}, batch {batch}: end to end, {steps} steps")
        timed = measure({n: partial(e.generate, prompts, steps) for n, e in runnable.items()}, 0, st.repeats, dev)
        for name, m in timed.items():
            median = m.median_s
            row = EndToEnd(name, dtype, batch, steps, "measured", median, median / batch, batch / median, m.runs_s)
            row.peak_memory_bytes, row.peak_reserved_bytes = m.peak_bytes, m.reserved_bytes
            if name in memory:
                row.model_bytes, row.run_memory_bytes = memory[name]
                row.peak_memory_bytes = row.model_bytes + row.run_memory_bytes
            report.end_to_end.append(row)
