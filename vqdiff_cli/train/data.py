"""Training data on disk: a folder of images with captions, loaded at one resolution, and its token-grid cache.

Captions come from a `metadata.jsonl` (Hugging Face `imagefolder`: `file_name` and a text field) or from a `NAME.txt`
beside each `NAME.png`. Images are resized and centre-cropped to the resolution; unreadable, truncated or tiny ones are
skipped and counted (`strict` makes them an error). The order of examples in batches is a pure function of the seed
and the step, so a resumed run continues with the very batches an uninterrupted one would see.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError, VqdiffError
from ..images import fit_square, load_rgb

METADATA_FILE = "metadata.jsonl"
MAX_UPSCALE = 2.0  # an image whose shorter side is below resolution / MAX_UPSCALE is "tiny" and skipped
CACHE_FORMAT = 1


def image_suffixes() -> frozenset[str]:
    """File suffixes Pillow can open (.png, .jpg, .webp, ...)."""
    return frozenset(Image.registered_extensions())


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str

    def relative(self, root: Path) -> str:
        return self.path.relative_to(root).as_posix()


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def _listing(root: Path) -> list[Path]:
    suffixes = image_suffixes()
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _missing(root: Path, names: Sequence[str], where: str) -> UsageError:
    shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    return UsageError(
        f"{where} gives captions for {len(names)} file(s) that do not exist in {root}: {shown}",
        hint="fix or remove those captions",
    )


def _from_metadata(root: Path, column: str) -> list[Example]:
    path = root / METADATA_FILE
    examples: list[Example] = []
    missing: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}, line {number}: not a JSON object")
        name, caption = row.get("file_name"), row.get(column)
        if not isinstance(name, str) or not name:
            raise UsageError(f"{path}, line {number}: no 'file_name'")
        if not isinstance(caption, str):
            hint = "name the caption field with --caption-column" if column not in row else None
            raise UsageError(f"{path}, line {number}: no text field '{column}'", hint=hint)
        image = root / name
        if not image.is_file():
            missing.append(name)
            continue
        examples.append(Example(image, caption.strip()))
    if missing:
        raise _missing(root, missing, METADATA_FILE)
    return examples


def _from_text_files(root: Path, images: list[Path], need_captions: bool, skipped: list[Skipped]) -> list[Example]:
    stems = {p.with_suffix("") for p in images}
    orphans = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.txt") if p.is_file() and p.with_suffix("") not in stems
    )
    if orphans and need_captions:
        raise _missing(root, orphans, "NAME.txt caption files")
    examples = []
    for image in images:
        text = image.with_suffix(".txt")
        if text.is_file():
            try:
                caption = text.read_text(encoding="utf-8-sig").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"cannot read caption {text}: {e}") from None
        elif need_captions:
            skipped.append(Skipped(image, "no caption"))
            continue
        else:
            caption = ""
        examples.append(Example(image, caption))
    return examples


def find_examples(
    root: Path, need_captions: bool = True, caption_column: str = "text"
) -> tuple[list[Example], list[Skipped]]:
    """Every captioned image under `root`, and the images left out for want of a caption.

    With a metadata.jsonl only the files it names are used; otherwise every image (in subfolders too), captioned by
    the NAME.txt beside it. `need_captions=False` (the VQ-VAE stage) takes images without captions too.
    """
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder of images" if root.exists() else f"data folder not found: {root}")
    skipped: list[Skipped] = []
    if (root / METADATA_FILE).is_file():
        examples = _from_metadata(root, caption_column)
    else:
        examples = _from_text_files(root, _listing(root), need_captions, skipped)
    if not examples and not skipped:
        where = f"{METADATA_FILE} names no image" if (root / METADATA_FILE).is_file() else "no image files"
        raise UsageError(f"{root} has {where}", hint="put images there with captions in NAME.txt or metadata.jsonl")
    return examples, skipped


@dataclass
class ImageSet:
    """Images loaded at one resolution, with their captions and what was skipped."""

    root: Path
    resolution: int
    pixels: torch.Tensor  # (M, 3, R, R) uint8
    examples: list[Example]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.examples]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, 3, R, R) float32 in [-1, 1]."""
        return self.pixels[list(indices)].float() / 127.5 - 1.0


def load_image(path: Path, resolution: int) -> np.ndarray | str:
    """One image as an (R, R, 3) uint8 array, or why it cannot be used."""
    try:
        image = load_rgb(path)
    except VqdiffError as e:
        return e.message.removeprefix("cannot read image ").removeprefix(f"{path}: ")
    if min(image.size) * MAX_UPSCALE < resolution:
        return f"too small ({image.size[0]}x{image.size[1]} for {resolution} px)"
    return np.asarray(fit_square(image, resolution), dtype=np.uint8)


def describe_skipped(skipped: Sequence[Skipped], root: Path) -> str:
    first = skipped[0]
    reasons: dict[str, int] = {}
    for s in skipped:
        kind = s.reason.split(" (")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    counts = ", ".join(f"{n} {kind}" for kind, n in reasons.items())
    return f"{len(skipped)} image(s) skipped ({counts}); first: {first.path.relative_to(root)}: {first.reason}"


def load_images(
    root: Path,
    resolution: int,
    *,
    need_captions: bool = True,
    caption_column: str = "text",
    strict: bool = False,
    on_image: Callable[[int, int], None] | None = None,
) -> ImageSet:
    """Read and check every image (`on_image(done, total)` reports progress); skipped ones are listed, or with
    `strict` refused. No usable image at all is an error."""
    if resolution < 1:
        raise UsageError(f"--resolution must be positive, got {resolution}")
    examples, skipped = find_examples(root, need_captions, caption_column)
    kept: list[Example] = []
    arrays: list[np.ndarray] = []
    for i, example in enumerate(examples):
        result = load_image(example.path, resolution)
        if isinstance(result, str):
            skipped.append(Skipped(example.path, result))
        else:
            kept.append(example)
            arrays.append(result)
        if on_image is not None:
            on_image(i + 1, len(examples))
    if skipped and strict:
        raise UsageError(describe_skipped(skipped, root), hint="fix or remove them, or leave out --strict")
    if not kept:
        raise UsageError(f"{root} has no usable image: {describe_skipped(skipped, root)}")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(root, resolution, pixels, kept, skipped)


# -- batches ------------------------------------------------------------------------------------------------------


def epoch_order(num_examples: int, epoch: int, seed: int) -> torch.Tensor:
    """The shuffled order of one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g)


def batch_indices(num_examples: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The examples of global batch `step`: consecutive places in the stream of shuffled epochs (a batch may
    straddle two epochs). Data-parallel ranks take consecutive slices of it."""
    start = step * global_batch
    out: list[int] = []
    orders: dict[int, torch.Tensor] = {}
    for place in range(start, start + global_batch):
        epoch = place // num_examples
        if epoch not in orders:
            orders[epoch] = epoch_order(num_examples, epoch, seed)
        out.append(int(orders[epoch][place % num_examples]))
    return out


def holdout_split(num_examples: int, fraction: float, seed: int, most: int = 64) -> tuple[list[int], list[int]]:
    """(train, held out) indices: a seeded `fraction` of the examples (at least 1, at most `most`) held out, as long
    as at least one example is left to train on."""
    if num_examples < 2 or fraction <= 0:
        return list(range(num_examples)), []
    count = min(most, max(1, round(num_examples * fraction)), num_examples - 1)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:count])
    return sorted(order[count:]), held


# -- the token cache of the transformer stage ---------------------------------------------------------------------


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def files_digest(root: Path, examples: Sequence[Example]) -> str:
    """A hash of the image files a dataset is read from: names, sizes and modification times."""
    h = hashlib.sha256()
    for example in sorted(examples, key=lambda e: e.path):
        st = os.stat(example.path)
        h.update(f"{example.relative(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


@dataclass
class TokenSet:
    """The dataset as token grids of a frozen VQ-VAE, with captions."""

    tokens: torch.Tensor  # (M, N) int64, N = h * w
    captions: list[str]
    files: list[str]  # relative paths, as read
    skipped: list[Skipped]

    def __len__(self) -> int:
        return len(self.captions)


def cache_key(vqvae_digest: str, resolution: int, files: str) -> str:
    return hashlib.sha256(f"{CACHE_FORMAT}:{vqvae_digest}:{resolution}:{files}".encode()).hexdigest()[:24]


def cached_tokens(
    cache_dir: Path,
    root: Path,
    resolution: int,
    vqvae_digest: str,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    caption_column: str = "text",
    strict: bool = False,
    batch_size: int = 32,
    on_image: Callable[[int, int], None] | None = None,
) -> tuple[TokenSet, bool]:
    """The dataset's token grids, from the cache when the VQ-VAE, the resolution and the image files are the same
    (captions are read afresh every time), else encoded with `encode` ((B, 3, R, R) in [-1, 1] -> (B, h, w)) and
    written there. Returns the set and whether it came from the cache."""
    examples, _ = find_examples(root, True, caption_column)
    key = cache_key(vqvae_digest, resolution, files_digest(root, examples))
    path = cache_dir / f"tokens-{key}.pt"
    captions = {e.relative(root): e.caption for e in examples}
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            files: list[str] = list(saved["files"])
            tokens: torch.Tensor = saved["tokens"]
            skipped = [Skipped(root / p, r) for p, r in saved["skipped"]]
        except Exception:  # a damaged cache file is rebuilt
            path.unlink(missing_ok=True)
        else:
            if skipped and strict:
                raise UsageError(describe_skipped(skipped, root), hint="fix or remove them, or leave out --strict")
            return TokenSet(tokens.long(), [captions[f] for f in files], files, skipped), True
    images = load_images(root, resolution, caption_column=caption_column, strict=strict, on_image=on_image)
    grids = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            grids.append(encode(images.batch(range(start, min(start + batch_size, len(images))))).cpu())
    tokens = torch.cat(grids).flatten(1)
    files = [e.relative(root) for e in images.examples]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {
            "tokens": tokens,
            "files": files,
            "skipped": [(s.path.relative_to(root).as_posix(), s.reason) for s in images.skipped],
        },
        tmp,
    )
    os.replace(tmp, path)
    return TokenSet(tokens, images.captions, files, images.skipped), False
