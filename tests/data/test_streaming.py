"""Streaming shards: every sample once per epoch across processes, exact resume from merged
positions (any number of processes), bad samples skipped and reported, shards over loopback HTTP."""

import functools
import http.server
import json
import tarfile
import threading

import pytest
from torch.utils.data import DataLoader

from genvl.data.streaming import StreamingImageText, StreamPosition, collate_stream, expand_shards
from stream_shards import write_shards


def texts(ds, n=None):
    out = []
    for item in ds:
        out.append(item["text"])
        if n is not None and len(out) == n:
            break
    return out


def test_one_epoch_sees_every_good_sample_once_and_reports_the_bad(tmp_path):
    good = write_shards(tmp_path / "s")
    ds = StreamingImageText(str(tmp_path / "s"), image_size=8, epochs=1)
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_stream)
    seen, skipped = [], []
    for batch in loader:
        seen += batch["text"]
        skipped += batch["skipped"]
        assert batch["pixel_values"].shape[1:] == (3, 8, 8)
    assert sorted(seen) == sorted(good)
    reasons = " | ".join(r for _, r in skipped)
    assert "no caption" in reasons and "shard unreadable" in reasons and len(skipped) == 3, skipped


def test_two_processes_split_the_shards_and_every_epoch_is_complete(tmp_path):
    good = write_shards(tmp_path / "s", bad=False)
    ranks = [StreamingImageText(str(tmp_path / "s"), image_size=8, rank=r, world_size=2, epochs=2) for r in (0, 1)]
    a, b = texts(ranks[0]), texts(ranks[1])
    assert not set(ranks[0].my_shards(0)) & set(ranks[1].my_shards(0))
    assert sorted(a + b) == sorted(list(good) * 2)  # two epochs, each sample once per epoch
    assert ranks[0].my_shards(0) != ranks[0].my_shards(1)  # the order changes with the epoch
    # workers of one process split its shards too
    w = [ranks[0].my_shards(0, worker, 2) for worker in (0, 1)]
    assert sorted(w[0] + w[1]) == sorted(ranks[0].my_shards(0)) and not set(w[0]) & set(w[1])


@pytest.mark.parametrize("resume_world", [2, 1, 3])
def test_resume_from_merged_positions_sees_exactly_the_rest(tmp_path, resume_world):
    good = write_shards(tmp_path / "s", n_shards=7, per_shard=6, bad=False)
    src = str(tmp_path / "s")
    positions, consumed = [], []
    for rank, n_batches in ((0, 3), (1, 5)):  # killed after different progress on each process
        pos = StreamPosition()
        loader = DataLoader(StreamingImageText(src, image_size=8, rank=rank, world_size=2, epochs=1),
                            batch_size=2, collate_fn=collate_stream)
        for i, batch in enumerate(loader):
            if i == n_batches:
                break
            pos.update(batch)
            consumed += batch["text"]
        positions.append(StreamPosition.from_dict(json.loads(json.dumps(pos.to_dict()))))  # through a checkpoint
    merged = StreamPosition.merge(positions)
    rest = []
    for rank in range(resume_world):
        rest += texts(StreamingImageText(src, image_size=8, rank=rank, world_size=resume_world, epochs=1,
                                         position=merged))
    assert not set(rest) & set(consumed)
    assert sorted(rest + consumed) == sorted(good)


def test_a_shard_over_loopback_http_reads_like_a_local_one(tmp_path):
    write_shards(tmp_path / "s", n_shards=2, per_shard=3, bad=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "s"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000..001}}.tar"
        assert len(expand_shards(url)) == 2
        remote = StreamingImageText(url, image_size=8, epochs=1, seed=3)
        local = StreamingImageText(str(tmp_path / "s" / "shard-{000..001}.tar"), image_size=8, epochs=1, seed=3)
        a, b = list(remote), list(local)
        assert [x["text"] for x in a] == [x["text"] for x in b] and len(a) == 6
        assert all((x["pixel_values"] == y["pixel_values"]).all() for x, y in zip(a, b))
    finally:
        server.shutdown()
        server.server_close()


def test_any_set_becomes_img2dataset_style_shards(tmp_path):
    from genvl.data import open_image_text
    from genvl.data.shards import write_shards
    from tests.conftest import write_shapes_folder

    src = write_shapes_folder(tmp_path / "shapes")  # images with .txt captions
    res = write_shards(src, tmp_path / "out", samples_per_shard=10, progress=False)
    n = len(open_image_text(src))
    assert res.samples == n and len(res.shards) == -(-n // 10)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names[:2] == ["00000.tar", "00000_stats.json"] and not any(p.endswith(".part") for p in names)
    assert json.loads((tmp_path / "out" / "00000_stats.json").read_text())["count"] == 10
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        members = tar.getnames()
    assert {m.rsplit(".", 1)[1] for m in members} == {"png", "txt", "json"}
    streamed = texts(StreamingImageText(str(tmp_path / "out"), image_size=16, epochs=1))
    assert sorted(streamed) == sorted(open_image_text(src).captions)
    with pytest.raises(Exception, match="already holds .tar shards"):
        write_shards(src, tmp_path / "out", progress=False)
