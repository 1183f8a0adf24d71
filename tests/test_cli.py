"""The whole command line on a tiny checkpoint: batches, prompt files, templates, metadata and re-runs, JSON, dry runs,
configuration precedence, progress, visual outputs, error paths and exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vqdiff_cli.cli import app


@pytest.fixture
def cli(tiny, tmp_path, monkeypatch):
    """Run vqdiff in tmp_path with the tiny model as the configured default and the CPU as the device (through the
    environment)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQDIFF_MODEL", str(tiny.path))
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("VQDIFF_DEVICE", "cpu")
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input)

    return invoke


def one_line_error(result) -> str:
    """The run's single error line (progress and info lines may precede it)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in result.output
    return errors[0]


def test_many_prompts_and_images_from_one_load(cli, tmp_path):
    r = cli("generate", "a cat", "a dog", "-n", "2", "--seed", "100", "--steps", "4", "-b", "3")
    assert r.exit_code == 0, r.output
    names = r.stdout.split()
    assert names == ["a-cat-100.png", "a-cat-101.png", "a-dog-102.png", "a-dog-103.png"]
    for name in names:
        assert Image.open(tmp_path / name).size == (16, 16)


def test_prompts_file_with_comments_and_stdin(cli, tmp_path):
    (tmp_path / "prompts.txt").write_text("# my prompts\n\na red ball\n   \na hat on a cat\n# done\n")
    r = cli("generate", "--prompts-file", "prompts.txt", "--seed", "1", "--steps", "2", "-o", "{index}-{prompt}.png")
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == ["0-a-red-ball.png", "1-a-hat-on-a-cat.png"]
    r = cli("generate", "-f", "-", "--seed", "1", "--steps", "2", "-o", "stdin-{index}.png", input="a dog\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == ["stdin-0.png"]
    (tmp_path / "bom.txt").write_bytes("\ufeffa cat\n".encode())  # as some editors save UTF-8
    r = cli("generate", "-f", "bom.txt", "--seed", "1", "--steps", "2", "-o", "{prompt}.png", "--json")
    assert json.loads(r.stdout)["prompt"] == "a cat"


def test_empty_prompts_file_is_a_usage_error(cli, tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    r = cli("generate", "--prompts-file", "empty.txt")
    assert r.exit_code == 2
    assert "has no prompts" in one_line_error(r)
    r = cli("generate", "--prompts-file", "missing.txt")
    assert r.exit_code == 2
    assert "prompts file not found" in one_line_error(r)
    r = cli("generate")
    assert r.exit_code == 2
    assert "no prompts given" in one_line_error(r)


def test_plain_name_is_numbered_and_template_fields(cli, tmp_path):
    r = cli("generate", "a cat", "-n", "3", "--seed", "7", "--steps", "2", "-o", "pic.png")
    assert r.stdout.split() == ["pic-0.png", "pic-1.png", "pic-2.png"]
    r = cli("generate", "a cat", "-n", "2", "--seed", "7", "--steps", "2", "-o", "out/{seed}_{index:03d}.png")
    assert r.exit_code == 2  # folder out/ does not exist
    assert "does not exist" in one_line_error(r)
    (tmp_path / "out").mkdir()
    r = cli("generate", "a cat", "-n", "2", "--seed", "7", "--steps", "2", "-o", "out/{seed}_{index:03d}.png")
    assert r.stdout.split() == ["out/7_000.png", "out/8_001.png"]
    r = cli("generate", "a cat", "-o", "{bogus}.png")
    assert r.exit_code == 2
    assert "unknown placeholder {bogus}" in one_line_error(r)


def test_long_prompt_slug_is_bounded(cli):
    prompt = "a very long prompt " * 20
    r = cli("generate", prompt, "--seed", "1", "--steps", "1")
    assert r.exit_code == 0, r.output
    name = r.stdout.strip()
    assert len(name) <= 60 + len("-1.png")
    assert name.startswith("a-very-long-prompt")


def test_existing_output_is_named_and_kept(cli, tmp_path):
    (tmp_path / "pic-1.png").write_bytes(b"keep me")
    r = cli("generate", "a cat", "-n", "2", "--steps", "2", "-o", "pic.png")
    assert r.exit_code == 2
    assert "pic-1.png already exists" in one_line_error(r)
    assert (tmp_path / "pic-1.png").read_bytes() == b"keep me"
    assert not (tmp_path / "pic-0.png").exists()  # nothing is written when any output would clash


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_usual_file_mode(cli, tmp_path, umask):
    """Written through a private temporary file, an output still ends up with the mode the umask gives a new file."""
    old = os.umask(umask)
    try:
        result = cli("generate", "a cat", "--steps", "2", "--seed", "1", "-o", "cat.png", "--save-tokens", "cat.npy")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for name in ("cat.png", "cat.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_save_steps_folder_that_cannot_be_made_is_refused_before_the_model_loads(cli, tmp_path, monkeypatch):
    from vqdiff_cli.cli import rounds

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(rounds, "load_resolved", lambda *a, **k: pytest.fail("the model was loaded"))
    r = cli("generate", "a cat", "--steps", "1", "-o", "ok.png", "--save-steps", "file/steps")
    assert r.exit_code == 2
    assert "cannot make folder file/steps: file is not a folder" in one_line_error(r)
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "ro")  # as a read-only mount is
    r = cli("generate", "a cat", "--steps", "1", "-o", "ok.png", "--save-steps", "ro/new/steps")
    assert "cannot write in ro/new/steps: ro is not writable" in one_line_error(r)
    assert not (tmp_path / "ok.png").exists()


def test_seeds_past_the_largest_are_refused_before_the_model_loads(cli, monkeypatch):
    from vqdiff_cli.cli import rounds

    monkeypatch.setattr(rounds, "load_resolved", lambda *a, **k: pytest.fail("the model was loaded"))
    for args in (("--dry-run",), ()):
        r = cli("generate", "a cat", "-n", "2", "--seed", str(2**63 - 1), *args)
        assert r.exit_code == 2
        assert "leaves no room for 2 consecutive seeds" in one_line_error(r)


def test_a_failed_replace_leaves_no_temporary_file(tmp_path, monkeypatch):
    from vqdiff_cli.errors import ExitStatus, WriteError
    from vqdiff_cli.files import atomic_write

    (tmp_path / "out.bin").write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteError, match="Permission denied") as failed:
        atomic_write(tmp_path / "out.bin", lambda f: f.write(b"new"), overwrite=True)
    assert failed.value.exit_code == ExitStatus.FAILURE  # a failure while writing, not a usage error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"old"


def test_a_cuda_index_the_machine_lacks_is_a_clear_error(monkeypatch):
    import torch

    from vqdiff_cli.device import resolve_device
    from vqdiff_cli.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="has 2 CUDA GPUs"):
        resolve_device("cuda:5")


def _machine(monkeypatch, cuda: bool, mps: bool) -> None:
    """Make torch report CUDA and MPS as available or not (nothing runs on them)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "device", "dtype", "sampler", "variant"),
    [
        (True, True, "cuda", "float16", "fast", "fp16"),
        (False, True, "mps", "float16", "reference", "fp16"),
        (False, False, "cpu", "float32", "reference", "fp32"),
    ],
    ids=["cuda", "mps", "cpu"],
)
def test_automatic_choices_follow_the_machine(tiny_pipe, monkeypatch, cuda, mps, device, dtype, sampler, variant):
    """--device auto: CUDA, then MPS, then the CPU; --dtype auto: float16 on a GPU, float32 on the CPU; --sampler
    auto: fast on CUDA only; --variant auto: the fp16 files for half precision. Explicit choices stay."""
    import torch

    from vqdiff_cli import GenerateOptions
    from vqdiff_cli.checkpoint.select import variant_order
    from vqdiff_cli.device import dtype_name, resolve_device, resolve_dtype

    _machine(monkeypatch, cuda, mps)
    dev = resolve_device("auto")
    dt = resolve_dtype("auto", dev)
    monkeypatch.setattr(tiny_pipe, "device", dev)  # a pipeline on that device, as far as the sampler choice goes
    fast = tiny_pipe.uses_fast_sampler(GenerateOptions(sampler="auto"))
    assert (dev.type, dtype_name(dt), "fast" if fast else "reference") == (device, dtype, sampler)
    assert variant_order("auto", dt)[0] == variant
    assert resolve_device("cpu") == torch.device("cpu") and resolve_dtype("bfloat16", dev) == torch.bfloat16
    assert tiny_pipe.uses_fast_sampler(GenerateOptions(sampler="fast"))
    assert not tiny_pipe.uses_fast_sampler(GenerateOptions(sampler="reference"))


def test_automatic_choices_on_the_command_line(cli, monkeypatch):
    """On a machine without a GPU (stubbed, so on any machine), `auto` everywhere runs the CPU's choices, and the
    image's metadata records what was chosen."""
    _machine(monkeypatch, cuda=False, mps=False)
    args = ["--device", "auto", "--dtype", "auto", "--sampler", "auto", "--variant", "auto"]
    r = cli("generate", "a cat", "--steps", "2", "--seed", "1", "-o", "auto.png", "--json", *args)
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    chosen = {k: settings[k] for k in ("device", "dtype", "sampler", "weights_variant")}
    assert chosen == {"device": "cpu", "dtype": "float32", "sampler": "reference", "weights_variant": "fp32"}


@pytest.mark.skipif(not Path("/proc/sys").is_dir(), reason="needs Linux's /proc/sys")
def test_unwritable_directory(cli, tmp_path):
    """A folder the user may not write in is refused before the model loads. /proc/sys refuses even root (the kernel
    grants root only its owner bits, r-x), so the refusal runs as root too, as in CI; a chmod-ed folder only
    refuses other users."""
    targets = ["/proc/sys/x.png"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() != 0:
        targets.append("locked/x.png")
    try:
        for target in targets:
            r = cli("generate", "a cat", "--steps", "1", "-o", target)
            assert r.exit_code == 2, r.output
            assert one_line_error(r) == f"error: cannot write {target}: folder {Path(target).parent} is not writable"
            assert "loading" not in r.stderr  # refused before the model loads
    finally:
        locked.chmod(0o700)


def test_png_to_stdout(tiny, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vqdiff_cli",
            "generate",
            "a cat",
            "--model",
            str(tiny.path),
            "--seed",
            "3",
            "--steps",
            "2",
            "-o",
            "-",
        ],
        capture_output=True,
        check=False,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "piped.png").write_bytes(r.stdout)
    assert Image.open(tmp_path / "piped.png").text["vqdiff"]
    r = subprocess.run(
        [sys.executable, "-m", "vqdiff_cli", "generate", "a cat", "-n", "2", "--model", str(tiny.path), "-o", "-"],
        capture_output=True,
        check=False,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert b"writes one PNG" in r.stderr


def test_json_info_and_rerun_reproduce_tokens(cli, tmp_path):
    r = cli(
        "generate",
        "a teddy bear",
        "a red ball",
        "--seed",
        "40",
        "--stride",
        "20",
        "-g",
        "3",
        "-t",
        "0.9",
        "--json",
        "--save-tokens",
        "first.npy",
    )
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["seed"] for rec in records] == [40, 41]
    assert records[1]["prompt"] == "a red ball"
    assert records[1]["settings"]["guidance"] == 3.0
    assert "time_s" in records[0]
    path = records[1]["path"]
    info = cli("info", "--json", path)
    assert info.exit_code == 0, info.output
    meta = json.loads(info.stdout)
    assert meta["prompt"] == "a red ball" and meta["seed"] == 41 and meta["stride"] == 20
    assert meta["truncation"] == 0.9 and meta["dtype"] == "float32"
    assert meta["timesteps"] == [99, 79, 59, 39, 19, 0]
    text = Image.open(tmp_path / path).text["parameters"]
    assert text.startswith("a red ball\nSteps: 6, Sampler: VQ-Diffusion stride 20, CFG scale: 3.0, Seed: 41")
    rerun = cli("generate", "--from-image", path, "-o", "again.png", "--save-tokens", "again.npy")
    assert rerun.exit_code == 0, rerun.output
    assert (np.load(tmp_path / "again.npy")[0] == np.load(tmp_path / "first.npy")[1]).all()
    assert json.loads(cli("info", "--json", "again.png").stdout)["seed"] == 41
    # explicit flags override the image's settings
    other = cli("generate", "--from-image", path, "-o", "other.png", "--seed", "5", "--steps", "3")
    assert other.exit_code == 0
    meta = json.loads(cli("info", "--json", "other.png").stdout)
    assert (meta["seed"], meta["num_steps"], meta["stride"], meta["guidance"]) == (5, 3, None, 3.0)


def test_human_info_and_errors(cli, tmp_path):
    cli("generate", "a cat", "--seed", "1", "--steps", "2", "-o", "m.png")
    r = cli("info", "m.png")
    assert r.exit_code == 0
    assert "prompt" in r.stdout and "a cat" in r.stdout
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    r = cli("info", "plain.png")
    assert r.exit_code == 2
    assert "no vqdiff metadata" in one_line_error(r)
    r = cli("info", "nothere.png")
    assert r.exit_code == 2
    assert "image not found" in one_line_error(r)
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert cli("info", "junk.png").exit_code == 2
    r = cli("generate", "--from-image", "plain.png")
    assert r.exit_code == 2
    # metadata with values of the wrong type: one clear line, whatever the field
    from PIL.PngImagePlugin import PngInfo

    for record, message in (
        ({"prompt": "a cat", "seed": "x"}, "seed is not a whole number"),
        ({"prompt": 3, "seed": 1}, "prompt is not text"),
        ({"prompt": "a cat", "seed": 1, "steps": "abc"}, "'steps' must be int, got 'abc'"),
        ({"prompt": "a cat", "seed": 1, "guidance": [1]}, "'guidance' must be float"),
    ):
        info = PngInfo()
        info.add_text("vqdiff", json.dumps(record))
        Image.new("RGB", (4, 4)).save(tmp_path / "odd.png", pnginfo=info)
        r = cli("generate", "--from-image", "odd.png", "--dry-run")
        assert r.exit_code == 2
        assert message in one_line_error(r), r.output


def test_no_metadata(cli, tmp_path):
    cli("generate", "a cat", "--seed", "1", "--steps", "2", "-o", "bare.png", "--no-metadata")
    assert "vqdiff" not in Image.open(tmp_path / "bare.png").text


def test_batch_image_equals_alone(cli, tmp_path):
    """On a CPU in float32 (the reference sampler here): an image is the same alone or in a batch."""
    cli(
        "generate",
        "a cat",
        "-n",
        "3",
        "--seed",
        "20",
        "-b",
        "3",
        "--steps",
        "8",
        "-o",
        "b.png",
        "--save-tokens",
        "batch.npy",
    )
    cli("generate", "a cat", "--seed", "22", "--steps", "8", "-o", "alone.png", "--save-tokens", "alone.npy")
    assert (np.load(tmp_path / "batch.npy")[2] == np.load(tmp_path / "alone.npy")[0]).all()


def test_metadata_records_the_batch_and_same_batch_reruns_it(cli, tmp_path, monkeypatch):
    """On a GPU an image's float16 scores depend on its batch's size (cuBLAS picks kernels by shape), so its re-run
    needs that batch size. Simulated here: a network whose scores shift with the number of rows it is given. The
    metadata records the batch size and position; --same-batch rebuilds the batch around the image (its neighbours'
    seeds, the image at its place), reproduces its tokens and writes only it; a plain re-run (batch 1) does not."""
    import torch

    from vqdiff_cli.diffusion.start import Noise
    from vqdiff_cli.models.transformer import DiffusionTransformer

    real_logits, real_for_seeds = DiffusionTransformer.logits, Noise.for_seeds.__func__
    batches: list[list[int]] = []

    def batch_dependent(self, x_t, *args, **kwargs):
        scores = real_logits(self, x_t, *args, **kwargs)
        shift = torch.sin(torch.arange(scores.shape[-1], dtype=torch.float32) * x_t.shape[0])
        return scores + shift.to(scores.dtype)

    def spy(cls, seeds, device, fast):
        batches.append(list(seeds))
        return real_for_seeds(cls, seeds, device, fast)

    monkeypatch.setattr(DiffusionTransformer, "logits", batch_dependent)
    monkeypatch.setattr(Noise, "for_seeds", classmethod(spy))
    args = ("--steps", "4", "--sampler", "fast")
    r = cli(
        "generate", "a cat", "-n", "4", "-b", "3", "--seed", "20", *args, "-o", "b-{seed}.png", "--save-tokens", "b.npy"
    )
    assert r.exit_code == 0, r.output
    recorded = [json.loads(cli("info", "--json", f"b-{seed}.png").stdout) for seed in range(20, 24)]
    assert [(m["batch_size"], m["batch_index"]) for m in recorded] == [(3, 0), (3, 1), (3, 2), (1, 0)]
    assert "Batch size: 3, Batch pos: 1" in Image.open(tmp_path / "b-21.png").text["parameters"]
    assert "batch_size" in cli("info", "b-21.png").stdout
    made = np.load(tmp_path / "b.npy")

    batches.clear()
    r = cli(
        "generate", "--from-image", "b-21.png", "--same-batch", "-o", "again.png", "--save-tokens", "a.npy", "--json"
    )
    assert r.exit_code == 0, r.output
    assert batches == [[20, 21, 22]]  # the image at its position, between its neighbours' seeds
    assert (np.load(tmp_path / "a.npy") == made[1:2]).all()
    (record,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert record["seed"] == 21 and (record["settings"]["batch_size"], record["settings"]["batch_index"]) == (3, 1)
    assert sorted(p.name for p in tmp_path.glob("again*")) == ["again.png"]  # its neighbours are not written
    r = cli("generate", "--from-image", "b-23.png", "--same-batch", "-o", "last.png", "--save-tokens", "l.npy")
    assert r.exit_code == 0 and (np.load(tmp_path / "l.npy") == made[3:]).all()  # a smaller last batch: alone

    r = cli("generate", "--from-image", "b-21.png", "-o", "alone.png", "--save-tokens", "alone.npy")
    assert r.exit_code == 0
    assert not (np.load(tmp_path / "alone.npy") == made[1:2]).all()  # batch 1 instead of 3: other scores here

    for extra, message in (
        (["-n", "2"], "leave out -n, -b"),
        (["-b", "3"], "leave out -n, -b"),
    ):
        r = cli("generate", "--from-image", "b-21.png", "--same-batch", "--dry-run", *extra)
        assert r.exit_code == 2 and message in one_line_error(r)
    r = cli("generate", "a cat", "--same-batch", "--dry-run")
    assert r.exit_code == 2 and "--from-image" in one_line_error(r)
    from PIL.PngImagePlugin import PngInfo

    older = {k: v for k, v in recorded[1].items() if k not in ("batch_size", "batch_index")}
    info = PngInfo()
    info.add_text("vqdiff", json.dumps({**older, "device": "cuda", "dtype": "float16"}))
    Image.new("RGB", (4, 4)).save(tmp_path / "old.png", pnginfo=info)
    r = cli("generate", "--from-image", "old.png", "--same-batch", "--dry-run")
    assert r.exit_code == 2 and "does not record the batch" in one_line_error(r)
    info = PngInfo()
    info.add_text("vqdiff", json.dumps({**recorded[1], "device": "cuda", "dtype": "float16"}))
    Image.new("RGB", (4, 4)).save(tmp_path / "gpu.png", pnginfo=info)
    r = cli("generate", "--from-image", "gpu.png", "--dry-run")
    assert r.exit_code == 0 and "made in a batch of 3 on cuda in float16: --same-batch" in r.stderr


def test_random_seed_is_reported(cli):
    r = cli("generate", "a cat", "--steps", "1", "-o", "r.png")
    assert r.exit_code == 0
    assert "(random)" in r.stderr
    seed = int(r.stderr.split("seed ")[1].split()[0])
    assert json.loads(cli("info", "--json", "r.png").stdout)["seed"] == seed


def test_quiet_and_results_only_on_stdout(cli):
    r = cli("generate", "a cat", "--steps", "1", "-o", "q.png", "--quiet", "--seed", "1")
    assert r.exit_code == 0
    assert r.stdout == "q.png\n"
    assert r.stderr == ""


def test_dry_run_precedence(cli, tmp_path, monkeypatch, tiny):
    (tmp_path / "config.toml").write_text(
        f'model = "{tiny.path}"\nguidance = 2.5\ndevice = "cpu"\ntruncation = 0.7\noutput = "cfg-{{seed}}.png"\n'
    )
    monkeypatch.setenv("VQDIFF_DEVICE", "cpu")
    r = cli("generate", "a cat", "--dry-run", "--json", "-t", "0.5", "--seed", "9")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    s = plan["settings"]
    assert s["truncation"] == {"value": 0.5, "source": "flag"}  # the flag beats the config file's 0.7
    assert s["guidance"]["value"] == 2.5 and s["guidance"]["source"].startswith("config")
    assert s["device"]["value"] == "cpu" and s["device"]["source"] == "env VQDIFF_DEVICE"
    assert s["model"]["source"] == "env VQDIFF_MODEL"  # env beats the config file
    assert s["steps"]["source"] == "default"
    assert plan["outputs"] == ["cfg-9.png"]
    assert not (tmp_path / "cfg-9.png").exists()
    human = cli("generate", "a cat", "--dry-run", "--seed", "9")
    assert "guidance" in human.stdout and "config" in human.stdout


def test_from_image_precedence_between_flags_environment_and_config(cli, tmp_path, monkeypatch, tiny):
    """README: flag > the image given to --from-image > environment > config file > default, key by key; and the run
    uses what the dry run shows (the image's model, dtype and guidance, not the environment's or the config's)."""
    made = cli("generate", "a red ball", "--seed", "41", "--stride", "20", "-g", "3", "-t", "0.9", "--device", "cpu",
               "--dtype", "float32", "-o", "made.png", "--save-tokens", "made.npy")  # fmt: skip
    assert made.exit_code == 0, made.output
    (tmp_path / "config.toml").write_text(
        'guidance = 2.5\ntruncation = 0.7\ndtype = "bfloat16"\noutput = "cfg-{seed}.png"\nbatch_size = 2\n'
        'steps = 7\nsampler = "fast"\nvariant = "fp16"\n'
    )
    monkeypatch.setenv("VQDIFF_MODEL", str(tmp_path / "no-such-model"))  # a run that used it would fail
    monkeypatch.setenv("VQDIFF_DTYPE", "float16")
    monkeypatch.setenv("VQDIFF_OUTPUT", "env-{seed}.png")
    monkeypatch.setenv("VQDIFF_DEVICE", "cpu")
    r = cli("generate", "--from-image", "made.png", "-t", "0.5", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    s = {k: (v["value"], v["source"].split()[0]) for k, v in json.loads(r.stdout)["settings"].items()}
    assert s["truncation"] == (0.5, "flag")  # flag > image > config
    assert s["guidance"] == (3.0, "image")  # image > config
    assert s["dtype"] == ("float32", "image")  # image > env > config
    assert s["model"] == (str(tiny.path), "image")  # image > env
    assert s["stride"] == (20, "image") and s["steps"] == (None, "image")  # the image's stride beats config steps
    assert s["sampler"] == ("reference", "image") and s["variant"] == ("auto", "image")  # image > config
    assert s["output"] == ("env-{seed}.png", "env")  # env > config (the image holds no output)
    assert s["device"] == ("cpu", "env")
    assert s["batch_size"] == (2, "config")  # config > default
    assert s["revision"] == (None, "default")
    again = cli("generate", "--from-image", "made.png", "--save-tokens", "again.npy")
    assert again.exit_code == 0, again.output
    assert again.stdout.split() == ["env-41.png"]
    assert (np.load(tmp_path / "again.npy") == np.load(tmp_path / "made.npy")).all()
    meta = json.loads(cli("info", "--json", "env-41.png").stdout)
    assert (meta["dtype"], meta["guidance"], meta["truncation"], meta["stride"]) == ("float32", 3.0, 0.9, 20)


def test_bad_config_file(cli, tmp_path):
    (tmp_path / "config.toml").write_text("guidance = 'lots'\n")
    r = cli("generate", "a cat", "--dry-run")
    assert r.exit_code == 2
    assert "'guidance' must be float" in one_line_error(r)
    (tmp_path / "config.toml").write_text("colour = 1\n")
    assert "unknown key(s) colour" in one_line_error(cli("generate", "a cat", "--dry-run"))
    (tmp_path / "config.toml").write_text("guidance = \n")
    assert "not valid TOML" in one_line_error(cli("generate", "a cat", "--dry-run"))


def test_config_commands(cli, tmp_path):
    r = cli("config", "path")
    assert r.stdout.strip() == str(tmp_path / "config.toml")
    (tmp_path / "config.toml").write_text("steps = 10\n")
    r = cli("config", "show", "--json")
    data = json.loads(r.stdout)
    assert data["settings"]["steps"] == {"value": 10, "source": f"config {tmp_path / 'config.toml'}", "env": None}


def test_trajectory_animation_and_steps(cli, tmp_path):
    r = cli(
        "generate",
        "a cat",
        "-n",
        "2",
        "--seed",
        "3",
        "--stride",
        "25",
        "-o",
        "v.png",
        "--trajectory",
        "t.npy",
        "--animate",
        "anim.gif",
        "--save-steps",
        "steps",
    )
    assert r.exit_code == 0, r.output
    traj = np.load(tmp_path / "t.npy")
    assert traj.shape == (6, 2, 4, 4)  # 99, 74, 49, 24, 0 -> 5 steps + the start
    gif = Image.open(tmp_path / "anim-0.gif")
    assert gif.n_frames == 6
    first = np.asarray(gif.convert("RGB"))
    assert (first == 128).all()  # all masked: neutral grey
    files = sorted(p.name for p in (tmp_path / "steps").iterdir())
    assert files[0] == "v-0-step-000.png" and len(files) == 12
    last = np.asarray(Image.open(tmp_path / "steps" / "v-1-step-005.png").convert("RGB"))
    assert (last == np.asarray(Image.open(tmp_path / "v-1.png").convert("RGB"))).all()


@pytest.mark.parametrize("template", ["v.png", "v{seed}-at-{step:02d}.png"])
def test_save_steps_frames_are_checked_before_the_model_loads(cli, tmp_path, monkeypatch, template):
    args = ("generate", "a cat", "--seed", "3", "--stride", "50", "-o", template, "--save-steps", "steps")
    assert cli(*args).exit_code == 0
    for image in tmp_path.glob("v*.png"):
        image.unlink()  # the images are gone, the frames in steps/ are still there
    frames = sorted(p.name for p in (tmp_path / "steps").iterdir())

    from vqdiff_cli.cli import rounds

    load = rounds.load_resolved
    monkeypatch.setattr(rounds, "load_resolved", lambda *a, **k: pytest.fail("the model was loaded"))
    r = cli(*args)
    assert r.exit_code == 2
    assert f"steps/{frames[0]} already exists" in one_line_error(r)
    assert not list(tmp_path.glob("v*.png"))
    monkeypatch.setattr(rounds, "load_resolved", load)
    assert cli(*args, "--overwrite").exit_code == 0


def test_step_in_the_output_name_is_the_final_step(cli, tmp_path):
    r = cli("generate", "a cat", "--seed", "3", "--stride", "50", "-o", "img-{step}.png", "--dry-run")
    assert "-> img-{step}.png" in r.stdout
    r = cli("generate", "a cat", "--seed", "3", "--stride", "50", "-o", "img-{step}.png", "--save-steps", ".")
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == ["img-3.png"]  # t = 99, 49, 0: three steps
    assert sorted(p.name for p in tmp_path.glob("img-*.png")) == [f"img-{i}.png" for i in range(4)]
    assert (np.asarray(Image.open(tmp_path / "img-0.png").convert("RGB")) == 128).all()  # the all-mask start
    assert "vqdiff" in Image.open(tmp_path / "img-3.png").text  # the image (with its metadata), not a bare frame
    for step in range(3):
        (tmp_path / f"img-{step}.png").unlink()
    r = cli("generate", "a cat", "--seed", "3", "--steps", "5", "-o", "img-{step}.png")
    assert r.exit_code == 2  # img-3.png could be this run's name too, whatever its number of steps
    assert "img-3.png already exists" in one_line_error(r)


def test_output_template_from_the_config_file_expands_the_home_folder(cli, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "pictures").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    config = tmp_path / "config.toml"
    config.write_text('output = "~/pictures/{prompt}-{seed}.png"\n')
    monkeypatch.setenv("VQDIFF_CONFIG", str(config))
    r = cli("generate", "a red ball", "--seed", "1", "--steps", "1")
    assert r.exit_code == 0, r.output
    assert (home / "pictures" / "a-red-ball-1.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "--steps", "abc"], "error: Invalid value for '--steps'"),
        (["generate", "x", "--bogus"], "error: No such option: --bogus; see vqdiff generate --help"),
        (["generat", "x"], "error: No such command 'generat'"),
        (["inpaint", "x.png"], "error: Missing option '--mask'"),
    ],
)
def test_usage_errors_are_one_line_too(cli, args, message):
    r = cli(*args)
    assert r.exit_code == 2
    assert one_line_error(r).startswith(message)
    assert "Usage:" not in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "-o", "x.jpg"], "x.jpg: an image is written as .png"),
        (["generate", "x", "--animate", "a.png"], "a.png: an animation is written as .gif"),
        (["generate", "x", "--save-tokens", "t.png"], "t.png: a token file is written as .npy"),
        (["encode", "in.png", "-o", "out.png"], "out.png: a token file is written as .npy"),
        (["decode", "t.npy", "-o", "-"], "-o - (standard output) is for generate's images"),
    ],
)
def test_output_names_match_the_format_written(cli, tmp_path, args, message):
    r = cli(*args)
    assert r.exit_code == 2
    assert message in one_line_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_bad_value_from_the_config_or_environment_says_where_it_came_from(cli, tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text("guidance = -3\nsteps = 4\nstride = 10\n")
    r = cli("generate", "x", "--dry-run", "-g", "2")
    assert "give --steps or --stride, not both (steps from config" in one_line_error(r)
    r = cli("generate", "x", "--dry-run", "--steps", "4")  # the flag decides steps and stride together
    line = one_line_error(r)
    assert "--guidance must be between 0 and 1000, got -3.0 (guidance from config" in line
    assert str(tmp_path / "config.toml") in line
    (tmp_path / "config.toml").write_text("")
    monkeypatch.setenv("VQDIFF_DTYPE", "nonsense")
    r = cli("generate", "x", "--steps", "1")
    assert "unknown dtype 'nonsense' (dtype from env VQDIFF_DTYPE)" in one_line_error(r)
    r = cli("generate", "x", "--steps", "1", "--dtype", "half")  # a flag is its own origin
    assert one_line_error(r).startswith("error: unknown dtype 'half'; ")


def test_out_of_memory_message(cli, monkeypatch):
    from vqdiff_cli.pipeline import pipeline as api

    def boom(self, *a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield

    monkeypatch.setattr(api.VQDiffusion, "generate_iter", boom)
    r = cli("generate", "a cat", "--steps", "1", "-o", "o.png")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "ran out of memory" in line and "--batch-size" in line


def _warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def test_a_compile_failure_is_warned_about_once_and_recorded_in_json(cli, monkeypatch):
    """The library notes why torch.compile fell back; the CLI says so once per reason, however many images follow."""
    import torch

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded\ndetails")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    r = cli("generate", "a cat", "-n", "3", "--seed", "1", "--steps", "2", "--sampler", "fast", "--compile", "--json")
    assert r.exit_code == 0, r.output
    expected = [
        f"torch.compile of {name} failed, running it eagerly (RuntimeError: inductor exploded)"
        for name in ("fused_block", "fast_step")
    ]
    assert _warnings(r) == [f"warning: {note}" for note in expected]
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 3 and all(rec["fallbacks"] == expected for rec in records)
    plain = cli("generate", "a cat", "--seed", "1", "--steps", "2", "--sampler", "fast", "--json", "-o", "p.png")
    assert _warnings(plain) == [] and json.loads(plain.stdout)["fallbacks"] == []


def test_a_capture_failure_is_warned_about_once_per_batch_shape(cli, monkeypatch):
    """CUDA graphs forced on over stand-ins (tests/fake_cuda.py) whose capture fails: 5 images in batches of 2 are
    two batch shapes (2, then 1), each tried once and warned about once."""
    from vqdiff_cli.pipeline import fastpath

    from .fake_cuda import failing_capture, stand_in_streams

    streams, _ = stand_in_streams(monkeypatch)
    captures: list[int] = []
    monkeypatch.setattr(fastpath, "_Graph", failing_capture(captures, streams))
    monkeypatch.setattr(fastpath.Acceleration, "graphs_on", lambda self, device: True)
    r = cli("generate", "a cat", "-n", "5", "-b", "2", "--seed", "1", "--steps", "2", "--sampler", "fast", "--json")
    assert r.exit_code == 0, r.output
    assert captures == [2, 1]
    cause = "RuntimeError: operation not permitted when stream is capturing"
    expected = [f"CUDA graph capture failed for batches of {b}, running without graphs ({cause})" for b in (2, 1)]
    assert _warnings(r) == [f"warning: {note}" for note in expected]
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["fallbacks"] for rec in records] == [expected[:1]] * 4 + [expected]


def test_unexpected_error_and_debug(cli, monkeypatch):
    from vqdiff_cli.pipeline import pipeline as api

    def boom(self, *a, **k):
        raise ZeroDivisionError("surprise")
        yield

    monkeypatch.setattr(api.VQDiffusion, "generate_iter", boom)
    r = cli("generate", "a cat", "--steps", "1", "-o", "o.png")
    assert r.exit_code == 1
    assert "--debug" in one_line_error(r)
    r = cli("--debug", "generate", "a cat", "--steps", "1", "-o", "o.png")
    assert "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr


def test_version_and_help():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("vqdiff ")
    for command in ("generate", "encode", "decode", "info", "config", "completion"):
        r = CliRunner().invoke(app, [command, "--help"])
        assert r.exit_code == 0, command
        assert "Usage:" in r.stdout


def test_help_does_not_import_torch():
    code = "import sys; from vqdiff_cli.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_usage_error_from_typer_exit_code(cli):
    r = cli("generate", "a cat", "--steps", "many")
    assert r.exit_code == 2
    r = cli("generate", "a cat", "--no-such-flag")
    assert r.exit_code == 2


def _run_in_terminal(args: list[str], cwd, env) -> bytes:
    """Run a command with a pseudo-terminal as stdin/stdout/stderr; return everything it wrote."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0, seen
    return seen


def test_progress_bar_in_a_terminal_and_not_in_a_pipe(tiny, tmp_path):
    args = [
        sys.executable,
        "-m",
        "vqdiff_cli",
        "generate",
        "a cat",
        "--model",
        str(tiny.path),
        "-n",
        "2",
        "--seed",
        "1",
        "--steps",
        "30",
        "-o",
        "p.png",
    ]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    seen = _run_in_terminal(args, tmp_path, env)
    assert b"\x1b[" in seen  # the live bar draws with escape codes
    assert b"step 30/30" in seen
    assert b"it/s" in seen and b"eta" in seen
    colourless = _run_in_terminal([*args[:-1], "nc.png"], tmp_path, {**env, "NO_COLOR": "1"})
    assert re.search(rb"\x1b\[[0-9;]*m", colourless.replace(b"\x1b[0m", b"")) is None  # no colour codes
    assert b"step 30/30" in colourless
    piped = subprocess.run([*args[:-1], "q.png"], capture_output=True, cwd=tmp_path, env=env, check=False)
    assert piped.returncode == 0
    assert b"\x1b" not in piped.stderr and b"\x1b" not in piped.stdout
    assert piped.stdout.split() == [b"q-0.png", b"q-1.png"]


def test_ctrl_c_keeps_finished_images(tiny, tmp_path):
    import signal
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vqdiff_cli",
            "generate",
            "a cat",
            "--model",
            str(tiny.path),
            "-n",
            "400",
            "--seed",
            "1",
            "-o",
            "c.png",
            "--quiet",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "c-1.png").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    finished = sorted(tmp_path.glob("c-*.png"))
    assert 2 <= len(finished) < 400
    for path in finished:
        Image.open(path).load()  # every file that exists is a whole PNG
    assert not list(tmp_path.glob(".*.part"))  # no temporary file left behind


@pytest.mark.parametrize("moment", ["while-writing", "while-renaming"])
def test_ctrl_c_inside_a_write_leaves_no_partial_or_temporary_file(cli, tmp_path, monkeypatch, moment):
    """Ctrl-C inside `atomic_write` on purpose (the third image's write): the two finished images are kept whole,
    the third exists under no name, and no temporary file is left."""
    import io

    import vqdiff_cli.files as files
    import vqdiff_cli.images as images

    real_write, real_link = files.atomic_write, os.link
    calls: list[Path] = []
    partial: list[list[tuple[str, int]]] = []  # the temporary files at the moment of the interrupt

    def interrupt() -> None:
        partial.append([(p.name, p.stat().st_size) for p in tmp_path.glob(".*.part")])
        raise KeyboardInterrupt

    def link(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(calls) == 3 and moment == "while-renaming":
            interrupt()
        return real_link(src, dst, *args, **kwargs)

    def atomic_write(path, write, overwrite=False):  # type: ignore[no-untyped-def]
        calls.append(Path(path))
        if len(calls) < 3 or moment != "while-writing":
            return real_write(path, write, overwrite)

        def half_then_interrupt(f):  # type: ignore[no-untyped-def]
            whole = io.BytesIO()
            write(whole)
            f.write(whole.getvalue()[:100])
            f.flush()
            interrupt()

        return real_write(path, half_then_interrupt, overwrite)

    monkeypatch.setattr(images, "atomic_write", atomic_write)
    monkeypatch.setattr(os, "link", link)
    r = cli("generate", "a cat", "-n", "4", "--seed", "1", "--steps", "2", "-o", "c.png")
    assert r.exit_code == 130, r.output
    assert "interrupted; finished outputs were kept" in one_line_error(r)
    assert [p.name for p in calls] == ["c-0.png", "c-1.png", "c-2.png"]
    assert len(partial) == 1 and len(partial[0]) == 1 and partial[0][0][0].startswith(".c-2.png.")  # it was mid-write
    if moment == "while-writing":
        assert partial[0][0][1] == 100
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".part")) == ["c-0.png", "c-1.png"]
    for name in ("c-0.png", "c-1.png"):
        Image.open(tmp_path / name).load()  # whole PNGs


def test_excerpt_cuts_long_input_to_first_words_and_a_count():
    from vqdiff_cli.errors import excerpt

    assert excerpt("a red ball") == "a red ball"
    assert excerpt("/photos/my picture.png") == "/photos/my picture.png"
    words = " ".join(f"w{i}" for i in range(5000))
    assert excerpt(words) == "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 … (+4988 more words)"
    assert excerpt("one\ntwo\tthree") == "one two three"  # a message stays on one line
    path = "/data/" + "x" * 3000 + "/final.png"
    cut = excerpt(path)
    assert len(cut) <= 170 and cut.startswith("/data/xxx") and cut.endswith("xx/final.png")
    assert f"(+{len(path) - 140} characters)" in cut


def test_messages_quote_long_input_as_an_excerpt(cli, tmp_path, tiny_pipe):
    """A 5,000-word prompt, config value or file name: each message that quotes it stays one readable line."""
    prompt = " ".join(["cat"] * 5000)
    dropped = tiny_pipe.components.text.tokenize([prompt]).truncated[0].split()
    assert len(dropped) > 4000
    r = cli("generate", prompt, "--steps", "1", "--seed", "1", "-o", "long.png")
    assert r.exit_code == 0, r.output
    (warning,) = [line for line in r.stderr.splitlines() if line.startswith("warning: prompt longer")]
    assert warning == (
        "warning: prompt longer than the text encoder's 77 tokens; dropped: "
        f"'{' '.join(['cat'] * 12)} … (+{len(dropped) - 12} more words)'"
    )
    (tmp_path / "config.toml").write_text(f'guidance = "{prompt}"\n')
    error = one_line_error(cli("generate", "a cat", "--dry-run"))
    assert len(error) < 250 and "'guidance' must be float" in error and "(+4988 more words)" in error
    (tmp_path / "config.toml").unlink()
    r = cli("generate", "a cat", "-o", "x" * 3000 + ".png")  # too long for a file name: refused before loading
    assert r.exit_code == 2
    error = one_line_error(r)
    assert len(error) < 250 and error.startswith("error: cannot write xxx") and "File name too long" in error
