"""What the decoder stage conditions its training samples on, beside each image's own CLIP embedding.

- Dropped conditioning (classifier-free guidance, Ho & Salimans 2022): :func:`cond_dropped` says,
  as a pure function of (seed, epoch, dataset index), which samples train unconditionally, so runs
  repeat and resume exactly.
- The prior's draws (``model.prior_samples`` K > 0): the prior of ``--init`` draws K embeddings per
  training image from K of its captions (:func:`draw_prior_samples`, kept in the run folder under
  :data:`PRIOR_SAMPLES_FILE`), and each conditioned training embedding is then one of the image's
  K + 1 (its own, or one of its draws) with equal odds (:func:`mix_prior_samples`). At text-to-image
  time the decoder reads the prior's samples, which lie off the image embeddings it is otherwise
  trained on (cosine about 0.9 to their nearest image in the demo, where images' nearest neighbours
  are at about 0.84); trained on image embeddings alone, it maps them to blurred, cluttered averages.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

#: Where the decoder stage keeps the prior's draws in its run folder, so that a resumed or repeated
#: run with the same prior, settings and captions reads them instead of drawing again.
PRIOR_SAMPLES_FILE = "prior_samples.safetensors"


def keyed_coin(probability: float, key: str) -> bool:
    """True with ``probability``, as a pure function of ``key`` (exactly never at 0, always at 1)."""
    if probability <= 0.0:
        return False
    if probability >= 1.0:
        return True
    return random.Random(key).random() < probability


def cond_dropped(probability: float, seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` is trained unconditionally in ``epoch`` (classifier-free guidance).

    Independent of the data layer's caption dropout (another key), fresh every epoch.
    """
    return keyed_coin(probability, f"decoder-cond:{seed}:{epoch}:{index}")


def mix_prior_samples(table: torch.Tensor, has: torch.Tensor, z: torch.Tensor, index: torch.Tensor,
                      keep: torch.Tensor) -> torch.Tensor:
    """Replace each kept row's embedding, with probability K / (K + 1), by one of its K prior draws.

    Args:
        table, has: (N, K, D) the draws by dataset index and (N,) which rows have them.
        z: (B, D) the batch's embeddings (not modified).
        index: (B,) dataset indices of the rows.
        keep: (B,) the conditioned rows (dropped ones keep their zeros).
    """
    K = table.shape[1]
    index = index.cpu()
    pick = torch.randint(0, K + 1, (len(index),))  # K = the image's own embedding
    swap = has[index] & (pick < K) & keep.cpu()
    if not swap.any():
        return z
    z = z.clone()
    z[swap.to(z.device)] = table[index[swap], pick[swap]].to(z.device, z.dtype)
    return z


def caption_variants(dataset, index: int) -> tuple[str, ...]:
    """Caption variants of sample ``index``: all of them where the dataset keeps several."""
    if hasattr(dataset, "variants"):
        return tuple(dataset.variants(index))
    return (dataset[index]["text"],)


def prior_settings(recommended: dict) -> dict[str, Any]:
    """Prior sampling settings for the draws: the model directory's recommended ones (``genvl.json``
    ``sampling``), else :func:`~genvl.sampling.unclip.sample_prior`'s defaults; one candidate per embedding."""
    import inspect

    from genvl.sampling.unclip import sample_prior

    default = {name: p.default for name, p in inspect.signature(sample_prior).parameters.items()}
    scheduler = recommended.get("prior_scheduler") or recommended.get("scheduler") or default["scheduler"]
    return {"steps": int(recommended.get("prior_steps", default["steps"])),
            "guidance": float(recommended.get("prior_guidance", default["guidance"])), "scheduler": str(scheduler)}


class _Counter(logging.Filter):
    """Swallows and counts a logger's records (warnings about prompts cut to the text tower)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return False


def _draws_key(prior, opts: dict, K: int, N: int, D: int, seed: int, pairs: list) -> str:
    """A digest of everything the prior's draws depend on: its weights, the sampling settings, K, the
    seed and the (image index, caption) pairs drawn from."""
    import hashlib
    import json

    h = hashlib.sha256()
    for name, t in sorted(prior.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({"opts": opts, "K": K, "N": N, "D": D, "seed": seed}, sort_keys=True, default=str).encode())
    h.update(json.dumps(pairs).encode())
    return h.hexdigest()


def _read_draws(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The draws kept at ``path`` when they were made under ``key``; None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("embeddings").float(), f.get_tensor("drawn").bool()
    except (OSError, SafetensorError, KeyError):  # a partial or foreign file: draw again
        return None


def _write_draws(path: Path, key: str, table: torch.Tensor, has: torch.Tensor) -> None:
    """Keep the draws at ``path`` (written whole, then renamed into place)."""
    import os

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"embeddings": table.contiguous(), "drawn": has.to(torch.uint8)}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)


@torch.no_grad()
def draw_prior_samples(prior, opts: dict, clip, tokenizer, dataset, K: int, seed: int, run_dir: Path | None = None,
                       is_main: bool = True, progress: bool = False,
                       batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """K embeddings per image drawn by ``prior`` from the image's captions (K distinct caption
    variants where it has as many, else repeats), with the sampling settings ``opts``
    (:func:`prior_settings`). The draws are kept in ``run_dir`` (:data:`PRIOR_SAMPLES_FILE`) and read
    back by a resumed or repeated run whose prior weights, settings, seed and captions are the same.

    Returns ((N, K, D) embeddings by dataset index, (N,) bool: the rows drawn: those with a
    non-empty caption).
    """
    from tqdm.auto import tqdm

    from genvl.sampling.unclip import sample_prior

    N, D = len(dataset), clip.config.embed_dim
    crng = random.Random(f"prior-samples:{seed}")
    pairs = []  # (dataset index, caption)
    for j in range(N):
        variants = [v for v in caption_variants(dataset, j) if v.strip()]
        if not variants:
            continue
        chosen = crng.sample(variants, K) if len(variants) >= K else [crng.choice(variants) for _ in range(K)]
        pairs += [(j, text) for text in chosen]
    table, has = torch.zeros(N, K, D), torch.zeros(N, dtype=torch.bool)
    if not pairs:
        return table, has
    key = _draws_key(prior, opts, K, N, D, seed, pairs)
    path = run_dir / PRIOR_SAMPLES_FILE if run_dir is not None else None
    cached = _read_draws(path, key) if path is not None else None
    if cached is not None:
        if is_main:
            print(f"genvl: {len(pairs)} prior-drawn embeddings read from {path} (same prior, settings and captions)")
        return cached
    device = clip.device
    prior.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    zs = []
    bar = tqdm(total=len(pairs), desc="prior samples", disable=not progress, leave=False)
    text_log = logging.getLogger("genvl.tokenizers.text")  # captions cut to the text tower: counted, told once
    cut = _Counter()
    text_log.addFilter(cut)
    try:
        for i in range(0, len(pairs), batch):
            texts = [t for _, t in pairs[i:i + batch]]
            zs.append(sample_prior(prior, clip, tokenizer, texts, generator=gen, **opts).float().cpu())
            bar.update(len(texts))
    finally:
        text_log.removeFilter(cut)
        bar.close()
    prior.cpu()
    z = torch.cat(zs).view(-1, K, D)  # pairs are image-major, K per image
    rows = torch.tensor([j for j, _ in pairs[::K]])
    table[rows], has[rows] = z, True
    if is_main:
        print(f"genvl: {len(pairs)} embeddings drawn by the prior "
              f"({opts['steps']} steps, guidance {opts['guidance']}, {opts['scheduler']}) for {len(rows)} images"
              + (f"; {cut.count} of them from captions cut to the text tower's length" if cut.count else ""))
        if path is not None:
            _write_draws(path, key, table, has)
    return table, has
