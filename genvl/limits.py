"""Limits on what one request may ask for, shared by the command line, the Python API and the UI.

Every size a user can type (images, frames, steps, candidates, samples, batch sizes, caption
length) is checked against a constant here *before* anything is allocated, with a one-line
:class:`~genvl.errors.GenvlError` naming the limit. Requests that pass the limits but would still
not fit are caught by :func:`check_memory`: the memory a request needs is estimated from the model's
config and refused above :data:`MEMORY_FRACTION` of the memory available, with a hint.

The numbers are generous for the models genvl trains (64 px decoders, 77-token text towers); they
exist so that a typo (``--num-images 100000``) fails in milliseconds instead of exhausting memory.
"""

from __future__ import annotations

import os

from genvl.errors import GenvlError

MAX_STEPS = 1000  # diffusion steps: the schedulers' training timesteps
MAX_IMAGES = 16  # images per prompt (per input image for variations) in one run
MAX_FRAMES = 64  # interpolation frames
MAX_SEED = 2**31 - 1  # the UI's seed box (the command line takes any seed in [0, 2**63))
MAX_PRIOR_CANDIDATES = 64  # prior samples per image, the closest to the prompt kept
MAX_SAMPLES = 1024  # (t, noise) samples per class of diffusion / prior classification (all stages together)
MAX_CLASSES = 1000  # class names of one classification
MAX_BATCH_SIZE = 4096  # rows per forward (--batch-size)
MAX_NEW_TOKENS = 4096  # text tokens the interleaved LM writes per document
MAX_DOC_IMAGES = MAX_IMAGES  # images the interleaved LM generates per document

#: Captions (and text segments of interleaved documents) longer than this many characters are
#: skipped and counted where a dataset is read; prompts and texts handed to a tokenizer are cut to
#: it first (the text tower keeps far fewer tokens anyway).
MAX_CAPTION_CHARS = 10_000
#: A caption file or metadata line larger than this is skipped without being read whole.
MAX_LINE_BYTES = 1 << 20
#: Tokenizer training splits runs of non-space characters longer than this into pieces: the BPE
#: trainer's time grows with the square of a word's length (a 1 MB "aaaa..." caption took many minutes).
MAX_WORD_CHARS = 64

#: A request estimated to need more than this share of the available memory is refused.
MEMORY_FRACTION = 0.5
#: Environment variable capping the memory genvl treats as available (bytes, or with K/M/G), e.g.
#: for a container whose limit the system does not report.
MEMORY_ENV = "GENVL_MAX_MEMORY"


def check_count(name: str, value, hi: int, lo: int = 1, what: str = "") -> int:
    """``value`` as an int in [lo, hi], else a one-line GenvlError naming the limit.

    Args:
        name: how the user set it (``--num-images``, ``num_images``).
        value: the value.
        hi: the largest value allowed (a constant of this module).
        lo: the smallest.
        what: what one unit is, for the message ("images per prompt").
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenvlError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise GenvlError(f"{name} must be >= {lo}, got {value}")
    if value > hi:
        unit = f" {what}" if what else ""
        raise GenvlError(f"{name} {value} is above genvl's limit of {hi}{unit}; ask for at most {hi}")
    return value


def parse_bytes(text: str) -> int:
    """``"512M"`` -> 536870912 (suffixes K, M, G, T; powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise GenvlError(f"{MEMORY_ENV}={text!r}: expected a size such as 8G or 512M") from None
    if not value > 0:
        raise GenvlError(f"{MEMORY_ENV}={text!r}: expected a positive size")
    return int(value * scale)


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit, when it has one."""
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            with open(limit) as f:
                lim = f.read().strip()
            with open(usage) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if lim.isdigit() and int(lim) < 1 << 60:  # "max" or a huge number: no limit
            return max(0, int(lim) - used)
    return None


def available_memory(device=None) -> int | None:
    """Bytes a new allocation on ``device`` can use: free GPU memory (plus what torch's cache holds),
    else the system's available memory (and the cgroup limit's room); None when unknown."""
    avail = None
    dev = str(device) if device is not None else "cpu"
    if dev.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            d = torch.device(dev)
            free, _ = torch.cuda.mem_get_info(d)
            avail = free + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
    elif dev == "cpu":
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            try:
                with open("/proc/meminfo") as f:
                    avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
            except (OSError, StopIteration, ValueError):
                avail = None
        room = _cgroup_room()
        if room is not None:
            avail = room if avail is None else min(avail, room)
    cap = os.environ.get(MEMORY_ENV)
    if cap:
        avail = parse_bytes(cap) if avail is None else min(avail, parse_bytes(cap))
    return avail


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_memory(need: float, what: str, hint: str, device=None) -> None:
    """Refuse a request estimated to need more than :data:`MEMORY_FRACTION` of the available memory.

    Args:
        need: the estimate, in bytes.
        what: the request ("12 images of 512 px").
        hint: how to ask for less ("use a smaller --num-images").
        device: where it would be allocated.

    Raises:
        GenvlError: one line with the estimate, the memory available and the hint.
    """
    avail = available_memory(device)
    if avail is None or need <= MEMORY_FRACTION * avail:
        return
    raise GenvlError(f"{what} would need about {format_bytes(need)} of memory, more than {MEMORY_FRACTION:.0%} of "
                     f"the {format_bytes(avail)} available; {hint}")


def unet_bytes(channels, size: int, layers: int, head_dim: int, rows: int, sample_channels: int = 3,
               dtype_bytes: int = 4, context: int = 0, first_attention_level: int = 1) -> int:
    """Rough peak memory of a UNet forward without gradients on ``rows`` samples of side ``size``.

    Counted per row: the activations kept for the skip connections (``layers + 1`` per level), a
    working set of a few feature maps at the top level, and the attention maps of the largest level
    with attention (from ``first_attention_level`` down; fused attention kernels work through the keys in
    blocks, counted as at most 1024 keys at a time); times ``rows`` and the bytes per value.
    Against the peak resident memory of tiny decoders measured on CPU (64 and 128 px, 8 and 32 rows)
    it errs high by about a quarter: it is used to refuse requests, not to plan them.
    """
    per_row, attn = 0, 0
    for level, ch in enumerate(channels):
        side = max(1, size >> level)
        per_row += (layers + 1) * ch * side * side
        if level >= first_attention_level:  # self-attention over side^2 positions, heads = ch / head_dim
            heads = max(1, ch // max(1, head_dim))
            attn = max(attn, heads * (side * side) * min(side * side + context, 1024))
    per_row += 12 * channels[0] * size * size + sample_channels * size * size * 4 + attn
    return int(per_row * rows * dtype_bytes)
