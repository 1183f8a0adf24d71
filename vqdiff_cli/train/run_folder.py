"""The run folder of a training run: its layout, the checkpoints (written atomically, the newest K kept, refused
when made with other settings), train_log.jsonl, and the checks before a run starts.

    DIR/checkpoints/step-NNNNNNNN/state.pt   DIR/train_log.jsonl   DIR/train_config.json   DIR/loss.png
    DIR/validation/step-NNNNNNNN.png         DIR/cache/ (token grids, a built tokenizer)   and the exported result
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

CHECKPOINT_FORMAT = 1
CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
LOSS_CURVE = "loss.png"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# -- checkpoints ---------------------------------------------------------------------------------------------------


def checkpoint_dirs(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the finished checkpoints of a run, oldest first."""
    folder = output / CHECKPOINTS
    found = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        m = _STEP_DIR.match(entry.name)
        if m and (entry / "state.pt").is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}  # saved at once: no copy


def write_checkpoint(output: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """checkpoints/step-NNNNNNNN/state.pt, written into a temporary folder and renamed in one step; then only the
    newest `keep` are kept."""
    folder = output / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: saved -> current' for every setting that differs (nested dicts compared key by key)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint of this vqdiff version")
    diff = differences(state.get("config", {}), config)
    if diff:
        shown = "; ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
        raise UsageError(
            f"the checkpoint {path.name} was made with other settings: {shown}",
            hint="resume with the same settings, or start a new run in another folder",
        )
    return state


# -- the run folder ------------------------------------------------------------------------------------------------

RUN_ENTRIES = (CHECKPOINTS, LOG_FILE, CONFIG_FILE, LOSS_CURVE, "validation", "tensorboard")


def prepare_output(
    output: Path, *, resume: bool, overwrite: bool, written: tuple[str, ...] = (), clear: bool = True
) -> None:
    """Check the run folder before any work: new or empty, or a run to `resume`; `overwrite` clears what an earlier
    run wrote there (its checkpoints, logs and the `written` result entries), leaving other files alone. With
    `clear=False` it only checks (data-parallel ranks check; the main process then clears)."""
    from ..errors import OutputError
    from ..files import check_folder_writable

    if output.exists() and not output.is_dir():
        raise OutputError(f"{output} is a file, not a folder for the training run")
    check_folder_writable(output)
    if resume:
        if overwrite:
            raise UsageError("--resume continues the run in the folder; --overwrite starts it over: choose one")
        if not checkpoint_dirs(output):
            raise UsageError(f"{output} holds no checkpoint to resume", hint="leave out --resume to start a run")
        return
    entries = [e for e in output.iterdir() if not e.name.startswith(".")] if output.is_dir() else []
    if entries and not overwrite:
        hint = "pass --resume to continue its run, or --overwrite to start over" if checkpoint_dirs(output) else None
        raise OutputError(
            f"{output} is not empty", hint=hint or "choose a new folder, or pass --overwrite to clear an earlier run"
        )
    for name in (*RUN_ENTRIES, *written) if clear else ():
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# -- the log ---------------------------------------------------------------------------------------------------------


def append_log(path: Path, record: dict[str, Any]) -> None:
    """One line of train_log.jsonl."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_log(output: Path) -> list[dict[str, Any]]:
    path = output / LOG_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def truncate_log(output: Path, step: int) -> None:
    """Drop the log lines of steps after `step` (written after the checkpoint a run resumes from)."""
    rows = [r for r in read_log(output) if int(r.get("step", 0)) <= step]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    tmp = output / f".{LOG_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output / LOG_FILE)
