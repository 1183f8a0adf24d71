"""Runs spread over processes and runs that resume: torchrun (gloo, on the CPU), --shard, --skip-existing, and the
dealing of batches (vqdiff_cli/distributed.py) they rest on.

Every run here makes the same 6 images (2 prompts x 3, batches of 2) of the tiny checkpoint with all of its 100 steps,
which take about a second, and is compared with one process making them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vqdiff_cli.cli import app
from vqdiff_cli.distributed import Group, Shard, World, batches, shard_batches, shard_jobs
from vqdiff_cli.errors import RankError, UsageError
from vqdiff_cli.options import GenerateOptions, plan_jobs

PROMPTS = ["a red ball", "a cat in a hat"]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # the CPU, one thread per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str, processes: int = 2) -> list[str]:
    """`torchrun --nproc-per-node N -m vqdiff_cli ...`, meeting on a free port of 127.0.0.1."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    return [*launch, "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "vqdiff_cli", *args]


def generate_args(tiny, folder: Path, *more: str, batch: int = 2, seed: str | None = "0") -> list[str]:
    prompts = folder.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    seeds = ["--seed", seed] if seed is not None else []
    template = f"{folder}/{{index:06d}}-{{seed}}.png"
    source = ["--model", str(tiny.path), "--device", "cpu", "-b", str(batch)]
    return ["generate", "-f", str(prompts), "-n", "3", *seeds, "-o", template, *source, *more]


def records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def untimed(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "time_s"}


def png_record(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text["vqdiff"])  # type: ignore[attr-defined,no-any-return]


def assert_same_images(expected: Path, got: Path) -> None:
    """The same file names, pixels and metadata (PNG metadata holds no timing)."""
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        assert np.array_equal(np.asarray(Image.open(expected / name)), np.asarray(Image.open(got / name))), name
        assert png_record(expected / name) == png_record(got / name), name


def one_process(tiny, folder: Path, *more: str, seed: str = "0") -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    result = CliRunner().invoke(app, [*generate_args(tiny, folder, "--json", *more, seed=seed)])
    assert result.exit_code == 0, result.output
    return records(result.stdout)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """What one process makes with --seed 0, and its --json records."""
    folder = tmp_path_factory.mktemp("reference") / "out"
    return folder, one_process(tiny, folder)


# -- dealing the batches ---------------------------------------------------------------------------------------


def test_batches_are_dealt_round_robin_and_shares_compose():
    jobs = plan_jobs(["a", "b"], 0, 5)  # 10 jobs
    assert [[j.index for j in b] for b in batches(jobs, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [[j.index for j in b] for b in shard_batches(jobs, 3, Shard(0, 2))] == [[0, 1, 2], [6, 7, 8]]
    assert [j.index for j in shard_jobs(jobs, 3, Shard(1, 2))] == [3, 4, 5, 9]
    outer = Shard.parse("1/3")  # then split over 2 processes: rank 1 makes batches 3, 9, ... of the run
    inner = shard_batches(shard_jobs(jobs, 1, outer), 1, Shard(1, 2))
    assert inner == shard_batches(jobs, 1, Shard(1, 2).within(outer)) == [[jobs[3]], [jobs[9]]]
    every = sorted(j.index for k in range(4) for j in shard_jobs(jobs, 2, Shard(k, 4)))
    assert every == list(range(10))


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/b", "2", "-1/2"])
def test_a_share_that_does_not_exist_is_refused(text):
    with pytest.raises(UsageError, match="--shard"):
        Shard.parse(text)


def test_the_launch_variables_say_where_a_process_is():
    assert World.from_env({}) == World()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = World.from_env(env)
    assert world == World(3, 4, 1, 2) and not world.speaks
    assert world.cpu_threads(16) == 8 and world.cpu_threads(1) == 1
    assert world.device("cuda") == "cuda:1" and world.device("cpu") == "cpu" and world.device("cuda:0") == "cuda:0"
    assert World().device("cuda") == "cuda"  # alone: as asked
    for bad in ({"RANK": "0"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(UsageError):
            World.from_env(bad)


class Canned(Group):
    """A group whose meetings bring what the other processes are made to report."""

    def __init__(self, world: World, others: list[Any]) -> None:
        super().__init__(world)
        self.others = others

    def all_gather(self, obj):  # type: ignore[no-untyped-def]
        return [obj if rank == self.world.rank else other for rank, other in enumerate(self.others)]


def test_a_failure_in_one_process_stops_every_process_and_is_said_once():
    failed = ("partial", ("cannot write x.png", "a hint", 1))
    group = Canned(World(0, 2, 0, 2), [None, failed])
    with pytest.raises(RankError) as caught, group.stage() as stage:
        stage.payload = "mine"
    assert caught.value.message == "cannot write x.png (rank 1 of 2; every rank stopped)"
    assert caught.value.reported and caught.value.exit_code == 1 and caught.value.hint == "a hint"
    assert stage.gathered == ["mine", "partial"]  # what each got to before the failure
    with pytest.raises(RankError) as caught, Canned(World(1, 2, 1, 2), [failed, None]).stage():
        raise OSError("disk full")
    assert not caught.value.reported  # rank 0 says it
    same = (None, ("bad --steps", None, 2))
    with pytest.raises(RankError) as caught, Canned(World(0, 2, 0, 2), [None, same]).stage():
        raise UsageError("bad --steps")
    assert caught.value.message == "bad --steps" and caught.value.exit_code == 2  # the same everywhere: no rank named
    with Canned(World(0, 2, 0, 2), [None, ("theirs", None)]).stage() as stage:
        stage.payload = "mine"
    assert stage.gathered == ["mine", "theirs"]


def test_more_processes_than_gpus_are_refused_plainly():
    from types import SimpleNamespace

    from vqdiff_cli.cli.rounds import _device
    from vqdiff_cli.errors import DeviceError

    plan = SimpleNamespace(world=World(1, 2, 1, 2), settings={"device": "cuda"})
    if __import__("torch").cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU for each process")
    with pytest.raises(DeviceError, match=r"2 processes on this machine but \d CUDA GPU\(s\): each needs its own"):
        _device(plan)  # type: ignore[arg-type]


def test_alone_errors_pass_as_they_are():
    with pytest.raises(UsageError, match="mine"), Group(World()).stage():
        raise UsageError("mine")
    assert Group(World()).first(lambda: 7) == 7


def test_the_api_makes_a_share_with_the_pixels_of_the_whole_run(tiny_pipe):
    options = GenerateOptions(seed=0, steps=4, batch_size=2)
    jobs = plan_jobs(PROMPTS, 0, 3)
    whole = {image.index: image for image in tiny_pipe.generate(jobs, options)}
    share = tiny_pipe.generate(shard_jobs(jobs, options.batch_size, Shard(1, 2)), options)
    assert [image.index for image in share] == [2, 3]
    for image in share:
        assert np.array_equal(np.asarray(image.image), np.asarray(whole[image.index].image))


# -- torchrun ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_makes_what_one_process_makes(tiny, tmp_path):
    """2 processes (3 batches: rank 0 makes the first and the last), no --seed: rank 0 draws it for both."""
    out = tmp_path / "spread"
    out.mkdir()
    r = subprocess.run(
        torchrun(*generate_args(tiny, out, "--json", seed=None)), capture_output=True, text=True, env=ENV, timeout=300
    )
    assert r.returncode == 0, r.stderr
    got = records(r.stdout)
    assert [rec["index"] for rec in got] == list(range(6))  # each once, in job order
    seed = got[0]["seed"]
    assert [rec["seed"] for rec in got] == list(range(seed, seed + 6))
    assert r.stderr.count("image(s) in") == 1 and "by 2 processes" in r.stderr  # one summary
    expected = one_process(tiny, tmp_path / "alone", seed=str(seed))
    assert [untimed(rec) for rec in got] == [
        {**untimed(rec), "path": rec["path"].replace("alone", "spread")} for rec in expected
    ]
    assert_same_images(tmp_path / "alone", out)


def test_shards_make_the_run_together(tiny, tmp_path, reference):
    folder, expected = reference
    out = tmp_path / "out"
    first = one_process(tiny, out, "--shard", "1/2")
    second = one_process(tiny, out, "--shard", "2/2")
    assert [rec["index"] for rec in first] == [0, 1, 4, 5] and [rec["index"] for rec in second] == [2, 3]
    merged = sorted(first + second, key=lambda rec: rec["index"])
    assert [untimed(rec) for rec in merged] == [
        {**untimed(rec), "path": rec["path"].replace(str(folder), str(out))} for rec in expected
    ]
    assert_same_images(folder, out)
    (tmp_path / "dry").mkdir()
    dry = CliRunner().invoke(app, generate_args(tiny, tmp_path / "dry", "--shard", "2/2", "--dry-run"))
    assert "share 2/2: 2 of them" in dry.stdout
    assert [line.split("-> ")[1] for line in dry.stdout.splitlines() if "-> " in line] == [
        f"{tmp_path}/dry/000002-2.png",
        f"{tmp_path}/dry/000003-3.png",
    ]


@pytest.mark.slow
def test_a_run_killed_half_way_resumes_with_skip_existing(tiny, tmp_path, reference):
    """Killed (SIGKILL) after its first batch; then torchrun with --skip-existing makes only what is missing."""
    folder, _ = reference
    out = tmp_path / "out"
    out.mkdir()
    args = generate_args(tiny, out, "--json")
    with (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vqdiff_cli", *args], stdout=subprocess.PIPE, stderr=err, text=True, env=ENV
        )
        assert proc.stdout is not None
        for seen, _ in enumerate(proc.stdout, start=1):
            if seen == 2:  # the first batch is written
                proc.kill()
                break
        proc.wait(timeout=60)
    made = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(made) < 6, made
    r = subprocess.run(torchrun(*args, "--skip-existing"), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    got = records(r.stdout)
    assert [rec["index"] for rec in got] == list(range(6))
    kept = [Path(rec["path"]).name for rec in got if rec.get("made_before")]
    assert sorted(kept) == sorted(made)  # no finished image was made again...
    assert len([rec for rec in got if not rec.get("made_before")]) == 6 - len(made)
    assert {name: (out / name).stat().st_mtime_ns for name in made} == made  # ...or written again
    assert_same_images(folder, out)


def test_sigterm_stops_a_run_as_ctrl_c_does(tiny, tmp_path):
    """What torchrun sends its processes after Ctrl-C, and schedulers before preempting a job."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    with (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vqdiff_cli", *generate_args(tiny, out, "--json", batch=1)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=ENV,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # the first image is written
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 130
    assert "error: interrupted; finished outputs were kept" in (tmp_path / "stderr").read_text()
    names = [p.name for p in out.iterdir()]
    assert "000000-0.png" in names and len(names) < 6 and all(n.endswith(".png") for n in names)  # no temporary file


@pytest.mark.slow
def test_a_rank_that_fails_as_it_writes_stops_every_rank_with_one_message(tiny, tmp_path):
    """Rank 1's second image (index 3, batches of 1) finds its name taken when it writes it: after the checks, as
    when another program makes a folder there. Rank 0 stops after the round, with one message."""
    out = tmp_path / "out"
    out.mkdir()
    with (tmp_path / "stdout").open("w") as stdout:
        proc = subprocess.Popen(
            torchrun(*generate_args(tiny, out, batch=1)), stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV
        )
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # rank 0 says it loads once every process has checked its outputs
            seen.append(line)
            if line.startswith("loading "):
                (out / "000003-3.png").mkdir()
                break
        seen += proc.stderr.readlines()
        proc.wait(timeout=300)
    assert proc.returncode != 0
    errors = [line for line in seen if line.startswith("error:")]
    assert errors == [
        f"error: {out}/000003-3.png already exists (rank 1 of 2; every rank stopped); pass --overwrite to replace it\n"
    ], "".join(seen)
    assert sorted(p.name for p in out.iterdir()) == ["000000-0.png", "000001-1.png", "000002-2.png", "000003-3.png"]
    written = (tmp_path / "stdout").read_text().splitlines()
    assert written == [f"{out}/000000-0.png", f"{out}/000001-1.png", f"{out}/000002-2.png"]  # rank 0 said all


@pytest.mark.slow
def test_outputs_are_checked_in_every_process_before_any_model_loads(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000003-3.png").write_bytes(b"someone else's")  # rank 1's (batches of 1)
    r = subprocess.run(
        torchrun(*generate_args(tiny, out, batch=1)), capture_output=True, text=True, env=ENV, timeout=300
    )
    assert r.returncode != 0
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {out}/000003-3.png already exists (rank 1 of 2; every rank stopped); pass --overwrite to replace it, "
        "or choose another name"
    ]
    assert "loading" not in r.stderr and sorted(p.name for p in out.iterdir()) == ["000003-3.png"]


# -- --skip-existing in one process --------------------------------------------------------------------------------


def test_skip_existing_keeps_the_images_made_before_and_remakes_a_batch_whole(tiny, tmp_path, reference):
    folder, _ = reference
    out = tmp_path / "out"
    one_process(tiny, out)
    again = one_process(tiny, out, "--skip-existing")
    assert [rec.get("made_before") for rec in again] == [True] * 6
    (out / "000003-3.png").unlink()  # half of the second batch
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = one_process(tiny, out, "--skip-existing")
    assert [rec["index"] for rec in again if not rec.get("made_before")] == [3]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in mtimes} == mtimes
    assert_same_images(folder, out)  # made in its batch, as in one run: the same pixels


def test_skip_existing_refuses_what_other_settings_made(tiny, tmp_path, monkeypatch):
    from vqdiff_cli.cli import rounds

    out = tmp_path / "out"
    one_process(tiny, out, "--steps", "3")
    load = rounds.load_resolved
    monkeypatch.setattr(rounds, "load_resolved", lambda *a, **k: pytest.fail("the model was loaded"))
    args = generate_args(tiny, out, "--steps", "3", "--skip-existing", "--guidance", "3")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2
    assert "000000-0.png already exists, made with other settings (guidance: 5.0, not 3.0)" in r.output
    monkeypatch.setattr(rounds, "load_resolved", load)
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert png_record(out / "000005-5.png")["guidance"] == 3.0
    # known once the model is loaded: the sampler these images were made with
    r = CliRunner().invoke(app, [*args, "--sampler", "fast"])
    assert r.exit_code == 2 and "sampler: 'reference', not 'fast'" in r.output
    assert png_record(out / "000000-0.png")["sampler"] == "reference"


def test_skip_existing_refuses_a_file_vqdiff_did_not_make(tiny, tmp_path):
    out = tmp_path / "out"
    one_process(tiny, out, "--steps", "3")
    whole = (out / "000001-1.png").read_bytes()
    (out / "000001-1.png").write_bytes(whole[: len(whole) // 2])
    Image.new("RGB", (16, 16)).save(out / "000002-2.png")
    args = generate_args(tiny, out, "--steps", "3", "--skip-existing")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "000001-1.png already exists and is not a complete PNG" in r.output
    (out / "000001-1.png").write_bytes(whole)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "000002-2.png already exists and holds no vqdiff metadata" in r.output
    r = CliRunner().invoke(app, [*args, "--overwrite", "--json"])
    assert r.exit_code == 0
    assert [rec["index"] for rec in records(r.stdout) if not rec.get("made_before")] == [2]
    assert png_record(out / "000002-2.png")["index"] == 2


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (("--skip-existing", "-o", "x-{step}.png"), "--skip-existing needs the image names before the model loads"),
        (("--shard", "1/2", "--save-tokens", "t.npy"), "--save-tokens writes one file for the whole run"),
        (("--skip-existing", "--trajectory", "t.npy"), "--trajectory writes one file for the whole run"),
        (("--shard", "3/2"), "--shard 3/2: K must be between 1 and N"),
    ],
)
def test_what_a_share_cannot_write_is_refused(tiny, tmp_path, more, message):
    r = CliRunner().invoke(app, [*generate_args(tiny, tmp_path, "--dry-run"), *more])
    assert r.exit_code == 2 and message in r.output, r.output


def test_a_share_needs_a_seed_and_editing_runs_in_one_process(tiny, tmp_path, monkeypatch, image_file):
    r = CliRunner().invoke(app, generate_args(tiny, tmp_path, "--shard", "1/2", seed=None))
    assert r.exit_code == 2 and "--shard needs --seed" in r.output
    r = CliRunner().invoke(app, ["generate", "a cat", "--seed", "0", "--shard", "1/2", "-o", "-", "--dry-run"])
    assert r.exit_code == 2 and "-o - writes to stdout: not with --shard" in r.output
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, ["vary", str(image_file), "--model", str(tiny.path), "--dry-run"])
    assert r.exit_code == 2 and "`vqdiff vary` runs in one process" in r.output
