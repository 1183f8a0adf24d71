"""The quality meter: pictures made for captions whose attributes are known, scored by the checker.

For each engine (vqdiff with its sampler, and diffusers' pipeline on the same weights) it reports:
* prompt accuracy per attribute: the share of pictures whose measured attribute (checker.py) is the one the caption
  names, over the captions that name it, and the share with every named attribute right;
* FID on the checker's features: the Frechet distance between Gaussians fitted to the feature vectors of the
  generated pictures and of dataset pictures of the same captions (`checker.measure(...).features`: palette
  histogram, colours, mask moments, two-colour residual, each in units of its spread over dataset pictures; not
  Inception features, whose weights cannot be fetched here). The report also gives the floor: the distance between
  those dataset pictures and a second drawing of them (it shrinks as the number of pictures grows);
* codebook usage of the generated token grids: distinct codes, their share of the codebook and the perplexity;
* network calls (transformer forwards, each over both guidance rows) and wall time per picture (after one untimed
  picture).
The default captions are a fixed list drawn from the held-out combinations, with every attribute named.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..images import fit_square, load_rgb
from ..options import GenerateOptions, Job
from ..pipeline.pipeline import VQDiffusion
from . import checker, shapes
from .folder import LabelledCaption
from .shapes import ATTRIBUTES, EVAL_COUNT, EVAL_SEED, Attributes

FLOOR_SEED = EVAL_SEED + 1  # the second drawing of the reference pictures


@dataclass(frozen=True)
class EvalCase:
    """One picture to make: its caption and seed, the attributes the caption asks for, the full ground truth when
    known, and a dataset picture of it (the reference of the distribution distance) when there is one."""

    caption: str
    seed: int
    asked: dict[str, str]
    truth: Attributes | None = None
    reference: Image.Image | None = field(default=None, compare=False, repr=False)


def heldout_cases(count: int = EVAL_COUNT, seed: int = 0, resolution: int = 64) -> list[EvalCase]:
    """The default list: captions naming every attribute, drawn from the held-out combinations (always the same
    list; `count` takes its first pictures); picture i has seed `seed + i`."""
    cases = []
    for i in range(count):
        item = shapes.example(EVAL_SEED, i, "heldout", omit_rate=0.0)
        asked = item.attributes.as_dict()
        cases.append(EvalCase(item.caption, seed + i, asked, item.attributes, shapes.draw(item, resolution)))
    return cases


def caption_cases(rows: Sequence[LabelledCaption], seed: int = 0, resolution: int = 64) -> list[EvalCase]:
    """Cases from a metadata.jsonl's rows: the reference is the row's picture (fitted to `resolution`), else a
    drawing of its attributes when the row gives them all, else none."""
    cases = []
    for i, row in enumerate(rows):
        if row.picture is not None:
            reference: Image.Image | None = fit_square(load_rgb(row.picture), resolution)
        elif row.truth is not None:
            reference = shapes.draw(shapes.example(EVAL_SEED, i, attributes=row.truth), resolution)
        else:
            reference = None
        cases.append(EvalCase(row.text, seed + i, dict(row.asked), row.truth, reference))
    return cases


# -- engines: what makes the pictures ------------------------------------------------------------------------------


@dataclass
class Made:
    image: Image.Image
    tokens: torch.Tensor | None  # (H, W) token grid


class Engine(Protocol):
    name: str
    calls_per_image: int  # transformer forwards per picture

    def make(self, cases: Sequence[EvalCase], on_image: Callable[[Made], None]) -> list[Made]: ...


class VqdiffEngine:
    """vqdiff's pipeline with the given sampling options; picture i gets exactly its case's seed."""

    def __init__(self, pipe: VQDiffusion, options: GenerateOptions) -> None:
        self.pipe, self.options = pipe, options
        self.name = "vqdiff-fast" if pipe.uses_fast_sampler(options) else "vqdiff-reference"
        self.calls_per_image = pipe.network_calls(options)

    def make(self, cases: Sequence[EvalCase], on_image: Callable[[Made], None]) -> list[Made]:
        jobs = [Job(case.caption, case.seed, i) for i, case in enumerate(cases)]
        made = []
        for result in self.pipe.generate_iter(jobs, self.options):
            made.append(Made(result.image, result.tokens))
            on_image(made[-1])
        return made


class DiffusersEngine:
    """diffusers' VQDiffusionPipeline (built on vqdiff's weights by bench.engines.diffusers_pipeline) with its own
    `num_inference_steps` (the last steps of the chain), one picture per call with a generator seeded by the case's
    seed: at every step of the full chain on the CPU in float32 it makes vqdiff-reference's very tokens."""

    name = "diffusers"

    def __init__(self, pipeline: Any, steps: int, guidance_scale: float, truncation_rate: float) -> None:
        self.pipeline, self.calls_per_image = pipeline, steps
        self.guidance_scale, self.truncation_rate = guidance_scale, truncation_rate

    def make(self, cases: Sequence[EvalCase], on_image: Callable[[Made], None]) -> list[Made]:
        device = self.pipeline.transformer.device
        made = []
        side = self.pipeline.transformer.height
        for case in cases:
            final: list[torch.Tensor] = []  # the grid after the latest step (diffusers gives it to a callback)

            def keep(i: int, t: int, sample: torch.Tensor, into: list[torch.Tensor] = final) -> None:
                into[:] = [sample]  # only the last one is kept

            with warnings.catch_warnings():  # its deprecated pipeline warns about its own attribute accesses
                warnings.simplefilter("ignore", FutureWarning)
                images = self.pipeline(
                    case.caption,
                    num_inference_steps=self.calls_per_image,
                    guidance_scale=self.guidance_scale,
                    truncation_rate=self.truncation_rate,
                    generator=torch.Generator(device).manual_seed(case.seed),
                    callback=keep,
                ).images
            made.append(Made(images[0], final[-1][0].view(side, side).cpu() if final else None))
            on_image(made[-1])
        return made


# -- scores --------------------------------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to the rows of (N, D) and (M, D).

    tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is
    symmetric: two symmetric eigendecompositions, no general matrix square root."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least two samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = (np.atleast_2d(np.cov(x, rowvar=False)) for x in (a, b))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root_a @ s_b @ root_a
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)
    return max(distance, 0.0)


def codebook_usage(grids: Sequence[torch.Tensor], codebook_size: int) -> dict[str, float]:
    """Distinct codes in the token grids, their share of the codebook, and the perplexity exp(entropy) of their use."""
    ids = torch.cat([g.reshape(-1).long().cpu() for g in grids])
    counts = torch.bincount(ids, minlength=codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    used = int((counts > 0).sum())
    return {
        "codes_used": used,
        "codebook_size": codebook_size,
        "share": used / codebook_size,
        "perplexity": math.exp(float(-(p * p.log()).sum())),
    }


@dataclass
class Scored:
    """The checker's verdict on a set of pictures."""

    accuracy: dict[str, float | None]  # per attribute (None where no caption names it), and "all"
    images: list[dict[str, Any]]  # per picture: caption, seed, what was asked, what was seen, which were right
    features: np.ndarray  # (N, checker.FEATURES), for the FID


def score(pictures: Sequence[Image.Image], cases: Sequence[EvalCase]) -> Scored:
    """Prompt accuracy per attribute over the captions that name it, and "all": every named attribute right."""
    seen = [checker.measure(p) for p in pictures]
    right = dict.fromkeys(ATTRIBUTES, 0)
    asked = dict.fromkeys(ATTRIBUTES, 0)
    every = 0
    records = []
    for case, m in zip(cases, seen, strict=True):
        correct = {k: getattr(m.attributes, k) == v for k, v in case.asked.items()}
        for k, ok in correct.items():
            asked[k] += 1
            right[k] += ok
        every += all(correct.values())
        seen_attributes = m.attributes.as_dict()
        records.append(
            {
                "caption": case.caption,
                "seed": case.seed,
                "asked": case.asked,
                "seen": seen_attributes,
                "correct": correct,
            }
        )
    accuracy: dict[str, float | None] = {k: right[k] / asked[k] if asked[k] else None for k in ATTRIBUTES}
    accuracy["all"] = every / len(cases) if cases else None
    features = np.stack([m.features for m in seen]) if seen else np.zeros((0, checker.FEATURES))
    return Scored(accuracy, records, features)


@dataclass
class EngineScores:
    engine: str
    calls_per_image: int
    seconds_per_image: float
    accuracy: dict[str, float | None]
    fid: float | None
    codebook: dict[str, float] | None
    images: list[dict[str, Any]]


@dataclass
class EvalReport:
    count: int
    reference: dict[str, Any]  # the checker's accuracy on the dataset pictures, the FID floor, their codebook usage
    engines: list[EngineScores]
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "count": self.count,
            "checker": {"method": "measurement (vqdiff_cli/datasets/checker.py)", "features": checker.FEATURES},
            "fid_features": "the checker's feature vector (palette histogram, colours, mask moments, residual)",
            "reference": self.reference,
            "engines": [asdict(e) for e in self.engines],
            "notes": self.notes,
        }


def _fid(features: np.ndarray, reference: np.ndarray | None) -> float | None:
    if reference is None or len(features) < 2 or len(reference) < 2:
        return None
    return frechet_distance(checker.scaled_features(features), checker.scaled_features(reference))


def _reference(
    cases: Sequence[EvalCase], resolution: int, codebook_size: int, encode: Callable[[list[Image.Image]], Any] | None
) -> tuple[dict[str, Any], np.ndarray | None]:
    """What the dataset pictures of the cases score: the checker's own accuracy, the FID floor, codebook usage."""
    pictures = [c.reference for c in cases if c.reference is not None]
    if len(pictures) < len(cases):
        return {"pictures": len(pictures), "note": "not every caption has a dataset picture: no FID"}, None
    referenced = [c for c in cases if c.reference is not None]
    scored = score(pictures, referenced)
    out: dict[str, Any] = {"pictures": len(pictures), "checker_accuracy": scored.accuracy, "fid_floor": None}
    if all(c.truth is not None for c in cases):
        again = [
            shapes.draw(shapes.example(FLOOR_SEED, i, attributes=c.truth), resolution) for i, c in enumerate(cases)
        ]
        out["fid_floor"] = _fid(score(again, referenced).features, scored.features)
    if encode is not None:
        out["codebook"] = codebook_usage(encode(pictures), codebook_size)
    return out, scored.features


def evaluate(
    cases: Sequence[EvalCase],
    engines: Sequence[Engine],
    *,
    resolution: int,
    codebook_size: int,
    encode: Callable[[list[Image.Image]], Any] | None = None,
    on_made: Callable[[str, int, Made], None] | None = None,
) -> EvalReport:
    """Make a picture per case with each engine and score it. `encode` (images -> token grids) gives the codebook
    usage of the reference pictures; `on_made(engine, i, made)` receives each picture as it is made (to save it,
    or to follow progress)."""
    reference, reference_features = _reference(cases, resolution, codebook_size, encode)
    results = []
    for engine in engines:
        done = 0

        def advance(made: Made, name: str = engine.name) -> None:
            nonlocal done
            if on_made is not None:
                on_made(name, done, made)
            done += 1

        engine.make(cases[:1], lambda made: None)  # untimed: first calls pay for lazy set-up (kernels, allocations)
        started = time.perf_counter()
        made = engine.make(cases, advance)
        seconds = time.perf_counter() - started
        scored = score([m.image for m in made], cases)
        grids = [m.tokens for m in made if m.tokens is not None]
        results.append(
            EngineScores(
                engine=engine.name,
                calls_per_image=engine.calls_per_image,
                seconds_per_image=seconds / max(1, len(cases)),
                accuracy=scored.accuracy,
                fid=_fid(scored.features, reference_features),
                codebook=codebook_usage(grids, codebook_size) if grids else None,
                images=scored.images,
            )
        )
    return EvalReport(count=len(cases), reference=reference, engines=results)
