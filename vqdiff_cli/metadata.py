"""Generation metadata that can be re-run: a JSON record (PNG text key "vqdiff") and an A1111-style "parameters"
text that other tools already read. Building and parsing only; `images.py` reads and writes the PNG chunks.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import UsageError, excerpt
from .options import GenerateOptions
from .version import __version__

JSON_KEY = "vqdiff"
PARAMETERS_KEY = "parameters"
SCHEMA = 1

# settings a re-run takes from an image (flags still win)
RERUN_KEYS = (
    "model",
    "revision",
    "variant",
    "dtype",
    "steps",
    "stride",
    "guidance",
    "truncation",
    "sampler",
    "reveal",
    "purity_weight",
    "tokens_per_call",
    "stride_mode",
)
REVEAL_KEYS = ("reveal", "purity_weight", "tokens_per_call", "stride_mode")
# What a record written before these settings existed means by them (its images were made so).
OLDER_DEFAULTS: dict[str, Any] = {
    "reveal": "posterior",
    "purity_weight": None,
    "tokens_per_call": 0,
    "stride_mode": "exact",
}
# What --skip-existing does not compare: the version that wrote an image, and what follows from the other fields (the
# visited timesteps from the model and --steps or --stride, the size from the model).
NOT_SETTINGS = ("vqdiff_version", "num_steps", "timesteps", "network_calls", "width", "height")
# What a run knows of an image's record before its model is loaded (the rest names the files that were read).
KNOWN_BEFORE_LOADING = (
    "mode",
    "prompt",
    "seed",
    "index",
    "model",
    "variant",
    "steps",
    "stride",
    "guidance",
    "truncation",
    *REVEAL_KEYS,
)


def reveal_settings(options: GenerateOptions) -> dict[str, Any]:
    """How a run reveals tokens, as its records hold it: the purity weight only for the purity reveal (elsewhere it
    changes nothing), 0 tokens per call for no limit (so that a re-run asks for no limit, whatever the config says)."""
    return {
        "reveal": options.reveal,
        "purity_weight": options.purity_weight if options.reveal == "purity" else None,
        "tokens_per_call": options.tokens_per_call or 0,
        "stride_mode": options.stride_mode,
    }


def build(
    settings: dict[str, Any],
    *,
    prompt: str,
    seed: int,
    index: int,
    timesteps: tuple[int, ...],
    size: tuple[int, int],
    mode: str = "generate",
    batch: tuple[int, int] = (1, 0),
    extra: dict[str, Any] | None = None,
    network_calls: int | None = None,
) -> dict[str, Any]:
    """The JSON record of one image; `settings` holds model, revision, model_path, variant (as requested),
    weights_variant (the files read), device, dtype, steps, stride, guidance, truncation, sampler and the reveal
    settings (`reveal_settings`). `batch`: the number of images in the batch it was made in and its position there
    (`generate --from-image --same-batch` rebuilds it); `network_calls`: the transformer calls its batch took."""
    record = {
        "schema": SCHEMA,
        "vqdiff_version": __version__,
        "mode": mode,
        "prompt": prompt,
        "seed": seed,
        "index": index,
        "model": settings.get("model"),
        "revision": settings.get("revision"),
        "model_path": settings.get("model_path"),
        "variant": settings.get("variant"),
        "weights_variant": settings.get("weights_variant"),
        "device": settings.get("device"),
        "dtype": settings.get("dtype"),
        "steps": settings.get("steps"),
        "stride": settings.get("stride"),
        "num_steps": len(timesteps),
        "timesteps": list(timesteps),
        "guidance": settings.get("guidance"),
        "truncation": settings.get("truncation"),
        "sampler": settings.get("sampler"),
        **{k: settings.get(k, OLDER_DEFAULTS[k]) for k in REVEAL_KEYS},
        "network_calls": network_calls,
        "width": size[0],
        "height": size[1],
        "batch_size": batch[0],
        "batch_index": batch[1],
    }
    if extra:
        record.update(extra)
    return record


def a1111_parameters(record: dict[str, Any]) -> str:
    """`prompt` on the first line, then `Steps: ..., Sampler: ..., CFG scale: ..., Seed: ..., Size: ..., Model: ...`."""
    fields = [
        ("Steps", record.get("num_steps")),
        ("Sampler", _sampler_text(record)),
        ("CFG scale", record.get("guidance")),
        ("Seed", record.get("seed")),
        ("Size", f"{record.get('width')}x{record.get('height')}"),
        ("Model", record.get("model")),
        ("Truncation", record.get("truncation")),
        ("Dtype", record.get("dtype")),
        ("Batch size", record.get("batch_size")),
        ("Batch pos", record.get("batch_index")),
        ("Version", f"vqdiff {record.get('vqdiff_version')}"),
    ]
    if record.get("revision"):
        fields.insert(6, ("Model revision", record["revision"]))
    line = ", ".join(f"{k}: {v}" for k, v in fields if v is not None)
    return f"{record.get('prompt', '')}\n{line}"


def _sampler_text(record: dict[str, Any]) -> str:
    """E.g. "VQ-Diffusion fast stride 10 original", "VQ-Diffusion purity r=1 5 tokens/call"."""
    reveal, per_call = record.get("reveal"), record.get("tokens_per_call")
    return (
        "VQ-Diffusion"
        + (f" {record['sampler']}" if record.get("sampler") == "fast" else "")
        + (f" stride {record['stride']}" if record.get("stride") else "")
        + (" original" if record.get("stride_mode") == "original" else "")
        + (f" {reveal}" if reveal in ("random", "purity") else "")
        + (f" r={record['purity_weight']:g}" if reveal == "purity" and record.get("purity_weight") is not None else "")
        + (f" {per_call} tokens/call" if reveal in ("random", "purity") and per_call else "")
    )


def png_text(record: dict[str, Any]) -> dict[str, str]:
    return {JSON_KEY: json.dumps(record, ensure_ascii=False, sort_keys=True), PARAMETERS_KEY: a1111_parameters(record)}


def parse(text: dict[str, str], where: str) -> dict[str, Any]:
    """The vqdiff record from an image's text chunks."""
    raw = text.get(JSON_KEY)
    if raw is None:
        found = ", ".join(sorted(text)) or "none"
        raise UsageError(
            f"{excerpt(where)} has no vqdiff metadata (text chunks: {excerpt(found)})",
            hint="only PNGs written by vqdiff without --no-metadata can be re-run",
        )
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"{excerpt(where)}: the vqdiff metadata is not valid JSON ({e})") from None
    if not isinstance(record, dict) or "prompt" not in record or "seed" not in record:
        raise UsageError(f"{excerpt(where)}: the vqdiff metadata lacks a prompt or seed")
    if not isinstance(record["prompt"], str):
        raise UsageError(f"{excerpt(where)}: the vqdiff metadata's prompt is not text")
    if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
        raise UsageError(
            f"{excerpt(where)}: the vqdiff metadata's seed is not a whole number, got {excerpt(repr(record['seed']))}"
        )
    return record


def rerun_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The settings a re-run takes from a record (a local model folder is found again by its path)."""
    out = {k: record.get(k) for k in RERUN_KEYS}
    if record.get("model_path") and record.get("revision") is None:
        out["model"] = record["model_path"]
    if out.get("stride") is not None:
        out["steps"] = None
    elif out.get("steps") is None and record.get("num_steps") is not None:
        out["steps"] = record["num_steps"]
    return out


def differences(found: dict[str, Any], expected: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[str]:
    """The settings of `keys` (default: all of `expected` but NOT_SETTINGS) on which an image's record `found`
    differs from the `expected` one, each as "key: found, not expected"."""
    keys = keys or tuple(k for k in expected if k not in NOT_SETTINGS)
    found = {**OLDER_DEFAULTS, **found}  # an image made before the reveal settings existed was made with these
    return [f"{k}: {found.get(k)!r}, not {expected.get(k)!r}" for k in keys if found.get(k) != expected.get(k)]
