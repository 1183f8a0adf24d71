"""Write a trained shapes run into the package: the fp16 pipeline folder and the training record.

    python scripts/ship_shapes.py RUN_DIR

RUN_DIR is the folder of scripts/train_shapes.sh (RUN_DIR/transformer holds the exported pipeline). The weights go to
vqdiff_cli/weights/shapes (replaced in one rename), the logs and configs of both stages to benchmarks/results/shapes.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

import torch

from vqdiff_cli.checkpoint.convert import write_converted

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "vqdiff_cli" / "weights" / "shapes"
RECORD = ROOT / "benchmarks" / "results" / "shapes"
LIMIT = 20 * 1024 * 1024


def main(run: Path) -> None:
    tmp = TARGET.with_name(f".shapes-{uuid.uuid4().hex[:8]}")
    write_converted(run / "transformer", tmp, torch.float16)
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    if size > LIMIT:
        shutil.rmtree(tmp)
        raise SystemExit(f"the fp16 folder is {size / 2**20:.1f} MiB, over the 20 MiB budget")
    old = TARGET.with_name(".shapes-old")
    if TARGET.exists():
        TARGET.rename(old)
    tmp.rename(TARGET)
    shutil.rmtree(old, ignore_errors=True)
    RECORD.mkdir(parents=True, exist_ok=True)
    for stage in ("vqvae", "transformer"):
        for name in ("train_config.json", "train_log.jsonl", "loss.png"):
            if (run / stage / name).is_file():
                shutil.copyfile(run / stage / name, RECORD / f"{stage}-{name}")
    print(f"wrote {TARGET} ({size / 2**20:.2f} MiB) and the training record to {RECORD}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
