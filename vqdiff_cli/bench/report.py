"""What `vqdiff bench` is asked (`BenchSettings`) and what it reports (`BenchReport`: plain data, `to_json()`), with
the figures computed from other figures: end-to-end times derived from the phases, and speed-ups over diffusers."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UsageError, excerpt
from ..options import DTYPE_CHOICES, GenerateOptions

SCHEMA = "vqdiff.bench/1"
BASELINE = "diffusers"  # the engine every other one is compared with


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
    guidance_scale: float = GenerateOptions.guidance_scale
    truncation_rate: float = GenerateOptions.truncation_rate
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
            if dt not in DTYPE_CHOICES or dt == "auto":
                raise UsageError(f"unknown dtype '{excerpt(dt)}'", hint=f"use one of: {', '.join(DTYPE_CHOICES[1:])}")
        for s in self.samplers:
            if s not in ("reference", "fast"):
                raise UsageError(f"unknown sampler '{excerpt(s)}'", hint="use reference or fast")
        # the run's sampling settings, checked as a generation checks them
        GenerateOptions(guidance_scale=self.guidance_scale, truncation_rate=self.truncation_rate)
        if not self.max_run_seconds >= 0:
            raise UsageError(f"--max-run-seconds must be at least 0, got {self.max_run_seconds}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise UsageError(f"--peak-tflops must be above 0, got {self.peak_tflops}")
        if self.diffusers_dtypes and not self.vs_diffusers:
            raise UsageError("--diffusers-dtype needs --vs-diffusers")

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on: every forward runs the batch twice (as `GenerateOptions.guided`)."""
        return self.guidance_scale != 1.0


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
    peak_fraction: float | None = None  # of the device's datasheet dense peak (GPUs only)
    matmul_fraction: float | None = None  # of the dense matmul rate measured on this device in this dtype
    peak_memory_bytes: int | None = None  # CUDA: peak allocated; CPU: peak resident set of the process
    peak_reserved_bytes: int | None = None  # CUDA: peak reserved, CUDA-graph memory pools included
    # "step" (vqdiff-fast where it replays CUDA graphs: one whole step as a run makes it) only: whether the timed
    # calls were graph replays (False if the capture failed and steps ran eagerly). Every other phase is eager.
    cuda_graph: bool | None = None


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
    # CUDA: model_bytes + run_memory_bytes, what the engine needs alone; CPU: peak resident set of the process
    peak_memory_bytes: int | None = None
    peak_reserved_bytes: int | None = None  # CUDA: the allocator's peak reserve during the timed runs
    model_bytes: int | None = None  # CUDA: the weights and buffers of the engine's modules
    run_memory_bytes: int | None = None  # CUDA: peak allocated during a cold run above what was allocated before
    derived_from: str | None = None  # derived rows: "step" (whole-step replays) or "transformer + sampling" (eager)


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


def derive_end_to_end(
    report: BenchReport,
    engines: Iterable[str],
    results: Mapping[tuple[str, str, int | None], PhaseResult],
    dtype: str,
    batch: int,
    st: BenchSettings,
) -> dict[tuple[str, int], float]:
    """End-to-end seconds derived from the phases, per engine and step count, recorded as "derived" rows:
    text + steps x forward + (steps - 1) x mean(step math) + final step math + decode; for an engine with "step"
    phases (whole steps replayed from CUDA graphs, as its runs make them), text + (steps - 1) x mean(step) + final
    step + decode instead, so that eager phase figures never stand for graph-replayed runs."""
    estimates = {}
    for steps in st.steps:
        for name in engines:
            if all((name, "step", t) in results for t in (*st.sampling_timesteps, 0)):
                per_step = [results[(name, "step", t)].median_s for t in st.sampling_timesteps]
                chain = (steps - 1) * statistics.fmean(per_step) + results[(name, "step", 0)].median_s
                source = "step"
            else:
                posterior = [results[(name, "sampling", t)].median_s for t in st.sampling_timesteps]
                chain = (
                    steps * results[(name, "transformer", st.transformer_timestep)].median_s
                    + (steps - 1) * statistics.fmean(posterior)
                    + results[(name, "sampling", 0)].median_s
                )
                source = "transformer + sampling"
            seconds = results[(name, "text", None)].median_s + chain + results[(name, "decode", None)].median_s
            estimates[(name, steps)] = seconds
            row = EndToEnd(name, dtype, batch, steps, "derived", seconds, seconds / batch, batch / seconds)
            row.derived_from = source
            report.end_to_end.append(row)
    return estimates


def speedups(rows: list[EndToEnd]) -> list[Speedup]:
    """Each vqdiff configuration against diffusers at the same batch and steps, in every dtype diffusers ran:
    derived against derived always, and measured against measured where both ran end to end."""
    by_key = {(r.engine, r.dtype, r.batch, r.steps, r.kind): r for r in rows}
    out = []
    for (engine, dtype, batch, steps, kind), ours in by_key.items():
        if engine == BASELINE:
            continue
        for (other, base_dtype, b, st, base_kind), base in by_key.items():
            if other == BASELINE and (b, st, base_kind) == (batch, steps, kind):
                out.append(
                    Speedup(engine, dtype, BASELINE, base_dtype, batch, steps, kind, base.median_s / ours.median_s)
                )
    return out
