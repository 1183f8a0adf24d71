"""What several commands share: loading the model the options name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..console import Output

if TYPE_CHECKING:
    from ..api import VQDiffusion


def load_model(
    out: Output,
    model: str,
    *,
    device: str,
    dtype: str,
    variant: str,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    threads: int | None = None,
) -> VQDiffusion:
    """Load `model` (local folder) on the requested device and dtype, saying so on stderr."""
    from ..api import VQDiffusion
    from ..device import configure_cpu_threads

    configure_cpu_threads(threads)
    out.info(f"loading {model}")
    return VQDiffusion.from_pretrained(
        model, device=device, dtype=dtype, variant=variant, compile=compile, cuda_graphs=cuda_graphs
    )
