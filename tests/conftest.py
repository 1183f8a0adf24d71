"""Shared fixtures: tiny random checkpoints built with diffusers in the test run, and our pipelines over them."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the real Hub
os.environ.setdefault("NO_COLOR", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

from .tiny import TinyCheckpoint, TinySpec, build_tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """No test reads or writes the user's Hub cache or vqdiff cache (tests/test_hub.py points them elsewhere too)."""
    root = tmp_path_factory.mktemp("caches")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_CACHE", "VQDIFF_CACHE_DIR")}
    os.environ["HF_HOME"] = str(root / "hf")
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ["VQDIFF_CACHE_DIR"] = str(root / "vqdiff")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """Learned null embeddings, 4x4 tokens, 16 codes, T = 100, in the Hub's layout (.bin, old VQ key names)."""
    return build_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_unlearned(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """`learnable: false`: the unconditional branch embeds the empty prompt."""
    return build_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-unlearned", TinySpec(learnable=False, seed=1))


@pytest.fixture(scope="session")
def tiny_pipe(tiny: TinyCheckpoint):  # type: ignore[no-untyped-def]
    from vqdiff_cli import VQDiffusion

    return VQDiffusion.from_pretrained(tiny.path, device="cpu")


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    """A 24x20 RGB test picture with structure (gradients and a square)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:20, 0:24]
    arr = np.stack([x * 10, y * 12, (x + y) * 5], axis=-1).astype("uint8")
    arr[5:12, 6:14] = (250, 30, 30)
    path = tmp_path / "picture.png"
    Image.fromarray(arr).save(path)
    return path
