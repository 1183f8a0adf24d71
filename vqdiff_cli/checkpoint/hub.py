"""The one module that talks to the Hugging Face Hub, through huggingface_hub's public API, and reads its cache.

Files land in the standard Hub cache, shared with diffusers and transformers, so a model one of them fetched is not
fetched again. The Hub's environment variables are read each time a function runs (not when a module is imported):
HF_ENDPOINT, HF_HUB_CACHE / HF_HOME / XDG_CACHE_HOME, HF_HUB_OFFLINE; huggingface_hub reads HF_TOKEN itself.
Nothing here prints: download progress leaves through a callback that receives byte counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DownloadError, excerpt
from ..files import replace_text

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}

ByteCallback = Callable[[int], None]


def is_repo_id(name: str) -> bool:
    """'owner/name', as the Hub spells repository ids (a path such as './x/y' or '/x/y' is not one)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def is_commit(revision: str) -> bool:
    """A full commit hash: immutable, so what was cached for it never needs checking again."""
    return bool(_COMMIT.match(revision))


def env_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) set to a true value."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hub cache huggingface_hub uses: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    env = os.environ
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        cache_home = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(env.get("HF_HOME") or os.path.join(cache_home, "huggingface"), "hub")
    return Path(os.path.expandvars(os.path.expanduser(path)))


@dataclass(frozen=True)
class RepoListing:
    """A repository's files at one commit, as the Hub lists them."""

    repo_id: str
    commit: str
    sizes: dict[str, int | None] = field(default_factory=dict)  # path in the repo -> bytes

    @property
    def files(self) -> Collection[str]:
        return self.sizes.keys()


@dataclass(frozen=True)
class Hub:
    """Where the Hub is and where its files are cached."""

    endpoint: str
    cache_dir: Path

    @classmethod
    def from_env(cls) -> Hub:
        return cls(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/") or DEFAULT_ENDPOINT, hub_cache_dir())

    # -- the network ------------------------------------------------------------------------------------------

    def list_files(self, repo_id: str, revision: str) -> RepoListing:
        """One request: the commit `revision` points at, and every file there with its size."""
        from huggingface_hub import HfApi

        with self._errors(repo_id, revision):
            info = HfApi(endpoint=self.endpoint).model_info(repo_id, revision=revision, files_metadata=True)
        if not info.sha:
            raise DownloadError(
                f"{self.endpoint} did not say which commit '{excerpt(revision)}' of {excerpt(repo_id)} is"
            )
        sizes = {s.rfilename: s.lfs.size if s.lfs is not None else s.size for s in info.siblings or []}
        return RepoListing(repo_id, info.sha, sizes)

    def download(
        self, repo_id: str, commit: str, path: str, on_bytes: ByteCallback | None = None, force: bool = False
    ) -> Path:
        """One file at one commit into the Hub cache (no request at all when it is there, unless `force`: then it is
        fetched again over a damaged copy); its local path."""
        from huggingface_hub import hf_hub_download

        with self._errors(repo_id, commit, path):
            local = hf_hub_download(
                repo_id,
                path,
                revision=commit,
                cache_dir=str(self.cache_dir),
                endpoint=self.endpoint,
                tqdm_class=_byte_counter(on_bytes),
                force_download=force,
            )
        return Path(str(local))

    # -- the cache (no network) -------------------------------------------------------------------------------

    def cached_path(self, repo_id: str, commit: str, path: str) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, path, cache_dir=str(self.cache_dir), revision=commit)
        return Path(found) if isinstance(found, str) else None

    def cached_commit(self, repo_id: str, revision: str) -> str | None:
        """The commit a branch or tag pointed at when it was last fetched into the Hub cache."""
        if is_commit(revision):
            return revision
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=str(self.cache_dir), revision=revision)
        if not isinstance(found, str):
            return None
        commit = Path(found).parent.name  # the cache keeps files under snapshots/<commit>/
        return commit if is_commit(commit) else None

    def write_ref(self, repo_id: str, revision: str, commit: str) -> None:
        """Record in the Hub cache which commit a branch or tag points at, as huggingface_hub does when it downloads by
        branch (vqdiff downloads by commit, which records none): later offline runs, ours or diffusers', find it."""
        if is_commit(revision) or not revision or ".." in revision.split("/") or revision.startswith("/"):
            return
        repo = self.cache_dir / repo_folder_name(repo_id)
        if not repo.is_dir():
            return  # nothing of it is cached: a ref alone would only point at missing files
        path = repo / "refs" / revision
        with contextlib.suppress(OSError):  # only a shortcut for offline runs; vqdiff's own cache records the ref too
            replace_text(path, commit)

    def cached_commits(self, repo_id: str) -> list[str]:
        """Every commit of which the Hub cache holds files."""
        folder = self.cache_dir / repo_folder_name(repo_id) / "snapshots"
        try:
            return sorted(p.name for p in folder.iterdir() if is_commit(p.name))
        except OSError:
            return []

    def cached_snapshot(self, repo_id: str, commit: str) -> tuple[Path, set[str]] | None:
        """The cached folder of one commit and the files in it, or None when nothing of it is cached."""
        index = self.cached_path(repo_id, commit, "model_index.json")
        if index is None:
            return None
        root = index.parent
        files = set()
        for folder, _, names in os.walk(root):
            for name in names:
                full = Path(folder) / name
                if full.is_file():  # a link to a blob that is still there
                    files.add(full.relative_to(root).as_posix())
        return root, files

    @staticmethod
    def intact(local: Path) -> bool | None:
        """Whether a file of the Hub cache still holds what was downloaded, by hashing it (read once): a blob is named
        after its ETag, the sha256 of an LFS file or the git blob id of any other; None when the name is neither."""
        try:
            blob = local.resolve()
            name = blob.name
            if re.fullmatch(r"[0-9a-f]{64}", name):
                digest = hashlib.sha256()
            elif re.fullmatch(r"[0-9a-f]{40}", name):
                digest = hashlib.sha1(usedforsecurity=False)
                digest.update(b"blob %d\0" % blob.stat().st_size)
            else:
                return None
            with open(blob, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        except OSError:
            return False
        return digest.hexdigest() == name

    # -- errors -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, repo_id: str, revision: str, path: str | None = None) -> Iterator[None]:
        """huggingface_hub's and the HTTP client's exceptions -> one DownloadError that says what to do."""
        from huggingface_hub import errors as hf

        what = f"{path} of {repo_id}" if path else repo_id
        try:
            yield
        except hf.GatedRepoError:
            raise DownloadError(
                f"{excerpt(repo_id)} is a gated repository on {self.endpoint}",
                hint="accept its terms on the Hub and set HF_TOKEN to a token of that account",
            ) from None
        except hf.RepositoryNotFoundError:
            raise DownloadError(
                f"model '{excerpt(repo_id)}' is neither a local folder nor a repository on {self.endpoint}",
                hint="check the name; for a private repository set HF_TOKEN",
            ) from None
        except hf.RevisionNotFoundError:
            raise DownloadError(
                f"{excerpt(repo_id)} has no revision '{excerpt(revision)}' on {self.endpoint}"
            ) from None
        except hf.RemoteEntryNotFoundError:
            raise DownloadError(
                f"{path} is missing from {excerpt(repo_id)} at {revision[:12]} on {self.endpoint}",
                hint="the repository lists the file but the server does not have it; try again later",
            ) from None
        except (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError):
            raise DownloadError(
                f"{what} is not cached and offline mode is on",
                hint=f"run `vqdiff download {repo_id}` while online",
            ) from None
        except hf.HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else "?"
            raise DownloadError(f"fetching {what} from {self.endpoint} failed: HTTP {status}") from None
        except Exception as e:
            if _is_network_error(e):
                raise HubUnreachable(
                    f"cannot reach {self.endpoint} to fetch {what}: {_first_line(e)}",
                    hint="check the network and run the command again (a finished file is not fetched twice), "
                    "or use --offline with a model that is cached",
                ) from None
            if isinstance(e, OSError):
                raise DownloadError(f"fetching {what} failed: {_first_line(e)}") from None
            raise


class HubUnreachable(DownloadError):
    """The Hub did not answer: no network, a timeout, or a dropped connection."""


def repo_folder_name(repo_id: str) -> str:
    """A model repository's folder in the Hub cache's layout (vqdiff's own cache uses the same names)."""
    return "models--" + repo_id.replace("/", "--")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_network_error(e: BaseException) -> bool:
    """A transport failure of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)."""
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    import importlib

    for name in ("httpx2", "httpx"):
        try:
            module: Any = importlib.import_module(name)
        except ImportError:
            continue
        if isinstance(e, module.TransportError):
            return True
    return False


class _NullWriter:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _byte_counter(on_bytes: ByteCallback | None) -> type:
    """A tqdm class for huggingface_hub that draws nothing and passes every byte count to `on_bytes`."""
    from tqdm.std import tqdm

    class ByteCounter(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = _NullWriter()
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if on_bytes is not None and n:
                on_bytes(int(n))
            return super().update(n)  # type: ignore[no-any-return]

        # Having these makes huggingface_hub report network bytes here too instead of on a second bar (Xet
        # downloads): only the bytes written, counted by `update`, are passed on.
        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_transfer_postfix_str(self, text: str, refresh: bool = False) -> None:
            pass

    return ByteCounter
