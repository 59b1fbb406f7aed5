"""Hostile datasets: megabyte captions, bytes that are not UTF-8, metadata lines that are too long,
``file_name`` values that lead out of the dataset folder, FIFOs and devices in place of files. Each
bad entry is skipped and counted with its reason, within seconds; the rest of the set is used.
Ends with a property-based run (hypothesis) over generated hostile folders."""

import csv
import io
import json
import os
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genvl.data import open_image_text
from genvl.data.check import check_dataset, format_report
from genvl.data.datasets import parse_interleaved
from genvl.errors import DataError
from genvl.limits import MAX_CAPTION_CHARS, MAX_LINE_BYTES
from genvl.tokenizers.text import train_text_tokenizer
from rel_helpers import spawn, wait

HUGE = {"a.txt": "a" * 2**20, "word.txt": "word " * 200_000}  # the two captions of the report, 1 MB each


@contextmanager
def within(seconds: float):
    """Fail when the block takes longer than ``seconds`` (wall clock)."""
    t = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t
    assert elapsed < seconds, f"took {elapsed:.1f} s, more than {seconds} s"


def png(path: Path, color=(200, 30, 30)) -> Path:
    Image.new("RGB", (8, 8), color).save(path)
    return path


def txt_folder(root: Path, n: int = 16) -> Path:
    """``n`` images with same-named .txt captions."""
    root.mkdir(parents=True)
    for i in range(n):
        png(root / f"{i:02d}.png", (10 * i, 200 - 10 * i, 90))
        (root / f"{i:02d}.txt").write_text(f"a shape number {i}")
    return root


def with_huge_captions(root: Path) -> Path:
    for name, text in HUGE.items():
        png(root / name.replace(".txt", ".png"))
        (root / name).write_text(text)
    return root


# ------------------------------------------------------------------------------- huge captions
def test_tokenizer_training_time_is_linear_in_a_megabyte_caption():
    normal = ["a red circle", "a blue square", "a green cross"] * 10
    for text in HUGE.values():
        with within(10):  # was about 60 s for a quarter of "a" * 2**20, quadratic in the word's length
            tok = train_text_tokenizer([*normal, text], vocab_size=1024, model_max_length=32)
        assert tok("a red circle")["input_ids"][0] == tok.bos_token_id


def test_data_check_flags_megabyte_captions(tmp_path):
    root = with_huge_captions(txt_folder(tmp_path / "d"))
    with within(10):
        report = check_dataset(root, progress=False, num_workers=1)
    assert report.num_pairs == 16
    bad = dict(report.bad)
    assert bad == {str(root / "a.png"): f"caption is 1,048,576 characters, longer than the limit of "
                                        f"{MAX_CAPTION_CHARS:,}",
                   str(root / "word.png"): f"caption is 999,999 characters, longer than the limit of "
                                           f"{MAX_CAPTION_CHARS:,}"}
    assert report.caption_chars.max < 30 and "bad            2" in format_report(report)


def test_training_on_a_folder_with_megabyte_captions_finishes(tmp_path):
    """The report's command: genvl train clip --config tiny --set max_steps=4, in a real process."""
    root = with_huge_captions(txt_folder(tmp_path / "d", n=32))
    go, log = tmp_path / "go", tmp_path / "train.log"
    go.touch()
    argv = ["train", "clip", "--data", str(root), "--out", str(tmp_path / "run"), "--config",
            "tiny", "--set", "max_steps=4", "--no-progress"]
    t = time.perf_counter()
    code = wait(spawn("sample", log, argv=argv, go=str(go)), timeout=120)  # minutes before the fix
    assert code == 0, (tmp_path / "train.log.err").read_text()[-2000:]
    assert time.perf_counter() - t < 60
    out = log.read_text()
    assert "32 image-text pairs" in out and "skipped 2 bad file(s)" in out
    assert "caption is 1,048,576 characters" in out and "caption is 999,999 characters" in out
    assert "trained clip for 4 steps" in out


def test_caption_files_that_are_too_large_or_not_files(tmp_path):
    root = txt_folder(tmp_path / "d", n=2)
    png(root / "big.png")
    with open(root / "big.txt", "wb") as f:  # sparse: 3 GB that is never read
        f.truncate(3 * 2**30)
    png(root / "fifo.png")
    os.mkfifo(root / "fifo.txt")  # opening it would block for ever
    png(root / "dev.png")
    os.symlink("/dev/zero", root / "dev.txt")  # reading it would never end
    with within(5):
        ds = open_image_text(root)
    assert len(ds) == 2
    assert dict(ds.skipped) == {
        str(root / "big.png"): f"caption file is {3 * 2**30:,} bytes, more than the limit of {MAX_LINE_BYTES:,}",
        str(root / "fifo.png"): "caption is not a regular file",
        str(root / "dev.png"): "caption is not a regular file",
    }


# --------------------------------------------------------------------------------- metadata files
def test_metadata_jsonl_bad_lines_are_skipped_one_by_one(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for n in ("a", "b", "c"):
        png(root / f"{n}.png")
    png(tmp_path / "outside.png")  # a real image, outside the dataset folder
    os.mkfifo(root / "fifo.png")
    rows = [
        json.dumps({"file_name": "a.png", "text": "a red square"}).encode(),
        b'{"file_name": "b.png", "text": "caf\xe9 cr\xe8me"}',  # Latin-1: not UTF-8
        json.dumps({"file_name": "../outside.png", "text": "up and out"}).encode(),
        json.dumps({"file_name": str(tmp_path / "outside.png"), "text": "absolute"}).encode(),
        json.dumps({"file_name": "/etc/passwd", "text": "absolute"}).encode(),
        json.dumps({"file_name": "sub/../../outside.png", "text": "sneaky"}).encode(),
        json.dumps({"file_name": "a.png\u0000", "text": "nul"}).encode(),
        json.dumps({"file_name": "c.png", "text": "x" * (MAX_CAPTION_CHARS + 1)}).encode(),
        json.dumps({"file_name": "c.png", "text": ["ok", "y" * (MAX_CAPTION_CHARS + 1)]}).encode(),
        json.dumps({"file_name": "c.png", "text": "a" * 2**20}).encode(),  # a line over the limit
        b"[" * 100_000,  # nesting deep enough to overflow a recursive parser
        json.dumps({"file_name": "fifo.png", "text": "a pipe"}).encode(),
        json.dumps({"file_name": "c.png", "text": "a blue square"}).encode(),
        b"\xff\xfe\x00garbage",
    ]
    (root / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    meta = str(root / "metadata.jsonl")
    with within(5):
        ds = open_image_text(root)
    assert ds.captions == ["a red square", "a blue square"]
    assert ds.skipped == [
        (f"{meta}:2", "line is not UTF-8 (byte 36)"),
        (f"{meta}:3", "file_name '../outside.png' is not a path inside the dataset folder"),
        (f"{meta}:4", f"file_name {str(tmp_path / 'outside.png')!r} is not a path inside the dataset folder"),
        (f"{meta}:5", "file_name '/etc/passwd' is not a path inside the dataset folder"),
        (f"{meta}:6", "file_name 'sub/../../outside.png' is not a path inside the dataset folder"),
        (f"{meta}:7", "file_name 'a.png\\x00' is not a path inside the dataset folder"),
        (str(root / "c.png"), f"caption is {MAX_CAPTION_CHARS + 1:,} characters, longer than the limit of "
                              f"{MAX_CAPTION_CHARS:,}"),
        (str(root / "c.png"), f"caption is {MAX_CAPTION_CHARS + 1:,} characters, longer than the limit of "
                              f"{MAX_CAPTION_CHARS:,}"),
        (f"{meta}:10", f"line longer than {MAX_LINE_BYTES:,} bytes"),
        (f"{meta}:11", "malformed JSON line"),
        (f"{meta}:14", "line is not UTF-8 (byte 1)"),
        (str(root / "fifo.png"), "not a regular file"),  # found by the image check, after the listing
    ]
    report = check_dataset(root, progress=False, num_workers=1)  # the same through genvl data check
    assert report.num_pairs == 2 and len(report.bad) == 12
    assert (str(root / "fifo.png"), "not a regular file") in report.bad


def test_metadata_csv_bad_rows_are_skipped_one_by_one(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for n in ("a", "b", "c"):
        png(root / f"{n}.png")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file_name", "text"])
    w.writerow(["a.png", "a red square"])
    w.writerow(["b.png", "PLACEHOLDER"])
    w.writerow(["../b.png", "out"])
    w.writerow(["c.png", "z" * 200_000])  # over the csv module's own field limit (131072)
    w.writerow(["c.png", "a caption\nover two lines"])
    data = buf.getvalue().encode().replace(b"PLACEHOLDER", b"caf\xe9")
    data += b"c.png," + b"q" * (MAX_LINE_BYTES + 10) + b"\n" + b"c.png,last one\n"
    (root / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + data)  # with a byte-order mark
    meta = str(root / "metadata.csv")
    with within(5):
        ds = open_image_text(root)
    assert ds.captions == ["a red square", "a caption\nover two lines", "last one"]
    assert ds.skipped == [
        (f"{meta}:3", "row is not UTF-8"),
        (f"{meta}:4", "file_name '../b.png' is not a path inside the dataset folder"),
        (f"{meta}:5", "malformed CSV row (field larger than field limit (131072))"),
        (f"{meta}:8", f"line longer than {MAX_LINE_BYTES:,} bytes"),
    ]


def test_tar_shard_with_a_megabyte_caption(tmp_path):
    shard, image = tmp_path / "s.tar", png(tmp_path / "x.png").read_bytes()
    members = [("0.png", image), ("0.txt", b"a red square"), ("1.png", image), ("1.txt", b"a" * 2**20),
               ("2.png", image), ("2.txt", b"b" * (MAX_LINE_BYTES + 1))]
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with within(5):
        ds = open_image_text(shard)
    assert ds.captions == ["a red square"]
    assert [r for _, r in ds.skipped] == [
        f"caption is {2**20:,} characters, longer than the limit of {MAX_CAPTION_CHARS:,}",
        f"caption is {MAX_LINE_BYTES + 1:,} bytes, more than the limit of {MAX_LINE_BYTES:,}",  # not read
    ]


def test_interleaved_documents_bad_lines_are_skipped(tmp_path):
    png(tmp_path / "a.png")
    lines = [json.dumps([{"text": "a red square"}, {"image": "a.png"}]).encode(),
             b'[{"text": "caf\xe9"}]',
             json.dumps([{"text": "w" * (MAX_CAPTION_CHARS + 1)}]).encode(),
             json.dumps([{"image": "a.png\u0000"}]).encode(),
             json.dumps([{"text": "the end"}]).encode()]
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with within(5):
        docs, line_numbers, skipped = parse_interleaved(path)
    assert line_numbers == [1, 5]
    assert [(w.rsplit(":", 1)[1], r) for w, r in skipped] == [
        ("2", "line is not UTF-8 (byte 15)"),
        ("3", f"caption is {MAX_CAPTION_CHARS + 1:,} characters, longer than the limit of {MAX_CAPTION_CHARS:,}"),
        ("4", "'image' is not a path"),
    ]


# -------------------------------------------------------------------- generated hostile folders
KINDS = ["good", "huge_caption", "empty_caption", "binary_caption", "binary_image", "empty_image", "escape",
         "absolute", "missing_image", "long_line", "bad_json"]
FOLDERS = st.tuples(st.sampled_from(["metadata.jsonl", "metadata.csv", "txt"]),
                    st.lists(st.sampled_from(KINDS), min_size=1, max_size=8))


BAD_EVERYWHERE = {"huge_caption", "binary_caption", "binary_image", "empty_image", "missing_image", "long_line"}


def build(root: Path, fmt: str, kinds: list[str]) -> tuple[int, int]:
    """A folder of ``fmt`` with one entry per kind; returns (usable pairs, entries a check can see).

    In the txt format there is no ``file_name`` and no line to break, so "escape", "absolute" and
    "bad_json" entries are ordinary pairs there, and a caption without its image is not an entry.
    """
    root.mkdir(parents=True)
    png(root.parent / "outside.png")
    rows: list[bytes] = []
    for i, kind in enumerate(kinds):
        name = f"{i:02d}.png"
        caption = f"entry {i}".encode()
        if kind == "binary_image":
            (root / name).write_bytes(os.urandom(64))
        elif kind == "empty_image":
            (root / name).write_bytes(b"")
        elif kind != "missing_image":
            png(root / name)
        if kind == "huge_caption":
            caption = b"h" * (MAX_CAPTION_CHARS + 1)
        elif kind == "empty_caption":
            caption = b""
        elif kind == "binary_caption":
            caption = b"\xff\xfe" + bytes(b for b in os.urandom(16) if b not in b'\n\r",')
        elif kind == "long_line":
            caption = b"l" * (MAX_LINE_BYTES + 1)
        file_name = {"escape": "../outside.png", "absolute": str(root.parent / "outside.png")}.get(kind, name)
        if fmt == "txt":
            (root / name).with_suffix(".txt").write_bytes(caption)
        elif fmt == "metadata.jsonl":
            line = json.dumps({"file_name": file_name, "text": caption.decode("utf-8", "surrogateescape")},
                              ensure_ascii=False).encode("utf-8", "surrogateescape")
            rows.append(b"{oops" if kind == "bad_json" else line)
        else:
            rows.append(b"lonely" if kind == "bad_json" else file_name.encode() + b',"' + caption + b'"')
    if fmt == "metadata.jsonl":
        (root / fmt).write_bytes(b"\n".join(rows) + b"\n")
    elif fmt == "metadata.csv":
        (root / fmt).write_bytes(b"file_name,text\n" + b"\n".join(rows) + b"\n")
    bad = BAD_EVERYWHERE if fmt == "txt" else BAD_EVERYWHERE | {"escape", "absolute", "bad_json"}
    seen = [k for k in kinds if not (fmt == "txt" and k == "missing_image")]
    return sum(k not in bad for k in kinds), len(seen)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(folder=FOLDERS)
def test_generated_hostile_folders(tmp_path_factory, folder):
    fmt, kinds = folder
    root = tmp_path_factory.mktemp("hostile") / "d"
    expected, entries = build(root, fmt, kinds)
    with within(5):
        try:
            report = check_dataset(root, progress=False, num_workers=1)
        except DataError as e:  # only when nothing at all could be listed
            assert expected == 0, e
            assert "\n" not in str(e)
            return
    assert report.num_pairs == expected, (kinds, report.bad)
    assert report.num_pairs + len(report.bad) == entries, (kinds, report.bad)  # each entry a pair or one reason
    assert all("\n" not in reason for _, reason in report.bad)
    if expected:
        with within(5):
            ds = open_image_text(root, image_size=8)
        assert len(ds) == expected
        assert all(len(c) <= MAX_CAPTION_CHARS for c in ds.captions)


def test_tiny_training_on_a_generated_hostile_folder(tmp_path):
    from genvl.config import apply_overrides
    from genvl.training import TrainConfig, train
    from genvl.training.tasks.clip import CLIPTask

    root = tmp_path / "d"
    kinds = ["good"] * 8 + KINDS[1:]
    good, _ = build(root, "metadata.jsonl", kinds)
    cfg = apply_overrides(TrainConfig(), ["batch_size=4", "max_steps=2", "save_every=0", "tokenizer_vocab=300",
                                          "text_len=8", "tracker=none", "model.size=tiny", "data.image_size=16",
                                          "warmup_steps=1"])
    with within(30):
        res = train(CLIPTask(cfg), str(root), tmp_path / "run", progress=False)
    assert res.step == 2 and res.skipped_files == len(kinds) - good
