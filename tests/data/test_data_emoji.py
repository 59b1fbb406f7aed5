"""The demo's emoji-set builder (scripts/emoji_set.py) on fake npm tarballs with the emoji-datasource
layout, and its command line on a fake npm (no network)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from genvl.data import open_image_text
from genvl.errors import DataError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "emoji_set.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("emoji_set", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


emoji_set = _load_script()
build_emoji_dataset, emoji_caption = emoji_set.build_emoji_dataset, emoji_set.emoji_caption

ENTRIES = [
    {
        "name": "FATHER CHRISTMAS", "short_name": "santa", "category": "People & Body",
        "subcategory": "person-fantasy", "image": "1f385.png", "sort_order": 2,
        "has_img_google": True, "has_img_twitter": True,
        "skin_variations": {
            "1F3FD": {"image": "1f385-1f3fd.png", "has_img_google": True, "has_img_twitter": True},
            "1F3FF": {"image": "1f385-1f3ff.png", "has_img_google": False, "has_img_twitter": True},
        },
    },
    {
        "name": "GRINNING FACE", "short_name": "grinning", "category": "Smileys & Emotion",
        "subcategory": "face-smiling", "image": "1f600.png", "sort_order": 1,
        "has_img_google": True, "has_img_twitter": True, "skin_variations": None,
    },
    {
        "name": "HANDSHAKE", "short_name": "handshake", "category": "People & Body",
        "subcategory": "hands", "image": "1f91d.png", "sort_order": 3,
        "has_img_google": True, "has_img_twitter": True,
        "skin_variations": {
            "1F3FB-1F3FC": {"image": "1faf1-1f3fb-200d-1faf2-1f3fc.png", "has_img_google": True,
                            "has_img_twitter": True},
            "1F3FE-1F3FE": {"image": "1f91d-1f3fe.png", "has_img_google": True, "has_img_twitter": True},
        },
    },
    {
        "name": "GHOST IMAGE", "short_name": "ghost", "category": "Smileys & Emotion",
        "image": "1f47b.png", "sort_order": 4, "has_img_google": True, "has_img_twitter": True,
    },
]
IN_TARBALL = ["1f385.png", "1f385-1f3fd.png", "1f385-1f3ff.png", "1f600.png", "1f91d.png",
              "1faf1-1f3fb-200d-1faf2-1f3fc.png", "1f91d-1f3fe.png"]  # not 1f47b.png


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (seed * 30 % 256, 100, 200, 255)).save(buf, "PNG")
    return buf.getvalue()


def fake_package(path: Path, style: str) -> Path:
    """A gzipped npm tarball shaped like emoji-datasource-<style>."""
    members: list[tuple[str, bytes]] = [
        ("package/LICENSE", f"The MIT License (MIT) fake for {style}\n".encode()),
        ("package/package.json", json.dumps({"name": f"emoji-datasource-{style}", "version": "99.1.0"}).encode()),
        ("package/emoji.json", json.dumps(ENTRIES).encode()),
        (f"package/img/{style}/sheets/64.png", png(99)),
    ]
    members += [(f"package/img/{style}/64/{name}", png(i)) for i, name in enumerate(IN_TARBALL)]
    members += [(f"package/img/{style}/32/1f600.png", png(0))]
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def tarballs(tmp_path) -> dict[str, Path]:
    return {s: fake_package(tmp_path / f"emoji-datasource-{s}-99.1.0.tgz", s) for s in ("google", "twitter")}


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_build_from_fake_tarballs(tmp_path, tarballs):
    out = tmp_path / "emoji"
    result = build_emoji_dataset(out, progress=False, tarball_paths=tarballs, npm="/nonexistent/npm")
    # google: 6 of 7 listed images (one variation has no google image); twitter: all 7.
    assert result.counts == {"google": 6, "twitter": 7} and result.total == 13
    assert result.versions == {"google": "99.1.0", "twitter": "99.1.0"}
    assert sorted(result.missing) == ["google/1f47b.png", "twitter/1f47b.png"]

    assert sorted(p.name for p in (out / "google").iterdir()) == sorted(set(IN_TARBALL) - {"1f385-1f3ff.png"})
    assert (out / "twitter" / "1f600.png").read_bytes() == png(IN_TARBALL.index("1f600.png"))
    rows = read_rows(out)
    assert len(rows) == 13
    assert rows[0] == {
        "file_name": "google/1f600.png", "style": "google", "category": "Smileys & Emotion", "short_name": "grinning",
        "text": ["grinning face, google noto style", "grinning face", "a grinning face",
                 "a grinning face, google noto style", "an emoji of a grinning face", "grinning face emoji"],
    }  # sort order, not file order; the full caption first, then the ways a person asks for it
    texts = {r["file_name"]: r["text"][0] for r in rows}
    variants = {r["file_name"]: r["text"] for r in rows}
    assert "a father christmas, medium skin tone" in variants["twitter/1f385-1f3fd.png"]
    assert texts["twitter/1f385-1f3fd.png"] == "father christmas, medium skin tone, twitter twemoji style"
    assert texts["twitter/1f385-1f3ff.png"] == "father christmas, dark skin tone, twitter twemoji style"
    assert texts["google/1faf1-1f3fb-200d-1faf2-1f3fc.png"] == (
        "handshake, light and medium-light skin tone, google noto style"
    )
    assert texts["google/1f91d-1f3fe.png"] == "handshake, medium-dark skin tone, google noto style"

    licences = (out / "LICENSES.md").read_text()
    for needle in ["Apache-2.0", "CC-BY-4.0", "Twitter, Inc. and other contributors",
                   "emoji-datasource-google@99.1.0", "emoji-datasource-twitter@99.1.0"]:
        assert needle in licences
    assert (out / "LICENSE-emoji-datasource-twitter").read_text().startswith("The MIT License (MIT) fake for twitter")
    assert (out / "LICENSE-emoji-datasource-google").exists()

    ds = open_image_text(out, image_size=16)  # the output is a regular imagefolder
    assert len(ds) == 13 and ds.skipped == []
    assert ds[0]["pixel_values"].shape == (3, 16, 16)
    assert ds.captions[0] == "grinning face, google noto style" and len(ds.all_captions) > 5 * 13
    seen = set()
    for epoch in range(12):  # one variant per epoch, a pure function of (seed, epoch, index)
        ds.set_epoch(epoch)
        seen.add(ds.text(0))
        assert ds.text(0) == ds.text(0)
    assert seen <= set(variants["google/1f600.png"]) and len(seen) >= 3


def test_limit_and_single_style(tmp_path, tarballs):
    out = tmp_path / "small"
    result = build_emoji_dataset(out, styles=("twitter",), limit=2, progress=False, tarball_paths=tarballs)
    assert result.counts == {"twitter": 2}
    assert [r["text"][0] for r in read_rows(out)] == [
        "grinning face, twitter twemoji style", "father christmas, twitter twemoji style"
    ]
    assert not (out / "google").exists()
    assert "CC-BY-4.0" in (out / "LICENSES.md").read_text() and "Apache" not in (out / "LICENSES.md").read_text()


def test_without_skin_tones(tmp_path, tarballs):
    out = tmp_path / "base"
    result = build_emoji_dataset(out, progress=False, tarball_paths=tarballs, skin_tones=False)
    rows = read_rows(out)
    assert rows and not any("skin tone" in r["text"][0] for r in rows)
    assert result.total == len(rows) < 13  # the full build above has 13 images
    assert {r["file_name"] for r in rows} >= {"google/1f600.png", "twitter/1f385.png"}
    assert all("-1f3f" not in r["file_name"] for r in rows)  # no Fitzpatrick-modifier images copied


def test_errors(tmp_path):
    with pytest.raises(DataError, match="npm not found"):
        build_emoji_dataset(tmp_path / "x", styles=("google",), progress=False, npm=str(tmp_path / "no-npm"))
    with pytest.raises(DataError, match="apple"):
        build_emoji_dataset(tmp_path / "x", styles=("apple",), progress=False)
    bogus = tmp_path / "bogus.tgz"
    bogus.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="bogus.tgz"):
        build_emoji_dataset(tmp_path / "x", styles=("google",), progress=False, tarball_paths={"google": bogus})


def test_caption_helper():
    assert emoji_caption("GRINNING FACE", "google") == "grinning face, google noto style"
    assert emoji_caption("Andorra Flag", "twitter") == "andorra flag, twitter twemoji style"
    assert emoji_caption("KISS: MAN, MAN", "twitter", "1F3FB-1F3FF") == (
        "kiss: man, man, light and dark skin tone, twitter twemoji style"
    )


def test_caption_leads_with_the_common_name_when_it_differs():
    common_name = emoji_set.common_name

    assert emoji_caption("HEAVY BLACK HEART", "google", common="red heart") == \
        "red heart, heavy black heart, google noto style"
    assert emoji_caption("CAT FACE", "twitter", common="cat face") == "cat face, twitter twemoji style"
    pytest.importorskip("emoji")
    assert common_name("2764-FE0F") == "red heart"
    assert common_name("1F385") == "santa claus"
    assert common_name("ZZZZ") is None


def fake_npm(tmp_path: Path, tarballs: dict[str, Path]) -> Path:
    """An ``npm`` that answers ``npm pack emoji-datasource-<style>`` by copying the fake tarball into the
    working folder and printing its name, as npm does."""
    npm = tmp_path / "npm"
    table = {f"emoji-datasource-{s}": str(p) for s, p in tarballs.items()}
    npm.write_text(f"""#!{sys.executable}
import os, shutil, sys
table = {table!r}
assert sys.argv[1] == "pack", sys.argv
src = table[sys.argv[2]]
shutil.copy(src, os.path.basename(src))
print(os.path.basename(src))
""")
    npm.chmod(npm.stat().st_mode | stat.S_IXUSR)
    return npm


def test_script_command_line(tmp_path, tarballs, capsys):
    npm = fake_npm(tmp_path, tarballs)
    out = tmp_path / "cli-emoji"
    assert emoji_set.main([str(out), "--npm", str(npm), "--no-skin-tones", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = read_rows(out)
    assert f"wrote {len(rows)} captioned emoji images to {out}" in printed and "google" in printed
    assert rows and not any("skin tone" in r["text"][0] for r in rows)
    assert all(os.path.isfile(out / r["file_name"]) for r in rows)
    assert all(p.exists() for p in tarballs.values())  # the given tarballs were copied, not moved

    assert emoji_set.main([str(tmp_path / "x"), "--npm", str(tmp_path / "no-npm"), "--no-progress"]) == 2
    assert "npm not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        emoji_set.main([str(tmp_path / "x"), "--limit", "0"])
    assert e.value.code == 2


def test_script_runs_as_a_program():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: emoji_set.py") and "--no-skin-tones" in r.stdout
