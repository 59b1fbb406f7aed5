"""Build the demo's emoji image-caption set from npm: an openly licensed set of captioned 64 px emoji.

    python scripts/emoji_set.py data/emoji                      # 7,572 images, both styles
    python scripts/emoji_set.py data/emoji-base --no-skin-tones # without skin-tone variations

The ``emoji-datasource-<style>`` npm packages (iamcal/emoji-data) ship 64 px PNGs for every emoji
and skin-tone variation, and an ``emoji.json`` with their Unicode names. Only the two styles with
open image licences are supported: Google Noto (Apache-2.0) and Twitter Twemoji (CC-BY-4.0).

It needs ``npm`` on PATH (or ``--npm PATH``). The output is an imagefolder that
:func:`genvl.data.open_image_text` reads directly::

    OUT/metadata.jsonl                 {"file_name": "google/1f600.png", "text": "grinning face,
                                        google noto style", "style": ..., "category": ...,
                                        "short_name": ...}
    OUT/google/1f600.png ...
    OUT/twitter/1f600.png ...
    OUT/LICENSES.md                    image licences, package versions, attribution
    OUT/LICENSE-emoji-datasource-<style>
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from tqdm.auto import tqdm

from genvl.errors import DataError, GenvlError

__all__ = ["EMOJI_STYLES", "SKIN_TONES", "EmojiBuildResult", "build_emoji_dataset", "emoji_caption", "emoji_captions"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class _Style:
    caption: str  # appended to every caption of this style
    images: str  # who made the images
    licence: str  # SPDX id
    licence_text: str  # the sentence written into LICENSES.md


#: The styles whose images have an open licence, keyed by emoji-datasource style name.
EMOJI_STYLES: dict[str, _Style] = {
    "google": _Style(
        caption="google noto style",
        images="Noto Emoji, by Google",
        licence="Apache-2.0",
        licence_text=(
            "Google Noto Emoji images, Copyright Google Inc., licensed under the Apache License, "
            "Version 2.0 (Apache-2.0): https://www.apache.org/licenses/LICENSE-2.0 "
            "(source: https://github.com/googlefonts/noto-emoji)."
        ),
    ),
    "twitter": _Style(
        caption="twitter twemoji style",
        images="Twemoji, by Twitter, Inc. and other contributors",
        licence="CC-BY-4.0",
        licence_text=(
            "Twemoji graphics, Copyright Twitter, Inc. and other contributors, licensed under the "
            "Creative Commons Attribution 4.0 International licence (CC-BY-4.0): "
            "https://creativecommons.org/licenses/by/4.0/ (source: "
            "https://github.com/jdecked/twemoji). Attribution required: \"Twemoji graphics by "
            "Twitter, Inc. and other contributors, CC-BY-4.0\"."
        ),
    ),
}

#: Fitzpatrick modifier code points, as used in emoji.json ``skin_variations`` keys.
SKIN_TONES: dict[str, str] = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}

_IMAGE_DIR = "package/img/{style}/64/"
_METADATA_MEMBERS = ("package/emoji.json", "package/package.json", "package/LICENSE")


@dataclass
class EmojiBuildResult:
    """What :func:`build_emoji_dataset` wrote.

    Attributes:
        out_dir: The dataset folder.
        metadata: Path of ``metadata.jsonl``.
        counts: Images written per style.
        versions: Version of each ``emoji-datasource-<style>`` package used.
        missing: ``style/image`` files listed in ``emoji.json`` but absent from the tarball.
    """

    out_dir: Path
    metadata: Path
    counts: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Images written over all styles."""
        return sum(self.counts.values())


def common_name(unified: str) -> str | None:
    """The CLDR short name of an emoji ("red heart" for U+2764), from the ``emoji`` package.

    Unicode character names are often archaic (U+2764 is "HEAVY BLACK HEART"); the CLDR name is
    what people type. Returns None when the ``emoji`` package is not installed or lacks the emoji.
    """
    try:
        import emoji as emoji_pkg
    except ImportError:
        return None
    try:
        char = "".join(chr(int(cp, 16)) for cp in unified.split("-"))
    except ValueError:
        return None
    data = emoji_pkg.EMOJI_DATA.get(char) or emoji_pkg.EMOJI_DATA.get(char.replace("\ufe0f", ""))
    if not data or not data.get("en"):
        return None
    return data["en"].strip(":").replace("_", " ").lower()


def emoji_caption(name: str, style: str, skin_key: str | None = None, common: str | None = None) -> str:
    """The caption of one emoji image.

    Args:
        name: Unicode name from ``emoji.json`` (e.g. "FATHER CHRISTMAS").
        style: ``"google"`` or ``"twitter"``.
        skin_key: A ``skin_variations`` key such as ``"1F3FD"`` or ``"1F3FB-1F3FC"``.
        common: the CLDR name (e.g. "santa claus"), put first when it differs from ``name``.

    Returns:
        E.g. ``"father christmas, medium skin tone, twitter twemoji style"``. Two-person
        variations read "light and medium-light skin tone"; identical tones are named once.
    """
    parts = [name.strip().lower()]
    if common and common.strip().lower() != parts[0]:
        parts.insert(0, common.strip().lower())
    if skin_key:
        tones: list[str] = []
        for code in skin_key.upper().split("-"):
            tone = SKIN_TONES.get(code, code.lower())
            if tone not in tones:
                tones.append(tone)
        parts.append(" and ".join(tones) + " skin tone")
    parts.append(EMOJI_STYLES[style].caption)
    return ", ".join(parts)


def emoji_captions(name: str, style: str, skin_key: str | None = None, common: str | None = None) -> list[str]:
    """Caption variants of one emoji image: the full :func:`emoji_caption` first, then the ways a
    person would ask for it ("a red heart", "red heart", "an emoji of a red heart", ...).

    Training on the variants (one drawn per epoch, see ``ImageTextDataset.text``) keeps a small
    text tower from learning only the exact "name, alias, style" strings.
    """
    full = emoji_caption(name, style, skin_key, common)
    base = (common or name).strip().lower()
    tone = ""
    if skin_key:
        tone = ", " + full.split(", ")[-2]  # the skin-tone part of the full caption
    article = "an" if base[:1] in "aeiou" else "a"
    style_text = EMOJI_STYLES[style].caption
    out = [full, f"{base}{tone}", f"{article} {base}{tone}", f"{article} {base}{tone}, {style_text}",
           f"an emoji of {article} {base}{tone}", f"{base} emoji{tone}"]
    alias = name.strip().lower()
    if alias != base:  # the Unicode name ("slice of pizza") asked for in the same ways
        alias_article = "an" if alias[:1] in "aeiou" else "a"
        out += [f"{alias}{tone}", f"{alias_article} {alias}{tone}"]
    return list(dict.fromkeys(out))


def _npm_pack(npm: str, spec: str, workdir: str) -> str:
    """Download ``spec`` with ``npm pack`` into ``workdir``; returns the .tgz path."""
    try:
        proc = subprocess.run(
            [npm, "pack", spec], cwd=workdir, capture_output=True, text=True, timeout=1800, check=False
        )
    except FileNotFoundError:
        raise DataError(
            f"npm not found ({npm!r}): install Node.js/npm to download {spec}, or pass the tarball"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"npm pack {spec} failed: {e}") from None
    if proc.returncode != 0:
        detail = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        last = detail[-1].strip() if detail else f"exit status {proc.returncode}"
        raise DataError(f"npm pack {spec} failed: {last}")
    # npm prints the tarball's file name as the last line of stdout.
    out_lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if out_lines and os.path.isfile(os.path.join(workdir, out_lines[-1])):
        return os.path.join(workdir, out_lines[-1])
    found = sorted(glob.glob(os.path.join(workdir, "*.tgz")))
    if not found:
        raise DataError(f"npm pack {spec} produced no .tgz in {workdir}")
    return found[-1]


def _read_package_metadata(tgz: str) -> dict[str, bytes]:
    """First streaming pass: the small metadata members (they come first in these tarballs)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(tgz, mode="r|gz") as tf:
            for member in tf:
                if member.name in _METADATA_MEMBERS and member.isfile():
                    found[member.name] = tf.extractfile(member).read()  # type: ignore[union-attr]
                    if len(found) == len(_METADATA_MEMBERS):
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read npm tarball {tgz}: {e}") from None
    if "package/emoji.json" not in found:
        raise DataError(f"{tgz} has no package/emoji.json: not an emoji-datasource package")
    return found


def _plan_style(
    entries: list[dict[str, Any]], style: str, limit: int | None, skin_tones: bool = True
) -> dict[str, dict[str, str]]:
    """Image file name -> metadata row for every image of ``style`` (in sort order, capped)."""
    flag = f"has_img_{style}"
    plan: dict[str, dict[str, str]] = {}
    ordered = sorted(entries, key=lambda e: (e.get("sort_order", 1 << 30), e.get("unified", "")))
    for entry in ordered:
        name = entry.get("name") or (entry.get("short_name") or "").replace("_", " ")
        common = common_name(entry.get("unified", ""))
        variants: list[tuple[str | None, dict[str, Any]]] = [(None, entry)]
        if skin_tones:
            variants += list((entry.get("skin_variations") or {}).items())
        for skin_key, variant in variants:
            if limit is not None and len(plan) >= limit:
                return plan
            image = variant.get("image")
            # The file name comes from the package: keep it a plain name inside OUT/<style>/.
            if not variant.get(flag) or not image or os.path.basename(image) != image or image in plan:
                continue
            plan[image] = {
                "file_name": f"{style}/{image}",
                "text": emoji_captions(name, style, skin_key, common),
                "style": style,
                "category": entry.get("category") or "",
                "short_name": entry.get("short_name") or "",
            }
    return plan


def _write_images(tgz: str, style: str, plan: Mapping[str, Any], out: Path, progress: bool) -> set[str]:
    """Second streaming pass: copy the planned PNGs (bytes as-is) into ``out/<style>/``."""
    prefix = _IMAGE_DIR.format(style=style)
    target = out / style
    target.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    bar = tqdm(total=len(plan), desc=f"emoji {style}", unit="img", disable=not progress)
    try:
        with tarfile.open(tgz, mode="r|gz") as tf:
            for member in tf:
                if not member.isfile() or not member.name.startswith(prefix):
                    continue
                image = member.name[len(prefix) :]
                if image not in plan or image in written:
                    continue
                (target / image).write_bytes(tf.extractfile(member).read())  # type: ignore[union-attr]
                written.add(image)
                bar.update(1)
                if len(written) == len(plan):
                    break  # with a limit, stop streaming early
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read npm tarball {tgz}: {e}") from None
    finally:
        bar.close()
    return written


def _licenses_md(styles: Sequence[str], versions: Mapping[str, str], counts: Mapping[str, int]) -> str:
    rows = "\n".join(
        f"| `{s}/` | {counts[s]} | {EMOJI_STYLES[s].images} | {EMOJI_STYLES[s].licence} | "
        f"`emoji-datasource-{s}@{versions[s]}` |"
        for s in styles
    )
    sections = "\n".join(f"- `{s}/`: {EMOJI_STYLES[s].licence_text}" for s in styles)
    packages = "\n".join(
        f"- `emoji-datasource-{s}` {versions[s]} (npm): its own licence is copied verbatim as "
        f"`LICENSE-emoji-datasource-{s}`."
        for s in styles
    )
    return f"""# Licences of this dataset

Built by `scripts/emoji_set.py` of genvl from the npm packages of emoji-data
(https://github.com/iamcal/emoji-data, by Cal Henderson).

| folder | images | images by | image licence | package |
|---|---|---|---|---|
{rows}

## Images

{sections}

The images are copied unmodified (64 px PNG) from the packages.

## Metadata and captions

{packages}

The emoji-datasource data (names, categories, short names) is MIT-licensed. Emoji names come
from the Unicode Character Database / CLDR (Unicode License v3). The captions in
`metadata.jsonl` are generated from those names by genvl.
"""


def build_emoji_dataset(
    out_dir: PathLike,
    styles: Sequence[str] = ("google", "twitter"),
    limit: int | None = None,
    progress: bool = True,
    npm: str = "npm",
    tarball_paths: Mapping[str, PathLike] | None = None,
    version: str | None = None,
    skin_tones: bool = True,
) -> EmojiBuildResult:
    """Build an emoji image-caption folder from the ``emoji-datasource-<style>`` npm packages.

    Each package tarball (about 70 MB) is fetched with ``npm pack`` into a temporary folder and
    streamed twice: once for ``emoji.json`` / ``package.json`` / ``LICENSE``, once to copy the
    wanted ``img/<style>/64/*.png`` members. Nothing else is extracted.

    Args:
        out_dir: Output folder (created; files of the same names are overwritten).
        styles: Any of ``"google"`` (Noto, Apache-2.0) and ``"twitter"`` (Twemoji, CC-BY-4.0).
        limit: At most this many images per style (the first in emoji sort order), for quick
            tests.
        progress: Show progress bars.
        npm: The npm executable.
        tarball_paths: Already downloaded ``.tgz`` per style; those styles skip ``npm pack``
            (tests use this to stay offline).
        version: Package version to ask npm for (e.g. ``"16.0.0"``); latest when None.
        skin_tones: Keep the skin-tone variations (about half of each package: 1,880 of 3,786
            images). Without them each distinct emoji weighs twice as much in training.

    Returns:
        An :class:`EmojiBuildResult` with counts, package versions and missing images.

    Raises:
        DataError: Unknown style, npm missing or failing, or an unreadable tarball.
    """
    styles = list(dict.fromkeys(styles))
    unknown = [s for s in styles if s not in EMOJI_STYLES]
    if unknown or not styles:
        raise DataError(
            f"unsupported emoji style {unknown[0] if unknown else '(none)'!r}: expected google or "
            f"twitter (the sets whose images have an open licence)"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = EmojiBuildResult(out_dir=out, metadata=out / "metadata.jsonl")
    rows: list[dict[str, str]] = []
    given = dict(tarball_paths or {})
    with tempfile.TemporaryDirectory(prefix="genvl-emoji-") as tmp:
        for style in styles:
            if style in given:
                tgz = os.fspath(given[style])
                if not os.path.isfile(tgz):
                    raise DataError(f"emoji tarball not found: {tgz}")
            else:
                spec = f"emoji-datasource-{style}" + (f"@{version}" if version else "")
                tgz = _npm_pack(npm, spec, tmp)
            meta = _read_package_metadata(tgz)
            try:
                entries = json.loads(meta["package/emoji.json"])
                package = json.loads(meta.get("package/package.json", b"{}"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"malformed metadata in {tgz}: {e}") from None
            result.versions[style] = str(package.get("version", "unknown"))
            if "package/LICENSE" in meta:
                (out / f"LICENSE-emoji-datasource-{style}").write_bytes(meta["package/LICENSE"])
            plan = _plan_style(entries, style, limit, skin_tones)
            written = _write_images(tgz, style, plan, out, progress)
            rows.extend(row for image, row in plan.items() if image in written)
            result.missing.extend(f"{style}/{image}" for image in plan if image not in written)
            result.counts[style] = len(written)
            if style not in given:
                os.remove(tgz)  # free ~70 MB of temp space before the next style
    # Write then rename, so a crash never leaves a half-written metadata file behind.
    tmp_meta = result.metadata.with_suffix(".jsonl.tmp")
    with open(tmp_meta, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp_meta, result.metadata)
    (out / "LICENSES.md").write_text(_licenses_md(styles, result.versions, result.counts), encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/emoji_set.py OUT [--styles google,twitter] [--limit N] [--no-skin-tones]``."""
    p = argparse.ArgumentParser(
        prog="emoji_set.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download emoji-datasource-google (Apache-2.0) and emoji-datasource-twitter (CC-BY-4.0)\n"
        "with `npm pack` and write OUT/metadata.jsonl with captions for every 64x64 PNG.")
    p.add_argument("out", help="output folder")
    p.add_argument("--styles", default="google,twitter", help="comma-separated: google, twitter (default: both)")
    p.add_argument("--limit", type=int, help="at most N images per style")
    p.add_argument("--no-skin-tones", action="store_true",
                   help="leave out the skin-tone variations (about half the images; the demo decoder trains "
                   "without them)")
    p.add_argument("--npm", default="npm", help="the npm executable (default: npm on PATH)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit: expected a positive integer, got {args.limit}")
    styles = tuple(s.strip() for s in args.styles.split(",") if s.strip())
    try:
        res = build_emoji_dataset(args.out, styles=styles, limit=args.limit, progress=not args.no_progress,
                                  npm=args.npm, skin_tones=not args.no_skin_tones)
    except GenvlError as e:
        print(f"emoji_set.py: error: {e}", file=sys.stderr)
        return 2
    per_style = ", ".join(f"{s} {n} (v{res.versions.get(s, '?')})" for s, n in res.counts.items())
    print(f"wrote {res.total} captioned emoji images to {res.out_dir} ({per_style}); "
          f"licences in {Path(res.out_dir) / 'LICENSES.md'}")
    if res.missing:
        print(f"{len(res.missing)} image(s) listed in emoji.json were not in the package")
    return 0


if __name__ == "__main__":
    sys.exit(main())
