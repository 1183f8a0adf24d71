"""Image quality against network calls: `vqdiff eval` over the settings of BENCHMARKS.md's "Quality" tables, one
process per row, on the same captions and seeds.

    python benchmarks/quality.py --model shapes --count 64 --out benchmarks/results/quality-shapes
    python benchmarks/quality.py --model shapes --only reveal --only stride --out /tmp/q
    python benchmarks/quality.py --model tiny --count 2 --calls 4 --strides 2 --out /tmp/q -- --device cpu

Groups (every row at eval's defaults but for what it names: guidance 5, truncation 1.0, posterior reveal, every step):
  steps      --steps 100, 50, 25, 10, 5 (vqdiff's exact strided posterior), each with --vs-diffusers: diffusers'
             truncated chain with as many network calls (its num_inference_steps);
  guidance   --guidance 1 and 3 (5 is the steps-100 row);
  truncation --truncation 0.86;
  reveal     random and purity reveal at 100, 50 and 25 calls (`--steps C`, one call per timestep), beside the
             posterior rows of the steps group; and purity at C/2 timesteps with the `--tokens-per-call` that brings
             it back to C calls or just under (found with `vqdiff generate --dry-run`): do several calls per timestep
             beat more timesteps?
  stride     --stride-mode exact and original at strides 2, 4 and 10.

Each row's report is kept as OUT/rows/NAME.json and a row whose report exists is not run again (a stopped run resumes;
`--redo` runs everything again). Writes OUT/quality.json (every row's summary), OUT/quality.md (one table per group)
and OUT/quality.png (accuracy with all five attributes right against network calls, drawn with Pillow). Arguments
after `--` go to every `vqdiff eval` (e.g. `--device cuda --sampler fast`).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

ATTRIBUTES = ("all", "background", "color", "shape", "position", "size")
GROUPS = ("steps", "guidance", "truncation", "reveal", "stride")


@dataclass(frozen=True)
class Row:
    name: str
    group: str
    flags: list[str]
    target_calls: int | None = None
    also: list[str] = field(default_factory=list)  # groups whose table shows this row too


def vqdiff(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vqdiff_cli", *args], capture_output=True, text=True)


def planned_calls(model: str, flags: list[str], extra: list[str]) -> int:
    """The network calls per batch that `flags` make, as `vqdiff generate --dry-run` counts them."""
    r = vqdiff(["generate", "x", "--model", model, "--seed", "0", *flags, *extra, "--dry-run", "--json"])
    if r.returncode != 0:
        raise SystemExit(f"dry run failed for {flags}: {r.stderr.strip()}")
    calls = json.loads(r.stdout)["network_calls"]
    if calls is None:
        raise SystemExit("the model's configs are not readable before loading: give --model a local folder")
    return int(calls)


def per_call_for(model: str, steps: int, calls: int, extra: list[str]) -> int | None:
    """The smallest --tokens-per-call whose run at `steps` timesteps makes at most `calls` calls (None: none does)."""
    low, high = 1, 4096

    def fits(n: int) -> bool:
        return planned_calls(model, ["--purity", "--steps", str(steps), "--tokens-per-call", str(n)], extra) <= calls

    if not fits(high):
        return None
    while low < high:  # calls fall as the tokens per call grow
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid + 1
    return low


def plan_rows(o: argparse.Namespace, extra: list[str]) -> list[Row]:
    groups = set(o.only or GROUPS)
    rows: list[Row] = []
    steps = o.steps if "steps" in groups else []
    calls = o.calls if "reveal" in groups else []
    for n in sorted({*steps, *calls}, reverse=True):  # one run per number of calls serves both tables
        if n in steps:
            shown = ["reveal"] if n in calls else []
            rows.append(Row(f"steps{n}", "steps", ["--steps", str(n), "--vs-diffusers"], n, shown))
        else:  # the reveal table's posterior row alone (without diffusers beside it: another cached report)
            rows.append(Row(f"posterior-calls{n}", "reveal", ["--steps", str(n)], n))
    if "guidance" in groups:
        rows += [Row(f"guidance{g}", "guidance", ["--guidance", g]) for g in ("1", "3")]
    if "truncation" in groups:
        rows.append(Row("truncation0.86", "truncation", ["--truncation", "0.86"]))
    if "reveal" in groups:
        for c in o.calls:
            for reveal in ("random", "purity"):
                rows.append(Row(f"{reveal}-calls{c}", "reveal", ["--reveal", reveal, "--steps", str(c)], c))
            n = per_call_for(o.model, c // 2, c, extra) if c >= 2 and not o.no_per_call else None
            if n is not None:
                flags = ["--reveal", "purity", "--steps", str(c // 2), "--tokens-per-call", str(n)]
                rows.append(Row(f"purity-calls{c}-steps{c // 2}-per-call{n}", "reveal", flags, c))
    if "stride" in groups:
        for k in o.strides:
            for mode in ("exact", "original"):
                rows.append(Row(f"stride{k}-{mode}", "stride", ["--stride", str(k), "--stride-mode", mode]))
    return rows


def run_row(row: Row, o: argparse.Namespace, extra: list[str], folder: Path) -> dict[str, Any]:
    path = folder / f"{row.name}.json"
    if path.is_file() and not o.redo:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    command = ["eval", "--model", o.model, "--count", str(o.count), "--seed", str(o.seed), "-b", str(o.batch_size)]
    command += [*row.flags, *extra, "--json", "-q", "-o", str(path), "--overwrite"]
    started = time.perf_counter()
    r = vqdiff(command)
    if r.returncode != 0:
        raise SystemExit(f"vqdiff {' '.join(command)} failed:\n{r.stderr.strip()}")
    print(f"{row.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return dict(json.loads(path.read_text(encoding="utf-8")))


def summaries(row: Row, report: dict[str, Any]) -> list[dict[str, Any]]:
    s = report["settings"]
    out = []
    for engine in report["engines"]:
        out.append(
            {
                "name": row.name,
                "group": row.group,
                "also": row.also,
                "engine": engine["engine"],
                "flags": row.flags,
                "reveal": s.get("reveal"),
                "steps": s.get("steps"),
                "stride": s.get("stride"),
                "stride_mode": s.get("stride_mode"),
                "tokens_per_call": s.get("tokens_per_call"),
                "guidance": s.get("guidance"),
                "truncation": s.get("truncation"),
                "target_calls": row.target_calls,
                "calls": engine["calls_per_image"],
                "accuracy": {k: engine["accuracy"].get(k) for k in ATTRIBUTES},
                "fid": engine["fid"],
                "seconds_per_image": engine["seconds_per_image"],
            }
        )
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Model `{meta['model']}`, {meta['count']} captions from seed {meta['seed']}, batch {meta['batch_size']}; "
        f"extra eval flags: `{' '.join(meta['eval_flags']) or '(none)'}`. Prompt accuracy (all five attributes "
        "right, then each), FID on the checker's features (lower is better; floor "
        f"{meta['fid_floor']:.2f}), network calls and seconds per picture.",
    ]
    head = "| row | engine | flags | calls | all | bg | colour | shape | position | size | FID | s/image |"
    for group in GROUPS:
        members = [r for r in rows if r["group"] == group or group in r["also"]]
        if group == "reveal":
            members = [r for r in members if r["engine"] != "diffusers"]
        if not members:
            continue
        lines += ["", f"**{group}**", "", head, "|" + "---|" * 12]
        for r in members:
            acc = " | ".join(_pct(r["accuracy"][k]) for k in ATTRIBUTES)
            fid = "-" if r["fid"] is None else f"{r['fid']:.2f}"
            flags = " ".join(f for f in r["flags"] if f != "--vs-diffusers") or "(defaults)"
            lines.append(
                f"| {r['name']} | {r['engine']} | `{flags}` | {r['calls']} | {acc} | {fid} | "
                f"{r['seconds_per_image']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (all attributes right) against calls, log-scaled x: one line per engine of the steps group and one
    per reveal mode of the reveal group."""
    w, h, m = 720, 420, 60
    image = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(image)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["accuracy"]["all"] is None:
            continue
        if r["group"] == "steps":
            label = "vqdiff exact posterior" if r["engine"] != "diffusers" else f"{r['engine']} truncated chain"
            series.setdefault(label, []).append((r["calls"], r["accuracy"]["all"]))
        elif r["group"] == "reveal" and r["tokens_per_call"] in (None, 0):
            series.setdefault(f"vqdiff {r['reveal']} reveal", []).append((r["calls"], r["accuracy"]["all"]))
    calls = [c for pts in series.values() for c, _ in pts] or [1, 100]
    lo, hi = math.log10(min(calls)), math.log10(max(calls)) + 1e-9

    def xy(c: float, a: float) -> tuple[float, float]:
        return m + (math.log10(c) - lo) / max(hi - lo, 1e-9) * (w - 2 * m), h - m - a * (h - 2 * m)

    d.rectangle((m, m, w - m, h - m), outline="black")
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = xy(1, a)[1]
        d.line((m, y, w - m, y), fill=(225, 225, 225))
        d.text((12, y - 6), f"{100 * a:.0f}%", fill="black")
    for c in sorted(set(calls)):
        d.text((xy(c, 0)[0] - 8, h - m + 8), str(c), fill="black")
    d.text((w // 2 - 80, h - 24), "network calls per picture (log scale)", fill="black")
    d.text((m, 20), "prompt accuracy: all five attributes right (shapes model, held-out captions)", fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        colour = colours[i % len(colours)]
        if len(pts) > 1:
            d.line([xy(c, a) for c, a in pts], fill=colour, width=3)
        for c, a in pts:
            x, y = xy(c, a)
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        d.text((m + 10, m + 10 + 16 * i), label, fill=colour)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="a built-in name or local model folder (or a Hub id cached here)")
    p.add_argument("--count", type=int, default=64, help="captions per row (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--only", action="append", choices=GROUPS, help="groups to run (repeatable; default all)")
    p.add_argument("--steps", default="100,50,25,10,5", help="steps of the steps group")
    p.add_argument("--calls", default="100,50,25", help="network calls per picture of the reveal group")
    p.add_argument("--strides", default="2,4,10", help="strides of the stride group")
    p.add_argument("--no-per-call", action="store_true", help="leave out the purity rows with several calls per t")
    p.add_argument("--out", type=Path, required=True, help="folder for rows/*.json, quality.json, .md and .png")
    p.add_argument("--redo", action="store_true", help="run every row again, even one whose report exists")
    o = p.parse_args(argv)
    o.steps = [int(n) for n in o.steps.split(",") if n]
    o.calls = [int(c) for c in o.calls.split(",") if c]
    o.strides = [int(k) for k in o.strides.split(",") if k]
    folder = o.out / "rows"
    folder.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    floor = math.nan
    for row in plan_rows(o, extra):
        report = run_row(row, o, extra, folder)
        floor = report["reference"].get("fid_floor") or floor
        results += summaries(row, report)
    for r in results:
        if r["target_calls"] is not None and r["calls"] > r["target_calls"]:
            print(f"note: {r['name']} made {r['calls']} calls, above {r['target_calls']}", file=sys.stderr)
    meta = {
        "model": o.model,
        "count": o.count,
        "seed": o.seed,
        "batch_size": o.batch_size,
        "eval_flags": extra,
        "fid_floor": floor,
    }
    document = {"schema": "vqdiff.quality/1", **meta, "rows": results}
    (o.out / "quality.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    table = markdown(results, meta)
    (o.out / "quality.md").write_text(table, encoding="utf-8")
    plot(results, o.out / "quality.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
