"""Metrics of generated images, all computed in a CLIP embedding space.

- CLIP score (Hessel et al. 2021, arXiv:2104.08718; the torchmetrics convention):
  ``100 * mean(max(cos(z_image, z_text), 0))``.
- Frechet distance between two sets of CLIP image embeddings (the FID formula of Heusel et al.
  2017 on CLIP features instead of Inception features).
- Prompt-retrieval accuracy: for each generated image, is its own prompt the nearest of all
  prompts in CLIP space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    is taken through symmetric eigendecompositions (float64), which keeps it real and stable.
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


def prompt_retrieval_accuracy(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, prompt_index: torch.Tensor) -> float:
    """Percentage of images whose nearest prompt (cosine) is their own.

    Args:
        image_embeds: (N, D) generated images.
        prompt_embeds: (P, D) all distinct prompts.
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
    prompts: list[str],
    judge=None,
    judge_tokenizer=None,
    reference=None,
    num_images: int = 4,
    batch_size: int = 16,
    progress: bool = False,
    **sample_kwargs,
) -> dict:
    """Generate ``num_images`` per prompt and score them in a judge CLIP's space.

    Args:
        components: :class:`genvl.sampling.unclip.UnclipComponents` of the model under test.
        prompts: distinct prompts.
        judge / judge_tokenizer: the CLIP that scores (default: the model's own CLIP; a separately
            trained one avoids scoring a model with the space it was trained towards).
        reference: optional dataset of real images (items with ``pixel_values``) for the FD.
        num_images: images per prompt.
        sample_kwargs: passed to :func:`genvl.sampling.unclip.text_to_image` (steps, guidance, seed...).

    Returns:
        ``{"clip_score", "prompt_retrieval_accuracy", "fd_clip" (if reference), "num_images", "prompts"}``
        and the generated images under ``"images"`` (N, 3, H, W).
    """
    from tqdm.auto import tqdm

    from genvl.sampling.unclip import text_to_image
    from genvl.tokenizers.text import encode_texts

    judge = judge if judge is not None else components.clip
    judge_tokenizer = judge_tokenizer if judge_tokenizer is not None else components.tokenizer
    device = next(judge.parameters()).device
    seed = int(sample_kwargs.pop("seed", 0) or 0)
    images, owners = [], []
    for i, prompt in enumerate(tqdm(prompts, desc="generating", disable=not progress)):
        out = text_to_image(components, [prompt], num_images=num_images, seed=seed + i, **sample_kwargs)
        images.append(out.images.cpu())
        owners += [i] * num_images
    images = torch.cat(images)  # (P*n, 3, H, W)
    owner = torch.tensor(owners)
    z_img = torch.cat([judge.encode_image(images[j:j + batch_size].to(device)).float().cpu()
                       for j in range(0, len(images), batch_size)])
    enc = encode_texts(judge_tokenizer, prompts)
    z_txt = judge.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).embeds.float().cpu()
    result = {
        "clip_score": clip_score(z_img, z_txt[owner]),
        "prompt_retrieval_accuracy": prompt_retrieval_accuracy(z_img, z_txt, owner),
        "chance_prompt_retrieval": 100.0 / len(prompts),
        "num_images": len(images),
        "prompts": len(prompts),
    }
    if reference is not None:
        from torch.utils.data import DataLoader

        from genvl.data import collate_image_text

        refs = []
        for batch in DataLoader(reference, batch_size=batch_size * 4, collate_fn=collate_image_text):
            refs.append(judge.encode_image(batch["pixel_values"].to(device)).float().cpu())
        result["fd_clip"] = frechet_distance(z_img, torch.cat(refs))
        result["reference_images"] = len(reference)
    result["images"] = images
    return result
