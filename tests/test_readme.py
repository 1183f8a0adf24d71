"""The README is part of the product: its command examples run, its Python example runs, and CI runs its test
command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from vqdiff_cli.cli import app

from .conftest import start_hub

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def vqdiff_lines(hub: bool) -> list[str]:
    """The `vqdiff ...` lines of the console blocks that fetch from the Hub (`hub`), or of the others."""
    return [
        line
        for block in blocks("console")
        if ("vqdiff download" in block) == hub
        for line in block.splitlines()
        if line.startswith("vqdiff ")
    ]


def run_lines(lines: list[str]) -> None:
    runner = CliRunner()
    for line in lines:
        result = runner.invoke(app, shlex.split(line, comments=True)[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"


def test_ci_runs_the_readme_test_command():
    quickstart = README.split("## Quickstart", 1)[1].split("## ", 1)[0]
    commands = [b.strip() for b in re.findall(r"```console\n(.*?)```", quickstart, flags=re.DOTALL)]
    assert len(commands) == 2  # one to install and run, one to install and test
    test_command = commands[1]
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.replace("pip install -q ", "pip install ")  # CI only quiets pip


def test_command_examples_run(tiny, tmp_path, monkeypatch):
    lines = vqdiff_lines(hub=False)
    assert len(lines) >= 12
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQDIFF_MODEL", str(tiny.path))
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("VQDIFF_DEVICE", "cpu")  # the examples run on the CPU on any machine
    (tmp_path / "tiny").symlink_to(tiny.path)  # the README's `--model tiny` examples
    (tmp_path / "prompts.txt").write_text("# prompts for the README example\na red ball\n\na cat in a hat\n")
    paint_mask(tmp_path / "bear-mask.png")
    run_lines(lines)
    assert (tmp_path / "bear-again.png").is_file()
    assert (tmp_path / "bear-ball.png").is_file()
    assert (tmp_path / "tokens.png").is_file()
    assert (tmp_path / "jigsaw.gif").is_file()


def test_model_command_examples_run(hub_folder, tmp_path, monkeypatch):
    """The download / models examples, against the stand-in Hub serving the tiny checkpoint under the real name."""
    lines = vqdiff_lines(hub=True)
    assert any(line.startswith("vqdiff models rm") for line in lines)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "config.toml"))
    server = start_hub(monkeypatch, tmp_path, {("microsoft/vq-diffusion-ithq", "main"): hub_folder})
    try:
        run_lines(lines)
    finally:
        server.stop()
    assert (tmp_path / "bear.png").is_file()


def paint_mask(path: Path) -> None:
    """A mask for the README's bear.png: the tiny model's images are 16 px squares."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (16, 16), 0)
    ImageDraw.Draw(mask).rectangle((4, 4, 10, 10), fill=255)
    mask.save(path)


def test_python_examples_run(tiny, tmp_path, monkeypatch):
    code = "\n".join(blocks("python"))
    assert '"microsoft/vq-diffusion-ithq"' in code
    monkeypatch.chdir(tmp_path)
    paint_mask(tmp_path / "bear-mask.png")
    namespace: dict[str, object] = {}
    exec(compile(code.replace('"microsoft/vq-diffusion-ithq"', repr(str(tiny.path))), "README.md", "exec"), namespace)
    assert (tmp_path / "bear-api.png").is_file()
    assert namespace["inpainted"].image.size == (16, 16)


def test_the_config_keys_listed_are_the_settings():
    listed = README.split("with any of the keys ", 1)[1].split(". ", 1)[0]
    from vqdiff_cli.cli.settings import SETTINGS

    assert re.findall(r"`(\w+)`", listed) == list(SETTINGS)


def test_config_file_example_works(tiny, tmp_path, monkeypatch):
    """The README's TOML example, as a config file: its keys are read and its `~/pictures` output is where images go
    (the model and device it names are overridden, since neither exists here)."""
    (config,) = blocks("toml")
    home = tmp_path / "home"
    (home / "pictures").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text(config, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show"])
    assert shown.exit_code == 0, shown.output
    assert "/data/models/vq-diffusion-ithq" in shown.stdout and "bfloat16" in shown.stdout
    args = ["generate", "a red ball", "--seed", "1", "--steps", "1", "--model", str(tiny.path), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert (home / "pictures" / "a-red-ball-1.png").is_file()
