"""Reading images safely and turning them into tensors.

Every dataset in :mod:`genvl.data` goes through :func:`load_rgb` (full decode) or
:func:`verify_image` (cheap header + integrity check). Both turn every way an image file can be
broken -- missing, unreadable, empty, truncated, not an image, or a decompression bomb -- into a
:class:`BadImageError` with a short reason, so callers only ever catch one exception type.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from genvl.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "ImageSource",
    "load_rgb",
    "verify_image",
    "resize_center_crop",
    "to_tensor",
    "to_pil",
]

#: File extensions (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

#: Images with more pixels than this are rejected before decoding (decompression-bomb guard).
#: Checked locally against the header's width*height, so PIL's global limit is never patched.
MAX_IMAGE_PIXELS = 64_000_000

#: A path to an image file, or the encoded bytes of one (e.g. a tar member).
ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class BadImageError(DataError):
    """An image that cannot be used; ``reason`` says why in a few words.

    Args:
        reason: Short, one-line description ("empty file", "truncated: ...", ...).
        path: The offending file, when known; it is prefixed to the message.
    """

    def __init__(self, reason: str, path: str | None = None):
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


def _open_source(src: ImageSource) -> BinaryIO:
    """Open ``src`` as a binary stream, mapping OS errors to :class:`BadImageError`."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise BadImageError("empty file")
        return io.BytesIO(src)
    path = os.fspath(src)
    try:
        if "\0" in path:
            raise BadImageError("not a path (holds a NUL byte)")
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise BadImageError("is a directory")
        if not stat.S_ISREG(mode):  # a FIFO would block open() forever, a device never end
            raise BadImageError("not a regular file")
        fp = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except PermissionError:
        raise BadImageError("permission denied") from None
    except IsADirectoryError:
        raise BadImageError("is a directory") from None
    except OSError as e:
        raise BadImageError(f"cannot open: {e.strerror or e}") from None
    try:
        empty = os.fstat(fp.fileno()).st_size == 0
    except OSError:
        empty = False
    if empty:
        fp.close()
        raise BadImageError("empty file")
    return fp


@contextmanager
def _open_image(src: ImageSource) -> Iterator[Image.Image]:
    """Open an image lazily (header only) and reject decompression bombs.

    PIL's ``DecompressionBombWarning`` is raised as an error for the duration of the block, and the
    header's ``width * height`` is compared with :data:`MAX_IMAGE_PIXELS` before any pixel data
    is decoded.
    """
    fp = _open_source(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(fp)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise BadImageError(f"decompression bomb: {e}") from None
            except UnidentifiedImageError:
                raise BadImageError("not an image (unrecognised format)") from None
            except Exception as e:  # noqa: BLE001 - PIL raises many types on malformed headers
                raise BadImageError(f"unreadable header: {_describe(e)}") from None
            width, height = img.size
            if width <= 0 or height <= 0:
                raise BadImageError(f"invalid size {width}x{height}")
            if width * height > MAX_IMAGE_PIXELS:
                raise BadImageError(
                    f"decompression bomb: {width}x{height} pixels exceeds the limit of "
                    f"{MAX_IMAGE_PIXELS:,}"
                )
            yield img
    finally:
        fp.close()


def _describe(e: BaseException) -> str:
    """One line naming an exception, for skip reasons."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def verify_image(src: ImageSource) -> tuple[int, int]:
    """Check an image without decoding its pixels, as datasets do at construction.

    Opens the header, applies the size / decompression-bomb check and runs PIL's ``verify()``
    (which checks chunk CRCs for PNG but does not decode, so a truncated JPEG can pass).

    Args:
        src: Path to an image file, or its encoded bytes.

    Returns:
        ``(width, height)`` as stored in the header.

    Raises:
        BadImageError: If the file is missing, unreadable, empty, not an image, corrupt, or too
            large.
    """
    with _open_image(src) as img:
        size = img.size
        try:
            img.verify()
        except BadImageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BadImageError(f"corrupt: {_describe(e)}") from None
    return size


def load_rgb(src: ImageSource, *, draft_size: int | None = None) -> Image.Image:
    """Decode an image fully and return it in RGB.

    Transparent images (RGBA, LA, palette or RGB/L with a transparency key) are composited on
    white; grayscale (``L``, ``I;16``, ``I``, ``1``) and CMYK become RGB. The EXIF orientation
    (phone photos) is applied.

    Args:
        src: Path to an image file, or its encoded bytes.
        draft_size: If given, let JPEG decoding shrink the image by a power of two while keeping
            both sides at least this many pixels (much faster for large photos that are resized
            afterwards anyway). Other formats ignore it.

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``"RGB"``, independent of the source file.

    Raises:
        BadImageError: For every kind of unusable file (see :func:`verify_image`) and for data that
            fails to decode (e.g. a truncated JPEG).
    """
    with _open_image(src) as img:
        try:
            if draft_size is not None and img.format == "JPEG":
                img.draft(img.mode, (draft_size, draft_size))
            img.load()
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
        except BadImageError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data surfaces as many types
            raise BadImageError(f"cannot decode: {_describe(e)}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        # PIL's own I;16 -> L conversion clips at 255 instead of scaling, which turns most
        # 16-bit images white; scale to 8 bits by hand instead.
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif mode in _SIXTEEN_BIT_MODES or (arr.size and arr.max() > 255):
            arr = np.clip(arr, 0, 65535) / 257.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    # convert() always returns a copy, so the result never refers to the (closed) source file.
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and crop the centre square.

    Args:
        img: Any PIL image.
        size: Side of the square output, in pixels.

    Returns:
        A ``size`` x ``size`` image in the same mode as ``img``.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = img.size
    scale = size / min(width, height)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        # PIL's resize filters scale their support with the reduction factor, i.e. they antialias.
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    if (left, top, new_w, new_h) == (0, 0, size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Turn a PIL image into a float tensor of shape (3, H, W) with values in [-1, 1].

    Args:
        img: A PIL image; converted to RGB first if needed (no compositing, use
            :func:`load_rgb` for files).

    Returns:
        ``torch.float32`` tensor, channels first.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8)  # a writable copy; torch warns on read-only arrays
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous().float()
    return t.div_(127.5).sub_(1.0)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor`: a (3, H, W) tensor in [-1, 1] to an RGB PIL image.

    Args:
        tensor: Float tensor of shape (3, H, W); values outside [-1, 1] are clamped.

    Returns:
        An RGB PIL image of size (W, H).
    """
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a tensor of shape (3, H, W), got {tuple(tensor.shape)}")
    t = tensor.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    arr = ((t + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
