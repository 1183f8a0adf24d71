"""vqdiff: VQ-Diffusion text-to-image generation, inpainting and token tools.

Importing the package is cheap; the API (and torch) load on first use of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .errors import VqdiffError
    from .pipeline.pipeline import GeneratedImage, GenerateOptions, ModelSource, StepEvent, VQDiffusion

__all__ = ["GenerateOptions", "GeneratedImage", "ModelSource", "StepEvent", "VQDiffusion", "VqdiffError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "VqdiffError":
        from .errors import VqdiffError

        return VqdiffError
    if name == "InpaintOptions":
        from .options import InpaintOptions

        return InpaintOptions
    if name in __all__:
        from .pipeline import pipeline as api

        return getattr(api, name)
    raise AttributeError(f"module 'vqdiff_cli' has no attribute {name!r}")
