"""Fine-tuning a pipeline with `--from`: fully, or through a LoRA adapter (peft) that `vqdiff generate --lora`
merges at load time; what `--from` fixes is refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vqdiff_cli import GenerateOptions, VQDiffusion
from vqdiff_cli.checkpoint.lora import merge_lora, read_adapter
from vqdiff_cli.cli import app
from vqdiff_cli.errors import UsageError
from vqdiff_cli.images import read_png_text
from vqdiff_cli.train.run_folder import checkpoint_dirs
from vqdiff_cli.train.task import LoopOptions
from vqdiff_cli.train.transformer import TransformerStageOptions, train_transformer

from .tiny import TinyCheckpoint
from .train_toys import colour_dataset


def loop(**kw: Any) -> LoopOptions:
    return LoopOptions(**{"steps": 3, "batch_size": 2, "log_every": 1, "device": "cpu", "lr": 1e-2, **kw})


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_dataset(tmp_path_factory.mktemp("toy") / "data", size=16)


def test_full_fine_tuning_starts_from_the_model(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    out = tmp_path / "tuned"
    train_transformer(TransformerStageOptions(data=toy_data, from_model=str(tiny.path)), loop(), out)
    base = VQDiffusion.from_pretrained(tiny.path, device="cpu")
    tuned = VQDiffusion.from_pretrained(out, device="cpu")
    assert tuned.config == base.config  # the same architecture, VQ-VAE and text encoder
    vq_a, vq_b = base.components.vqvae.state_dict(), tuned.components.vqvae.state_dict()
    assert all(torch.equal(vq_a[k], vq_b[k]) for k in vq_a)
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(
            base.components.transformer.state_dict().values(),
            tuned.components.transformer.state_dict().values(),
            strict=True,
        )
    ]
    assert 0 < max(moved) < 1  # trained a little, from the model's weights
    assert base.components.text.null_embedding is not None and tuned.components.text.null_embedding is not None
    assert not torch.equal(base.components.text.null_embedding, tuned.components.text.null_embedding)


def test_what_from_fixes_is_refused(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint, tiny_unlearned: Any) -> None:
    with pytest.raises(
        UsageError, match=r"--resolution 8 gives another token grid than --from .* \(4x4 tokens, 16 px\)"
    ):
        train_transformer(
            TransformerStageOptions(data=toy_data, from_model=str(tiny.path), resolution=8), loop(), tmp_path / "a"
        )
    with pytest.raises(UsageError, match=r"is not the VQ-VAE of --from .* \(other weights\)"):
        train_transformer(
            TransformerStageOptions(data=toy_data, from_model=str(tiny.path), vqvae=str(tiny_unlearned.path)),
            loop(),
            tmp_path / "b",
        )
    with pytest.raises(UsageError, match="--layers, --width cannot change the architecture"):
        TransformerStageOptions(data=toy_data, from_model="m", layers=3, width=8)
    # the model's own VQ-VAE is welcome
    train_transformer(
        TransformerStageOptions(data=toy_data, from_model=str(tiny.path), vqvae=str(tiny.path)),
        loop(steps=1),
        tmp_path / "c",
    )


def test_lora_adapter_round_trip(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    """Only the adapter trains and is saved; merged at load time it gives what peft's adapted layers compute."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    adapter = tmp_path / "adapter"
    options = TransformerStageOptions(data=toy_data, from_model=str(tiny.path), lora=4, lora_alpha=8)
    train_transformer(options, loop(checkpoint_every=2), adapter)
    assert sorted(p.name for p in adapter.iterdir() if p.is_file()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "train_config.json",
        "train_log.jsonl",
    ]
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(tiny.path)
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(".ff.net.0.proj." in k for k in weights) and any(".attn2.to_k." in k for k in weights)
    state = torch.load(checkpoint_dirs(adapter)[-1][1] / "state.pt", weights_only=True)
    assert set(state["models"]["transformer"]) == {  # the checkpoint holds the trainable adapter only
        f"transformer.{k.replace('.weight', '.default.weight')}" for k in weights
    }
    # merged by vqdiff, against peft's layers on the base model
    base = VQDiffusion.from_pretrained(tiny.path, device="cpu").components.transformer
    merged = VQDiffusion.from_pretrained(tiny.path, device="cpu", lora=adapter).components.transformer
    peft_model = VQDiffusion.from_pretrained(tiny.path, device="cpu").components.transformer
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=config["target_modules"], lora_dropout=0.0)
    inject_adapter_in_model(lora, peft_model)
    set_peft_model_state_dict(peft_model, weights)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randint(0, 17, (2, 16), generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want, got, plain = peft_model(x_t, text, 50), merged(x_t, text, 50), base(x_t, text, 50)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max().item() > 1e-3  # the adapter does something
    half = VQDiffusion.from_pretrained(tiny.path, device="cpu", lora=adapter, lora_scale=0.0).components.transformer
    with torch.no_grad():
        torch.testing.assert_close(half(x_t, text, 50), plain)  # scale 0: the base model


def test_generate_with_lora_records_it(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    adapter = tmp_path / "adapter"
    train_transformer(TransformerStageOptions(data=toy_data, from_model=str(tiny.path), lora=2), loop(), adapter)
    image = tmp_path / "red.png"
    runner = CliRunner()
    args = ["generate", "red", "--model", str(tiny.path), "--lora", str(adapter), "--lora-scale", "0.5"]
    result = runner.invoke(app, [*args, "-o", str(image), "--seed", "3"])
    assert result.exit_code == 0, result.output
    record = json.loads(read_png_text(image)["vqdiff"])
    assert record["lora"] == str(adapter) and record["lora_scale"] == 0.5
    pipe = VQDiffusion.from_pretrained(tiny.path, device="cpu", lora=adapter, lora_scale=0.5)
    expected = pipe.generate("red", GenerateOptions(seed=3))[0].image
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")), np.asarray(expected))
    bad = runner.invoke(app, ["generate", "red", "--model", str(tiny.path), "--lora", str(tmp_path)])
    assert bad.exit_code == 2 and "not a LoRA adapter folder" in bad.output
    alone = runner.invoke(app, ["generate", "red", "--model", str(tiny.path), "--lora-scale", "2"])
    assert alone.exit_code == 2 and "--lora-scale needs --lora" in alone.output


def test_an_adapter_for_another_model_is_refused(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    from vqdiff_cli.config import TransformerConfig
    from vqdiff_cli.models.transformer import DiffusionTransformer

    adapter = tmp_path / "adapter"
    train_transformer(TransformerStageOptions(data=toy_data, from_model=str(tiny.path), lora=2), loop(steps=1), adapter)
    other = DiffusionTransformer(TransformerConfig(17, 4, 2, 2, 4, 32, 100))  # narrower
    with pytest.raises(UsageError, match="made for another model"):
        merge_lora(other, read_adapter(adapter))
