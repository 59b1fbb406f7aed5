"""Held-out generation evaluation: grouped prompt retrieval, prompt selection, FD through torchmetrics
over a CLIP, and evaluate_heldout end to end on a tiny random model."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from genvl.data import open_image_text
from genvl.errors import GenvlError
from genvl.evaluation.generation import (
    ClipImageFeatures,
    clip_frechet_distance,
    dataset_captions,
    evaluate_heldout,
    frechet_distance,
    group_captions,
    heldout_prompts,
    prompt_retrieval_accuracy,
)
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.prior import DiffusionPrior, prior_config
from genvl.sampling.unclip import UnclipComponents
from genvl.tokenizers.text import train_text_tokenizer

CAPTIONS = ["a", "a", "b", "b", "c", "c"]


def test_group_captions_exact_identity_first_appearance():
    distinct, index = group_captions(["b", "a", "b", "A", "a"])
    assert distinct == ["b", "a", "A"]  # exact strings: "A" is not "a"
    assert index.dtype == torch.long and index.tolist() == [0, 1, 0, 2, 1]
    assert group_captions([])[0] == [] and group_captions([])[1].shape == (0,)


def test_retrieval_groups_duplicate_captions():
    distinct, index = group_captions(CAPTIONS)
    assert distinct == ["a", "b", "c"] and index.tolist() == [0, 0, 1, 1, 2, 2]
    prompt_embeds = torch.eye(3)  # (3, 3) one embedding per distinct caption
    g = torch.Generator().manual_seed(0)
    images = prompt_embeds[index] + 0.1 * torch.rand(6, 3, generator=g)  # each image nearest its own caption
    assert prompt_retrieval_accuracy(images, prompt_embeds, index) == 100.0  # 3-way retrieval, chance 100/3
    # counted as six distinct items, each caption ties with its duplicate and every image misses
    assert prompt_retrieval_accuracy(images, prompt_embeds[index], torch.arange(6)) == 0.0


def test_grouping_changes_a_mixed_result():
    # images 0-3 right, images 4 and 5 closer to "a" than to their own "c"
    distinct, index = group_captions(CAPTIONS)
    prompt_embeds = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [0.1, 1.0, 0.0], [0.0, 1.0, 0.1],
                           [1.0, 0.0, 0.5], [0.9, 0.2, 0.6]])
    assert prompt_retrieval_accuracy(images, prompt_embeds, index) == pytest.approx(400 / 6)
    assert prompt_retrieval_accuracy(images, prompt_embeds[index], torch.arange(6)) == 0.0


def test_heldout_prompts_subset_is_seeded_sorted_and_stable():
    caps = [f"caption {i % 100}" for i in range(300)]  # 100 distinct, each three times
    assert heldout_prompts(caps, max_prompts=200) == [f"caption {i}" for i in range(100)]
    sub = heldout_prompts(caps, max_prompts=10)
    assert len(sub) == 10 == len(set(sub))
    assert sub == sorted(sub, key=lambda c: int(c.split()[1]))  # order of first appearance
    assert heldout_prompts(list(reversed(caps)), max_prompts=10) == sorted(sub, key=lambda c: -int(c.split()[1]))
    assert heldout_prompts(caps, max_prompts=10) == sub  # runs repeat
    assert heldout_prompts(caps, max_prompts=10, seed=1) != sub
    with pytest.raises(GenvlError, match="at least 2"):
        heldout_prompts(caps, max_prompts=1)


class _Identity(nn.Module):
    """Features are the inputs: torchmetrics' FD on given feature tensors."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x.double()


@pytest.mark.parametrize("n,m", [(300, 200), (12, 10)])  # more samples than dimensions, and fewer
def test_frechet_distance_agrees_with_torchmetrics(n, m):
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 16, generator=g)
    b = 1.3 * torch.randn(m, 16, generator=g) + 0.2
    fid = FrechetInceptionDistance(feature=_Identity(16), sync_on_compute=False)
    fid.update(a, real=True)
    fid.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(float(fid.compute()), rel=1e-4)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return CLIP(clip_config("tiny")).eval()


def test_clip_features_take_torchmetrics_pixels(tiny_clip, shapes_dir):
    ds = open_image_text(shapes_dir, image_size=32)
    x = torch.stack([ds[i]["pixel_values"] for i in range(4)])  # [-1, 1]
    feats = ClipImageFeatures(tiny_clip)
    want = tiny_clip.encode_image(x).double()
    assert torch.allclose(feats((x + 1) / 2), want, atol=1e-5)  # float in [0, 1]
    as_uint8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert torch.allclose(feats(as_uint8), want, atol=2e-2)  # uint8 in [0, 255] (8-bit rounding)
    assert feats((x + 1) / 2).dtype == torch.float64


def test_clip_fd_of_a_folder_is_zero_against_itself_and_grows_with_noise(tiny_clip, shapes_dir):
    ds = open_image_text(shapes_dir, image_size=32)
    x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])  # (32, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    scale = tiny_clip.encode_image(x).var(0).sum().item()  # the FD's natural scale: total variance
    fds = [clip_frechet_distance(tiny_clip, x.split(32), (x + s * noise).clamp(-1, 1).split(32))
           for s in (0.0, 0.1, 0.3, 1.0)]
    assert abs(fds[0]) < 1e-6 * scale
    assert fds[0] < fds[1] < fds[2] < fds[3], fds
    # resizing both sets to a common size first: the same images at 16 px vs 32 px are one set
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", antialias=True)
    assert clip_frechet_distance(tiny_clip, x.split(32), small.split(32), size=(16, 16)) < 1e-6 * scale
    assert clip_frechet_distance(tiny_clip, x.split(32), small.split(32)) > 10 * fds[0]


# ------------------------------------------------------------------------------- evaluate_heldout
@pytest.fixture(scope="module")
def components():
    torch.manual_seed(0)
    tok = train_text_tokenizer(["a red heart", "a cat face", "a slice of pizza"] * 5, vocab_size=300,
                               model_max_length=8)
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 8, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3}))
    prior = DiffusionPrior(prior_config("tiny", embed_dim=32, text_width=32, text_len=8))
    decoder = Decoder(decoder_config("tiny", image_size=16))
    return UnclipComponents(clip=clip.eval(), tokenizer=tok, prior=prior.eval(), decoder=decoder.eval())


def write_captioned_folder(root, captions, size=16):
    """One solid-colour PNG per caption, with metadata.jsonl (a caption may be a list of variants)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, cap in enumerate(captions):
        Image.new("RGB", (size, size), ((40 * i) % 256, (90 * i) % 256, 200)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": cap})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


FAST = {"steps": 2, "prior_steps": 2}


def test_evaluate_heldout_groups_captions_and_scores(components, tmp_path):
    caps = ["a red heart", ["a cat face", "a kitty"], "a red heart", "a cat face", "a slice of pizza"]
    ds = open_image_text(write_captioned_folder(tmp_path / "h", caps), image_size=16)
    assert dataset_captions(ds) == ["a red heart", "a cat face", "a red heart", "a cat face", "a slice of pizza"]
    res = evaluate_heldout(components, ds, num_images=2, **FAST)
    assert res["prompts"] == ["a red heart", "a cat face", "a slice of pizza"]  # first variants, grouped
    assert res["chance_prompt_retrieval"] == pytest.approx(100 / 3)
    assert res["num_images"] == 6 and res["reference_images"] == 5
    assert res["images"].shape == (6, 3, 16, 16) and res["images"].abs().max() <= 1
    assert res["image_prompt_index"].dtype == torch.long and res["image_prompt_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert 0 <= res["clip_score"] <= 100 and 0 <= res["prompt_retrieval_accuracy"] <= 100 and res["fd_clip"] >= 0
    # limit: the first samples give both the prompts and the reference images
    lim = evaluate_heldout(components, ds, num_images=1, limit=2, **FAST)
    assert lim["prompts"] == ["a red heart", "a cat face"] and lim["reference_images"] == 2
    assert lim["chance_prompt_retrieval"] == 50.0
    with pytest.raises(GenvlError, match="two distinct captions"):
        evaluate_heldout(components, ds, num_images=1, limit=1, **FAST)
    with pytest.raises(GenvlError, match="at least 2"):
        evaluate_heldout(components, ds, num_images=1, max_prompts=1, **FAST)
