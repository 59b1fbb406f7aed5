"""Launched by test_streaming_training.py (under torchrun, or as one plain process): train a tiny
CLIP from streamed shards, writing what each process consumed.

Every batch the loss sees appends ``{"step", "ids"}`` to ``RESULTS/rank{R}.jsonl`` (ids:
``epoch|shard|offset``), so the test knows which samples each optimizer step consumed. With
``--kill-at N`` the main process SIGKILLs itself after step N (torchrun then stops the other).
At the end, ``RESULTS/rank{R}.json`` holds the process's count of skipped bad samples.

    stream_worker.py SHARDS OUT RESULTS MAX_STEPS [--kill-at N] [--resume --first-step M]
"""

import argparse
import json
import os
import signal
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("results")
    ap.add_argument("max_steps", type=int)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--first-step", type=int, default=0)
    args = ap.parse_args()

    from genvl.config import apply_overrides
    from genvl.training import TrainConfig, train
    from genvl.training.tasks.clip import CLIPTask

    rank = int(os.environ.get("RANK", "0"))  # (accelerate's state must first be made by the trainer)
    log = Path(args.results) / f"rank{rank}.jsonl"

    class RecordingCLIP(CLIPTask):
        calls = 0

        def collate(self, items):
            batch = super().collate(items)
            batch["ids"] = [f"{it['epoch']}|{os.path.basename(it['shard'])}|{it['offset']}" for it in items]
            return batch

        def loss(self, model, batch):
            ids = batch.pop("ids")
            self.calls += 1
            with log.open("a") as f:
                f.write(json.dumps({"step": args.first_step + self.calls, "ids": ids}) + "\n")
            return super().loss(model, batch)

    def on_step(state, cfg):
        if args.kill_at is not None and state["step"] >= args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = apply_overrides(TrainConfig(), [
        "batch_size=3", f"max_steps={args.max_steps}", "warmup_steps=1", "lr=1e-3", "save_every=3", "log_every=1",
        "tokenizer_vocab=300", "text_len=8", "tracker=none", "data.image_size=16", "data.streaming=true"])
    res = train(RecordingCLIP(cfg), args.shards, args.out, resume="latest" if args.resume else None,
                progress=False, on_step=on_step)
    (Path(args.results) / f"rank{rank}.json").write_text(json.dumps({"skipped": res.skipped_files}))


if __name__ == "__main__":
    main()
