"""The README's "Train your own" and "Fine-tune ITHQ" examples run, at a tiny size: each `vqdiff` line as written,
with flags appended that make the models and the run small (a repeated option takes its last value), on toy data
drawn here, and the tiny checkpoint in place of microsoft/vq-diffusion-ithq."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vqdiff_cli.cli import app

from .tiny import TinyCheckpoint
from .train_toys import colour_dataset

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
SMALL = {
    "vqvae": "--resolution 8 --downsample 2 --codebook-size 16 --embed-dim 8 --channels 16 --norm-groups 4"
    " --layers-per-block 1 --steps 6 --disc-start 3 --batch-size 4 --device cpu",
    "transformer": "--layers 1 --width 32 --heads 2 --text-layers 1 --text-width 32 --steps 3 --validate-every 3"
    " --batch-size 2 --device cpu",
    "from": "--steps 2 --batch-size 2 --device cpu --mixed-precision no",
    "generate": "",
}


def section_lines(title: str) -> list[str]:
    section = README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```shell\n(.*?)```", section, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("vqdiff ")]


def run(lines: list[str], replace: dict[str, str]) -> None:
    runner = CliRunner()
    for line in lines:
        args = shlex.split(line)[1:]
        kind = "from" if "--from" in args else args[1] if args[0] == "train" else args[0]
        args = [replace.get(a, a) for a in args] + SMALL[kind].split()
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{line}\n{result.output}"


@pytest.mark.slow
def test_train_your_own_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = section_lines("Train your own")
    assert [shlex.split(x)[1] for x in lines] == ["train", "train", "generate"]
    monkeypatch.chdir(tmp_path)
    colour_dataset(tmp_path / "icons", size=8)
    run(lines, {})
    assert (tmp_path / "icons-vq" / "config.json").is_file()
    assert (tmp_path / "icons-model" / "validation" / "step-00000003.png").is_file()
    assert (tmp_path / "star.png").is_file()


def test_fine_tune_ithq_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: TinyCheckpoint) -> None:
    lines = section_lines("Fine-tune ITHQ")
    assert len(lines) == 3
    monkeypatch.chdir(tmp_path)
    colour_dataset(tmp_path / "my-photos", size=16)
    run(lines, {"microsoft/vq-diffusion-ithq": str(tiny.path)})
    assert (tmp_path / "my-lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "dog.png").is_file()
    assert (tmp_path / "my-ithq" / "model_index.json").is_file()
