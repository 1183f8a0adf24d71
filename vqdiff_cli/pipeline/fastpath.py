"""The fast sampler wired to the transformer, and its optional acceleration.

A session (one per batch shape) holds the batch's fixed inputs in tensors of its own (text states, their
cross-attention keys and values, seed words, known tokens) and a `StepRunner` over a step that reads them. The next
batch of the same shape copies its values into those tensors, so compiled code and captured CUDA graphs are made once
per shape, not per batch.

Acceleration: `Compiled` wraps a function in torch.compile; the fast path compiles one transformer block (one graph
serves all 36 blocks, so compiling is quick) and the sampling math. `StepRunner` captures a whole step, network and
sampling, into a CUDA graph once per batch shape and replays it with one launch per step; the two graphs of a shape
(a step, the final step) are captured on one stream into one memory pool. When a mechanism is unavailable or fails
(no compiler, an op that cannot be captured), the work runs without it and the reason is kept in a notes list, once
(a failed capture turns graphs off for that batch shape only); the library never prints, the CLI warns.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..diffusion.fast import FastStep, fast_step, make_step
from ..diffusion.reveal import RevealRule
from ..diffusion.sampler import KnownTokens
from ..models.transformer import BlockRunner, DiffusionTransformer, fast_block_runner, fused_block

MAX_SESSIONS = 4  # batch shapes kept warm per pipeline (a run usually needs one, plus a smaller last batch)
GRAPH_WARMUP = 2  # eager (or compiling) runs on the capture stream before a capture: lazy library set-up, autotuning
# Compiled variants one function may have: batch shapes x dtypes x (final step or not) x (guided, truncated) in one
# process. dynamo's default (8) is easily passed by `vqdiff bench` with two dtypes; past it, calls fail (below) and
# run eagerly with a note, instead of dynamo's silent eager fallback.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Acceleration:
    """How the fast sampler runs.

    CUDA graphs are on by default on CUDA: capturing costs a few steps' time once per batch shape and removes the
    launch overhead that dominates small batches. torch.compile is opt-in: it fuses the element-wise work between
    the matmuls (about 10% of a CPU forward), and compiling costs tens of seconds per process and batch shape.
    """

    compile: bool | None = None  # torch.compile (inductor, default mode) of a block and of the step math; None: off
    cuda_graphs: bool | None = None  # capture each step into a CUDA graph and replay it; None: on for CUDA

    def graphs_on(self, device: torch.device) -> bool:
        """Whether steps on `device` are replayed from CUDA graphs: on CUDA unless turned off; never elsewhere."""
        return device.type == "cuda" and self.cuda_graphs is not False


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


class Compiled:
    """torch.compile of `fn`; on the first failure, `fn` itself from then on (errors of `fn` still surface)."""

    def __init__(self, fn: Callable[..., torch.Tensor], notes: list[str]) -> None:
        self.eager = fn
        self.notes = notes
        self.name = getattr(fn, "__name__", "a function")  # for the notes: fused_block, fast_step
        self.fn: Callable[..., torch.Tensor] = fn
        self._limit = _recompile_limit(RECOMPILE_LIMIT)  # built once, entered on every call
        try:
            self.fn = torch.compile(fn, dynamic=False)
        except Exception as e:  # torch.compile unsupported on this platform
            notes.append(f"torch.compile unavailable, running {self.name} eagerly ({_first_line(e)})")

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.fn is self.eager:
            return self.eager(*args)
        try:
            with self._limit:
                return self.fn(*args)
        except Exception as e:
            if _is_out_of_memory(e) or _capturing():
                raise  # a failed CUDA-graph capture is the graph's to handle (StepRunner), not the compiler's
            self.notes.append(f"torch.compile of {self.name} failed, running it eagerly ({_first_line(e)})")
            self.fn = self.eager
            return self.eager(*args)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _recompile_limit(limit: int) -> contextlib.AbstractContextManager[Any]:
    """dynamo's limit on compiled variants per function raised to `limit`, and an error instead of a silent eager
    fallback when a call would need more; the setting holds only while the context is active."""
    import torch._dynamo.config as dynamo_config

    wanted = {"recompile_limit": limit, "fail_on_recompile_limit_hit": True}
    older = {"recompile_limit": "cache_size_limit", "fail_on_recompile_limit_hit": "fail_on_cache_limit_hit"}
    # torch 2.6 names the two settings cache_size_limit and fail_on_cache_limit_hit (2.7 added the new names)
    patch: contextlib.AbstractContextManager[Any] = dynamo_config.patch(
        {(name if hasattr(dynamo_config, name) else older[name]): value for name, value in wanted.items()}
    )
    return patch


class _Graph:
    """One captured step variant: static inputs are copied in, the graph replays, the output is copied out.

    Warm-up and capture run on `stream`, the runner's one capture stream: graphs that share a memory pool must be
    captured on the same stream (the caching allocator reuses a freed block only on the stream that freed it, so a
    second capture on a fresh stream could not reuse the blocks the first one freed).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        example: tuple[torch.Tensor, ...],
        pool: Any,
        stream: Any,
    ) -> None:
        self.inputs = tuple(a.clone() for a in example)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, args, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()


class StepRunner:
    """Runs a `FastStep` for one batch shape: as it is, or replayed from one CUDA graph per variant (final or not).

    The step's fixed inputs (text states, seeds, known tokens) are read from tensors it closed over; a caller that
    reuses the runner for another batch of the same shape copies the new values into those tensors in place, so the
    captured graphs stay valid. Both variants are warmed up and captured on one stream, made at the first capture,
    into one memory pool. A failed capture turns graphs off for this runner (its batch shape) only.
    """

    def __init__(
        self,
        step: FastStep,
        cuda_graphs: bool,
        notes: list[str] | None = None,
        on_capture_failure: Callable[[], None] | None = None,
        shape: str = "",
    ) -> None:
        self.step = step
        self.cuda_graphs = cuda_graphs
        self.notes = notes if notes is not None else []
        self.on_capture_failure = on_capture_failure  # e.g. so that a runner made again for this shape does not retry
        self.shape = shape  # what the notes call this runner's batches, e.g. "batches of 4"
        self._graphs: dict[bool, _Graph] = {}
        self._pool: Any = None
        self._stream: Any = None  # the capture stream, made with the first graph

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, salt: torch.Tensor, final: bool
    ) -> torch.Tensor:
        if not self.cuda_graphs:
            return self.step(x, t, coef, salt, final)
        with torch.cuda.device(x.device):  # streams and graphs on the batch's GPU, which need not be the current one
            return self._replay(x, t, coef, salt, final)

    def _replay(
        self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, salt: torch.Tensor, final: bool
    ) -> torch.Tensor:
        graph = self._graphs.get(final)
        if graph is None:

            def variant(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return self.step(x, t, c, s, final)

            stream = torch.cuda.current_stream()
            if self._stream is None:
                self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch's __new__ is unannotated
            try:
                graph = _Graph(variant, (x, t, coef, salt), self._pool, self._stream)
            except Exception as e:
                # a capture that fails inside torch.cuda.graph can leave its capture stream current: put ours back
                torch.cuda.set_stream(stream)
                if _is_out_of_memory(e):
                    raise
                cause = e.__context__ if isinstance(e.__context__, Exception) else e  # what broke the capture
                where = f" for {self.shape}" if self.shape else ""
                self.notes.append(f"CUDA graph capture failed{where}, running without graphs ({_first_line(cause)})")
                self.cuda_graphs = False
                self._graphs.clear()  # a variant captured before: its pool goes with it
                if self.on_capture_failure is not None:
                    self.on_capture_failure()
                return self.step(x, t, coef, salt, final)
            self._pool = graph.graph.pool()
            self._graphs[final] = graph
        return graph(x, t, coef, salt)


# -- sessions: buffers per batch shape -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionKey:
    batch: int
    guidance_scale: float | None  # None: no guidance
    truncation_rate: float
    known: bool  # inpainting: known tokens are imposed after every step
    renoise: bool
    reveal: RevealRule | None = None  # a budgeted reveal (random or purity) instead of the posterior


@dataclass
class FastKernels:
    """The fast path's compute, compiled or not; shared by every session of a pipeline (compiled once)."""

    run_block: BlockRunner  # fused_block (fused_block_plain_gelu where its fold could overflow), compiled or not
    step_math: Callable[..., torch.Tensor]  # fast_step, or a compiled version of it
    folded_gelu: bool  # whether run_block is fused_block, with the feed-forward's GELU folded into its matmuls


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
        masked0: torch.Tensor | None = None,
    ) -> None:
        self.key = key
        self.context = context.clone()  # (rows, L, C) in the transformer's dtype
        self.context_kv = transformer.context_kv(self.context)
        self.words = words.clone()  # (B, 2) seed words
        self.known = None if known is None else KnownTokens(known.tokens.clone(), known.regenerate.clone(), key.renoise)
        self.masked0 = None if masked0 is None else masked0.clone()  # (B,) a budgeted reveal's candidates at the start

        def logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return transformer.logits(x, self.context, t, self.context_kv, kernels.run_block)

        num_codes = transformer.config.num_vector_embeds - 1
        step = make_step(
            logits,
            self.words,
            key.guidance_scale,
            key.truncation_rate,
            num_codes,
            self.known,
            kernels.step_math,
            key.reveal,
            self.masked0,
        )
        self.runner = StepRunner(step, cuda_graphs, notes, on_capture_failure, shape=f"batches of {key.batch}")

    def load(
        self,
        transformer: DiffusionTransformer,
        context: torch.Tensor,
        words: torch.Tensor,
        known: KnownTokens | None,
        masked0: torch.Tensor | None = None,
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
        if self.masked0 is not None and masked0 is not None:
            self.masked0.copy_(masked0)


class FastSessions:
    """The few most recently used sessions of one pipeline, and the compute they share."""

    def __init__(self, acceleration: Acceleration) -> None:
        self.acceleration = acceleration
        self._notes: list[str] = []
        self._kernels: FastKernels | None = None
        self._sessions: OrderedDict[SessionKey, FastSession] = OrderedDict()
        self._graphs_failed: set[SessionKey] = set()  # shapes whose capture failed: not tried again (others are)

    @property
    def notes(self) -> list[str]:
        """Why compile or CUDA graphs fell back to plain execution, if they did (each reason once)."""
        return list(dict.fromkeys(self._notes))

    def clear(self) -> None:
        """Drop every session: their buffers and CUDA graphs (compiled code stays)."""
        self._sessions.clear()

    def kernels(self, transformer: DiffusionTransformer) -> FastKernels:
        """The block and step functions, made (and compiled) at the first call for the pipeline's transformer."""
        if self._kernels is None:
            block = fast_block_runner(transformer)
            folded = block is fused_block
            if self.acceleration.compile:
                compiled = Compiled(block, self._notes), Compiled(fast_step, self._notes)
                self._kernels = FastKernels(*compiled, folded)
            else:
                self._kernels = FastKernels(block, fast_step, folded)
        return self._kernels

    def session(
        self,
        transformer: DiffusionTransformer,
        key: SessionKey,
        context: torch.Tensor,
        words: torch.Tensor,
        known: KnownTokens | None,
        masked0: torch.Tensor | None = None,
    ) -> FastSession:
        found = self._sessions.get(key)
        if found is not None:
            found.load(transformer, context, words, known, masked0)
            self._sessions.move_to_end(key)
            return found
        graphs_on = self.acceleration.graphs_on(context.device)
        created = FastSession(
            transformer,
            key,
            context,
            words,
            known,
            self.kernels(transformer),
            graphs_on and key not in self._graphs_failed,
            self._notes,
            lambda: self._graphs_failed.add(key),
            masked0,
        )
        self._sessions[key] = created
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return created
