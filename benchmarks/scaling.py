"""Scaling over processes: images per second of one `vqdiff generate` run made by 1, 2, ... processes of one machine
(torchrun --nproc-per-node P), each with its share of the batches (vqdiff_cli/distributed.py).

The model is a random-weight checkpoint of a shipped architecture (`vqdiff_cli.checkpoint.random`, safetensors),
optionally with fewer transformer blocks (`--layers`) so that a CPU run takes minutes, not hours; the images are
noise, the work per image is the real architecture's (but for the blocks left out). Each run is a fresh
`torchrun ... -m vqdiff_cli generate` with the same prompts, seed and settings, into a new folder; its figures:

* images/s: images / the time of the generation loop that rank 0 reports ("N image(s) in T s"): from the first
  batch to the last image written on every process, without start-up and loading;
* wall: from starting torchrun to its exit (Python, torch, loading the model in every process, the loop).

A configuration is P (processes) or PxT (P processes of T threads each). On a CPU, one process gets every CPU the
machine gives it (OMP_NUM_THREADS is unset for the runs) and P processes share them (vqdiff gives each CPUs // P
threads); `1x1` shows what one process makes with one thread, the yardstick for P processes of one thread each. Each
image has its own prompt (-n 1). The 1-minute load average is recorded before each run: the machine may be shared.

    python benchmarks/scaling.py --work-dir /tmp/vqdiff-scaling --layers 1 --steps 4 --images 6 --runs 1,1x1,2
    python benchmarks/scaling.py --device cuda --runs 1,2,4,8 --images 256 --batch-size 16 --steps 100  # 8 GPUs

Writes benchmarks/results/scaling-<date>.json (or --output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a teddy bear in a pool", "a red ball on the grass", "a cat in a hat", "a lighthouse at night"]
SUMMARY = re.compile(r"^(\d+) image\(s\) in ([\d.]+) s", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_checkpoint(folder: Path, config: str, layers: int | None) -> dict[str, Any]:
    """A random-weight checkpoint of `config` (with `layers` transformer blocks when given), once per work dir."""
    from vqdiff_cli.checkpoint.random import architecture_configs, write_random_checkpoint

    configs = architecture_configs(config)
    if layers is not None:
        configs["transformer"]["num_layers"] = layers
    marker = folder / "scaling-configs.json"
    if not marker.is_file() or json.loads(marker.read_text()) != configs:
        write_random_checkpoint(folder, fmt="safetensors", configs=configs)
        marker.write_text(json.dumps(configs))
    return configs


def timed_run(args: argparse.Namespace, model: Path, config: str, out: Path) -> dict[str, Any]:
    processes, _, threads = config.partition("x")
    out.mkdir(parents=True)
    prompts = out / "prompts.txt"
    prompts.write_text("".join(f"{PROMPTS[i % len(PROMPTS)]} {i}\n" for i in range(args.images)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", processes]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "vqdiff_cli", "generate"]
    command += ["-f", str(prompts), "--seed", "0", "-o", f"{out}/{{index:06d}}.png"]
    command += ["--model", str(model), "--device", args.device, "--steps", str(args.steps)]
    command += ["--batch-size", str(args.batch_size), "--sampler", args.sampler]
    command += ["--threads", threads] if threads else []
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    load_average = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    found = SUMMARY.search(proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    images, loop = int(found[1]), float(found[2])
    return {
        "run": config,
        "processes": int(processes),
        "threads_per_process": int(threads) if threads else None,
        "images": images,
        "loop_s": loop,
        "images_per_s": images / loop,
        "wall_s": round(wall, 2),
        "load_average_before": load_average,
        "command": command,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vqdiff-scaling"))
    parser.add_argument("--config", default="ithq", help="a shipped architecture or a folder of its configs")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the architecture's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sampler", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=6, help="images per run")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", default="1,1x1,2", help="comma-separated P or PxT (P processes of T threads)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per process count (the median is reported)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    model = args.work_dir / "model"
    configs = write_checkpoint(model, args.config, args.layers)
    configurations = [c.strip() for c in args.runs.split(",") if c.strip()]
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for config in configurations:  # alternate them: a change in the machine's load touches all of them
            run = timed_run(args, model, config, args.work_dir / f"run-{config}-{repeat}-{time.time_ns()}")
            print(json.dumps({k: v for k, v in run.items() if k != "command"}), flush=True)
            runs.append(run)
    summary = []
    for config in configurations:
        mine = [r for r in runs if r["run"] == config]
        summary.append(
            {
                "run": config,
                "images_per_s": statistics.median(r["images_per_s"] for r in mine),
                "wall_s": statistics.median(r["wall_s"] for r in mine),
                "load_average_before": [r["load_average_before"] for r in mine],
            }
        )
    base = summary[0]["images_per_s"]
    for row in summary:
        row["vs_first"] = round(row["images_per_s"] / base, 3)
        print(
            f"{row['run']}: {row['images_per_s']:.3g} images/s ({row['vs_first']:.2f}x {summary[0]['run']}), wall "
            f"{row['wall_s']:.1f} s, load average {row['load_average_before']}"
        )
    import torch

    document = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "torch": torch.__version__,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "transformer_layers": configs["transformer"]["num_layers"],
        "summary": summary,
        "runs": runs,
    }
    output = args.output or ROOT / "benchmarks" / "results" / f"scaling-{document['date']}.json"
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
