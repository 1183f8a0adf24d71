"""The heap setting of `vqdiff_cli.cli.heap` measured alone: in one process, transformer forwards (ITHQ architecture,
batch 2 as under guidance, memory-mapped weights as `vqdiff generate` loads them) alternate between two glibc malloc
settings, and each forward's CPU seconds, wall seconds and page faults are recorded.

* `default`: glibc's own behaviour in its best state, after its dynamic threshold has risen as far as it goes: blocks
  above 32 MiB get a mapping of their own (unmapped on free), the heap's free top above 64 MiB is trimmed;
* `kept`: `vqdiff_cli.cli.heap.keep_freed_memory` (no mapping per block, no trimming).

Before each timed forward one untimed forward runs in the same setting, so that the heap settles. One process, so both
settings run on the same weights and under the same machine load, alternating.

    python benchmarks/heap_ab.py --model DIR --rounds 2 -o benchmarks/results/heap-ab.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt(3)


def main() -> None:
    from vqdiff_cli.checkpoint.load import load_components
    from vqdiff_cli.cli.heap import keep_freed_memory

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    libc = ctypes.CDLL(None)

    def default() -> None:
        libc.mallopt(M_MMAP_MAX, 65536)
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)

    def usage() -> tuple[float, int]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime, r.ru_minflt

    model = load_components(args.model, torch.device("cpu"), torch.float32).transformer
    x = torch.full((2, 1024), model.config.mask_id, dtype=torch.long)
    context = torch.randn(2, 77, 512, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        default()
        model(x, context, 50)  # the first touch of the weights, not timed
        for i in range(args.rounds * 2):
            mode = ("default", "kept")[i % 2]
            default() if mode == "default" else keep_freed_memory()
            model(x, context, 50)  # untimed: the heap settles in this setting
            c0, f0 = usage()
            t0, load = time.perf_counter(), os.getloadavg()[0]
            model(x, context, 50)
            c1, f1 = usage()
            rows.append({"mode": mode, "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(c1 - c0, 2),
                         "faults": f1 - f0, "load_average_before": round(load, 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        mode: {k: statistics.median(r[k] for r in rows if r["mode"] == mode) for k in ("wall_s", "cpu_s", "faults")}
        for mode in ("default", "kept")
    }
    print(json.dumps(summary))
    if args.output:
        result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "rows": rows, "median": summary}
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
