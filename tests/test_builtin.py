"""Built-in model names (checkpoint/builtin.py): an installed one is the package's folder, read in place with no
cache and no network, ahead of a folder of the same name; one whose files are not installed means what any other
name means."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vqdiff_cli.checkpoint import builtin
from vqdiff_cli.checkpoint.resolve import prepare
from vqdiff_cli.cli import app

runner = CliRunner()


class Shipped(builtin.BuiltinModel):
    """A built-in model whose folder is given (the tiny checkpoint), as an installed package would hold it."""

    def __init__(self, name: str, folder: Path) -> None:
        super().__init__(name, "a test model")
        object.__setattr__(self, "_folder", folder)

    @property
    def folder(self) -> Path:
        return Path(object.__getattribute__(self, "_folder"))


@pytest.fixture
def installed(tiny, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    folder = tmp_path / "package" / "weights" / "tinyshapes"
    shutil.copytree(tiny.path, folder)
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "tinyshapes", Shipped("tinyshapes", folder))
    monkeypatch.setenv("VQDIFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return folder


def test_an_installed_name_is_its_folder_ahead_of_a_local_one(installed, tiny, tmp_path):
    (tmp_path / "tinyshapes").symlink_to(tiny.path)  # a folder of the same name in the working directory
    assert prepare("tinyshapes", device="cpu").folder == installed
    assert prepare("./tinyshapes", device="cpu").folder == (tmp_path / "tinyshapes").resolve()
    result = runner.invoke(app, ["generate", "a red ball", "--model", "tinyshapes", "--steps", "2", "-o", "a.png"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.png").is_file()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # read in place, nothing converted


def test_models_list_path_and_rm(installed):
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {"model": "tinyshapes", "builtin": True, "path": str(installed)}.items() <= records[-1].items()
    located = runner.invoke(app, ["models", "path", "tinyshapes"])
    assert located.exit_code == 0 and located.stdout.strip() == str(installed)
    removed = runner.invoke(app, ["models", "rm", "tinyshapes", "--yes"])
    assert removed.exit_code == 2 and "built into vqdiff" in removed.output
    assert (installed / "model_index.json").is_file()


def test_a_name_not_installed_means_what_any_name_means(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "tinyshapes", Shipped("tinyshapes", tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinyshapes").symlink_to(tiny.path)
    assert prepare("tinyshapes", device="cpu").folder == tiny.path.resolve()
    assert builtin.builtin_model("tinyshapes") is None
