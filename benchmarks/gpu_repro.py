"""What re-running an image reproduces on a device, at full size: run to run, in its rebuilt batch (what
`vqdiff generate --from-image --same-batch` does), and alone. `benchmarks/gpu_check.sh` runs it on the GPU machine.

    python benchmarks/gpu_repro.py --device cuda --dtype float16 --out repro.json

The ITHQ architecture with random weights (the images are noise; the arithmetic is the real model's). For each
sampler: a batch of `--batch` images, the same batch again, image `--position` re-run in a rebuilt batch of the same
size at the same position, and the same image alone (batch 1). The README promises on a GPU: the same tokens for the
same batch size; alone they may differ (cuBLAS picks kernels by problem size); on a CPU in float32, the same alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vqdiff_cli import GenerateOptions, VQDiffusion
from vqdiff_cli.checkpoint.random import architecture_configs, random_components
from vqdiff_cli.device import DTYPES, device_name, resolve_device
from vqdiff_cli.options import Job, batch_around
from vqdiff_cli.pipeline.outputs import ModelSource

PROMPT = "a teddy bear playing in the pool"


def check(pipe: VQDiffusion, sampler: str, batch: int, position: int, steps: int, seed: int) -> dict[str, object]:
    started = time.perf_counter()
    options = GenerateOptions(seed=seed, num_images=batch, batch_size=batch, steps=steps, sampler=sampler)
    first = [r.tokens for r in pipe.generate(PROMPT, options)]
    again = [r.tokens for r in pipe.generate(PROMPT, options)]
    kept = Job(PROMPT, seed + position, 0)
    rebuilt = [r.tokens for r in pipe.generate(batch_around(kept, batch, position), options) if r.seed == kept.seed]
    alone = pipe.generate(PROMPT, GenerateOptions(seed=kept.seed, steps=steps, sampler=sampler))[0].tokens
    target = first[position]
    return {
        "sampler": sampler,
        "batch": batch,
        "position": position,
        "steps": steps,
        "run_to_run_equal": all(torch.equal(a, b) for a, b in zip(first, again, strict=True)),
        "same_batch_equal": torch.equal(rebuilt[0], target),
        "alone_equal": torch.equal(alone, target),
        "alone_tokens_differing": int((alone != target).sum()),
        "tokens": int(target.numel()),
        "fallbacks": pipe.acceleration_notes,
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float16", help="comma-separated")
    parser.add_argument("--config", default="ithq", help="a shipped architecture or a config folder")
    parser.add_argument("--samplers", default="fast,reference")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--position", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = resolve_device(args.device)
    configs = architecture_configs(args.config)
    report: dict[str, object] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "config": args.config,
        "prompt": PROMPT,
        "results": [],
    }
    results: list[dict[str, object]] = []
    report["results"] = results
    for dtype in args.dtype.split(","):
        built = time.perf_counter()
        components = random_components(configs, device, DTYPES[dtype], seed=0)
        pipe = VQDiffusion(components, device, DTYPES[dtype], ModelSource("random weights", Path(".")))
        print(f"{dtype}: model built in {time.perf_counter() - built:.0f} s", flush=True)
        for sampler in args.samplers.split(","):
            row = {"dtype": dtype, **check(pipe, sampler, args.batch, args.position, args.steps, args.seed)}
            if device.type == "cuda":
                row["max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
            results.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")  # kept if cut short
        del pipe, components
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
