"""The fast sampler: exact where it is meant to be exact, the same distribution where it is not.

Exact: the counter-based noise (an image draws the same numbers alone or in a batch), the cached cross-attention
keys and values, a session reused for the next batch, and, step by step from the same x_t, the table the wired fast
sampler draws from against the reference sampler's. Same distribution: the closed-form posterior against
diffusers-order `q_posterior` + Gumbel (chi-square over many draws), the fast sampler's draws against its table, the
masked fraction after each step, re-noised known tokens. No timings here: speed is measured by `vqdiff bench`.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from vqdiff_cli import GenerateOptions, InpaintOptions, VQDiffusion
from vqdiff_cli.config import SchedulerConfig
from vqdiff_cli.diffusion.fast import (
    NUM_COEF,
    FastPlan,
    denoise_fast,
    fast_step,
    guided_weights,
    make_step,
    q_sample_start,
    sample_columns,
    step_coefficients,
    truncate_weights,
)
from vqdiff_cli.diffusion.sampler import KnownTokens
from vqdiff_cli.diffusion.schedule import (
    MaskAndReplaceSchedule,
    apply_guidance,
    q_posterior,
    truncate,
    truncation_keep_mask,
)
from vqdiff_cli.diffusion.streams import seed_words, uniforms
from vqdiff_cli.options import plan_timesteps
from vqdiff_cli.pipeline.fastpath import Acceleration, Compiled, StepRunner

from .fake_cuda import FakeCuda, failing_capture, stand_in_streams

K = 9  # 8 codes + the mask: small enough for a chi-square test per column distribution
# A schedule with a large uniform-replacement share, so that unmasked tokens really move and that branch is tested.
NOISY = MaskAndReplaceSchedule.from_config(
    SchedulerConfig(
        num_vec_classes=K,
        num_train_timesteps=20,
        alpha_cum_start=0.9,
        alpha_cum_end=0.01,
        gamma_cum_start=0.02,
        gamma_cum_end=0.95,
    )
)
ITHQ_LIKE = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=K, num_train_timesteps=100))


# -- the noise stream ---------------------------------------------------------------------------------------------


def test_uniforms_are_open_interval_deterministic_and_uniform():
    words = seed_words([0, 1, 2**62 + 5], "cpu")
    u = uniforms(words, torch.tensor(10), (4096, 4))
    assert u.shape == (3, 4096, 4) and u.dtype == torch.float64
    assert (u > 0).all() and (u < 1).all()
    assert torch.equal(u, uniforms(words, torch.tensor(10), (4096, 4)))
    counts = torch.histc(u.flatten().float(), bins=16, min=0, max=1)
    expected = u.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 15 degrees of freedom
    assert abs(u.mean().item() - 0.5) < 0.005


def test_streams_differ_by_seed_salt_and_do_not_correlate():
    a = uniforms(seed_words([7], "cpu"), torch.tensor(4), (20000,)).flatten()
    b = uniforms(seed_words([8], "cpu"), torch.tensor(4), (20000,)).flatten()
    c = uniforms(seed_words([7], "cpu"), torch.tensor(6), (20000,)).flatten()
    for other in (b, c):
        assert not torch.equal(a, other)
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 0.03


def test_an_image_draws_the_same_numbers_alone_or_in_a_batch():
    salt = torch.tensor(12)
    batch = uniforms(seed_words([3, 99, 4], "cpu"), salt, (64, 4))
    alone = uniforms(seed_words([99], "cpu"), salt, (64, 4))
    assert torch.equal(batch[1], alone[0])


# -- the per-step math against the diffusers-order functions ------------------------------------------------------


def test_guidance_on_raw_scores_equals_log_softmax_guidance():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 1, 16, 30, generator=g) * 3  # (1, N=16, n=30) raw scores each
    fast = guided_weights(torch.cat([u, c]), 5.0)
    fast = fast / fast.sum(-1, keepdim=True)
    ref = apply_guidance(u.log_softmax(-1).transpose(1, 2), c.log_softmax(-1).transpose(1, 2), 5.0).exp()
    assert torch.allclose(fast, ref.transpose(1, 2), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rate", [0.3, 0.8, 0.95])
def test_truncation_keeps_the_same_classes(rate):
    g = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.randn(2, 50, 64, generator=g) * 2, dim=1)  # (B, n, N)
    kept = truncate_weights(log_p.exp().transpose(1, 2).contiguous(), rate) > 0
    assert torch.equal(kept, truncation_keep_mask(log_p, rate).transpose(1, 2))


def test_rate_one_keeps_every_class():
    """diffusers' float32 cumulative sum cuts a negligible tail at rate 1.0; the fast path keeps every class."""
    g = torch.Generator().manual_seed(2)
    log_p = torch.log_softmax(torch.randn(1, 4096, 32, generator=g) * 3, dim=1)
    assert (truncate(log_p, 1.0) == -70).any()  # the reference cut: mass below 3e-8 per column
    scores = log_p.transpose(1, 2).contiguous()  # raw scores (B, N, n)
    x_t = torch.full((1, 32), 4096)
    coef = torch.tensor(step_coefficients(ITHQ_LIKE, 50, 49), dtype=torch.float64)
    words, salt = seed_words([4], "cpu"), torch.tensor(100)
    for final in (False, True):
        stepped = fast_step(scores, x_t, coef, words, salt, None, 1.0, final)
        untruncated = sample_columns(guided_weights(scores, None), x_t, coef, uniforms(words, salt, (32, 4)), final)
        assert torch.equal(stepped, untruncated)


def _exact_posterior(log_p: torch.Tensor, x_t: int, schedule: MaskAndReplaceSchedule, t: int, s: int | None, rate):
    """The distribution diffusers samples from for one column: softmax of q_posterior (or of p(x_0) at the end)."""
    lp = truncate(log_p.view(1, -1, 1), rate)
    if s is None:
        return torch.cat([torch.softmax(lp[0, :, 0].double(), 0), torch.zeros(1, dtype=torch.float64)])
    post = q_posterior(lp, torch.tensor([[x_t]]), schedule, t, s)
    return torch.softmax(post[0, :, 0].double(), 0)


@pytest.mark.parametrize("rate", [1.0, 0.7])
@pytest.mark.parametrize(
    ("schedule", "t", "s"),
    [(NOISY, 10, 9), (NOISY, 15, 5), (NOISY, 19, 0), (NOISY, 3, None), (ITHQ_LIKE, 99, 98), (ITHQ_LIKE, 40, 10)],
    ids=["noisy-one-step", "noisy-stride", "noisy-to-0", "noisy-final", "ithq-start", "ithq-stride"],
)
@pytest.mark.parametrize("x_t", [K - 1, 2, 5], ids=["masked", "code2", "code5"])
def test_closed_form_posterior_has_diffusers_distribution(schedule, t, s, x_t, rate):
    columns = 60000
    log_p = torch.log_softmax(torch.randn(K - 1, generator=torch.Generator().manual_seed(3)) * 1.5, 0)
    exact = _exact_posterior(log_p, x_t, schedule, t, s, rate)
    weights = log_p.exp().expand(1, columns, K - 1).contiguous()
    if rate < 1:
        weights = truncate_weights(weights, rate)
    coef = torch.tensor(step_coefficients(schedule, t, s), dtype=torch.float64)
    u = uniforms(seed_words([11 + t], "cpu"), torch.tensor(2 * t), (columns, 4))
    drawn = sample_columns(weights, torch.full((1, columns), x_t), coef, u, final=s is None)
    freq = torch.bincount(drawn[0], minlength=K).double()
    expected = exact * columns
    possible = expected > 1e-9
    assert freq[~possible].sum() == 0, "drew a class of probability 0"
    chi2 = (((freq - expected) ** 2)[possible] / expected[possible]).sum().item()
    dof = max(int(possible.sum()) - 1, 1)
    assert chi2 < dof + 8 * (2 * dof) ** 0.5, (chi2, dof, freq, expected)


# -- the loop -----------------------------------------------------------------------------------------------------


def _random_logits(n: int):
    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + int(t))
        return torch.randn(x.shape[0], x.shape[1], n, generator=g) * 2

    return run


@pytest.mark.parametrize("steps", [12, 5, 100])
def test_masked_fraction_follows_cumgamma(steps):
    k, n, b = 33, 1024, 4
    schedule = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=k, num_train_timesteps=100))
    timesteps = plan_timesteps(99, steps=steps)
    step = make_step(_random_logits(k - 1), seed_words(list(range(b)), "cpu"), None, 1.0, k - 1)
    plan = FastPlan.build(schedule, timesteps, torch.device("cpu"))
    fractions = [(x == k - 1).float().mean().item() for x in denoise_fast(step, torch.full((b, n), k - 1), plan)]
    assert fractions[-1] == 0.0
    for s, frac in zip(timesteps[1:], fractions[:-1], strict=True):
        expected = float(schedule.cumprod_ct[s])
        sd = (expected * (1 - expected) / (n * b)) ** 0.5
        assert abs(frac - expected) < 5 * sd + 1e-3, (s, frac, expected)


@pytest.mark.parametrize("t", [10, 60, 98])
def test_the_start_draw_of_an_edit_follows_q(t):
    """q_sample_start: mask with gamma-bar_t, x_0 with alpha-bar_t + beta-bar_t, each other code with beta-bar_t."""
    k, n, b = 33, 8192, 2
    schedule = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=k, num_train_timesteps=100))
    x_0 = torch.randint(0, k - 1, (b, n), generator=torch.Generator().manual_seed(3))
    x_t = q_sample_start(x_0, schedule, t, seed_words([7, 8], "cpu"))
    a, c = float(schedule.cumprod_at[t]), float(schedule.cumprod_ct[t])
    for observed, expected in (
        ((x_t == k - 1).double().mean(), c),
        ((x_t == x_0).double().mean(), a + (1 - a - c) / (k - 1)),
    ):
        sd = (expected * (1 - expected) / (n * b)) ** 0.5
        assert abs(observed.item() - expected) < 5 * sd + 1e-4, (t, observed, expected)
    alone = q_sample_start(x_0[1:], schedule, t, seed_words([8], "cpu"))
    assert torch.equal(alone, x_t[1:])  # the same alone or in a batch


@pytest.mark.parametrize("edit", ["vary", "inpaint-renoise"])
def test_the_fast_samplers_edits_never_draw_from_torch_generators(tiny_pipe, monkeypatch, edit):
    """Their start draw too comes from the counter-based streams, so it is the same on any device."""
    import vqdiff_cli.diffusion.sampler as reference

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    options = GenerateOptions(seed=4, num_images=2, batch_size=2, sampler="fast", steps=6)

    def run():
        if edit == "vary":
            return tiny_pipe.vary(picture, "a teddy bear", strength=0.6, options=options)
        mask = np.zeros((16, 16), dtype=bool)
        mask[:8] = True
        return tiny_pipe.inpaint(picture, mask, "a teddy bear", options, InpaintOptions(known="renoise"))

    expected = [r.tokens for r in run()]
    monkeypatch.setattr(reference, "gumbel_uniforms", lambda *a: pytest.fail("a torch generator was drawn from"))
    assert all(torch.equal(r.tokens, e) for r, e in zip(run(), expected, strict=True))


def test_known_tokens_are_restored_or_renoised():
    k, n, b = 33, 4096, 2
    schedule = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=k, num_train_timesteps=100))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, k - 1, (b, n), generator=g)
    regenerate = torch.rand(b, n, generator=g) < 0.5
    timesteps = plan_timesteps(99, steps=10)
    plan = FastPlan.build(schedule, timesteps, torch.device("cpu"))
    words = seed_words([1, 2], "cpu")
    kept = make_step(_random_logits(k - 1), words, None, 1.0, k - 1, KnownTokens(tokens, regenerate))
    for x in denoise_fast(kept, torch.full((b, n), k - 1), plan):
        assert torch.equal(x[~regenerate], tokens[~regenerate])
    renoised = make_step(_random_logits(k - 1), words, None, 1.0, k - 1, KnownTokens(tokens, regenerate, True))
    chain = list(denoise_fast(renoised, torch.full((b, n), k - 1), plan))
    for s, x in zip(timesteps[1:], chain[:-1], strict=True):
        known = x[~regenerate]
        masked = (known == k - 1).float().mean().item()
        assert abs(masked - schedule.cumprod_ct[s]) < 0.03, (s, masked)
        unmasked = known != k - 1
        assert (known[unmasked] == tokens[~regenerate][unmasked]).float().mean() > 0.99
    assert torch.equal(chain[-1][~regenerate], tokens[~regenerate])


def test_plan_holds_every_step_on_the_device():
    plan = FastPlan.build(ITHQ_LIKE, (99, 60, 0), torch.device("cpu"))
    assert plan.t.tolist() == [99, 60, 0]
    assert plan.coef.shape == (3, NUM_COEF) and plan.coef.dtype == torch.float64
    assert (plan.coef[-1] == 0).all()  # the final step needs no posterior
    assert plan.salt.tolist() == [198, 120, 0]


# -- wired to the model ---------------------------------------------------------------------------------------------


def test_cached_text_keys_and_values_are_exact(tiny_pipe):
    transformer = tiny_pipe.components.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (2, 16), generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    with torch.inference_mode():
        plain = transformer.logits(x, context, 40)
        cached = transformer.logits(x, context, torch.tensor(40), transformer.context_kv(context))
    assert torch.equal(plain, cached)


def test_fused_block_computes_what_the_block_computes(tiny_pipe):
    """The fast path's block (one-pass adaptive norms, GELU factors folded into the matmuls) against the plain one."""
    from vqdiff_cli.models.transformer import call_block, fused_block

    transformer = tiny_pipe.components.transformer
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, transformer.config.inner_dim, generator=g)
    context = torch.randn(3, 77, 32, generator=g)
    with torch.inference_mode():
        for block in transformer.transformer_blocks:
            for t in (0, 37, 99):
                kv = block.attn2.project_kv(context)
                plain = call_block(block, x, context, torch.tensor(t), kv)
                fused = fused_block(block, x, context, torch.tensor(t), kv)
                torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
                assert not torch.equal(plain, x)
        scores = transformer.logits(x[:, :, 0].long().abs() % 16, context, torch.tensor(5), None, fused_block)
        torch.testing.assert_close(scores, transformer.logits(x[:, :, 0].long().abs() % 16, context, 5))


def test_the_gelu_fold_is_used_only_where_it_cannot_overflow_float16(tiny_pipe):
    """fused_block folds 1.702 into the feed-forward's first matmul, so it stores 1.702 z: in float16 that overflows
    past |z| = 38,486, where the plain z * sigmoid(1.702 z) stays finite to 65,504. A float16 block whose
    pre-activations reach 50,000 gets the plain form (its bound is past the limit), which stays finite and matches
    the block in float32; the tiny checkpoint's own weights are proven safe and keep the fold."""
    import copy

    from vqdiff_cli.models.transformer import (
        call_block,
        fast_block_runner,
        fused_block,
        fused_block_plain_gelu,
        gelu_fold_bound,
    )

    g = torch.Generator().manual_seed(2)
    transformer = copy.deepcopy(tiny_pipe.components.transformer)
    block = transformer.transformer_blocks[0]
    width = transformer.config.inner_dim
    x, context, t = torch.randn(2, 16, width, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor(40)
    pre_activations: list[torch.Tensor] = []
    proj, out = block.ff.net[0].proj, block.ff.net[2]
    hook = proj.register_forward_hook(lambda module, args, output: pre_activations.append(output.float()))
    with torch.inference_mode():
        assert fast_block_runner(copy.deepcopy(transformer).half()) is fused_block
        call_block(block, x, context, t, None)
        scale = 50_000 / pre_activations[-1].abs().max()  # this input's largest |z| becomes 50,000
        proj.weight.mul_(scale)  # the same block output, with larger pre-activations
        proj.bias.mul_(scale)
        out.weight.div_(scale)
        expected = call_block(block, x, context, t, None)
        assert 49_000 < pre_activations[-1].abs().max() < 51_000
        for _ in range(20):  # the bound holds for any input, here for random ones and larger ones
            call_block(block, torch.randn(2, 16, width, generator=g) * 100, context, t, None)
        assert max(z.abs().max() for z in pre_activations) <= gelu_fold_bound(block)
        half = transformer.half()
        args = (half.transformer_blocks[0], x.half(), context.half(), t, None)
        assert not torch.isfinite(fused_block(*args)).all()  # the fold overflows here...
        plain = call_block(*args)
        assert torch.isfinite(plain).all()  # ...where the plain form does not
        runner = fast_block_runner(half)
        assert runner is fused_block_plain_gelu
        chosen = runner(*args)
        assert torch.isfinite(chosen).all()
        torch.testing.assert_close(chosen.float(), expected, rtol=2e-2, atol=2e-2)
    hook.remove()


def test_fast_sampler_image_alone_equals_in_a_batch_on_cpu_float32(tiny_pipe):
    """Bit for bit on a CPU in float32, the promise there. On a GPU only the noise is batch-independent; the same
    image needs the same batch size (cuBLAS picks kernels by shape): tests/test_gpu.py checks that one."""
    options = GenerateOptions(seed=20, num_images=3, batch_size=3, sampler="fast", steps=20)
    batch = tiny_pipe.generate("a teddy bear", options)
    alone = tiny_pipe.generate("a teddy bear", GenerateOptions(seed=21, sampler="fast", steps=20))[0]
    assert torch.equal(batch[1].tokens, alone.tokens)
    assert not torch.equal(batch[0].tokens, batch[1].tokens)
    assert all((r.tokens < 16).all() for r in batch)


# aten ops that read a device value on the host or copy host data to the device: on a GPU each one stalls the loop
HOST_SYNC_OPS = {
    "item",
    "_local_scalar_dense",  # .item(), bool(t), int(t), float(t)
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "masked_scatter",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
    "lift_fresh",  # torch.tensor(<host data>)
    "lift_fresh_copy",
}


class OpRecorder(TorchDispatchMode):
    """Records every aten op run while active; flags the ones that would synchronise a GPU with the host.

    `Tensor.to(device)` is recorded too, from Python: on a CPU a move to the CPU is no copy at all, so aten never
    sees the host-to-device copy that the same line makes on a GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._to = torch.Tensor.to

    def __enter__(self):  # type: ignore[no-untyped-def]
        original, ops = self._to, self.ops

        def to(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            if kwargs.get("device") is not None or any(isinstance(a, torch.device | str | torch.Tensor) for a in args):
                ops.append("Tensor.to(device)")
            return original(tensor, *args, **kwargs)

        torch.Tensor.to = to  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        torch.Tensor.to = self._to  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        to_device = kwargs.get("device") is not None or any(isinstance(a, torch.device | str) for a in args[1:])
        if name in ("to", "_to_copy") and to_device and out is not args[0]:
            name += "(device)"  # a copy to a device (on a GPU, from the host when the source is a host tensor)
        if name in ("index", "index_put", "index_put_"):  # boolean-mask indexing has a data-dependent shape
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                name += "(bool)"
        self.ops.append(name)
        return out

    def syncs(self) -> list[str]:
        return [op for op in self.ops if op in HOST_SYNC_OPS or "(" in op]


@pytest.mark.parametrize("mode", ["generate", "inpaint-renoise", "generate-purity", "inpaint-renoise-purity"])
@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_the_step_loop_never_waits_for_the_host(tiny_pipe, monkeypatch, mode, sampler):
    """Every op of every step (network, guidance, truncation, posterior, noise, known tokens) stays on the device,
    with either sampler: no host-to-device copy (the fast sampler's plan and the reference sampler's schedule tables
    are on the device before the first step), no read of a device value, no `nonzero` (boolean indexing).

    The loop is what `VQDiffusion` runs; the recorder sees the aten ops of each step on the CPU, where an op that would
    stall a GPU (a read of a device value, a host-to-device copy, a data-dependent shape) is still visible.
    """
    import vqdiff_cli.diffusion.sampler as reference

    recorders: list[OpRecorder] = []
    loop = denoise_fast if sampler == "fast" else reference.denoise

    def recorded(*args):  # type: ignore[no-untyped-def]
        chain = loop(*args)  # what runs before the first step (the plan, the tables) is not a step's
        while True:
            recorders.append(OpRecorder())
            with recorders[-1]:
                x = next(chain, None)
            if x is None:
                return
            yield x

    monkeypatch.setattr(f"vqdiff_cli.pipeline.pipeline.{loop.__name__}", recorded)
    options = GenerateOptions(seed=4, num_images=2, batch_size=2, sampler=sampler, steps=6, truncation_rate=0.9)
    if mode.endswith("-purity"):  # a budgeted reveal, several calls per timestep
        options = GenerateOptions(**{**options.__dict__, "reveal": "purity", "tokens_per_call": 2})
    if mode.startswith("generate"):
        tiny_pipe.generate("a teddy bear", options)
    else:
        picture = Image.fromarray(np.full((16, 16, 3), 120, dtype=np.uint8))
        mask = np.zeros((16, 16), dtype=bool)
        mask[:8] = True
        tiny_pipe.inpaint(picture, mask, "a teddy bear", options, InpaintOptions(known="renoise"))
    steps = [r for r in recorders if r.ops]
    assert len(steps) >= 2
    assert all({"linear", "addmm", "mm"} & set(r.ops) for r in steps)  # the network ran in each step
    assert [r.syncs() for r in steps] == [[] for _ in steps]


def test_fast_sessions_are_reused_with_new_inputs(tiny):
    """A session made for one batch and loaded with the next gives what a fresh pipeline gives."""
    reused = VQDiffusion.from_pretrained(tiny.path, device="cpu")
    options = GenerateOptions(seed=3, sampler="fast", steps=10, guidance_scale=3.0, truncation_rate=0.9)
    reused.generate(["a red ball"], options)
    second = reused.generate(["a cat on a hat"], GenerateOptions(**{**options.__dict__, "seed": 8}))[0]
    fresh = VQDiffusion.from_pretrained(tiny.path, device="cpu")
    expected = fresh.generate(["a cat on a hat"], GenerateOptions(**{**options.__dict__, "seed": 8}))[0]
    assert torch.equal(second.tokens, expected.tokens)
    assert len(reused.fast_sessions._sessions) == 1


def _table_of_fast_inputs(weights, x_t, coef, final):
    """The per-column distribution that `sample_columns(weights, x_t, coef, u, final)` draws from, by Bayes' rule from
    the plan's coefficients (not by its branches): (B, N, n + 1) float64, the mask last."""
    from vqdiff_cli.diffusion import fast

    p = weights.double() / weights.double().sum(-1, keepdim=True)
    zero = torch.zeros_like(p[..., :1])
    if final:
        return torch.cat([p, zero], -1)
    c, n = coef.double(), p.shape[-1]
    stay = c[fast.P_STAY].expand_as(zero)
    masked = torch.cat([(1 - stay) * (c[fast.P_MODEL] * p + (1 - c[fast.P_MODEL]) / n), stay], -1)
    at_j = torch.nn.functional.one_hot(x_t.clamp(max=n - 1), n).bool()
    r = p / torch.where(at_j, c[fast.A_T] + c[fast.B_T], c[fast.B_T])  # p(x_0 = k) / q(x_t | x_0 = k)
    w = (c[fast.A_S] * r / r.sum(-1, keepdim=True) + c[fast.B_S]) * torch.where(at_j, c[fast.KEEP], c[fast.BETA])
    kept = torch.cat([w / w.sum(-1, keepdim=True), zero], -1)  # x_t = j: never back to the mask
    return torch.where((x_t == n).unsqueeze(-1), masked, kept)


@pytest.mark.parametrize(
    ("guidance", "truncation", "steps"), [(5.0, 0.8, 5), (1.0, 1.0, 4)], ids=["guided-truncated", "plain"]
)
def test_fast_sampler_draws_from_the_reference_samplers_distributions(
    tiny_pipe, monkeypatch, guidance, truncation, steps
):
    """Step by step, from the same x_t at the same t: the probabilities the fast sampler draws from (its weights and
    coefficients, as the pipeline wires them) equal the reference sampler's (softmax of the logits it Gumbel-samples);
    and the fast sampler's draws follow that table (a chi-square over many draws of each step)."""
    import vqdiff_cli.pipeline.pipeline as api
    from vqdiff_cli.diffusion import fast, sampler

    batch, repeats = 8, 24
    options = GenerateOptions(
        seed=30, num_images=batch, batch_size=batch, steps=steps, guidance_scale=guidance, truncation_rate=truncation
    )
    # 1. the reference run: x_t, t and the table each image's Gumbel-max draw samples from, at every step
    visited, tables = [], []
    real_step, real_argmax = sampler.sample_step, sampler.gumbel_argmax

    schedule = tiny_pipe.schedule

    def timestep_of(step_tables) -> int:  # type: ignore[no-untyped-def]
        """The t whose q(x_t | x_0) a step's tables hold (the step is given tables, not t)."""
        found = [
            t
            for t in range(schedule.num_timesteps)
            if torch.equal(schedule.cumulative(t).log_c.cpu(), step_tables.q_t.log_c.cpu())
        ]
        assert len(found) == 1, found
        return found[0]

    def recording_step(log_p, x_t, step_tables, *args):  # type: ignore[no-untyped-def]
        visited.append((x_t, timestep_of(step_tables)))
        return real_step(log_p, x_t, step_tables, *args)

    def recording_argmax(logits, u):  # type: ignore[no-untyped-def]
        tables.append(logits.double().softmax(1).transpose(1, 2))  # (1, N, K or K-1)
        return real_argmax(logits, u)

    monkeypatch.setattr(sampler, "sample_step", recording_step)
    monkeypatch.setattr(sampler, "gumbel_argmax", recording_argmax)
    tiny_pipe.generate("a teddy bear", GenerateOptions(**{**options.__dict__, "sampler": "reference"}))
    monkeypatch.undo()
    timesteps = options.timesteps(tiny_pipe.num_train_timesteps)
    assert len(visited) == len(tables) == len(timesteps) * batch
    x_ref = [torch.cat([x for x, _ in visited[i * batch : (i + 1) * batch]]) for i in range(len(timesteps))]
    reference = [torch.cat(tables[i * batch : (i + 1) * batch]) for i in range(len(timesteps))]
    assert [visited[i * batch][1] for i in range(len(timesteps))] == list(timesteps)

    # 2. the fast sampler's step, as the pipeline builds it, run from those x_t: what sample_columns is given
    seen = []
    real_columns = fast.sample_columns

    def recording_columns(weights, x_t, coef, u, final):  # type: ignore[no-untyped-def]
        drawn = real_columns(weights, x_t, coef, u, final)
        seen.append((_table_of_fast_inputs(weights, x_t, coef, final), drawn))
        return drawn

    def probing(step, x_t, plan):  # type: ignore[no-untyped-def]
        assert plan.timesteps == timesteps
        for i in range(len(timesteps)):
            for r in range(repeats):  # other streams (salts no step uses): fresh draws from the same table
                step(x_ref[i], plan.t[i], plan.coef[i], plan.salt[i] + 1000 * (r + 1), i == len(timesteps) - 1)
        yield from fast.denoise_fast(step, x_t, plan)

    monkeypatch.setattr(fast, "sample_columns", recording_columns)
    monkeypatch.setattr(api, "denoise_fast", probing)
    tiny_pipe.generate("a teddy bear", GenerateOptions(**{**options.__dict__, "sampler": "fast"}))
    monkeypatch.undo()
    assert len(seen) == len(timesteps) * (repeats + 1)

    chi2, dof = 0.0, 0
    for i in range(len(timesteps)):
        probes = seen[i * repeats : (i + 1) * repeats]
        table = probes[0][0]
        assert all(torch.equal(t, table) for t, _ in probes)  # the same table whatever the stream
        ref = reference[i]
        ref = torch.cat([ref, torch.zeros_like(ref[..., :1])], -1) if ref.shape[-1] < table.shape[-1] else ref
        gap = (table - ref).abs().max().item()
        assert gap < 1e-4, (timesteps[i], gap)
        # the draws: class counts over the columns and repeats against the table's expected counts
        counts = torch.stack([torch.nn.functional.one_hot(d, table.shape[-1]) for _, d in probes]).sum((0, 1, 2))
        expected = table.sum((0, 1)) * repeats
        assert counts[expected == 0].sum() == 0, "drew a class of probability 0"
        big = expected >= 5
        chi2 += (((counts - expected) ** 2)[big] / expected[big]).sum().item()
        dof += int(big.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)


def test_unknown_sampler_is_a_usage_error():
    from vqdiff_cli.errors import UsageError

    with pytest.raises(UsageError, match="sampler"):
        GenerateOptions(sampler="quick")


# -- acceleration fallbacks ---------------------------------------------------------------------------------------


def test_graphs_are_cuda_only_and_on_by_default_there():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device name only: nothing runs on it
    assert not Acceleration().graphs_on(cpu)
    assert not Acceleration(cuda_graphs=True).graphs_on(cpu)
    assert Acceleration().graphs_on(cuda)
    assert not Acceleration(cuda_graphs=False).graphs_on(cuda)
    assert not Acceleration().compile  # compiling is opt-in


def test_a_failing_compile_falls_back_with_a_note(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("backend exploded\nlong details")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    notes: list[str] = []
    calls = []

    def add_one(x):
        calls.append(x)
        return x + 1

    compiled = Compiled(add_one, notes)
    assert torch.equal(compiled(torch.zeros(3)), torch.ones(3))
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    assert notes == ["torch.compile of add_one failed, running it eagerly (RuntimeError: backend exploded)"]
    assert len(calls) == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor needs a C++ compiler on the CPU")
@pytest.mark.parametrize("reveal", [{}, {"reveal": "purity", "tokens_per_call": 2}], ids=["posterior", "purity"])
def test_compiled_fast_path_compiles_and_gives_the_eager_tokens(tiny, reveal):
    """`--compile` really compiles (no fallback note) the fused block and the step math, and samples what eager does."""
    options = GenerateOptions(
        seed=5, num_images=2, batch_size=2, sampler="fast", steps=3, truncation_rate=0.9, **reveal
    )
    compiled = VQDiffusion.from_pretrained(tiny.path, device="cpu", compile=True)
    got = compiled.generate(["a red ball", "a cat"], options)
    assert compiled.acceleration_notes == []
    eager = VQDiffusion.from_pretrained(tiny.path, device="cpu").generate(["a red ball", "a cat"], options)
    assert [r.tokens.tolist() for r in got] == [r.tokens.tolist() for r in eager]


def test_compiled_variants_past_the_limit_run_eagerly_with_a_note(monkeypatch):
    """dynamo alone would fall back to eager silently past its limit; here the fallback is noted."""
    monkeypatch.setattr("vqdiff_cli.pipeline.fastpath.RECOMPILE_LIMIT", 1)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))  # no C++ build
    notes: list[str] = []

    def scale(x, k: int):
        return x * k

    compiled = Compiled(scale, notes)
    assert torch.equal(compiled(torch.ones(2), 2), torch.full((2,), 2.0))
    assert notes == []
    assert torch.equal(compiled(torch.ones(2), 3), torch.full((2,), 3.0))  # a second variant: over the limit of 1
    assert len(notes) == 1 and notes[0].startswith("torch.compile of scale failed, running it eagerly")
    assert compiled.fn is compiled.eager


def test_step_runner_without_graphs_calls_the_step():
    seen = []

    def step(x, t, coef, salt, final):
        seen.append(final)
        return x + 1

    runner = StepRunner(step, cuda_graphs=False)
    x = torch.zeros(2, 3, dtype=torch.long)
    assert torch.equal(runner(x, torch.tensor(5), torch.zeros(9), torch.tensor(10), True), x + 1)
    assert seen == [True] and runner.notes == []


def test_compiled_code_failing_inside_a_capture_is_left_to_the_capture(monkeypatch):
    import vqdiff_cli.pipeline.fastpath as accel

    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    notes: list[str] = []
    compiled = Compiled(broken, notes)
    monkeypatch.setattr(accel, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capturing"):
        compiled(torch.zeros(1))
    assert notes == []  # not blamed on the compiler, and compiling stays on
    assert compiled.fn is not compiled.eager


def test_a_failed_capture_restores_the_stream_and_is_tried_once_per_batch_shape(tiny, monkeypatch):
    """What is testable without a GPU: the fallback's bookkeeping (CUDA calls replaced by stand-ins)."""
    import vqdiff_cli.pipeline.fastpath as accel

    options = GenerateOptions(seed=1, sampler="fast", steps=3)
    expected = VQDiffusion.from_pretrained(tiny.path, device="cpu").generate("a red ball", options)[0].tokens
    streams, devices = stand_in_streams(monkeypatch)
    captures: list[int] = []
    monkeypatch.setattr(accel, "_Graph", failing_capture(captures, streams))
    monkeypatch.setattr(Acceleration, "graphs_on", lambda self, device: True)  # as on CUDA
    pipe = VQDiffusion.from_pretrained(tiny.path, device="cpu")
    assert torch.equal(pipe.generate("a red ball", options)[0].tokens, expected)  # the step ran without a graph
    assert streams[-1] == "caller's stream"
    assert devices == [torch.device("cpu")]
    pipe.generate("a blue ball", options)
    pipe.release()  # even a session made again for the shape does not retry
    pipe.generate("a blue ball", options)
    assert captures == [1]
    pipe.generate(["a red ball", "a blue ball"], GenerateOptions(seed=1, sampler="fast", steps=3, batch_size=2))
    assert captures == [1, 2]  # a new batch shape tries once
    cause = "RuntimeError: operation not permitted when stream is capturing"
    assert pipe.fast_sessions.notes == [
        f"CUDA graph capture failed for batches of {b}, running without graphs ({cause})" for b in (1, 2)
    ]


def test_a_failed_capture_for_one_batch_shape_leaves_graphs_on_for_another(tiny, monkeypatch):
    import vqdiff_cli.pipeline.fastpath as accel

    streams, _ = stand_in_streams(monkeypatch)
    captures: list[int] = []
    monkeypatch.setattr(accel, "_Graph", failing_capture(captures, streams, fail_for=lambda batch: batch == 2))
    monkeypatch.setattr(Acceleration, "graphs_on", lambda self, device: True)
    pipe = VQDiffusion.from_pretrained(tiny.path, device="cpu")
    # 3 images in batches of 2: a batch of 2 (its capture fails), then a batch of 1 (captured: graphs on)
    pipe.generate("a red ball", GenerateOptions(seed=1, sampler="fast", steps=3, num_images=3, batch_size=2))
    runners = {key.batch: session.runner for key, session in pipe.fast_sessions._sessions.items()}
    assert not runners[2].cuda_graphs and runners[1].cuda_graphs
    assert sorted(runners[1]._graphs) == [False, True]  # a step and the final step, both replayed
    assert captures == [2, 1, 1]
    assert len(pipe.fast_sessions.notes) == 1 and "for batches of 2" in pipe.fast_sessions.notes[0]


def test_both_graphs_of_a_runner_are_captured_on_one_stream_into_one_pool(monkeypatch):
    """The step graph and the final-step graph share a memory pool, so they must be captured on the same stream
    (torch.cuda.graph's documentation; the allocator reuses a block only on the stream that freed it). The real
    `_Graph` code runs here over stand-ins of torch.cuda.Stream, torch.cuda.graph and CUDAGraph (tests/fake_cuda.py)."""
    cuda = FakeCuda(monkeypatch)

    def step(x, t, coef, salt, final):  # type: ignore[no-untyped-def]
        cuda.note_work()
        return x + (2 if final else 1)

    runner = StepRunner(step, cuda_graphs=True)
    x, t, coef, salt = torch.zeros(2, 3, dtype=torch.long), torch.tensor(5), torch.zeros(9), torch.tensor(10)
    for final in (False, False, True, True):
        runner(x, t, coef, salt, final)
    assert len(cuda.streams) == 1  # one capture stream for the runner's whole life
    (stream,) = cuda.streams
    assert [c.stream for c in cuda.captures] == [stream, stream]  # step and final step: two captures, one stream
    assert cuda.captures[0].pool is None and cuda.captures[1].pool is cuda.graphs[0].pool()  # the second joins it
    assert {s for _, s in cuda.ran_on} == {stream}  # every warm-up and capture ran on it
    assert [kind for kind, _ in cuda.ran_on] == ["run", "run", "capture"] * 2  # GRAPH_WARMUP runs, then a capture
    assert stream.waited_for == [cuda.default, cuda.default]  # it starts after the caller's queued work
    assert [g.replays for g in cuda.graphs] == [2, 2]  # later calls replay, they capture nothing more
    assert cuda.current is cuda.default


# -- the command line ---------------------------------------------------------------------------------------------


def _thread_count_to_ask_for() -> int:
    """A count other than the one torch runs with now (1 in the suite), within the machine's CPUs."""
    import os

    wanted = 2 if torch.get_num_threads() != 2 else 1
    if wanted > (os.cpu_count() or 1):
        pytest.skip("needs a machine with 2 CPUs")
    return wanted


@pytest.mark.parametrize(("command", "sampler"), [("generate", "fast"), ("vary", "reference")])
def test_threads_flag_sets_the_count_the_run_computes_with(tiny, tmp_path, monkeypatch, image_file, command, sampler):
    """--threads N takes effect: every network call of the run sees N intra-op threads (not the count before)."""
    from typer.testing import CliRunner

    from vqdiff_cli.cli import app
    from vqdiff_cli.models.transformer import DiffusionTransformer

    before, wanted = torch.get_num_threads(), _thread_count_to_ask_for()
    seen: list[int] = []
    real_logits = DiffusionTransformer.logits

    def logits(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real_logits(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionTransformer, "logits", logits)
    head = [command, str(image_file), "--prompt"] if command == "vary" else [command]
    args = [*head, "a cat", "--model", str(tiny.path), "--device", "cpu", "--seed", "1", "--steps", "3"]
    try:
        r = CliRunner().invoke(
            app, [*args, "-o", str(tmp_path / "a.png"), "--sampler", sampler, "--threads", str(wanted)]
        )
    finally:
        torch.set_num_threads(before)  # process-wide: later tests run as before
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.png").is_file()
    assert len(seen) >= 2 and set(seen) == {wanted}  # vary runs part of the chain


def test_an_unknown_sampler_on_the_command_line_is_a_usage_error(tiny, tmp_path):
    from typer.testing import CliRunner

    from vqdiff_cli.cli import app

    args = ["generate", "a cat", "--model", str(tiny.path), "--device", "cpu", "-o", str(tmp_path / "b.png")]
    bad = CliRunner().invoke(app, [*args, "--sampler", "quick"])
    assert bad.exit_code == 2 and "unknown sampler" in bad.output


def test_thread_count_honours_omp_num_threads(monkeypatch):
    """With OMP_NUM_THREADS set, the count torch started with is kept (not replaced by the CPUs available); without
    it, the CPUs available are used; bad values and counts are refused."""
    from vqdiff_cli.device import available_cpus, configure_cpu_threads
    from vqdiff_cli.errors import UsageError

    before = torch.get_num_threads()
    started = available_cpus() + 1  # differs from the CPUs available, so the two rules give different counts
    try:
        for omp in (str(started), f"{started},1"):  # a list sets nested levels; torch's pool is the first
            torch.set_num_threads(started)  # as torch sets itself at start under OMP_NUM_THREADS=started
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
            assert configure_cpu_threads() == started
            assert torch.get_num_threads() == started
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert configure_cpu_threads() == available_cpus() == torch.get_num_threads()
        assert configure_cpu_threads(1) == 1 == torch.get_num_threads()  # --threads wins over either
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UsageError):
        configure_cpu_threads(0)
    with pytest.raises(UsageError, match="between 1 and"):
        configure_cpu_threads(100_000)  # torch would crash the process creating that many
    for bad in ("abc", "0", "-2"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        with pytest.raises(UsageError, match="not a thread count"):
            configure_cpu_threads()
    assert torch.get_num_threads() == before
