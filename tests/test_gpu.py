"""The CUDA paths on a real GPU: parity with diffusers, the fast sampler (graphs, compile, batches), inpainting, the
step loop's freedom from host syncs, the shared graph memory pool, and `vqdiff bench`'s replayed step.

Every test here is marked `gpu` and skipped without CUDA (tests/conftest.py); `benchmarks/gpu_check.sh` runs them on
the GPU machine. `VQDIFF_GPU_TESTS_DEVICE=cpu` runs them on the CPU instead, to check that they run at all: the
checks only a GPU can make (sync debug mode, real captures, memory pools) are then left out, and it proves nothing
about CUDA. What is promised on a GPU (README, "Metadata, info and re-runs"): the noise of an image is the same alone
or in a batch; its tokens are the same for the same batch size (and GPU, dtype, versions), not across batch sizes.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqdiff_cli import GenerateOptions, InpaintOptions, VQDiffusion
from vqdiff_cli.cli import app
from vqdiff_cli.diffusion.streams import seed_words, uniforms
from vqdiff_cli.options import Job, batch_around

pytestmark = pytest.mark.gpu
PROMPT = "a teddy bear in the pool"


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device(os.environ.get("VQDIFF_GPU_TESTS_DEVICE", "cuda"))


def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def load(tiny, device: torch.device, dtype: str = "float16", **acceleration) -> VQDiffusion:  # type: ignore[no-untyped-def]
    return VQDiffusion.from_pretrained(tiny.path, device=str(device), dtype=dtype, **acceleration)


def tokens(results) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [r.tokens.flatten().tolist() for r in results]


# -- parity with diffusers --------------------------------------------------------------------------------------


def _diffusers_on(tiny, device: torch.device):  # type: ignore[no-untyped-def]
    """diffusers' pipeline on copies of the tiny modules (the CPU tests keep using the originals)."""
    from diffusers import VQDiffusionPipeline

    pipe = VQDiffusionPipeline(
        vqvae=copy.deepcopy(tiny.vqvae),
        text_encoder=copy.deepcopy(tiny.text_encoder),
        tokenizer=tiny.tokenizer,
        transformer=copy.deepcopy(tiny.transformer),
        scheduler=copy.deepcopy(tiny.scheduler),
        learned_classifier_free_sampling_embeddings=copy.deepcopy(tiny.null),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_reference_sampler_gives_diffusers_tokens_on_the_gpu_in_float32(tiny, device, guidance):
    """The same ops in the same order, and the same CUDA generator per image: diffusers' tokens on the GPU too."""
    ours = load(tiny, device, "float32")
    ref = _diffusers_on(tiny, device)
    for seed in (0, 7):
        got = ours.generate(PROMPT, GenerateOptions(seed=seed, guidance_scale=guidance, sampler="reference"))[0]
        seen: list[torch.Tensor] = []
        ref(
            PROMPT,
            generator=torch.Generator(device).manual_seed(seed),
            guidance_scale=guidance,
            output_type="np",
            callback=lambda i, t, s, seen=seen: seen.append(s.clone()),
        )
        assert torch.equal(got.tokens.flatten(), seen[-1][0].cpu()), f"seed {seed}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_transformer_log_probs_are_close_to_diffusers_in_half_precision(tiny, device, dtype):
    ours = load(tiny, device, dtype)
    theirs = copy.deepcopy(tiny.transformer).to(device, getattr(torch, dtype))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tiny.spec.num_codes + 1, (3, tiny.spec.sample_size**2), generator=g).to(device)
    context = torch.randn(3, 77, tiny.spec.text_width, generator=g).to(device, getattr(torch, dtype))
    with torch.inference_mode():
        for t in (0, 42, 99):
            mine = ours.components.transformer(x, context, t)
            ref = theirs(x, encoder_hidden_states=context, timestep=torch.tensor(t, device=device)).sample.float()
            torch.testing.assert_close(mine.exp(), ref.exp(), rtol=0, atol=2e-2)


# -- the fast sampler -------------------------------------------------------------------------------------------


def test_the_noise_stream_is_the_same_on_the_gpu(device):
    words = seed_words([0, 5, 2**62 + 9], "cpu")
    here = uniforms(words, torch.tensor(12), (1024, 4))
    there = uniforms(words.to(device), torch.tensor(12, device=device), (1024, 4))
    assert torch.equal(here, there.cpu())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fast_sampler_on_the_gpu_reproduces_for_the_same_batch(tiny, device, dtype):
    """Run to run, and for one image re-run in its rebuilt batch (--same-batch); graph replays give eager's tokens;
    no fallback. Alone against in a batch is not promised here (cuBLAS picks kernels by shape)."""
    pipe = load(tiny, device, dtype)
    options = GenerateOptions(seed=20, num_images=3, batch_size=3, sampler="fast", steps=20, truncation_rate=0.9)
    first = pipe.generate(PROMPT, options)
    assert tokens(pipe.generate(PROMPT, options)) == tokens(first)
    again = [r for r in pipe.generate(batch_around(Job(PROMPT, 21, 0), 3, 1), options) if r.seed == 21]
    assert tokens(again) == tokens(first[1:2])
    eager = load(tiny, device, dtype, cuda_graphs=False).generate(PROMPT, options)
    assert tokens(eager) == tokens(first)
    assert pipe.acceleration_notes == []
    if on_cuda(device):
        (session,) = pipe.fast_sessions._sessions.values()
        assert session.runner.cuda_graphs and sorted(session.runner._graphs) == [False, True]
        assert isinstance(session.runner._stream, torch.cuda.Stream)


def test_fast_and_reference_samplers_agree_in_distribution_on_the_gpu(tiny, device):
    pipe = load(tiny, device, "float32")
    counts = {}
    for sampler in ("reference", "fast"):
        options = GenerateOptions(seed=100, num_images=32, batch_size=16, sampler=sampler, steps=4)
        grids = torch.stack([r.tokens for r in pipe.generate(PROMPT, options)])
        counts[sampler] = torch.bincount(grids.flatten(), minlength=16).double()
    ref, fast = counts["reference"], counts["fast"]
    chi2 = ((ref - fast) ** 2 / (ref + fast).clamp(min=1)).sum().item()
    assert chi2 < 15 + 8 * 30**0.5, (ref, fast)


@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_the_step_loop_never_syncs_with_the_host_on_the_gpu(tiny, device, monkeypatch, sampler):
    """torch.cuda's sync debug mode raises on any synchronising call (a device value read, a copy from pageable
    host memory, nonzero) during every step, with either sampler (CUDA graphs off: capturing synchronises)."""
    import vqdiff_cli.diffusion.sampler as reference
    from vqdiff_cli.diffusion.fast import denoise_fast

    loop = denoise_fast if sampler == "fast" else reference.denoise
    steps: list[int] = []

    def guarded(*args) -> Iterator[torch.Tensor]:  # type: ignore[no-untyped-def]
        chain = loop(*args)
        while True:
            if on_cuda(device):
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                x = next(chain, None)
            finally:
                if on_cuda(device):
                    torch.cuda.set_sync_debug_mode("default")
            if x is None:
                return
            steps.append(1)
            yield x

    monkeypatch.setattr(f"vqdiff_cli.pipeline.pipeline.{loop.__name__}", guarded)
    pipe = load(tiny, device, "float16" if sampler == "fast" else "float32", cuda_graphs=False)
    options = GenerateOptions(seed=4, num_images=2, batch_size=2, sampler=sampler, steps=6, truncation_rate=0.9)
    pipe.generate(PROMPT, options)
    picture = Image.fromarray(np.full((16, 16, 3), 120, dtype=np.uint8))
    mask = np.zeros((16, 16), dtype=bool)
    mask[:8] = True
    pipe.inpaint(picture, mask, PROMPT, options, InpaintOptions(known="renoise"))
    assert len(steps) >= 8


def test_both_graphs_share_one_memory_pool(device, monkeypatch):
    """The final-step graph is captured on the step graph's stream into its pool, so it reuses the blocks the first
    capture freed: it adds far less reserved memory than the first (on a fresh stream it would add about as much).
    A model with ITHQ's 1024 tokens and 4097 classes and a narrow transformer, so the step's buffers are tens of MB."""
    if not on_cuda(device):
        pytest.skip("memory pools are CUDA's")
    from vqdiff_cli.checkpoint.random import random_components, shipped_configs
    from vqdiff_cli.pipeline import fastpath
    from vqdiff_cli.pipeline.outputs import ModelSource

    configs = copy.deepcopy(shipped_configs("ithq"))
    configs["transformer"].update(num_layers=2, num_attention_heads=2, attention_head_dim=32)
    components = random_components(configs, device, torch.float16)
    pipe = VQDiffusion(components, device, torch.float16, ModelSource("random", Path(".")))
    growth: list[int] = []
    real_init = fastpath._Graph.__init__

    def measured(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved(device)
        real_init(self, *args, **kwargs)
        torch.cuda.synchronize()
        growth.append(torch.cuda.memory_reserved(device) - before)

    monkeypatch.setattr(fastpath._Graph, "__init__", measured)
    pipe.generate(PROMPT, GenerateOptions(seed=1, sampler="fast", steps=3))
    assert len(growth) == 2 and growth[0] > 16 * 2**20, growth
    assert growth[1] <= growth[0] / 2, growth


@pytest.mark.slow
def test_compiled_fast_path_on_the_gpu_captures_without_fallback(tiny, device):
    pipe = load(tiny, device, "float16", compile=True)
    options = GenerateOptions(seed=5, num_images=2, batch_size=2, sampler="fast", steps=3, truncation_rate=0.9)
    got = pipe.generate(["a red ball", "a cat"], options)
    assert pipe.acceleration_notes == []
    assert all(((r.tokens >= 0) & (r.tokens < tiny.spec.num_codes)).all() for r in got)
    assert tokens(pipe.generate(["a red ball", "a cat"], options)) == tokens(got)


def test_folded_gelu_is_exact_on_the_gpu_in_float16(tiny_pipe, device):
    from vqdiff_cli.models.transformer import call_block, fast_block_runner, fused_block

    transformer = copy.deepcopy(tiny_pipe.components.transformer).to(device, torch.float16)
    assert fast_block_runner(transformer) is fused_block
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, transformer.config.inner_dim, generator=g).to(device, torch.float16)
    context = torch.randn(3, 77, 32, generator=g).to(device, torch.float16)
    t = torch.tensor(37, device=device)
    with torch.inference_mode():
        for block in transformer.transformer_blocks:
            kv = block.attn2.project_kv(context)
            plain, fused = call_block(block, x, context, t, kv), fused_block(block, x, context, t, kv)
            torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)


# -- inpainting -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["fast", "reference"])
@pytest.mark.parametrize("known", ["restore", "renoise"])
def test_inpainting_on_the_gpu_keeps_known_tokens(tiny, device, sampler, known):
    pipe = load(tiny, device, "float16" if sampler == "fast" else "float32")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), dtype=bool)
    mask[:, :8] = True
    setup = pipe.prepare_inpaint(picture, mask, InpaintOptions(known=known))
    options = GenerateOptions(seed=3, num_images=2, batch_size=2, sampler=sampler, steps=10)
    keep = ~setup.regenerate.flatten()
    for result in pipe.inpaint_iter(setup, PROMPT, options, InpaintOptions(known=known)):
        assert torch.equal(result.tokens.flatten()[keep], setup.tokens.flatten()[keep])
    assert pipe.acceleration_notes == []


# -- the bench --------------------------------------------------------------------------------------------------


def test_bench_times_replayed_steps_on_the_gpu(tiny, device):
    args = ["bench", "--model", str(tiny.path), "--device", str(device), "--steps", "3", "--batch", "2"]
    result = CliRunner().invoke(app, [*args, "--repeats", "2", "--sampler", "fast", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    steps = [p for p in doc["phases"] if p["phase"] == "step"]
    if on_cuda(device):
        assert len(steps) == 4 * len(doc["settings"]["dtypes"]) and all(p["cuda_graph"] for p in steps)
        assert {e["derived_from"] for e in doc["end_to_end"] if e["kind"] == "derived"} == {"step"}
        assert all(e["run_memory_bytes"] for e in doc["end_to_end"] if e["kind"] == "measured")
    else:
        assert steps == []
    assert not [n for n in doc["notes"] if "failed" in n]
