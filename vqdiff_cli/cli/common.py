"""What several commands share: loading the model the options name, with download and conversion progress."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..console import LoadReporter, Output

if TYPE_CHECKING:
    from ..api import VQDiffusion


def load_model(
    out: Output,
    model: str,
    *,
    device: str,
    dtype: str,
    variant: str,
    revision: str | None = None,
    offline: bool = False,
    cache_dir: Path | None = None,
) -> VQDiffusion:
    """Load `model` (a local folder or a Hub repo id, fetched and converted on first use), saying so on stderr."""
    from ..api import VQDiffusion

    out.info(f"loading {model}" + (f" ({revision})" if revision else ""))
    with LoadReporter(out) as report:
        return VQDiffusion.from_pretrained(
            model,
            device=device,
            dtype=dtype,
            variant=variant,
            revision=revision,
            offline=offline,
            cache_dir=cache_dir,
            on_progress=report,
        )
