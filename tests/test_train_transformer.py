"""`vqdiff train transformer` on toy data: the run folder, checkpoints, exact resume after Ctrl-C, the refusal of a
checkpoint made with other settings, and the exported pipeline loading in vqdiff and in diffusers with the same
tokens."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vqdiff_cli.cli import app
from vqdiff_cli.errors import OutputError, UsageError
from vqdiff_cli.train.run_folder import checkpoint_dirs
from vqdiff_cli.train.task import LoopOptions, TrainingInterrupted
from vqdiff_cli.train.transformer import TransformerStageOptions, train_transformer

from .tiny import TinyCheckpoint
from .train_toys import colour_dataset

TINY_ARCH = {"layers": 2, "width": 32, "heads": 2, "text_layers": 1, "text_width": 32, "timesteps": 100}


def stage(data: Path, vqvae: Path, **kw: Any) -> TransformerStageOptions:
    return TransformerStageOptions(data=data, vqvae=str(vqvae), train_text_encoder=True, **{**TINY_ARCH, **kw})


def loop(**kw: Any) -> LoopOptions:
    base: dict[str, Any] = {"steps": 6, "batch_size": 3, "log_every": 2, "checkpoint_every": 3, "device": "cpu"}
    return LoopOptions(**{**base, **kw})


def exported(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("transformer", "text_encoder", "learned_classifier_free_sampling_embeddings"):
        for f in (folder / component).glob("*.safetensors"):
            out.update({f"{component}/{k}": v for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_dataset(tmp_path_factory.mktemp("toy") / "data")


def test_resume_after_ctrl_c_is_bit_identical(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    """A run stopped by Ctrl-C at step 3 and resumed ends with exactly the weights of one that was not stopped (with
    an EMA, gradient accumulation, caption dropout and a text encoder trained alongside)."""
    options = stage(toy_data, tiny.path, caption_dropout=0.3)
    settings = loop(ema=0.9, grad_accum=2, checkpoint_every=2, keep=2)
    straight = train_transformer(options, settings, tmp_path / "straight")
    assert straight.steps == 6 and straight.resumed_from is None
    assert [s for s, _ in checkpoint_dirs(tmp_path / "straight")] == [4, 6]  # every 2 steps, the newest 2 kept

    def ctrl_c(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="interrupted at step 3") as e:
        train_transformer(options, settings, tmp_path / "stopped", on_step=ctrl_c)
    assert e.value.exit_code == 130
    assert [s for s, _ in checkpoint_dirs(tmp_path / "stopped")] == [2, 3]
    assert not (tmp_path / "stopped" / "model_index.json").exists()  # nothing exported yet
    resumed = train_transformer(options, settings, tmp_path / "stopped", resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    a, b = exported(tmp_path / "straight"), exported(tmp_path / "stopped")
    assert a.keys() == b.keys() and len(a) > 20
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (tmp_path / "stopped" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]  # no line twice after the resume
    assert {"loss", "vb", "aux", "lr", "grad_norm", "images_per_s"} <= log[-1].keys()
    assert (tmp_path / "stopped" / "loss.png").stat().st_size > 1000


def test_a_checkpoint_of_other_settings_is_refused(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    train_transformer(stage(toy_data, tiny.path), loop(steps=3), tmp_path / "run")
    with pytest.raises(UsageError, match=r"other settings: loop\.lr: 0\.0001 -> 0\.0002"):
        train_transformer(stage(toy_data, tiny.path), loop(steps=4, lr=2e-4), tmp_path / "run", resume=True)
    with pytest.raises(UsageError, match=r"task\.transformer\.num_layers: 2 -> 3"):
        train_transformer(stage(toy_data, tiny.path, layers=3), loop(steps=4), tmp_path / "run", resume=True)
    # what a run may change when it resumes: how long it runs and what it writes
    train_transformer(stage(toy_data, tiny.path), loop(steps=4, log_every=1, keep=1), tmp_path / "run", resume=True)


def test_the_run_folder_is_checked_first(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(OutputError, match="is not empty"):
        train_transformer(stage(toy_data, tiny.path), loop(steps=1), busy)
    with pytest.raises(UsageError, match="holds no checkpoint to resume"):
        train_transformer(stage(toy_data, tiny.path), loop(steps=1), busy, resume=True)
    train_transformer(stage(toy_data, tiny.path), loop(steps=1), busy, overwrite=True)
    assert (busy / "notes.txt").read_text(encoding="utf-8") == "mine"  # other files are left alone
    assert (busy / "model_index.json").is_file()
    with pytest.raises(OutputError, match="is not empty") as e:
        train_transformer(stage(toy_data, tiny.path), loop(steps=1), busy)
    assert e.value.hint is not None and "--resume" in e.value.hint


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"vqvae": None}, "needs --vqvae"),
        ({"train_text_encoder": False}, "choose the text encoder"),
        ({"text_encoder": "x"}, "choose the text encoder"),
        ({"lora": 4}, "give it --from"),
        ({"caption_dropout": 1.0}, "--caption-dropout must be in"),
        ({"from_model": "x", "train_text_encoder": False}, "cannot change the architecture"),
    ],
)
def test_bad_stage_options(kw: dict[str, Any], message: str, tmp_path: Path) -> None:
    base: dict[str, Any] = {"data": tmp_path, "vqvae": "vq", "train_text_encoder": True, **TINY_ARCH}
    with pytest.raises(UsageError, match=message):
        TransformerStageOptions(**{**base, **kw})


def test_export_loads_in_vqdiff_and_diffusers_with_the_same_tokens(
    tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint
) -> None:
    from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion import LearnedClassifierFreeSamplingEmbeddings
    from transformers import CLIPTextModel, CLIPTokenizer

    from vqdiff_cli import GenerateOptions, VQDiffusion

    out = tmp_path / "run"
    train_transformer(stage(toy_data, tiny.path, timesteps=12), loop(steps=4), out)
    index = json.loads((out / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "VQDiffusionPipeline"
    # diffusers: each sub-folder with its own class, the pipeline built from them (from_pretrained is broken)
    reference = VQDiffusionPipeline(
        vqvae=VQModel.from_pretrained(out, subfolder="vqvae"),
        transformer=Transformer2DModel.from_pretrained(out, subfolder="transformer"),
        text_encoder=CLIPTextModel.from_pretrained(out, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(out, subfolder="tokenizer"),
        scheduler=VQDiffusionScheduler.from_pretrained(out, subfolder="scheduler"),
        learned_classifier_free_sampling_embeddings=LearnedClassifierFreeSamplingEmbeddings.from_pretrained(
            out, subfolder="learned_classifier_free_sampling_embeddings"
        ),
    )
    reference.set_progress_bar_config(disable=True)
    ours = VQDiffusion.from_pretrained(out, device="cpu")
    assert ours.num_train_timesteps == 12
    for prompt, seed in (("red", 0), ("blue and green", 3)):
        seen: list[torch.Tensor] = []
        reference(
            prompt,
            num_inference_steps=12,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            callback=lambda i, t, s, seen=seen: seen.append(s.clone()),
        )
        got = ours.generate(prompt, GenerateOptions(seed=seed, sampler="reference"))[0]
        assert torch.equal(got.tokens.flatten(), seen[-1][0]), (prompt, seed)


def test_cli_trains_and_generate_loads_the_result(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "transformer", str(toy_data), "--vqvae", str(tiny.path), "--train-text-encoder", "-o", str(out)]
    args += ["--layers", "2", "--width", "32", "--heads", "2", "--text-layers", "1", "--text-width", "32"]
    args += ["--steps", "3", "--batch-size", "2", "--device", "cpu", "--validation-prompt", "red"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    assert (out / "validation" / "step-00000003.png").is_file()
    image = tmp_path / "red.png"
    result = runner.invoke(app, ["generate", "red", "--model", str(out), "-o", str(image), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert image.is_file()
    again = runner.invoke(app, args)  # the folder now holds a run
    assert again.exit_code == 2 and "is not empty" in again.output and "--resume" in again.output


def test_cli_names_the_extra_when_accelerate_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    result = CliRunner().invoke(app, ["train", "transformer", str(tmp_path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert 'pip install "vqdiff[train]"' in result.output


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_the_shared_folder_writer_still_writes_random_checkpoints(tmp_path: Path, fmt: str) -> None:
    """random.write_random_checkpoint and the export share write_pipeline_folder; a made-up small architecture
    (configs as the export writes them) loads strictly."""
    from vqdiff_cli.checkpoint.load import load_components
    from vqdiff_cli.checkpoint.random import write_random_checkpoint
    from vqdiff_cli.config import NullEmbeddingConfig, PipelineConfig, SchedulerConfig, TransformerConfig, VQVAEConfig
    from vqdiff_cli.train.export import pipeline_configs
    from vqdiff_cli.train.parts import text_config

    vq = VQVAEConfig(3, 3, ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2, (32, 32), 1, 4, 8, 4, 32)
    cfg = PipelineConfig(
        transformer=TransformerConfig(9, 4, 1, 2, 8, 32, 10),
        vqvae=vq,
        scheduler=SchedulerConfig(9, 10),
        null_embedding=NullEmbeddingConfig(True, 32, 77),
        text_encoder=text_config(600, 32, 1),
    )
    folder = write_random_checkpoint(tmp_path / "ckpt", configs=pipeline_configs(cfg), fmt=fmt)
    suffix = ".bin" if fmt == "bin" else ".safetensors"
    assert all(next((folder / c).glob(f"*{suffix}"), None) for c in ("transformer", "vqvae", "text_encoder"))
    loaded = load_components(folder, torch.device("cpu"), torch.float32)
    assert loaded.config.transformer == cfg.transformer and loaded.config.vqvae == vq
    assert loaded.text.null_embedding is not None


def test_a_frozen_clip_text_encoder_from_a_pipeline(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    """--text-encoder MODEL: its CLIP and tokenizer, frozen, go into the result unchanged."""
    options = TransformerStageOptions(
        data=toy_data, vqvae=str(tiny.path), text_encoder=str(tiny.path), layers=1, width=32, heads=2
    )
    out = tmp_path / "run"
    train_transformer(options, loop(steps=2), out)
    theirs = torch.load(tiny.path / "text_encoder" / "pytorch_model.bin", weights_only=True)
    mine = load_file(out / "text_encoder" / "model.safetensors")
    assert {f"text_model.{k}" for k in mine} <= set(theirs)
    assert all(torch.equal(mine[k], theirs[f"text_model.{k}"]) for k in mine)
    assert (out / "tokenizer" / "vocab.json").read_bytes() == (tiny.path / "tokenizer" / "vocab.json").read_bytes()


def test_skipped_images_are_one_warning(tmp_path: Path, tiny: TinyCheckpoint) -> None:
    data = colour_dataset(tmp_path / "data", ("red", "blue"), per_colour=2)
    (data / "broken.png").write_bytes(b"not an image")
    (data / "broken.txt").write_text("broken", encoding="utf-8")
    args = ["train", "transformer", str(data), "--vqvae", str(tiny.path), "--train-text-encoder"]
    args += ["--layers", "1", "--width", "32", "--heads", "2", "--text-layers", "1", "--text-width", "32"]
    result = CliRunner().invoke(app, [*args, "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: 1 image(s) skipped") == 1
    strict = CliRunner().invoke(app, [*args, "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "s"), "--strict"])
    assert strict.exit_code == 2 and "error: 1 image(s) skipped" in strict.output


def test_tensorboard_needs_tensorboard(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    from vqdiff_cli.train.loop import make_accelerator

    with pytest.raises(UsageError, match="--report-to tensorboard needs tensorboard"):
        make_accelerator(loop(report_to="tensorboard"), tmp_path)


def test_bf16_mixed_precision_trains_on_a_cpu(tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint) -> None:
    result = train_transformer(stage(toy_data, tiny.path), loop(steps=2, mixed_precision="bf16"), tmp_path / "run")
    assert result.steps == 2
    assert all(torch.isfinite(v).all() for v in exported(tmp_path / "run").values())


def test_ctrl_c_in_the_command_writes_a_checkpoint_and_exits_130(
    tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint
) -> None:
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "vqdiff_cli", "train", "transformer", str(toy_data), "--vqvae", str(tiny.path)]
    args += ["--train-text-encoder", "--layers", "1", "--width", "32", "--heads", "2", "--text-layers", "1"]
    args += ["--text-width", "32", "--steps", "100000", "--log-every", "1", "--device", "cpu", "-o", str(out)]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_log.jsonl").is_file() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    assert checkpoint_dirs(out), "no checkpoint written"


def test_bad_loop_options() -> None:
    from vqdiff_cli.train.loop import make_accelerator

    for kw, message in [
        ({"steps": 0}, "--steps must be at least 1"),
        ({"lr": -1.0}, "--lr must be positive"),
        ({"ema": 1.0}, "--ema must be between 0 and 1"),
        ({"mixed_precision": "fp8"}, "unknown --mixed-precision 'fp8'"),
        ({"device": "tpu"}, "unknown --device 'tpu'"),
        ({"report_to": "wandb"}, "unknown --report-to 'wandb'"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            LoopOptions(**kw)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="sees no CUDA device"):
            make_accelerator(LoopOptions(device="cuda"), Path("."))


def test_a_tokenizer_from_captions_pads_to_the_longest_caption(tmp_path: Path) -> None:
    """Rounded up to a multiple of 8 with the start and end tokens, at most CLIP's 77."""
    from vqdiff_cli.train.parts import build_tokenizer

    short = build_tokenizer(tmp_path / "short", ["a red ball", "a large blue square at the top left"])
    assert short.model_max_length == 16  # 9 tokens with start and end
    long = build_tokenizer(tmp_path / "long", [" ".join(["word"] * 200)])
    assert long.model_max_length == 77
    again = build_tokenizer(tmp_path / "again", ["a red ball"])
    assert again.model_max_length == 8 and len(again(["a red ball"]).input_ids[0]) == 5


def test_a_fresh_transformer_reads_its_text_at_the_image_scale(
    tmp_path: Path, toy_data: Path, tiny: TinyCheckpoint
) -> None:
    """Cross-attention keys and values start sqrt(text width) larger than the other weights (unit-norm text states)."""
    out = tmp_path / "run"
    train_transformer(stage(toy_data, tiny.path), loop(steps=1), out)
    weights = exported(out)
    k = weights["transformer/transformer_blocks.0.attn2.to_k.weight"].std()
    q = weights["transformer/transformer_blocks.0.attn2.to_q.weight"].std()
    assert 0.7 * (32**0.5) < float(k / q) < 1.4 * (32**0.5)
    config = json.loads((out / "learned_classifier_free_sampling_embeddings" / "config.json").read_text())
    tok = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["length"] == tok["model_max_length"] < 77
