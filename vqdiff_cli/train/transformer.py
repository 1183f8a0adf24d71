"""The transformer stage: a frozen VQ-VAE's token grids, a text encoder (frozen CLIP, or a small one trained from
scratch with a tokenizer built from the captions), and the VQ-Diffusion objective (`diffusion/loss.py`), with caption
dropout and a learned null embedding for classifier-free guidance. From scratch, or fine-tuning a pipeline
(`--from`), fully or through a LoRA adapter.

The result is a diffusers-format pipeline folder (or, with LoRA, an adapter folder).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checkpoint.random import random_modules
from ..config import NullEmbeddingConfig, PipelineConfig, SchedulerConfig, TransformerConfig
from ..diffusion import loss as objective
from ..diffusion.schedule import MaskAndReplaceSchedule
from ..errors import UsageError
from ..images import save_png
from ..models.text import TextConditioning
from ..models.transformer import DiffusionTransformer
from ..models.vqvae import VQVAE
from . import data, require_train_extra
from .export import export_lora, export_pipeline
from .loop import start_run, train
from .parts import (
    build_tokenizer,
    init_lora,
    load_text,
    load_vqvae,
    prepared_folder,
    scale_cross_attention,
    text_config,
)
from .plot import grid
from .task import LoopOptions, ProgressCallback, Run, StepResult, TrainResult

if TYPE_CHECKING:
    from ..checkpoint.load import Components


@dataclass(frozen=True)
class TransformerStageOptions:
    """What the transformer stage trains on and how; None means: the default, or what `from_model` fixes."""

    data: Path
    vqvae: str | None = None
    text_encoder: str | None = None
    train_text_encoder: bool = False
    from_model: str | None = None
    resolution: int | None = None
    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    timesteps: int | None = None
    text_layers: int = 4
    text_width: int = 256
    caption_dropout: float = 0.1
    caption_column: str = "text"
    strict: bool = False
    aux_weight: float = 5e-4
    adaptive_aux: bool = True
    mask_weight: float = 1.0
    unmask_weight: float = 1.0
    lora: int | None = None
    lora_alpha: int | None = None
    validation_prompts: tuple[str, ...] = ()
    validation_images: int = 2
    offline: bool = False
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.caption_dropout < 1:
            raise UsageError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if self.aux_weight < 0:
            raise UsageError(f"--aux-weight cannot be negative, got {self.aux_weight}")
        for name in ("layers", "width", "heads", "timesteps", "lora"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "timesteps" else 1):
                raise UsageError(f"--{name} must be at least {2 if name == 'timesteps' else 1}, got {value}")
        if self.from_model is not None:
            fixed = [f"--{n}" for n in ("layers", "width", "heads", "timesteps") if getattr(self, n) is not None]
            if fixed:
                raise UsageError(f"{', '.join(fixed)} cannot change the architecture of --from {self.from_model}")
            if self.text_encoder is not None:
                raise UsageError("--from brings its own text encoder; leave out --text-encoder")
        else:
            if self.vqvae is None:
                raise UsageError("training from scratch needs --vqvae VQ (e.g. a folder from `vqdiff train vqvae`)")
            if (self.text_encoder is None) == (not self.train_text_encoder):
                raise UsageError(
                    "choose the text encoder: --text-encoder MODEL (a frozen CLIP, e.g. microsoft/vq-diffusion-ithq)"
                    " or --train-text-encoder (a small one trained from scratch)"
                )
            if self.lora is not None:
                raise UsageError("--lora fine-tunes an existing model: give it --from MODEL")
        if self.lora is not None and self.train_text_encoder:
            raise UsageError("--lora adapts the transformer only; leave out --train-text-encoder")


# -- the network trained -------------------------------------------------------------------------------------------


class ConditionedTransformer(nn.Module):
    """Text ids -> per-token L2-normalised states (the null embedding where a caption is dropped) -> log p(x_0)."""

    def __init__(self, transformer: DiffusionTransformer, text: TextConditioning, null: torch.Tensor, train_text: bool):
        super().__init__()
        self.transformer = transformer
        self.text = text
        self.null_embedding = nn.Parameter(null.detach().clone().float())  # (L, D)
        self.train_text = train_text
        text.text_model.requires_grad_(train_text)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            states = self.text.encode_ids(ids)  # (B, L, D)
        # where() keeps the null embedding in the graph even when no caption is dropped (data-parallel needs it)
        context = torch.where(drop.view(-1, 1, 1), self.null_embedding.unsqueeze(0).to(states.dtype), states)
        log_p: torch.Tensor = self.transformer(x_t, context, t)
        return log_p


@dataclass
class TransformerTask:
    """The `Task` of the transformer stage (see loop.py)."""

    options: TransformerStageOptions
    config: PipelineConfig
    model: ConditionedTransformer
    vqvae: VQVAE
    tokens: data.TokenSet
    ids: torch.Tensor  # (M, L) caption ids
    tokenizer_dir: Path
    sources: dict[str, Any]
    seed: int
    lora_config: dict[str, Any] | None = None
    generator: torch.Generator = field(init=False)
    history: objective.TimestepHistory = field(init=False)
    kind: str = "transformer"

    def __post_init__(self) -> None:
        self.schedule = MaskAndReplaceSchedule.from_config(self.config.scheduler)
        self.weights = objective.LossWeights(
            self.options.mask_weight, self.options.unmask_weight, self.options.aux_weight, self.options.adaptive_aux
        )
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history = objective.TimestepHistory.empty(self.config.num_train_timesteps)

    def parts(self) -> dict[str, nn.Module]:
        return {"transformer": self.model.train()}

    def ema_parts(self) -> tuple[str, ...]:
        return ("transformer",)

    def run_config(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.tokens.tokens.numpy().tobytes())
        digest.update("\n".join(self.tokens.captions).encode())
        o = self.options
        return {
            "data": digest.hexdigest()[:24],
            "sources": self.sources,
            "transformer": asdict(self.config.transformer),
            "scheduler": asdict(self.config.scheduler),
            "text_encoder": {k: v for k, v in self.config.text_encoder.items() if not k.startswith("_")},
            "train_text_encoder": o.train_text_encoder,
            "loss": asdict(self.weights),
            "caption_dropout": o.caption_dropout,
            "lora": self.lora_config,
        }

    def micro_step(self, run: Run, step: int, micro: int) -> StepResult:
        dev = run.device
        g = self.generator
        place = step * run.options.grad_accum + micro
        idx = data.batch_indices(len(self.tokens), run.global_batch, place, run.options.seed)
        # every draw is made for the global batch on every rank, which then takes its slice
        t, p_t = objective.sample_timesteps(self.history, run.global_batch, g)
        drop = torch.rand(run.global_batch, generator=g) < self.options.caption_dropout
        x_0 = self.tokens.tokens[idx]
        x_t = objective.q_sample(x_0, t, self.schedule, g)
        mine = run.local_slice()
        local_t = t[mine].to(dev)
        log_p = run.models["transformer"](x_t[mine].to(dev), local_t, self.ids[idx][mine].to(dev), drop[mine].to(dev))
        terms = objective.vb_loss(
            log_p.float(), x_0[mine].to(dev), x_t[mine].to(dev), local_t, p_t[mine].to(dev), self.schedule, self.weights
        )
        vb = run.accelerator.gather(terms.vb) if run.world_size > 1 else terms.vb
        self.history = self.history.update(t, vb.cpu())
        numbers = {
            "loss": float(terms.loss.detach()),
            "vb": float(terms.vb.mean()),
            "aux": float(terms.aux.mean()),
            "nll": float(terms.decoder_nll.mean()),
        }
        return StepResult({"transformer": terms.loss}, numbers, run.options.batch_size)

    def after_update(self, run: Run, step: int) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "loss_sq": self.history.loss_sq,
            "count": self.history.count,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.history = objective.TimestepHistory(state["loss_sq"], state["count"])

    def components(self, run: Run) -> Components:
        from ..checkpoint.load import Components

        model: ConditionedTransformer = run.unwrapped("transformer")  # type: ignore[assignment]
        text = TextConditioning(model.text.tokenizer, model.text.text_model, model.null_embedding.detach())
        return Components(self.config, model.transformer, self.vqvae, text, {})

    def validate(self, run: Run, step: int) -> None:
        prompts = list(self.options.validation_prompts)
        if not prompts:
            return
        from ..options import GenerateOptions
        from ..pipeline.outputs import ModelSource
        from ..pipeline.pipeline import VQDiffusion

        model = run.unwrapped("transformer")
        model.eval()
        try:
            pipe = VQDiffusion(self.components(run), run.device, torch.float32, ModelSource("training", run.output))
            n = self.options.validation_images
            images = [
                r.image for r in pipe.generate(prompts, GenerateOptions(seed=0, num_images=n, sampler="reference"))
            ]
        finally:
            model.train()
        folder = run.output / "validation"
        folder.mkdir(exist_ok=True)
        save_png(grid(images, n), folder / f"step-{step:08d}.png", overwrite=True)

    def export(self, run: Run) -> None:
        model: ConditionedTransformer = run.unwrapped("transformer")  # type: ignore[assignment]
        if self.lora_config is not None:
            from peft import get_peft_model_state_dict

            export_lora(run.output, self.lora_config, get_peft_model_state_dict(model.transformer))
            return
        states = {
            "transformer": model.transformer.state_dict(),
            "vqvae": self.vqvae.state_dict(),
            "text_encoder": model.text.text_model.state_dict(),
            "learned_classifier_free_sampling_embeddings": {"embeddings": model.null_embedding.detach()},
        }
        export_pipeline(run.output, self.config, states, self.tokenizer_dir)


# -- building the task ---------------------------------------------------------------------------------------------


def _empty_prompt_states(text: TextConditioning) -> torch.Tensor:
    with torch.no_grad():
        ids = text.tokenizer(
            [""], padding="max_length", max_length=text.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return text.encode_ids(ids)[0]


def _check_same_vqvae(mine: VQVAE, theirs: VQVAE, source: str, model: str) -> None:
    if mine.config != theirs.config:
        raise UsageError(f"--vqvae {source} is not the VQ-VAE of --from {model} (another architecture)")
    if data.state_digest(mine.state_dict()) != data.state_digest(theirs.state_dict()):
        raise UsageError(f"--vqvae {source} is not the VQ-VAE of --from {model} (other weights)")


def build_transformer_task(
    options: TransformerStageOptions,
    output: Path,
    seed: int,
    device: torch.device,
    on_event: Callable[[str], None] | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> TransformerTask:
    """Load or make every part, encode (or read from the cache) the dataset's token grids, and wire the task."""
    say = on_event or (lambda message: None)
    o = options
    sources: dict[str, Any] = {"from": o.from_model, "vqvae": o.vqvae, "text_encoder": o.text_encoder}
    if o.from_model is not None:
        from ..checkpoint.load import load_components

        folder = prepared_folder(o.from_model, o.offline, o.cache_dir)
        components = load_components(folder, torch.device("cpu"), torch.float32)
        base = components.config
        vqvae = components.vqvae
        if o.vqvae is not None:
            _check_same_vqvae(load_vqvae(o.vqvae, o.offline, o.cache_dir)[0], vqvae, o.vqvae, o.from_model)
        native = base.image_size
        resolution = o.resolution or native
        if resolution != native:
            raise UsageError(
                f"--resolution {resolution} gives another token grid than --from {o.from_model} "
                f"({base.transformer.sample_size}x{base.transformer.sample_size} tokens, {native} px)"
            )
        text = components.text
        null = text.null_embedding.detach() if text.null_embedding is not None else _empty_prompt_states(text)
        text = TextConditioning(text.tokenizer, text.text_model, None)
        text_cfg = dict(base.text_encoder)
        text_length = text.max_length
        tokenizer_dir = folder / "tokenizer"
        transformer = components.transformer
        tcfg, scfg = base.transformer, base.scheduler
    else:
        assert o.vqvae is not None
        vqvae, native = load_vqvae(o.vqvae, o.offline, o.cache_dir)
        resolution = o.resolution or native
    factor = vqvae.config.downsample_factor
    if resolution % factor:
        raise UsageError(f"--resolution {resolution} is not a multiple of the VQ-VAE's downsampling factor {factor}")
    vqvae = vqvae.to(device)
    say(f"token grids of {o.data} at {resolution} px")
    tokens, hit = data.cached_tokens(
        output / "cache",
        o.data,
        resolution,
        data.state_digest(vqvae.state_dict()),
        lambda pixels: vqvae.encode(pixels.to(device)),
        caption_column=o.caption_column,
        strict=o.strict,
        on_image=on_image,
    )
    if hit:
        say(f"token grids read from the cache ({len(tokens)} images)")
    if tokens.skipped:
        say("warning: " + data.describe_skipped(tokens.skipped, o.data))
    if o.from_model is None:
        frozen_text = None
        if o.text_encoder is not None:
            frozen_text, text_cfg, tokenizer_dir = load_text(o.text_encoder, o.offline, o.cache_dir)
            text_length = frozen_text.max_length
        else:
            tokenizer_dir = output / "cache" / "tokenizer"
            tokenizer = build_tokenizer(tokenizer_dir, tokens.captions)
            text_length = int(tokenizer.model_max_length)
            text_cfg = text_config(len(tokenizer), o.text_width, o.text_layers, text_length)
        side = resolution // factor
        width, heads = o.width or 512, o.heads or 8
        if width % heads:
            raise UsageError(f"--width {width} is not a multiple of --heads {heads}")
        steps = o.timesteps or 100
        num_classes = vqvae.config.num_vq_embeddings + 1
        tcfg = TransformerConfig(
            num_vector_embeds=num_classes,
            sample_size=side,
            num_layers=o.layers or 8,
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            cross_attention_dim=int(text_cfg["hidden_size"]),
            num_embeds_ada_norm=steps,
        )
        scfg = SchedulerConfig(num_vec_classes=num_classes, num_train_timesteps=steps)
    cfg = PipelineConfig(
        transformer=tcfg,
        vqvae=vqvae.config,
        scheduler=scfg,
        null_embedding=NullEmbeddingConfig(True, int(text_cfg["hidden_size"]), text_length),
        text_encoder=text_cfg,
    )
    if o.from_model is None:
        fresh = random_modules(cfg, seed)
        new_transformer = fresh["transformer"]
        assert isinstance(new_transformer, DiffusionTransformer)
        transformer = new_transformer
        scale_cross_attention(transformer)
        if frozen_text is not None:
            text = frozen_text
        else:
            from transformers import CLIPTextModel

            text_model = fresh["text_encoder"]
            assert isinstance(text_model, CLIPTextModel)
            text = TextConditioning(tokenizer, text_model, None)
        null = _empty_prompt_states(text)
    lora_config = None
    if o.lora is not None:
        lora_config = init_lora(transformer, o.lora, o.lora_alpha or o.lora, seed)
        lora_config["base_model_name_or_path"] = o.from_model
    else:
        transformer.requires_grad_(True)
    model = ConditionedTransformer(transformer, text, null, o.train_text_encoder)
    if o.lora is not None:
        model.null_embedding.requires_grad_(False)
    ids = text.tokenize(tokens.captions)
    cut = sum(1 for c in ids.truncated if c)
    if cut:
        say(f"warning: {cut} caption(s) longer than {text.max_length} tokens were cut")
    return TransformerTask(
        options=o,
        config=cfg,
        model=model.to(device),
        vqvae=vqvae,
        tokens=tokens,
        ids=ids.ids,
        tokenizer_dir=tokenizer_dir,
        sources=sources,
        seed=seed,
        lora_config=lora_config,
    )


def train_transformer(
    options: TransformerStageOptions,
    loop: LoopOptions,
    output: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_event: Callable[[str], None] | None = None,
    on_image: Callable[[int, int], None] | None = None,
    on_progress: ProgressCallback | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """`vqdiff train transformer`: check the run folder, build the task, train, export."""
    from .export import LORA_CONFIG, LORA_WEIGHTS, PIPELINE_ENTRIES

    if options.lora is not None:
        require_train_extra(lora=True)
    written = (LORA_CONFIG, LORA_WEIGHTS) if options.lora is not None else PIPELINE_ENTRIES
    accelerator = start_run(loop, output, resume=resume, overwrite=overwrite, written=written)
    with accelerator.main_process_first():  # the main process fills the token cache, the others then read it
        task = build_transformer_task(options, output, loop.seed, accelerator.device, on_event, on_image)
    return train(task, loop, output, resume=resume, accelerator=accelerator, on_progress=on_progress, on_step=on_step)
