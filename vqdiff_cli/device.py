"""Device and dtype resolution, and per-image random generators. Resolved once, passed everywhere; no global state."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch

from .errors import DeviceError, UsageError, excerpt
from .options import DEVICES, DTYPE_CHOICES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # DTYPE_CHOICES but auto


def _base(name: str) -> str:
    base = name.split(":", 1)[0]
    if base not in DEVICES:
        raise UsageError(
            f"unknown device '{excerpt(name)}'", hint=f"use one of: {', '.join(DEVICES)}", about=("device",)
        )
    return base


def _auto() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _parse(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"invalid device '{excerpt(name)}'", about=("device",)) from None


def device_type(name: str) -> str:
    """The kind of device `name` asks for ('auto': the one this machine would pick), checking the name but not that
    such a device is present: a model prepared for a GPU may run on another machine."""
    return _auto().type if _base(name) == "auto" else _parse(name).type


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then the CPU; 'cuda:1' style indices are accepted. The device must be present."""
    base = _base(name)
    if base == "auto":
        return _auto()
    if base == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "device 'cuda' was requested but no CUDA GPU is available", hint="use --device cpu", about=("device",)
        )
    if base == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(
            "device 'mps' was requested but MPS is not available", hint="use --device cpu", about=("device",)
        )
    device = _parse(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceError(
            f"device '{excerpt(name)}' was requested but this machine has {count} CUDA GPU{'s' if count != 1 else ''}",
            hint=f"use cuda:0 to cuda:{count - 1}" if count > 1 else "use --device cuda",
            about=("device",),
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU and float16 on a GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise UsageError(
            f"unknown dtype '{excerpt(name)}'", hint=f"use one of: {', '.join(DTYPE_CHOICES)}", about=("dtype",)
        )
    return DTYPES[name]


def planned_dtype(dtype: str, device: str) -> torch.dtype:
    """The dtype of a run on `device` in `dtype` (names as given), whether or not that device is present here."""
    return resolve_dtype(dtype, torch.device(device_type(device)))


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def make_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per image, seeded with that image's seed, on the device that draws the noise."""
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        gens.append(g)
    return gens


def cpu_runs_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has fast kernels for `dtype`: float32 always; bfloat16 and float16 only with the instructions
    oneDNN needs (AVX512-BF16 / AMX, AVX512-FP16); elsewhere torch emulates them, many times slower than float32."""
    if dtype == torch.float32:
        return True
    check = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }.get(dtype)
    try:
        return check is not None and bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def native_dtypes(device: torch.device) -> tuple[str, ...]:
    """The dtypes worth running on a device: float32, and bfloat16 where the CPU has native support (emulated
    bfloat16 is about 10x slower than float32); float16 and bfloat16 (where supported) on a GPU."""
    if device.type == "cuda":
        return ("float16", "bfloat16") if torch.cuda.is_bf16_supported() else ("float16",)
    if device.type == "mps":
        return ("float16",)
    return ("float32", "bfloat16") if cpu_runs_natively(torch.bfloat16) else ("float32",)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota when one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="utf-8").split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count for this process and return it: `threads` if given, else what
    OMP_NUM_THREADS says (torch already honours it), else the CPUs available (torch may count the host's cores
    inside a container). Process-wide, so only the CLI calls it, once per command."""
    most = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= most:
        raise UsageError(f"--threads must be between 1 and {most} (this machine's CPUs), got {threads}")
    if threads is None:
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp:
            first = omp.split(",")[0].strip()  # a list sets nested levels; torch's pool is the first
            if not first.isdigit() or int(first) < 1:
                raise UsageError(
                    f"OMP_NUM_THREADS={excerpt(repr(omp))} is not a thread count", hint="unset it, or give a number"
                )
            return torch.get_num_threads()
        threads = available_cpus()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
