"""The accelerate loop: learning, resume, checkpoints, EMA, non-finite stop, finetuning, DDP."""

import json
from pathlib import Path

import pytest
import torch

from genvl.checkpoint import open_model_dir
from genvl.config import apply_overrides
from genvl.errors import TrainingError
from genvl.training import TrainConfig, train
from genvl.training.tasks.clip import CLIPTask
from genvl.training.trainer import find_checkpoint, stage_dir

FAST = ["batch_size=8", "max_steps=12", "warmup_steps=2", "log_every=2", "save_every=4", "tokenizer_vocab=300",
        "text_len=8", "tracker=none"]


def cfg(*extra):
    return apply_overrides(TrainConfig(), FAST + list(extra))


def params(model_dir: Path) -> dict:
    return {k: v.clone() for k, v in open_model_dir(model_dir).load("clip").state_dict().items()}


def test_clip_learns_retrieval_far_above_chance(shapes_dir, tmp_path):
    from genvl.data import open_image_text
    from genvl.evaluation.embeddings import embed_pairs
    from genvl.evaluation.retrieval import retrieval_metrics

    c = apply_overrides(TrainConfig(), ["batch_size=32", "max_steps=300", "lr=3e-3", "warmup_steps=20",
                                        "save_every=0", "tokenizer_vocab=300", "text_len=8", "tracker=none"])
    res = train(CLIPTask(c), shapes_dir, tmp_path / "m", progress=False)
    assert res.step == 300 and res.history[-1]["loss"] < res.history[0]["loss"]
    md = open_model_dir(tmp_path / "m")
    ds = open_image_text(shapes_dir, image_size=32)
    img, txt = embed_pairs(md.load("clip"), md.tokenizer(), ds)
    m = retrieval_metrics(img, txt)
    chance = 100 / len(ds)  # 32 pairs -> 3.1 %
    assert m["image_to_text_R@1"] > chance + 50, m
    assert m["text_to_image_R@1"] > chance + 50, m


def test_run_directory_contents(shapes_dir, tmp_path):
    out = tmp_path / "run"
    res = train(CLIPTask(cfg("ema_decay=0.9")), shapes_dir, out, progress=False)
    assert res.step == 12 and res.samples_seen == 12 * 8
    for f in ("genvl.json", "clip/config.json", "clip/model.safetensors", "tokenizer/tokenizer.json", "README.md",
              "train/clip/config.yaml", "train/clip/log.jsonl", "train/clip/loss.png"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "genvl.json").read_text())
    assert meta["components"] == {"clip": "genvl.models.clip.CLIP"}
    assert meta["training"]["clip"]["steps"] == 12 and meta["training"]["clip"]["pairs"] == 32
    assert "max_steps: 12" in (out / "README.md").read_text()
    rows = [json.loads(x) for x in (out / "train/clip/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    # keep_checkpoints=2: the final one and one periodic one, all complete, no temp folders left
    ckpts = sorted(p.name for p in (out / "train/clip/checkpoints").iterdir())
    assert ckpts == ["step-00000008", "step-00000012"], ckpts
    assert not list(out.rglob("*.pkl")) or all("random_states" in p.name for p in out.rglob("*.pkl"))
    # EMA: released weights are the EMA weights, not the raw ones
    raw = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(out / "train/clip/checkpoints" / "step-00000012" / "model.safetensors"))
    rel = params(out)
    assert any(not torch.equal(raw[k], rel[k]) for k in rel if rel[k].dtype.is_floating_point and rel[k].numel() > 1)


def test_resume_matches_uninterrupted_run(shapes_dir, tmp_path):
    full = train(CLIPTask(cfg("ema_decay=0.9")), shapes_dir, tmp_path / "full", progress=False)
    part = train(CLIPTask(cfg("ema_decay=0.9")), shapes_dir, tmp_path / "cut", progress=False, stop_after=6)
    assert part.stopped_early and not (tmp_path / "cut" / "genvl.json").exists()
    assert find_checkpoint(stage_dir(tmp_path / "cut", "clip"), "latest").name == "step-00000004"
    resumed = train(CLIPTask(cfg("ema_decay=0.9")), shapes_dir, tmp_path / "cut", resume="latest", progress=False)
    assert resumed.step == full.step == 12
    a, b = params(tmp_path / "full"), params(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    # the loss log of the resumed run has no duplicate rows
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "train/clip/log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_resume_with_grad_accum_caption_dropout_across_epochs(shapes_dir, tmp_path):
    # 32 pairs / batch 8 = 4 micro-batches per epoch; accumulation 3 straddles epoch ends.
    extra = ["grad_accum=3", "max_steps=8", "save_every=3", "data.caption_dropout=0.3", "ema_decay=0.9"]
    train(CLIPTask(cfg(*extra)), shapes_dir, tmp_path / "full", progress=False)
    train(CLIPTask(cfg(*extra)), shapes_dir, tmp_path / "cut", progress=False, stop_after=4)
    train(CLIPTask(cfg(*extra)), shapes_dir, tmp_path / "cut", resume="latest", progress=False)
    a, b = params(tmp_path / "full"), params(tmp_path / "cut")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


class NaNAt(CLIPTask):
    def __init__(self, cfg, at):
        super().__init__(cfg)
        self.at, self.calls = at, 0

    def loss(self, model, batch):
        loss, extra = super().loss(model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls == self.at else loss), extra


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(shapes_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 7.*last good checkpoint: .*step-00000004"):
        train(NaNAt(cfg(), at=7), shapes_dir, out, progress=False)
    ck = find_checkpoint(stage_dir(out, "clip"), "latest")
    assert ck.name == "step-00000004" and (ck / "model.safetensors").is_file()
    assert not list((out / "train/clip/checkpoints").glob(".tmp-*"))
    # and the run resumes from it
    res = train(CLIPTask(cfg()), shapes_dir, out, resume="latest", progress=False)
    assert res.step == 12


def test_stages_trained_into_one_directory_keep_their_logs_apart(shapes_dir, tmp_path):
    out = tmp_path / "run"
    train(CLIPTask(cfg()), shapes_dir, out, progress=False)
    clip_log = (out / "train/clip/log.jsonl").read_text()
    train(CLIPTask(cfg("max_steps=4")), shapes_dir, out / "other", init=out, progress=False)
    assert (out / "train/clip/log.jsonl").read_text() == clip_log
    assert sorted(p.name for p in (out / "train/clip/checkpoints").iterdir()) == ["step-00000008", "step-00000012"]


def test_nonfinite_skip_mode_skips_the_batch(shapes_dir, tmp_path):
    res = train(NaNAt(cfg("on_nonfinite=skip"), at=3), shapes_dir, tmp_path / "run", progress=False)
    assert res.step == 12 and res.final_loss == res.final_loss  # finite


def test_skipped_bad_files_are_counted_and_training_finishes(shapes_dir, tmp_path):
    (shapes_dir / "zero.png").write_bytes(b"")
    (shapes_dir / "text.png").write_text("not an image")
    good = (shapes_dir / "red_circle_0.png").read_bytes()
    (shapes_dir / "trunc.png").write_bytes(good[: len(good) // 2])
    with (shapes_dir / "metadata.jsonl").open("a") as f:
        for n in ("zero.png", "text.png", "trunc.png", "missing.png"):
            f.write(json.dumps({"file_name": n, "text": "bad"}) + "\n")
    res = train(CLIPTask(cfg()), shapes_dir, tmp_path / "run", progress=False)
    assert res.skipped_files == 4 and res.step == 12
    assert json.loads((tmp_path / "run" / "genvl.json").read_text())["training"]["clip"]["skipped"] == 4


def test_init_finetunes_from_a_model_directory(shapes_dir, tmp_path):
    train(CLIPTask(cfg()), shapes_dir, tmp_path / "base", progress=False)
    before = params(tmp_path / "base")
    res = train(CLIPTask(cfg("max_steps=3", "lr=1e-2")), shapes_dir, tmp_path / "ft", init=tmp_path / "base",
                progress=False)
    assert res.step == 3
    after = params(tmp_path / "ft")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "ft" / "tokenizer" / "tokenizer.json").read_text() == \
        (tmp_path / "base" / "tokenizer" / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "ft" / "genvl.json").read_text())["training"]["clip"]["init"] == str(tmp_path / "base")


class SamplingTask(CLIPTask):
    """A generative-stage stand-in: writes a 'sample grid' through the trainer's hook."""

    def sample(self, model, path, step):
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (step % 256, 0, 0)).save(path)
        return path


def test_sample_hook_runs_every_n_steps(shapes_dir, tmp_path):
    train(SamplingTask(cfg("sample_every=5")), shapes_dir, tmp_path / "run", progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / "train/clip/samples").glob("*.png"))
    assert names == ["step-00000005.png", "step-00000010.png", "step-00000012.png"]


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_mixed_precision_runs_and_learns(shapes_dir, tmp_path, precision):
    res = train(CLIPTask(cfg(f"mixed_precision={precision}", "max_steps=30", "lr=3e-3")), shapes_dir,
                tmp_path / precision, progress=False)
    losses = [r["loss"] for r in res.history]
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    # released weights are float32 whatever the compute precision
    assert all(v.dtype == torch.float32 for v in params(tmp_path / precision).values() if v.is_floating_point())


def test_siglip_and_soft_losses_train(shapes_dir, tmp_path):
    for loss in ("siglip", "soft"):
        res = train(CLIPTask(cfg(f"model.loss={loss}", "max_steps=20", "lr=3e-3")), shapes_dir, tmp_path / loss,
                    progress=False)
        assert res.history[-1]["loss"] < res.history[0]["loss"], loss
    bias = params(tmp_path / "siglip")["logit_bias"]
    assert bias.item() != -10.0  # the SigLIP bias is learned


def test_lit_frozen_text_encoder_from_a_huggingface_directory(shapes_dir, tmp_path):
    from transformers import BertConfig, BertModel

    from genvl.tokenizers.text import train_text_tokenizer

    tok = train_text_tokenizer([f"a {c} {s}" for c in "red green blue".split() for s in "circle square".split()],
                               vocab_size=300, model_max_length=16)
    enc_dir = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(tok), max_position_embeddings=16)).save_pretrained(enc_dir)
    tok.save_pretrained(str(enc_dir))
    before = {k: v.clone() for k, v in BertModel.from_pretrained(enc_dir).state_dict().items()}
    train(CLIPTask(cfg(f"model.text_encoder={enc_dir}")), shapes_dir, tmp_path / "lit", progress=False)
    clip = open_model_dir(tmp_path / "lit").load("clip")
    after = clip.text.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen
    assert clip.config.text_encoder["model_type"] == "bert"


def test_start_from_a_huggingface_clip_directory(shapes_dir, tmp_path):
    from conftest import save_tiny_hf_clip

    save_tiny_hf_clip(tmp_path / "hf")
    res = train(CLIPTask(cfg(f"model.from_hf={tmp_path / 'hf'}", "max_steps=4")), shapes_dir, tmp_path / "ft",
                progress=False)
    assert res.step == 4
    clip = open_model_dir(tmp_path / "ft").load("clip")
    assert clip.config.embed_dim == 16


def test_tensorboard_logging_when_installed(shapes_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(CLIPTask(cfg("tracker=tensorboard")), shapes_dir, tmp_path / "run", progress=False)
    (events,) = (tmp_path / "run" / "train/clip/tensorboard/clip").glob("events.out.tfevents.*")  # scalars; hparams in a subfolder
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"loss", "lr", "samples_per_s"} <= set(acc.Tags()["scalars"])
    assert [s.step for s in acc.Scalars("loss")] == [2, 4, 6, 8, 10, 12]


def test_wall_clock_budget_fits_the_schedule_and_resume_keeps_it(shapes_dir, tmp_path, monkeypatch):
    """max_seconds: max_steps shrinks to what fits after a few timed steps, the run stops near the
    budget and releases its model; save_minutes checkpoints by time; a resumed run keeps the fitted steps."""
    import time

    from genvl.training import trainer

    real_tick = trainer.BudgetClock.tick
    calls = {"n": 0}

    def slow_tick(self, accelerator, bar):  # every step takes at least 50 ms: about 40 steps fit in 2 s
        time.sleep(0.05)
        calls["n"] += 1
        return real_tick(self, accelerator, bar)

    monkeypatch.setattr(trainer.BudgetClock, "tick", slow_tick)
    c = cfg("max_steps=100000", "max_seconds=2", "save_every=0", "save_minutes=0.005", "keep_checkpoints=5")
    res = train(CLIPTask(c), shapes_dir, tmp_path / "b", progress=False)
    assert not res.stopped_early and 5 <= res.step < 100
    assert res.seconds < 2 + 1.0
    assert (tmp_path / "b" / "clip" / "model.safetensors").is_file()
    state = json.loads((find_checkpoint(stage_dir(tmp_path / "b", "clip"), "latest") / "trainer_state.json").read_text())
    fitted = state["max_steps"]
    assert res.step <= fitted < 100
    # time-based checkpoints: save_minutes=0.3 s, so more than the final one was written on the way
    assert len(list((tmp_path / "b" / "train/clip/checkpoints").glob("step-*"))) >= 2
    log = [json.loads(x) for x in (tmp_path / "b" / "train/clip/log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] < 0.5 * c.lr or res.step < fitted  # the schedule decayed towards its fitted end
    # a run cut off mid-way resumes with the fitted step count, not the recipe's 100000
    c2 = cfg("max_steps=100000", "max_seconds=30", "save_every=3")
    cut = train(CLIPTask(c2), shapes_dir, tmp_path / "r", progress=False, stop_after=12)
    assert cut.stopped_early
    st = json.loads((find_checkpoint(stage_dir(tmp_path / "r", "clip"), "latest") / "trainer_state.json").read_text())
    assert st["step"] == 12 and st["max_steps"] < 100000
    c3 = cfg("max_steps=100000", "max_seconds=30", "save_every=3")
    c3.max_steps = 100000
    resumed = CLIPTask(c3)
    res2 = train(resumed, shapes_dir, tmp_path / "r", resume="latest", progress=False, stop_after=13)
    assert resumed.cfg.max_steps == st["max_steps"] and res2.step == 13


def test_budget_refits_when_the_speed_drops(shapes_dir, tmp_path, monkeypatch):
    """Steps that become 4x slower half-way (another process on the machine) shrink the fitted
    schedule again, so the run still ends its schedule within the budget."""
    import time

    from genvl.training import trainer

    real_tick = trainer.BudgetClock.tick

    def tick(self, accelerator, bar):
        time.sleep(0.02 if self.state["step"] < 20 else 0.08)
        return real_tick(self, accelerator, bar)

    monkeypatch.setattr(trainer.BudgetClock, "tick", tick)
    monkeypatch.setattr(trainer.BudgetClock, "REFIT_MIN_SECONDS", 0.3)
    fits = []
    real_fit = trainer.BudgetClock._fit

    def spy(self, accelerator, bar, now):
        real_fit(self, accelerator, bar, now)
        fits.append(self.cfg.max_steps)

    monkeypatch.setattr(trainer.BudgetClock, "_fit", spy)
    c = cfg("max_steps=100000", "max_seconds=4", "save_every=0")
    res = train(CLIPTask(c), shapes_dir, tmp_path / "s", progress=False)
    assert len(fits) >= 2 and min(fits[1:]) < 0.7 * fits[0], fits  # the first fit assumed the fast steps
    assert res.seconds < 4 + 1.0 and res.step >= 0.8 * c.max_steps  # ran (nearly) to its refitted end


def test_first_phase_fits_its_module_alone_and_repeats_under_a_seed():
    """A Phase trains only its module's parameters, by the trainer's optimizer, the same way twice."""
    from genvl.training.trainer import Phase, run_phase

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.randn(4, 2, generator=g)

    def fit(seed):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
        frozen = model[1].weight.detach().clone()
        seen = []
        phase = Phase("fit", model[0], (x, y), lambda m, xb, yb: (model[1](m(xb)) - yb).pow(2).mean(), steps=200,
                      lr=3e-2, batch_size=16, done=lambda: seen.append(True))
        before = (model(x) - y).pow(2).mean().item()
        run_phase(phase, seed)
        assert seen == [True] and torch.equal(model[1].weight, frozen)
        return before, (model(x) - y).pow(2).mean().item(), model[0].weight.detach().clone()

    before, after, w = fit(0)
    assert after < 0.5 * before
    assert torch.equal(fit(0)[2], w) and not torch.equal(fit(1)[2], w)


def test_trackers_accelerate_supports_and_a_missing_package_fails_in_one_line(monkeypatch):
    """tracker= takes accelerate's tracker names; a named one whose package is missing is an error that
    says what to install, before anything trains; a misspelled one fails as the recipe is read."""
    import importlib.util

    from genvl.errors import ConfigError
    from genvl.training.config import TRACKERS
    from genvl.training.run_dir import tracker_name

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(TRACKERS) <= set(LOGGER_TYPE_TO_CLASS)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    with pytest.raises(TrainingError, match="tracker 'wandb' asked for but the wandb package is not installed"):
        tracker_name(cfg("tracker=wandb"))
    assert tracker_name(cfg("tracker=auto")) is None and tracker_name(cfg("tracker=none")) is None
    with pytest.raises(ConfigError, match="tracker must be auto, none or one of tensorboard, wandb"):
        cfg("tracker=wandbb").validate()
