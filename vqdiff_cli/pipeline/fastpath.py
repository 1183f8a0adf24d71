"""The fast sampler wired to the transformer: one session per batch shape, its buffers reused batch after batch.

A session holds the batch's fixed inputs in tensors of its own (text states, their cross-attention keys and values,
seed words, known tokens) and a `StepRunner` over a step that reads them. The next batch of the same shape copies
its values into those tensors, so compiled code and captured CUDA graphs are made once per shape, not per batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..diffusion.fast import fast_step, make_step
from ..diffusion.sampler import KnownTokens
from ..models.transformer import BlockRunner, DiffusionTransformer, fused_block
from .accel import Acceleration, Compiled, StepRunner

MAX_SESSIONS = 4  # batch shapes kept warm per pipeline (a run usually needs one, plus a smaller last batch)


@dataclass(frozen=True)
class SessionKey:
    batch: int
    guidance_scale: float | None  # None: no guidance
    truncation_rate: float
    known: bool  # inpainting: known tokens are imposed after every step
    renoise: bool


@dataclass
class FastKernels:
    """The fast path's compute, compiled or not; shared by every session of a pipeline (compiled once)."""

    run_block: BlockRunner  # fused_block, or a compiled version of it
    step_math: Callable[..., torch.Tensor]  # fast_step, or a compiled version of it


class FastSession:
    """Buffers and a step runner for one batch shape."""

    def __init__(
        self,
        transformer: DiffusionTransformer,
        key: SessionKey,
        context: torch.Tensor,
        words: torch.Tensor,
        known: KnownTokens | None,
        kernels: FastKernels,
        cuda_graphs: bool,
        notes: list[str],
        on_capture_failure: Callable[[], None] | None = None,
    ) -> None:
        self.key = key
        self.context = context.clone()  # (rows, L, C) in the transformer's dtype
        self.context_kv = transformer.context_kv(self.context)
        self.words = words.clone()  # (B, 2) seed words
        self.known = None if known is None else KnownTokens(known.tokens.clone(), known.regenerate.clone(), key.renoise)

        def logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return transformer.logits(x, self.context, t, self.context_kv, kernels.run_block)

        num_codes = transformer.config.num_vector_embeds - 1
        step = make_step(
            logits, self.words, key.guidance_scale, key.truncation_rate, num_codes, self.known, kernels.step_math
        )
        self.runner = StepRunner(step, cuda_graphs, notes, on_capture_failure)

    def load(
        self, transformer: DiffusionTransformer, context: torch.Tensor, words: torch.Tensor, known: KnownTokens | None
    ) -> None:
        """Copy another batch's fixed inputs into this session's buffers."""
        self.context.copy_(context)
        for (k_buf, v_buf), (k, v) in zip(self.context_kv, transformer.context_kv(context), strict=True):
            k_buf.copy_(k)
            v_buf.copy_(v)
        self.words.copy_(words)
        if self.known is not None and known is not None:
            self.known.tokens.copy_(known.tokens)
            self.known.regenerate.copy_(known.regenerate)


class FastSessions:
    """The few most recently used sessions of one pipeline, and the compute they share."""

    def __init__(self, acceleration: Acceleration) -> None:
        self.acceleration = acceleration
        self._notes: list[str] = []
        self._kernels: FastKernels | None = None
        self._sessions: OrderedDict[SessionKey, FastSession] = OrderedDict()
        self._graphs_failed = False  # a capture failed once: later sessions run without graphs at once

    @property
    def notes(self) -> list[str]:
        """Why compile or CUDA graphs fell back to plain execution, if they did (each reason once)."""
        return list(dict.fromkeys(self._notes))

    def clear(self) -> None:
        """Drop every session: their buffers and CUDA graphs (compiled code stays)."""
        self._sessions.clear()

    def _capture_failed(self) -> None:
        self._graphs_failed = True

    def kernels(self) -> FastKernels:
        if self._kernels is None:
            if self.acceleration.compile:
                self._kernels = FastKernels(Compiled(fused_block, self._notes), Compiled(fast_step, self._notes))
            else:
                self._kernels = FastKernels(fused_block, fast_step)
        return self._kernels

    def session(
        self,
        transformer: DiffusionTransformer,
        key: SessionKey,
        context: torch.Tensor,
        words: torch.Tensor,
        known: KnownTokens | None,
    ) -> FastSession:
        found = self._sessions.get(key)
        if found is not None:
            found.load(transformer, context, words, known)
            self._sessions.move_to_end(key)
            return found
        graphs_on = self.acceleration.graphs_on(context.device)
        created = FastSession(
            transformer,
            key,
            context,
            words,
            known,
            self.kernels(),
            graphs_on and not self._graphs_failed,
            self._notes,
            self._capture_failed,
        )
        self._sessions[key] = created
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return created
