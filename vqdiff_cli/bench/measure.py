"""What the figures of `vqdiff bench` are measured with: timed runs (medians, peak memory), the FLOPs of a
transformer forward, the device's datasheet peak and the matmul rate it reaches."""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import TransformerConfig

# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched in order on the device
# name. What a device reaches in practice is measured instead (`matmul_tflops`), and reported beside the peak.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
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


def feed_forward_shape(cfg: TransformerConfig, batch: int, guided: bool) -> tuple[int, int, int]:
    """(M, K, N) of the transformer's largest matmul, the feed-forward's first projection, for a batch."""
    rows = batch * (2 if guided else 1) * cfg.num_latent_pixels
    return rows, cfg.inner_dim, 4 * cfg.inner_dim


def matmul_tflops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], repeats: int = 5) -> float:
    """The rate this device reaches in `dtype` on one (M, K) x (K, N) matmul (median of `repeats` after 2 warm-ups),
    TFLOP/s: measured on the transformer's own largest matmul, what a forward made of matmuls could reach here."""
    m, k, n = shape
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(m, k, generator=g, device=device).to(dtype)
    b = torch.randn(k, n, generator=g, device=device).to(dtype)
    runs = []
    for i in range(2 + repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:
            runs.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(runs) / 1e12


# -- measuring ----------------------------------------------------------------------------------------------------


class PeakMemory:
    """CUDA: the allocator's peaks, allocated and reserved (graph pools are reserved, and replays allocate nothing).
    CPU: the process's peak resident set (Linux), reset through /proc when allowed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak is then the process's
                Path("/proc/self/clear_refs").write_text("5", encoding="ascii")

    def read(self) -> tuple[int | None, int | None]:
        """(peak allocated or resident bytes, peak reserved bytes)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), int(torch.cuda.max_memory_reserved(self.device))
        try:
            status = Path("/proc/self/status").read_text(encoding="ascii")
        except OSError:
            return None, None
        m = re.search(r"VmHWM:\s+(\d+) kB", status)
        return (int(m.group(1)) * 1024 if m else None), None


@dataclass
class Timed:
    runs_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    reserved_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


def sync(device: torch.device) -> None:
    """Wait for the device, so that a clock read after it measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runs: Mapping[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device) -> dict[str, Timed]:
    """Time each callable `repeats` times after `warmup` untimed calls, alternating between them run by run."""
    memory = PeakMemory(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # once, not per run: a timed run then reuses the allocator's cached blocks
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    timed = {k: Timed() for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            sync(device)
            memory.reset()
            start = time.perf_counter()
            fn()
            sync(device)
            timed[key].runs_s.append(time.perf_counter() - start)
            peak, reserved = memory.read()
            if peak is not None:
                timed[key].peak_bytes = max(peak, timed[key].peak_bytes or 0)
            if reserved is not None:
                timed[key].reserved_bytes = max(reserved, timed[key].reserved_bytes or 0)
    return timed
