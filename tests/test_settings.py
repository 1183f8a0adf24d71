"""cli/settings.py: the one resolver and its records. Flags map onto settings by key explicitly (SettingFlags), a
command's own default stands in for the built-in one without touching the resolved record, and the defaults of
settings, commands and options are the options' own."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from vqdiff_cli.cli import app
from vqdiff_cli.cli.settings import SETTINGS, SettingFlags, load
from vqdiff_cli.options import GenerateOptions, InpaintOptions


@pytest.fixture(autouse=True)
def no_config(tmp_path, monkeypatch):
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "config.toml"))
    for setting in SETTINGS.values():
        if setting.env:
            monkeypatch.delenv(setting.env, raising=False)


def test_every_setting_has_a_flag_and_no_flag_lacks_a_setting():
    assert [f.name for f in dataclasses.fields(SettingFlags)] == list(SETTINGS)


def test_a_commands_own_default_is_a_default_and_the_record_is_frozen():
    resolved = load(SettingFlags(steps=3), defaults={"output": "x-{seed}.png"})
    assert resolved["output"] == "x-{seed}.png" and resolved.sources["output"] == "default"
    assert resolved["steps"] == 3 and resolved.sources["steps"] == "flag"
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.values = {}  # type: ignore[misc]
    assert load(SettingFlags())["output"] == SETTINGS["output"].default


def test_defaults_come_from_the_options():
    assert SETTINGS["guidance"].default == GenerateOptions.guidance_scale
    assert SETTINGS["truncation"].default == GenerateOptions.truncation_rate
    assert SETTINGS["batch_size"].default == GenerateOptions.batch_size
    r = CliRunner().invoke(app, ["inpaint", "--help"], env={"COLUMNS": "200"})
    assert f"[default: {InpaintOptions.mask_mode}]" in r.stdout and f"[default: {InpaintOptions.feather}]" in r.stdout
    r = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert f"[default: {GenerateOptions.guidance_scale}]" in r.stdout
