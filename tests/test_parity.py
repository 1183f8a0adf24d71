"""Parity with diffusers 0.42.1, component by component and end to end (CPU, float32).

Backwards from pixels: VQ decode and encode, transformer log-probabilities, text states, the scheduler's posterior,
guidance and truncation, then identical sampled tokens for the same seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqdiff_cli import GenerateOptions, VQDiffusion
from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule, apply_guidance, q_posterior, truncate

PROMPT = "a teddy bear in the pool"


def reference_tokens(ckpt, prompt: str, seed: int, guidance: float, truncation: float) -> torch.Tensor:
    pipe = ckpt.pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []
    pipe(
        prompt,
        generator=torch.Generator("cpu").manual_seed(seed),
        guidance_scale=guidance,
        truncation_rate=truncation,
        output_type="np",
        callback=lambda i, t, s: seen.append(s.clone()),
    )
    return seen[-1][0]


@pytest.mark.parametrize("learned", [True, False], ids=["learned-null", "empty-prompt-null"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("truncation", [1.0, 0.8])
def test_sampled_tokens_equal_diffusers(request, learned, guidance, truncation):
    ckpt = request.getfixturevalue("tiny" if learned else "tiny_unlearned")
    ours = VQDiffusion.from_pretrained(ckpt.path, device="cpu")
    for seed in (0, 7):
        got = ours.generate(PROMPT, GenerateOptions(seed=seed, guidance_scale=guidance, truncation_rate=truncation))
        expected = reference_tokens(ckpt, PROMPT, seed, guidance, truncation)
        assert torch.equal(got[0].tokens.flatten(), expected), f"seed {seed}"


def test_settings_change_the_tokens(tiny, tiny_pipe):
    """The parity cases above are not vacuous: guidance and seed change what is sampled."""
    a = tiny_pipe.generate(PROMPT, GenerateOptions(seed=0, guidance_scale=1.0))[0].tokens
    b = tiny_pipe.generate(PROMPT, GenerateOptions(seed=0, guidance_scale=5.0))[0].tokens
    c = tiny_pipe.generate(PROMPT, GenerateOptions(seed=1, guidance_scale=5.0))[0].tokens
    assert not torch.equal(a, b)
    assert not torch.equal(b, c)


def test_transformer_log_probs_match(tiny, tiny_pipe):
    g = torch.Generator().manual_seed(0)
    k = tiny.spec.num_codes + 1
    x = torch.randint(0, k, (3, tiny.spec.sample_size**2), generator=g)
    context = torch.randn(3, 77, tiny.spec.text_width, generator=g)
    with torch.no_grad():
        for t in (0, 42, 99):
            ours = tiny_pipe.components.transformer(x, context, t)
            ref = tiny.transformer(x, encoder_hidden_states=context, timestep=torch.tensor(t)).sample
            assert ours.shape == (3, k - 1, tiny.spec.sample_size**2)
            assert (ours - ref).abs().max() <= 1e-5
            assert torch.allclose(ours.exp().sum(1), torch.ones(()), atol=1e-5)


def test_vq_decode_matches(tiny, tiny_pipe):
    side = tiny.spec.sample_size
    tokens = torch.randint(0, tiny.spec.num_codes, (2, side, side), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tiny_pipe.components.vqvae.decode(tokens)
        emb = tiny.vqvae.quantize.get_codebook_entry(tokens.view(2, -1), shape=(2, side, side, 4))
        ref = tiny.vqvae.decode(emb, force_not_quantize=True).sample
    ours_px = (ours / 2 + 0.5).clamp(0, 1)
    ref_px = (ref / 2 + 0.5).clamp(0, 1)
    assert ours.shape == ref.shape == (2, 3, side * 4, side * 4)
    assert (ours_px - ref_px).abs().max() <= 1 / 255
    pil = tiny_pipe.decode(tokens)
    assert np.abs(np.asarray(pil[0], dtype=np.float32) / 255 - ref_px[0].permute(1, 2, 0).numpy()).max() <= 1 / 255


def test_vq_encode_matches(tiny, tiny_pipe):
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ours = tiny_pipe.components.vqvae.encode(pixels)
        latents = tiny.vqvae.encode(pixels).latents
        _, _, (_, _, ref) = tiny.vqvae.quantize(latents)
    assert torch.equal(ours.flatten(), ref.flatten())
    assert len(ours.unique()) > 1


def test_text_states_match(tiny, tiny_pipe, tiny_unlearned):
    ref = tiny.pipeline()._encode_prompt([PROMPT], 1, True)
    text = tiny_pipe.components.text
    ours = torch.cat([text.unconditional(1), text.encode([PROMPT])])
    assert torch.equal(ours, ref)
    unlearned = VQDiffusion.from_pretrained(tiny_unlearned.path, device="cpu").components.text
    ref2 = tiny_unlearned.pipeline()._encode_prompt([PROMPT], 1, True)
    assert torch.equal(torch.cat([unlearned.unconditional(1), unlearned.encode([PROMPT])]), ref2)


def test_long_prompt_is_sliced_like_diffusers(tiny, tiny_pipe):
    long_prompt = " ".join(["teddy bear"] * 60)
    ids = tiny_pipe.components.text.tokenize([long_prompt])
    assert ids.ids.shape == (1, 77)
    assert ids.truncated[0]
    ref = tiny.pipeline()._encode_prompt([long_prompt], 1, False)
    assert torch.equal(tiny_pipe.components.text.encode([long_prompt]), ref)
    # a batch may mix long and short prompts: each row is as it would be alone
    mixed = tiny_pipe.components.text.tokenize([PROMPT, long_prompt])
    assert mixed.truncated[0] == "" and mixed.truncated[1] == ids.truncated[0]
    both = tiny_pipe.components.text.encode([PROMPT, long_prompt])
    assert torch.equal(both[1:], ref)
    assert torch.allclose(both[:1], tiny_pipe.components.text.encode([PROMPT]), atol=1e-6)


def test_schedule_tables_match(tiny):
    ours = MaskAndReplaceSchedule.from_config(
        __import__("vqdiff_cli.config", fromlist=["x"]).SchedulerConfig(
            num_vec_classes=tiny.spec.num_codes + 1, num_train_timesteps=tiny.spec.num_train_timesteps
        )
    )
    ref = tiny.scheduler
    assert torch.equal(ours.log_cumprod_at, ref.log_cumprod_at)
    assert torch.equal(ours.log_cumprod_bt, ref.log_cumprod_bt)
    assert torch.equal(ours.log_cumprod_ct, ref.log_cumprod_ct)
    for t in range(1, tiny.spec.num_train_timesteps):
        step = ours.step(t, t - 1)
        assert torch.equal(step.log_a, ref.log_at[t])
        assert torch.equal(step.log_b, ref.log_bt[t])
        assert torch.equal(step.log_c, ref.log_ct[t])


def test_one_step_posterior_equals_diffusers(tiny, tiny_pipe):
    g = torch.Generator().manual_seed(3)
    k = tiny.spec.num_codes + 1
    log_p = torch.log_softmax(torch.randn(2, k - 1, 16, generator=g) * 3, dim=1)
    x_t = torch.randint(0, k, (2, 16), generator=g)
    for t in (1, 2, 50, 99):
        ours = q_posterior(log_p, x_t, tiny_pipe.schedule, t, t - 1)
        ref = tiny.scheduler.q_posterior(log_p, x_t, torch.tensor(t))
        assert torch.equal(ours, ref)


def test_guidance_and_truncation_match(tiny):
    g = torch.Generator().manual_seed(4)
    lu = torch.log_softmax(torch.randn(1, 16, 16, generator=g) * 3, dim=1)
    lc = torch.log_softmax(torch.randn(1, 16, 16, generator=g) * 3, dim=1)
    guided = apply_guidance(lu, lc, 5.0)
    ref = lu + 5.0 * (lc - lu)
    ref -= torch.logsumexp(ref, dim=1, keepdim=True)
    assert torch.equal(guided, ref)
    pipe = tiny.pipeline()
    for rate in (1.0, 0.9, 0.5, 0.01):
        assert torch.equal(truncate(guided, rate), pipe.truncate(guided, rate).clamp(-70))
    assert (truncate(guided, 0.5) == -70).any()
