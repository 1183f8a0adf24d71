"""Runs spread over processes: which process this is (`World`, from the RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE that torchrun and accelerate set), the share of a planned job list each one makes (`Shard`,
`shard_batches`), its device and CPU threads, and the few messages the processes of a run exchange (`Group`).

How the work is dealt: the jobs are cut into batches exactly as one process cuts them (images b*B .. b*B+B-1 are
batch b) and batch b goes to share b mod N, round robin. So every image is made in the same batch, with the same seed
and name, as in a one-process run (the same pixels); the N batches of round r (r*N .. r*N+N-1) are one per share, so
what the shares report round by round comes in job order; and a run stopped half way has made about the first half of
the job list, on every share alike.

Plain Python at import: torch.distributed is imported only when several processes join a group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from .errors import RankError, UsageError, VqdiffError, explain
from .options import Job

T = TypeVar("T")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# How long a process waits for the others at a meeting point. A process with nothing to do in a round (its batch was
# made before) waits there for a whole batch of the others, which takes an hour or more for the full model on a CPU;
# a process that died is noticed by the launcher (torchrun stops all of them), not by this timeout.
WAIT_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Shard:
    """Share `index` (counted from 0) of `count`: the batches b of a run with b mod count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(f"share {self.index + 1} of {self.count} does not exist", about=("shard",))

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`K/N`, share K of N counted from 1 (as --shard takes it: `--shard 1/2` and `--shard 2/2` make a run)."""
        k, sep, n = text.partition("/")
        if not sep or not k.strip().isdigit() or not n.strip().isdigit():
            raise UsageError(f"--shard takes K/N (share K of N, from 1/N to N/N), got '{text}'", about=("shard",))
        share, count = int(k), int(n)
        if count < 1 or not 1 <= share <= count:
            raise UsageError(f"--shard {text}: K must be between 1 and N, and N at least 1", about=("shard",))
        return cls(share - 1, count)

    def indices(self, total: int) -> range:
        """This share of `total` items dealt round robin (item i when i mod count == index)."""
        return range(self.index, total, self.count)

    def within(self, outer: Shard) -> Shard:
        """This share of the batches of the share `outer`, as one share of the whole run: a --shard split again
        over the processes of a launch (the batches of `outer` are dealt round robin in their turn)."""
        return Shard(outer.index + outer.count * self.index, outer.count * self.count)

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


def batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """The jobs in the batches one process makes them in: consecutive runs of `batch_size`, the last one shorter."""
    return [list(jobs[first : first + batch_size]) for first in range(0, len(jobs), batch_size)]


def shard_batches(jobs: Sequence[Job], batch_size: int, shard: Shard) -> list[list[Job]]:
    """The batches of `jobs` that share `shard` makes, in order (batch b when b mod count == index)."""
    return batches(jobs, batch_size)[shard.index :: shard.count]


def shard_jobs(jobs: Sequence[Job], batch_size: int, shard: Shard) -> list[Job]:
    """The jobs of share `shard`, whole batches of the run, in order. Given to `VQDiffusion.generate_iter` with the
    same `batch_size`, they are made in the batches a one-process run makes them in (so with the same pixels)."""
    return [job for batch in shard_batches(jobs, batch_size, shard) for job in batch]


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a launch: `rank` of `size` in all, `local_rank` of
    `local_size` on this machine. One process alone is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """Read torchrun's convention (accelerate and most launchers follow it); no RANK and WORLD_SIZE: alone."""
        env = os.environ if env is None else env
        given: dict[str, int] = {}
        for name in LAUNCH_VARIABLES:
            text = env.get(name, "").strip()
            if not text:
                continue
            if not text.isdigit():
                raise UsageError(f"{name}={text!r} is not a whole number", hint="launch with torchrun, which sets it")
            given[name] = int(text)
        if not given:
            return cls()
        if "RANK" not in given or "WORLD_SIZE" not in given:
            raise UsageError(
                "RANK and WORLD_SIZE must be set together", hint="launch with torchrun, which sets both, or unset them"
            )
        rank, size = given["RANK"], given["WORLD_SIZE"]
        local_rank, local_size = given.get("LOCAL_RANK", rank), given.get("LOCAL_WORLD_SIZE", size)
        if size < 1 or rank >= size or local_rank >= local_size or local_size > size:
            raise UsageError(
                f"the launch variables do not fit: RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local_rank} "
                f"LOCAL_WORLD_SIZE={local_size}",
                hint="RANK must be below WORLD_SIZE and LOCAL_RANK below LOCAL_WORLD_SIZE",
            )
        return cls(rank, size, local_rank, local_size)

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size)

    @property
    def speaks(self) -> bool:
        """Whether this process speaks for the run (rank 0 prints progress, results and errors)."""
        return self.rank == 0

    def cpu_threads(self, available: int) -> int:
        """This process's part of the `available` CPUs of its machine: an equal part for each of its processes there
        (at least one), so that they do not fight over the cores."""
        return max(1, available // self.local_size)

    def device(self, name: str) -> str:
        """The device this process uses when the run asks for `name`: with several processes, the GPU numbered
        LOCAL_RANK (one per process on each machine) where `name` means CUDA without an index ('cuda', or 'auto' on
        a machine with CUDA); anything else as asked."""
        if self.size == 1 or ":" in name:
            return name
        from .device import device_type

        return f"cuda:{self.local_rank}" if device_type(name) == "cuda" else name


@dataclass
class Stage:
    """One meeting point of the processes: each brings its `payload`, and all of them leave with every process's
    (`gathered`, by rank), as far as each got when one failed."""

    payload: Any = None
    gathered: list[Any] = field(default_factory=list)


ErrorSummary = tuple[str, str | None, int]  # message, hint, exit code: errors themselves may not survive pickling
Outcome = tuple[str, Any]  # ("ok", value) or ("failed", ErrorSummary)
Arrival = tuple[Any, ErrorSummary | None]  # what a process brings to a stage: its payload, and its error if it failed


class Group:
    """The processes of one run and the messages they exchange. One process alone exchanges nothing; several join a
    torch.distributed group over gloo. vqdiff sends only small Python objects (what failed, the records of finished
    images), never tensors, so gloo serves GPU machines too: no NCCL communicator, GPU memory or stream is involved,
    and each process keeps its GPU to itself."""

    def __init__(self, world: World) -> None:
        self.world = world

    @classmethod
    @contextmanager
    def join(cls, world: World, timeout: timedelta = WAIT_TIMEOUT) -> Iterator[Group]:
        """Join the group of this launch (MASTER_ADDR and MASTER_PORT say where rank 0 waits), for the block."""
        if world.size == 1:
            yield cls(world)
            return
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise UsageError(
                f"WORLD_SIZE={world.size} but {' and '.join(missing)} not set",
                hint="launch with torchrun (or accelerate launch), which sets them",
            )
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=timeout)
        try:
            yield cls(world)
            # Leave together: a process that tears its gloo context down while another still talks to it can abort
            # the other at exit ("terminate called without an active exception"). Not after a failure: the stages
            # have already stopped every process then, and one that died would leave the others waiting here.
            dist.barrier()
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Return once every process has come here (at once for one process)."""
        if self.world.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj: T) -> list[T]:
        """Every process's `obj`, by rank."""
        if self.world.size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj`, in every process."""
        if self.world.size == 1:
            return obj
        import torch.distributed as dist

        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[no-any-return]

    def first(self, action: Callable[[], T]) -> T:
        """`action` done by rank 0 alone (reading stdin, drawing a random seed), its result for every process; if it
        fails, every process raises (rank 0 its own error)."""
        if self.world.size == 1:
            return action()
        outcome: Outcome = ("ok", None)
        error: Exception | None = None
        if self.world.speaks:
            try:
                outcome = ("ok", action())
            except Exception as e:
                error = e
                outcome = ("failed", _summary(explain(e)))
        kind, value = self.broadcast(outcome)
        if kind == "ok":
            return value  # type: ignore[no-any-return]
        if error is not None:
            raise error
        message, hint, code = value
        raise RankError(message, hint, code, reported=False)

    @contextmanager
    def stage(self) -> Iterator[Stage]:
        """A block every process goes through before any goes on: when it fails in one (or several), it fails in
        all, with the first failing rank's error, said once (by rank 0). Alone, errors pass as they are. Ctrl-C is not
        waited for: the launcher stops the other processes when this one exits."""
        stage = Stage()
        if self.world.size == 1:
            try:
                yield stage
            finally:
                stage.gathered = [stage.payload]
            return
        try:
            yield stage
        except Exception as e:
            self._settle((stage.payload, _summary(explain(e))), stage, cause=e)
        else:
            self._settle((stage.payload, None), stage)

    def _settle(self, arrival: Arrival, stage: Stage, cause: Exception | None = None) -> None:
        arrivals = self.all_gather(arrival)
        stage.gathered = [payload for payload, _ in arrivals]
        failed = [(rank, error) for rank, (_, error) in enumerate(arrivals) if error is not None]
        if not failed:
            return
        rank, (message, hint, code) = failed[0]
        if len(failed) < self.world.size or any(error != failed[0][1] for _, error in failed):
            message = f"{message} (rank {rank} of {self.world.size}; every rank stopped)"
        raise RankError(message, hint, code, reported=self.world.speaks) from cause


def _summary(error: VqdiffError) -> ErrorSummary:
    """What another process needs to say an error."""
    return error.message, error.hint, int(error.exit_code)
