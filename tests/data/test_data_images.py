"""Image loading, conversion to RGB, the bad-file guards, and the tensor transforms."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from genvl.data import images as images_module
from genvl.data import (
    MAX_IMAGE_PIXELS,
    BadImageError,
    load_rgb,
    resize_center_crop,
    to_pil,
    to_tensor,
    verify_image,
)
from genvl.errors import DataError


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def permissions_enforced() -> bool:
    """Whether a mode-000 file is unreadable here (not for root, unless its capabilities are dropped)."""
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        os.chmod(f.name, 0)
        try:
            open(f.name, "rb").close()
        except PermissionError:
            return True
        return False


def noise(w: int = 32, h: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# conversion to RGB


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    img.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    out = load_rgb(encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 255)
    assert all(120 <= c <= 135 for c in out.getpixel((2, 0)))


def test_la_and_palette_transparency_become_white(tmp_path):
    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((1, 1), (0, 255))
    out = load_rgb(encode(la, "PNG"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 0)

    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.putpixel((2, 2), 1)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)  # palette index 0 (red) is transparent
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (0, 255, 0)

    gif = tmp_path / "pal.gif"
    pal.save(gif, transparency=0)
    assert load_rgb(gif).getpixel((0, 0)) == (255, 255, 255)


def test_palette_without_transparency_keeps_colours():
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    assert load_rgb(encode(pal, "PNG")).getpixel((0, 0)) == (10, 20, 30)


def test_grayscale_modes_become_rgb():
    gray = Image.new("L", (2, 2), 77)
    assert load_rgb(encode(gray, "PNG")).getpixel((0, 0)) == (77, 77, 77)

    sixteen = Image.fromarray(np.array([[0, 32896], [65535, 257]], dtype=np.uint16))
    out = load_rgb(encode(sixteen, "PNG"))
    assert out.mode == "RGB"
    assert [out.getpixel(p) for p in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [
        (0, 0, 0), (128, 128, 128), (255, 255, 255), (1, 1, 1)
    ]

    bilevel = Image.new("1", (2, 2), 0)
    bilevel.putpixel((1, 1), 1)
    out = load_rgb(encode(bilevel, "PNG"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 255, 255)


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_rgb(encode(cmyk, "JPEG", quality=95))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = load_rgb(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 20)


def test_draft_keeps_both_sides_at_least_the_requested_size():
    data = encode(noise(256, 200), "JPEG")
    out = load_rgb(data, draft_size=48)
    assert min(out.size) >= 48 and out.size[0] < 256


# ---------------------------------------------------------------------------------------------
# bad files


def test_bad_sources_raise_bad_image_error_with_reason(tmp_path):
    good = encode(noise(), "PNG")
    jpeg = encode(noise(64, 64), "JPEG")
    cases = {
        "empty.png": (b"", "empty file"),
        "text.png": (b"this is not an image\n", "not an image"),
        "trunc.png": (good[: len(good) // 2], "corrupt"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadImageError) as exc:
            verify_image(path)
        assert reason in exc.value.reason, name
        assert isinstance(exc.value, DataError)
        with pytest.raises(BadImageError):
            load_rgb(path)
    with pytest.raises(BadImageError, match="file not found"):
        verify_image(tmp_path / "missing.png")
    with pytest.raises(BadImageError, match="is a directory"):
        verify_image(tmp_path)

    # A truncated JPEG passes verify() (which does not decode) but not the full decode.
    trunc_jpeg = jpeg[: len(jpeg) // 2]
    assert verify_image(trunc_jpeg) == (64, 64)
    with pytest.raises(BadImageError, match="cannot decode"):
        load_rgb(trunc_jpeg)


@pytest.mark.parametrize(
    "size",
    [
        (100_000, 100_000),  # PIL's own DecompressionBombError
        (10_000, 10_000),  # PIL's DecompressionBombWarning, turned into an error
        (9_000, 8_000),  # under PIL's default limit, over ours
    ],
)
def test_decompression_bombs_are_rejected_before_decoding(size):
    data = png_header(*size)
    assert size[0] * size[1] > MAX_IMAGE_PIXELS and len(data) < 100
    before = Image.MAX_IMAGE_PIXELS
    for fn in (verify_image, load_rgb):
        with pytest.raises(BadImageError, match="decompression bomb"):
            fn(data)
    assert Image.MAX_IMAGE_PIXELS == before  # nothing global is patched


@pytest.mark.skipif(not permissions_enforced(), reason="running as root: file modes are not enforced")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(encode(noise(), "PNG"))
    path.chmod(0)
    try:
        with pytest.raises(BadImageError, match="permission denied"):
            verify_image(path)
    finally:
        path.chmod(0o644)


def test_permission_error_is_a_bad_image(monkeypatch, tmp_path):
    """The same path as above, simulated so that it also runs as root."""
    path = tmp_path / "locked.png"
    path.write_bytes(encode(noise(), "PNG"))

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images_module, "open", deny, raising=False)
    with pytest.raises(BadImageError, match="permission denied"):
        load_rgb(path)


# ---------------------------------------------------------------------------------------------
# transforms


def test_resize_center_crop_keeps_the_centre():
    img = Image.new("RGB", (90, 30), "red")
    img.paste((0, 255, 0), (30, 0, 60, 30))  # green middle third
    out = resize_center_crop(img, 10)
    assert out.size == (10, 10)
    assert out.getpixel((5, 5)) == (0, 255, 0)
    tall = resize_center_crop(Image.new("RGB", (7, 50)), 16)
    assert tall.size == (16, 16)


def test_tensor_range_and_round_trip():
    img = noise(12, 9, seed=3)
    t = to_tensor(img)
    assert t.shape == (3, 9, 12) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert to_tensor(Image.new("RGB", (2, 2), "white")).eq(1).all()
    assert to_tensor(Image.new("RGB", (2, 2), "black")).eq(-1).all()
    back = to_pil(t)
    assert back.mode == "RGB" and back.size == (12, 9)
    assert np.array_equal(np.array(back), np.array(img))
    assert np.array(to_pil(torch.full((3, 2, 2), 5.0))).min() == 255  # clamped
    with pytest.raises(ValueError):
        to_pil(torch.zeros(1, 3, 4, 4))
