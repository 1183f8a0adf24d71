"""Training data on disk (train/data.py): both caption layouts, every error path, skipped images, the batch order and
the token cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff_cli.errors import UsageError
from vqdiff_cli.train import data


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def captioned(folder: Path, name: str, colour: tuple[int, int, int], caption: str, **kw: object) -> Path:
    path = solid(folder / name, colour, **kw)  # type: ignore[arg-type]
    path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def test_text_file_captions_in_subfolders(tmp_path: Path) -> None:
    captioned(tmp_path, "a.png", (255, 0, 0), "red")
    captioned(tmp_path, "sub/b.jpg", (0, 0, 255), "blue")
    images = data.load_images(tmp_path, 8)
    assert sorted(images.captions) == ["blue", "red"]
    assert images.pixels.shape == (2, 3, 8, 8) and images.pixels.dtype == torch.uint8
    assert images.skipped == []


def test_metadata_jsonl_with_another_caption_column(tmp_path: Path) -> None:
    solid(tmp_path / "x.png", (0, 255, 0))
    solid(tmp_path / "unlisted.png", (0, 0, 0))  # only the files metadata.jsonl names are used
    rows = [{"file_name": "x.png", "text": "ignored", "prompt": "green"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert data.load_images(tmp_path, 16, caption_column="prompt").captions == ["green"]
    assert data.load_images(tmp_path, 16).captions == ["ignored"]
    with pytest.raises(UsageError, match="no text field 'caption'") as e:
        data.load_images(tmp_path, 16, caption_column="caption")
    assert e.value.hint is not None and "--caption-column" in e.value.hint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"file_name": "x.png", "text": "ok"}\nnot json\n', "line 2: not JSON"),
        ('["x.png"]\n', "line 1: not a JSON object"),
        ('{"text": "no name"}\n', "line 1: no 'file_name'"),
        ('{"file_name": "x.png", "text": 3}\n', "line 1: no text field 'text'"),
        (
            '{"file_name": "x.png", "text": "ok"}\n{"file_name": "gone.png", "text": "a"}\n',
            "captions for 1 file\\(s\\) that do not exist in .*: gone.png",
        ),
    ],
)
def test_bad_metadata_is_one_error(tmp_path: Path, text: str, message: str) -> None:
    solid(tmp_path / "x.png", (1, 2, 3))
    (tmp_path / "metadata.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        data.load_images(tmp_path, 16)


def test_captions_for_missing_files_in_the_text_layout(tmp_path: Path) -> None:
    captioned(tmp_path, "a.png", (255, 0, 0), "red")
    (tmp_path / "ghost.txt").write_text("a ghost", encoding="utf-8")
    with pytest.raises(UsageError, match=r"NAME\.txt caption files gives captions for 1 file.*ghost\.txt"):
        data.load_images(tmp_path, 16)
    # the VQ-VAE stage needs no captions: stray text files do not matter there
    assert len(data.load_images(tmp_path, 16, need_captions=False)) == 1


@pytest.mark.parametrize("make", ["missing", "file", "empty", "only-text"])
def test_no_images_at_all(tmp_path: Path, make: str) -> None:
    root = tmp_path / "data"
    if make == "file":
        root.write_text("x", encoding="utf-8")
    elif make != "missing":
        root.mkdir()
        if make == "only-text":
            (root / "notes.md").write_text("hello", encoding="utf-8")
    want = {"missing": "data folder not found", "file": "is not a folder"}.get(make, "has no image files")
    with pytest.raises(UsageError, match=want):
        data.load_images(root, 16)


def broken_images(root: Path) -> None:
    captioned(root, "good.png", (10, 200, 30), "good")
    (root / "garbage.png").write_bytes(b"this is not a png at all")
    (root / "garbage.txt").write_text("garbage", encoding="utf-8")
    full = root / "full.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full)
    (root / "truncated.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (root / "truncated.txt").write_text("cut", encoding="utf-8")
    full.unlink()
    captioned(root, "tiny.png", (0, 0, 0), "tiny", size=(4, 4))
    solid(root / "uncaptioned.png", (5, 5, 5))


def test_unusable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    broken_images(tmp_path)
    images = data.load_images(tmp_path, 16)
    assert images.captions == ["good"]
    reasons = {s.path.name: s.reason for s in images.skipped}
    assert set(reasons) == {"garbage.png", "truncated.png", "tiny.png", "uncaptioned.png"}
    assert reasons["tiny.png"].startswith("too small (4x4 for 16 px)")
    assert reasons["uncaptioned.png"] == "no caption"
    summary = data.describe_skipped(images.skipped, tmp_path)
    assert summary.startswith("4 image(s) skipped (")
    assert "1 too small" in summary and "1 no caption" in summary
    with pytest.raises(UsageError, match="4 image\\(s\\) skipped") as e:
        data.load_images(tmp_path, 16, strict=True)
    assert e.value.hint is not None and "--strict" in e.value.hint


def test_no_usable_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    (tmp_path / "bad.txt").write_text("bad", encoding="utf-8")
    with pytest.raises(UsageError, match="has no usable image: 1 image\\(s\\) skipped"):
        data.load_images(tmp_path, 16)


def test_resize_and_centre_crop(tmp_path: Path) -> None:
    picture = np.zeros((20, 60, 3), dtype=np.uint8)  # wide: left third red, middle green, right third blue
    picture[:, :20] = (255, 0, 0)
    picture[:, 20:40] = (0, 255, 0)
    picture[:, 40:] = (0, 0, 255)
    Image.fromarray(picture).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("stripes", encoding="utf-8")
    pixels = data.load_images(tmp_path, 10).pixels[0]  # shorter side 20 -> 10, then the middle 10 x 10
    assert pixels.shape == (3, 10, 10)
    centre = pixels[:, :, 2:8].float().mean(dim=(1, 2))
    assert centre[1] > 240 and centre[0] < 15 and centre[2] < 15


def test_batches_cover_each_epoch_once_and_straddle_epochs() -> None:
    first = data.batch_indices(10, 4, 0, seed=3) + data.batch_indices(10, 4, 1, seed=3)
    straddling = data.batch_indices(10, 4, 2, seed=3)  # places 8..11: two of epoch 0, two of epoch 1
    assert sorted(first + straddling[:2]) == list(range(10))
    assert straddling[2:] == data.epoch_order(10, 1, 3)[:2].tolist()
    assert data.batch_indices(10, 4, 5, seed=3) == data.batch_indices(10, 4, 5, seed=3)
    assert data.epoch_order(10, 0, 3).tolist() != data.epoch_order(10, 1, 3).tolist()
    # one global batch of 4 equals two ranks' consecutive halves of it: what data-parallel training relies on
    assert data.batch_indices(10, 4, 7, seed=1)[:2] + data.batch_indices(10, 4, 7, seed=1)[2:] == (
        data.batch_indices(10, 4, 7, seed=1)
    )


def test_holdout_split() -> None:
    train, held = data.holdout_split(40, 0.1, seed=0)
    assert len(held) == 4 and sorted(train + held) == list(range(40))
    assert data.holdout_split(40, 0.1, seed=0) == (train, held)
    assert data.holdout_split(1, 0.5, seed=0) == ([0], [])
    assert len(data.holdout_split(3, 0.9, seed=0)[0]) == 1  # always something left to train on


def test_token_cache_is_keyed_by_weights_resolution_and_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    captioned(root, "a.png", (255, 0, 0), "red")
    captioned(root, "b.png", (0, 0, 255), "blue")
    cache = tmp_path / "cache"
    calls: list[tuple[int, ...]] = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:  # a stand-in VQ-VAE: red channel > 0 -> token 1
        calls.append(tuple(pixels.shape))
        factor = 4
        red = pixels[:, 0, ::factor, ::factor] > 0
        return red.long()

    tokens, hit = data.cached_tokens(cache, root, 8, "weights-1", encode)
    assert not hit and calls == [(2, 3, 8, 8)]
    assert dict(zip(tokens.captions, tokens.tokens.tolist(), strict=True)) == {"red": [1] * 4, "blue": [0] * 4}
    again, hit = data.cached_tokens(cache, root, 8, "weights-1", encode)
    assert hit and len(calls) == 1 and torch.equal(again.tokens, tokens.tokens)
    (root / "a.txt").write_text("crimson", encoding="utf-8")  # captions are read afresh, tokens stay cached
    again, hit = data.cached_tokens(cache, root, 8, "weights-1", encode)
    assert hit and sorted(again.captions) == ["blue", "crimson"]
    _, hit = data.cached_tokens(cache, root, 16, "weights-1", encode)  # another resolution
    assert not hit
    _, hit = data.cached_tokens(cache, root, 8, "weights-2", encode)  # other VQ-VAE weights
    assert not hit
    solid(root / "a.png", (250, 0, 0))  # the image changed
    os.utime(root / "a.png", ns=(1, 1))
    _, hit = data.cached_tokens(cache, root, 8, "weights-1", encode)
    assert not hit
    assert len(calls) == 4


def test_state_digest_sees_every_byte() -> None:
    state = {"w": torch.zeros(3), "b": torch.ones(2)}
    base = data.state_digest(state)
    assert data.state_digest({"b": torch.ones(2), "w": torch.zeros(3)}) == base
    changed = {"w": torch.tensor([0.0, 0.0, 1e-30]), "b": torch.ones(2)}
    assert data.state_digest(changed) != base
