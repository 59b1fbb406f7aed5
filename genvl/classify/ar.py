"""Generative zero-shot classification with the token LM: log p(codes(x) | class prompt).

The image is encoded to VQ-VAE codes once; for every (image, class) pair the sequence
``<bos> caption <boi> codes <eoi>`` (the text -> image layout the LM trains on,
:meth:`~genvl.models.lm.TokenLayout.build_batch`) goes through one teacher-forced forward, and the
score is the sum over the N code positions of log p(code_i | caption, codes_<i), with each
position's distribution restricted to the K image codes (the set the sampler draws from, so the
score is the log-probability of sampling exactly this image). Rows are batched; one forward row per
(image, class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genvl.errors import GenvlError


class ARClassifier:
    """Zero-shot classification by the token LM's likelihood of the image's codes.

    Args:
        lm: the :class:`~genvl.models.lm.TokenLM`.
        vq: the image tokenizer (``encode(pixels) -> (B, h, w)`` codes, ``config.image_size``).
        tokenizer: the text tokenizer of the LM.
        batch_size: (image, class) rows per forward.
    """

    method = "ar"

    def __init__(self, lm, vq, tokenizer, batch_size: int = 64):
        from genvl.sampling.autoregressive import check_parts

        self.layout = check_parts(lm, vq, tokenizer, None)
        self.lm, self.vq, self.tokenizer = lm.eval(), vq.eval(), tokenizer
        self.batch_size = batch_size
        self.image_size = vq.config.image_size

    def evals_per_image(self, num_classes: int) -> float:
        return float(num_classes)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1], C prompts -> (N, C) log p(codes | prompt) in nats."""
        from genvl.models.lm import encode_captions

        S = self.image_size
        if images.shape[-1] != S or images.shape[-2] != S:
            images = F.interpolate(images.float(), size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        codes = self.vq.encode(images).reshape(images.shape[0], -1).cpu()  # (N, h * w)
        texts = encode_captions(self.tokenizer, list(prompts), self.lm.config.text_len)
        if any(not t for t in texts):
            raise GenvlError("a class prompt encodes to no text tokens")
        N, C = codes.shape[0], len(texts)
        rows = [(n, c) for n in range(N) for c in range(C)]
        out = torch.empty(N * C, dtype=torch.float64)
        lay = self.layout
        dev = self.lm.device
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            batch = lay.build_batch([texts[c] for _, c in chunk], codes[[n for n, _ in chunk]].to(dev),
                                    [True] * len(chunk))
            logits = self.lm(batch.input_ids, batch.attention_mask).logits.float()  # (R, L, V)
            # position j predicts token j + 1; restrict to the K image codes.
            img_logits = logits[:, :-1, lay.image_offset:lay.boi_id]  # (R, L - 1, K)
            logp = torch.log_softmax(img_logits, dim=-1)
            target = batch.input_ids[:, 1:]  # (R, L - 1)
            is_code = batch.image_targets[:, 1:] & lay.is_image(target)  # codes only (not <eoi>)
            idx = (target - lay.image_offset).clamp(0, lay.codebook_size - 1)
            tok = logp.gather(-1, idx[..., None])[..., 0]  # (R, L - 1)
            out[i:i + len(chunk)] = (tok * is_code).sum(1).double().cpu()
        return out.view(N, C).float()
