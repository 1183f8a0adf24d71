"""The checker: what a shapes picture shows, measured from its pixels (no learned weights), and its feature vector.

The method, step by step:
1. background colour: each border pixel votes for its nearest palette entry; the majority wins, and the background's
   RGB is the mean of the border pixels that voted for it;
2. object pixels: those farther than OBJECT_DISTANCE from that RGB. The object colour is the majority vote (nearest
   palette entry other than the background's) of the object pixels farthest from the background (its inside, not
   its blended edge);
3. the object's soft mask: each pixel's coverage alpha in [0, 1], its projection on the line from the background's
   RGB to the object's; kept only around the largest connected blob (stray specks of a generated picture count not);
4. position: the cell of a 3x3 grid holding the mask's centroid; size: the mask's extent (the larger of its soft
   width and height: the sums of the column and row maxima of alpha) against SIZE_THRESHOLD, a fraction of the side;
5. shape, from the mask's moments about its centroid, which stay accurate on small, antialiased shapes where a
   bounding box does not: the upward triangle is the one skewed along y (mu03 / mu02^1.5: -0.57; circle and square
   0); of the others, the square's x and y spreads are independent (E[x^2 y^2] / (E[x^2] E[y^2]) = 1) and the
   circle's are not (2/3). The thresholds lie midway between the values measured on dataset pictures.

`features` is the vector the quality meter's Frechet distance compares: the share of pixels nearest to each palette
entry (9), the background and object RGB (6), the mask's area, centroid, soft width and height, fill ratio,
normalised second moments, vertical skew and x-y spread ratio (10), and how badly a two-colour picture explains the
pixels (2). `feature_scale` is each feature's spread over dataset pictures: the distance divides by it, so that
every feature counts alike whatever its unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from ..images import to_rgb
from .shapes import COLORS, PALETTE, POSITIONS, Attributes

OBJECT_DISTANCE = 40.0  # RGB distance from the background beyond which a pixel belongs to the object (palette: >= 70)
CORE_SHARE = 0.7  # object pixels at least this share of the 90th percentile distance vote for its colour
SIZE_THRESHOLD = 0.225  # extents: small 0.15..0.19, large 0.26..0.30 of the side
TRIANGLE_SKEW = -0.27  # vertical skew below it: a triangle (-0.57; at 32 px -0.46..-0.68, others within 0.09)
SQUARE_SPREAD = 0.83  # E[x^2 y^2] / (E[x^2] E[y^2]) above it: a square (1.0), else a circle (2/3; at 32 px <= 0.72)
RESIDUAL_LIMIT = 30.0  # a pixel this far from the two-colour model of the picture is "unexplained"
NOTHING = "none"  # the attributes of an object the checker cannot find
FEATURES = 27
SCALE_PICTURES = 400  # dataset pictures (the `all` split, 32 px, seed SCALE_SEED) that set the features' scale
SCALE_SEED = 0
SCALE_FLOOR = 0.02  # no feature's scale below it: the residuals, ~0 on dataset pictures, would swamp the rest

_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)  # (9, 3)


@dataclass(frozen=True)
class Measurement:
    """What the checker saw in one picture: the attributes, and the measurements they were read from."""

    attributes: Attributes
    features: np.ndarray  # (FEATURES,) float64
    area: float  # the object's mask area, a fraction of the picture
    extent: float  # the larger of the mask's soft width and height, a fraction of the side
    fill: float  # mask area over soft width x height
    skew: float  # vertical skew of the mask, mu03 / mu02^1.5
    spread: float  # E[x^2 y^2] / (E[x^2] E[y^2]) of the mask


def nearest_colors(pixels: np.ndarray, exclude: int | None = None) -> np.ndarray:
    """(M, 3) RGB -> (M,) each pixel's nearest palette entry (an index into COLORS), optionally never `exclude`."""
    distance = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1)  # (M, 9)
    if exclude is not None:
        distance[:, exclude] = np.inf
    return np.asarray(distance.argmin(1))


def _majority(indices: np.ndarray) -> int:
    return int(np.bincount(indices, minlength=len(COLORS)).argmax())


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask: labels spread as minima until they settle."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        spread = np.where(mask, neighbours, big)
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels[mask], minlength=big)
    return np.asarray(labels == counts.argmax())


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.asarray(np.logical_or.reduce([padded[i : i + h, j : j + w] for i in range(3) for j in range(3)]))


def _to_array(picture: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(picture, Image.Image):
        picture = np.asarray(to_rgb(picture))
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB picture, got shape {picture.shape}")
    return picture.astype(np.float64)


def measure(picture: Image.Image | np.ndarray) -> Measurement:
    """The attributes of a shapes picture (PIL or (H, W, 3) uint8), and its feature vector."""
    px = _to_array(picture)
    h, w, _ = px.shape
    flat = px.reshape(-1, 3)
    # 1. the background: the border's majority colour
    ring = max(1, round(min(h, w) / 32))
    border = np.concatenate(
        [px[:ring].reshape(-1, 3), px[-ring:].reshape(-1, 3), px[:, :ring].reshape(-1, 3), px[:, -ring:].reshape(-1, 3)]
    )
    votes = nearest_colors(border)
    bg = _majority(votes)
    b = border[votes == bg].mean(0)
    histogram = np.bincount(nearest_colors(flat), minlength=len(COLORS)) / len(flat)
    # 2. the object's pixels and colour
    dist = np.linalg.norm(px - b, axis=-1)  # (H, W)
    candidate = dist > OBJECT_DISTANCE
    if not candidate.any():
        return _nothing(COLORS[bg], histogram, b, px)
    core = candidate & (dist >= CORE_SHARE * np.percentile(dist[candidate], 90))
    core_votes = nearest_colors(px[core], exclude=bg)
    obj = _majority(core_votes)
    o = px[core][core_votes == obj].mean(0)
    # 3. its soft mask, around the largest blob
    v = o - b
    alpha = np.clip(((px - b) @ v) / max(float(v @ v), 1e-9), 0.0, 1.0)  # (H, W)
    alpha = alpha * _grow(_largest_blob(alpha > 0.5)) if (alpha > 0.5).any() else alpha * candidate
    area = float(alpha.sum())
    if area <= 0:
        return _nothing(COLORS[bg], histogram, b, px)
    # 4. position and size
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    col, row = min(2, int(3 * cx / w)), min(2, int(3 * cy / h))
    width, height = float(alpha.max(0).sum()), float(alpha.max(1).sum())
    extent = max(width / w, height / h)
    size = "large" if extent > SIZE_THRESHOLD else "small"
    # 5. shape, from central moments (pixel units)
    dx, dy = xs - cx, ys - cy
    var_x, var_y = (max(float((alpha * d**2).sum() / area), 1e-9) for d in (dx, dy))
    skew = float((alpha * dy**3).sum() / area) / var_y**1.5
    spread = float((alpha * dx**2 * dy**2).sum() / area) / (var_x * var_y)
    shape = "triangle" if skew < TRIANGLE_SKEW else "square" if spread > SQUARE_SPREAD else "circle"
    attributes = Attributes(shape, size, POSITIONS[3 * row + col], COLORS[obj], COLORS[bg])
    # features: the mask's geometry, and how well background + alpha * (object - background) explains the pixels
    fill = area / max(width * height, 1e-9)
    residual = np.linalg.norm(px - (b + alpha[..., None] * v), axis=-1)
    moments = [10 * var_x / (w * w), 10 * var_y / (h * h), skew / 2, spread]
    geometry = [area / (h * w), cx / w, cy / h, width / w, height / h, fill, *moments]
    clean = [float(residual.mean()) / 255, float((residual > RESIDUAL_LIMIT).mean())]
    features = np.array([*histogram, *(b / 255), *(o / 255), *geometry, *clean], dtype=np.float64)
    return Measurement(attributes, features, area / (h * w), extent, fill, skew, spread)


def _nothing(background: str, histogram: np.ndarray, b: np.ndarray, px: np.ndarray) -> Measurement:
    """No object found: only the background is known; the features say "a plain picture"."""
    residual = np.linalg.norm(px - b, axis=-1)
    clean = [float(residual.mean()) / 255, float((residual > RESIDUAL_LIMIT).mean())]
    features = np.array([*histogram, *(b / 255), *(b / 255), *([0.0] * 10), *clean], dtype=np.float64)
    return Measurement(Attributes(NOTHING, NOTHING, NOTHING, NOTHING, background), features, 0.0, 0.0, 0.0, 0.0, 0.0)


@cache
def feature_scale() -> np.ndarray:
    """(FEATURES,) each feature's standard deviation over SCALE_PICTURES dataset pictures, at least SCALE_FLOOR."""
    from .shapes import draw, example

    pictures = (draw(example(SCALE_SEED, i, "all"), 32) for i in range(SCALE_PICTURES))
    features = np.stack([measure(p).features for p in pictures])
    return np.asarray(np.maximum(features.std(0), SCALE_FLOOR))


def scaled_features(features: np.ndarray) -> np.ndarray:
    """(N, FEATURES) features in units of `feature_scale`: what the Frechet distance compares."""
    return np.asarray(features / feature_scale())
