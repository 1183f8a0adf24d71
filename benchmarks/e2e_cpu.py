"""End to end on the CPU: the whole `vqdiff generate` process against a diffusers script doing the same, as whole
processes in alternation, with a timer at every stage of each.

    python benchmarks/e2e_cpu.py pairs --model DIR --pairs 3 -o benchmarks/results/e2e.json   # ratios, as JSON
    python benchmarks/e2e_cpu.py pairs --model DIR --pairs 3 --sampler fast
    python benchmarks/e2e_cpu.py pairs --model DIR --pairs 3 --converted --work-dir /tmp/e2e  # vqdiff from its cache
    python benchmarks/e2e_cpu.py diffusers --model DIR -o out.png                # the diffusers program alone
    python benchmarks/e2e_cpu.py stages --model DIR                              # one run of each, stage by stage

DIR is a diffusers-format folder in the Hub's layout (fp32 `.bin` files), for instance a full-size ITHQ-architecture
checkpoint with random weights written by `vqdiff_cli.checkpoint.random.write_random_checkpoint`. The vqdiff side is
`python -m vqdiff_cli generate P --model DIR --steps S --device cpu --dtype float32 --seed 0 -o out.png`; the diffusers
side builds `VQDiffusionPipeline` from its components loaded one by one with `from_pretrained` (diffusers' own .bin
reader) and saves the PNG with PIL. With `--converted`, the folder is published on the tests' Hub stand-in
(tests/hub_server.py), downloaded into a fresh Hub cache and converted once by vqdiff, and the timed vqdiff runs load
it by repo id at its commit with `--offline` (memory-mapped safetensors from vqdiff's cache, no network); diffusers
still reads DIR. Each pair runs vqdiff first, then diffusers, or the other way round (alternating), and the
1-minute load average is recorded before every run: the machine may be shared.

`stages` (and `--stages` on pairs) runs each program in-process under stage timers: the time of process start to
the first line, imports, model resolution, loading, text encoding, each transformer forward (the first one touches
memory-mapped weights), the step math between forwards, the VQ decode, the PNG write, and the interpreter's exit
(from the last line of the program to the parent seeing the process end). The timers wrap functions without changing
what they compute.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a teddy bear in a pool"
REPO = "bench/vq-diffusion-ithq-random"


# -- stage timers (used inside the timed children) -------------------------------------------------------------------


class Stages:
    """Wall-clock marks and wrapped calls, written as JSON to a file at exit (atexit: before interpreter teardown)."""

    def __init__(self, path: str | None, started: float) -> None:
        self.path = path
        self.marks: list[tuple[str, float]] = [("first line", started)]
        self.calls: list[dict[str, Any]] = []
        if path:
            import atexit

            atexit.register(self.write)

    def mark(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.span(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start, usage = time.time(), _usage()
        try:
            yield
        finally:
            spent = {k: round(v - usage[k], 2) for k, v in _usage().items()}
            self.calls.append({"stage": name, "start": start, "end": time.time(), **spent})

    def write(self) -> None:
        self.mark("last line")
        assert self.path is not None
        Path(self.path).write_text(json.dumps({"marks": self.marks, "calls": self.calls}), encoding="utf-8")


def _usage() -> dict[str, float]:
    """This process's CPU seconds (user + system) and page faults so far: contention on a shared machine stretches
    wall time, less so the CPU time a stage needs."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": r.ru_utime + r.ru_stime, "minor_faults": r.ru_minflt, "major_faults": r.ru_majflt}


# -- the two programs ------------------------------------------------------------------------------------------------


def run_vqdiff_instrumented(argv: list[str], stages_path: str, started: float) -> None:
    """`vqdiff generate ...` in this process, with stage timers around the functions a run calls."""
    st = Stages(stages_path, started)
    import torch  # noqa: F401  (imported by the CLI anyway; timed apart from the CLI's own modules)

    st.mark("import torch")
    import vqdiff_cli.device as device
    import vqdiff_cli.images as images
    import vqdiff_cli.models.transformer as transformer
    import vqdiff_cli.pipeline.model as model
    from vqdiff_cli.cli import main

    st.mark("import vqdiff")
    st.wrap(model, "prepare", "model resolution")
    st.wrap(model, "load_components", "loading")
    st.wrap(device, "configure_cpu_threads", "thread settings")
    st.wrap(model.LoadedModel, "_encode_prompts", "text encoding")
    st.wrap(transformer.DiffusionTransformer, "forward", "transformer forward")
    st.wrap(model.LoadedModel, "decode", "VQ decode")
    st.wrap(images, "save_png", "PNG write")
    sys.argv = ["vqdiff", *argv]
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def diffusers_view(model: Path, view: Path) -> str:
    """`model` as diffusers 0.42.1 can load it: Transformer2DModel.from_pretrained looks up the config's `norm_type`,
    which the Hub's 2022 ITHQ config lacks (KeyError). The view links every file of `model` (the same weights files
    are read) but for a copy of transformer/config.json with "norm_type": "ada_norm" (what diffusers infers anyway
    from `num_embeds_ada_norm`)."""
    config = json.loads((model / "transformer" / "config.json").read_text(encoding="utf-8"))
    if "norm_type" in config:
        return str(model)
    for path in model.rglob("*"):
        target = view / path.relative_to(model)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path != model / "transformer" / "config.json":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    (view / "transformer" / "config.json").write_text(json.dumps({**config, "norm_type": "ada_norm"}), encoding="utf-8")
    return str(view)


def run_diffusers(model: str, steps: int, seed: int, output: str, stages_path: str | None, started: float) -> None:
    """diffusers' VQDiffusionPipeline from components loaded one by one, `steps` steps, one PNG."""
    st = Stages(stages_path, started)
    import torch

    st.mark("import torch")
    from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion import LearnedClassifierFreeSamplingEmbeddings
    from transformers import CLIPTextModel, CLIPTokenizer

    st.mark("import diffusers")
    if stages_path:
        st.wrap(CLIPTextModel, "forward", "text encoding")
        st.wrap(Transformer2DModel, "forward", "transformer forward")
        st.wrap(VQModel, "decode", "VQ decode")
        st.wrap(VQDiffusionScheduler, "step", "step math")
    loading = st.span("loading")
    loading.__enter__()
    view = tempfile.TemporaryDirectory(prefix="diffusers-view-")
    model = diffusers_view(Path(model), Path(view.name))
    transformer = Transformer2DModel.from_pretrained(model, subfolder="transformer")
    vqvae = VQModel.from_pretrained(model, subfolder="vqvae")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    scheduler = VQDiffusionScheduler.from_pretrained(model, subfolder="scheduler")
    null = LearnedClassifierFreeSamplingEmbeddings.from_pretrained(
        model, subfolder="learned_classifier_free_sampling_embeddings"
    )
    pipe = VQDiffusionPipeline(
        vqvae=vqvae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
        learned_classifier_free_sampling_embeddings=null,
    )
    pipe.set_progress_bar_config(disable=True)
    loading.__exit__(None, None, None)
    with torch.inference_mode():
        image = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    st.mark("pipeline call")
    with st.span("PNG write"):
        image.save(output)


# -- the parent: whole processes, timed from outside ------------------------------------------------------------------


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one whole process: wall seconds, its CPU seconds and page faults (from wait4), the load average. It runs in
    the temporary folder (`python -m` puts the working folder first on sys.path: not this checkout, for --vqdiff-src).
    """
    before = load_average()
    start = time.perf_counter()
    start_wall = time.time()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=tempfile.gettempdir())
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {
        "seconds": round(seconds, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "minor_faults": usage.ru_minflt,
        "major_faults": usage.ru_majflt,
        "max_rss_gib": round(usage.ru_maxrss / 2**20, 2),
        "load_average_before": before,
        "load_average_after": load_average(),
        "start_wall": start_wall,
        "end_wall": start_wall + seconds,
    }


def stage_table(report: dict[str, Any], spawned: float, ended: float) -> dict[str, Any]:
    """Per stage: wall seconds, and the CPU seconds and page faults of the wrapped calls (a list for a stage that ran
    more than once, such as the transformer forward); gaps before the first line and after the last are timed from
    the parent's clock."""
    marks = dict(report["marks"])
    out: dict[str, Any] = {"process start to first line": round(marks["first line"] - spawned, 2)}
    names = [m for m, _ in report["marks"]]
    for prev, name in itertools.pairwise(names):
        if name.startswith("import"):
            out[name] = round(marks[name] - marks[prev], 2)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for c in report["calls"]:
        grouped.setdefault(c["stage"], []).append(c)
    for stage, calls in grouped.items():
        rows = [
            {
                "wall_s": round(c["end"] - c["start"], 2),
                "cpu_s": c["cpu_s"],
                "minor_faults": c["minor_faults"],
                "major_faults": c["major_faults"],
            }
            for c in calls
        ]
        out[stage] = rows if len(rows) > 1 else rows[0]
    out["interpreter exit (last line to process end)"] = round(ended - marks["last line"], 2)
    return out


def vqdiff_cmd(args: argparse.Namespace, model: str, output: Path, converted: dict[str, str] | None) -> list[str]:
    cmd = [sys.executable, "-m", "vqdiff_cli", "generate", PROMPT, "--model", model, "--steps", str(args.steps)]
    cmd += ["--device", "cpu", "--dtype", "float32", "--seed", "0", "-o", str(output), "--overwrite", "--quiet"]
    if args.sampler != "reference":
        cmd += ["--sampler", args.sampler]
    if converted:
        cmd += ["--revision", converted["commit"], "--offline"]
    return cmd


def diffusers_cmd(args: argparse.Namespace, output: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "diffusers", "--model", str(args.model),
            "--steps", str(args.steps), "-o", str(output)]  # fmt: skip


def prepare_converted(work: Path, model: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Publish `model` on the Hub stand-in, download it into a fresh Hub cache, convert it once with vqdiff."""
    sys.path.insert(0, str(ROOT))
    import shutil

    from huggingface_hub import snapshot_download

    from tests.hub_server import FakeHub

    for cache in ("hf", "vq"):
        shutil.rmtree(work / cache, ignore_errors=True)
    hub = FakeHub()
    commit = hub.publish(REPO, model)
    hub.start()
    env = dict(os.environ)
    env.update(HF_HOME=str(work / "hf"), VQDIFF_CACHE_DIR=str(work / "vq"), HF_HUB_OFFLINE="1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        env.pop(var, None)
    try:
        snapshot_download(REPO, revision=commit, endpoint=hub.endpoint, cache_dir=str(work / "hf" / "hub"))
    finally:
        hub.stop()
    convert = [sys.executable, "-m", "vqdiff_cli", "download", REPO, "--revision", commit, "--offline", "--quiet"]
    subprocess.run(convert, env=env, check=True, capture_output=True)
    return {"commit": commit}, env


def run_stages(args: argparse.Namespace, work: Path, env: dict[str, str], converted: dict[str, str] | None) -> dict:
    model = REPO if converted else str(args.model)
    results = {}
    for engine in ("vqdiff", "diffusers"):
        report_path = work / f"stages-{engine}.json"
        output = work / f"stages-{engine}.png"
        if engine == "vqdiff":
            argv = vqdiff_cmd(args, model, output, converted)[3:]
            cmd = [sys.executable, str(Path(__file__).resolve()), "vqdiff-instrumented", str(report_path), *argv]
        else:
            cmd = [*diffusers_cmd(args, output), "--stages", str(report_path)]
        run = timed(cmd, env if engine == "vqdiff" else dict(os.environ))
        report = json.loads(report_path.read_text(encoding="utf-8"))
        whole = {k: v for k, v in run.items() if k not in ("start_wall", "end_wall")}
        results[engine] = {"whole process": whole} | stage_table(report, run["start_wall"], run["end_wall"])
        print(json.dumps({engine: results[engine]}), flush=True)
    return results


def run_pairs(args: argparse.Namespace) -> None:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vqdiff-e2e-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    converted = None
    if args.converted:
        converted, env = prepare_converted(work, args.model)
    if args.vqdiff_src:  # an older (or other) source tree of vqdiff, e.g. a git worktree of the commit before a fix
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.vqdiff_src.resolve()), env.get("PYTHONPATH")) if p)
    model = REPO if converted else str(args.model)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "versions": versions(),
        "vqdiff_src": str(args.vqdiff_src or ROOT),
        "vqdiff_command": shlex.join(vqdiff_cmd(args, model, Path("out.png"), converted)[1:]),
        "diffusers_command": shlex.join(diffusers_cmd(args, Path("out.png"))[1:]),
        "note": "whole processes, alternating; the 1-minute load average before each run says how busy the shared "
        "machine was",
    }
    if args.stages:
        result["stages"] = run_stages(args, work, env, converted)
    pairs = []
    for i in range(args.pairs):
        order = ("vqdiff", "diffusers") if i % 2 == 0 else ("diffusers", "vqdiff")
        pair: dict[str, Any] = {"order": list(order)}
        for engine in order:
            output = work / f"{engine}.png"
            if engine == "vqdiff":
                pair[engine] = timed(vqdiff_cmd(args, model, output, converted), env)
            else:
                pair[engine] = timed(diffusers_cmd(args, output), dict(os.environ))
            for key in ("start_wall", "end_wall"):
                pair[engine].pop(key)
        pair["ratio"] = round(pair["vqdiff"]["seconds"] / pair["diffusers"]["seconds"], 3)
        pair["cpu_ratio"] = round(pair["vqdiff"]["cpu_s"] / pair["diffusers"]["cpu_s"], 3)
        pairs.append(pair)
        print(json.dumps(pair), flush=True)
    ratios = [p["ratio"] for p in pairs]
    result["pairs"] = pairs
    if ratios:
        result["median_ratio"] = statistics.median(ratios)
        result["ratio_range"] = [min(ratios), max(ratios)]
        result["median_cpu_ratio"] = statistics.median(p["cpu_ratio"] for p in pairs)
        result["median_seconds"] = {
            e: statistics.median(p[e]["seconds"] for p in pairs) for e in ("vqdiff", "diffusers")
        }
    print(table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


def table(result: dict[str, Any]) -> str:
    lines = [
        "| pair | order | vqdiff s (CPU s) | diffusers s (CPU s) | ratio | CPU ratio | load avg before (v / d) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for i, p in enumerate(result.get("pairs", []), 1):
        v, d = p["vqdiff"], p["diffusers"]
        lines.append(f"| {i} | {' then '.join(p['order'])} | {v['seconds']} ({v['cpu_s']}) | {d['seconds']} "
                     f"({d['cpu_s']}) | {p['ratio']} | {p['cpu_ratio']} | "
                     f"{v['load_average_before']} / {d['load_average_before']} |")  # fmt: skip
    if "median_ratio" in result:
        lo, hi = result["ratio_range"]
        lines.append(f"median ratio {result['median_ratio']} (range {lo}-{hi})")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("vqdiff", "torch", "diffusers", "transformers", "safetensors")} | {
        "python": platform.python_version()
    }


def main() -> None:
    started = time.time()
    if len(sys.argv) > 1 and sys.argv[1] == "vqdiff-instrumented":  # the timed vqdiff child: REPORT then CLI args
        run_vqdiff_instrumented(sys.argv[3:], sys.argv[2], started)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("diffusers", help="the diffusers program alone")
    d.add_argument("--model", required=True)
    d.add_argument("--steps", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--stages", default=None, help="write stage timers to this JSON file")
    for name in ("pairs", "stages"):
        p = sub.add_parser(name)
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--steps", type=int, default=2)
        p.add_argument("--sampler", choices=("reference", "fast"), default="reference")
        p.add_argument("--converted", action="store_true", help="vqdiff loads the converted cache by repo id")
        p.add_argument("--work-dir", type=Path, default=None)
        p.add_argument("--pairs", type=int, default=3 if name == "pairs" else 0)
        p.add_argument("--stages", action="store_true", default=name == "stages")
        p.add_argument("--vqdiff-src", type=Path, default=None, help="run vqdiff from this source tree")
        p.add_argument("-o", "--output", type=Path, default=None, help="JSON results")
    args = parser.parse_args()
    args.model = Path(args.model).resolve() if args.mode != "diffusers" else args.model
    if args.mode == "diffusers":
        run_diffusers(args.model, args.steps, args.seed, args.output, args.stages, started)
    else:
        run_pairs(args)


if __name__ == "__main__":
    main()
