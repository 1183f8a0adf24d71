"""Models that ship inside the package: a name such as `shapes` that needs no cache, no download and no network.

A built-in model is a complete diffusers-format pipeline folder under `vqdiff_cli/weights/<name>/` (fp16 safetensors,
the same layout `vqdiff train` exports), read in place like a user's own folder. A bare built-in name wins over a
folder of the same name in the working directory; `./shapes` names the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BuiltinModel:
    """One model shipped with vqdiff."""

    name: str
    summary: str

    @property
    def folder(self) -> Path:
        return Path(str(resources.files("vqdiff_cli"))) / "weights" / self.name

    @property
    def present(self) -> bool:
        """Whether its files are installed (a source checkout without the weights has the name but no model)."""
        return (self.folder / "model_index.json").is_file()

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file()) if self.present else 0

    def record(self) -> dict[str, Any]:
        """What `models list --json` and `models path --json` print for it."""
        return {
            "model": self.name,
            "builtin": True,
            "size": self.size,
            "path": str(self.folder),
            "summary": self.summary,
        }


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "shapes": BuiltinModel(
        "shapes",
        "one shape on a plain background, 32 x 32 px, trained by vqdiff on `vqdiff dataset shapes` (offline)",
    ),
}


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model called `name` when its files are installed, else None (then the name means what any other
    name means: a folder or a repo id). Paths such as `./shapes` are never built-in names."""
    model = BUILTIN_MODELS.get(name)
    return model if model is not None and model.present else None
