"""Run settings and where each came from: command-line flag > image metadata (--from-image) > environment > config
file > built-in default.

The config file is TOML with flat keys (`model = "..."`, `device = "cuda"`, `output = "out/{prompt}-{seed}.png"`),
in the user config directory (`vqdiff config path`), or wherever VQDIFF_CONFIG points.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError, VqdiffError, excerpt

DEFAULT_MODEL = "microsoft/vq-diffusion-ithq"
DEFAULT_OUTPUT = "{prompt}-{seed}.png"


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    kind: type
    env: str | None = None


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("model", DEFAULT_MODEL, str, "VQDIFF_MODEL"),
        Setting("revision", None, str),
        Setting("variant", "auto", str),
        Setting("device", "auto", str, "VQDIFF_DEVICE"),
        Setting("dtype", "auto", str, "VQDIFF_DTYPE"),
        Setting("output", DEFAULT_OUTPUT, str, "VQDIFF_OUTPUT"),
        Setting("steps", None, int),
        Setting("stride", None, int),
        Setting("guidance", 5.0, float),
        Setting("truncation", 1.0, float),
        Setting("batch_size", 1, int),
        Setting("sampler", "auto", str),
        Setting("cache_dir", None, str, "VQDIFF_CACHE_DIR"),
    )
}
# steps and stride say the same thing: the layer that sets either one decides both
_GROUPS = (("steps", "stride"),)


def config_path() -> Path:
    override = os.environ.get("VQDIFF_CONFIG")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_config_path

    return user_config_path("vqdiff") / "config.toml"


def _coerce(setting: Setting, value: Any, where: str) -> Any:
    if value is None:
        return None
    kind = setting.kind
    try:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str and isinstance(value, str):
            return value
        if isinstance(value, str) and kind in (int, float):
            return kind(value)
    except ValueError:
        pass
    raise UsageError(f"{excerpt(where)}: '{setting.key}' must be {kind.__name__}, got {excerpt(repr(value))}")


def read_config(path: Path | None = None) -> tuple[dict[str, Any], Path]:
    """The config file's settings (empty when there is no file); unknown keys and bad values are errors."""
    path = path or config_path()
    if not path.is_file():
        if path.exists():
            raise UsageError(f"config path {excerpt(path)} is not a file")
        return {}, path
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {excerpt(path)}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {excerpt(path)} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise UsageError(
            f"config file {excerpt(path)}: unknown key(s) {excerpt(', '.join(unknown))}",
            hint=f"known keys: {', '.join(SETTINGS)}",
        )
    return {k: _coerce(SETTINGS[k], v, str(path)) for k, v in data.items()}, path


@dataclass(frozen=True)
class Resolved:
    values: dict[str, Any]
    sources: dict[str, str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def with_origin(error: VqdiffError, settings: Resolved, keys: Iterable[str]) -> VqdiffError:
    """`error` (about one of `keys`, named as its flag `--key` or as `key '...'`) saying where the value came from
    when that was not a flag: a bad value in the config file or the environment is not the command line's fault."""
    origins = [
        f"{key} from {settings.sources[key]}"
        for key in keys
        if settings.sources.get(key, "flag") not in ("flag", "default")
        and ("--" + key.replace("_", "-") in error.message or f"{key} '" in error.message)
    ]
    if not origins:
        return error
    return type(error)(f"{error.message} ({'; '.join(origins)})", error.hint)


def resolve(
    flags: Mapping[str, Any],
    *,
    image: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    keys: tuple[str, ...] | None = None,
) -> Resolved:
    """Merge the layers for `keys` (default: every setting); a flag given as None counts as not given."""
    env = os.environ if env is None else env
    config = config or {}
    image = image or {}
    keys = keys or tuple(SETTINGS)
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("flag", {k: v for k, v in flags.items() if v is not None}),
        (
            "image",
            {
                k: _coerce(SETTINGS[k], v, "the image's metadata (--from-image)")
                for k, v in image.items()
                if v is not None and k in SETTINGS
            },
        ),
        (
            "env",
            {
                s.key: _coerce(s, env[s.env], f"environment {s.env}")
                for s in SETTINGS.values()
                if s.env and env.get(s.env)
            },
        ),
        (f"config {config_file}" if config_file else "config", config),
    ]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    grouped = {k: g for g in _GROUPS for k in g}
    for key in keys:
        group = grouped.get(key, (key,))
        for name, layer in layers:
            if any(k in layer for k in group):
                values[key] = layer.get(key)
                sources[key] = f"{name} {SETTINGS[key].env}" if name == "env" else name
                break
        else:
            values[key] = SETTINGS[key].default
            sources[key] = "default"
    return Resolved(values, sources)
