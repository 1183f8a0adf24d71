"""Run settings and where each came from: command-line flag > image metadata (--from-image) > environment > config
file > built-in default.

The config file is TOML with flat keys (`model = "..."`, `device = "cuda"`, `output = "out/{prompt}-{seed}.png"`),
in the user config directory (`vqdiff config path`), or wherever VQDIFF_CONFIG points.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError, VqdiffError, excerpt
from ..options import DEFAULT_MODEL, GenerateOptions

DEFAULT_OUTPUT = "{prompt}-{seed}.png"


@dataclass(frozen=True)
class Setting:
    """One setting: its key (as in the config file, and its flag's name), built-in default, type and variable."""

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
        Setting("steps", GenerateOptions.steps, int),
        Setting("stride", GenerateOptions.stride, int),
        Setting("guidance", GenerateOptions.guidance_scale, float),
        Setting("truncation", GenerateOptions.truncation_rate, float),
        Setting("batch_size", GenerateOptions.batch_size, int),
        Setting("sampler", GenerateOptions.sampler, str),
        Setting("reveal", GenerateOptions.reveal, str),
        Setting("purity_weight", GenerateOptions.purity_weight, float),
        Setting("tokens_per_call", 0, int),  # 0: no limit (GenerateOptions' None), so that a record can say so
        Setting("stride_mode", GenerateOptions.stride_mode, str),
        Setting("cache_dir", None, str, "VQDIFF_CACHE_DIR"),
    )
}
# steps and stride say the same thing: the layer that sets either one decides both
_GROUPS = (("steps", "stride"),)


@dataclass(frozen=True, kw_only=True)
class SettingFlags:
    """What the command line gave for each setting, under the setting's key (None: not given). A command fills in
    the flags it has; its parameter names are its own."""

    model: str | None = None
    revision: str | None = None
    variant: str | None = None
    device: str | None = None
    dtype: str | None = None
    output: str | None = None
    steps: int | None = None
    stride: int | None = None
    guidance: float | None = None
    truncation: float | None = None
    batch_size: int | None = None
    sampler: str | None = None
    reveal: str | None = None
    purity_weight: float | None = None
    tokens_per_call: int | None = None
    stride_mode: str | None = None
    cache_dir: Path | None = None

    def given(self) -> dict[str, Any]:
        """Every setting's flag, by key (Paths as text)."""
        return {k: str(v) if isinstance(v, Path) else v for k in SETTINGS if (v := getattr(self, k)) is not None}


def generate_options(settings: Resolved, **fixed: Any) -> GenerateOptions:
    """The sampling options of resolved settings (`fixed`: the seed, the number of images), a bad value named with
    where it came from. --purity-weight given on the command line without the purity reveal is refused."""
    try:
        if settings.sources.get("purity_weight") == "flag" and settings["reveal"] != "purity":
            raise UsageError(
                f"--purity-weight applies to the purity reveal, not to --reveal {settings['reveal']}",
                hint="add --purity",
                about=("purity_weight", "reveal"),
            )
        per_call = settings["tokens_per_call"]
        if per_call is not None and per_call < 0:
            raise UsageError(
                f"--tokens-per-call must be 0 (no limit) or more, got {per_call}", about=("tokens_per_call",)
            )
        return GenerateOptions(
            steps=settings["steps"],
            stride=settings["stride"],
            guidance_scale=settings["guidance"],
            truncation_rate=settings["truncation"],
            batch_size=settings["batch_size"],
            sampler=settings["sampler"],
            reveal=settings["reveal"],
            purity_weight=settings["purity_weight"],
            tokens_per_call=per_call or None,
            stride_mode=settings["stride_mode"],
            **fixed,
        )
    except UsageError as e:
        raise with_origin(e, settings) from None


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
    """Every setting's value and where it came from ("flag", "image", "env VQDIFF_...", "config <file>", "default")."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    config_file: Path | None = None  # the config file that was read (it need not exist)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def rows(self) -> dict[str, dict[str, Any]]:
        """Each setting as `{"value": ..., "source": ...}`, for --json."""
        return {k: {"value": v, "source": self.sources[k]} for k, v in self.values.items()}

    def table(self) -> list[str]:
        """Each setting on a line: key, value, source (what `vqdiff config show` and --dry-run print)."""
        width = max(len(k) for k in self.values)
        return [f"  {k:<{width}}  {v!s:<32}  {self.sources[k]}" for k, v in self.values.items()]


def with_origin(error: VqdiffError, settings: Resolved) -> VqdiffError:
    """`error`, saying where the values of the settings it is about came from when that was not a flag: a bad value
    in the config file or the environment is not the command line's fault."""
    origins = [
        f"{key} from {settings.sources[key]}"
        for key in error.about
        if settings.sources.get(key, "flag") not in ("flag", "default")
    ]
    if not origins:
        return error
    return error.with_message(f"{error.message} ({'; '.join(origins)})")


def load(
    flags: SettingFlags,
    *,
    image: Mapping[str, Any] | None = None,
    keys: tuple[str, ...] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Resolved:
    """The settings of one command: its flags over the image's metadata, the environment, the config file and the
    defaults (`defaults` stand in for built-in ones: a command's own default output name, say). The one resolver
    every command uses."""
    config, config_file = read_config()
    return resolve(flags.given(), image=image, config=config, config_file=config_file, keys=keys, defaults=defaults)


def resolve(
    flags: Mapping[str, Any],
    *,
    image: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    keys: tuple[str, ...] | None = None,
    defaults: Mapping[str, Any] | None = None,
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
            values[key] = (defaults or {}).get(key, SETTINGS[key].default)
            sources[key] = "default"
    return Resolved(values, sources, config_file)
