"""Image quality against network calls: `vqdiff eval` over a grid of sampling settings, one fresh process per
setting, on the same held-out captions and seeds.

    python benchmarks/quality.py --model shapes --count 64          # the table of BENCHMARKS.md, "Quality"
    python benchmarks/quality.py --model shapes --only steps        # one group

Groups (every row at the defaults but for what it names: guidance 5, truncation 1.0, every step):
  steps      --steps 100, 50, 25, 10, 5 (vqdiff's exact strided posterior), each with --vs-diffusers (diffusers'
             truncated chain with as many calls: its num_inference_steps);
  guidance   --guidance 1 and 3 (5 is the steps-100 row);
  truncation --truncation 0.86;
  reveal     (issue 14) posterior, random and purity reveal at 100, 50 and 25 calls;
  stride     (issue 14) --stride-mode exact and original at strides 2, 4 and 10.
The reveal and stride groups are skipped where `vqdiff eval --help` lacks their flags.

Writes benchmarks/results/quality-<model>-<date>.json (every report in full), a Markdown table beside it (.md) and a
plot of prompt accuracy ("all attributes right") against network calls (.png, drawn with Pillow).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
ATTRS = ("background", "color", "shape", "position", "size", "all")

GROUPS: dict[str, list[tuple[str, list[str]]]] = {
    "steps": [(f"steps {n}", ["--steps", str(n), "--vs-diffusers"]) for n in (100, 50, 25, 10, 5)],
    "guidance": [("guidance 1", ["--guidance", "1"]), ("guidance 3", ["--guidance", "3"])],
    "truncation": [("truncation 0.86", ["--truncation", "0.86"])],
    "reveal": [
        (f"{reveal} {calls}", ["--reveal", reveal, *steps])
        for calls, steps in ((100, []), (50, ["--steps", "50"]), (25, ["--steps", "25"]))
        for reveal in ("posterior", "random", "purity")
    ],
    "stride": [
        (f"stride {s} {mode}", ["--stride", str(s), "--stride-mode", mode])
        for s in (2, 4, 10)
        for mode in ("exact", "original")
    ],
}
NEEDS = {"reveal": "--reveal", "stride": "--stride-mode"}


def eval_flags() -> str:
    return subprocess.run(
        [sys.executable, "-m", "vqdiff_cli", "eval", "--help"], capture_output=True, text=True, check=True
    ).stdout


def run_row(model: str, count: int, batch: int, args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "vqdiff_cli", "eval", "--model", model, "-n", str(count), "-b", str(batch)]
        subprocess.run([*cmd, *args, "-q", "-o", str(out)], check=True)
        report: dict[str, Any] = json.loads(out.read_text())
    return report


def summary(name: str, group: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for engine in report["engines"]:
        rows.append(
            {
                "setting": name,
                "group": group,
                "engine": engine["engine"],
                "calls": engine["calls_per_image"],
                "seconds_per_image": engine["seconds_per_image"],
                "fid": engine["fid"],
                **{a: engine["accuracy"].get(a) for a in ATTRS},
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], floor: float | None) -> str:
    head = "| setting | engine | calls | background | object colour | shape | position | size | all | FID | s/image |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        acc = " | ".join("-" if r[a] is None else f"{100 * r[a]:.0f}%" for a in ATTRS)
        fid = "-" if r["fid"] is None else f"{r['fid']:.2f}"
        lines.append(
            f"| {r['setting']} | {r['engine']} | {r['calls']} | {acc} | {fid} | {r['seconds_per_image']:.2f} |"
        )
    if floor is not None:
        lines.append(f"\nFID floor (a second drawing of the same captions): {floor:.2f}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (all attributes) against calls, log-scaled x, one line per engine of the steps group."""
    w, h, m = 640, 400, 56
    image = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(image)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["group"] == "steps" and r["all"] is not None:
            series.setdefault(r["engine"], []).append((r["calls"], r["all"]))
    calls = [c for pts in series.values() for c, _ in pts] or [1, 100]
    lo, hi = math.log10(min(calls)), math.log10(max(calls)) + 1e-9

    def xy(c: float, a: float) -> tuple[float, float]:
        return m + (math.log10(c) - lo) / (hi - lo) * (w - 2 * m), h - m - a * (h - 2 * m)

    d.rectangle((m, m, w - m, h - m), outline="black")
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.text((8, xy(1, a)[1] - 6), f"{100 * a:.0f}%", fill="black")
    for c in sorted(set(calls)):
        d.text((xy(c, 0)[0] - 8, h - m + 8), str(c), fill="black")
    d.text((w // 2 - 70, h - 22), "network calls per image (log)", fill="black")
    d.text((m, 18), "prompt accuracy (all five attributes right)", fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for i, (engine, pts) in enumerate(sorted(series.items())):
        pts.sort()
        d.line([xy(c, a) for c, a in pts], fill=colours[i % 4], width=3)
        for c, a in pts:
            x, y = xy(c, a)
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colours[i % 4])
        d.text((w - m - 150, m + 10 + 16 * i), engine, fill=colours[i % 4])
    image.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--only", action="append", choices=sorted(GROUPS), help="groups to run (repeatable)")
    p.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/quality-MODEL-DATE.json)")
    o = p.parse_args()
    flags = eval_flags()
    date = datetime.date.today().isoformat()
    output = o.output or ROOT / "benchmarks" / "results" / f"quality-{Path(o.model).name}-{date}.json"
    reports, rows, floor = [], [], None
    for group in o.only or list(GROUPS):
        if group in NEEDS and NEEDS[group] not in flags:
            print(f"skipping {group}: vqdiff eval has no {NEEDS[group]}", file=sys.stderr)
            continue
        for name, args in GROUPS[group]:
            print(f"{group}: {name}", file=sys.stderr, flush=True)
            report = run_row(o.model, o.count, o.batch_size, args)
            floor = report["reference"].get("fid_floor", floor)
            reports.append({"group": group, "setting": name, "args": args, "report": report})
            rows.extend(summary(name, group, report))
            output.write_text(json.dumps({"model": o.model, "count": o.count, "rows": rows, "runs": reports}, indent=1))
    table = markdown(rows, floor)
    output.with_suffix(".md").write_text(table)
    plot(rows, output.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
