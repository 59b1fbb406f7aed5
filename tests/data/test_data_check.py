"""``check_dataset`` / ``format_report`` on small folders with known contents."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from genvl.data import Spread, check_dataset, format_report
from genvl.errors import DataError


def save(path: Path, size: tuple[int, int], fmt: str = "PNG", noisy: bool = False) -> bytes:
    """Write an image; ``noisy`` gives JPEGs big enough that cutting one in half keeps the header."""
    img = Image.effect_noise(size, 60).convert("RGB") if noisy else Image.new("RGB", size, (200, 100, 50))
    buf = io.BytesIO()
    img.save(buf, fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def known(tmp_path) -> Path:
    """Three good pairs (30x20, 64x48, 50x50), one truncated JPEG, one image without caption."""
    root = tmp_path / "known"
    root.mkdir()
    for name, size, caption in [
        ("a.png", (30, 20), "a cat"),
        ("b.png", (64, 48), ""),
        ("c.jpg", (50, 50), "three word caption"),
    ]:
        save(root / name, size, "JPEG" if name.endswith("jpg") else "PNG")
        (root / name).with_suffix(".txt").write_text(caption)
    data = save(root / "d.jpg", (80, 80), "JPEG", noisy=True)
    (root / "d.jpg").write_bytes(data[: len(data) // 2])  # passes verify(), fails decoding
    (root / "d.txt").write_text("never counted")
    save(root / "e.png", (10, 10))
    return root


def test_check_folder_numbers(known):
    report = check_dataset(known, progress=False)
    assert report.format == "txt"
    assert report.num_pairs == 3 and report.num_images == 3
    assert report.width == Spread(30, 50, 64)
    assert report.height == Spread(20, 48, 50)
    assert report.caption_chars == Spread(0, 5, 18)
    assert report.caption_words == Spread(0, 2, 3)
    assert report.empty_captions == 1
    bad = {Path(p).name: reason for p, reason in report.bad}
    assert set(bad) == {"d.jpg", "e.png"}
    assert "cannot decode" in bad["d.jpg"] and bad["e.png"] == "no caption"

    text = format_report(report)
    assert str(known) in text and "txt" in text
    assert "good pairs     3" in text
    lines = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in text.splitlines() if "(px)" in line}
    assert lines["width (px)"] == ["30", "50", "64"]
    assert lines["height (px)"] == ["20", "48", "50"]
    assert "d.jpg" in text and "e.png: no caption" in text
    assert "... and 1 more" in format_report(report, max_bad=1)


def test_check_tar_and_metadata_formats(tmp_path):
    rows = []
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for i, size in enumerate([(16, 16), (32, 8)]):
            buf = io.BytesIO()
            Image.new("RGB", size).save(buf, "PNG")
            for name, data in [(f"{i}.png", buf.getvalue()), (f"{i}.txt", f"pair {i}".encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            rows.append({"file_name": f"{i}.png", "text": f"pair {i}"})
            (tmp_path / f"{i}.png").write_bytes(buf.getvalue())
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path, fmt in [(tmp_path / "s.tar", "tar"), (tmp_path, "metadata.jsonl")]:
        report = check_dataset(path, progress=False, num_workers=2)
        assert report.format == fmt and report.num_pairs == 2 and report.bad == []
        assert report.width == Spread(16, 24, 32) and report.height == Spread(8, 12, 16)
        assert report.caption_words == Spread(2, 2, 2)


def test_check_interleaved(tmp_path):
    save(tmp_path / "a.png", (20, 10))
    save(tmp_path / "b.png", (40, 30))
    data = save(tmp_path / "bad.jpg", (64, 64), "JPEG", noisy=True)
    (tmp_path / "bad.jpg").write_bytes(data[: len(data) // 2])
    docs = [
        [{"text": "one two"}, {"image": "a.png"}, {"text": "three"}],
        [{"image": "b.png"}, {"image": "a.png"}],
        [{"text": "dropped"}, {"image": "bad.jpg"}],
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs) + "oops\n")
    report = check_dataset(path, progress=False)
    assert report.format == "interleaved"
    assert (report.num_documents, report.num_segments, report.num_images) == (2, 5, 3)
    assert report.width == Spread(20, 20, 40)
    assert report.caption_words == Spread(1, 1.5, 2)
    reasons = [r for _, r in report.bad]
    assert len(reasons) == 3  # the bad image, the document it drops, the malformed line
    text = format_report(report)
    assert "documents      2" in text and "images         3" in text


def test_check_missing_path(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        check_dataset(tmp_path / "missing", progress=False)
    with pytest.raises(DataError, match="dataset not found"):
        check_dataset(tmp_path / "missing.jsonl", progress=False)
