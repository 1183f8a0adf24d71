"""Write completions/ from the app: `python scripts/completions.py` (tests/test_completion.py checks them)."""

from __future__ import annotations

from pathlib import Path

from vqdiff_cli.cli import app
from vqdiff_cli.cli.completion import FILES, command_tree, script


def main() -> None:
    folder = Path(__file__).resolve().parent.parent / "completions"
    folder.mkdir(exist_ok=True)
    root = command_tree(app)
    for shell, name in FILES.items():
        (folder / name).write_text(script(shell, root), encoding="utf-8")
        print(folder / name)


if __name__ == "__main__":
    main()
