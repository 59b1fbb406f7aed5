"""Webdataset shards in img2dataset's layout for the streaming tests (data and training)."""

import io
import json
import tarfile

from PIL import Image


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, n_shards=6, per_shard=5, bad=True):
    """img2dataset's layout (KEY.png + KEY.txt or KEY.json); with ``bad``: a corrupt image, a
    sample without caption, and a truncated last shard. Returns the good sample names."""
    root.mkdir(parents=True, exist_ok=True)
    good = set()
    for s in range(n_shards):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                key = f"{s:03d}{j:04d}"
                if bad and s == 1 and j == 2:
                    _add(tar, f"{key}.png", b"not a png")
                    _add(tar, f"{key}.txt", b"broken")
                    continue
                if bad and s == 2 and j == 0:
                    _add(tar, f"{key}.png", _png(s * 100 + j))  # no caption
                    continue
                _add(tar, f"{key}.png", _png(s * 100 + j))
                if j % 2:
                    _add(tar, f"{key}.json", json.dumps({"caption": f"sample {key}"}).encode())
                else:
                    _add(tar, f"{key}.txt", f"sample {key}".encode())
                good.add(f"sample {key}")
        # img2dataset writes a parquet of the shard's metadata and a stats file beside each shard;
        # readers take only the .tar files (these stand-ins are not read at all)
        (root / f"shard-{s:03d}.parquet").write_bytes(b"PAR1" + bytes(16) + b"PAR1")
        (root / f"shard-{s:03d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    if bad:  # cut the last shard inside its third sample's image
        last = root / f"shard-{n_shards - 1:03d}.tar"
        data = last.read_bytes()
        last.write_bytes(data[: 512 * 9 + 100])
        good = {g for g in good if not g.startswith(f"sample {n_shards - 1:03d}") or int(g[-4:]) < 2}
    return good
