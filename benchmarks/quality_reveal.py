"""Quality of the reveal and stride modes: `vqdiff eval` over the combinations BENCHMARKS.md's "Quality" table names,
for one model, into a JSON document and a markdown table.

1. Posterior, random and purity reveal at equal numbers of network calls (100, 50, 25 by default): `--steps C`
   visits C timesteps, one call each, for all three; and purity at C/2 timesteps with the `--tokens-per-call` that
   brings it back to C calls or just under (found with `vqdiff generate --dry-run`), to see whether several calls
   per timestep beat more timesteps.
2. `--stride-mode exact` against `original` at strides 2, 4 and 10 (posterior reveal).

Every row is one `vqdiff eval` process with the same captions, seeds and settings but the ones named; its report is
kept as `OUT/rows/NAME.json`, and a row whose report exists is not run again (a stopped run resumes; `--redo` runs
everything again). The table reports the network calls each row made, so equal-call comparisons can be checked.

    python benchmarks/quality_reveal.py --model shapes-model --count 100 --out benchmarks/results/quality-reveal
    python benchmarks/quality_reveal.py --model tiny --count 2 --calls 4 --strides 2 --out /tmp/q -- --device cpu

Arguments after `--` go to every `vqdiff eval` (e.g. `--device cuda --sampler fast --captions FILE`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ATTRIBUTES = ("all", "background", "color", "shape", "position", "size")


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
    if planned_calls(model, ["--purity", "--steps", str(steps), "--tokens-per-call", str(high)], extra) > calls:
        return None
    while low < high:  # calls fall as the tokens per call grow
        mid = (low + high) // 2
        if planned_calls(model, ["--purity", "--steps", str(steps), "--tokens-per-call", str(mid)], extra) <= calls:
            high = mid
        else:
            low = mid + 1
    return low


def plan_rows(
    model: str, calls: list[int], strides: list[int], per_call: bool, extra: list[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for c in calls:
        for reveal in ("posterior", "random", "purity"):
            rows.append(
                {
                    "name": f"{reveal}-calls{c}",
                    "group": "reveal",
                    "target_calls": c,
                    "flags": ["--reveal", reveal, "--steps", str(c)],
                }
            )
        if per_call and c >= 2:
            n = per_call_for(model, c // 2, c, extra)
            if n is not None:
                rows.append(
                    {
                        "name": f"purity-calls{c}-steps{c // 2}-per-call{n}",
                        "group": "reveal",
                        "target_calls": c,
                        "flags": ["--reveal", "purity", "--steps", str(c // 2), "--tokens-per-call", str(n)],
                    }
                )
    for k in strides:
        for mode in ("exact", "original"):
            rows.append(
                {
                    "name": f"stride{k}-{mode}",
                    "group": "stride",
                    "target_calls": None,
                    "flags": ["--stride", str(k), "--stride-mode", mode],
                }
            )
    return rows


def run_row(row: dict[str, Any], args: argparse.Namespace, extra: list[str], folder: Path) -> dict[str, Any]:
    path = folder / f"{row['name']}.json"
    if path.is_file() and not args.redo:
        return json.loads(path.read_text(encoding="utf-8"))
    command = ["eval", "--model", args.model, "--count", str(args.count), "--seed", str(args.seed), *row["flags"]]
    command += [*extra, "--json", "-q", "-o", str(path), "--overwrite"]
    started = time.perf_counter()
    r = vqdiff(command)
    if r.returncode != 0:
        raise SystemExit(f"vqdiff {' '.join(command)} failed:\n{r.stderr.strip()}")
    print(f"{row['name']}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(path.read_text(encoding="utf-8"))


def summary(row: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    ours = report["engines"][0]
    s = report["settings"]
    return {
        "name": row["name"],
        "group": row["group"],
        "reveal": s.get("reveal"),
        "steps": s.get("steps"),
        "stride": s.get("stride"),
        "stride_mode": s.get("stride_mode"),
        "tokens_per_call": s.get("tokens_per_call"),
        "target_calls": row["target_calls"],
        "calls": ours["calls_per_image"],
        "accuracy": {k: ours["accuracy"].get(k) for k in ATTRIBUTES},
        "fid": ours["fid"],
        "seconds_per_image": ours["seconds_per_image"],
        "flags": row["flags"],
    }


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Model `{meta['model']}`, {meta['count']} captions from seed {meta['seed']}; eval flags: "
        f"`{' '.join(meta['eval_flags']) or '(defaults)'}`; prompt accuracy (all attributes, then each), FID on the "
        "checker's features (lower is better), network calls per picture.",
        "",
        "| row | reveal | steps / stride | stride mode | tokens/call | calls | all | bg | colour | shape | position "
        "| size | FID | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["accuracy"]
        fid = "" if r["fid"] is None else f"{r['fid']:.3g}"
        walk = f"steps {r['steps']}" if r["steps"] else f"stride {r['stride']}" if r["stride"] else "all"
        lines.append(
            f"| {r['name']} | {r['reveal']} | {walk} | {r['stride_mode']} | {r['tokens_per_call'] or 'no limit'} "
            f"| {r['calls']} | {' | '.join(_pct(a[k]) for k in ATTRIBUTES)} "
            f"| {fid} | {r['seconds_per_image']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model folder (or a Hub id cached here)")
    parser.add_argument("--count", type=int, default=100, help="captions per row (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calls", default="100,50,25", help="network calls per picture for the reveal rows")
    parser.add_argument("--strides", default="2,4,10", help="strides for exact against original")
    parser.add_argument("--no-per-call", action="store_true", help="leave out the purity rows with several calls per t")
    parser.add_argument("--out", type=Path, required=True, help="folder for rows/*.json, quality.json, quality.md")
    parser.add_argument("--redo", action="store_true", help="run every row again, even one whose report exists")
    args = parser.parse_args(argv)
    calls = [int(c) for c in args.calls.split(",") if c]
    strides = [int(k) for k in args.strides.split(",") if k]
    folder = args.out / "rows"
    folder.mkdir(parents=True, exist_ok=True)
    rows = plan_rows(args.model, calls, strides, not args.no_per_call, extra)
    results = [summary(row, run_row(row, args, extra, folder)) for row in rows]
    for r in results:
        if r["target_calls"] is not None and r["calls"] > r["target_calls"]:
            print(f"note: {r['name']} made {r['calls']} calls, above {r['target_calls']}", file=sys.stderr)
    meta = {"model": args.model, "count": args.count, "seed": args.seed, "eval_flags": extra}
    document = {"schema": "vqdiff.quality-reveal/1", **meta, "rows": results}
    (args.out / "quality.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (args.out / "quality.md").write_text(markdown(results, meta), encoding="utf-8")
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
