"""`vqdiff train bench`: a training step of a small architecture with random weights, its FLOPs against the matmul
count written out by hand, LoRA against full training, and the computed memory of weights, gradients and AdamW."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vqdiff_cli.cli import app
from vqdiff_cli.config import NullEmbeddingConfig, PipelineConfig, SchedulerConfig, TransformerConfig, VQVAEConfig
from vqdiff_cli.train.bench import bench_training_step, state_bytes
from vqdiff_cli.train.export import pipeline_configs
from vqdiff_cli.train.parts import text_config

NAMES = {
    "transformer": "transformer.json",
    "vqvae": "vqvae.json",
    "scheduler": "scheduler.json",
    "learned_classifier_free_sampling_embeddings": "learned_classifier_free_sampling_embeddings.json",
    "text_encoder": "text_encoder.json",
    "model_index": "model_index.json",
}
T = TransformerConfig(33, 4, 2, 2, 16, 32, 20)  # 32 codes, 4 x 4 tokens, 2 layers of width 32


@pytest.fixture
def arch(tmp_path: Path) -> Path:
    vq = VQVAEConfig(3, 3, ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2, (32, 32), 1, 4, 32, 4, 32)
    cfg = PipelineConfig(T, vq, SchedulerConfig(33, 20), NullEmbeddingConfig(True, 32, 77), text_config(600, 32, 1))
    for key, value in pipeline_configs(cfg).items():
        (tmp_path / NAMES[key]).write_text(json.dumps(value), encoding="utf-8")
    return tmp_path


def forward_flops(cfg: TransformerConfig, batch: int, text_len: int = 77, text_dim: int = 32) -> tuple[int, int]:
    """2 x multiply-adds of one forward of the transformer: (its linear layers, its attention products)."""
    n, d, k = cfg.num_latent_pixels, cfg.inner_dim, cfg.num_vector_embeds - 1
    linear = (
        4 * n * d * d  # self-attention q, k, v, out
        + 2 * n * d * d  # cross-attention q, out
        + 2 * text_len * text_dim * d  # cross-attention k, v of the text
        + 8 * n * d * d  # feed-forward d -> 4d -> d
        + 2 * 2 * d * d  # the two adaptive norms' linear layers (one timestep embedding each)
    )
    attention = 2 * n * n * d + 2 * n * text_len * d  # scores and weighted values, self and cross
    return 2 * batch * (cfg.num_layers * linear + n * d * k), 2 * batch * cfg.num_layers * attention


def test_the_step_counts_three_forwards_of_flops_and_lora_less(arch: Path) -> None:
    full = bench_training_step(str(arch), batch_size=2, steps=1, warmup=0)
    linear, attention = forward_flops(T, 2)
    forward = linear + attention
    # a linear layer's backward costs twice its forward; attention's 2.5 times (it recomputes the scores)
    assert full.transformer_tflop_per_step * 1e12 == pytest.approx(3 * linear + 3.5 * attention, rel=1e-6)
    assert full.images_per_s > 0 and full.transformer_tflop_per_s > 0
    lora = bench_training_step(str(arch), batch_size=2, steps=1, warmup=0, lora=2)
    assert lora.trainable_parameters < full.trainable_parameters / 10
    # no weight gradients for the frozen layers: about two forwards' worth instead of three
    assert 1.5 * forward < lora.transformer_tflop_per_step * 1e12 < 2.5 * forward
    assert lora.state_gib < full.state_gib


def test_state_memory_of_ithq_full_and_lora() -> None:
    ithq = 1_359_274_624 + 63_165_952 + 39_424  # transformer, text encoder, null embedding (reference section 4)
    full = state_bytes(1_359_274_624 + 39_424, 63_165_952) / 2**30
    assert full == pytest.approx((ithq * 4 + (1_359_274_624 + 39_424) * 12) / 2**30)
    assert 20 < full < 22  # about 21.5 GiB before activations
    assert state_bytes(0, ithq) / 2**30 == pytest.approx(5.3, abs=0.05)


def test_cli(arch: Path) -> None:
    result = CliRunner().invoke(app, ["train", "bench", "--arch", str(arch), "--steps", "1", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["mode"] == "full" and record["batch_size"] == 1 and record["peak_gib"] > 0
