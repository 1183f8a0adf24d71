"""`vqdiff eval`: the scoring on known pictures (dataset pictures ~100 %, wrong colours 0 %), and the command end to
end on a tiny random checkpoint (whose scores mean nothing): a well-formed report, every sampling flag reaching the
sampler, and diffusers on the full chain making vqdiff-reference's very pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqdiff_cli.cli import app
from vqdiff_cli.datasets import shapes
from vqdiff_cli.datasets.evaluate import EvalCase, Made, codebook_usage, evaluate, heldout_cases, score
from vqdiff_cli.datasets.shapes import ATTRIBUTES

runner = CliRunner()


def _cases(n: int, resolution: int = 32) -> list[EvalCase]:
    return heldout_cases(n, seed=0, resolution=resolution)


def test_the_default_list_is_fixed_and_held_out():
    cases = _cases(20)
    assert [c.caption for c in _cases(8)] == [c.caption for c in cases[:8]]
    held = set(shapes.heldout_combinations())
    assert all(c.truth is not None and c.truth.combination in held for c in cases)
    assert all(set(c.asked) == set(ATTRIBUTES) for c in cases)
    assert [c.seed for c in heldout_cases(3, seed=7)] == [7, 8, 9]


def test_dataset_pictures_score_full_marks_and_wrong_colours_none():
    cases = _cases(60)
    right = score([c.reference for c in cases], cases)
    assert right.accuracy == {**dict.fromkeys(ATTRIBUTES, 1.0), "all": 1.0}
    examples = [shapes.example(shapes.EVAL_SEED, i, "heldout", omit_rate=0.0) for i in range(60)]
    assert [e.caption for e in examples] == [c.caption for c in cases]  # the list is these examples
    recoloured = []
    for e in examples:
        other = next(c for c in shapes.COLORS if c not in (e.attributes.color, e.attributes.background))
        recoloured.append(shapes.draw(shapes.with_attributes(e, color=other), 32))
    wrong = score(recoloured, cases)
    assert wrong.accuracy["color"] == 0.0 and wrong.accuracy["all"] == 0.0
    assert all(wrong.accuracy[k] == 1.0 for k in ATTRIBUTES if k != "color")
    assert wrong.images[0]["correct"]["color"] is False and wrong.images[0]["asked"] == cases[0].asked


def test_only_the_named_attributes_are_scored():
    case = _cases(1)[0]
    partial = EvalCase("a red thing", 0, {"color": case.asked["color"]}, case.truth, case.reference)
    result = score([case.reference], [partial])
    assert result.accuracy["color"] == 1.0 and result.accuracy["shape"] is None


class Oracle:
    """An engine that returns the dataset picture of each caption: perfect marks, and no distance to the reference."""

    name = "oracle"
    calls_per_image = 0

    def make(self, cases, on_image):
        made = [Made(c.reference, None) for c in cases]
        for m in made:
            on_image(m)
        return made


def test_an_engine_that_returns_dataset_pictures_scores_perfectly():
    cases = _cases(30)
    saved = []
    report = evaluate(cases, [Oracle()], resolution=32, codebook_size=16, on_made=lambda e, i, m: saved.append(i))
    (oracle,) = report.engines
    assert oracle.accuracy == {**dict.fromkeys(ATTRIBUTES, 1.0), "all": 1.0}
    assert oracle.fid == pytest.approx(0, abs=1e-9) and oracle.codebook is None
    assert report.reference["checker_accuracy"]["all"] == 1.0 and report.reference["fid_floor"] > 0.1
    assert saved == list(range(30))
    assert json.loads(json.dumps(report.to_json()))["engines"][0]["engine"] == "oracle"


def test_codebook_usage():
    grids = [torch.tensor([[0, 1], [1, 1]]), torch.tensor([[3, 3], [3, 3]])]
    usage = codebook_usage(grids, 8)
    assert usage["codes_used"] == 3 and usage["share"] == 3 / 8
    p = np.array([1, 3, 4]) / 8
    assert usage["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def _eval(tiny, *args: str) -> dict:
    r = runner.invoke(app, ["eval", "--model", str(tiny.path), "--device", "cpu", "--json", "-q", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_eval_runs_end_to_end_on_a_tiny_checkpoint(tiny, tmp_path):
    report = _eval(
        tiny, "--count", "3", "--steps", "4", "-g", "3", "-t", "0.9", "--seed", "5", "-o", str(tmp_path / "r.json")
    )
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert report["count"] == 3 and report["settings"]["seed"] == 5
    assert report["settings"]["timesteps"] == [99, 66, 33, 0]
    assert report["settings"]["guidance"] == 3.0 and report["settings"]["truncation"] == 0.9
    assert report["settings"]["resolution"] == 16
    ref = report["reference"]
    assert ref["pictures"] == 3 and ref["codebook"]["codebook_size"] == 16 and ref["fid_floor"] >= 0
    (engine,) = report["engines"]
    assert engine["engine"] == "vqdiff-reference" and engine["calls_per_image"] == 4
    assert set(engine["accuracy"]) == {*ATTRIBUTES, "all"}
    assert all(0 <= v <= 1 for v in engine["accuracy"].values())
    assert engine["fid"] >= 0 and 1 <= engine["codebook"]["codes_used"] <= 16 and engine["seconds_per_image"] > 0
    cases = heldout_cases(3, seed=5, resolution=16)
    assert [i["caption"] for i in engine["images"]] == [c.caption for c in cases]
    assert [i["seed"] for i in engine["images"]] == [5, 6, 7]


def test_eval_samples_as_generate_does_with_the_same_flags(tiny, tmp_path):
    flags = ["--stride", "40", "--sampler", "fast", "-g", "2.5", "-t", "0.8", "--seed", "3"]
    report = _eval(tiny, "--count", "2", *flags, "-b", "2", "--save-images", str(tmp_path))
    assert report["engines"][0]["engine"] == "vqdiff-fast"
    assert report["settings"]["timesteps"] == [99, 59, 19, 0] and report["engines"][0]["calls_per_image"] == 4
    assert report["settings"]["batch_size"] == 2
    first = report["engines"][0]["images"][0]["caption"]
    args = ["generate", first, "--model", str(tiny.path), "--device", "cpu", *flags, "-o", str(tmp_path / "g.png")]
    assert runner.invoke(app, args).exit_code == 0
    made, generated = (np.asarray(Image.open(tmp_path / n)) for n in ("vqdiff-fast-0000.png", "g.png"))
    assert np.array_equal(made, generated)


def test_diffusers_on_the_full_chain_makes_the_same_pictures(tiny, tmp_path):
    folder = tmp_path / "pictures"
    report = _eval(tiny, "--count", "2", "--sampler", "reference", "--vs-diffusers", "--save-images", str(folder))
    ours, theirs = report["engines"]
    assert (ours["engine"], theirs["engine"]) == ("vqdiff-reference", "diffusers")
    assert ours["calls_per_image"] == theirs["calls_per_image"] == 100
    for i in range(2):
        assert (folder / f"vqdiff-reference-000{i}.png").read_bytes() == (folder / f"diffusers-000{i}.png").read_bytes()
    again = runner.invoke(app, ["eval", "--model", str(tiny.path), "--count", "1", "--save-images", str(folder)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert ours["images"] == theirs["images"] and ours["codebook"] == theirs["codebook"]
    assert ours["fid"] == pytest.approx(theirs["fid"])


def test_eval_reads_captions_from_a_dataset(tiny, tmp_path):
    data = tmp_path / "data"
    assert runner.invoke(app, ["dataset", "shapes", str(data), "--count", "5", "--resolution", "16"]).exit_code == 0
    report = _eval(tiny, "--captions", str(data / "metadata.jsonl"), "--count", "4", "--steps", "2")
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (engine,) = report["engines"]
    assert [i["caption"] for i in engine["images"]] == [r["text"] for r in rows[:4]]
    assert [set(i["asked"]) for i in engine["images"]] == [set(r["named"]) for r in rows[:4]]
    assert report["reference"]["pictures"] == 4 and report["count"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--captions", "nowhere.jsonl"], "captions file not found"),
        (["--count", "0"], "--count must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--steps", "3", "--stride", "2"], "not both"),
    ],
)
def test_eval_bad_input_is_refused_before_loading(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "no-model"), *args])
    assert r.exit_code == 2 and message in r.output


def test_eval_names_the_bad_line_of_a_captions_file(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"text": "a red circle", "color": "red"}\n{"text": "x", "color": "teal"}\n')
    r = runner.invoke(app, ["eval", "--captions", str(bad), "--model", str(tmp_path)])
    assert r.exit_code == 2 and "line 2" in r.output and "teal" in r.output
