"""Text conditioning: CLIP text states, L2-normalised per token, and the unconditional ("null") embedding.

The prompt side mirrors diffusers' `VQDiffusionPipeline._encode_prompt`: 77 ids padded with "!" (id 0), no
truncation flag (a longer prompt is sliced, dropping EOS), `last_hidden_state` divided by its norm at every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer


def build_clip_text_model(config: dict[str, Any]) -> CLIPTextModel:
    """An uninitialised `CLIPTextModel` on the meta device; `checkpoint/load.py` fills it with `assign=True`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clean = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",)}
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**clean))


def restore_position_ids(model: nn.Module) -> None:
    """Give non-persistent `position_ids` buffers (not in any checkpoint) real values after a meta build."""
    for module in model.modules():
        buf = getattr(module, "position_ids", None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            module.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)


@dataclass
class PromptIds:
    ids: torch.Tensor  # (B, L) int64
    truncated: list[str]  # per prompt: the text that did not fit ("" when everything fit)


class TextConditioning(nn.Module):
    """Tokenizer + CLIP text encoder + (optional) learned null embedding."""

    def __init__(self, tokenizer: CLIPTokenizer, text_model: CLIPTextModel, null_embedding: torch.Tensor | None):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_model = text_model
        # (L, D) learned unconditional states, used as stored; None means: embed the empty prompt.
        self.null_embedding = nn.Parameter(null_embedding, requires_grad=False) if null_embedding is not None else None

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def device(self) -> torch.device:
        return self.text_model.embeddings.token_embedding.weight.device

    def tokenize(self, prompts: list[str]) -> PromptIds:
        """Each prompt padded to, or cut at, `max_length` tokens (one at a time: rows of a batch may differ in
        length before the cut), with the text that was cut off."""
        rows, truncated = [], []
        for prompt in prompts:
            ids = self.tokenizer([prompt], padding="max_length", max_length=self.max_length, return_tensors="pt")
            row = ids.input_ids[0]
            cut = cast(str, self.tokenizer.decode(row[self.max_length :], skip_special_tokens=True))  # one string
            rows.append(row[: self.max_length])
            truncated.append(cut.strip())
        return PromptIds(torch.stack(rows), truncated)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) float32 states, each position divided by its L2 norm."""
        states: torch.Tensor = self.text_model(ids.to(self.device))[0]
        norms: torch.Tensor = states.norm(dim=-1, keepdim=True)  # Tensor.norm is untyped
        return states / norms

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(prompts).ids)

    def unconditional(self, batch: int) -> torch.Tensor:
        """(batch, L, D) states for the classifier-free branch."""
        if self.null_embedding is not None:
            return self.null_embedding.unsqueeze(0).repeat(batch, 1, 1)
        ids = self.tokenizer(
            [""] * batch, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.encode_ids(ids)
