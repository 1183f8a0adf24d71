"""Training VQ-Diffusion models: data on disk, the accelerate loop, the VQ-VAE and transformer stages, export.

Needs the `train` extra (accelerate, peft); `require_train_extra` says so in one line when they are missing.
"""

from __future__ import annotations

import importlib.util

from ..errors import UsageError

TRAIN_EXTRA_HINT = 'install the training extra: pip install "vqdiff[train]"'


def require_train_extra(*, lora: bool = False) -> None:
    """Raise a UsageError naming the extra when accelerate (or, for LoRA, peft) is not installed."""
    needed = ["accelerate", *(["peft"] if lora else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"training needs {' and '.join(missing)}, which is not installed", hint=TRAIN_EXTRA_HINT)
