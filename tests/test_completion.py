"""Shell completion scripts: current with the app, valid, and completing what the app has."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vqdiff_cli.cli import app, completion

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shell", completion.SHELLS)
def test_completion_files_are_current(shell):
    path = ROOT / "completions" / completion.FILES[shell]
    assert path.read_text(encoding="utf-8") == completion.script(shell, completion.command_tree(app)), (
        f"{path} is stale: run python scripts/completions.py"
    )


def test_value_choices_match_the_code():
    from vqdiff_cli.device import DTYPES
    from vqdiff_cli.options import (
        DEVICES,
        DTYPE_CHOICES,
        KNOWN_MODES,
        MASK_MODES,
        REVEALS,
        SAMPLERS,
        STRIDE_MODES,
        VARIANTS,
    )

    assert ("auto", *DTYPES) == DTYPE_CHOICES  # the torch dtypes behind the choices

    flags = ("--device", "--dtype", "--variant", "--mask-mode", "--known", "--sampler", "--reveal", "--stride-mode")
    choices = (DEVICES, DTYPE_CHOICES, VARIANTS, MASK_MODES, KNOWN_MODES, SAMPLERS, REVEALS, STRIDE_MODES)
    assert dict(zip(flags, choices, strict=True)) == completion.VALUE_CHOICES


def test_file_options_and_arguments_are_known():
    tree = dict(completion._flat(completion.command_tree(app)))
    paths = {path: {n for o in node.options if o.is_path for n in o.names} for path, node in tree.items()}
    assert {"--mask", "--output", "-o"} <= paths["inpaint"]
    assert {"--from-image", "--prompts-file", "--save-steps"} <= paths["generate"]
    assert "--steps" not in paths["generate"] and "--model" not in paths["generate"]  # a repo id is no file
    assert tree["encode"].path_arguments and tree["inpaint"].path_arguments
    assert not tree["generate"].path_arguments  # its argument is the prompt


def _bash_complete(words: list[str]) -> list[str]:
    script = ROOT / "completions" / "vqdiff.bash"
    quoted = " ".join(f"'{w}'" for w in words)
    cmd = (
        f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); _vqdiff; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout
    return out.split()


def test_bash_completes_file_names_after_file_options(tmp_path, monkeypatch):
    (tmp_path / "mask.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert _bash_complete(["vqdiff", "inpaint", "photo.png", "--mask", "ma"]) == ["mask.png"]
    assert _bash_complete(["vqdiff", "generate", "a cat", "--steps", "ma"]) == []


def test_bash_completes_commands_options_and_values():
    assert "generate" in _bash_complete(["vqdiff", "ge"])
    assert _bash_complete(["vqdiff", "generate", "--stri"]) == ["--stride", "--stride-mode"]
    assert _bash_complete(["vqdiff", "generate", "a cat", "--dtype", "bf"]) == ["bfloat16"]
    assert _bash_complete(["vqdiff", "config", "p"]) == ["path"]
    assert _bash_complete(["vqdiff", "completion", ""]) == list(completion.SHELLS)
    # the value after --model is not mistaken for a command
    assert _bash_complete(["vqdiff", "encode", "--model", "generate", "--keep"]) == ["--keep-size"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes():
    script = ROOT / "completions" / "vqdiff.fish"
    out = subprocess.run(
        ["fish", "-c", f"source {script}; complete -C 'vqdiff generate --dev'"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("--device")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script_parses():
    subprocess.run(["zsh", "-n", str(ROOT / "completions" / "_vqdiff")], check=True)


def test_completion_command_prints_the_script():
    from typer.testing import CliRunner

    from vqdiff_cli.cli import app

    r = CliRunner().invoke(app, ["completion", "fish"])
    assert r.exit_code == 0
    assert r.stdout == completion.script("fish", completion.command_tree(app))
    r = CliRunner().invoke(app, ["completion", "tcsh"])
    assert r.exit_code == 2
