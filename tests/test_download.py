"""`vqdiff download` prepares what a later run loads, through the library's one preparing function, whatever machine
it runs on: the device is only named, so a model is fetched for a GPU on a machine without one."""

from __future__ import annotations

import pytest
import torch

from .test_hub import FP16_SAFETENSORS, REPO, cli, entries
from .test_hub import hub as hub  # the stand-in Hub, a fixture


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever the tests run
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("VQDIFF_DEVICE", raising=False)  # conftest pins the CPU; here the config names the device
    return tmp_path / "config.toml"


def test_a_cuda_device_in_the_config_downloads_for_the_gpu_on_a_cpu_machine(hub, tmp_path, config):
    config.write_text('device = "cuda"\n')
    r = cli("download", REPO)
    assert r.exit_code == 0, r.output
    assert {f for f in hub.fetched() if f.endswith((".bin", ".safetensors"))} == FP16_SAFETENSORS
    assert [e.name for e in entries(tmp_path)] == ["auto-float16"]  # what a float16 run on the GPU loads
    r = cli("generate", "a cat", "--model", REPO, "--steps", "1", "-o", str(tmp_path / "cat.png"))
    assert r.exit_code == 1  # running it here still needs the GPU, and says where the device came from
    assert "no CUDA GPU is available" in r.output and f"device from config {config}" in r.output


def test_a_bad_device_in_the_config_is_named_with_its_origin(hub, config):
    config.write_text('device = "tpu"\n')
    r = cli("download", REPO)
    assert r.exit_code == 2
    assert f"unknown device 'tpu' (device from config {config})" in r.output
    assert hub.fetched() == []
