"""The checker reads dataset pictures right (near 100 % on every attribute at 64 and 32 px), is fooled by no picture
that contradicts its caption, and its features give a Frechet distance of ~0 for a set against itself."""

from __future__ import annotations

import numpy as np
import pytest

from vqdiff_cli.datasets import checker, shapes
from vqdiff_cli.datasets.evaluate import frechet_distance
from vqdiff_cli.datasets.shapes import ATTRIBUTES

PICTURES = 300


def _accuracy(examples: list[shapes.Example], resolution: int) -> dict[str, float]:
    seen = [checker.measure(shapes.draw(e, resolution)).attributes for e in examples]
    return {
        name: float(
            np.mean([getattr(s, name) == getattr(e.attributes, name) for s, e in zip(seen, examples, strict=True)])
        )
        for name in ATTRIBUTES
    }


@pytest.mark.parametrize("resolution", [64, 32])
def test_the_checker_reads_dataset_pictures(resolution):
    examples = [shapes.example(11, i, "all") for i in range(PICTURES)]
    accuracy = _accuracy(examples, resolution)
    assert all(v >= 0.99 for v in accuracy.values()), accuracy


def _another_colour(e: shapes.Example) -> str:
    return next(c for c in shapes.COLORS if c not in (e.attributes.color, e.attributes.background))


@pytest.mark.parametrize(
    ("attribute", "other"),
    [
        ("color", lambda e: next(c for c in shapes.COLORS if c not in (e.attributes.color, e.attributes.background))),
        (
            "background",
            lambda e: next(c for c in shapes.COLORS if c not in (e.attributes.color, e.attributes.background)),
        ),
        ("shape", lambda e: next(s for s in shapes.SHAPES if s != e.attributes.shape)),
        ("size", lambda e: "small" if e.attributes.size == "large" else "large"),
        ("position", lambda e: shapes.POSITIONS[(shapes.POSITIONS.index(e.attributes.position) + 4) % 9]),
    ],
)
def test_a_picture_that_contradicts_its_caption_fails_only_that_attribute(attribute, other):
    examples = [shapes.example(12, i, "all") for i in range(60)]
    wrong = [shapes.with_attributes(e, **{attribute: other(e)}) for e in examples]
    seen = [checker.measure(shapes.draw(w, 32)).attributes for w in wrong]
    for name in ATTRIBUTES:
        matches = np.mean(
            [getattr(s, name) == getattr(e.attributes, name) for s, e in zip(seen, examples, strict=True)]
        )
        assert matches == (0.0 if name == attribute else 1.0), (name, matches)


def test_stray_specks_do_not_move_the_object():
    examples = [e for e in (shapes.example(14, i, "all") for i in range(200)) if e.attributes.position == "top left"]
    for e in examples[:10]:
        picture = np.array(shapes.draw(e, 32))
        picture[26:30, 26:30] = e.object_rgb  # a speck of the object's colour in the far corner
        assert checker.measure(picture).attributes == e.attributes


def test_a_plain_picture_has_no_object():
    blank = np.full((32, 32, 3), shapes.PALETTE["green"], dtype=np.uint8)
    m = checker.measure(blank)
    assert m.attributes.background == "green" and m.attributes.shape == checker.NOTHING
    assert m.features.shape == (checker.FEATURES,)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 0.5
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_root = np.sqrt(np.linalg.eigvals(s_a @ s_b).real.clip(0)).sum()  # the general (non-symmetric) route
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    one = np.array([[0.0], [2.0]])  # N(1, 2) against N(4, 32): 3^2 + (sqrt 2 - sqrt 32)^2
    assert frechet_distance(one, 4 * one) == pytest.approx(9 + (2**0.5 - 32**0.5) ** 2)


def _features(examples: list[shapes.Example], resolution: int = 32) -> np.ndarray:
    return checker.scaled_features(np.stack([checker.measure(shapes.draw(e, resolution)).features for e in examples]))


def test_fid_on_checker_features_is_near_zero_for_the_same_data_and_grows_with_a_shift():
    first = _features([shapes.example(20, i, "all") for i in range(200)])
    second = _features([shapes.example(21, i, "all") for i in range(200)])
    small = _features([shapes.with_attributes(shapes.example(21, i, "all"), size="small") for i in range(200)])
    squares = _features([shapes.with_attributes(shapes.example(21, i, "all"), shape="square") for i in range(200)])
    same = frechet_distance(first, first)
    floor = frechet_distance(first, second)
    assert same == pytest.approx(0, abs=1e-9)
    assert frechet_distance(first, small) > 3 * floor
    assert frechet_distance(first, squares) > 3 * floor
