"""Data-parallel training: two processes under `torchrun --nproc-per-node 2` (gloo, CPU) end with the weights of one
process that takes the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .tiny import TinyCheckpoint
from .train_toys import colour_dataset

FLAGS = (
    "--train-text-encoder --layers 2 --width 32 --heads 2 --text-layers 1 --text-width 32"
    " --steps 4 --grad-accum 2 --device cpu --seed 3 --caption-dropout 0.3 --log-every 1"
)
WEIGHTS = (
    "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.safetensors",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path: Path, tiny: TinyCheckpoint) -> None:
    data = colour_dataset(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train", "transformer", str(data), "--vqvae", str(tiny.path), *FLAGS.split()]
    one = subprocess.run(
        [sys.executable, "-m", "vqdiff_cli", *common, "-o", str(tmp_path / "one"), "--batch-size", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert one.returncode == 0, one.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    two = subprocess.run(
        [*launcher, "-m", "vqdiff_cli", *common, "-o", str(tmp_path / "two"), "--batch-size", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.splitlines().count(str(tmp_path / "two")) == 1  # only the main process reports
    for name in WEIGHTS:
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    lines = (tmp_path / "two" / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4  # one writer
