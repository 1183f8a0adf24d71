"""Process-wide settings of the CLI that a run's speed depends on: the C heap keeps freed memory for reuse (no page
faults for the activations of every forward), it is set after the model is loaded and only on the CPU, and the
interpreter's final garbage collection is skipped once a command is done."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vqdiff_cli.cli import app

# A child process: page faults of eight rounds of a feed-forward like a transformer block's (a 2048 x 1408 input,
# 5632 hidden units: 46 MB temporaries, above glibc's largest mmap threshold of 32 MiB) after a first round, with the
# heap setting applied (argv[1] == "1") or not.
FAULTS_CHILD = """
import json, resource, sys
import torch
from vqdiff_cli.cli.heap import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else None
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(2048, 1408, generator=g)
w_in, w_out = torch.randn(5632, 1408, generator=g) * 0.01, torch.randn(1408, 5632, generator=g) * 0.01
def block(x):
    h = torch.nn.functional.linear(x, w_in)
    return torch.nn.functional.linear(h * torch.sigmoid(1.702 * h), w_out) + x
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = block(x)
before = faults()
for _ in range(8):
    x = block(x)
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _faults(apply: bool) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", FAULTS_CHILD, "1" if apply else "0"], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and Linux page-fault counts")
def test_freed_memory_is_reused_without_page_faults():
    pages = 8 * 4 * 2048 * 5632 * 4 // 4096  # eight rounds of four 46 MB temporaries, in 4 KiB pages
    default = _faults(apply=False)
    kept = _faults(apply=True)
    if kept["applied"] is False:
        pytest.skip("the C library is not glibc")
    assert kept["applied"] is True
    assert int(default["faults"]) >= pages * 0.9  # glibc maps each such block afresh: every page is faulted in
    # the heap hands the same pages back: a small share is faulted in (the second round may grow the heap, and other
    # allocations of torch's come and go: 2 to 7% of the pages were seen), against every page without the setting
    assert int(kept["faults"]) < pages * 0.2


def test_generate_keeps_freed_memory_after_loading(tiny, tmp_path, monkeypatch):
    import vqdiff_cli.cli.heap as heap
    import vqdiff_cli.pipeline.model as api

    events: list[str] = []
    real_load = api.load_components

    def load(*args, **kwargs):
        result = real_load(*args, **kwargs)
        events.append("loaded")
        return result

    monkeypatch.setattr(api, "load_components", load)
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: events.append("heap") or True)
    out = tmp_path / "a.png"
    r = CliRunner().invoke(
        app, ["generate", "a cat", "--model", str(tiny.path), "--steps", "2", "--device", "cpu", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert events == ["loaded", "heap"]  # once, and only after the weights were read (a conversion frees gigabytes)
    assert out.is_file()


def test_main_leaves_objects_out_of_the_final_collection(monkeypatch):
    from vqdiff_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["vqdiff", "--version"])
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code in (0, None)
        assert gc.get_freeze_count() > 0  # what exists when a command ends is not walked again at exit
    finally:
        gc.unfreeze()  # this test process goes on: give its objects back to the collector
