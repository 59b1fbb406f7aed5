"""The lm stage: orders and dropout, target-only loss, overfitting, the trainer end to end."""

import json

import pytest
import torch

from genvl.checkpoint import open_model_dir, save_model_dir
from genvl.cli import main
from genvl.config import apply_overrides
from genvl.errors import ConfigError, ModelDirError
from genvl.models.lm import TokenLayout, TokenLM, lm_config
from genvl.sampling.autoregressive import generate_caption_ids, generate_image_codes
from genvl.training import TrainConfig, train
from genvl.training.tasks import get_task
from genvl.training.tasks.lm import LMTask, cond_dropped, lm_loss, t2i_order
from stub_vq import StubVQ, StubVQConfig, tiny_tokenizer

FAST = ["batch_size=8", "max_steps=3", "warmup_steps=1", "log_every=1", "save_every=0", "tokenizer_vocab=300",
        "text_len=8", "tracker=none", "data.image_size=32"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


def test_stage_registry_knows_lm():
    assert isinstance(get_task("lm", cfg()), LMTask)


def test_orders_and_caption_drop_are_deterministic_and_mixed():
    orders = [t2i_order(0.5, 0, 3, i) for i in range(32)]
    assert orders == [t2i_order(0.5, 0, 3, i) for i in range(32)]  # a pure function of (seed, epoch, index)
    assert 0 < sum(orders) < 32  # both orders in a batch of 32
    assert orders != [t2i_order(0.5, 0, 4, i) for i in range(32)]  # fresh every epoch
    assert all(t2i_order(1.0, 0, 0, i) for i in range(10)) and not any(t2i_order(0.0, 0, 0, i) for i in range(10))
    rate = sum(cond_dropped(0.1, 0, 0, i) for i in range(5000)) / 5000
    assert 0.08 < rate < 0.12


def test_loss_counts_only_target_tokens():
    lay = TokenLayout(text_vocab_size=300, codebook_size=8, image_tokens=4)
    b = lay.build_batch([[10, 11], [12, 13, 14]], torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), [True, False])
    logits = torch.randn(2, b.input_ids.shape[1], lay.vocab_size)
    loss, img, txt = lm_loss(logits, b.input_ids, b.image_targets, b.text_targets)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b.input_ids[:, 1:], reduction="none")
    assert torch.allclose(img, ce[0, 3:8].mean()) and torch.allclose(txt, ce[1, 6:10].mean())
    assert torch.allclose(loss, torch.cat([ce[0, 3:8], ce[1, 6:10]]).mean())
    # logits at prompt and padding positions do not matter
    changed = logits.clone()
    changed[0, :3] += 5.0
    changed[0, 8:] -= 7.0
    changed[1, :6] *= 3.0
    assert torch.allclose(lm_loss(changed, b.input_ids, b.image_targets, b.text_targets)[0], loss)
    w, _, _ = lm_loss(logits, b.input_ids, b.image_targets, b.text_targets, caption_weight=0.0)
    assert torch.allclose(w, img)


def test_overfit_regenerates_codes_and_captions():
    """A tiny LM trained on 4 caption / code pairs (both orders) draws each caption's codes and names each image."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow cross"]
    codes = torch.randint(0, 27, (4, 16), generator=torch.Generator().manual_seed(1))  # hand-made code grids
    lm = TokenLM(lm_config("tiny", text_vocab_size=len(tok), codebook_size=27, image_tokens=16, text_len=8,
                           hidden_size=64, intermediate_size=128))
    lay = lm.layout
    text = [tok(c, add_special_tokens=False)["input_ids"] for c in captions]
    batch = lay.build_batch(text + text, torch.cat([codes, codes]), [True] * 4 + [False] * 4)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
    lm.train()
    for _ in range(250):
        logits = lm(batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, img, txt = lm_loss(logits, batch.input_ids, batch.image_targets, batch.text_targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert img.item() < 0.05 and txt.item() < 0.05, (img.item(), txt.item())
    lm.eval()
    got = generate_image_codes(lm, lay, text, guidance=1.0, temperature=0.0)
    assert torch.equal(got, codes)
    ids = generate_caption_ids(lm, lay, codes, max_new_tokens=10)
    assert [tok.decode(i) .strip() for i in ids] == captions


@pytest.fixture
def stub_init(tmp_path):
    """A model directory with only a vqvae component (no tokenizer): what `genvl train lm --init` needs."""
    d = tmp_path / "vq_model"
    save_model_dir(d, {"vqvae": StubVQ(StubVQConfig(image_size=32, latent_size=4, codebook_size=27))})
    return d


def test_lm_trains_end_to_end_and_samples(shapes_dir, stub_init, tmp_path, capsys):
    out = tmp_path / "run"
    c = cfg("model.t2i_fraction=0.5", "model.cond_drop=0.25", "max_steps=4")
    res = train(LMTask(c), shapes_dir, out, init=stub_init, progress=False)
    capsys.readouterr()
    assert res.step == 4
    for f in ("lm/config.json", "lm/model.safetensors", "vqvae/config.json", "tokenizer/tokenizer.json", "genvl.json",
              "README.md", "train/lm/log.jsonl", "train/lm/samples/step-00000004.png", "train/lm/samples/step-00000004.txt"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "genvl.json").read_text())
    assert meta["components"] == {"vqvae": "stub_vq.StubVQ", "lm": "genvl.models.lm.TokenLM"}
    rows = res.history
    assert all({"image_loss", "text_loss", "t2i_frac"} <= set(r) for r in rows)
    assert any(0 < r["t2i_frac"] < 1 for r in rows)
    md = open_model_dir(out)
    lm, _, tok = md.load("lm"), md.load("vqvae"), md.tokenizer()
    assert lm.layout == TokenLayout.from_tokenizer(tok, 27, 16) and lm.config.text_len == 8
    # the CLI samples and captions from the released directory
    assert main(["sample", "--method", "ar", "a red circle", "--model", str(out), "--out", str(tmp_path / "s"),
                 "--num-images", "2", "--no-progress"]) == 0
    assert len(capsys.readouterr().out.split()) == 2
    img = next((shapes_dir).glob("*.png"))
    assert main(["caption", str(img), "--model", str(out)]) == 0
    line = capsys.readouterr().out.rstrip("\n")
    assert line.startswith(f"{img}\t")
    # finetuning: --init holding an lm continues from it (same vocabulary, the tokenizer kept)
    ft = train(LMTask(cfg("max_steps=1")), shapes_dir, tmp_path / "ft", init=out, progress=False)
    assert ft.model.config == lm.config
    assert (tmp_path / "ft" / "tokenizer" / "tokenizer.json").read_text() == (out / "tokenizer" / "tokenizer.json").read_text()


def test_lm_stage_errors(shapes_dir, stub_init, tmp_path):
    with pytest.raises(ModelDirError, match="needs --init"):
        train(LMTask(cfg()), shapes_dir, tmp_path / "a", progress=False)
    no_vq = tmp_path / "no_vq"
    save_model_dir(no_vq, {"lm": TokenLM(lm_config("tiny"))}, tokenizer=tiny_tokenizer())
    with pytest.raises(ModelDirError, match="no vqvae component"):
        train(LMTask(cfg()), shapes_dir, tmp_path / "b", init=no_vq, progress=False)
    with pytest.raises(ConfigError, match="image_size"):
        train(LMTask(cfg("data.image_size=16")), shapes_dir, tmp_path / "c", init=stub_init, progress=False)
    for bad, needle in (("model.t2i_fraction=1.5", "t2i_fraction"), ("model.cond_drop=-0.1", "cond_drop"),
                        ("model.codebook_size=5", "fixed by the tokenizer"), ("model.size=huge", "unknown lm size")):
        with pytest.raises(ConfigError, match=needle):
            train(LMTask(cfg(bad)), shapes_dir, tmp_path / "d", init=stub_init, progress=False)


def test_lm_trains_on_the_real_vqvae(shapes_dir, tmp_path, capsys):
    vqvae = pytest.importorskip("genvl.tokenizers.vqvae")
    if not hasattr(vqvae, "VQVAE") or not hasattr(vqvae, "vqvae_config"):
        pytest.skip("the VQ-VAE is not complete yet")
    torch.manual_seed(0)
    init = tmp_path / "vq"
    save_model_dir(init, {"vqvae": vqvae.VQVAE(vqvae.vqvae_config("tiny", image_size=32))},
                   tokenizer=tiny_tokenizer(max_len=8))
    out = tmp_path / "run"
    res = train(LMTask(cfg("max_steps=2")), shapes_dir, out, init=init, progress=False)
    capsys.readouterr()
    assert res.step == 2 and (out / "lm" / "model.safetensors").is_file()
    vq = open_model_dir(out).load("vqvae")
    lm = open_model_dir(out).load("lm")
    assert lm.config.codebook_size == vq.config.codebook_size and lm.config.image_tokens == vq.tokens_per_image
    target = tmp_path / "one.png"
    assert main(["sample", "--method", "ar", "a red circle", "--model", str(out), "--out", str(target),
                 "--num-images", "1", "--seed", "3", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert main(["caption", str(target), "--model", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{target}\t")


def test_lm_trains_from_a_tokenized_set(shapes_dir, tmp_path, capsys):
    """genvl data tokenize -> genvl train lm --data codes.safetensors: same batches without the encoder."""
    from genvl.data import open_image_text
    from genvl.data.tokenized import TokenizedDataset
    from genvl.errors import TrainingError
    from genvl.tokenizers.vqvae import VQVAE, vqvae_config
    from genvl.training.tasks.clip import CLIPTask

    torch.manual_seed(0)
    init = tmp_path / "vq"
    save_model_dir(init, {"vqvae": VQVAE(vqvae_config("tiny", image_size=32))}, tokenizer=tiny_tokenizer(max_len=8))
    codes = tmp_path / "codes.safetensors"
    assert main(["data", "tokenize", str(shapes_dir), "--model", str(init), "--out", str(codes)]) == 0
    capsys.readouterr()
    ds = TokenizedDataset(codes)
    images = open_image_text(shapes_dir, image_size=32)
    vq = open_model_dir(init).load("vqvae")
    assert len(ds) == len(images) and ds.captions == images.captions
    assert torch.equal(ds[3]["codes"], vq.encode(images[3]["pixel_values"][None])[0])

    task = LMTask(cfg("max_steps=2"))
    res = train(task, codes, tmp_path / "run", init=init, progress=False)
    assert res.step == 2 and (tmp_path / "run" / "lm" / "model.safetensors").is_file()
    # a batch from codes equals the batch the image path builds
    batch = task.collate([ds[i] for i in range(4)])
    assert torch.equal(batch["codes"], vq.encode(torch.stack([images[i]["pixel_values"] for i in range(4)])))

    with pytest.raises(TrainingError, match="needs images"):
        train(CLIPTask(cfg()), codes, tmp_path / "clip", progress=False)
    other = tmp_path / "vq2"  # codes of other weights are refused, with the fix named
    vq2 = VQVAE(vqvae_config("tiny", image_size=32))
    with torch.no_grad():
        next(vq2.parameters()).add_(0.01)
    save_model_dir(other, {"vqvae": vq2}, tokenizer=tiny_tokenizer(max_len=8))
    with pytest.raises(ConfigError, match="genvl data tokenize"):
        train(LMTask(cfg("max_steps=1")), codes, tmp_path / "run2", init=other, progress=False)
