"""``genvl train t2i``: the one command from a captioned folder to a text-to-image model directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genvl.errors import GenvlError
from genvl.training import t2i as t2i_mod
from genvl.training.t2i import Plan, T2IOptions, caption_separation, run_t2i

from conftest import write_shapes_folder

# Tiny models for every stage: the planned recipes with CPU-test sizes.
TINY = {
    "clip": {"model": {"size": "tiny", "embed_dim": 32, "vision": {"hidden_size": 32, "intermediate_size": 64,
                                                                    "num_hidden_layers": 1, "num_attention_heads": 2,
                                                                    "patch_size": 8},
                       "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2}},
             "tokenizer_vocab": 300},
    "prior": {"model": {"size": "tiny", "num_layers": 1, "num_heads": 2, "head_dim": 16}},
    "decoder": {"model": {"size": "tiny"}},
}


def _opts(data: Path, out: Path, **kw) -> T2IOptions:
    kw.setdefault("overrides", TINY)
    kw.setdefault("size", 16)
    return T2IOptions(data=str(data), out=str(out), **kw)


def _sample(out: Path):
    from genvl.sampling.unclip import UnclipComponents, text_to_image

    comps = UnclipComponents.from_model_dir(out)
    return text_to_image(comps, ["a red circle"], num_images=2, steps=2, prior_steps=2, seed=0).images


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory) -> Path:
    return write_shapes_folder(tmp_path_factory.mktemp("t2i") / "shapes", n_per_pair=2, size=16)


@pytest.fixture(scope="module")
def scratch_run(shapes16, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("t2i-out") / "model"
    t0 = time.perf_counter()
    run_t2i(_opts(shapes16, out, init="scratch", budget_s=16.0), progress=False)
    return out, time.perf_counter() - t0


def test_scratch_run_honours_the_budget_and_samples(scratch_run, shapes16):
    out, wall = scratch_run
    plan = Plan.load(out / "train" / "t2i" / "plan.json")
    assert plan.finished and [s.stage for s in plan.stages] == ["clip", "prior", "decoder"]
    for s in plan.stages:
        assert s.done and s.steps >= 1
        # each stage stopped at its share of the budget (its loop time within a step or two of it)
        assert s.seconds <= s.config["max_seconds"] + 3.0, (s.stage, s.seconds, s.config["max_seconds"])
    # the decoder could have run 400 epochs; the budget cut it short
    dec = plan.stages[2]
    assert dec.steps < dec.config["max_steps"] or dec.steps < 400 * 64 // dec.config["batch_size"]
    assert sum(s.config["max_seconds"] for s in plan.stages) <= 16.0 - t2i_mod.final_reserve_s(16.0)
    # kept for the grid, held-out metrics and card: 6% of the budget, at least 45 s, at most a quarter
    assert [t2i_mod.final_reserve_s(b) for b in (16.0, 180.0, 1080.0, 3600.0)] == [4.0, 45.0, 64.8, 216.0]
    assert wall < 16.0 * 4  # set-up, releases and the final grid on top of the loops (slow CI machines)
    images = _sample(out)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    card = (out / "README.md").read_text()
    assert "from scratch" in card and str(shapes16) in card and "genvl train t2i" in card
    assert (out / "samples.png").is_file() and "(samples.png)" in card
    meta = json.loads((out / "genvl.json").read_text())
    assert set(meta["components"]) == {"clip", "prior", "decoder"}
    assert meta["t2i"]["pairs"] == 64 and meta["t2i"]["distinct_captions"] == 32
    assert meta["sampling"]["steps"] == t2i_mod.RECOMMENDED["steps"]


def test_rerun_of_a_finished_or_different_run_is_refused(scratch_run, shapes16):
    out, _ = scratch_run
    with pytest.raises(GenvlError, match="finished"):
        run_t2i(_opts(shapes16, out, init="scratch", budget_s=16.0), progress=False)
    with pytest.raises(GenvlError, match="other settings.*budget_s"):
        run_t2i(_opts(shapes16, out, init="scratch", budget_s=30.0), progress=False)


def _quick_base(model: Path, root: Path) -> Path:
    """A copy of ``model`` whose recommended sampling takes 2 steps (runs from it inherit that: fast grids)."""
    import shutil

    base = root / "base"
    shutil.copytree(model, base, ignore=shutil.ignore_patterns("train"))
    meta = json.loads((base / "genvl.json").read_text())
    meta["sampling"] = {"steps": 2, "prior_steps": 2}
    (base / "genvl.json").write_text(json.dumps(meta))
    return base


def test_base_model_kept_or_finetuned_by_measured_separation(scratch_run, shapes16, tmp_path, monkeypatch):
    base = _quick_base(scratch_run[0], tmp_path)
    # keep: the base CLIP is declared good enough; the prior and decoder are finetuned with LoRA
    monkeypatch.setattr(t2i_mod, "SEPARATION_KEEP", -1.0)
    keep = tmp_path / "keep"
    run_t2i(_opts(shapes16, keep, init=str(base), budget_s=10.0, lora_rank=2, size=None,
                  overrides={k: v for k, v in TINY.items() if k != "clip"}), progress=False)
    plan = Plan.load(keep / "train" / "t2i" / "plan.json")
    assert [s.stage for s in plan.stages] == ["prior", "decoder"]
    assert all(s.config["lora_rank"] == 2 for s in plan.stages)
    assert (keep / "decoder" / "lora.safetensors").is_file() and (keep / "clip" / "ref.json").is_file()
    assert _sample(keep).shape == (2, 3, 16, 16)
    # finetune: no separation is good enough; the CLIP is finetuned first, then prior (restat) and decoder
    monkeypatch.setattr(t2i_mod, "SEPARATION_KEEP", 101.0)
    tune = tmp_path / "tune"
    run_t2i(_opts(shapes16, tune, init=str(base), budget_s=10.0, lora_rank=2, size=None,
                  overrides={"prior": {"max_steps": 3}, "decoder": {"max_steps": 3}}), progress=False)
    plan = Plan.load(tune / "train" / "t2i" / "plan.json")
    assert [s.stage for s in plan.stages] == ["clip", "prior", "decoder"]
    assert plan.stages[0].init == str(base.resolve()) or Path(plan.stages[0].init).resolve() == base.resolve()
    assert plan.stages[1].config["model"].get("restat") is True
    assert all(s.config["lora_rank"] == 0 for s in plan.stages)  # the space moved: no LoRA
    assert plan.separation is not None and 0 <= plan.separation["accuracy"] <= 100
    assert not (tune / "clip" / "ref.json").exists()  # its own finetuned CLIP
    card = (tune / "README.md").read_text()
    assert str(base) in card and plan.base_hash in card
    assert _sample(tune).shape == (2, 3, 16, 16)


def test_superres_stage_new_then_finetuned_and_a_base_upsampler_not_asked_for_is_dropped(
        scratch_run, shapes16, tmp_path, monkeypatch):
    base = _quick_base(scratch_run[0], tmp_path)
    monkeypatch.setattr(t2i_mod, "SEPARATION_KEEP", -1.0)  # keep the base CLIP: prior, decoder (and sr) only
    quick = {"prior": {"max_steps": 2}, "decoder": {"max_steps": 2}}
    with_sr = tmp_path / "with-sr"
    run_t2i(_opts(shapes16, with_sr, init=str(base), budget_s=10.0, size=None, superres=32,
                  overrides={**quick, "sr": {"model": {"size": "tiny"}, "max_steps": 3}}), progress=False)
    plan = Plan.load(with_sr / "train" / "t2i" / "plan.json")
    assert [s.stage for s in plan.stages] == ["prior", "decoder", "sr"]
    sr = plan.stages[2]
    assert sr.config["data"]["image_size"] == 32 and sr.config["model"]["low_res_size"] == 16
    assert sr.config["model"]["train_crop"] == 16 and "new 16 -> 32 px" in sr.why and sr.steps == 3
    assert _sample(with_sr).shape == (2, 3, 32, 32)  # the model now samples through its upsampler
    from PIL import Image

    with Image.open(with_sr / "samples.png") as im:
        assert im.size[1] > 32 * 2  # rows of 32 px cells
    first = (with_sr / "sr" / "model.safetensors").read_bytes()
    # from that model: its upsampler is finetuned when asked for, dropped when not
    again = tmp_path / "again"
    run_t2i(_opts(shapes16, again, init=str(with_sr), budget_s=10.0, size=None, superres=32,
                  overrides={**quick, "sr": {"max_steps": 2}}), progress=False)
    plan = Plan.load(again / "train" / "t2i" / "plan.json")
    assert "finetuned" in plan.stages[-1].why and "size" not in plan.stages[-1].config["model"]
    assert (again / "sr" / "model.safetensors").read_bytes() != first and _sample(again).shape[-1] == 32
    plain = tmp_path / "plain"
    run_t2i(_opts(shapes16, plain, init=str(with_sr), budget_s=10.0, size=None, overrides=quick), progress=False)
    meta = json.loads((plain / "genvl.json").read_text())
    assert "sr" not in meta["components"] and not (plain / "sr").exists()
    assert _sample(plain).shape[-1] == 16
    with pytest.raises(GenvlError, match="--superres 24"):
        run_t2i(_opts(shapes16, tmp_path / "bad", init="scratch", budget_s=10.0, superres=24), progress=False)


_CHILD = """
import sys, json
from genvl.training.t2i import T2IOptions, run_t2i
from genvl.training.trainer import BudgetClock
BudgetClock.FIT_AFTER = 10**9  # keep max_steps as set: the parent shortens the resumed stage
opts = T2IOptions(**json.loads(sys.argv[1]))
run_t2i(opts, progress=False)
"""


def test_resume_after_sigkill_in_the_second_stage(shapes16, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    over = {"clip": {**TINY["clip"], "max_steps": 10},
            "prior": {**TINY["prior"], "max_steps": 100000, "save_every": 3},
            "decoder": {**TINY["decoder"], "max_steps": 4}}
    opts = _opts(shapes16, out, init="scratch", budget_s=600.0, overrides=over)
    from dataclasses import asdict

    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(asdict(opts))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpts = out / "train" / "prior" / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpts.is_dir() and any((p / "trainer_state.json").is_file() for p in ckpts.glob("step-*")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    plan = Plan.load(out / "train" / "t2i" / "plan.json")
    assert plan.stages[0].done and not plan.stages[1].done and plan.stages[1].started
    clip_weights = out / "clip" / "model.safetensors"
    mtime = clip_weights.stat().st_mtime_ns
    killed_at = max(json.loads((p / "trainer_state.json").read_text())["step"]
                    for p in ckpts.glob("step-*") if (p / "trainer_state.json").is_file())

    # the rerun (same options) resumes the prior from its checkpoint; the CLIP stage is not redone
    from genvl.training import trainer

    monkeypatch.setattr(trainer.BudgetClock, "FIT_AFTER", 10**9)

    seen = {}
    real_train = trainer.train

    def spy(task, *a, **kw):
        seen.setdefault(task.stage, kw.get("resume"))
        if task.stage == "prior":  # end the long prior soon after resuming
            kw["stop_after"] = None
            task.cfg.max_steps = killed_at + 3
        return real_train(task, *a, **kw)

    import genvl.training.trainer as tr_mod

    orig = tr_mod.train
    tr_mod.train = spy
    try:
        run_t2i(opts, progress=False)
    finally:
        tr_mod.train = orig
    assert "clip" not in seen and seen["prior"] == "latest" and seen["decoder"] is None
    assert clip_weights.stat().st_mtime_ns == mtime
    plan = Plan.load(out / "train" / "t2i" / "plan.json")
    assert plan.finished and plan.stages[1].steps == killed_at + 3
    assert _sample(out).shape == (2, 3, 16, 16)


class _FakeClip(torch.nn.Module):
    """Embeds images by their mean colour channel and texts by a lookup: a known answer."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, px):
        return torch.nn.functional.normalize(px.mean((2, 3)), dim=-1)

    def encode_text(self, ids, mask):
        class T:
            pass

        t = T()
        t.embeds = torch.nn.functional.normalize(ids[:, :3].float(), dim=-1)
        return t


def test_caption_separation_groups_identical_captions(monkeypatch):
    # three captions over six images: each image's mean colour points at its own caption's embedding
    px = {"red": torch.tensor([1.0, 0, 0]), "green": torch.tensor([0, 1.0, 0]), "blue": torch.tensor([0, 0, 1.0])}
    items = [{"pixel_values": px[c].view(3, 1, 1).expand(3, 4, 4), "text": c} for c in
             ("red", "red", "green", "green", "blue", "blue")]

    class DS(list):
        def text(self, i):
            return self[i]["text"]

    def fake_encode(tok, texts):
        ids = torch.stack([px[t] for t in texts]).long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    monkeypatch.setattr("genvl.tokenizers.text.encode_texts", fake_encode)
    r = caption_separation(_FakeClip(), None, DS(items))
    assert r == {"accuracy": 100.0, "chance": pytest.approx(100 / 3), "images": 6, "captions": 3}
    # a CLIP that sees every image as red gets exactly the red third right
    items2 = DS([{**it, "pixel_values": px["red"].view(3, 1, 1).expand(3, 4, 4)} for it in items])
    assert caption_separation(_FakeClip(), None, items2)["accuracy"] == pytest.approx(100 / 3)


def test_cli_t2i_options(tmp_path, shapes16, capsys):
    from genvl.cli import main

    assert main(["train", "decoder", "--data", str(shapes16), "--out", str(tmp_path / "x"), "--budget", "5m"]) == 2
    assert "option of genvl train t2i" in capsys.readouterr().err
    assert main(["train", "t2i", "--data", str(shapes16), "--out", str(tmp_path / "y"), "--budget", "soon"]) == 2
    assert "--budget 'soon'" in capsys.readouterr().err
    assert main(["train", "t2i", "--data", str(shapes16), "--out", str(tmp_path / "y"), "--set", "lr=1"]) == 2
    assert "drop --config" in capsys.readouterr().err
    assert main(["train", "t2i", "--data", str(shapes16), "--out", str(tmp_path / "y"), "--clip", "keep",
                 "--init", "scratch"]) == 2
    assert "needs a base model" in capsys.readouterr().err
    from genvl.checkpoint import BUILTIN

    if (BUILTIN["demo"] / "genvl.json").is_file():  # the measured recommendation: from the demo, at its size
        assert t2i_mod.default_init(None) == "demo" and t2i_mod.default_init(32) == "demo"
        assert t2i_mod.default_init(64) == "scratch"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(GenvlError, match="not a genvl model"):
        run_t2i(_opts(shapes16, precious, init="scratch", budget_s=10.0), progress=False, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    from genvl.cli import parse_budget

    assert parse_budget("45m") == 2700 and parse_budget("1h30m") == 5400 and parse_budget("90s") == 90
    assert parse_budget("600") == 600
