"""Models from a Hub repo id, against a stand-in Hub on 127.0.0.1 (tests/hub_server.py) and the real download code:
download once and convert once, offline, faults on the server, two processes at once, damaged cache entries,
and the `download` / `models` commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vqdiff_cli.cli import app

from .conftest import start_hub
from .hub_server import FakeHub

REPO = "acme/tiny-vq"
BIN = "transformer/diffusion_pytorch_model.bin"
FP32_WEIGHTS = {
    "transformer/diffusion_pytorch_model.bin",
    "vqvae/diffusion_pytorch_model.bin",
    "text_encoder/pytorch_model.bin",
    "learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.bin",
}
FP16_SAFETENSORS = {
    "transformer/diffusion_pytorch_model.fp16.safetensors",
    "vqvae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
    "learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.fp16.safetensors",
}
SMALL_FILES = {
    "model_index.json",
    "transformer/config.json",
    "vqvae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "learned_classifier_free_sampling_embeddings/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
}

runner = CliRunner()


def cli(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def vqdiff(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vqdiff_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ),
        **kwargs,
    )


# -- the repository and the server ------------------------------------------------------------------------------


@pytest.fixture
def hub(hub_folder, old_fp16_folder, tmp_path, monkeypatch):
    """The stand-in Hub serving REPO (main and the old fp16 branch), with every cache in tmp_path."""
    server = start_hub(monkeypatch, tmp_path, {(REPO, "main"): hub_folder, (REPO, "fp16"): old_fp16_folder})
    yield server
    server.stop()


def offline_env(monkeypatch, on: bool) -> None:
    import huggingface_hub.constants

    if on:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", on)


def main_commit(hub: FakeHub) -> str:
    return hub.branches[REPO]["main"]


def entries(tmp_path: Path) -> list[Path]:
    """Entry folders in the test's vqdiff cache (hidden leftovers included, to be asserted on)."""
    repo = tmp_path / "vq" / "hub" / "models--acme--tiny-vq"
    if not repo.is_dir():
        return []
    return sorted(p for c in repo.iterdir() if c.is_dir() and c.name != "refs" for p in c.iterdir())


def generate(tmp_path: Path, model: str, *args: str, name: str = "out"):
    return cli(
        "generate",
        "a red ball",
        "--model",
        model,
        "--seed",
        "3",
        "--steps",
        "5",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / f"{name}.png"),
        "--save-tokens",
        str(tmp_path / f"{name}.npy"),
        "--overwrite",
        *args,
    )


@pytest.fixture
def local_tokens(tiny, tmp_path) -> np.ndarray:
    """The tokens generate gives for the same checkpoint loaded from its local folder."""
    r = generate(tmp_path, str(tiny.path), name="local")
    assert r.exit_code == 0, r.output
    return np.load(tmp_path / "local.npy")


# -- download once, convert once ----------------------------------------------------------------------------------


def test_first_run_downloads_and_converts_second_run_fetches_no_weights(hub, tmp_path, local_tokens):
    r = generate(tmp_path, REPO)
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "out.npy"), local_tokens)
    fetched = hub.fetched()
    assert sorted(fetched) == sorted(SMALL_FILES | FP32_WEIGHTS)  # each once, nothing else
    [entry] = entries(tmp_path)
    assert entry.name == "auto-float32" and entry.parent.name == main_commit(hub)
    assert (entry / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(entry.rglob("*.bin"))
    manifest = json.loads((entry / "vqdiff-manifest.json").read_text())
    assert manifest["commit"] == main_commit(hub) and manifest["sources"]["transformer"][0]["file"] == BIN

    hub.clear_log()
    r = generate(tmp_path, REPO, name="again")
    assert r.exit_code == 0, r.output
    assert [(q.method, q.path) for q in hub.log()] == [("GET", f"/api/models/{REPO}/revision/main")]
    assert np.array_equal(np.load(tmp_path / "again.npy"), local_tokens)


def test_python_api_reports_progress_and_source(hub, tmp_path):
    from vqdiff_cli import VQDiffusion

    events = []
    pipe = VQDiffusion.from_pretrained(REPO, device="cpu", on_progress=events.append)
    assert pipe.source.name == REPO and pipe.source.revision == main_commit(hub)
    assert pipe.source.path == entries(tmp_path)[0]
    kinds = {e.kind for e in events}
    assert kinds == {"download", "convert"}
    last = [e for e in events if e.kind == "download"][-1]
    assert last.done == last.total > 0
    assert pipe.components.variants["transformer"] == "fp32"


@pytest.mark.parametrize(
    ("args", "weights", "entry_name"),
    [
        ((), FP32_WEIGHTS, "auto-float32"),
        (("--dtype", "bfloat16"), FP16_SAFETENSORS, "auto-bfloat16"),
        (("--dtype", "bfloat16", "--variant", "fp32"), FP32_WEIGHTS, "fp32-bfloat16"),
        (("--variant", "fp16"), FP16_SAFETENSORS, "fp16-float32"),
    ],
)
def test_only_the_needed_variant_and_format_are_fetched(hub, tmp_path, args, weights, entry_name):
    r = cli("download", REPO, "--device", "cpu", *args)
    assert r.exit_code == 0, r.output
    fetched = hub.fetched()
    assert {f for f in fetched if f.endswith((".bin", ".safetensors"))} == weights
    assert len(fetched) == len(set(fetched))
    assert "README.md" not in fetched and ".gitattributes" not in fetched
    assert [e.name for e in entries(tmp_path)] == [entry_name]
    assert Path(r.stdout.strip()) == entries(tmp_path)[0]


def test_safetensors_already_in_the_run_dtype_are_linked_not_copied(hub, tmp_path):
    r = cli("download", REPO, "--device", "cpu", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    [entry] = entries(tmp_path)
    converted = entry / "transformer" / "diffusion_pytorch_model.fp16.safetensors"
    hub_file = next((tmp_path / "hf" / "hub").rglob("snapshots/*/transformer/diffusion_pytorch_model.fp16.safetensors"))
    assert converted.stat().st_ino == hub_file.resolve().stat().st_ino
    # the text encoder runs in float32, so its fp16 file was converted
    text = entry / "text_encoder" / "model.fp16.safetensors"
    assert text.stat().st_ino != next((tmp_path / "hf").rglob("model.fp16.safetensors")).resolve().stat().st_ino


def test_files_the_hub_cache_already_has_are_not_fetched_again(hub, tmp_path, monkeypatch):
    """What diffusers' from_pretrained leaves in the Hub cache (a snapshot_download) is used as it is."""
    from huggingface_hub import snapshot_download

    snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=str(tmp_path / "hf" / "hub"))
    hub.clear_log()
    r = generate(tmp_path, REPO)
    assert r.exit_code == 0, r.output
    assert hub.fetched() == []
    shutil.rmtree(tmp_path / "vq")
    hub.stop()
    offline_env(monkeypatch, True)
    assert generate(tmp_path, REPO).exit_code == 0  # offline: the branch is resolved through the Hub cache's refs


def test_pinned_commit_makes_no_request_at_all(hub, tmp_path):
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    hub.clear_log()
    r = generate(tmp_path, REPO, "--revision", main_commit(hub))
    assert r.exit_code == 0, r.output
    assert hub.log() == []


def test_token_from_hf_token_is_sent(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    assert {q.authorization for q in hub.log()} == {"Bearer hf_stand_in_token"}


def test_cache_dir_option(hub, tmp_path):
    other = tmp_path / "elsewhere"
    r = cli("download", REPO, "--device", "cpu", "--cache-dir", str(other), "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert Path(record["path"]).is_relative_to(other) and record["commit"] == main_commit(hub)
    assert entries(tmp_path) == []
    listed = cli("models", "list", "--cache-dir", str(other), "--json")
    assert [json.loads(line)["path"] for line in listed.stdout.splitlines()] == [record["path"]]


# -- offline ------------------------------------------------------------------------------------------------------


def test_offline_works_with_the_server_stopped(hub, tmp_path, monkeypatch, local_tokens):
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    hub.stop()
    r = generate(tmp_path, REPO, "--offline")
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "out.npy"), local_tokens)
    offline_env(monkeypatch, True)
    r = generate(tmp_path, REPO)
    assert r.exit_code == 0, r.output
    offline_env(monkeypatch, False)  # online, but the Hub does not answer: the cached commit is used
    r = generate(tmp_path, REPO)
    assert r.exit_code == 0, r.output
    assert "using the cached commit" in r.output
    # a real process, told by the environment alone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = vqdiff("decode", str(tmp_path / "out.npy"), "--model", REPO, "-o", str(tmp_path / "d.png"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (tmp_path / "d.png").is_file() and "cannot reach" not in err


def test_offline_with_nothing_cached_says_how_to_download(hub, tmp_path):
    r = generate(tmp_path, REPO, "--offline")
    assert r.exit_code == 1
    assert REPO in r.output and f"vqdiff download {REPO}" in r.output
    assert "Traceback" not in r.output
    assert hub.log() == []
    hub.stop()  # online but unreachable, nothing cached: says so
    r = generate(tmp_path, REPO)
    assert r.exit_code == 1 and "cannot reach" in r.output and "Traceback" not in r.output


def test_offline_with_other_files_cached_names_what_is_missing(hub, tmp_path):
    assert cli("download", REPO, "--device", "cpu").exit_code == 0  # fp32 files only
    r = cli("download", REPO, "--device", "cpu", "--variant", "fp16", "--offline")
    assert r.exit_code == 1
    assert "diffusion_pytorch_model.fp16" in r.output and f"vqdiff download {REPO}" in r.output


# -- errors and faults --------------------------------------------------------------------------------------------


def test_a_file_missing_on_the_server_is_named(hub, tmp_path):
    hub.hidden.add(BIN)
    r = cli("download", REPO, "--device", "cpu")
    assert r.exit_code == 1
    assert BIN in r.output and "missing" in r.output and "Traceback" not in r.output
    assert entries(tmp_path) == []


def test_a_component_without_weights_is_named(hub, hub_folder, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(hub_folder, partial)
    for f in (partial / "vqvae").glob("diffusion_pytorch_model*"):
        f.unlink()
    hub.publish("acme/partial", partial)
    r = cli("download", "acme/partial", "--device", "cpu")
    assert r.exit_code == 1
    assert "has no weights for vqvae" in r.output and "acme/partial" in r.output


def test_old_fp16_branch_is_explained(hub):
    r = cli("download", REPO, "--revision", "fp16", "--device", "cpu")
    assert r.exit_code == 1
    assert "learned_classifier_free_sampling_embeddings" in r.output and "--variant fp16" in r.output


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("acme/nothing-here", (), "neither a local folder nor a repository"),
        (REPO, ("--revision", "no-such-branch"), "has no revision 'no-such-branch'"),
        (REPO, ("--variant", "fp8"), "unknown variant"),
    ],
)
def test_bad_names(hub, model, args, message):
    r = cli("download", model, "--device", "cpu", *args)
    assert r.exit_code == (2 if "variant" in message else 1)
    assert message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("chunk", [None, 4096])
def test_a_dropped_connection_is_resumed_or_restarted(hub, tmp_path, local_tokens, monkeypatch, chunk):
    """huggingface_hub retries at once, asking for the bytes after the last chunk it wrote (10 MB chunks by default,
    so at this size it starts over; with small chunks the Range request shows)."""
    import huggingface_hub.constants

    if chunk is not None:
        monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    size = hub.commits[REPO][main_commit(hub)][BIN].size
    hub.drop_once(BIN, size // 2)
    r = generate(tmp_path, REPO)
    assert r.exit_code == 0, r.output
    first, second = hub.log("GET", BIN)
    assert first.range is None
    if chunk is None:
        assert second.range is None
    else:
        assert second.range is not None and 0 < int(second.range.removeprefix("bytes=").rstrip("-")) <= size // 2
    assert np.array_equal(np.load(tmp_path / "out.npy"), local_tokens)


def test_a_download_killed_halfway_starts_again_cleanly(hub, tmp_path, local_tokens):
    size = hub.commits[REPO][main_commit(hub)][BIN].size
    fault = hub.hold(BIN, size // 2)
    proc = vqdiff("download", REPO, "--device", "cpu")
    try:
        assert fault.reached.wait(300), "the download never reached the transformer weights"
    finally:
        proc.kill()
        proc.communicate()
    hub.release(fault)
    assert entries(tmp_path) == []
    r = generate(tmp_path, REPO)
    assert r.exit_code == 0, r.output
    assert [g.range for g in hub.log("GET", BIN)] == [None, None]  # the second run fetched the file whole
    assert np.array_equal(np.load(tmp_path / "out.npy"), local_tokens)


def test_two_processes_at_once_leave_one_good_entry(hub, tmp_path):
    size = hub.commits[REPO][main_commit(hub)][BIN].size
    hub.hold(BIN, size // 2, wait_for_heads=2)  # the first transfer waits until both processes have asked for it
    procs = [vqdiff("download", REPO, "--device", "cpu", "--json") for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    paths = {json.loads(out)["path"] for out, _ in results}
    [entry] = entries(tmp_path)  # one entry, no leftovers of a second build
    assert paths == {str(entry)}
    assert len(hub.log("GET", BIN)) == 1  # and the weights were fetched once
    r = cli("models", "list", "--json")
    assert [json.loads(line)["path"] for line in r.stdout.splitlines()] == [str(entry)]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _bad_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (_truncate, "transformer/diffusion_pytorch_model.safetensors"),
        (_bad_header, "vqvae/diffusion_pytorch_model.safetensors"),
        (Path.unlink, "vqdiff-manifest.json"),
        (lambda p: p.write_text("{}"), "tokenizer/vocab.json"),
    ],
)
def test_a_damaged_entry_is_detected_and_rebuilt(hub, tmp_path, local_tokens, damage, file):
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    [entry] = entries(tmp_path)
    target = entry / file
    size = target.stat().st_size
    damage(target)
    hub.stop()  # rebuilt from the Hub cache: no network needed
    r = generate(tmp_path, REPO, "--offline")
    assert r.exit_code == 0, r.output
    assert [e.name for e in entries(tmp_path)] == ["auto-float32"]
    assert target.stat().st_size == size
    assert np.array_equal(np.load(tmp_path / "out.npy"), local_tokens)


def _hub_file(tmp_path: Path, path: str) -> Path:
    """The blob in the Hub cache that the snapshot's `path` links to."""
    [snapshot] = (tmp_path / "hf" / "hub" / "models--acme--tiny-vq" / "snapshots").iterdir()
    return (snapshot / path).resolve()


def _zero_start(path: Path) -> None:
    """Damage a file and keep its size (as a bad sector or an interrupted overwrite may)."""
    with open(path, "r+b") as f:
        f.write(bytes(64))


@pytest.mark.parametrize(("damage", "pinned"), [(_truncate, False), (_zero_start, False), (_zero_start, True)])
def test_a_damaged_file_in_the_hub_cache_is_fetched_again(hub, tmp_path, local_tokens, damage, pinned):
    """Truncated: its size differs from the listing's. Same size: converting fails and it no longer hashes to its
    blob name. Either way it is fetched again (once) and the model works, with a note saying so."""
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    damage(_hub_file(tmp_path, BIN))
    assert cli("models", "rm", REPO, "--yes").exit_code == 0
    hub.clear_log()
    r = generate(tmp_path, REPO, *(("--revision", main_commit(hub)) if pinned else ()))
    assert r.exit_code == 0, r.output
    assert f"{BIN} in the Hugging Face cache" in r.output and "fetching it again" in r.output
    assert hub.fetched() == [BIN]
    assert np.array_equal(np.load(tmp_path / "out.npy"), local_tokens)
    hub.clear_log()
    assert generate(tmp_path, REPO, name="again").exit_code == 0
    assert hub.fetched() == []


@pytest.mark.parametrize("damage", [_truncate, _zero_start])
def test_offline_a_damaged_file_in_the_hub_cache_is_named(hub, tmp_path, monkeypatch, local_tokens, damage):
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    blob = _hub_file(tmp_path, BIN)
    damage(blob)
    assert cli("models", "rm", REPO, "--yes").exit_code == 0  # the branch is still resolved, through the Hub cache
    hub.stop()
    for args in (("--offline",), ()):  # offline, and online with the Hub out of reach
        r = generate(tmp_path, REPO, *args)
        assert r.exit_code == 1, r.output
        [line] = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert BIN in line and "damaged" in line and f"run `vqdiff download {REPO}` while online" in line
        assert "never downloaded" not in line and "cannot read weights" not in line
    # online again: `vqdiff download` repairs it
    monkeypatch.setenv("HF_ENDPOINT", hub.start().endpoint)  # a new port
    r = cli("download", REPO, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert blob.stat().st_size == hub.commits[REPO][main_commit(hub)][BIN].size
    offline_env(monkeypatch, True)
    r = generate(tmp_path, REPO)
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "out.npy"), local_tokens)


@pytest.mark.parametrize("pinned", [False, True])
def test_a_file_missing_from_the_hub_cache_is_fetched(hub, tmp_path, local_tokens, pinned):
    """A snapshot left incomplete (a first download cut short) is completed, not reported as a broken checkpoint."""
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    config = _hub_file(tmp_path, "vqvae/config.json")
    config.unlink()
    assert cli("models", "rm", REPO, "--yes").exit_code == 0
    hub.clear_log()
    r = generate(tmp_path, REPO, *(("--revision", main_commit(hub)) if pinned else ()))
    assert r.exit_code == 0, r.output
    assert hub.fetched() == ["vqvae/config.json"]
    assert np.array_equal(np.load(tmp_path / "out.npy"), local_tokens)


def test_an_unreadable_file_that_cannot_be_checked_gets_a_repair_hint(hub, tmp_path):
    """A blob not named by its hash (another tool's cache layout) cannot be verified: the error says how to repair."""
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    blob = _hub_file(tmp_path, BIN)
    renamed = blob.with_name("not-a-hash")
    blob.rename(renamed)
    [snapshot] = (tmp_path / "hf" / "hub" / "models--acme--tiny-vq" / "snapshots").iterdir()
    (snapshot / BIN).unlink()
    (snapshot / BIN).symlink_to(renamed)
    _truncate(renamed)
    assert cli("models", "rm", REPO, "--yes").exit_code == 0
    r = generate(tmp_path, REPO, "--offline")
    assert r.exit_code == 1
    [line] = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert "cannot read weights" in line and "delete it from the Hugging Face cache" in line
    assert f"vqdiff download {REPO}" in line


def test_offline_with_an_unrecorded_branch_says_so(hub, tmp_path):
    """Files cached by a tool that downloads by commit only (or by an older vqdiff) record no branch."""
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    assert cli("models", "rm", REPO, "--yes").exit_code == 0
    shutil.rmtree(tmp_path / "hf" / "hub" / "models--acme--tiny-vq" / "refs")
    r = generate(tmp_path, REPO, "--offline")
    assert r.exit_code == 1
    assert "the commit 'main' points at was never recorded" in r.output and "never downloaded" not in r.output
    assert generate(tmp_path, REPO, "--offline", "--revision", main_commit(hub)).exit_code == 0


def test_a_cache_folder_that_is_a_file_is_one_line_error(hub, tmp_path, monkeypatch):
    bear = tmp_path / "bear.png"
    bear.write_bytes(b"not a folder")
    for args in (("--cache-dir", str(bear)), ("--cache-dir", str(bear / "sub"))):
        r = generate(tmp_path, REPO, *args)
        assert r.exit_code == 2, r.output
        [line] = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert f"vqdiff's cache folder {bear}" in line and "is a file" in line and "--cache-dir" in line
        assert "unexpected" not in r.output and "Traceback" not in r.output
        r = cli("models", "list", *args)
        assert r.exit_code == 2 and "is a file" in r.output
    assert hub.log() == []
    monkeypatch.setenv("HF_HOME", str(bear))
    r = generate(tmp_path, REPO)
    assert r.exit_code == 2, r.output
    assert f"the Hugging Face cache folder {bear / 'hub'}" in r.output and "HF_HOME" in r.output
    assert "unexpected" not in r.output


# -- models list / path / rm --------------------------------------------------------------------------------------


def test_models_list_path_and_rm(hub, tmp_path, monkeypatch):
    from vqdiff_cli.cli import models as models_cli

    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    assert cli("download", REPO, "--device", "cpu", "--dtype", "bfloat16").exit_code == 0
    commit = main_commit(hub)

    records = [json.loads(line) for line in cli("models", "list", "--json").stdout.splitlines()]
    assert sorted((r["model"], r["dtype"], r["variant"], r["commit"]) for r in records) == [
        (REPO, "bfloat16", "auto", commit),
        (REPO, "float32", "auto", commit),
    ]
    assert all(r["refs"] == ["main"] and r["size"] > 0 and Path(r["path"]).is_dir() for r in records)
    text = cli("models", "list").stdout.splitlines()
    assert len(text) == 2 and all(line.startswith(f"{REPO}  main  {commit[:12]}") for line in text)

    assert len(cli("models", "path", REPO).stdout.splitlines()) == 2
    r = cli("models", "path", REPO, "--dtype", "bfloat16")
    assert r.exit_code == 0 and r.stdout.strip().endswith("auto-bfloat16")
    r = cli("models", "path", "acme/other")
    assert r.exit_code == 1 and "no cached copy of acme/other" in r.output and "vqdiff download acme/other" in r.output

    r = cli("models", "rm", REPO)  # not a terminal and no --yes: refuses instead of waiting for an answer
    assert r.exit_code == 2 and "--yes" in r.output
    assert len(entries(tmp_path)) == 2
    monkeypatch.setattr(models_cli, "_interactive", lambda: True)
    r = cli("models", "rm", REPO, input="n\n")
    assert r.exit_code == 1 and len(entries(tmp_path)) == 2
    r = cli("models", "rm", REPO, "--revision", "main", input="y\n")
    assert r.exit_code == 0, r.output
    assert entries(tmp_path) == []
    assert len([line for line in r.stdout.splitlines() if line.startswith(str(tmp_path))]) == 2

    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    r = cli("models", "rm", REPO, "--revision", commit[:10], "--yes", "--json")
    assert r.exit_code == 0
    assert [json.loads(line)["removed"] for line in r.stdout.splitlines()] == [True]
    assert cli("models", "list", "--json").stdout == ""
    assert not (tmp_path / "vq" / "hub" / "models--acme--tiny-vq").exists()


def test_models_rm_in_a_real_process_without_a_terminal_refuses(hub, tmp_path):
    assert cli("download", REPO, "--device", "cpu").exit_code == 0
    proc = vqdiff("models", "rm", REPO)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--yes" in err and "Traceback" not in err
    assert len(entries(tmp_path)) == 1


# -- local folders ------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_local_folder_is_read_in_place_never_copied_or_converted(tiny, tmp_path, monkeypatch):
    """README: local folders are never copied or converted. Pickled fp32 .bin files, in every dtype: after runs that
    would fetch and convert a Hub model, the folder is as it was and neither cache holds anything."""
    local = tmp_path / "my-model"
    shutil.copytree(tiny.path, local)
    before = _snapshot(local)
    vq_cache, hf_home = tmp_path / "vq", tmp_path / "hf"
    monkeypatch.setenv("VQDIFF_CACHE_DIR", str(vq_cache))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("VQDIFF_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.chdir(tmp_path)
    for dtype in ("float32", "float16"):
        r = cli("generate", "a cat", "--model", str(local), "--device", "cpu", "--dtype", dtype, "--steps", "2",
                "--seed", "1", "-o", f"out-{dtype}.png")  # fmt: skip
        assert r.exit_code == 0, r.output
    from vqdiff_cli import VQDiffusion

    pipe = VQDiffusion.from_pretrained(local, device="cpu", dtype="bfloat16")
    assert pipe.source.path == local.resolve()
    assert _snapshot(local) == before
    assert not vq_cache.exists() or list(vq_cache.rglob("*")) == []
    assert not hf_home.exists() or [p for p in hf_home.rglob("*") if p.is_file()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model", "out-float16.png", "out-float32.png"]
