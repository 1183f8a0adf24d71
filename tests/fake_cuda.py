"""Stand-ins for the CUDA stream and graph calls that the fast path's `StepRunner` makes, so that its CUDA-graph code
runs on a CPU: streams are named objects, a capture records which stream and pool it used, and a replay counts
itself (it cannot re-run captured kernels: the output stays what the capture computed). For bookkeeping tests only:
tokens sampled through these graphs are not meaningful.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch


@dataclass(eq=False)
class FakeStream:
    name: str
    waited_for: list[FakeStream] = field(default_factory=list)

    def wait_stream(self, other: FakeStream) -> None:
        self.waited_for.append(other)


@dataclass(eq=False)
class FakeGraph:
    replays: int = 0
    own_pool: object = field(default_factory=object)

    def replay(self) -> None:
        self.replays += 1

    def pool(self) -> object:
        return self.own_pool


@dataclass
class Capture:
    graph: FakeGraph
    pool: Any
    stream: Any


class FakeCuda:
    """Installs the stand-ins with `monkeypatch`; records the streams made, the stream each piece of work ran on
    (`ran_on`: "warm-up" or "capture", and the stream), and every capture."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.default = FakeStream("default")
        self.current = self.default
        self.streams: list[FakeStream] = []
        self.captures: list[Capture] = []
        self.graphs: list[FakeGraph] = []
        self.ran_on: list[tuple[str, FakeStream]] = []
        self.capturing = False
        cuda = torch.cuda
        fake = self

        class Stream(FakeStream):  # classes, as torch's are: modules imported meanwhile annotate with them
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(f"stream {len(fake.streams)}")
                fake.streams.append(self)

        class CUDAGraph(FakeGraph):
            def __init__(self) -> None:
                super().__init__()
                fake.graphs.append(self)

        monkeypatch.setattr(cuda, "Stream", Stream)
        monkeypatch.setattr(cuda, "stream", self._stream)
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(cuda, "set_stream", self._set_stream)
        monkeypatch.setattr(cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(cuda, "CUDAGraph", CUDAGraph)
        monkeypatch.setattr(cuda, "graph", self._graph)

    def _set_stream(self, stream: FakeStream) -> None:
        self.current = stream

    @contextlib.contextmanager
    def _stream(self, stream: FakeStream) -> Iterator[None]:
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def _graph(self, graph: FakeGraph, pool: Any = None, stream: Any = None) -> Iterator[None]:
        self.captures.append(Capture(graph, pool, stream))
        before, self.current = self.current, stream if stream is not None else FakeStream("torch's default capture")
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False
            self.current = before

    def note_work(self) -> None:
        """Called from a step function: records the stream it runs on and whether inside a capture."""
        self.ran_on.append(("capture" if self.capturing else "run", self.current))


# -- a capture that fails, for the fallback tests --------------------------------------------------------------


def failing_capture(
    captures: list[int], streams: list[str], fail_for: Callable[[int], bool] = lambda batch: True
) -> Callable[..., Any]:
    """A stand-in for `_Graph` whose capture fails (for the batch sizes `fail_for` picks) as a capture that fails in
    torch.cuda.graph does: the op that broke it, then the exit failing on the invalidated capture. `captures` gets
    the batch size of every capture tried; a capture that works gives a graph whose replays run the step itself."""

    class Replayed:
        def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
            self.fn, self.graph = fn, FakeGraph()

        def __call__(self, *args: torch.Tensor) -> torch.Tensor:
            return self.fn(*args)

    def capture(fn: Callable[..., torch.Tensor], example: tuple[torch.Tensor, ...], pool: Any, stream: Any) -> Any:
        captures.append(example[0].shape[0])
        if not fail_for(example[0].shape[0]):
            return Replayed(fn)
        streams.append("capture stream")  # left current, as a capture that fails in torch.cuda.graph leaves it
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904

    return capture


def stand_in_streams(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[object]]:
    """Stand-ins for the stream calls around a capture: (the current stream's history, the devices made current)."""
    streams = ["caller's stream"]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: streams[-1])
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
    monkeypatch.setattr(torch.cuda, "Stream", type("Stream", (), {}))  # a class, as torch's: annotations use it
    devices: list[object] = []  # the GPU the runner makes current for its streams and graphs: the batch's
    monkeypatch.setattr(torch.cuda, "device", lambda d: devices.append(d) or contextlib.nullcontext())
    return streams, devices
