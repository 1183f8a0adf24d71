"""The engine's three commands as a user types them: generate, encode, decode, and their error paths."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from vqdiff_cli.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_generate_writes_images_tokens_and_trajectory(tiny, tmp_path):
    out = tmp_path / "img.png"
    r = run(
        "generate",
        "a teddy bear",
        "--model",
        str(tiny.path),
        "-o",
        str(out),
        "-n",
        "2",
        "--seed",
        "4",
        "--stride",
        "20",
        "--save-tokens",
        str(tmp_path / "t.npy"),
        "--trajectory",
        str(tmp_path / "tr.npy"),
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "img-0.png").is_file() and (tmp_path / "img-1.png").is_file()
    assert not out.exists()
    tokens = np.load(tmp_path / "t.npy")
    traj = np.load(tmp_path / "tr.npy")
    assert tokens.shape == (2, 4, 4) and tokens.dtype == np.int64
    assert traj.shape == (7, 2, 4, 4)  # 99, 79, 59, 39, 19, 0 -> 6 steps + the start
    assert (traj[0] == 16).all()
    assert (traj[-1] == tokens).all()


def test_encode_then_decode(tiny, tmp_path, image_file):
    tokens = tmp_path / "t.npy"
    assert run("encode", str(image_file), str(image_file), "--model", str(tiny.path), "-o", str(tokens)).exit_code == 0
    assert np.load(tokens).shape == (2, 4, 4)
    r = run("decode", str(tokens), "--model", str(tiny.path), "-o", str(tmp_path / "d.png"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d-0.png").is_file() and (tmp_path / "d-1.png").is_file()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["generate", "x", "--steps", "0"], 2, "--steps must be at least 1"),
        (["generate", "x", "--steps", "101"], 2, "between 1 and 100"),
        (["generate", "x", "--truncation", "1.5"], 2, "--truncation must be in (0, 1]"),
        (["generate", "x", "--guidance", "-1"], 2, "--guidance must be between 0 and"),
        (["generate", "x", "--steps", "3", "--stride", "3"], 2, "not both"),
        (["generate", "x", "--device", "tpu"], 2, "unknown device 'tpu'"),
        (["generate", "x", "--dtype", "float8"], 2, "unknown dtype"),
    ],
)
def test_bad_values(tiny, tmp_path, args, code, message):
    r = run(*args, "--model", str(tiny.path), "-o", str(tmp_path / "o.png"))
    assert r.exit_code == code, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o.png").exists()


def test_missing_model_and_files(tmp_path):
    r = run("generate", "x", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o.png"))
    assert r.exit_code == 1 and "is not a local folder" in r.output
    r = run("decode", str(tmp_path / "missing.npy"), "--model", str(tmp_path), "-o", str(tmp_path / "o.png"))
    assert r.exit_code == 2 and "token file not found" in r.output
    r = run("encode", str(tmp_path / "missing.png"), "--model", str(tmp_path), "-o", str(tmp_path / "t.npy"))
    assert r.exit_code == 2 and "image not found" in r.output


def test_not_a_checkpoint_folder(tmp_path):
    r = run("generate", "x", "--model", str(tmp_path), "-o", str(tmp_path / "o.png"))
    assert r.exit_code == 1
    assert "not a diffusers VQ-Diffusion checkpoint" in r.output


def test_existing_output_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"precious")
    r = run("generate", "x", "--model", str(tiny.path), "-o", str(out), "--steps", "2")
    assert r.exit_code == 2 and "already exists" in r.output
    assert out.read_bytes() == b"precious"
    r = run("generate", "x", "--model", str(tiny.path), "-o", str(out), "--steps", "2", "--overwrite")
    assert r.exit_code == 0 and out.read_bytes()[:4] == b"\x89PNG"


def test_unwritable_output(tiny, tmp_path):
    r = run("generate", "x", "--model", str(tiny.path), "-o", str(tmp_path / "no" / "such" / "o.png"))
    assert r.exit_code == 2 and "does not exist" in r.output


def test_decode_out_of_range_ids(tiny, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((4, 4), 16))
    r = run("decode", str(bad), "--model", str(tiny.path), "-o", str(tmp_path / "o.png"))
    assert r.exit_code == 2 and "token ids must be in 0..15" in r.output
    assert not (tmp_path / "o.png").exists()
    np.save(bad, np.zeros((4, 4), dtype=np.float32))
    r = run("decode", str(bad), "--model", str(tiny.path), "-o", str(tmp_path / "o.png"))
    assert r.exit_code == 2 and "must be integers" in r.output


def test_real_process_and_module_entry(tiny, tmp_path):
    """`python -m vqdiff_cli` in a process of its own (this interpreter's, whatever PATH holds), and the installed
    `vqdiff` command, which runs the same function."""
    from importlib.metadata import entry_points

    from vqdiff_cli.cli import main

    (command,) = entry_points(group="console_scripts", name="vqdiff")
    assert command.load() is main
    out = tmp_path / "p.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vqdiff_cli",
            "generate",
            "a cat",
            "--model",
            str(tiny.path),
            "-o",
            str(out),
            "--steps",
            "3",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    r = subprocess.run(
        [sys.executable, "-m", "vqdiff_cli", "decode", str(tmp_path / "none.npy"), "--model", str(tiny.path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("native", [True, False])
def test_emulated_half_precision_on_a_cpu_is_called_out(tiny, tmp_path, monkeypatch, native):
    import torch

    import vqdiff_cli.device
    from vqdiff_cli.device import native_dtypes

    monkeypatch.setattr(vqdiff_cli.device, "cpu_runs_natively", lambda dtype: native or dtype == torch.float32)
    args = ["generate", "a cat", "--model", str(tiny.path), "--device", "cpu", "--steps", "2", "--seed", "1"]
    result = runner.invoke(app, [*args, "--dtype", "bfloat16", "-o", str(tmp_path / "bf16.png")])
    assert result.exit_code == 0, result.output
    assert ("no native bfloat16" in result.stderr) is not native
    result = runner.invoke(app, [*args, "--dtype", "float32", "-o", str(tmp_path / "fp32.png")])
    assert result.exit_code == 0 and "no native" not in result.stderr
    assert ("runs bfloat16 natively: --dtype bfloat16 is usually faster" in result.stderr) is native
    # vqdiff bench's default CPU dtypes leave emulated bfloat16 out (about 10x slower than float32)
    assert native_dtypes(torch.device("cpu")) == (("float32", "bfloat16") if native else ("float32",))
