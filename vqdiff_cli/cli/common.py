"""What several commands share: loading the model the options name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..console import Output

if TYPE_CHECKING:
    from ..api import VQDiffusion


def load_model(
    out: Output, model: str, *, device: str, dtype: str, variant: str, revision: str | None = None
) -> VQDiffusion:
    """Load `model` on the requested device and dtype, saying so on stderr."""
    from ..api import VQDiffusion

    out.info(f"loading {model}")
    return VQDiffusion.from_pretrained(model, device=device, dtype=dtype, variant=variant, revision=revision)


MODEL_KEYS = ("model", "revision", "variant", "device", "dtype", "cache_dir")


def load_from_flags(out: Output, **flags: str | None) -> VQDiffusion:
    """Resolve the model settings (flag > env > config > default) and load the model."""
    from ..settings import read_config, resolve

    config, config_file = read_config()
    s = resolve(flags, config=config, config_file=config_file, keys=MODEL_KEYS)
    return load_model(
        out, s["model"], device=s["device"], dtype=s["dtype"], variant=s["variant"], revision=s["revision"]
    )
