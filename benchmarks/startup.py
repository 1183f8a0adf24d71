"""Start-up time: from process start to the first denoising step, cold (first load after the download, converting the
pickled .bin weights to safetensors) and warm (from vqdiff's converted cache); and `vqdiff --help` against
`python -c "import torch"`.

The model is a full-size ITHQ-architecture checkpoint with random weights (`vqdiff_cli.checkpoint.random`, fp32 .bin
files as on the Hub, about 6 GB), published on the Hub stand-in of the tests (tests/hub_server.py) on 127.0.0.1 and
fetched into a fresh Hub cache with huggingface_hub, as diffusers would. Each timed run is a new process that loads
the model the way `vqdiff generate` does (`cli.common.load_model` with a repo id, `--revision <commit> --offline`: no
network) and reports the wall-clock time at its first `on_step` callback; the parent subtracts the time it spawned the
process.

    python benchmarks/startup.py --work-dir /tmp/vqdiff-bench            # writes benchmarks/results/startup-*.json
    python benchmarks/startup.py --help-only                             # only the --help figures

Needs about 20 GB free in --work-dir (checkpoint, Hub cache, converted cache) and about 12 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPO = "bench/vq-diffusion-ithq-random"

# The child: load as `vqdiff generate` does, then report the time of the first denoising step and stop.
CHILD = """
import json, os, sys, time
from vqdiff_cli.cli.common import load_model
from vqdiff_cli.cli.console import Output
from vqdiff_cli.pipeline.pipeline import GenerateOptions
args = json.loads(sys.argv[1])
pipe = load_model(Output(quiet=True), args["model"], device="cpu", dtype="float32", variant="auto",
                  revision=args["revision"], offline=True)
loaded = time.time()
def first_step(event):
    print(json.dumps({"loaded": loaded, "first_step": time.time(), "variants": pipe.components.variants}), flush=True)
    os._exit(0)
for _ in pipe.generate_iter("a teddy bear in a pool", GenerateOptions(seed=0, steps=10), on_step=first_step):
    pass
"""


def timed_child(env: dict[str, str], revision: str) -> dict[str, object]:
    load_average = round(os.getloadavg()[0], 2)  # the machine may be shared: say how busy it was
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"model": REPO, "revision": revision})],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "load_s": round(report["loaded"] - start, 2),
        "first_step_s": round(report["first_step"] - start, 2),
        "step_s": round(report["first_step"] - report["loaded"], 2),
        "load_average_1min": load_average,
        "variants": report["variants"],
    }


def median_run(cmd: list[str], runs: int, env: dict[str, str]) -> dict[str, object]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
    return {"command": shown, "runs": runs, "median_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3)}  # fmt: skip


def help_figures(runs: int) -> dict[str, object]:
    env = dict(os.environ)
    vqdiff = shutil.which("vqdiff") or "vqdiff"
    return {
        "vqdiff_help": median_run([vqdiff, "--help"], runs, env),
        "import_torch": median_run([sys.executable, "-c", "import torch"], runs, env),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("vqdiff", "torch", "huggingface_hub", "safetensors", "transformers")} | {
        "python": platform.python_version()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vqdiff-startup-bench"))
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--help-runs", type=int, default=5)
    parser.add_argument("--help-only", action="store_true", help="measure only `vqdiff --help` and `import torch`")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and caches in --work-dir")
    parser.add_argument("--output", type=Path, default=None, help="JSON results (default: benchmarks/results/)")
    args = parser.parse_args()

    result: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    result["help"] = help_figures(args.help_runs)
    print(json.dumps(result["help"], indent=2), flush=True)

    if not args.help_only:
        result["startup"] = model_figures(args.work_dir, args.warm_runs, args.keep)
        print(json.dumps(result["startup"], indent=2), flush=True)

    out = args.output or ROOT / "benchmarks" / "results" / f"startup-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def model_figures(work: Path, warm_runs: int, keep: bool) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from huggingface_hub import snapshot_download

    from tests.hub_server import FakeHub
    from vqdiff_cli.checkpoint.random import write_random_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint"
    if not (checkpoint / "model_index.json").is_file():
        t = time.perf_counter()
        write_random_checkpoint(checkpoint, "ithq", fmt="bin")
        print(f"wrote the random ITHQ checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    for cache in ("hf", "vq"):
        shutil.rmtree(work / cache, ignore_errors=True)

    hub = FakeHub()
    commit = hub.publish(REPO, checkpoint)
    hub.start()
    env = dict(os.environ)
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(work / "hf"), VQDIFF_CACHE_DIR=str(work / "vq"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        env.pop(var, None)
    try:
        t = time.perf_counter()
        snapshot_download(REPO, revision=commit, endpoint=hub.endpoint, cache_dir=str(work / "hf" / "hub"))
        download_s = time.perf_counter() - t
    finally:
        hub.stop()
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())

    cold = timed_child(env, commit)  # converts the .bin files from the Hub cache into vqdiff's cache
    warm = [timed_child(env, commit) for _ in range(warm_runs)]
    figures = {
        "checkpoint_bytes": size,
        "download_s": round(download_s, 1),
        "cold": cold,
        "warm_runs": warm,
        "warm_median_first_step_s": statistics.median(float(w["first_step_s"]) for w in warm),  # type: ignore[arg-type]
        "warm_median_load_s": statistics.median(float(w["load_s"]) for w in warm),  # type: ignore[arg-type]
        "note": "first_step_s: process start to the first on_step callback (10-step schedule, guidance 5, so a "
        "batch of 2, CPU float32); load_s: process start to the model loaded; step_s: the difference, mostly one "
        "forward pass of the 1.36e9-parameter transformer. Warm runs read files the OS has cached.",
    }
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    main()
