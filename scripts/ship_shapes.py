"""Write a trained shapes run into the repository: the fp16 pipeline folder and the training record.

    python scripts/ship_shapes.py RUN_DIR                 ship: weights + record
    python scripts/ship_shapes.py RUN_DIR --record-only   a run in progress: its logs and configs only

RUN_DIR is the folder of scripts/train_shapes.sh (RUN_DIR/transformer holds the exported pipeline). Shipping writes
the weights to vqdiff_cli/weights/shapes (replaced in one rename). Both write the logs and configs of the stages
that are in RUN_DIR to benchmarks/results/shapes (training checkpoints stay in RUN_DIR: only shipped weights belong
in git).
"""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

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


def record(run: Path) -> None:
    RECORD.mkdir(parents=True, exist_ok=True)
    for stage in ("vqvae", "transformer"):
        for name in ("train_config.json", "train_log.jsonl", "loss.png"):
            if (run / stage / name).is_file():
                shutil.copyfile(run / stage / name, RECORD / f"{stage}-{name}")
    print(f"wrote the training record to {RECORD}")


if __name__ == "__main__":
    args = sys.argv[1:]
    only = "--record-only" in args
    rest = [a for a in args if a != "--record-only"]
    if len(rest) != 1:
        raise SystemExit(__doc__)
    if not only:
        ship(Path(rest[0]))
    record(Path(rest[0]))
