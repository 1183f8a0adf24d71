"""LoRA adapters of the transformer, in peft's folder format (`adapter_config.json` + `adapter_model.safetensors`, as
`vqdiff train transformer --lora` writes them), merged into the weights at load time: W + scale x (alpha / r) B A.

Merging needs no peft: generation with an adapter runs at the speed of the plain model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoraAdapter:
    folder: Path
    rank: int
    alpha: float
    rslora: bool
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))
    base_model: str | None

    @property
    def scaling(self) -> float:
        """peft's factor on B A: alpha / r (alpha / sqrt(r) with rank-stabilised LoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def read_adapter(folder: Path | str) -> LoraAdapter:
    """Read and check a LoRA adapter folder; any problem is one UsageError naming it."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise UsageError(
            f"--lora {folder}: not a LoRA adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})",
            hint="make one with vqdiff train transformer --from MODEL --lora RANK",
        )
    try:
        config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        state = load_file(str(weights_path), device="cpu")
    except Exception as e:
        raise UsageError(f"--lora {folder}: cannot read it: {e}".splitlines()[0]) from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UsageError(f"--lora {folder}: a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise UsageError(f"--lora {folder}: DoRA and fan_in_fan_out adapters are not supported")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            raise UsageError(f"--lora {folder}: unexpected tensor {key} (only lora_A / lora_B weights)")
        parts.setdefault(m.group(1), {})[m.group(2)] = value
    pairs = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise UsageError(f"--lora {folder}: {name} has lora_{next(iter(ab))} without its pair")
        pairs[name] = (ab["A"], ab["B"])
    if not pairs:
        raise UsageError(f"--lora {folder}: the adapter holds no weights")
    rank = int(config.get("r", next(iter(pairs.values()))[0].shape[0]))
    alpha = float(config.get("lora_alpha", rank))
    base = config.get("base_model_name_or_path")
    return LoraAdapter(
        folder, rank, alpha, bool(config.get("use_rslora")), pairs, base if isinstance(base, str) else None
    )


@torch.no_grad()
def merge_lora(model: nn.Module, adapter: LoraAdapter, scale: float = 1.0) -> int:
    """Add scale x scaling x B A to each adapted Linear of `model` (in float32, then its dtype); returns how many."""
    modules = dict(model.named_modules())
    for name, (a, b) in adapter.pairs.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise UsageError(f"--lora {adapter.folder}: the model has no linear layer {name}")
        if a.shape != (adapter.rank, layer.in_features) or b.shape != (layer.out_features, adapter.rank):
            raise UsageError(
                f"--lora {adapter.folder}: {name} is {tuple(layer.weight.shape)} in the model but the adapter's "
                f"B A is {(b.shape[0], a.shape[1])} of rank {a.shape[0]} (made for another model?)"
            )
    for name, (a, b) in adapter.pairs.items():
        layer = modules[name]
        assert isinstance(layer, nn.Linear)
        delta = (b.float() @ a.float()) * (adapter.scaling * scale)
        layer.weight.copy_((layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype))
    return len(adapter.pairs)
