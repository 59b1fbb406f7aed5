"""Metrics of generated images, all computed in a CLIP embedding space.

- CLIP score (Hessel et al. 2021, arXiv:2104.08718; the torchmetrics convention):
  ``100 * mean(max(cos(z_image, z_text), 0))``, on embeddings genvl already has. torchmetrics'
  ``CLIPScore`` computes the same formula but embeds the images itself through a transformers model
  and processor (a callable must supply a local one), and in torchmetrics 1.9 it fails on
  transformers 5's ``get_image_features`` output, so genvl keeps this one line of its own.
- Frechet distance between two sets of CLIP image embeddings (the FID formula of Heusel et al.
  2017, arXiv:1706.08500, on CLIP features instead of Inception features). The evaluation computes
  it with ``torchmetrics.image.fid.FrechetInceptionDistance`` over :class:`ClipImageFeatures`;
  :func:`frechet_distance` is the same formula on feature tensors.
- Prompt-retrieval accuracy: for each generated image, is its own prompt the nearest of all
  distinct prompts in CLIP space (identical captions are one prompt: :func:`group_captions`).

:func:`evaluate_generation` scores a list of prompts; :func:`evaluate_heldout` takes its prompts
from the distinct captions of a held-out image-text set and its FD reference from that set's images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genvl.errors import GenvlError


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """(N, D) images and their (N, D) prompts -> CLIP score in [0, 100]."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"shape mismatch: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}")
    cos = (F.normalize(image_embeds.double(), dim=-1) * F.normalize(text_embeds.double(), dim=-1)).sum(-1)
    return float(100 * cos.clamp_min(0).mean())


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D).

    ``||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``; the matrix square root
    is taken through symmetric eigendecompositions (float64), which keeps it real and stable. The
    same number as torchmetrics' ``FrechetInceptionDistance`` on the same features (it takes
    ``Tr (C_a C_b)^1/2`` from the eigenvalues of the non-symmetric product; both are the sum of the
    square roots of the same eigenvalues).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples in each set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    sa = _sqrtm_psd(ca)
    cross = torch.linalg.eigvalsh(sa @ cb @ sa).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross)


class ClipImageFeatures(nn.Module):
    """A CLIP's ``encode_image`` as a torchmetrics feature extractor.

    torchmetrics hands a custom feature module the images unchanged (``normalize=True`` only picks
    a float dummy input in [0, 1] for inferring the feature size), so this module takes torchmetrics'
    conventions, float in [0, 1] or uint8 in [0, 255], and maps them to genvl's [-1, 1]. The
    features come back as float64 on the CPU, where the metric keeps its sums.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] (float) or [0, 255] (uint8) -> (B, D) float64 unit embeddings."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        device = next(self.clip.parameters()).device
        return self.clip.encode_image(x.to(device) * 2 - 1).double().cpu()


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """genvl pixels (B, 3, H, W) in [-1, 1] -> [0, 1] (torchmetrics' float convention)."""
    return (images.float().clamp(-1, 1) + 1) / 2


def clip_frechet_distance(
    judge: nn.Module,
    real: Iterable[torch.Tensor],
    fake: Iterable[torch.Tensor],
    size: tuple[int, int] | None = None,
) -> float:
    """Frechet distance between two image sets in a CLIP's image-embedding space (torchmetrics FID).

    Args:
        judge: the CLIP whose ``encode_image`` gives the features.
        real / fake: batches (B, 3, H, W) in [-1, 1] (genvl's pixel range).
        size: resize every batch to this (H, W) first (bicubic, antialiased), so that both sets are
            seen at the same resolution (e.g. reference images at the generated images' size).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    s = int(getattr(getattr(judge, "config", None), "image_size", 224))
    # sync_on_compute=False: under torch.distributed one process may evaluate alone
    fid = FrechetInceptionDistance(feature=ClipImageFeatures(judge), normalize=True, input_img_size=(3, s, s),
                                   sync_on_compute=False)
    for batches, is_real in ((real, True), (fake, False)):
        for x in batches:
            if size is not None and tuple(x.shape[-2:]) != tuple(size):
                x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
            fid.update(_to_unit(x), real=is_real)
    return float(fid.compute())


def group_captions(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Identical captions (exact string identity) -> one prompt.

    Returns:
        ``(distinct, index)``: the distinct captions in order of first appearance, and the (N,)
        long index of each caption's entry in ``distinct``.
    """
    position: dict[str, int] = {}
    index = [position.setdefault(c, len(position)) for c in captions]
    return list(position), torch.tensor(index, dtype=torch.long)


def heldout_prompts(captions: Sequence[str], max_prompts: int = 64, seed: int = 0) -> list[str]:
    """The distinct captions of a set; above ``max_prompts`` a seeded random subset.

    The subset ranks captions by a hash of ``(seed, caption)``, so it depends on the captions only
    (not on Python's or torch's random streams), and keeps their order of first appearance.
    """
    if max_prompts < 2:
        raise GenvlError(f"max_prompts must be at least 2 (prompt retrieval needs two prompts), got {max_prompts}")
    distinct, _ = group_captions(captions)
    if len(distinct) <= max_prompts:
        return distinct
    rank = sorted(range(len(distinct)), key=lambda i: hashlib.sha256(f"{seed}\0{distinct[i]}".encode()).digest())
    return [distinct[i] for i in sorted(rank[:max_prompts])]


def prompt_retrieval_accuracy(
    image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, prompt_index: torch.Tensor
) -> float:
    """Percentage of images whose nearest prompt (cosine) is their own.

    Args:
        image_embeds: (N, D) generated images.
        prompt_embeds: (P, D) all distinct prompts (see :func:`group_captions`: a prompt listed
            twice ties with itself, and ties count as misses).
        prompt_index: (N,) index into ``prompt_embeds`` of each image's prompt.
    """
    sims = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(prompt_embeds.float(), dim=-1).T  # (N, P)
    own = sims.gather(1, prompt_index.view(-1, 1))
    # ties count against the image: it must beat every other prompt strictly
    others = sims.masked_fill(F.one_hot(prompt_index, sims.shape[1]).bool(), float("-inf"))
    return float(100 * (own.squeeze(1) > others.max(1).values).float().mean())


@torch.no_grad()
def evaluate_generation(
    components,
    prompts: Sequence[str],
    judge=None,
    judge_tokenizer=None,
    reference=None,
    num_images: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    **sample_kwargs,
) -> dict:
    """Generate ``num_images`` per distinct prompt and score them in a judge CLIP's space.

    Args:
        components: :class:`genvl.sampling.unclip.UnclipComponents` of the model under test.
        prompts: the prompts; identical ones are one prompt (generated once, one retrieval candidate).
        judge / judge_tokenizer: the CLIP that scores (default: the model's own CLIP; a separately
            trained one avoids scoring a model with the space it was trained towards).
        reference: optional dataset of real images (items with ``pixel_values`` in [-1, 1]) for the
            FD; its images are resized to the generated images' size if they differ.
        num_images: images per prompt.
        batch_size: images per judge forward.
        seed: prompt i is generated with seed ``seed + i``.
        progress: a progress bar over the prompts.
        sample_kwargs: passed to :func:`genvl.sampling.unclip.text_to_image` (steps, guidance...).

    Returns:
        ``clip_score``, ``prompt_retrieval_accuracy``, ``chance_prompt_retrieval`` (100 / prompts),
        ``prompts`` (the distinct prompts), ``num_images`` (generated in all), ``images``
        (N, 3, H, W) in [-1, 1], prompt-major, ``image_prompt_index`` (N,) long, and with a
        reference ``fd_clip`` and ``reference_images``.
    """
    from tqdm.auto import tqdm

    from genvl.sampling.unclip import text_to_image
    from genvl.tokenizers.text import encode_texts

    prompts, _ = group_captions(prompts)
    if len(prompts) < 2:
        raise GenvlError(f"need at least two distinct prompts, got {len(prompts)}")
    if reference is not None and len(reference) < 2:
        raise GenvlError(f"need at least two reference images for the FD, got {len(reference)}")
    judge = judge if judge is not None else components.clip
    judge_tokenizer = judge_tokenizer if judge_tokenizer is not None else components.tokenizer
    device = next(judge.parameters()).device
    images = []
    for i, prompt in enumerate(tqdm(prompts, desc="generating", disable=not progress)):
        out = text_to_image(components, [prompt], num_images=num_images, seed=seed + i, **sample_kwargs)
        images.append(out.images.cpu())
    images = torch.cat(images)  # (P*n, 3, H, W) prompt-major
    owner = torch.arange(len(prompts)).repeat_interleave(num_images)  # (P*n,)
    features = ClipImageFeatures(judge)  # the FD's feature path, also for the scores
    z_img = torch.cat([features(_to_unit(x)) for x in images.split(batch_size)])  # (P*n, D)
    z_txt = []
    for j in range(0, len(prompts), batch_size):
        enc = encode_texts(judge_tokenizer, prompts[j:j + batch_size])
        z = judge.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).embeds
        z_txt.append(z.float().cpu())
    z_txt = torch.cat(z_txt)  # (P, D)
    result = {
        "clip_score": clip_score(z_img, z_txt[owner]),
        "prompt_retrieval_accuracy": prompt_retrieval_accuracy(z_img, z_txt, owner),
        "chance_prompt_retrieval": 100.0 / len(prompts),
        "num_images": len(images),
        "prompts": prompts,
    }
    if reference is not None:
        from torch.utils.data import DataLoader

        from genvl.data import collate_image_text

        loader = DataLoader(reference, batch_size=batch_size * 4, collate_fn=collate_image_text)
        real = (b["pixel_values"] for b in loader)
        result["fd_clip"] = clip_frechet_distance(judge, real, images.split(batch_size), size=tuple(images.shape[-2:]))
        result["reference_images"] = len(reference)
    result["images"] = images
    result["image_prompt_index"] = owner
    return result


def dataset_captions(dataset) -> list[str]:
    """The canonical caption of every sample of an image-text set (``.captions``: the first caption
    variant), also through (nested) ``torch.utils.data.Subset``s, without decoding images."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        inner = dataset_captions(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    captions = getattr(dataset, "captions", None)
    if captions is None:
        raise TypeError(f"{type(dataset).__name__} has no .captions (use genvl.data.open_image_text)")
    return list(captions)


def evaluate_heldout(
    components,
    dataset,
    judge=None,
    judge_tokenizer=None,
    num_images: int = 4,
    max_prompts: int = 64,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = False,
    batch_size: int = 16,
    **sample_kwargs,
) -> dict:
    """Score a text-to-image model against a held-out captioned set.

    The prompts are the distinct captions of ``dataset`` (the first variant of each sample; identical
    captions are one prompt); with more than ``max_prompts`` a fixed subset of them
    (:func:`heldout_prompts`, independent of ``seed``, so that every model and seed meets the same
    prompts). The FD reference is every image of ``dataset`` (or its first ``limit``).

    Args:
        components: :class:`genvl.sampling.unclip.UnclipComponents` of the model under test.
        dataset: an image-text set (:func:`genvl.data.open_image_text`, or a ``Subset`` of one).
        judge / judge_tokenizer: the CLIP that scores (default: the model's own).
        num_images: images per prompt.
        max_prompts: most prompts (at least 2).
        seed: prompt i is generated with seed ``seed + i``.
        limit: use only the first ``limit`` samples (captions and reference images).
        progress: a progress bar over the prompts.
        batch_size: images per judge forward.
        sample_kwargs: passed to :func:`genvl.sampling.unclip.text_to_image`.

    Returns:
        As :func:`evaluate_generation` with a reference: ``clip_score``, ``prompt_retrieval_accuracy``,
        ``chance_prompt_retrieval``, ``fd_clip``, ``prompts``, ``num_images``, ``reference_images``,
        ``images`` and ``image_prompt_index``.

    Raises:
        GenvlError: ``max_prompts`` < 2, or fewer than two distinct captions.
    """
    from torch.utils.data import Subset

    if limit is not None:
        dataset = Subset(dataset, range(min(int(limit), len(dataset))))
    prompts = heldout_prompts(dataset_captions(dataset), max_prompts)
    if len(prompts) < 2:
        where = getattr(getattr(dataset, "dataset", dataset), "root", "the held-out set")
        raise GenvlError(f"{where}: need at least two distinct captions to evaluate generation against, "
                         f"found {len(prompts)}")
    return evaluate_generation(components, prompts, judge=judge, judge_tokenizer=judge_tokenizer, reference=dataset,
                               num_images=num_images, batch_size=batch_size, seed=seed, progress=progress,
                               **sample_kwargs)
