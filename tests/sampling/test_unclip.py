"""unCLIP sampling pipelines: prior and decoder loops, guidance, seeds, inversion, slerp, mixing, files.

Most tests use small stand-in modules with the shared interfaces (forward signature, ``config``,
``make_scheduler``) whose outputs are the exact optimal predictions for Gaussian data
N(mu(condition), s^2 I). Their epsilon is simple and smooth, so the DDIM round trip can be held
to a tight bound. The real tiny CLIP, prior, decoder and super-res run where they matter.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from genvl.errors import GenvlError
from genvl.models.clip import CLIP, clip_config
from genvl.models.prior import DiffusionPrior, prior_config, unconditional_text
from genvl.sampling.unclip import (
    SCHEDULERS,
    UnclipComponents,
    UnclipOutput,
    ddim_invert,
    decoder_steps,
    embed_items,
    encode_prompts,
    interpolate,
    mix,
    sample_decoder,
    sample_prior,
    sample_superres,
    save_gif,
    save_strip,
    slerp,
    text_to_image,
    variations,
)
from genvl.tokenizers.text import train_text_tokenizer

D = W = 32  # the tiny CLIP's embedding and text widths
TEXT_LEN = 8
S = 8  # stand-in decoder resolution
S2 = 0.25  # variance of the stand-ins' Gaussian "data"
CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]


def _scheduler(kind: str, prediction_type: str, beta_schedule: str = "squaredcos_cap_v2", spacing: str = "leading"):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)
    clip = prediction_type == "epsilon"  # pixel models clip the predicted x0 to [-1, 1], as the real decoder
    if kind == "ddpm":
        return DDPMScheduler(**common, clip_sample=clip)
    if kind == "ddim":
        return DDIMScheduler(**common, clip_sample=clip, timestep_spacing=spacing)
    if kind == "dpm++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    raise ValueError(f"unknown scheduler kind {kind!r}")


class _Recorder(nn.Module):
    """Records the batch size of every forward call."""

    def __init__(self, beta_schedule="squaredcos_cap_v2"):
        super().__init__()
        self.calls: list[int] = []
        self.beta_schedule = beta_schedule
        self.register_buffer("alphas_cumprod", _scheduler("ddpm", "epsilon", beta_schedule).alphas_cumprod.clone())

    def _a(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.alphas_cumprod[t.long()].view(-1, *([1] * (ndim - 1)))


class StandInPrior(_Recorder):
    """x0 prediction E[x0 | x_t] for x0 ~ N(mu(text), S2 I), with the DiffusionPrior interface."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(embed_dim=D, text_width=W, text_len=TEXT_LEN)
        self.embed_proj = nn.Linear(D, D)
        self.state_proj = nn.Linear(W, D)
        self.register_buffer("embed_mean", torch.randn(D) * 0.1)
        self.register_buffer("embed_std", torch.rand(D) * 0.5 + 0.5)

    def normalize(self, z):
        return (z - self.embed_mean) / self.embed_std

    def denormalize(self, x):
        return x * self.embed_std + self.embed_mean

    def forward(self, noisy, timesteps, text_embeds, text_states, text_mask):
        self.calls.append(noisy.shape[0])
        m = text_mask.float()[..., None]  # (B, L, 1)
        pooled = (self.state_proj(text_states) * m).sum(1) / m.sum(1).clamp_min(1)  # (B, D)
        mu = self.embed_proj(text_embeds) + pooled  # (B, D)
        a = self._a(timesteps, 2)
        return mu + a.sqrt() * S2 * (noisy - a.sqrt() * mu) / (a * S2 + 1 - a)

    def make_scheduler(self, kind="ddpm"):
        return _scheduler(kind, "sample")


class StandInDecoder(_Recorder):
    """epsilon prediction E[eps | x_t] for x0 ~ N(mu(z_image [, text]), S2 I), with the Decoder interface."""

    def __init__(self, seed=0, text_width=0, image_size=S, spacing="trailing"):
        super().__init__()
        torch.manual_seed(seed)
        self.spacing = spacing  # DDIM timestep spacing ("trailing" as the real decoder)
        self.config = SimpleNamespace(image_size=image_size, embed_dim=D, text_width=text_width)
        self.proj = nn.Linear(D, 3 * image_size * image_size)
        self.text_proj = nn.Linear(text_width, 3) if text_width else None
        self.masks: list[torch.Tensor] = []

    def mean(self, image_embeds, text_states=None, text_mask=None):
        S_ = self.config.image_size
        mu = 0.8 * torch.tanh(self.proj(image_embeds)).view(-1, 3, S_, S_)  # (B, 3, S, S)
        if self.text_proj is not None:
            m = text_mask.float()[..., None]
            pooled = (self.text_proj(text_states) * m).sum(1) / m.sum(1).clamp_min(1)  # (B, 3)
            mu = mu + 0.1 * pooled[..., None, None]
        return mu

    def forward(self, noisy, timesteps, image_embeds, text_states=None, text_mask=None):
        self.calls.append(noisy.shape[0])
        if self.text_proj is None:
            assert text_states is None and text_mask is None
        else:
            self.masks.append(text_mask.clone())
        mu = self.mean(image_embeds, text_states, text_mask)
        a = self._a(timesteps, 4)
        return (1 - a).sqrt() * (noisy - a.sqrt() * mu) / (a * S2 + 1 - a)

    def make_scheduler(self, kind="ddpm"):
        return _scheduler(kind, "epsilon", spacing=self.spacing)


class StandInSuperRes(_Recorder):
    """epsilon prediction for x0 ~ N(upsample(low_res), S2 I), with the SuperRes interface."""

    def __init__(self, image_size=2 * S, low_res_size=S):
        super().__init__(beta_schedule="linear")
        self.config = SimpleNamespace(image_size=image_size, low_res_size=low_res_size, max_aug_level=250)
        self.levels: list[torch.Tensor] = []

    def forward(self, noisy, timesteps, low_res, aug_level):
        self.calls.append(noisy.shape[0])
        self.levels.append(aug_level.clone())
        mu = F.interpolate(low_res, size=noisy.shape[-2:], mode="bilinear", align_corners=False)
        a = self._a(timesteps, 4)
        return (1 - a).sqrt() * (noisy - a.sqrt() * mu) / (a * S2 + 1 - a)

    def make_scheduler(self, kind="ddpm"):
        return _scheduler(kind, "epsilon", "linear")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation, which on a busy machine costs ~10 ms per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(CAPTIONS, vocab_size=300, model_max_length=TEXT_LEN)


@pytest.fixture(scope="module")
def clip(tokenizer):
    torch.manual_seed(0)
    cfg = clip_config(
        "tiny",
        text={"vocab_size": len(tokenizer), "max_position_embeddings": TEXT_LEN, "pad_token_id": 0,
              "bos_token_id": 2, "eos_token_id": 3},
    )
    return CLIP(cfg).eval()


@pytest.fixture(scope="module")
def real_prior():
    torch.manual_seed(0)
    return DiffusionPrior(prior_config("tiny", embed_dim=D, text_width=W, text_len=TEXT_LEN)).eval()


def _components(clip, tokenizer, prior=None, decoder=None, sr=None):
    return UnclipComponents(clip, tokenizer, prior or StandInPrior(), decoder or StandInDecoder(), sr)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _unit(seed, n=1):
    return F.normalize(torch.randn(n, D, generator=_gen(seed)), dim=-1)


def _shape_image(color=(220, 30, 30), size=32):
    im = Image.new("RGB", (size, size), "white")
    im.paste(color, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return im


# --------------------------------------------------------------------------------------- text
def test_encode_prompts(clip, tokenizer):
    text = encode_prompts(clip, tokenizer, ["a red circle", "a blue square"], "cpu")
    assert text.embeds.shape == (2, D)
    assert torch.allclose(text.embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert text.token_states.shape[:2] == text.attention_mask.shape and text.token_states.shape[2] == W
    with pytest.raises(GenvlError, match="empty prompt"):
        encode_prompts(clip, tokenizer, ["a red circle", "  "], "cpu")


# -------------------------------------------------------------------------------------- prior
def _reference_unguided_prior(prior, clip, tokenizer, prompts, steps, seed):
    """The conditional-only loop written out independently."""
    text = encode_prompts(clip, tokenizer, prompts, "cpu", max_length=TEXT_LEN)
    sched = prior.make_scheduler("ddim")
    sched.set_timesteps(steps)
    g = _gen(seed)
    x = torch.randn(len(prompts), D, generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            x0 = prior(x, t.repeat(len(prompts)), text.embeds, text.token_states, text.attention_mask)
            x = sched.step(x0, t, x, generator=g).prev_sample
    return F.normalize(prior.denormalize(x), dim=-1)


def test_sample_prior_real_model_shapes_norm_and_seeds(clip, tokenizer, real_prior):
    prompts = ["a red circle", "a blue square"]
    z = sample_prior(real_prior, clip, tokenizer, prompts, num_images_per_prompt=3, steps=4, generator=_gen(0))
    assert z.shape == (6, D) and torch.isfinite(z).all()
    assert torch.allclose(z.norm(dim=-1), torch.ones(6), atol=1e-5)
    again = sample_prior(real_prior, clip, tokenizer, prompts, num_images_per_prompt=3, steps=4, generator=_gen(0))
    assert torch.equal(z, again)
    other = sample_prior(real_prior, clip, tokenizer, prompts, num_images_per_prompt=3, steps=4, generator=_gen(1))
    assert not torch.allclose(z, other, atol=1e-4)
    # guidance 1 is the plain conditional loop, bit for bit
    g1 = sample_prior(real_prior, clip, tokenizer, prompts, steps=4, guidance=1.0, generator=_gen(5))
    assert torch.equal(g1, _reference_unguided_prior(real_prior, clip, tokenizer, prompts, 4, seed=5))


def test_prior_candidates_keep_the_one_closest_to_the_prompt(clip, tokenizer, real_prior):
    prompts = ["a red circle", "a blue square"]
    K = 5
    best = sample_prior(real_prior, clip, tokenizer, prompts, num_images_per_prompt=2, steps=3, generator=_gen(7),
                        candidates=K)
    # the same draws, all kept: row r's candidates are rows r*K .. r*K + K - 1
    every = sample_prior(real_prior, clip, tokenizer, prompts, num_images_per_prompt=2 * K, steps=3, generator=_gen(7))
    text = encode_prompts(clip, tokenizer, prompts, "cpu", max_length=TEXT_LEN).embeds.repeat_interleave(2, dim=0)
    every = every.view(4, K, D)
    scores = (every * text[:, None]).sum(-1)  # (4, K)
    assert torch.allclose(best, every[torch.arange(4), scores.argmax(1)], atol=1e-6)
    assert not torch.equal(scores.argmax(1), torch.zeros(4, dtype=torch.long))  # not always the first draw
    assert ((best * text).sum(-1) >= scores.mean(1)).all()
    with pytest.raises(GenvlError, match="candidates"):
        sample_prior(real_prior, clip, tokenizer, prompts, steps=3, candidates=0)


def test_prior_guidance_one_takes_the_unguided_path(clip, tokenizer):
    prior = StandInPrior()
    prompts = ["a red circle", "a green square", "a blue triangle"]
    z1 = sample_prior(prior, clip, tokenizer, prompts, steps=5, guidance=1.0, generator=_gen(3))
    assert prior.calls == [3] * 5  # one forward per step, no doubled batch
    assert torch.equal(z1, _reference_unguided_prior(prior, clip, tokenizer, prompts, 5, seed=3))
    prior.calls.clear()
    z4 = sample_prior(prior, clip, tokenizer, prompts, steps=5, guidance=4.0, generator=_gen(3))
    assert prior.calls == [6] * 5  # cat([x] * 2): unconditional + conditional in one batch
    assert not torch.allclose(z1, z4, atol=1e-4)
    # guidance 0 is the unconditional model: from the same noise, the same embedding whatever the prompt
    z0 = sample_prior(prior, clip, tokenizer, prompts, steps=5, guidance=0.0, generator=[_gen(3) for _ in prompts])
    u = unconditional_text(1, 4, W, D)
    assert u.attention_mask.tolist() == [[1, 0, 0, 0]]  # the convention the sampler borrows from the prior module
    assert torch.allclose(z0, z0[:1].expand(3, -1), atol=1e-5)


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_prior_schedulers_run(clip, tokenizer, real_prior, kind):
    z = sample_prior(real_prior, clip, tokenizer, ["a red circle"], steps=3, scheduler=kind, generator=_gen(0))
    assert z.shape == (1, D) and torch.isfinite(z).all()
    assert torch.equal(z, sample_prior(real_prior, clip, tokenizer, ["a red circle"], steps=3, scheduler=kind, generator=_gen(0)))


def test_prior_stand_in_converges_to_its_mean(clip, tokenizer):
    """With the exact x0 predictor, DDIM lands on a sample near mu(text) (std sqrt(S2) around it)."""
    prior = StandInPrior()
    text = encode_prompts(clip, tokenizer, ["a red circle"], "cpu")
    z = sample_prior(prior, clip, tokenizer, ["a red circle"], num_images_per_prompt=64, steps=20,
                     guidance=1.0, generator=_gen(0))
    with torch.no_grad():
        mu = prior.embed_proj(text.embeds) + (prior.state_proj(text.token_states) * text.attention_mask[..., None]).sum(1) / text.attention_mask.sum()
    target = F.normalize(prior.denormalize(mu), dim=-1)  # (1, D)
    assert float((z @ target.T).mean()) > 0.5


# ------------------------------------------------------------------------------------ decoder
def _reference_unguided_decoder(decoder, z, steps, seed, kind="ddim"):
    sched = decoder.make_scheduler(kind)
    sched.set_timesteps(steps)
    g = _gen(seed)
    size = decoder.config.image_size
    x = torch.randn(z.shape[0], 3, size, size, generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = decoder(x, t.repeat(z.shape[0]), z)
            x = sched.step(eps, t, x, generator=g).prev_sample
    return x.clamp(-1, 1)


def test_sample_decoder_shapes_range_seeds_and_guidance_one():
    dec = StandInDecoder()
    z = _unit(0, 3)
    x = sample_decoder(dec, z, steps=6, guidance=3.0, generator=_gen(0))
    assert x.shape == (3, 3, S, S) and x.min() >= -1 and x.max() <= 1
    assert dec.calls == [6] * 6  # guided: one doubled batch per step
    assert torch.equal(x, sample_decoder(dec, z, steps=6, guidance=3.0, generator=_gen(0)))
    assert not torch.allclose(x, sample_decoder(dec, z, steps=6, guidance=3.0, generator=_gen(1)), atol=1e-4)
    dec.calls.clear()
    x1 = sample_decoder(dec, z, steps=6, guidance=1.0, generator=_gen(2))
    assert dec.calls == [3] * 6
    assert torch.equal(x1, _reference_unguided_decoder(dec, z, 6, seed=2))


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_decoder_schedulers_run_and_reach_the_mean(kind):
    """Every scheduler denoises the stand-in toward its conditional mean (the x0 it was built for)."""
    dec = StandInDecoder()
    z = _unit(1, 2)
    x = sample_decoder(dec, z, steps=20, guidance=1.0, scheduler=kind, generator=_gen(0))
    assert x.shape == (2, 3, S, S) and torch.isfinite(x).all()
    with torch.no_grad():
        mu = dec.mean(z)
    # samples of N(mu, S2): mean squared distance ~ S2 = 0.25, far below that of pure noise (~1 + |mu|^2)
    assert float((x - mu).pow(2).mean()) < 0.5, kind


def test_decoder_text_conditioning_and_unconditional_mask():
    dec = StandInDecoder(text_width=W)
    z = _unit(2, 2)
    states = torch.randn(2, 5, W, generator=_gen(0))
    mask = torch.ones(2, 5, dtype=torch.long)
    x = sample_decoder(dec, z, steps=3, guidance=2.0, text_states=states, text_mask=mask, generator=_gen(0))
    assert x.shape == (2, 3, S, S)
    m = dec.masks[0]
    assert m.shape == (4, 5) and not m[:2].any() and m[2:].all()  # unconditional half: no text
    dec.masks.clear()
    sample_decoder(dec, z, steps=2, guidance=2.0, generator=_gen(0))  # no text given -> "no caption" for both halves
    assert not dec.masks[0].any()
    with pytest.raises(GenvlError, match="give both or neither"):
        sample_decoder(dec, z, steps=2, text_states=states)


def test_per_sample_generators_share_noise():
    dec = StandInDecoder()
    z = _unit(3, 1).repeat(3, 1)
    for kind in ("ddim", "ddpm"):
        x = sample_decoder(dec, z, steps=4, scheduler=kind, generator=[_gen(7) for _ in range(3)])
        # (equal up to float rounding: rows of one batched matmul may round differently)
        assert torch.allclose(x[0], x[1], atol=1e-5) and torch.allclose(x[1], x[2], atol=1e-5), kind
        single = sample_decoder(dec, z[:1], steps=4, scheduler=kind, generator=_gen(7))
        assert torch.allclose(x[:1], single, atol=1e-5), kind
        other = sample_decoder(dec, z[:1], steps=4, scheduler=kind, generator=_gen(8))
        assert not torch.allclose(x[:1], other, atol=1e-3), kind


# ---------------------------------------------------------------------------------- inversion
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_inversion_reconstructs_the_image(spacing):
    dec = StandInDecoder(spacing=spacing)
    z = _unit(4, 2)
    g = _gen(0)
    image = (torch.rand(2, 3, S, S, generator=g) * 1.6 - 0.8)  # not a sample of the model: any image inverts
    noise = ddim_invert(dec, image, z, steps=50)
    assert noise.shape == image.shape and torch.isfinite(noise).all()
    assert 0.3 < float(noise.std()) < 3.0  # roughly unit-scale noise, not the image
    rec = sample_decoder(dec, z, steps=50, guidance=1.0, scheduler="ddim", init_noise=noise)
    err = float((rec - image).abs().max())
    assert err < 0.08 and float((rec - image).abs().mean()) < 0.025, err
    # a first-order method: twice the steps, about half the error
    rec100 = sample_decoder(dec, z, steps=100, guidance=1.0, init_noise=ddim_invert(dec, image, z, steps=100))
    assert float((rec100 - image).abs().max()) < 0.65 * err
    # fixed-point refinement approaches the exact inverse of the sampler's steps
    fine = sample_decoder(dec, z, steps=50, guidance=1.0, init_noise=ddim_invert(dec, image, z, steps=50, refine=2))
    assert float((fine - image).abs().max()) < 0.3 * err
    with pytest.raises(GenvlError, match="size mismatch"):
        ddim_invert(dec, torch.zeros(2, 3, S + 1, S + 1), z)


# ---------------------------------------------------------------------------------- super-res
def test_sample_superres():
    sr = StandInSuperRes()
    low = torch.rand(2, 3, S, S, generator=_gen(0)) * 2 - 1
    hi = sample_superres(sr, low, steps=10, generator=_gen(0))
    assert hi.shape == (2, 3, 2 * S, 2 * S) and hi.min() >= -1 and hi.max() <= 1
    assert sr.levels[0].tolist() == [25, 25]  # default max_aug_level // 10, told to the model
    assert torch.equal(hi, sample_superres(sr, low, steps=10, generator=_gen(0)))
    up = F.interpolate(low, size=(2 * S, 2 * S), mode="bilinear", align_corners=False)
    assert float((hi - up).pow(2).mean()) < 0.5
    sample_superres(sr, low, steps=2, aug_level=0, generator=_gen(0))
    with pytest.raises(GenvlError, match="aug_level must be an integer in \\[0, 250\\)"):
        sample_superres(sr, low, steps=2, aug_level=250)
    with pytest.raises(GenvlError, match="size mismatch"):
        sample_superres(sr, torch.zeros(1, 3, S * 2, S * 2), steps=2)


# ------------------------------------------------------------------------------ text to image
def test_text_to_image_outputs_and_seeds(clip, tokenizer, real_prior):
    comps = _components(clip, tokenizer, prior=real_prior, sr=StandInSuperRes())
    kw = dict(num_images=2, steps=3, prior_steps=3, sr_steps=2)
    out = text_to_image(comps, ["a red circle", "a blue square"], seed=0, **kw)
    assert isinstance(out, UnclipOutput)
    assert out.images.shape == (4, 3, 2 * S, 2 * S) and out.low_res.shape == (4, 3, S, S)
    assert out.images.min() >= -1 and out.images.max() <= 1
    assert out.image_embeds.shape == (4, D)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert out.seed == 0 and out.settings["prompts"] == ["a red circle", "a blue square"]
    same = text_to_image(comps, ["a red circle", "a blue square"], seed=0, **kw)
    assert torch.equal(out.images, same.images)
    diff = text_to_image(comps, ["a red circle", "a blue square"], seed=1, **kw)
    assert not torch.allclose(out.images, diff.images, atol=1e-4)
    gen = text_to_image(comps, "a red circle", generator=_gen(0), superres=False, steps=2, prior_steps=2)
    assert gen.seed is None and gen.low_res is None and gen.images.shape == (1, 3, S, S)
    rnd = text_to_image(comps, "a red circle", superres=False, steps=2, prior_steps=2)
    assert isinstance(rnd.seed, int)  # a fresh seed, reported so the image can be made again
    assert torch.equal(rnd.images, text_to_image(comps, "a red circle", superres=False, steps=2, prior_steps=2, seed=rnd.seed).images)


def test_text_to_image_separate_guidance_and_decoder_text(clip, tokenizer):
    prior, dec = StandInPrior(), StandInDecoder(text_width=W)
    comps = _components(clip, tokenizer, prior=prior, decoder=dec)
    text_to_image(comps, ["a red circle"], steps=2, prior_steps=3, guidance=1.0, prior_guidance=5.0, seed=0)
    assert prior.calls == [2] * 3 and dec.calls == [1] * 2
    assert dec.masks[0].shape[0] == 1 and dec.masks[0].any()  # the caption's tokens reach the decoder
    prior.calls.clear(), dec.calls.clear()
    text_to_image(comps, ["a red circle"], steps=2, prior_steps=3, guidance=3.0, prior_guidance=1.0, seed=0)
    assert prior.calls == [1] * 3 and dec.calls == [2] * 2


def test_progress_callback_and_tqdm(clip, tokenizer):
    seen = []
    comps = _components(clip, tokenizer, sr=StandInSuperRes())
    text_to_image(comps, "a red circle", steps=3, prior_steps=2, sr_steps=2, seed=0,
                  progress=lambda stage, i, n: seen.append((stage, i, n)))
    assert seen == [("prior", 1, 2), ("prior", 2, 2), ("decoder", 1, 3), ("decoder", 2, 3), ("decoder", 3, 3),
                    ("super-res", 1, 2), ("super-res", 2, 2)]
    text_to_image(comps, "a red circle", steps=2, prior_steps=2, seed=0, progress=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be a positive integer, got 0"),
        (dict(prior_steps=-1), "prior_steps must be a positive integer, got -1"),
        (dict(guidance=-1.0), "guidance must be a number >= 0, got -1.0"),
        (dict(prior_guidance=-0.5), "prior_guidance must be a number >= 0, got -0.5"),
        (dict(scheduler="euler"), "unknown scheduler 'euler'; choose one of: ddpm, ddim, dpm\\+\\+"),
        (dict(prompts=[""]), "empty prompt"),
        (dict(prompts=["a red circle", "   "]), "empty prompt"),
        (dict(prompts=[]), "no prompt given"),
        (dict(num_images=0), "num_images must be a positive integer"),
        (dict(seed=1, generator=torch.Generator()), "a seed or a generator, not both"),
    ],
)
def test_text_to_image_rejects_bad_input(clip, tokenizer, kwargs, message):
    comps = _components(clip, tokenizer)
    prompts = kwargs.pop("prompts", ["a red circle"])
    with pytest.raises(GenvlError, match=message) as e:
        text_to_image(comps, prompts, **{"steps": 2, "prior_steps": 2, **kwargs})
    assert "\n" not in str(e.value)


def test_size_mismatches_are_user_errors(clip, tokenizer):
    dec = StandInDecoder()
    dec.config.embed_dim = D + 1
    with pytest.raises(GenvlError, match="size mismatch: the decoder expects CLIP embed_dim 33, the clip has 32"):
        text_to_image(_components(clip, tokenizer, decoder=dec), "a red circle", steps=1, prior_steps=1)
    with pytest.raises(GenvlError, match="size mismatch: the decoder takes image embeddings"):
        sample_decoder(StandInDecoder(), torch.zeros(2, D + 1), steps=1)
    with pytest.raises(GenvlError, match="super-res stage takes"):
        _components(clip, tokenizer, sr=StandInSuperRes(low_res_size=2 * S)).check()
    with pytest.raises(GenvlError, match="text-to-image needs a prior component"):
        text_to_image(UnclipComponents(clip, tokenizer, None, StandInDecoder()), "a red circle", steps=1)
    with pytest.raises(GenvlError, match="eta applies to the ddim scheduler only"):
        sample_decoder(StandInDecoder(), _unit(0), steps=1, scheduler="ddpm", eta=0.5)


# ---------------------------------------------------------------------------------- variations
def test_variations_with_and_without_inversion(clip, tokenizer):
    dec = StandInDecoder()
    comps = _components(clip, tokenizer, decoder=dec)
    image = torch.rand(2, 3, 32, 32, generator=_gen(0)) * 2 - 1  # CLIP size; the decoder works at 8 px
    out = variations(comps, image, num_images=3, steps=4, generator=_gen(0))
    assert out.images.shape == (6, 3, S, S) and out.image_embeds.shape == (6, D)
    assert torch.equal(out.image_embeds[0], out.image_embeds[2]) and not torch.equal(out.images[0], out.images[1])
    with torch.no_grad():
        assert torch.allclose(out.image_embeds[::3], clip.encode_image(image), atol=1e-6)
    # PIL input works too
    pil = variations(comps, _shape_image(), num_images=1, steps=2, seed=0)
    assert pil.images.shape == (1, 3, S, S)

    # inversion + DDIM + guidance 1: the input image (at the decoder's size) comes back
    small = torch.rand(1, 3, S, S, generator=_gen(1)) * 1.6 - 0.8
    rec = variations(comps, small, num_images=2, steps=50, guidance=1.0, invert=True, inversion_steps=50, seed=0)
    assert float((rec.images - small).abs().max()) < 0.08
    # eta > 0 (DALL-E 2's variations from the inverted noise): near the image, but not equal, and varied
    var = variations(comps, small, num_images=2, steps=20, guidance=1.0, invert=True, inversion_steps=20, eta=0.8, seed=0)
    assert var.images.shape == (2, 3, S, S)
    assert not torch.allclose(var.images[0], var.images[1], atol=1e-3)
    assert float((var.images - small).abs().mean()) < float((out.images[:1] - small).abs().mean()) + 1.0
    with pytest.raises(GenvlError, match="pixels must be in \\[-1, 1\\]"):
        variations(comps, image * 255, steps=1)
    with pytest.raises(GenvlError, match="shape \\(B, 3, H, W\\)"):
        variations(comps, torch.zeros(1, 4, 8, 8), steps=1)


# ------------------------------------------------------------------------------- slerp, mixing
def test_slerp_properties():
    a, b = _unit(10)[0], _unit(11)[0]
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert abs(float(mid.norm()) - 1) < 1e-5
    assert abs(float(mid @ a) - float(mid @ b)) < 1e-5  # equal angle to both ends
    assert float(mid @ a) > float(a @ b)  # on the arc between them
    # the angle of the whole vectors, not per element: a 90 degree arc in 2-D
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    third = slerp(e1, e2, 1 / 3)
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    # angles grow linearly with t
    ts = torch.linspace(0, 1, 5)
    path = slerp(a[None], b[None], ts)  # (5, D)
    assert path.shape == (5, D)
    angles = torch.arccos((path @ a).clamp(-1, 1))
    total = torch.arccos((a @ b).clamp(-1, 1))
    assert torch.allclose(angles, ts * total, atol=1e-3)
    # nearly parallel: no NaN, stays unit
    c = F.normalize(a + 1e-8 * b, dim=-1)
    near = slerp(a, c, 0.5)
    assert torch.isfinite(near).all() and abs(float(near.norm()) - 1) < 1e-5
    assert torch.isfinite(slerp(a, a, 0.3)).all() and torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)
    # batched rows interpolate independently
    A, B = _unit(12, 3), _unit(13, 3)
    rows = slerp(A, B, 0.5)
    assert torch.allclose(rows[1], slerp(A[1], B[1], 0.5), atol=1e-6)
    with pytest.raises(GenvlError, match="same shape"):
        slerp(A, B[:2], 0.5)


def test_interpolate_frames_are_ordered_and_smooth(clip, tokenizer, tmp_path):
    comps = _components(clip, tokenizer)
    red = torch.rand(3, 32, 32, generator=_gen(0)) * 2 - 1
    out = interpolate(comps, "a red circle", red, frames=6, steps=6, prior_steps=3, seed=0)
    assert out.images.shape == (6, 3, S, S) and out.image_embeds.shape == (6, D)
    z = out.image_embeds
    assert torch.allclose(z.norm(dim=-1), torch.ones(6), atol=1e-5)
    with torch.no_grad():
        zb = clip.encode_image(red[None])[0]
    assert torch.allclose(z[-1], zb, atol=1e-5)
    za = embed_items(comps, ["a red circle"], prior_steps=3, seed=0)[0]  # the prompt's fixed-seed embedding
    assert torch.allclose(z[0], za, atol=1e-5)
    to_b = z @ zb
    assert bool((to_b[1:] > to_b[:-1]).all())  # frames move monotonically toward b
    steps_between = (out.images[1:] - out.images[:-1]).flatten(1).norm(dim=1)  # (5,)
    ends = float((out.images[-1] - out.images[0]).norm())
    assert float(steps_between.max()) < 0.6 * ends  # no jumps: the noise is shared
    assert torch.equal(out.images, interpolate(comps, "a red circle", red, frames=6, steps=6, prior_steps=3, seed=0).images)
    # the same endpoints give the same frame everywhere: shared initial and per-step noise, any scheduler
    for kind in ("ddim", "ddpm"):
        same = interpolate(comps, red, red, frames=3, steps=4, scheduler=kind, seed=1)
        assert torch.allclose(same.images[0], same.images[2], atol=1e-5), kind
    with pytest.raises(GenvlError, match="frames must be an integer >= 2"):
        interpolate(comps, "a red circle", red, frames=1)

    gif = save_gif(out, tmp_path / "anim" / "a.gif", duration_ms=80)
    with Image.open(gif) as im:
        assert im.n_frames == 6 and im.size == (S, S)
    strip = save_strip(out.images, tmp_path / "strip.png")
    with Image.open(strip) as im:
        assert im.size == (6 * S + 7 * 2, S + 2 * 2)
    save_gif([_shape_image(), _shape_image((0, 0, 200))], tmp_path / "pil.gif")


def test_mix_prompts_and_images(clip, tokenizer):
    comps = _components(clip, tokenizer)
    img = _shape_image()
    with torch.no_grad():
        z_img = clip.encode_image(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1)
    one = mix(comps, [(img, 1.0)], num_images=2, steps=3, seed=0)
    assert one.images.shape == (2, 3, S, S)
    assert torch.allclose(one.image_embeds, z_img.expand(2, -1), atol=1e-5)
    both = mix(comps, [("a red circle", 0.5), (img, 0.5)], steps=3, prior_steps=3, seed=0)
    z_txt = embed_items(comps, ["a red circle"], prior_steps=3, seed=0)
    want = F.normalize(0.5 * z_txt + 0.5 * z_img, dim=-1)
    assert torch.allclose(both.image_embeds, want, atol=1e-5)
    assert abs(float(both.image_embeds.norm()) - 1) < 1e-5
    # slerp midpoint and an equal-weight mix are the same direction
    assert torch.allclose(F.normalize(slerp(z_txt, z_img, 0.5), dim=-1), want, atol=1e-5)
    with pytest.raises(GenvlError, match="zero vector"):
        mix(comps, [(img, 1.0), (img, -1.0)], steps=1)
    with pytest.raises(GenvlError, match="nothing to mix"):
        mix(comps, [], steps=1)
    with pytest.raises(GenvlError, match="empty prompt"):
        mix(comps, [("", 1.0)], steps=1)


# ------------------------------------------------------------------------ the real tiny models
@pytest.fixture(scope="module")
def real_decoder():
    from genvl.models.decoder import Decoder, decoder_config

    torch.manual_seed(0)
    return Decoder(decoder_config("tiny", image_size=16)).eval()  # 16 px: the tiny super-res's input


@pytest.fixture(scope="module")
def real_sr():
    from genvl.models.superres import SuperRes, superres_config

    torch.manual_seed(0)
    return SuperRes(superres_config("tiny")).eval()  # 16 -> 32 px


def test_real_decoder_seeds_and_guidance_one(real_decoder):
    z = _unit(20, 1)
    x = sample_decoder(real_decoder, z, steps=2, guidance=3.0, generator=_gen(0))
    assert x.shape == (1, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    assert torch.equal(x, sample_decoder(real_decoder, z, steps=2, guidance=3.0, generator=_gen(0)))
    assert not torch.allclose(x, sample_decoder(real_decoder, z, steps=2, guidance=3.0, generator=_gen(1)), atol=1e-4)
    x1 = sample_decoder(real_decoder, z, steps=2, guidance=1.0, generator=_gen(0))
    assert torch.equal(x1, _reference_unguided_decoder(real_decoder, z, 2, seed=0))
    assert not torch.allclose(x, x1, atol=1e-4)  # guidance matters


def test_real_decoder_inversion_runs(real_decoder):
    z = _unit(21, 1)
    image = torch.rand(1, 3, 16, 16, generator=_gen(0)) * 1.6 - 0.8
    noise = ddim_invert(real_decoder, image, z, steps=3, refine=1)
    assert noise.shape == image.shape and torch.isfinite(noise).all()


@pytest.fixture(scope="module")
def real_parts(clip, tokenizer, real_prior, real_decoder, real_sr):
    return UnclipComponents(clip, tokenizer, real_prior, real_decoder, real_sr)


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_real_system_schedulers(real_parts, kind):
    out = text_to_image(real_parts, ["a red circle", "a blue square"], steps=2, prior_steps=2, sr_steps=2,
                        scheduler=kind, seed=0)
    assert out.images.shape == (2, 3, 32, 32) and out.low_res.shape == (2, 3, 16, 16)
    assert out.images.min() >= -1 and out.images.max() <= 1 and torch.isfinite(out.images).all()
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_real_system_from_model_dir(real_parts, tokenizer, tmp_path):
    from genvl.checkpoint import save_model_dir

    p = real_parts
    save_model_dir(tmp_path / "model", {"clip": p.clip, "prior": p.prior, "decoder": p.decoder, "sr": p.sr}, tokenizer=tokenizer)
    loaded = UnclipComponents.from_model_dir(tmp_path / "model", device="cpu")
    assert loaded.sr is not None and loaded.prior is not None
    kw = dict(steps=2, prior_steps=2, sr_steps=2, seed=0)
    out = text_to_image(loaded, "a red circle", **kw)
    # the loaded directory samples exactly what the in-memory parts sample; another seed, another image
    assert torch.equal(out.images, text_to_image(real_parts, "a red circle", **kw).images)
    assert not torch.allclose(out.images, text_to_image(loaded, "a red circle", **{**kw, "seed": 1}).images, atol=1e-4)
    img = out.images  # (1, 3, 32, 32)
    var = variations(loaded, img, num_images=2, steps=2, invert=True, inversion_steps=2, superres=False, seed=0)
    assert var.images.shape == (2, 3, 16, 16)
    lerp = interpolate(loaded, "a red circle", img, frames=3, steps=2, prior_steps=2, superres=False, seed=0)
    assert lerp.images.shape == (3, 3, 16, 16)
    blend = mix(loaded, [("a red circle", 1.0), (img, 1.0)], steps=2, prior_steps=2, superres=False, seed=0)
    assert blend.images.shape == (1, 3, 16, 16)


def test_real_text_conditioned_decoder(clip, tokenizer, real_prior):
    from genvl.models.decoder import Decoder, decoder_config

    torch.manual_seed(0)
    dec = Decoder(decoder_config("tiny", image_size=16, text_width=W)).eval()
    comps = UnclipComponents(clip, tokenizer, real_prior, dec)
    a = text_to_image(comps, "a red circle", steps=2, prior_steps=2, seed=0)
    assert a.images.shape == (1, 3, 16, 16) and torch.isfinite(a.images).all()
    # the caption's tokens reach the decoder: same z_image, other caption tokens -> other image
    text = encode_prompts(clip, tokenizer, ["a red circle", "a blue square"], "cpu")
    z = a.image_embeds.repeat(2, 1)
    x = sample_decoder(dec, z, steps=2, text_states=text.token_states, text_mask=text.attention_mask,
                       generator=[_gen(0), _gen(0)])
    assert not torch.allclose(x[0], x[1], atol=1e-4)
    with pytest.raises(GenvlError, match="size mismatch: the decoder expects CLIP text_width 16"):
        UnclipComponents(clip, tokenizer, real_prior, Decoder(decoder_config("tiny", image_size=16, text_width=16))).check()


# ------------------------------------------------------------------------- coarse layout start
class StandInCoarseDecoder(StandInDecoder):
    """The stand-in with a coarse layout path that predicts its conditional mean exactly."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.coarse = nn.Identity()  # the sampler only asks whether a path exists
        self.clip_range = 1.0

    def coarse_image(self, image_embeds):
        return self.mean(image_embeds)  # (B, 3, S, S): coarse_size = image size here


def test_coarse_start_keeps_the_layout_and_skips_the_noisiest_steps():
    dec = StandInCoarseDecoder()
    z = _unit(30, 4)
    with torch.no_grad():
        mu = dec.mean(z)
    full = sample_decoder(dec, z, steps=10, guidance=1.0, generator=_gen(0))
    assert len(dec.calls) == 10
    dec.calls.clear()
    part = sample_decoder(dec, z, steps=10, guidance=1.0, generator=_gen(0), coarse_start=0.2)
    assert len(dec.calls) == decoder_steps(10, 0.2) == 2  # only the last 20% of the schedule runs
    # From pure noise a sample lands ~S2 from the mean. From the mean noised to alpha_bar(t) ~ 0.9,
    # deterministic DDIM keeps (1 - a) S2 / (a S2 + 1 - a) ~ 0.3 S2 of it.
    err_full, err_part = float((full - mu).pow(2).mean()), float((part - mu).pow(2).mean())
    assert err_part < 0.6 * err_full, (err_part, err_full)
    assert torch.equal(part, sample_decoder(dec, z, steps=10, guidance=1.0, generator=_gen(0), coarse_start=0.2))
    assert not torch.allclose(part, sample_decoder(dec, z, steps=10, guidance=1.0, generator=_gen(1), coarse_start=0.2))
    # coarse_start 1 is the ordinary path, to the bit
    assert torch.equal(full, sample_decoder(dec, z, steps=10, guidance=1.0, generator=_gen(0), coarse_start=1.0))


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_coarse_start_with_every_scheduler(kind):
    dec = StandInCoarseDecoder()
    z = _unit(31, 2)
    x = sample_decoder(dec, z, steps=8, guidance=2.0, scheduler=kind, generator=_gen(0), coarse_start=0.5)
    with torch.no_grad():
        mu = dec.mean(z)
    assert x.shape == (2, 3, S, S) and torch.isfinite(x).all()
    assert float((x - mu).pow(2).mean()) < 0.25, kind


def test_coarse_start_errors():
    z = _unit(32, 1)
    with pytest.raises(GenvlError, match="needs a decoder with a coarse layout path"):
        sample_decoder(StandInDecoder(), z, steps=2, coarse_start=0.5)
    dec = StandInCoarseDecoder()
    for bad in (0.0, -0.2, 1.5, True, "half"):
        with pytest.raises(GenvlError, match="coarse_start must be in"):
            sample_decoder(dec, z, steps=2, coarse_start=bad)
    with pytest.raises(GenvlError, match="not both"):
        sample_decoder(dec, z, steps=2, coarse_start=0.5, init_noise=torch.zeros(1, 3, S, S))


def test_coarse_start_through_the_pipelines(clip, tokenizer):
    comps = _components(clip, tokenizer, prior=StandInPrior(), decoder=StandInCoarseDecoder())
    out = text_to_image(comps, ["a red circle"], steps=4, prior_steps=2, seed=0, coarse_start=0.5)
    assert out.settings["coarse_start"] == 0.5 and out.images.shape == (1, 3, S, S)
    assert "coarse_start" not in text_to_image(comps, ["a red circle"], steps=2, prior_steps=2, seed=0).settings
    img = _shape_image(size=S)
    assert variations(comps, img, steps=4, seed=0, coarse_start=0.5).settings["coarse_start"] == 0.5
    with pytest.raises(GenvlError, match="do not go together"):
        variations(comps, img, steps=2, invert=True, coarse_start=0.5)
    frames = interpolate(comps, "a red circle", img, frames=2, steps=4, prior_steps=2, seed=0, coarse_start=0.5)
    assert frames.images.shape == (2, 3, S, S) and frames.settings["coarse_start"] == 0.5
    assert mix(comps, [("a red circle", 1.0)], steps=4, prior_steps=2, seed=0, coarse_start=0.5).images.shape[0] == 1


def test_real_decoder_with_a_coarse_path_starts_from_its_layout():
    from genvl.models.decoder import Decoder, decoder_config

    torch.manual_seed(0)
    dec = Decoder(decoder_config("tiny", image_size=16, coarse_size=4, coarse_hidden=32)).eval()
    z = _unit(33, 2)
    x = sample_decoder(dec, z, steps=4, guidance=2.0, generator=_gen(0), coarse_start=0.5)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    assert torch.equal(x, sample_decoder(dec, z, steps=4, guidance=2.0, generator=_gen(0), coarse_start=0.5))


def test_transparent_pil_images_are_composited_on_white_as_in_training():
    """A PIL image with an alpha channel reads as the data loader reads it: transparent pixels become
    white whatever colour they store (emoji PNGs store black or junk there)."""
    from genvl.data import load_rgb
    from genvl.sampling.common import as_pixels

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 30, 40)  # colour stored everywhere ...
    rgba[2:6, 2:6, 3] = 255  # ... but only a red square is opaque
    im = Image.fromarray(rgba, "RGBA")
    px = as_pixels(im)
    assert px.shape == (1, 3, 8, 8)
    assert torch.allclose(px[0, :, 0, 0], torch.ones(3))  # transparent corner: white
    assert torch.allclose(px[0, :, 3, 3], torch.tensor([200, 30, 40]) / 127.5 - 1)  # opaque: its colour
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    loaded = np.asarray(load_rgb(buf.getvalue()), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(px[0], torch.from_numpy(loaded).permute(2, 0, 1))
