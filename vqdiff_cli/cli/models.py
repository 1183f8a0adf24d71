"""`vqdiff download` and `vqdiff models list|path|rm`: fetching models ahead of time and managing vqdiff's cache."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..options import DEFAULT_MODEL
from .common import cache_dir_of, model_settings
from .console import LoadReporter, Output
from .options import (
    CacheDirOpt,
    CachedRevisionOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    OfflineOpt,
    QuietOpt,
    RevisionOpt,
    VariantOpt,
)
from .settings import SettingFlags

if TYPE_CHECKING:
    from ..checkpoint.cache import Entry, ModelCache

ModelArg = Annotated[str, typer.Argument(help="Hub repo id, e.g. microsoft/vq-diffusion-ithq.", show_default=False)]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def entry_record(entry: Entry, cache: ModelCache) -> dict[str, Any]:
    refs = [name for name, commit in cache.refs(entry.key.repo_id).items() if commit == entry.key.commit]
    return {
        "model": entry.key.repo_id,
        "revision": entry.manifest.get("revision"),
        "refs": refs,
        "commit": entry.key.commit,
        "variant": entry.key.variant,
        "dtype": entry.key.dtype,
        "variants": entry.variants,
        "size": entry.size,
        "path": str(entry.path),
        "created": entry.manifest.get("created"),
    }


def _matching(cache: ModelCache, model: str, revision: str | None, dtype: str | None = None) -> list[Entry]:
    refs = cache.refs(model)
    out = []
    for entry in cache.entries(model):
        commit = entry.key.commit
        if revision is not None and not (
            revision == commit or refs.get(revision) == commit or (len(revision) >= 7 and commit.startswith(revision))
        ):
            continue
        if dtype is not None and dtype != "auto" and entry.key.dtype != dtype:
            continue
        out.append(entry)
    return out


def _none_cached(model: str, cache: ModelCache) -> Exception:
    from ..errors import WeightsError, excerpt

    return WeightsError(
        f"no cached copy of {excerpt(model)} in {cache.root}", hint=f"run `vqdiff download {excerpt(model)}`"
    )


def _interactive() -> bool:
    return sys.stdin.isatty()


def download(
    model: Annotated[
        str | None,
        typer.Argument(help=f"Hub repo id (env VQDIFF_MODEL). [default: {DEFAULT_MODEL}]", show_default=False),
    ] = None,
    revision: RevisionOpt = None,
    variant: VariantOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
    cache_dir: CacheDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fetch a model from the Hub and convert it, so that later runs start fast and work offline."""
    from ..checkpoint.cache import ModelCache
    from ..checkpoint.resolve import prepare
    from ..errors import DeviceError, UsageError, excerpt
    from .settings import with_origin

    out = Output(quiet=quiet, json_mode=json_out)
    s = model_settings(
        SettingFlags(model=model, revision=revision, variant=variant, device=device, dtype=dtype, cache_dir=cache_dir)
    )
    model, revision, cache_dir = s["model"], s["revision"], cache_dir_of(s)
    if Path(model).expanduser().exists():
        raise UsageError(
            f"'{excerpt(model)}' is a local folder: there is nothing to download", hint="pass a Hub repo id"
        )
    out.info(f"preparing {excerpt(model)}" + (f" ({excerpt(revision)})" if revision else ""))
    try:
        with LoadReporter(out) as report:
            prepared = prepare(
                model,
                device=s["device"],  # only named: the weights are prepared for it, which needs no such device here
                dtype=s["dtype"],
                variant=s["variant"],
                revision=revision,
                offline=offline,
                cache_dir=cache_dir,
                on_event=report,
            )
    except (UsageError, DeviceError) as e:
        raise with_origin(e, s) from None
    assert prepared.entry is not None
    if json_out:
        out.record(entry_record(prepared.entry, ModelCache(cache_dir)))
    else:
        out.info(f"ready: {human_size(prepared.entry.size)}, commit {prepared.commit}")
        out.result(str(prepared.folder))


def list_models(cache_dir: CacheDirOpt = None, json_out: JsonOpt = False) -> None:
    """Built-in and cached models: one line each with model, revision, commit, variant-dtype, size and location."""
    from ..checkpoint.builtin import BUILTIN_MODELS
    from ..checkpoint.cache import ModelCache

    out = Output(json_mode=json_out)
    for builtin in BUILTIN_MODELS.values():
        if not builtin.present:
            continue
        if json_out:
            out.record(builtin.record())
        else:
            out.result(f"{builtin.name}  built-in  -  fp16  {human_size(builtin.size)}  {builtin.folder}")
    cache = ModelCache(cache_dir_of(model_settings(SettingFlags(cache_dir=cache_dir))))
    entries = cache.entries()
    if not entries:
        out.info(f"no models in {cache.root}")
    for entry in entries:
        record = entry_record(entry, cache)
        if json_out:
            out.record(record)
        else:
            refs = ",".join(record["refs"]) or "-"
            out.result(
                f"{record['model']}  {refs}  {entry.key.commit[:12]}  {entry.key.name}  "
                f"{human_size(entry.size)}  {entry.path}"
            )


def model_path(
    model: ModelArg,
    revision: CachedRevisionOpt = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Only entries of this dtype.")] = None,
    cache_dir: CacheDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The folder(s) of a cached model, newest first: ready to pass to --model."""
    from ..checkpoint.builtin import builtin_model
    from ..checkpoint.cache import ModelCache

    out = Output(json_mode=json_out)
    builtin = builtin_model(model)
    if builtin is not None:
        if json_out:
            out.record(builtin.record())
        else:
            out.result(str(builtin.folder))
        return
    cache = ModelCache(cache_dir_of(model_settings(SettingFlags(cache_dir=cache_dir))))
    entries = _matching(cache, model, revision, dtype)
    if not entries:
        raise _none_cached(model, cache)
    for entry in entries:
        if json_out:
            out.record(entry_record(entry, cache))
        else:
            out.result(str(entry.path))


def remove_model(
    model: ModelArg,
    revision: CachedRevisionOpt = None,
    yes: YesOpt = False,
    cache_dir: CacheDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete a model's converted copies from vqdiff's cache (the Hub cache's downloads are left alone)."""
    from ..checkpoint.builtin import builtin_model
    from ..checkpoint.cache import ModelCache
    from ..errors import UsageError, excerpt

    if builtin_model(model) is not None:
        raise UsageError(f"{model} is built into vqdiff, not cached: there is nothing to remove")
    out = Output(json_mode=json_out)
    cache = ModelCache(cache_dir_of(model_settings(SettingFlags(cache_dir=cache_dir))))
    entries = _matching(cache, model, revision)
    if not entries:
        raise _none_cached(model, cache)
    total = sum(e.size for e in entries)
    if not yes:
        if not _interactive():
            raise UsageError(
                f"not removing {len(entries)} cached cop{'y' if len(entries) == 1 else 'ies'} of {excerpt(model)} "
                "without confirmation",
                hint="pass --yes to remove without asking",
            )
        for entry in entries:
            out.info(f"  {entry.path} ({human_size(entry.size)})")
        if not typer.confirm(f"remove {len(entries)} folder(s), {human_size(total)}?", default=False, err=True):
            out.info("nothing removed")
            raise typer.Exit(1)
    for entry in entries:
        record = entry_record(entry, cache)
        cache.remove(entry)
        if json_out:
            out.record({**record, "removed": True})
        else:
            out.result(str(entry.path))
    out.info(f"removed {len(entries)} folder(s), {human_size(total)}")
