"""Writing generated images: PNGs that carry their generation settings, grids, animations, safe file names."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from genvl.errors import GenvlError


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> list of RGB PIL images."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(im.permute(1, 2, 0).numpy(), "RGB") for im in x]


def make_grid(images: list[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (all the same size) into one image, ``ncols`` per row, white padding."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    ncols = ncols or min(len(images), 8)
    nrows = (len(images) + ncols - 1) // ncols
    grid = Image.new("RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def png_info(metadata: dict[str, Any]) -> PngInfo:
    """Text chunks: one per key, plus ``genvl`` holding all of them as JSON."""
    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    info.add_text("genvl", json.dumps(metadata, sort_keys=True))
    return info


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    return json.loads(text["genvl"]) if "genvl" in text else text


def reserve_path(directory: Path, stem: str, suffix: str = ".png") -> Path:
    """Create and return a new file ``directory/stem[-N].suffix`` that no other process holds.

    The file is created with O_EXCL, so concurrent ``genvl sample`` runs writing into one folder
    never pick the same name.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(100_000):
        path = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise RuntimeError(f"no free file name for {stem} in {directory}")


def output_path(path: str | Path, overwrite: bool = False) -> Path:
    """The file to write for an output the user named (``--out a.png``): ``path`` itself when no file
    has that name, else the first free ``stem-N.suffix`` beside it, reserved like :func:`reserve_path`
    (so two runs naming the same file both keep theirs). ``overwrite``: ``path`` as it is, replaced."""
    path = Path(path)
    if overwrite:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    return reserve_path(path.parent, path.stem, path.suffix)


def temp_beside(path: str | Path) -> Path:
    """A new, empty temporary file in ``path``'s folder (hidden, unique per process *and* thread), to
    be renamed onto ``path`` once complete."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:  # the umask applies (mkstemp's files would be private)
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp


def save_png(image: Image.Image, path: Path, metadata: dict[str, Any]) -> Path:
    """Write ``image`` with its metadata, via a temporary file renamed into place."""
    tmp = temp_beside(path)
    try:
        image.save(tmp, format="PNG", pnginfo=png_info(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_new_file(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` whole (a temporary file, then a link or rename), never replacing a
    file already there unless ``overwrite``.

    Raises:
        FileExistsError: ``path`` exists (checked atomically: a file another process wrote meanwhile
            is kept).
    """
    path = Path(path)
    tmp = temp_beside(path)
    try:
        tmp.write_bytes(data)
        if overwrite:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)  # fails if path exists: an atomic "rename unless taken"
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: create exclusively, then write
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe stem from a prompt."""
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text.strip())
    keep = "-".join(p for p in keep.split("-") if p)
    return (keep[:max_len].rstrip("-") or "sample")


# ------------------------------------------------------------------------------ frame sequences
def _frames_to_pil(frames) -> list[Image.Image]:
    """Frames as RGB PIL images: (F, 3, H, W) in [-1, 1], a list of PIL images, or an output with ``images``."""
    from genvl.sampling.common import check_pixels

    frames = getattr(frames, "images", frames)  # an UnclipOutput / PipelineOutput
    if isinstance(frames, torch.Tensor):
        return to_pil_images(check_pixels(frames, "frames"))
    frames = list(frames)
    if not frames:
        raise GenvlError("no frames to write")
    return [f.convert("RGB") for f in frames]


def save_gif(frames, path: str | Path, duration_ms: int = 120, loop: int = 0) -> Path:
    """Write frames ((F, 3, H, W) in [-1, 1], a list of PIL images or an UnclipOutput) as an animated GIF.

    Args:
        frames: the frames.
        path: the .gif file.
        duration_ms: display time per frame.
        loop: 0 = forever.
    """
    ims = _frames_to_pil(frames)
    if not isinstance(duration_ms, int) or duration_ms <= 0:
        raise GenvlError(f"duration_ms must be a positive integer, got {duration_ms!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)  # whole or not at all, like save_png
    try:
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=duration_ms, loop=loop,
                    optimize=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_strip(frames, path: str | Path, pad: int = 2) -> Path:
    """Write frames side by side as one PNG (a filmstrip)."""
    ims = _frames_to_pil(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(ims, ncols=len(ims), pad=pad).save(path, format="PNG")
    return path
