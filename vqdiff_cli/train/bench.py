"""The speed of one training step of the transformer stage, for an architecture with random weights (ITHQ's by
default): images per second, the transformer's achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode over its
forward and backward), the peak memory, and the memory the weights, gradients and AdamW state take (computed).

Full training or LoRA; the same step the trainer runs (the objective of diffusion/loss.py on random token grids and
caption ids, then AdamW), without data loading.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..checkpoint.layout import pipeline_config
from ..checkpoint.random import architecture_configs, random_modules
from ..diffusion import loss as objective
from ..diffusion.schedule import MaskAndReplaceSchedule
from ..errors import UsageError
from ..models.text import TextConditioning


@dataclass(frozen=True)
class TrainBenchResult:
    architecture: str
    mode: str  # "full" or "lora-R"
    device: str
    precision: str
    batch_size: int
    steps: int  # timed steps
    seconds_per_step: float
    images_per_s: float
    transformer_tflop_per_step: float
    transformer_tflop_per_s: float
    trainable_parameters: int
    total_parameters: int
    state_gib: float  # computed: weights + gradients + AdamW moments of what trains, + frozen weights
    peak_gib: float  # measured: CUDA peak allocated, or the process's peak resident memory on a CPU
    peak_kind: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def state_bytes(trainable: int, frozen: int, bytes_per_param: int = 4) -> int:
    """Weights of everything, plus a gradient and AdamW's two moments (float32) per trainable weight."""
    return (trainable + frozen) * bytes_per_param + trainable * 3 * 4


def cpu_attention_flops() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU kernels of scaled_dot_product_attention, which torch's counter does not know (it
    knows the CUDA ones): the two matmuls forward, the four backward."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(sdpa_flop_count(query, key, value))  # type: ignore[no-untyped-call]

    def backward(grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
        return int(sdpa_backward_flop_count(grad, query, key, value))  # type: ignore[no-untyped-call]

    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


def _peak_cpu_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def bench_training_step(
    architecture: str = "ithq",
    *,
    batch_size: int = 1,
    steps: int = 2,
    warmup: int = 1,
    lora: int | None = None,
    device: str = "cpu",
    precision: str = "no",
    seed: int = 0,
) -> TrainBenchResult:
    from .parts import init_lora
    from .transformer import ConditionedTransformer

    if steps < 1 or warmup < 0 or batch_size < 1:
        raise UsageError("--steps and --batch-size must be at least 1, --warmup at least 0")
    if precision not in ("no", "bf16", "fp16"):
        raise UsageError(f"unknown --mixed-precision '{precision}'", hint="use no, fp16 or bf16")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    cfg = pipeline_config(architecture_configs(architecture))
    from transformers import CLIPTextModel

    from ..models.transformer import DiffusionTransformer

    modules = random_modules(cfg, seed)
    transformer, text_model = modules["transformer"], modules["text_encoder"]
    assert isinstance(transformer, DiffusionTransformer)
    assert isinstance(text_model, CLIPTextModel)
    if lora is not None:
        from . import require_train_extra

        require_train_extra(lora=True)
        init_lora(transformer, lora, lora, seed)
    else:
        transformer.requires_grad_(True)
    text = TextConditioning(None, text_model, None)  # type: ignore[arg-type]  # ids come ready-made: no tokenizer
    hidden = int(cfg.text_encoder.get("hidden_size", 512))
    model = ConditionedTransformer(transformer, text, torch.zeros(77, hidden), train_text=False).to(dev).train()
    if lora is not None:
        model.null_embedding.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    schedule = MaskAndReplaceSchedule.from_config(cfg.scheduler)
    g = torch.Generator().manual_seed(seed)
    n = cfg.transformer.num_latent_pixels
    vocab = int(cfg.text_encoder.get("vocab_size", 49408))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        x_0 = torch.randint(0, cfg.vqvae.num_vq_embeddings, (batch_size, n), generator=g)
        t = torch.randint(0, cfg.num_train_timesteps, (batch_size,), generator=g)
        x_t = objective.q_sample(x_0, t, schedule, g)
        ids = torch.randint(0, vocab, (batch_size, 77), generator=g)
        drop = torch.zeros(batch_size, dtype=torch.bool)
        p_t = torch.full((batch_size,), 1 / cfg.num_train_timesteps)
        with torch.autocast(dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            log_p = model(x_t.to(dev), t.to(dev), ids.to(dev), drop.to(dev))
            terms = objective.vb_loss(log_p.float(), x_0.to(dev), x_t.to(dev), t.to(dev), p_t.to(dev), schedule)
        terms.loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # FLOPs of the transformer alone: its forward and backward in one counted step, minus the text encoder's forward
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
        step()
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as text_counter, torch.no_grad():
        text.encode_ids(torch.zeros(batch_size, 77, dtype=torch.long, device=dev))
    flops = counter.get_total_flops() - text_counter.get_total_flops()
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = (time.perf_counter() - started) / steps
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "CUDA peak allocated"
    else:
        peak, kind = _peak_cpu_bytes(), "peak resident memory of the process"
    return TrainBenchResult(
        architecture=architecture,
        mode="full" if lora is None else f"lora-{lora}",
        device=str(dev),
        precision=precision,
        batch_size=batch_size,
        steps=steps,
        seconds_per_step=elapsed,
        images_per_s=batch_size / elapsed,
        transformer_tflop_per_step=flops / 1e12,
        transformer_tflop_per_s=flops / elapsed / 1e12,
        trainable_parameters=trainable,
        total_parameters=total,
        state_gib=state_bytes(trainable, total - trainable) / 2**30,
        peak_gib=peak / 2**30,
        peak_kind=kind,
    )
