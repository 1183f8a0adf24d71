"""Write a trained shapes run into the repository: the fp16 pipeline folder and the training record.

    python scripts/ship_shapes.py RUN_DIR                 ship: weights + record
    python scripts/ship_shapes.py RUN_DIR --record-only   a run in progress: its logs and configs only
    python scripts/ship_shapes.py RUN_DIR --progress EXPORT   and the work-in-progress model, to continue next time

RUN_DIR is the folder of scripts/train_shapes.sh (RUN_DIR/transformer holds the exported pipeline). Shipping writes
the weights to vqdiff_cli/weights/shapes (replaced in one rename). Both write the logs and configs of the stages
that are in RUN_DIR to benchmarks/results/shapes (training checkpoints stay in RUN_DIR: only shipped weights belong
in git).

--progress writes EXPORT (a pipeline folder exported from a checkpoint of the run, as scripts/eval_shapes.sh makes
it) in fp16 to benchmarks/results/shapes/progress, with the history of every training segment behind it
(history.json, and train_log.jsonl with each line's segment and step counted over all segments; the segments
before this run's are those of RUN_DIR/progress-base, which train_shapes.sh copies from the model it continues, so
a run can be saved more than once). It is not shipped; it is what the next run of scripts/train_shapes.sh continues
(`--from`), because on a CPU the model needs more hours than one session has and the run folder does not survive a
session.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "vqdiff_cli" / "weights" / "shapes"
RECORD = ROOT / "benchmarks" / "results" / "shapes"
LIMIT = 20 * 1024 * 1024


def replace_folder(new: Path, target: Path) -> None:
    """Put `new` at `target`, the old one out of the way first, so that `target` is never half-written."""
    old = target.with_name(f".{target.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def ship(run: Path) -> None:
    import torch

    from vqdiff_cli.checkpoint.convert import write_converted

    tmp = TARGET.with_name(f".shapes-{uuid.uuid4().hex[:8]}")
    write_converted(run / "transformer", tmp, torch.float16)
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    if size > LIMIT:
        shutil.rmtree(tmp)
        raise SystemExit(f"the fp16 folder is {size / 2**20:.1f} MiB, over the 20 MiB budget")
    replace_folder(tmp, TARGET)
    print(f"wrote {TARGET} ({size / 2**20:.2f} MiB)")


def save_progress(run: Path, export: Path) -> None:
    import torch

    from vqdiff_cli.checkpoint.convert import write_converted

    target = RECORD / "progress"
    history: dict[str, list[dict[str, Any]]] = {"segments": []}
    earlier: list[str] = []
    base = run / "progress-base"  # the history of the model this segment started from (train_shapes.sh copies it)
    if (base / "history.json").is_file():
        history = json.loads((base / "history.json").read_text())
        earlier = (base / "train_log.jsonl").read_text().splitlines()
    config = json.loads((export / "train_config.json").read_text())
    lines = [json.loads(line) for line in (export / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps = max((int(line["step"]) for line in lines), default=0)
    offset = sum(int(seg["steps"]) for seg in history["segments"])
    number = len(history["segments"]) + 1
    history["segments"].append(
        {"segment": number, "from": config["task"]["sources"]["from"], "steps": steps, "first_step": offset + 1}
    )
    tmp = target.with_name(f".progress-{uuid.uuid4().hex[:8]}")
    write_converted(export, tmp, torch.float16)
    log = earlier + [json.dumps({**ln, "segment": number, "total_step": offset + int(ln["step"])}) for ln in lines]
    (tmp / "train_log.jsonl").write_text("".join(f"{line}\n" for line in log))
    (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    shutil.copyfile(export / "train_config.json", tmp / "train_config.json")
    replace_folder(tmp, target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"wrote {target} ({size / 2**20:.2f} MiB): segment {number}, steps {offset + 1} to {offset + steps}")


def record(run: Path) -> None:
    RECORD.mkdir(parents=True, exist_ok=True)
    for stage in ("vqvae", "transformer"):
        for name in ("train_config.json", "train_log.jsonl", "loss.png"):
            if (run / stage / name).is_file():
                shutil.copyfile(run / stage / name, RECORD / f"{stage}-{name}")
    print(f"wrote the training record to {RECORD}")


if __name__ == "__main__":
    args = sys.argv[1:]
    export = None
    if "--progress" in args:
        at = args.index("--progress")
        if at + 1 >= len(args):
            raise SystemExit(__doc__)
        export = Path(args[at + 1])
        del args[at : at + 2]
    only = "--record-only" in args
    rest = [a for a in args if a != "--record-only"]
    if len(rest) != 1:
        raise SystemExit(__doc__)
    if export is not None:
        save_progress(Path(rest[0]), export)
    elif not only:
        ship(Path(rest[0]))
    record(Path(rest[0]))
