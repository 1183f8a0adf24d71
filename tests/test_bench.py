"""`vqdiff bench` on tiny models: it runs, its JSON has the documented shape, and --vs-diffusers gives ratios.

Nothing here asserts a speed; the figures of a tiny model on a shared CPU are noise.
"""

from __future__ import annotations

import json
import shutil
import statistics
from importlib import resources

import pytest
from typer.testing import CliRunner

from vqdiff_cli.bench.measure import device_peak_tflops, transformer_flops
from vqdiff_cli.checkpoint.layout import pipeline_config
from vqdiff_cli.checkpoint.random import shipped_configs
from vqdiff_cli.cli import app

runner = CliRunner()
QUICK = ["--device", "cpu", "--steps", "3", "--batch", "2", "--repeats", "1", "--warmup", "0", "--json"]


def bench(*args: str) -> dict:
    result = runner.invoke(app, ["bench", *QUICK, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_derived_rows(doc: dict) -> int:
    """Every derived end-to-end row is BENCHMARKS.md's formula over the phases of the same record (engine, dtype,
    batch): text + S x forward + (S - 1) x mean(step math at t = 99, 50, 1) + step math at t = 0 + decode."""
    phase = {(p["engine"], p["dtype"], p["batch"], p["phase"], p["timestep"]): p["median_s"] for p in doc["phases"]}
    rows = [e for e in doc["end_to_end"] if e["kind"] == "derived"]
    for e in rows:
        key = (e["engine"], e["dtype"], e["batch"])
        steps = e["steps"]
        step_math = [phase[(*key, "sampling", t)] for t in (99, 50, 1)]
        expected = (
            phase[(*key, "text", None)]
            + steps * phase[(*key, "transformer", 50)]
            + (steps - 1) * sum(step_math) / 3
            + phase[(*key, "sampling", 0)]
            + phase[(*key, "decode", None)]
        )
        assert e["median_s"] == pytest.approx(expected, rel=1e-12), e
        assert e["s_per_image"] == pytest.approx(expected / e["batch"], rel=1e-12)
        assert e["images_per_s"] == pytest.approx(e["batch"] / expected, rel=1e-12)
    return len(rows)


def check_speedups(doc: dict) -> int:
    """Every speed-up is diffusers' seconds over ours, from the two end-to-end rows of its kind, batch and steps."""
    rows = {(e["engine"], e["dtype"], e["batch"], e["steps"], e["kind"]): e["median_s"] for e in doc["end_to_end"]}
    for s in doc["speedups"]:
        ours = rows[(s["engine"], s["dtype"], s["batch"], s["steps"], s["kind"])]
        base = rows[(s["baseline"], s["baseline_dtype"], s["batch"], s["steps"], s["kind"])]
        assert s["ratio"] == pytest.approx(base / ours, rel=1e-12), s
    return len(doc["speedups"])


def test_ithq_flops_match_the_issue():
    """About 2.3 TFLOP per image per forward for the real architecture."""
    flops = transformer_flops(pipeline_config(shipped_configs("ithq")).transformer)
    assert 2.25e12 < flops < 2.35e12


def test_gpu_peaks_are_matched_by_name():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H200") == 989.0
    assert device_peak_tflops("AMD EPYC") is None


def test_bench_json_on_a_checkpoint(tiny):
    doc = bench("--model", str(tiny.path), "--dtype", "float32")
    assert doc["schema"] == "vqdiff.bench/1"
    assert {"created", "versions", "device", "model", "settings", "phases", "end_to_end", "speedups", "notes"} <= set(
        doc
    )
    assert doc["device"]["type"] == "cpu" and doc["device"]["peak_tflops"] is None
    assert doc["model"]["source"] == str(tiny.path)
    engines = {"vqdiff-reference", "vqdiff-fast"}
    phases = {(p["engine"], p["phase"], p["timestep"]) for p in doc["phases"]}
    for engine in engines:
        for phase, t in [("text", None), ("transformer", 50), ("sampling", 99), ("sampling", 0), ("decode", None)]:
            assert (engine, phase, t) in phases
    forward = next(p for p in doc["phases"] if p["phase"] == "transformer")
    assert forward["tflops"] > 0 and forward["peak_fraction"] is None
    assert all(len(p["runs_s"]) == 1 and p["median_s"] > 0 for p in doc["phases"])
    kinds = {(e["engine"], e["kind"]) for e in doc["end_to_end"]}
    assert kinds == {(e, k) for e in engines for k in ("derived", "measured")}
    measured = next(e for e in doc["end_to_end"] if e["kind"] == "measured")
    assert measured["batch"] == 2 and measured["steps"] == 3
    assert measured["images_per_s"] == pytest.approx(2 / measured["median_s"])
    assert measured["median_s"] == statistics.median(measured["runs_s"])
    assert check_derived_rows(doc) == 2  # one per engine, at the one step count
    assert doc["speedups"] == []


def test_bench_vs_diffusers_gives_ratios(tiny, tmp_path):
    out = tmp_path / "bench.json"
    doc = bench("--model", str(tiny.path), "--dtype", "float32", "--vs-diffusers", "--sampler", "fast", "-o", str(out))
    assert json.loads(out.read_text()) == doc
    assert doc["versions"]["diffusers"] == "0.42.1"
    assert {p["engine"] for p in doc["phases"]} == {"vqdiff-fast", "diffusers"}
    measured = [s for s in doc["speedups"] if s["kind"] == "measured"]
    assert len(measured) == 1
    assert measured[0]["engine"] == "vqdiff-fast" and measured[0]["baseline"] == "diffusers"
    assert check_speedups(doc) == 2  # measured and derived
    assert check_derived_rows(doc) == 2  # vqdiff-fast and diffusers


def test_bench_random_weights_from_a_config_folder(tmp_path):
    """The default mode: an architecture's configs, random weights built in memory, no checkpoint files."""
    folder = tmp_path / "arch"
    shutil.copytree(str(resources.files("vqdiff_cli") / "configs" / "ithq"), folder)
    small = {
        "transformer.json": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 4},
        "vqvae.json": {"block_out_channels": [32, 32, 32, 32], "latent_channels": 8},
        "text_encoder.json": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 37, "vocab_size": 1000},
        "learned_classifier_free_sampling_embeddings.json": {"hidden_size": 32},
    }
    for name, changes in small.items():
        config = json.loads((folder / name).read_text())
        config.update(changes)
        if name == "transformer.json":
            config["cross_attention_dim"] = 32
        (folder / name).write_text(json.dumps(config))
    doc = bench("--config", str(folder), "--dtype", "float32,bfloat16", "--phases-only", "--sampler", "fast")
    assert doc["model"]["source"].startswith("random weights")
    assert {p["dtype"] for p in doc["phases"]} == {"float32", "bfloat16"}
    assert {e["kind"] for e in doc["end_to_end"]} == {"derived"}
    assert check_derived_rows(doc) == 2  # one per dtype


def test_bench_errors(tiny, monkeypatch):
    import vqdiff_cli.bench.run

    monkeypatch.setattr(vqdiff_cli.bench.run, "_diffusers_version", lambda: None)
    result = runner.invoke(app, ["bench", *QUICK, "--model", str(tiny.path), "--vs-diffusers"])
    assert result.exit_code == 2
    assert "--vs-diffusers needs diffusers" in result.output
    result = runner.invoke(app, ["bench", *QUICK, "--steps", "ten"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    result = runner.invoke(app, ["bench", *QUICK, "--dtype", "float8"])
    assert result.exit_code == 2 and "unknown dtype" in result.output
    for args, message in (
        (["-g", "-5"], "--guidance must be between 0 and"),
        (["--max-run-seconds", "-1"], "--max-run-seconds must be at least 0"),
        (["--peak-tflops", "0"], "--peak-tflops must be above 0"),
        (["--diffusers-dtype", "float32"], "--diffusers-dtype needs --vs-diffusers"),
    ):
        result = runner.invoke(app, ["bench", *QUICK, "--model", str(tiny.path), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_bench_output_is_never_clobbered_and_device_follows_the_settings(tiny, tmp_path, monkeypatch):
    import vqdiff_cli.bench.run

    out = tmp_path / "bench.json"
    out.write_text("earlier results\n")
    measured = []
    monkeypatch.setattr(vqdiff_cli.bench.run, "measure", lambda *a, **k: measured.append(1))
    result = runner.invoke(app, ["bench", *QUICK, "--model", str(tiny.path), "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert out.read_text() == "earlier results\n" and measured == []  # refused before any measuring
    monkeypatch.undo()
    doc = bench("--model", str(tiny.path), "--dtype", "float32", "--sampler", "fast", "-o", str(out), "--overwrite")
    assert json.loads(out.read_text()) == doc
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left beside it

    monkeypatch.setenv("VQDIFF_DEVICE", "tpu")  # no --device: the environment's choice is used
    args = [a for a in QUICK if a not in ("--device", "cpu")]
    result = runner.invoke(app, ["bench", *args, "--model", str(tiny.path)])
    assert result.exit_code == 2 and "tpu" in result.output


def test_bench_warms_up_once_per_batch_with_short_runs_and_measures_the_matmul_rate(tiny, monkeypatch):
    from vqdiff_cli.bench.engines import OurEngine

    calls = []
    real = OurEngine.generate

    def spy(self, prompts, steps):
        calls.append((len(prompts), steps))
        return real(self, prompts, steps)

    monkeypatch.setattr(OurEngine, "generate", spy)
    doc = bench("--model", str(tiny.path), "--dtype", "float32", "--sampler", "fast", "--steps", "3,4", "--warmup", "1")
    assert calls == [(2, 2), (2, 3), (2, 4)]  # one 2-step warm-up, then one timed run per step count
    assert doc["device"]["matmul_tflops"]["float32"] > 0
    assert doc["device"]["matmul_shape"] == [2 * 2 * 16, 16, 64]  # guided batch 2 x 16 tokens, width 16, ff 64
    forward = next(p for p in doc["phases"] if p["phase"] == "transformer")
    assert forward["matmul_fraction"] == pytest.approx(forward["tflops"] / doc["device"]["matmul_tflops"]["float32"])
    assert check_derived_rows(doc) == 2  # steps 3 and 4


def test_bench_output_keeps_finished_batches_when_a_run_is_cut_short(tiny, tmp_path, monkeypatch):
    import vqdiff_cli.bench.run

    real = vqdiff_cli.bench.run._bench_batch

    def interrupted_on_second(report, engines, pipe, dtype, batch, *rest):
        if batch == 2:
            raise KeyboardInterrupt
        real(report, engines, pipe, dtype, batch, *rest)

    monkeypatch.setattr(vqdiff_cli.bench.run, "_bench_batch", interrupted_on_second)
    out = tmp_path / "partial.json"
    args = ["--model", str(tiny.path), "--dtype", "float32", "--sampler", "fast", "--batch", "1,2", "-o", str(out)]
    result = runner.invoke(app, ["bench", *QUICK, *args])
    assert result.exit_code == 130
    doc = json.loads(out.read_text())
    assert {e["batch"] for e in doc["end_to_end"]} == {1} and doc["settings"]["batches"] == [1, 2]


def test_bench_skips_warm_up_when_no_run_is_short_enough(tiny, monkeypatch):
    from vqdiff_cli.bench.engines import OurEngine

    calls = []
    monkeypatch.setattr(OurEngine, "generate", lambda self, prompts, steps: calls.append(steps))
    doc = bench(
        "--model", str(tiny.path), "--dtype", "float32", "--sampler", "fast", "--warmup", "1", "--max-run-seconds", "0"
    )
    assert calls == []  # every end-to-end figure is derived: no warm-up run either
    assert {e["kind"] for e in doc["end_to_end"]} == {"derived"}


def test_bench_times_one_graph_replay_as_the_fast_step_where_runs_replay_steps(tiny, monkeypatch):
    """On CUDA the fast sampler's runs replay each whole step from a CUDA graph, so its derived figures must come
    from a timed replay, not from the eager forward and step-math phases. Checked here with graphs forced on over
    stand-ins for the CUDA calls (tests/fake_cuda.py: the real capture code runs; a replay only counts itself)."""
    from vqdiff_cli.pipeline import fastpath

    from .fake_cuda import FakeCuda, failing_capture, stand_in_streams

    cuda = FakeCuda(monkeypatch)
    monkeypatch.setattr(fastpath.Acceleration, "graphs_on", lambda self, device: True)
    args = ("--model", str(tiny.path), "--dtype", "float32", "--sampler", "reference,fast", "--phases-only")
    doc = bench(*args)
    steps = {p["timestep"]: p for p in doc["phases"] if p["phase"] == "step"}
    assert sorted(steps) == [0, 1, 50, 99]
    assert {p["engine"] for p in steps.values()} == {"vqdiff-fast"} and all(p["cuda_graph"] for p in steps.values())
    assert all(p["cuda_graph"] is None for p in doc["phases"] if p["phase"] != "step")
    assert len(cuda.captures) == 2 and [g.replays for g in cuda.graphs] == [6, 2]  # a step, the final step
    phase = {(p["engine"], p["phase"], p["timestep"]): p["median_s"] for p in doc["phases"]}
    fast = next(e for e in doc["end_to_end"] if e["engine"] == "vqdiff-fast")
    chain = 2 * sum(steps[t]["median_s"] for t in (99, 50, 1)) / 3 + steps[0]["median_s"]  # 3 steps
    text, decode = phase[("vqdiff-fast", "text", None)], phase[("vqdiff-fast", "decode", None)]
    assert fast["derived_from"] == "step" and fast["median_s"] == pytest.approx(text + chain + decode)
    reference = next(e for e in doc["end_to_end"] if e["engine"] == "vqdiff-reference")
    assert reference["derived_from"] == "transformer + sampling"
    assert any("phases are eager calls" in note for note in doc["notes"])

    streams, _ = stand_in_streams(monkeypatch)  # now every capture fails: the steps timed are eager ones
    monkeypatch.setattr(fastpath, "_Graph", failing_capture([], streams))
    doc = bench(*args)
    assert [p["cuda_graph"] for p in doc["phases"] if p["phase"] == "step"] == [False] * 4
    assert any(note.startswith("CUDA graph capture failed") for note in doc["notes"])


def test_bench_without_graph_replays_derives_from_the_eager_phases(tiny):
    doc = bench("--model", str(tiny.path), "--dtype", "float32", "--sampler", "fast", "--phases-only")
    assert not [p for p in doc["phases"] if p["phase"] == "step"]  # a CPU: steps are not replayed
    assert {e["derived_from"] for e in doc["end_to_end"]} == {"transformer + sampling"}
