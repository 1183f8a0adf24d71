"""`vqdiff train vqvae`: the quantizer's losses and straight-through gradient, VQGAN's adaptive weight and hinge
loss, dead-code revival, exact resume with the discriminator on, and the exported VQModel folder (diffusers decodes it
as we do; the transformer stage takes it)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vqdiff_cli.cli import app
from vqdiff_cli.errors import UsageError
from vqdiff_cli.models.vqvae import VectorQuantizer
from vqdiff_cli.train import vqvae as stage
from vqdiff_cli.train.task import LoopOptions, TrainingInterrupted

from .train_toys import colour_dataset

SMALL = {"resolution": 8, "downsample": 2, "codebook_size": 16, "embed_dim": 8, "channels": 16, "norm_groups": 4}


def options(data: Path, **kw: Any) -> stage.VQVAEStageOptions:
    return stage.VQVAEStageOptions(data=data, **{**SMALL, "layers_per_block": 1, **kw})


def loop(**kw: Any) -> LoopOptions:
    base: dict[str, Any] = {"steps": 6, "batch_size": 4, "log_every": 2, "checkpoint_every": 3, "device": "cpu"}
    return LoopOptions(**{**base, "lr": 1e-3, "beta1": 0.5, "beta2": 0.9, **kw})


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_dataset(tmp_path_factory.mktemp("toy") / "data", size=8, two_colour=True)


def test_quantize_losses_and_straight_through_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(5, 3, generator=g, requires_grad=True)
    z_e = torch.randn(2, 3, 2, 2, generator=g, requires_grad=True)
    q = stage.quantize(z_e, codebook)
    quantizer = VectorQuantizer(5, 3)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(codebook)
    assert torch.equal(q.indices, quantizer.indices(z_e.detach()))  # the very codes inference picks
    codes = codebook.detach()[q.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(q.z_q, codes)  # forward: the codes
    want = ((codes - z_e.detach()) ** 2).mean()
    torch.testing.assert_close(q.codebook_loss, want)
    torch.testing.assert_close(q.commitment_loss, want)
    (q.z_q * torch.arange(24.0).view(2, 3, 2, 2)).sum().backward()
    torch.testing.assert_close(z_e.grad, torch.arange(24.0).view(2, 3, 2, 2))  # backward: straight through
    assert codebook.grad is None  # z_q carries no gradient to the codes; only the codebook loss does
    q = stage.quantize(z_e, codebook)
    q.codebook_loss.backward()
    assert codebook.grad is not None and z_e.grad is not None


def test_hinge_loss_adaptive_weight_perplexity_psnr() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert stage.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    layer = torch.tensor([[1.0, -2.0]], requires_grad=True)
    x = torch.tensor([3.0, 1.0])
    rec, gan = (layer @ x).square().sum(), (layer @ x).sum() * 0.1  # grads: 2 (l.x) x = -2 x and 0.1 x
    weight = stage.adaptive_weight(rec, gan, layer)
    assert weight.item() == pytest.approx(2 / (0.1 + 1e-4 / math.sqrt(10)), rel=1e-6)
    assert stage.perplexity(torch.tensor([0, 1, 2, 3]), 8) == pytest.approx(4.0)
    assert stage.perplexity(torch.tensor([5, 5, 5]), 8) == pytest.approx(1.0)
    a = -torch.ones(1, 3, 4, 4)  # black
    assert stage.psnr(a, a) == math.inf
    b = a.clone()
    b[..., 0, 0] += 2 * 51 / 255  # one pixel off by 51 levels in each channel
    assert stage.psnr(a, b) == pytest.approx(10 * math.log10(16 / 0.2**2))


def test_dead_codes_take_encoder_outputs(toy_data: Path) -> None:
    from accelerate import Accelerator

    from vqdiff_cli.train.task import Run

    task = stage.build_vqvae_task(options(toy_data, revive_every=1, disc=False), 0, torch.device("cpu"))
    run = Run(Accelerator(cpu=True), loop(), Path("."), task.parts())
    task.micro_step(run, 0, 0)
    used = set(task.usage.nonzero().squeeze(1).tolist())
    assert 0 < len(used) < 16
    before = task.autoencoder.vqvae.quantize.embedding.weight.detach().clone()
    numbers = task.after_update(run, 0)
    after = task.autoencoder.vqvae.quantize.embedding.weight.detach()
    assert numbers["revived"] == 16 - len(used) and numbers["usage"] == pytest.approx(len(used) / 16)
    assert task.candidates is not None
    for code in range(16):
        if code in used:
            assert torch.equal(after[code], before[code])
        else:  # now one of the last batch's encoder outputs
            assert (task.candidates - after[code]).abs().sum(dim=1).min().item() == 0.0
    assert task.usage.sum().item() == 0


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="power of 2"):
        options(tmp_path, downsample=3)
    with pytest.raises(UsageError, match="not a multiple of --downsample"):
        options(tmp_path, resolution=12, downsample=8)
    with pytest.raises(UsageError, match="does not divide --channels"):
        options(tmp_path, norm_groups=5)
    assert options(tmp_path, downsample=4).vqvae_config().block_out_channels == (16, 32, 64)


def test_resume_with_the_discriminator_is_bit_identical(tmp_path: Path, toy_data: Path) -> None:
    o = options(toy_data, disc_start=2, revive_every=6)  # one revival, at the end: it needs the usage before Ctrl-C
    settings = loop(ema=0.8)
    stage.train_vqvae(o, settings, tmp_path / "straight")

    def ctrl_c(step: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        stage.train_vqvae(o, settings, tmp_path / "stopped", on_step=ctrl_c)
    stage.train_vqvae(o, settings, tmp_path / "stopped", resume=True)
    a = load_file(tmp_path / "straight" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "stopped" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "stopped" / "train_log.jsonl").read_text().splitlines()]
    gan = [r for r in log if "gan" in r]
    assert gan and all(r["step"] > 2 for r in gan)  # the discriminator from --disc-start on
    assert {"rec", "codebook", "perplexity", "grad_norm_vqvae", "grad_norm_discriminator"} <= gan[-1].keys()


def test_cli_exports_a_vqmodel_that_diffusers_and_the_transformer_stage_take(tmp_path: Path, toy_data: Path) -> None:
    from diffusers import VQModel

    from vqdiff_cli.train.parts import load_vqvae

    out = tmp_path / "vq"
    args = ["train", "vqvae", str(toy_data), "-o", str(out), "--device", "cpu", "--steps", "40", "--batch-size", "8"]
    args += ["--resolution", "8", "--downsample", "2", "--codebook-size", "16", "--embed-dim", "8", "--channels", "16"]
    args += [
        "--norm-groups",
        "4",
        "--layers-per-block",
        "1",
        "--lr",
        "1e-3",
        "--disc-start",
        "20",
        "--validate-every",
        "20",
    ]
    args += ["--revive-every", "10"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "dB on held-out images" in result.output
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-00000020.png", "step-00000040.png"]
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "psnr" in r] == [20, 40]
    assert any("usage" in r for r in rows) and all(r["perplexity"] >= 1 for r in rows if "perplexity" in r)
    ours, native = load_vqvae(str(out))
    assert native == 8
    reference = VQModel.from_pretrained(out).eval()
    tokens = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours.decode(tokens)
        codes = reference.quantize.get_codebook_entry(tokens.flatten(1), (2, 4, 4, 8))
        theirs = reference.decode(codes, force_not_quantize=True).sample
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
