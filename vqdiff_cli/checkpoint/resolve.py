"""From a model name to a folder `load.load_components` reads: a local folder as it is, or a Hub repository
resolved to a commit, fetched (only the files a load needs) and converted once into vqdiff's cache.

The rules, in order (a built-in model name such as `shapes` comes first: it is the folder shipped inside the package,
see builtin.py):
1. A local folder is read in place: vqdiff never copies or converts a user's own files.
2. A revision pinned by commit hash with a valid cache entry is used with no network call at all; so is one whose files
   are all in the Hub cache (it is converted first).
3. Offline (`offline=True` or HF_HUB_OFFLINE=1) a branch or tag is resolved from the refs recorded by earlier runs;
   only cached files are used, and anything missing is an error that says how to download it.
4. Online, one request lists the repository at the revision (the commit and every file with its size); the files a
   load needs are fetched unless cached, then converted. If the Hub cannot be reached, rule 3 applies.

A file of the Hub cache can be damaged (truncated by a full disk, overwritten): online, one whose size differs from the
listing's is fetched again, and so is one that fails to convert and no longer hashes to its blob name; offline the
error names it. A damaged file is never the reason a model stays broken.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..device import dtype_name, planned_dtype
from ..errors import DownloadError, MissingFilesError, UnreadableFileError, UsageError, WeightsError
from . import convert, select
from .builtin import builtin_model
from .cache import Entry, EntryKey, ModelCache, check_cache_root
from .hub import Hub, HubUnreachable, RepoListing, env_offline, is_commit, is_repo_id

DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class LoadEvent:
    """Progress of preparing a model, for a progress bar or a log line."""

    kind: Literal["download", "convert", "note"]
    message: str  # a file (download), a component (convert) or a sentence (note)
    done: int = 0  # bytes so far, over all files of this download
    total: int = 0  # bytes to download in all


LoadCallback = Callable[[LoadEvent], None]


class DamagedCacheError(DownloadError):
    """A file in the Hub cache no longer holds what was downloaded, and it cannot be fetched again now."""


@dataclass(frozen=True)
class PreparedModel:
    """A folder ready for `load.load_components`, and where it came from."""

    name: str  # the repo id or the folder as given
    folder: Path
    dtype: torch.dtype  # what the weights are prepared for (a run in this dtype loads them as they are)
    commit: str | None = None  # Hub models: the commit the files belong to
    entry: Entry | None = None  # Hub models: the cache entry `folder` is


def prepare(
    model: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    variant: str = "auto",
    revision: str | None = None,
    offline: bool = False,
    cache_dir: Path | None = None,
    on_event: LoadCallback | None = None,
) -> PreparedModel:
    """Resolve `model` (a local folder or a Hub repo id) to a loadable folder, fetching and converting as needed, for
    a run on `device` in `dtype` (names as the CLI takes them: 'auto' is float32 on the CPU, float16 on a GPU). The
    device is only named, never used: a model can be prepared for a GPU on a machine without one."""
    select.variant_order(variant)  # validates
    dt = planned_dtype(dtype, device)
    builtin = builtin_model(str(model))
    if builtin is not None:
        if revision is not None:
            raise UsageError(f"--revision applies to Hub repo ids, not to the built-in model {model}")
        return PreparedModel(str(model), builtin.folder, dt)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{model} is a file, not a checkpoint folder")
        if revision is not None:
            raise UsageError("--revision applies to Hub repo ids, not to a local folder")
        return PreparedModel(str(model), path.resolve(), dt)
    name = str(model)
    if not is_repo_id(name):
        raise WeightsError(
            f"model '{model}' is not a local folder or a Hub repo id",
            hint="pass a folder in diffusers' format, or a repo id such as microsoft/vq-diffusion-ithq",
        )
    return _Preparer(name, revision or DEFAULT_REVISION, dt, variant, offline, cache_dir, on_event).run()


class _Preparer:
    """One Hub model being prepared: the steps of `prepare`'s rules 2-4."""

    def __init__(
        self,
        repo_id: str,
        revision: str,
        dtype: torch.dtype,
        variant: str,
        offline: bool,
        cache_dir: Path | None,
        on_event: LoadCallback | None,
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.dtype = dtype
        self.variant = variant
        self.offline = offline or env_offline()
        self.cache = ModelCache(cache_dir)
        self.hub = Hub.from_env()
        check_cache_root(
            self.hub.cache_dir,
            "the Hugging Face cache folder",
            "set HF_HUB_CACHE (or HF_HOME) to a folder, or unset it",
        )
        self.on_event = on_event
        self.damage = _Damage(self.hub, repo_id, self.why_local(), self.download_command())

    def emit(self, kind: Literal["download", "convert", "note"], message: str, done: int = 0, total: int = 0) -> None:
        if self.on_event is not None:
            self.on_event(LoadEvent(kind, message, done, total))

    def key(self, commit: str) -> EntryKey:
        return EntryKey(self.repo_id, commit, self.variant, dtype_name(self.dtype))

    def run(self) -> PreparedModel:
        # Rule 2: pinned by commit, and already here.
        if is_commit(self.revision):
            try:
                ready = self.from_cache(self.revision)
            except DamagedCacheError:
                if self.offline:
                    raise
                ready = None  # fetched again below
            if ready is not None:
                return ready
        # Rule 4: ask the Hub which commit and which files.
        listing = None
        if not self.offline:
            try:
                listing = self.hub.list_files(self.repo_id, self.revision)
            except HubUnreachable as e:
                commit = self.cached_commit()
                if commit is None:
                    raise
                self.emit("note", f"{e.message}; using the cached commit {commit[:12]}")
        if listing is None:
            # Rule 3: offline, or the Hub is out of reach.
            commit = self.cached_commit()
            if commit is None:
                raise self.not_cached()
            ready = self.from_cache(commit)
            if ready is None:
                raise self.not_cached(self.missing_locally(commit))
            return ready
        self.cache.write_ref(self.repo_id, self.revision, listing.commit)
        entry = self.cache.find(self.key(listing.commit))
        if entry is not None:
            return self.ready(entry)
        snapshot = self.fetch(listing)
        self.hub.write_ref(self.repo_id, self.revision, listing.commit)
        return self.ready(self.build(listing.commit, snapshot, listing))

    # -- the cache --------------------------------------------------------------------------------------------

    def cached_commit(self) -> str | None:
        if is_commit(self.revision):
            return self.revision
        return self.cache.read_ref(self.repo_id, self.revision) or self.hub.cached_commit(self.repo_id, self.revision)

    def from_cache(self, commit: str) -> PreparedModel | None:
        """The converted entry, or one converted now from complete files in the Hub cache; None otherwise."""
        entry = self.cache.find(self.key(commit))
        if entry is not None:
            return self.ready(entry)
        snapshot = self.hub.cached_snapshot(self.repo_id, commit)
        if snapshot is None:
            return None
        folder, files = snapshot
        if self.needed(files, folder) is None:  # incomplete, or its small files damaged
            self.damage.check(commit, folder, [f for f in files if select.is_small_file(f)])
            return None
        return self.ready(self.build(commit, folder, None))

    def missing_locally(self, commit: str) -> str:
        snapshot = self.hub.cached_snapshot(self.repo_id, commit)
        if snapshot is None:
            return "nothing of it is cached"
        try:
            select.files_needed(snapshot[1], snapshot[0], self.variant, self.dtype)
        except MissingFilesError as e:
            return e.of("the cached files have").message
        except WeightsError as e:
            return e.message
        return "its cached files are incomplete"

    def needed(self, files: Collection[str], folder: Path) -> list[str] | None:
        """Every file a load reads, chosen from `files` (in `folder`); None if one is missing or unreadable."""
        try:
            return select.files_needed(files, folder, self.variant, self.dtype)
        except WeightsError:
            return None

    def not_cached(self, why: str | None = None) -> DownloadError:
        if why is None:
            cached = self.hub.cached_commits(self.repo_id)
            why = (
                f"the commit '{self.revision}' points at was never recorded (the Hugging Face cache holds files of "
                f"{len(cached)} commit{'s' if len(cached) != 1 else ''})"
                if cached
                else "it was never downloaded"
            )
        revision = f" (revision {self.revision})" if self.revision != DEFAULT_REVISION else ""
        return DownloadError(
            f"{self.repo_id}{revision} is not available: {self.why_local()}, and {why}",
            hint=f"run `{self.download_command()}` while online",
        )

    def why_local(self) -> str:
        """Why only the Hub cache can be used."""
        return "offline mode is on" if self.offline else "the Hub cannot be reached"

    def download_command(self) -> str:
        again = f" --revision {self.revision}" if self.revision != DEFAULT_REVISION else ""
        return f"vqdiff download {self.repo_id}{again}"

    # -- the network ------------------------------------------------------------------------------------------

    def fetch(self, listing: RepoListing) -> Path:
        """Fetch what a load needs at `listing.commit` into the Hub cache, small files first; the snapshot folder."""
        where = f"{self.repo_id} at {listing.commit[:12]}"
        if "model_index.json" not in listing.files:
            raise WeightsError(f"{where} is not a diffusers checkpoint: it has no model_index.json")
        progress = _Bytes(self, listing)
        folder = progress.fetch(["model_index.json"])[0].parent
        try:
            select.files_needed(listing.files, folder, self.variant, self.dtype, have=progress.fetch)
        except MissingFilesError as e:
            raise e.of(f"{where}: has") from None
        return folder

    # -- converting, and mending damaged files of the Hub cache ---------------------------------------------

    def build(self, commit: str, snapshot: Path, listing: RepoListing | None) -> Entry:
        """Convert the snapshot. When that fails on a file of the Hub cache that no longer hashes to its blob name,
        fetch it again and convert once more (online, `listing` given), or raise DamagedCacheError naming it."""
        try:
            return self.convert(commit, snapshot)
        except WeightsError as e:
            files = self.hub.cached_snapshot(self.repo_id, commit)
            present = files[1] if files is not None else set()
            damaged, unknown = self.damage.find(snapshot, self.needed(present, snapshot) or sorted(present))
            if not damaged:
                if unknown and e.hint is None and isinstance(e, UnreadableFileError):
                    raise e.with_message(
                        e.message,
                        hint="if the file is damaged, delete it from the Hugging Face cache and run "
                        f"`{self.download_command()}` while online",
                    ) from None
                raise
            if listing is None:
                raise self.damage.error(commit, snapshot, damaged) from None
        self.emit("note", f"{_names(damaged)} in the Hugging Face cache {_is(damaged)} damaged: fetching it again")
        _Bytes(self, listing).fetch(damaged, force=damaged)
        return self.convert(commit, snapshot)

    def convert(self, commit: str, snapshot: Path) -> Entry:
        def write(folder: Path) -> dict[str, Any]:
            def on_component(component: str, converting: bool) -> None:
                stored = dtype_name(convert.stored_dtype(component, self.dtype))
                if converting:
                    self.emit("convert", f"converting {component} weights to {stored} safetensors (once)")
                else:
                    self.emit("convert", f"linking {component} weights (already {stored} safetensors)")

            done = convert.write_converted(snapshot, folder, self.dtype, self.variant, on_component)
            return {
                "revision": self.revision,
                "variants": {c.component: c.variant for c in done},
                "sources": {c.component: [_identity(snapshot, p) for p in c.sources] for c in done},
            }

        def on_wait() -> None:
            self.emit("note", "waiting for another vqdiff process that is preparing the same model")

        return self.cache.build(self.key(commit), write, on_wait)

    def ready(self, entry: Entry) -> PreparedModel:
        return PreparedModel(self.repo_id, entry.path, self.dtype, entry.key.commit, entry)


class _Damage:
    """Files of one repository's Hub cache that no longer hold what was downloaded: found by hashing them against
    their blob names, and named in an error that says how to fetch them again."""

    def __init__(self, hub: Hub, repo_id: str, why_local: str, download_command: str) -> None:
        self.hub, self.repo_id = hub, repo_id
        self.why_local, self.download_command = why_local, download_command

    def find(self, snapshot: Path, files: Collection[str]) -> tuple[list[str], list[str]]:
        """The files that no longer hash to their blob name, and those whose blob name says nothing."""
        damaged, unknown = [], []
        for f in files:
            ok = self.hub.intact(snapshot / f)
            if ok is False:
                damaged.append(f)
            elif ok is None:
                unknown.append(f)
        return damaged, unknown

    def check(self, commit: str, snapshot: Path, files: Collection[str]) -> None:
        damaged, _ = self.find(snapshot, files)
        if damaged:
            raise self.error(commit, snapshot, damaged)

    def error(self, commit: str, snapshot: Path, damaged: list[str]) -> DamagedCacheError:
        return DamagedCacheError(
            f"{_names(damaged)} of {self.repo_id} at {commit[:12]} in the Hugging Face cache {_is(damaged)} damaged "
            f"({snapshot / damaged[0]}) and {self.why_local}",
            hint=f"run `{self.download_command}` while online to fetch it again",
        )


class _Bytes:
    """Downloads a list of files, reporting bytes over everything not yet cached."""

    def __init__(self, preparer: _Preparer, listing: RepoListing) -> None:
        self.p = preparer
        self.listing = listing
        self.done = 0
        self.total = 0

    def fetch(self, paths: list[str], force: Collection[str] = ()) -> list[Path]:
        """Fetch `paths` unless cached whole (a cached file of another size than the listing's is fetched again, as
        is every file in `force`); their local paths."""
        repo, commit = self.listing.repo_id, self.listing.commit
        todo, again, cached_at = [], set(force), {}
        for f in paths:
            cached = self.p.hub.cached_path(repo, commit, f)
            expected = self.listing.sizes.get(f)
            if cached is not None:
                cached_at[f] = cached
            if cached is None or f in again:
                todo.append(f)
            elif expected is not None and (actual := _size(cached)) != expected:
                self.p.emit(
                    "note",
                    f"{f} in the Hugging Face cache has {actual} bytes, the Hub lists {expected}: "
                    "it is damaged, fetching it again",
                )
                todo.append(f)
                again.add(f)
        self.total += sum(self.listing.sizes.get(f) or 0 for f in todo)
        out = []
        for path in paths:
            if path not in todo:
                out.append(cached_at[path])
                continue

            def count(n: int, path: str = path) -> None:
                self.done += n
                self.p.emit("download", path, self.done, self.total)

            self.p.emit("download", path, self.done, self.total)
            out.append(self.p.hub.download(repo, commit, path, count, force=path in again))
        return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _names(files: list[str]) -> str:
    return ", ".join(files)


def _is(files: list[str]) -> str:
    return "is" if len(files) == 1 else "are"


def _identity(root: Path, path: Path) -> dict[str, Any]:
    """A source file as the manifest records it: its path in the repo, size, and blob name (the Hub's etag)."""
    return {"file": path.relative_to(root).as_posix(), "size": path.stat().st_size, "blob": path.resolve().name}
