"""What several commands share: loading the model the options name, with download and conversion progress."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import excerpt
from .console import LoadReporter, Output

if TYPE_CHECKING:
    from ..pipeline.pipeline import VQDiffusion
    from .settings import Resolved, SettingFlags


def load_model(
    out: Output,
    model: str,
    *,
    device: str,
    dtype: str,
    variant: str,
    revision: str | None = None,
    offline: bool = False,
    cache_dir: Path | None = None,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    threads: int | None = None,
    lora: Path | None = None,
    lora_scale: float | None = None,
) -> VQDiffusion:
    """Load `model` (a local folder or a Hub repo id, fetched and converted on first use), saying so on stderr;
    `lora` (with `lora_scale`, default 1) is a LoRA adapter merged into the transformer."""
    import torch

    from ..device import configure_cpu_threads, cpu_runs_natively, dtype_name
    from ..pipeline.pipeline import VQDiffusion
    from . import heap

    configure_cpu_threads(threads)
    out.info(f"loading {excerpt(model)}" + (f" ({excerpt(revision)})" if revision else ""))
    with LoadReporter(out) as report:
        pipe = VQDiffusion.from_pretrained(
            model,
            device=device,
            dtype=dtype,
            variant=variant,
            revision=revision,
            offline=offline,
            cache_dir=cache_dir,
            on_progress=report,
            compile=compile,
            cuda_graphs=cuda_graphs,
            lora=lora,
            lora_scale=1.0 if lora_scale is None else lora_scale,
        )
    if lora is not None:
        out.info(f"LoRA adapter {lora} merged (scale {pipe.lora[1] if pipe.lora else 1.0:g})")
    if pipe.device.type == "cpu":  # after loading: a first load's conversion frees gigabytes that should go back
        heap.keep_freed_memory()  # every forward reuses the memory the previous one freed (no page faults)
    if pipe.device.type == "cpu" and not cpu_runs_natively(pipe.dtype):
        name = dtype_name(pipe.dtype)
        out.warn(f"this CPU has no native {name}: torch emulates it, many times slower than float32 (--dtype float32)")
    elif pipe.device.type == "cpu" and pipe.dtype == torch.float32 and cpu_runs_natively(torch.bfloat16):
        out.info("this CPU runs bfloat16 natively: --dtype bfloat16 is usually faster (with other tokens than float32)")
    return pipe


MODEL_KEYS = ("model", "revision", "variant", "device", "dtype", "cache_dir")


def model_settings(flags: SettingFlags) -> Resolved:
    """The model settings (flag > env > config > default) of a command that loads or fetches a model."""
    from .settings import load

    return load(flags, keys=MODEL_KEYS)


def cache_dir_of(settings: Resolved) -> Path | None:
    return Path(settings["cache_dir"]).expanduser() if settings["cache_dir"] else None


def load_resolved(
    out: Output, settings: Resolved, *, offline: bool = False, device: str | None = None, **acceleration: Any
) -> VQDiffusion:
    """Load the model that resolved settings name (on `device` instead of theirs when given: a process's own GPU in
    a run over several; `acceleration`: compile, cuda_graphs, threads)."""
    from ..errors import DeviceError, UsageError
    from .settings import with_origin

    try:
        return load_model(
            out,
            settings["model"],
            device=device or settings["device"],
            dtype=settings["dtype"],
            variant=settings["variant"],
            revision=settings["revision"],
            offline=offline,
            cache_dir=cache_dir_of(settings),
            **acceleration,
        )
    except (UsageError, DeviceError) as e:
        raise with_origin(e, settings) from None


def load_from_flags(out: Output, flags: SettingFlags, *, offline: bool = False) -> VQDiffusion:
    """Resolve the model settings and load the model."""
    return load_resolved(out, model_settings(flags), offline=offline)
