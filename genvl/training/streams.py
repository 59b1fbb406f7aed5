"""Training from streamed shards: the trainer's side of :mod:`genvl.data.streaming`.

A :class:`StreamFeed` owns what a streamed run needs beyond a map-style one:

* the process's :class:`~genvl.data.streaming.StreamingImageText` (its own share of the shards)
  and a *probe*, the first samples of the set as a small map-style view, which the stage's
  ``build`` reads for what it needs before training (captions for a new tokenizer, images for a
  new prior's embedding statistics) -- the same samples on every process;
* the DataLoader (not handed to accelerate: the stream already shards by process, and accelerate
  would dispatch or re-shard an iterable dataset itself), with batches moved to the device here;
* the consumed position: every batch the loop takes is folded into a
  :class:`~genvl.data.streaming.StreamPosition`; at a checkpoint the positions of all processes
  are gathered and merged into the trainer state (``state["stream"]``), so a resumed run, with any
  number of processes, skips exactly the samples consumed before the checkpoint;
* bad samples, counted per process and summed over processes in the log (``skipped_samples``).

Only stages whose batches do not refer to samples by dataset index can stream (``Task.streams``):
the others keep per-sample state (cached encodings, per-epoch draws) keyed by index.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from genvl.data.streaming import StreamCollate, StreamingImageText, StreamPosition
from genvl.errors import TrainingError


class StreamFeed:
    """The stream of one training process (see the module docstring).

    Args:
        data_path: shards: a brace pattern, a folder of ``.tar`` files, URLs, or ``a.tar::b.tar``.
        cfg: the recipe (``data.image_size``, ``data.caption_dropout``, ``data.num_workers``,
            ``data.probe_samples``, ``seed``, ``batch_size``).
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, data_path, cfg, rank: int, world_size: int):
        self.cfg = cfg
        self.stream = StreamingImageText(data_path, image_size=cfg.data.image_size,
                                         caption_dropout=cfg.data.caption_dropout, seed=cfg.seed,
                                         rank=rank, world_size=world_size)
        readers = world_size * max(1, cfg.data.num_workers)
        if len(self.stream.shards) < readers:
            raise TrainingError(
                f"{data_path}: {len(self.stream.shards)} shard(s) cannot be shared by {world_size} process(es) x "
                f"{max(1, cfg.data.num_workers)} data worker(s), each of which reads whole shards; make more, smaller "
                "shards (genvl data shard --samples-per-shard N) or use fewer workers")
        self.probe = self.stream.probe(cfg.data.probe_samples)
        self.position = StreamPosition()
        self.skipped: list[tuple[str, str]] = []
        self.skipped_total = 0  # over every process, as of the last log row

    def describe(self) -> str:
        return (f"streaming {len(self.stream.shards)} shard(s) (each process reads its own share; "
                f"{len(self.probe)} samples read ahead for set-up)")

    def loader(self, collate) -> DataLoader:
        cfg = self.cfg
        workers = cfg.data.num_workers
        return DataLoader(self.stream, batch_size=cfg.batch_size, collate_fn=StreamCollate(collate),
                          num_workers=workers, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None)

    def resume(self, state: dict) -> None:
        """Start after what the checkpoint's processes consumed (``state["stream"]``, merged)."""
        self.position = StreamPosition.from_dict(state.get("stream") or {})
        self.stream.start_epoch = self.position.first_open_epoch(self.stream.shards)
        self.stream.position = StreamPosition.from_dict(self.position.to_dict())

    def batches(self, loader: DataLoader, device: torch.device):
        """The loader's batches on ``device``; endless (the stream goes on epoch after epoch)."""
        from accelerate.utils import send_to_device

        for batch in loader:
            yield send_to_device(batch, device, non_blocking=True)

    def consume(self, batch: dict[str, Any], state: dict) -> dict[str, Any]:
        """Take a batch: fold its positions into this process's record and count what was skipped
        before it; returns the batch without its ``"stream"`` entry."""
        info = batch.pop("stream")
        self.position.update(info)
        self.skipped.extend(info["skipped"])
        state["epoch"] = int(min(info["epoch"]))
        return batch

    def checkpoint_state(self, accelerator) -> dict:
        """Every process's position, merged (a collective: call it on every process)."""
        mine = self.position.to_dict()
        states = [mine]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            states = gather_object([mine])
        merged = StreamPosition.merge([StreamPosition.from_dict(s) for s in states])
        merged.first_open_epoch(self.stream.shards)  # finished epochs leave the state
        self.position = StreamPosition.from_dict(merged.to_dict())
        return merged.to_dict()

    def skipped_over_processes(self, accelerator) -> int:
        """Bad samples skipped so far by all processes (a collective: call it on every process)."""
        n = torch.tensor([float(len(self.skipped))], device=accelerator.device)
        if accelerator.num_processes > 1:
            n = accelerator.reduce(n, "sum")
        return int(n.item())
