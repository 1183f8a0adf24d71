"""The shapes data: pictures drawn from (seed, index) alone, the held-out combinations, the caption grammar, and the
dataset folder `vqdiff dataset shapes` writes (alone, in threads standing for processes, and under torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vqdiff_cli.cli import app
from vqdiff_cli.datasets import shapes
from vqdiff_cli.datasets.folder import METADATA_FILE, ShapesSpec, read_captions, write_shapes
from vqdiff_cli.datasets.shapes import ATTRIBUTES, Attributes
from vqdiff_cli.distributed import Shard, World
from vqdiff_cli.errors import UsageError

runner = CliRunner()


def test_a_picture_depends_only_on_seed_and_index():
    first = shapes.example(5, 37)
    assert shapes.example(5, 37) == first
    assert np.array_equal(np.asarray(shapes.draw(first, 32)), np.asarray(shapes.draw(shapes.example(5, 37), 32)))
    others = [shapes.example(6, 37), shapes.example(5, 38)]
    assert all(o.box != first.box for o in others)


def test_the_palette_is_the_issues_with_a_small_jitter():
    assert shapes.PALETTE["red"] == (220, 40, 40) and shapes.PALETTE["gray"] == (128, 128, 128)
    examples = [shapes.example(0, i, "all") for i in range(400)]
    offsets = np.array([np.subtract(e.object_rgb, shapes.PALETTE[e.attributes.color]) for e in examples])
    assert np.abs(offsets).max() <= shapes.JITTER and len({tuple(o) for o in offsets}) > 50
    assert all(e.attributes.color != e.attributes.background for e in examples)
    picture = np.asarray(shapes.draw(examples[0], 64))
    assert tuple(picture[0, 0]) == examples[0].background_rgb  # a plain background


def test_heldout_combinations_are_a_fixed_tenth_whose_parts_all_appear_in_training():
    held = shapes.heldout_combinations()
    train = set(shapes.combinations("train"))
    every = set(shapes.combinations("all"))
    assert len(every) == 3 * 9 * 8 and len(held) == round(0.1 * len(every)) == 22
    assert set(held) == set(shapes.combinations("heldout")) and not set(held) & train and set(held) | train == every
    for s, c, b in held:  # every pair of a held-out triple is seen in training, only the triple is new
        assert any(t[:2] == (s, c) for t in train)
        assert any((t[0], t[2]) == (s, b) for t in train)
        assert any(t[1:] == (c, b) for t in train)


def test_splits_draw_only_their_combinations():
    held = set(shapes.heldout_combinations())
    assert not any(shapes.example(1, i, "train").attributes.combination in held for i in range(1500))
    assert all(shapes.example(1, i, "heldout").attributes.combination in held for i in range(300))
    assert {shapes.example(1, i, "heldout").split for i in range(50)} == {"heldout"}


def test_the_grammar_makes_the_issues_examples():
    def picks(*values: int):
        seq = iter(values)
        return lambda n: next(seq)

    red_circle = Attributes("circle", "large", "top left", "red", "blue")
    assert (
        shapes.caption(red_circle, ATTRIBUTES, picks(0, 0)) == "a large red circle at the top left on a blue background"
    )
    green = Attributes("triangle", "small", "bottom right", "green", "white")
    assert shapes.caption(green, ATTRIBUTES, picks(1)) == "small green triangle, bottom right, white background"
    blue = Attributes("square", "small", "center", "blue", "yellow")
    named = ("shape", "position", "color", "background")
    assert shapes.caption(blue, named, picks(2)) == "a blue square in the center of a yellow picture"
    assert shapes.caption(red_circle, ("shape", "color"), picks(0)) == "a red circle"


def test_captions_name_exactly_the_named_attributes():
    words = {
        "shape": shapes.SHAPES,
        "size": shapes.SIZES,
        "position": ("left", "right", "top", "bottom", "center"),
    }
    seen_forms = set()
    for i in range(600):
        e = shapes.example(2, i, omit_rate=0.3)
        a, text = e.attributes, e.caption
        tokens = set(text.replace(",", " ").split())
        seen_forms.add(text.split()[0])
        for name in ATTRIBUTES:
            value = getattr(a, name)
            if name in e.named:
                assert value in text, (text, name)
            elif name in words:
                assert not tokens & set(words[name]), (text, name)
            else:
                assert value not in tokens, (text, name)
    assert {"a", "an"} <= seen_forms and len(seen_forms) > 5  # several phrasings, with and without an article
    assert all(len(shapes.example(2, i, omit_rate=0.0).named) == 5 for i in range(50))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / METADATA_FILE).read_text().splitlines()]


def test_dataset_command_writes_images_and_metadata(tmp_path):
    out = tmp_path / "data"
    r = runner.invoke(app, ["dataset", "shapes", str(out), "--count", "30", "--seed", "3", "--resolution", "32"])
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    assert len(rows) == 30 and rows[7] == shapes.example(3, 7).row("000007.png")
    assert {"file_name", "text", *ATTRIBUTES, "named"} <= set(rows[0])
    with Image.open(out / rows[29]["file_name"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    info = json.loads((out / "dataset.json").read_text())
    assert info["count"] == 30 and len(info["heldout"]) == 22
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [r["file_name"] for r in rows] + ["dataset.json", METADATA_FILE]
    )
    captions = read_captions(out / METADATA_FILE)
    assert captions[7].truth == shapes.example(3, 7).attributes and captions[7].picture == out / "000007.png"


def test_dataset_refuses_a_folder_in_use_and_overwrite_replaces_only_its_dataset(tmp_path):
    out = tmp_path / "data"
    assert runner.invoke(app, ["dataset", "shapes", str(out), "--count", "12"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["dataset", "shapes", str(out), "--count", "5"])
    assert r.exit_code == 2 and "not empty" in r.output and "--overwrite" in r.output
    assert len(_rows(out)) == 12
    r = runner.invoke(app, ["dataset", "shapes", str(out), "--count", "5", "--overwrite", "--seed", "9"])
    assert r.exit_code == 0, r.output
    assert len(_rows(out)) == 5 and len(list(out.glob("*.png"))) == 5  # the old pictures are gone
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "--count must be at least 1"),
        (["--resolution", "4"], "--resolution must be between"),
        (["--split", "test"], "unknown split"),
        (["--omit-rate", "1"], "--omit-rate must be in"),
    ],
)
def test_dataset_bad_options_are_usage_errors(tmp_path, args, message):
    r = runner.invoke(app, ["dataset", "shapes", str(tmp_path / "d"), *args])
    assert r.exit_code == 2 and message in r.output and not (tmp_path / "d").exists()


def test_dataset_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    r = runner.invoke(app, ["dataset", "shapes", str(tmp_path / "f"), "--count", "2"])
    assert r.exit_code == 2 and "not a folder" in r.output


def test_processes_together_write_what_one_writes(tmp_path):
    spec = ShapesSpec(count=23, seed=4, resolution=16)
    write_shapes(tmp_path / "one", spec)
    gate = threading.Barrier(3)
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            write_shapes(tmp_path / "three", spec, shard=Shard(r, 3), barrier=gate.wait)
        except BaseException as e:
            errors.append(e)
            gate.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in [p.name for p in (tmp_path / "one").iterdir()]:
        if name != "dataset.json":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name


def test_shard_from_torchruns_variables():
    assert World.from_env({"RANK": "2", "WORLD_SIZE": "4"}).shard.indices(10) == range(2, 10, 4)
    assert World.from_env({}).shard == Shard(0, 1)
    with pytest.raises(UsageError):
        World.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_ctrl_c_lists_the_pictures_finished(tmp_path):
    def stop_after_five(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shapes(tmp_path / "d", ShapesSpec(count=20), on_picture=stop_after_five)
    assert [r["file_name"] for r in _rows(tmp_path / "d")] == [f"00000{i}.png" for i in range(5)]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(), reason="no torchrun"
)
def test_torchrun_processes_share_the_work(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vqdiff_cli"]
    result = subprocess.run(
        [*command, "dataset", "shapes", str(tmp_path / "two"), "--count", "9", "--resolution", "16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    write_shapes(tmp_path / "one", ShapesSpec(count=9, resolution=16))
    assert (tmp_path / "two" / METADATA_FILE).read_bytes() == (tmp_path / "one" / METADATA_FILE).read_bytes()
    for i in range(9):
        assert (tmp_path / "two" / f"00000{i}.png").read_bytes() == (tmp_path / "one" / f"00000{i}.png").read_bytes()
