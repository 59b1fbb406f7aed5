"""Launched by test_distributed.py under torchrun: train a tiny CLIP, dump this rank's parameters."""

import sys
from pathlib import Path


def main(data: str, out: str, batch_size: int, result_dir: str) -> None:
    from accelerate import PartialState
    from safetensors.torch import save_file

    from genvl.config import apply_overrides
    from genvl.training import TrainConfig, train
    from genvl.training.tasks.clip import CLIPTask

    cfg = apply_overrides(TrainConfig(), [f"batch_size={batch_size}", "max_steps=6", "warmup_steps=1", "lr=3e-3",
                                          "save_every=3", "tokenizer_vocab=300", "text_len=8", "tracker=none"])
    res = train(CLIPTask(cfg), data, out, progress=False)
    state = PartialState()
    save_file({k: v.detach().contiguous() for k, v in res.model.state_dict().items()},
              str(Path(result_dir) / f"rank{state.process_index}.safetensors"),
              metadata={"world": str(state.num_processes), "backend": str(state.backend)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
