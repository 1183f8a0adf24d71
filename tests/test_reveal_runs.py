"""Budgeted reveals and the original fast mode, run end to end on the tiny checkpoint (16 tokens, T = 100): what a
purity run's trajectory shows, the network calls, the same tokens alone and in a batch in both samplers,
inpainting's known tokens, the original fast mode's large last step, and the command line (metadata, --from-image,
--dry-run, errors)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff_cli import GenerateOptions, InpaintOptions
from vqdiff_cli.models.transformer import DiffusionTransformer

from .test_cli import cli, one_line_error  # noqa: F401  (the fixture, and the helper)

MASK, TOKENS = 16, 16


def expected_budgets(cumprod_ct: np.ndarray, timesteps: tuple[int, ...], masked: int) -> list[int]:
    """The derivation of vqdiff_cli/diffusion/reveal.py, written out: targets floor(M gbar_s / gbar_t0 + 1/2),
    nothing left after the step before the last."""
    left = [masked] + [math.floor(masked * cumprod_ct[s] / cumprod_ct[timesteps[0]] + 0.5) for s in timesteps[1:-1]]
    left.append(0)
    return [left[i] - left[i + 1] for i in range(len(timesteps) - 1)]


def check_trajectory(trajectory: torch.Tensor, timesteps: tuple[int, ...], budgets: list[int]) -> None:
    """(steps + 1, N): every step but the last reveals exactly its budget of masked positions and changes nothing
    else; nothing is masked before the last step (which draws every position) or after it."""
    grids = trajectory.reshape(trajectory.shape[0], -1)
    for i in range(len(timesteps) - 1):
        before, after = grids[i], grids[i + 1]
        shown = before != MASK
        assert torch.equal(after[shown], before[shown]), f"a revealed token changed at t = {timesteps[i]}"
        assert int((before == MASK).sum() - (after == MASK).sum()) == budgets[i], timesteps[i]
    assert (grids[-2] != MASK).all() and (grids[-1] != MASK).all()


@pytest.mark.parametrize("sampler", ["reference", "fast"])
@pytest.mark.parametrize(
    ("reveal", "extra"),
    [("purity", {}), ("random", {"tokens_per_call": 1}), ("purity", {"steps": 12, "purity_weight": 0.0})],
    ids=["purity", "random-1-per-call", "purity-weight0-12-steps"],
)
def test_a_budgeted_run_reveals_its_budgets_and_never_changes_a_revealed_token(tiny_pipe, sampler, reveal, extra):
    options = GenerateOptions(seed=5, sampler=sampler, reveal=reveal, guidance_scale=3.0, **extra)
    out = tiny_pipe.generate("a red ball", options, trajectory=True)[0]
    check_trajectory(out.trajectory, out.timesteps, expected_budgets(tiny_pipe.schedule.cumprod_ct, out.timesteps, 16))


def test_the_trajectory_file_of_a_purity_run(cli, tmp_path):  # noqa: F811
    r = cli("generate", "a cat", "--purity", "--tokens-per-call", "2", "--seed", "3", "--trajectory", "t.npy")
    assert r.exit_code == 0, r.output
    trajectory = torch.from_numpy(np.load(tmp_path / "t.npy"))[:, 0]  # (steps + 1, H, W) of the one image
    from vqdiff_cli.config import SchedulerConfig
    from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule

    c = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=17)).cumprod_ct
    timesteps = tuple(range(99, -1, -1))
    check_trajectory(trajectory, timesteps, expected_budgets(c, timesteps, 16))


def count_calls(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    real = DiffusionTransformer.logits

    def counting(self, x_t, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(x_t.shape[0])
        return real(self, x_t, *args, **kwargs)

    monkeypatch.setattr(DiffusionTransformer, "logits", counting)
    return calls


@pytest.mark.parametrize("sampler", ["reference", "fast"])
@pytest.mark.parametrize("per_call", [None, 1, 3])
def test_tokens_per_call_sets_the_network_calls(tiny_pipe, monkeypatch, sampler, per_call):
    """A step of budget b makes ceil(b / n) calls (none for b = 0), the final step one; a batch of two images
    makes them once, for both (both halves of guidance in each call)."""
    options = GenerateOptions(seed=1, sampler=sampler, reveal="purity", steps=10, tokens_per_call=per_call)
    timesteps = options.timesteps(100)
    budgets = expected_budgets(tiny_pipe.schedule.cumprod_ct, timesteps, 16)
    expected = sum(-(-b // (per_call or 16)) for b in budgets) + 1
    calls = count_calls(monkeypatch)
    out = tiny_pipe.generate("a cat", GenerateOptions(**{**options.__dict__, "num_images": 2, "batch_size": 2}))
    assert len(calls) == expected and set(calls) == {4}
    assert out[0].network_calls == expected == tiny_pipe.network_calls(options)
    if per_call == 1:
        assert expected == 16 + 1  # one call per token


RUNS = [
    ("purity-3-per-call", {"reveal": "purity", "tokens_per_call": 3, "steps": 20}),
    ("random", {"reveal": "random"}),
    ("original-stride-10", {"stride": 10, "stride_mode": "original"}),
]


@pytest.mark.parametrize("sampler", ["reference", "fast"])
@pytest.mark.parametrize(("name", "extra"), RUNS, ids=[r[0] for r in RUNS])
def test_an_image_alone_equals_the_image_in_a_batch(tiny_pipe, sampler, name, extra):
    batch = tiny_pipe.generate(
        ["a cat", "a dog"], GenerateOptions(seed=40, num_images=2, batch_size=3, sampler=sampler, **extra)
    )
    assert not torch.equal(batch[0].tokens, batch[1].tokens)
    for r in batch:
        alone = tiny_pipe.generate(r.prompt, GenerateOptions(seed=r.seed, sampler=sampler, **extra))[0]
        assert torch.equal(alone.tokens, r.tokens), r.seed


@pytest.fixture
def photo() -> Image.Image:
    y, x = np.mgrid[0:16, 0:16]
    return Image.fromarray(np.stack([x * 15, y * 15, (x + y) * 7], axis=-1).astype("uint8"))


@pytest.mark.parametrize("sampler", ["reference", "fast"])
def test_variations_alone_equal_in_a_batch_with_their_own_budgets(tiny_pipe, photo, sampler):
    """Each image of a variation batch starts with its own number of masked tokens (its start draw), so its own
    budgets: the batch makes the calls of the neediest, and the others are left as they are by the extra calls."""
    options = GenerateOptions(seed=50, sampler=sampler, reveal="purity", tokens_per_call=1)
    batch = tiny_pipe.vary(
        photo, "a cat", 0.7, GenerateOptions(**{**options.__dict__, "num_images": 4, "batch_size": 4})
    )
    for r in batch:
        alone = tiny_pipe.vary(photo, "a cat", 0.7, GenerateOptions(**{**options.__dict__, "seed": r.seed}))[0]
        assert torch.equal(alone.tokens, r.tokens), r.seed
        assert alone.network_calls <= r.network_calls


def test_a_variation_of_strength_one_is_generation_under_purity(tiny_pipe, photo):
    options = GenerateOptions(seed=8, reveal="purity", tokens_per_call=2)
    varied = tiny_pipe.vary(photo, "a hat", 1.0, options)[0]
    made = tiny_pipe.generate("a hat", options)[0]
    assert torch.equal(varied.tokens, made.tokens)


@pytest.mark.parametrize("sampler", ["reference", "fast"])
@pytest.mark.parametrize("known", ["restore", "renoise"])
def test_inpainting_never_reveals_a_known_token(tiny_pipe, photo, sampler, known):
    """Only regenerated positions are candidates: with restore the known ones never change; in both modes the
    regenerated positions still masked drop by exactly the budget, from the regenerated count, at every step."""
    mask = np.zeros((16, 16), dtype=bool)
    mask[:, :8] = True  # the left half: 8 of the 16 tokens
    options = GenerateOptions(seed=2, sampler=sampler, reveal="purity", tokens_per_call=1)
    setup = tiny_pipe.prepare_inpaint(photo, mask, InpaintOptions(known=known))
    out = tiny_pipe.inpaint(photo, mask, "a cat", options, InpaintOptions(known=known), trajectory=True)[0]
    grids = out.trajectory.reshape(out.trajectory.shape[0], -1)
    regen = setup.regenerate.flatten()
    if known == "restore":
        assert (grids[:, ~regen] == setup.tokens.flatten()[~regen]).all()
    budgets = expected_budgets(tiny_pipe.schedule.cumprod_ct, out.timesteps, int(regen.sum()))
    masked = (grids[:, regen] == MASK).sum(1).tolist()
    assert masked[0] == int(regen.sum()) == 8
    assert [masked[i] - masked[i + 1] for i in range(len(budgets))] == budgets
    assert out.network_calls == tiny_pipe.network_calls(options, start=setup.start_step, masked=8)


@pytest.mark.parametrize("sampler", ["reference", "fast"])
def test_the_original_fast_mode_leaves_most_tokens_to_the_last_step_at_stride_10(tiny_pipe, sampler):
    """At stride 10 the original's approximation leaves about two thirds of the tokens masked for the final t = 0
    step (shared/reference/vq-diffusion.md section 7.3: about 66%); the exact posterior leaves about gamma-bar_0 /
    gamma-bar_9 = 1e-4 of them."""
    masked_before_last = {}
    for mode in ("original", "exact"):
        options = GenerateOptions(seed=0, num_images=24, batch_size=24, stride=10, stride_mode=mode, sampler=sampler)
        runs = tiny_pipe.generate("a dog", options, trajectory=True)
        assert runs[0].timesteps == (99, 89, 79, 69, 59, 49, 39, 29, 19, 9, 0)
        masked_before_last[mode] = float(np.mean([(r.trajectory[-2] == MASK).float().mean() for r in runs]))
    assert 0.5 < masked_before_last["original"] < 0.8, masked_before_last
    assert masked_before_last["exact"] < 0.02, masked_before_last


# -- the command line ---------------------------------------------------------------------------------------------


def test_the_settings_go_into_the_metadata_and_from_image_reproduces_them(cli, tmp_path):  # noqa: F811
    from vqdiff_cli.images import read_png_text

    args = ("--purity", "--purity-weight", "2.5", "--tokens-per-call", "3", "--steps", "30", "--seed", "7")
    assert cli("generate", "a red ball", *args, "-o", "a.png", "--save-tokens", "a.npy").exit_code == 0
    record = json.loads(read_png_text(tmp_path / "a.png")["vqdiff"])
    assert {k: record[k] for k in ("reveal", "purity_weight", "tokens_per_call", "stride_mode")} == {
        "reveal": "purity",
        "purity_weight": 2.5,
        "tokens_per_call": 3,
        "stride_mode": "exact",
    }
    assert record["network_calls"] > 1
    assert "purity r=2.5 3 tokens/call" in read_png_text(tmp_path / "a.png")["parameters"]
    (tmp_path / "config.toml").write_text('tokens_per_call = 1\nreveal = "random"\n')  # the image wins over these
    r = cli("generate", "--from-image", "a.png", "-o", "b.png", "--save-tokens", "b.npy")
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    again = json.loads(read_png_text(tmp_path / "b.png")["vqdiff"])
    assert {k: again[k] for k in record if k not in ("vqdiff_version",)} == {
        k: record[k] for k in record if k not in ("vqdiff_version",)
    } | {"index": again["index"]}
    # the original fast mode and the unlimited default are recorded too
    (tmp_path / "config.toml").unlink()
    assert cli("generate", "a cat", "--stride", "10", "--stride-mode", "original", "-o", "c.png").exit_code == 0
    r = cli("generate", "--from-image", "c.png", "--dry-run", "--json")
    settings = json.loads(r.stdout)["settings"]
    assert settings["stride_mode"] == {"value": "original", "source": "image"}
    assert settings["tokens_per_call"] == {"value": 0, "source": "image"}


def test_dry_run_counts_the_network_calls(cli, tmp_path, photo):  # noqa: F811
    r = cli("generate", "a cat", "--dry-run")
    assert "network calls: 100 per batch (100 timesteps)" in r.stdout
    r = cli("generate", "a cat", "--purity", "--tokens-per-call", "2", "--steps", "10", "--dry-run", "--json")
    planned = json.loads(r.stdout)
    options = GenerateOptions(reveal="purity", tokens_per_call=2, steps=10)
    timesteps = options.timesteps(100)
    from vqdiff_cli.config import SchedulerConfig
    from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule

    c = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=17)).cumprod_ct
    expected = sum(-(-b // 2) for b in expected_budgets(c, timesteps, 16)) + 1
    assert planned["network_calls"] == expected and planned["timesteps"] == 10
    photo.save(tmp_path / "p.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    r = cli("inpaint", "p.png", "--mask", "m.png", "--purity", "--tokens-per-call", "1", "--dry-run", "--json")
    assert json.loads(r.stdout)["network_calls"] == 8 + 1  # 8 regenerated tokens, one per call, and the final call
    r = cli("vary", "p.png", "--strength", "0.5", "--purity", "--dry-run")
    assert "network calls: about" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--reveal", "greedy"), "unknown --reveal 'greedy'"),
        (("--purity", "--reveal", "random"), "--purity is --reveal purity; it contradicts --reveal random"),
        (("--tokens-per-call", "4"), "--tokens-per-call applies to a budgeted reveal"),
        (("--purity", "--tokens-per-call", "-1"), "--tokens-per-call must be 0 (no limit) or more"),
        (("--purity-weight", "2"), "--purity-weight applies to the purity reveal"),
        (("--purity", "--purity-weight", "-1"), "--purity-weight must be between 0 and 100"),
        (("--purity", "--stride-mode", "original"), "--stride-mode original changes the posterior"),
        (("--stride-mode", "approximate"), "unknown --stride-mode 'approximate'"),
    ],
)
def test_bad_reveal_settings_are_one_line_errors(cli, args, message):  # noqa: F811
    r = cli("generate", "a cat", "--dry-run", *args)
    assert r.exit_code == 2, r.output
    assert message in one_line_error(r)


def test_a_config_value_that_conflicts_says_where_it_came_from(cli, tmp_path):  # noqa: F811
    (tmp_path / "config.toml").write_text("tokens_per_call = 4\n")
    error = one_line_error(cli("generate", "a cat", "--dry-run"))
    assert "--tokens-per-call applies to a budgeted reveal" in error and "tokens_per_call from config" in error
    assert cli("generate", "a cat", "--dry-run", "--purity").exit_code == 0


def test_eval_counts_the_calls_of_a_budgeted_reveal(tiny, tmp_path):
    from typer.testing import CliRunner

    from vqdiff_cli.cli import app

    args = ["eval", "--model", str(tiny.path), "--count", "2", "--purity", "--tokens-per-call", "4", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["settings"]["reveal"] == "purity" and report["settings"]["tokens_per_call"] == 4
    assert report["engines"][0]["calls_per_image"] == sum(-(-b // 4) for b in [1] * 16) + 1 == 17
