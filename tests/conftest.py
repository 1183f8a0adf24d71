"""Shared fixtures: tiny random checkpoints built with diffusers in the test run, and our pipelines over them."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

# The suite sees the same environment on every machine, whatever the shell that started it holds (tests that need
# other values set them with monkeypatch). Subprocesses (`python -m vqdiff_cli ...`) inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the real Hub
os.environ["NO_COLOR"] = "1"
# Tiny models gain nothing from threads, and on a busy machine every small op would wait for a second thread.
# Ours and the diffusers reference run under the same setting.
os.environ["OMP_NUM_THREADS"] = "1"
# Commands without --device run on the CPU: on a GPU machine `auto` would pick CUDA and float16. The automatic
# choices are tested as logic, with CUDA stubbed (tests/test_cli.py).
os.environ["VQDIFF_DEVICE"] = "cpu"
for _setting in ("VQDIFF_MODEL", "VQDIFF_DTYPE", "VQDIFF_OUTPUT", "VQDIFF_DEBUG"):
    os.environ.pop(_setting, None)
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402

from vqdiff_cli.checkpoint.layout import WEIGHT_COMPONENTS  # noqa: E402

from .hub_server import FakeHub  # noqa: E402
from .tiny import TinyCheckpoint, TinySpec, build_tiny  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests (tests/test_gpu.py) run where CUDA is, or where VQDIFF_GPU_TESTS_DEVICE names another device to
    rehearse them on; elsewhere they are skipped."""
    if torch.cuda.is_available() or os.environ.get("VQDIFF_GPU_TESTS_DEVICE"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_a_gpu_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with a GPU, every test but the `gpu` ones runs as CI runs it, on the CPU: device 'auto' picks
    the CPU, in this process and in the `vqdiff` processes tests start. No effect where there is no GPU."""
    if "gpu" in request.keywords or not torch.cuda.is_available():
        return
    monkeypatch.setattr("vqdiff_cli.device._auto", lambda: torch.device("cpu"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """No test reads or writes the user's Hub cache, vqdiff cache or config file (tests/test_hub.py points the caches
    elsewhere too; a missing config file is an empty one)."""
    root = tmp_path_factory.mktemp("caches")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_CACHE", "VQDIFF_CACHE_DIR", "VQDIFF_CONFIG")}
    os.environ["HF_HOME"] = str(root / "hf")
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ["VQDIFF_CACHE_DIR"] = str(root / "vqdiff")
    os.environ["VQDIFF_CONFIG"] = str(root / "no-config.toml")
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


# -- a stand-in for the Hub (tests/hub_server.py) ----------------------------------------------------------------


@pytest.fixture(scope="session")
def hub_folder(tiny, tmp_path_factory) -> Path:
    """The tiny checkpoint as microsoft/vq-diffusion-ithq is laid out on the Hub's main branch: fp32 `.bin` files,
    the fp16 variant as both `.fp16.safetensors` and `.fp16.bin`, a README and .gitattributes."""
    from safetensors.torch import save_file

    dst = tmp_path_factory.mktemp("hubrepo") / "main"
    shutil.copytree(tiny.path, dst)
    for component in WEIGHT_COMPONENTS:
        src = next((dst / component).glob("*.bin"))
        half = {
            k: v.half() if v.is_floating_point() else v.clone() for k, v in torch.load(src, weights_only=True).items()
        }
        stem = src.name.removesuffix(".bin")
        torch.save(half, dst / component / f"{stem}.fp16.bin")
        st_stem = "model" if component == "text_encoder" else stem
        save_file({k: v.contiguous() for k, v in half.items()}, str(dst / component / f"{st_stem}.fp16.safetensors"))
    (dst / "README.md").write_text("# tiny VQ-Diffusion\n")
    (dst / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    return dst


@pytest.fixture(scope="session")
def old_fp16_folder(hub_folder, tmp_path_factory) -> Path:
    """Like the Hub's old `fp16` branch: no learned null embeddings, and model_index.json does not list them."""
    dst = tmp_path_factory.mktemp("hubrepo") / "fp16"
    shutil.copytree(hub_folder, dst)
    shutil.rmtree(dst / "learned_classifier_free_sampling_embeddings")
    index = json.loads((dst / "model_index.json").read_text())
    del index["learned_classifier_free_sampling_embeddings"]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def start_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repos: dict[tuple[str, str], Path]) -> FakeHub:
    """Serve `repos` ((repo id, branch) -> folder) on 127.0.0.1 and point huggingface_hub at it, online, with every
    cache in tmp_path."""
    import huggingface_hub.constants

    server = FakeHub()
    for (repo_id, branch), folder in repos.items():
        server.publish(repo_id, folder, branch=branch)
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("VQDIFF_CACHE_DIR", str(tmp_path / "vq"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("VQDIFF_MODEL", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (this file sets it for every other test): online here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return server
