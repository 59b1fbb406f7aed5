"""Prior (CLIP-space diffusion) and AR (token-LM likelihood) zero-shot scoring on tiny models
trained for a few dozen steps on red circles vs blue squares; estimator checks."""

import pytest
import torch

from conftest import draw_shape
from genvl.classify import ARClassifier, PriorClassifier, classify, shared_pairs
from genvl.data import to_tensor
from genvl.models.clip import CLIP, clip_config
from genvl.models.lm import TokenLM, encode_captions, lm_config
from genvl.models.prior import DiffusionPrior, prior_config
from genvl.sampling.unclip import encode_prompts
from genvl.tokenizers.text import train_text_tokenizer
from genvl.tokenizers.vqvae import VQVAE, vqvae_config

CLASSES = ["a red circle", "a blue square"]


def shapes(n, size, seed0=0, jitter=2):
    xs = [to_tensor(draw_shape(("red", "blue")[i % 2], ("circle", "square")[i % 2], size, jitter, seed0 + i))
          for i in range(n)]
    return torch.stack(xs), torch.arange(n) % 2


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(CLASSES * 5 + ["a green triangle", "a cat"], vocab_size=300, model_max_length=8)


@pytest.fixture(scope="module")
def clip_prior(tok):
    """A random tiny CLIP and a tiny prior trained 60 steps to map each prompt to its class's embeddings."""
    torch.manual_seed(0)
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 8, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3})).eval()
    prior = DiffusionPrior(prior_config("tiny", text_len=8))
    x, y = shapes(64, 32)
    with torch.no_grad():
        z = clip.encode_image(x)  # (64, D)
    prior.set_embedding_stats(z.mean(0), z.std(0).clamp_min(1e-3))
    text = encode_prompts(clip, tok, CLASSES)
    sched = prior.make_scheduler("ddpm")
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        i = torch.randint(0, 64, (32,), generator=g)
        x0 = prior.normalize(z[i])
        e = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        c = y[i]
        pred = prior(sched.add_noise(x0, e, t), t, text.embeds[c], text.token_states[c], text.attention_mask[c])
        loss = (pred - x0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clip, prior.eval()


def test_prior_score_is_the_shared_pair_x0_error(clip_prior, tok):
    clip, prior = clip_prior
    x, _ = shapes(2, 32)
    clf = PriorClassifier(prior, clip, tok, samples=3, batch_size=4, seed=1)
    got = clf.scores(x, CLASSES)
    t, eps = shared_pairs(3, (32,), (0, 1000), seed=1)
    sched = prior.make_scheduler("ddpm")
    text = encode_prompts(clip, tok, CLASSES)
    with torch.no_grad():
        x0 = prior.normalize(clip.encode_image(x))
        want = torch.zeros(2, 2)
        for n in range(2):
            for c in range(2):
                xt = sched.add_noise(x0[n].expand(3, -1), eps, t)  # the same 3 pairs for every class
                pred = prior(xt, t, text.embeds[c].expand(3, -1), text.token_states[c].expand(3, -1, -1),
                             text.attention_mask[c].expand(3, -1))
                want[n, c] = -(pred - x0[n]).pow(2).sum(1).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert clf.evals_per_image(2) == 6 and clf.last_evals.tolist() == [6, 6]


def test_trained_prior_classifies_held_out_images(clip_prior, tok):
    clip, prior = clip_prior
    x, y = shapes(20, 32, seed0=500)
    res = classify(PriorClassifier(prior, clip, tok, samples=32), x, CLASSES, temperature=2.0)
    acc = float((res.probs.argmax(1) == y).float().mean())
    assert acc >= 0.8, acc
    assert res.evals_per_image == 64
    for w in ("eps", "min-snr"):
        s = PriorClassifier(prior, clip, tok, samples=16, weighting=w).scores(x, CLASSES)
        assert s.shape == (20, 2) and torch.isfinite(s).all()
    adaptive = PriorClassifier(prior, clip, tok, schedule=[(8, 1), (24, 1)])
    assert float((adaptive.scores(x, CLASSES).argmax(1) == y).float().mean()) >= 0.8
    assert adaptive.evals_per_image(2) == 8 * 2 + 24 < 64


@pytest.fixture(scope="module")
def lm_vq(tok):
    """A random tiny VQ-VAE (16 codes per image) and a tiny LM trained 40 steps on t2i rows."""
    torch.manual_seed(0)
    vq = VQVAE(vqvae_config("tiny")).eval()
    lm = TokenLM(lm_config("tiny", text_vocab_size=len(tok), codebook_size=vq.config.codebook_size,
                           image_tokens=vq.tokens_per_image, text_len=8))
    lay = lm.layout
    x, y = shapes(64, 16)
    codes = vq.encode(x)  # (64, 4, 4)
    texts = encode_captions(tok, CLASSES, 8)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        i = torch.randint(0, 64, (16,), generator=g)
        b = lay.build_batch([texts[c] for c in y[i].tolist()], codes[i], [True] * 16)
        logits = lm(b.input_ids, b.attention_mask).logits[:, :-1]
        tgt = b.image_targets[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[tgt], b.input_ids[:, 1:][tgt])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval(), vq


def test_ar_score_is_teacher_forced_log_likelihood(lm_vq, tok):
    lm, vq = lm_vq
    x, _ = shapes(2, 16)
    clf = ARClassifier(lm, vq, tok, batch_size=3)  # rows cut across images
    got = clf.scores(x, CLASSES)
    lay = lm.layout
    codes = vq.encode(x).reshape(2, -1)
    texts = encode_captions(tok, CLASSES, 8)
    with torch.no_grad():
        for n in range(2):
            for c in range(2):
                ids = torch.tensor([lay.t2i_prompt(texts[c]) + (codes[n] + lay.image_offset).tolist()])
                logits = lm(ids).logits[0, :-1, lay.image_offset:lay.boi_id]  # (L - 1, K)
                logp = torch.log_softmax(logits, -1)
                P = len(texts[c]) + 2  # <bos> caption <boi>
                want = sum(float(logp[P - 1 + j, codes[n, j]]) for j in range(codes.shape[1]))
                assert float(got[n, c]) == pytest.approx(want, abs=1e-3)
    assert clf.evals_per_image(2) == 2.0


def test_trained_lm_classifies_held_out_images(lm_vq, tok):
    lm, vq = lm_vq
    x, y = shapes(20, 16, seed0=500)
    res = classify(ARClassifier(lm, vq, tok), x, CLASSES)
    assert float((res.probs.argmax(1) == y).float().mean()) >= 0.8
    assert bool((res.scores < 0).all())  # log-probabilities
    # 32 px input is resized to the VQ-VAE's 16 px
    assert ARClassifier(lm, vq, tok).scores(shapes(2, 32)[0], CLASSES).shape == (2, 2)
