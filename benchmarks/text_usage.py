"""How much a trained model reads its captions: the cross-entropy of x_0 at timestep t over the masked positions,
with each picture's own caption and with another picture's (the batch rolled by one), on dataset pictures.

    python benchmarks/text_usage.py MODEL DATA [--count 48] [--timesteps 99,95,90,70]

MODEL is a pipeline folder (e.g. an exported `vqdiff train transformer` run), DATA a folder from `vqdiff dataset
shapes` (its first COUNT pictures). The gain (shuffled minus own, in nats per masked token) is what the text is worth
to the network: about 0 for a model that ignores its captions. At t = T - 1 every token is masked, so the text is the
only thing that tells the background colour; on the shapes data knowing it is worth about 1.4 nats per token (the
token entropy is 4.38 nats, 2.75 given the background). At lower t, visible tokens tell most of it. Masks at t < T - 1
are drawn with probability gamma-bar(t) per position, seeded, the same for both captions.

The swap gain is the same measure against the own caption with its two colour words exchanged ("a red circle on a
blue background" against "a blue circle on a red background"), over the pictures whose caption names both colours:
a model that knows which colours a caption names but not which is the background's gains nothing from it.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule
from vqdiff_cli.pipeline.model import LoadedModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("data", type=Path)
    p.add_argument("--count", type=int, default=48)
    p.add_argument("--timesteps", default="99,95,90,70")
    o = p.parse_args()
    model = LoadedModel.from_pretrained(o.model, device="cpu", dtype="float32")
    c = model.components
    rows = [json.loads(line) for line in (o.data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = rows[: o.count]
    size = c.config.image_size
    pixels = [np.asarray(Image.open(o.data / r["file_name"]).convert("RGB").resize((size, size))) for r in rows]
    x = torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    schedule = MaskAndReplaceSchedule.from_config(c.config.scheduler)
    mask = c.config.transformer.num_vector_embeds - 1
    with torch.no_grad():
        x_0 = c.vqvae.encode(x).flatten(1)
        own = c.text.encode([r["text"] for r in rows])
        other = torch.roll(own, 1, 0)
        both = [i for i, r in enumerate(rows) if {"color", "background"} <= set(r.get("named", []))]
        swapped = c.text.encode([swap_colours(rows[i]) for i in both]) if both else None
        print(f"{o.model}: {len(rows)} pictures of {o.data}")
        for t in [int(s) for s in o.timesteps.split(",") if s]:
            g = torch.Generator().manual_seed(t)
            masked = torch.rand(x_0.shape, generator=g) < float(schedule.cumprod_ct[t])
            x_t = torch.where(masked, torch.full_like(x_0, mask), x_0)
            own_nll, other_nll = (token_nll(c.transformer, x_t, x_0, states, t) for states in (own, other))
            ce = [float(n[masked].mean()) if masked.any() else float("nan") for n in (own_nll, other_nll)]
            swap = ""
            if swapped is not None and masked[both].any():
                swapped_nll = token_nll(c.transformer, x_t[both], x_0[both], swapped, t)
                gain = float((swapped_nll - own_nll[both])[masked[both]].mean())
                swap = f"; colours swapped ({len(both)} pictures): gain {gain:.3f}"
            print(
                f"t={t:3d} masked {float(masked.float().mean()):.0%}: CE own caption {ce[0]:.3f}, shuffled "
                f"{ce[1]:.3f}, gain {ce[1] - ce[0]:.3f} nats/token{swap}"
            )


def token_nll(
    transformer: Callable[..., torch.Tensor], x_t: torch.Tensor, x_0: torch.Tensor, states: torch.Tensor, t: int
) -> torch.Tensor:
    """-log p(x_0) per position under the network's x_0 prediction at timestep t."""
    log_p = transformer(x_t, states, torch.full((len(x_t),), t))
    return -log_p.gather(1, x_0.unsqueeze(1)).squeeze(1)


def swap_colours(row: dict[str, object]) -> str:
    """The caption with its object colour and background colour words exchanged."""
    a, b = str(row["color"]), str(row["background"])
    return re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(1) == a else a, str(row["text"]))


if __name__ == "__main__":
    main()
