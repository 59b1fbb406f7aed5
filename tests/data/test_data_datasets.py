"""The image-text formats, bad files at construction and at decode time, dropout, errors."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from genvl.data import (
    ImageTextDataset,
    InterleavedDataset,
    caption_dropped,
    collate_image_text,
    open_image_text,
)
from genvl.errors import DataError

S = 16  # image_size used throughout: small keeps the suite fast


def image_bytes(fmt: str = "PNG", size=(24, 20), seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
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


def truncated_jpeg() -> bytes:
    data = image_bytes("JPEG", (48, 48), seed=9)
    return data[: len(data) // 2]


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def assert_item(item, text=None):
    pv = item["pixel_values"]
    assert pv.shape == (3, S, S) and pv.dtype == torch.float32
    assert pv.min() >= -1 and pv.max() <= 1
    assert isinstance(item["text"], str) and isinstance(item["index"], int)
    if text is not None:
        assert item["text"] == text


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------
# the four formats


def test_metadata_jsonl_with_subfolders_and_extra_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(image_bytes("PNG", seed=1))
    (tmp_path / "sub" / "b.jpg").write_bytes(image_bytes("JPEG", (40, 30), seed=2))
    (tmp_path / "unlisted.png").write_bytes(image_bytes())
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [
            {"file_name": "a.png", "text": "a red thing", "source": "x"},
            "",
            {"file_name": "sub/b.jpg", "text": "  a blue thing\n", "score": 0.5},
            "{not json",
            {"file_name": "a.png"},
        ],
    )
    ds = open_image_text(tmp_path, image_size=S)
    assert ds.format == "metadata.jsonl" and ds.root == str(tmp_path)
    assert len(ds) == 2 and ds.captions == ["a red thing", "a blue thing"]
    assert_item(ds[0], "a red thing")
    assert_item(ds[1], "a blue thing")
    assert ds[-1]["index"] == 1
    reasons = sorted(r for _, r in ds.skipped)
    assert reasons == ["malformed JSON line", "missing text"]
    with pytest.raises(IndexError):
        ds[2]
    direct = open_image_text(tmp_path / "metadata.jsonl", image_size=S)  # the file itself works too
    assert direct.root == str(tmp_path) and direct.captions == ds.captions


def test_metadata_jsonl_caption_variants(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(image_bytes("PNG", seed=len(name)))
    write_jsonl(tmp_path / "metadata.jsonl", [
        {"file_name": "a.png", "text": ["red heart, full caption", "a red heart", " red heart "]},
        {"file_name": "b.png", "text": []},
        {"file_name": "c.png", "text": ["ok", 3]},
    ])
    ds = open_image_text(tmp_path, image_size=S, seed=5)
    assert len(ds) == 1 and ds.captions == ["red heart, full caption"]
    assert ds.all_captions == ["red heart, full caption", "a red heart", "red heart"]
    assert sorted(r for _, r in ds.skipped) == ["text is a list but not a non-empty list of strings"] * 2
    drawn = []
    for epoch in range(20):
        ds.set_epoch(epoch)
        drawn.append(ds[0]["text"])
    assert set(drawn) == set(ds.all_captions)  # every variant is used across epochs
    again = open_image_text(tmp_path, image_size=S, seed=5)
    again.set_epoch(7)
    ds.set_epoch(7)
    assert again[0]["text"] == ds[0]["text"]  # a pure function of (seed, epoch, index)


def test_metadata_csv(tmp_path):
    (tmp_path / "x.png").write_bytes(image_bytes("PNG", mode="L"))
    (tmp_path / "y.webp").write_bytes(image_bytes("WEBP", seed=4))
    (tmp_path / "metadata.csv").write_text(
        "\ufefffile_name,text,extra\nx.png,\"gray, square\",1\ny.webp,a webp,2\n", encoding="utf-8"
    )
    ds = open_image_text(tmp_path, image_size=S)
    assert ds.format == "metadata.csv"
    assert ds.captions == ["gray, square", "a webp"]
    for i in range(2):
        assert_item(ds[i])
    gray = ds[0]["pixel_values"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])

    (tmp_path / "metadata.csv").write_text("image,caption\nx.png,x\n")
    with pytest.raises(DataError, match="file_name"):
        open_image_text(tmp_path)


def test_txt_captions_recursive(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "one.png").write_bytes(image_bytes())
    (tmp_path / "one.txt").write_text("first caption\n")
    (tmp_path / "deep" / "er" / "two.JPG").write_bytes(image_bytes("JPEG", seed=5))
    (tmp_path / "deep" / "er" / "two.txt").write_text("second caption")
    (tmp_path / "deep" / "lonely.png").write_bytes(image_bytes())
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    ds = open_image_text(tmp_path, image_size=S)
    assert ds.format == "txt"
    assert sorted(ds.captions) == ["first caption", "second caption"]
    for i in range(len(ds)):
        assert_item(ds[i])
    assert ds.skipped == [(str(tmp_path / "deep" / "lonely.png"), "no caption")]


@pytest.fixture
def shards(tmp_path) -> Path:
    """Three shards: good pairs, a pair in a subfolder, an image without caption, a bad image."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        members = {
            f"{k}000.jpg": image_bytes("JPEG", seed=k),
            f"{k}000.txt": f"shard {k} first".encode(),
            f"part/{k}001.txt": f"shard {k} second".encode(),  # caption before its image
            f"part/{k}001.png": image_bytes("PNG", seed=10 + k),
        }
        if k == 1:
            members["nocap.png"] = image_bytes()
            members["broken.png"] = b"garbage"
            members["broken.txt"] = b"a broken one"
        make_tar(folder / f"shard-{k:03d}.tar", members)
    return folder


def test_tar_single_file_folder_and_brace_pattern(shards):
    one = open_image_text(shards / "shard-000.tar", image_size=S)
    assert one.format == "tar" and one.captions == ["shard 0 first", "shard 0 second"]
    assert_item(one[1], "shard 0 second")

    folder = open_image_text(shards, image_size=S)
    assert len(folder) == 6 and folder.shards == [str(shards / f"shard-{k:03d}.tar") for k in range(3)]
    assert sorted(r for _, r in folder.skipped) == ["no caption", "not an image (unrecognised format)"]

    pattern = open_image_text(str(shards / "shard-{000..002}.tar"), image_size=S)
    assert pattern.captions == folder.captions
    items = [pattern[i] for i in range(len(pattern))]
    for item, caption in zip(items, pattern.captions):
        assert_item(item, caption)
    assert items[0]["text"] == "shard 0 first" and items[5]["text"] == "shard 2 second"

    with pytest.raises(DataError, match=r"shard-003\.tar"):
        open_image_text(str(shards / "shard-{000..003}.tar"))


def test_tar_dataset_pickles_and_reads_in_workers(shards):
    ds = open_image_text(shards, image_size=S)
    first = ds[0]["pixel_values"]  # opens a shard handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0]["pixel_values"], first)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_image_text)
    seen = []
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, S, S)
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(len(ds)))
    ds.close()


def test_tar_dataset_in_spawned_workers(shards):
    """Spawned workers receive the dataset pickled (after the parent has opened shards)."""
    ds = open_image_text(shards, image_size=S)
    ds[3]
    loader = DataLoader(
        ds, batch_size=3, num_workers=1, multiprocessing_context="spawn", collate_fn=collate_image_text
    )
    texts = [t for batch in loader for t in batch["text"]]
    assert texts == ds.captions


def test_damaged_shards_keep_what_they_can_and_say_so(tmp_path):
    members = {}
    for i in range(3):
        members[f"{i}.png"] = image_bytes(seed=i)
        members[f"{i}.txt"] = f"cap {i}".encode()
    full = make_tar(tmp_path / "full.tar", members).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tf:
        offsets = {m.name: (m.offset, m.offset_data) for m in tf}

    cut = tmp_path / "cut.tar"  # ends in the middle of 1.png's data
    cut.write_bytes(full[: offsets["1.png"][1] + 100])
    ds = open_image_text(cut, image_size=S)
    assert ds.captions == ["cap 0"]
    assert_item(ds[0], "cap 0")
    assert any("truncated" in r for _, r in ds.skipped)

    broken = bytearray(full)  # a garbled header: tarfile would silently stop there
    start = offsets["1.png"][0]
    broken[start : start + 100] = b"x" * 100
    bad_header = tmp_path / "bad_header.tar"
    bad_header.write_bytes(bytes(broken))
    ds = open_image_text(bad_header, image_size=S)
    assert ds.captions == ["cap 0"]
    assert any("corrupt" in r for _, r in ds.skipped)


# ---------------------------------------------------------------------------------------------
# bad files


@pytest.fixture
def salted(tmp_path) -> tuple[Path, dict[str, str]]:
    """A metadata.jsonl folder with good images among every kind of bad one.

    Returns the folder and {file name: expected skip reason (substring)}.
    """
    root = tmp_path / "salted"
    root.mkdir()
    rows = []
    for i, fmt in enumerate(["PNG", "JPEG", "PNG", "JPEG"]):
        name = f"good{i}.{fmt.lower()}"
        (root / name).write_bytes(image_bytes(fmt, (20 + i, 18), seed=i))
        rows.append({"file_name": name, "text": f"good {i}"})
    good_png = image_bytes("PNG", (64, 64), seed=7)
    bad = {
        "corrupt.jpg": (os.urandom(300), "not an image"),
        "empty.png": (b"", "empty file"),
        "trunc.png": (good_png[: len(good_png) // 2], "corrupt"),
        "text.png": (b"hello, I am text\n", "not an image"),
        "bomb.png": (png_header(20_000, 20_000), "decompression bomb"),
        "bomb_local.png": (png_header(9_000, 8_000), "decompression bomb"),
    }
    expected = {}
    for name, (data, reason) in bad.items():
        (root / name).write_bytes(data)
        expected[name] = reason
    (root / "adir.png").mkdir()
    expected["adir.png"] = "is a directory"
    expected["missing.png"] = "file not found"
    if permissions_enforced():  # root reads anything; test_data_images simulates this case
        (root / "locked.png").write_bytes(good_png)
        (root / "locked.png").chmod(0)
        expected["locked.png"] = "permission denied"
    for name in expected:
        rows.append({"file_name": name, "text": f"bad {name}"})
    # A truncated JPEG passes verify(): it is kept, and fails only when decoded.
    (root / "trunc.jpg").write_bytes(truncated_jpeg())
    rows.insert(2, {"file_name": "trunc.jpg", "text": "truncated"})
    write_jsonl(root / "metadata.jsonl", rows)
    return root, expected


def test_salted_folder_skips_each_bad_file_with_a_reason(salted):
    root, expected = salted
    ds = open_image_text(root, image_size=S)
    assert len(ds) == 5  # four good images and the truncated JPEG
    skipped = {os.path.basename(p): reason for p, reason in ds.skipped}
    assert set(skipped) == set(expected)
    for name, reason in expected.items():
        assert reason in skipped[name], (name, skipped[name])
    assert all("\n" not in r for r in skipped.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_over_salted_folder_never_raises(salted, workers):
    root, _ = salted
    ds = open_image_text(root, image_size=S)
    loader = DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_image_text)
    count = 0
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, S, S)
        assert batch["pixel_values"].abs().max() <= 1
        assert "truncated" not in batch["text"]
        count += len(batch["text"])
    assert count == len(ds)


def test_truncated_jpeg_is_replaced_by_the_next_sample(tmp_path, caplog):
    for i in (0, 2):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(seed=i))
    (tmp_path / "1.jpg").write_bytes(truncated_jpeg())
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "0.png", "text": "zero"}, {"file_name": "1.jpg", "text": "one"},
         {"file_name": "2.png", "text": "two"}],
    )
    ds = open_image_text(tmp_path, image_size=S)
    assert len(ds) == 3 and ds.skipped == []
    with caplog.at_level(logging.WARNING, logger="genvl.data.datasets"):
        item = ds[1]
        again = ds[1]
    assert item["index"] == 2 and item["text"] == "two" and again["index"] == 2
    assert [os.path.basename(p) for p, _ in ds.failed] == ["1.jpg"]
    assert "cannot decode" in ds.failed[0][1]
    assert sum("1.jpg" in r.getMessage() for r in caplog.records) == 1  # warned once
    # The last index wraps around to the first.
    (tmp_path / "2.png").write_bytes(truncated_jpeg())
    assert ds[2]["index"] == 0


def test_validate_false_finds_bad_files_at_decode_time(salted):
    root, expected = salted
    ds = open_image_text(root, image_size=S, validate=False)
    assert len(ds) == 5 + len(expected) and ds.skipped == []  # nothing opened yet
    items = [ds[i] for i in range(len(ds))]
    assert all(it["text"].startswith("good") for it in items)
    assert len(ds.failed) == len(expected) + 1  # and the truncated JPEG


# ---------------------------------------------------------------------------------------------
# caption dropout


def test_caption_dropout_rate_and_determinism():
    p = 0.3
    first = [caption_dropped(p, 7, 0, i) for i in range(20_000)]
    assert abs(sum(first) / len(first) - p) < 0.015
    assert first == [caption_dropped(p, 7, 0, i) for i in range(20_000)]
    other_epoch = [caption_dropped(p, 7, 1, i) for i in range(20_000)]
    other_seed = [caption_dropped(p, 8, 0, i) for i in range(20_000)]
    assert first != other_epoch and first != other_seed
    assert not any(caption_dropped(0.0, 7, 0, i) for i in range(100))
    assert all(caption_dropped(1.0, 7, 0, i) for i in range(100))


def test_dataset_caption_dropout_follows_seed_and_epoch(tmp_path):
    for i in range(12):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(size=(8, 8), seed=i))
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    a = open_image_text(tmp_path, image_size=8, caption_dropout=0.5, seed=3)
    b = open_image_text(tmp_path, image_size=8, caption_dropout=0.5, seed=3)
    texts = [a.text(i) for i in range(len(a))]
    assert texts == [b[i]["text"] for i in range(len(b))]
    assert texts == ["" if caption_dropped(0.5, 3, 0, i) else a.captions[i] for i in range(len(a))]
    assert "" in texts and any(texts)
    a.set_epoch(1)
    assert [a.text(i) for i in range(len(a))] == [
        "" if caption_dropped(0.5, 3, 1, i) else a.captions[i] for i in range(len(a))
    ]
    assert a.captions == [f"caption {i}" for i in sorted(range(12), key=str)]  # dropout-free


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_and_empty_paths_are_data_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="dataset not found") as exc:
        open_image_text(missing)
    assert str(missing) in str(exc.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        open_image_text(empty)
    assert str(empty) in str(exc.value) and "expected" in str(exc.value)

    unknown = tmp_path / "data.zip"
    unknown.write_bytes(b"PK")
    with pytest.raises(DataError, match="expected"):
        open_image_text(unknown)


def test_folder_of_only_bad_files_says_how_many_were_skipped(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.png").write_bytes(image_bytes())  # no caption
    with pytest.raises(DataError, match="2 files skipped") as exc:
        open_image_text(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_collate(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(seed=i))
        (tmp_path / f"{i}.txt").write_text(f"c{i}")
    ds = open_image_text(tmp_path, image_size=S)
    batch = collate_image_text([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, S, S)
    assert batch["text"] == ["c0", "c1", "c2"]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2]
    assert isinstance(ds, ImageTextDataset)


# ---------------------------------------------------------------------------------------------
# interleaved documents


def test_interleaved_documents(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(seed=1))
    (tmp_path / "img" / "b.jpg").write_bytes(image_bytes("JPEG", seed=2))
    absolute = tmp_path / "abs.png"
    absolute.write_bytes(image_bytes(seed=3))
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    docs = tmp_path / "docs.jsonl"
    write_jsonl(
        docs,
        [
            [{"text": "look at this"}, {"image": "img/a.png"}, {"text": "and this"}, {"image": str(absolute)}],
            "not json at all",
            [{"image": "img/b.jpg"}],
            [{"text": "bad"}, {"image": "img/bad.png"}],
            [{"text": "x", "image": "img/a.png"}],
            [],
            [{"text": "only text"}],
            [{"text": "missing"}, {"image": "img/nowhere.png"}],
        ],
    )
    ds = InterleavedDataset(docs, image_size=S)
    assert len(ds) == 3 and ds.num_images == 3
    doc = ds[0]
    assert [next(iter(seg)) for seg in doc] == ["text", "image", "text", "image"]
    assert doc[0] == {"text": "look at this"}
    assert doc[1]["image"].shape == (3, S, S) and doc[1]["image"].abs().max() <= 1
    assert ds[2] == [{"text": "only text"}]
    assert len(ds.skipped) == 5
    reasons = " | ".join(r for _, r in ds.skipped)
    assert "malformed JSON" in reasons and "file not found" in reasons and "not an image" in reasons
    loader = DataLoader(ds, batch_size=None, num_workers=0)
    assert len(list(loader)) == 3


def test_interleaved_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        InterleavedDataset(tmp_path / "none.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError) as exc:
        InterleavedDataset(empty)
    assert str(empty) in str(exc.value)
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{]\n")
    with pytest.raises(DataError, match="1 files skipped"):
        InterleavedDataset(junk)
