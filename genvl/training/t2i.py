"""``genvl train t2i``: one command from a captioned folder to a text-to-image model directory.

It plans the stages a user would otherwise chain by hand (``clip`` -> ``prior`` -> ``decoder``), each
on the embedding space it will be sampled with, sizes each stage's recipe from the data and a wall-clock
budget, runs them through the one trainer (:func:`genvl.training.trainer.train`) with one progress bar
over all of them, resumes at the stage and step where a run was cut off, and finishes with sample
grids, held-out metrics and a model card that describes this model.

What gets trained:

- ``--init scratch``: a text tokenizer and a CLIP core on the data, then a new prior and decoder.
- ``--superres N`` (either way): then a super-resolution stage from the decoder's size to ``N`` px,
  trained on random crops of the data's images (a base's upsampler of the same sizes is finetuned;
  otherwise a new one is built, as the base's would be trained on another domain).
- ``--init DIR`` (``demo`` = the built-in model): the base CLIP's embedding is first measured on the
  data (:func:`caption_separation`: for how many training images is their own caption the nearest of
  the distinct captions). When it separates them (>= :data:`SEPARATION_KEEP`), the CLIP stays frozen and
  the prior and decoder are finetuned (LoRA with ``--lora-rank``); otherwise the CLIP is finetuned
  first, then the prior (its embedding statistics measured anew) and the decoder are finetuned on
  the new space (LoRA does not apply: the conditioning space moved).

Without ``--init`` the command starts from the demo (:func:`default_init`): at an equal budget it
measured better than from scratch on the README's real set. Recipes: :func:`plan_stages` (measured
choices are documented in the README's comparison table).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from genvl.errors import GenvlError

PLAN_NAME = "plan.json"
SEPARATION_KEEP = 50.0  # % of training images whose own caption must be the base CLIP's nearest to keep it
SEPARATION_IMAGES = 512  # training images the separation is measured on
FINAL_RESERVE = 0.06  # share of the budget kept for the sample grid, held-out metrics and the card
FINAL_RESERVE_MIN_S = 45.0  # ... but at least this (their cost hardly depends on the budget), up to a quarter


def final_reserve_s(budget_s: float) -> float:
    """Seconds of the budget kept for what follows the stages (grid, held-out metrics, card): 6%, at
    least 45 s (a 3-minute run spent about 40 s there), at most a quarter of the budget."""
    return min(max(FINAL_RESERVE * budget_s, FINAL_RESERVE_MIN_S), 0.25 * budget_s)


UNCLIP_PARTS = ("clip", "prior", "decoder")
#: Component folders a model directory may hold.
COMPONENT_DIRS = {"clip", "prior", "decoder", "sr", "vqvae", "lm", "interleaved"}
#: What a model directory written by genvl holds (--overwrite replaces nothing else).
MODEL_DIR_ENTRIES = {"genvl.json", "README.md", "samples.png", "tokenizer", "train", "clip", "prior", "decoder",
                     "sr", "vqvae", "lm", "interleaved"}
SAMPLES_PER_PROMPT = 6  # images per caption in the card's sample grid (up to 10 captions)

# The new-model sizes (CPU-sized; measured in the README's table). Model keys are the stages' recipe keys.
CLIP_MODEL = {"size": "tiny", "loss": "infonce", "embed_dim": 64,
              "vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "patch_size": 8},
              "text": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}}
PRIOR_MODEL = {"size": "tiny", "num_layers": 6, "num_heads": 4, "head_dim": 32}
DECODER_MODEL = {"size": "small", "block_out_channels": [32, 64, 128], "cond_drop": 0.1}
SR_MODEL = {"size": "small"}  # low_res_size and train_crop (half the output size) are set from the sizes

#: Budget shares of the stages (of what is left when the stage starts, among the stages still to run).
SHARES = {"clip": 0.08, "prior": 0.12, "decoder": 0.80, "sr": 0.25}
#: Epoch caps: a stage that reaches its cap early hands its time on to the next one.
MAX_EPOCHS = {"clip": 40, "prior": 60, "decoder": 400, "sr": 100}


@dataclass
class T2IOptions:
    """What ``genvl train t2i`` was asked to do (stored in the plan; a rerun must ask the same to resume)."""

    data: str
    out: str
    init: str = "scratch"  # scratch | demo | a model directory
    budget_s: float = 45 * 60.0
    lora_rank: int = 0
    size: int | None = None  # image size of a new decoder (default: the base's, else 32)
    superres: int | None = None  # output size of a super-resolution stage after the decoder (None: none)
    heldout: str | None = None  # a captioned folder for the final metrics
    seed: int = 0
    clip: str = "auto"  # with a base: auto (measure) | keep | finetune
    # stage -> recipe keys laid over the planned ones (nested dicts merge), e.g.
    # {"decoder": {"model": {"size": "tiny"}}}: for experiments and tests; the CLI sets none
    overrides: dict = field(default_factory=dict)

    def same_run(self, other: dict) -> list[str]:
        """Names of the options that differ from a stored plan's."""
        mine = asdict(self)
        return [k for k in ("data", "init", "budget_s", "lora_rank", "size", "superres", "seed", "clip", "overrides")
                if other.get(k) != mine.get(k)]


@dataclass
class StagePlan:
    stage: str
    init: str | None  # --init of the stage (None: from scratch)
    config: dict  # TrainConfig as a dict (max_seconds filled in when the stage starts)
    share: float
    why: str = ""
    done: bool = False
    started: bool = False
    seconds: float = 0.0
    steps: int = 0
    final_loss: float | None = None


@dataclass
class Plan:
    options: dict
    stages: list[StagePlan]
    base: str | None = None  # the base model directory (resolved), None from scratch
    base_hash: str | None = None
    separation: dict | None = None  # the base CLIP measured on the data
    data_summary: dict = field(default_factory=dict)
    elapsed: float = 0.0  # seconds spent by finished stages and the set-up (all runs)
    finished: bool = False

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Plan":
        d = json.loads(path.read_text())
        d["stages"] = [StagePlan(**s) for s in d["stages"]]
        return cls(**d)


def default_init(size: int | None) -> str:
    """``--init`` when none is given: the built-in demo, as the README's comparison recommends (at an
    equal 18-minute budget it beat training from scratch on every held-out figure), unless ``size``
    asks for another size than its decoder's (or this install has no demo): then ``scratch``."""
    from genvl.checkpoint import BUILTIN

    config = BUILTIN["demo"] / "decoder" / "config.json"
    if not config.is_file():
        return "scratch"
    return "demo" if size in (None, json.loads(config.read_text())["image_size"]) else "scratch"


# ------------------------------------------------------------------------------------------ measuring
@torch.no_grad()
def caption_separation(clip, tokenizer, dataset, max_images: int = SEPARATION_IMAGES, max_captions: int = 512) -> dict:
    """How well a CLIP's embedding tells the dataset's captions apart.

    For up to ``max_images`` images spread over the dataset: is the image's own caption the nearest
    (cosine) of the distinct captions among them? Identical captions are one candidate, so a set of
    10 captions over many images measures 10-way retrieval.

    Returns:
        ``{"accuracy": %, "chance": %, "images": n, "captions": distinct}``.
    """
    from genvl.tokenizers.text import encode_texts

    n = len(dataset)
    idx = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique().tolist()
    texts = [dataset.text(i) if hasattr(dataset, "text") else dataset[i]["text"] for i in idx]
    distinct = sorted(set(texts))[:max_captions]
    keep = [j for j, t in enumerate(texts) if t in set(distinct)]
    where = {t: k for k, t in enumerate(distinct)}
    device = next(clip.parameters()).device
    z_img = []
    for start in range(0, len(keep), 64):
        px = torch.stack([dataset[idx[j]]["pixel_values"] for j in keep[start:start + 64]])
        z_img.append(clip.encode_image(px.to(device)).float())
    z_img = torch.cat(z_img)  # (n, D)
    enc = encode_texts(tokenizer, distinct)
    z_txt = clip.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).embeds.float()  # (C, D)
    own = torch.tensor([where[texts[j]] for j in keep], device=device)
    hit = (z_img @ z_txt.T).argmax(1) == own
    return {"accuracy": 100 * float(hit.float().mean()), "chance": 100 / len(distinct), "images": len(keep),
            "captions": len(distinct)}


# -------------------------------------------------------------------------------------------- planning
def _batch(n: int, cap: int) -> int:
    """A batch of at most ``cap`` that leaves at least 8 batches per epoch (at least 4 rows)."""
    return int(max(4, min(cap, n // 8)))


def _stage_config(stage: str, n: int, image_size: int, *, new: bool, lora_rank: int, seed: int,
                  extra_model: dict | None = None) -> dict:
    """A stage's recipe (a TrainConfig dict) for ``n`` pairs: batch, learning rate, warm-up, EMA."""
    if stage == "clip":
        batch, lr, model = _batch(n, 128), (2e-3 if new else 5e-4), (dict(CLIP_MODEL) if new else {})
        cfg = {"tokenizer_vocab": 1024, "text_len": 32, "weight_decay": 0.1, "ema_decay": 0.995}
    elif stage == "prior":
        batch, model = _batch(n, 128), (dict(PRIOR_MODEL) if new else {})
        lr = 1e-3 if new or lora_rank else 2e-4
        cfg = {"weight_decay": 0.01, "ema_decay": 0.995}
    elif stage == "sr":
        batch, model = _batch(n, 32), (dict(SR_MODEL) if new else {})
        lr = 5e-4 if new else 2e-4
        cfg = {"weight_decay": 0.0, "ema_decay": 0.995}
    else:
        batch, model = _batch(n, 64), (dict(DECODER_MODEL) if new else {})
        lr = 1e-3 if new or lora_rank else 2e-4
        cfg = {"weight_decay": 0.0, "ema_decay": 0.995}
    model.update(extra_model or {})
    steps = max(1, math.ceil(MAX_EPOCHS[stage] * n / batch))
    data = {"image_size": image_size, "caption_dropout": 0.1 if stage == "prior" else 0.0}
    cfg.update(model=model, data=data, batch_size=batch, max_steps=steps, lr=lr,
               warmup_steps=min(100, max(1, steps // 20)), seed=seed, log_every=25, save_every=0,
               save_minutes=2.0, keep_checkpoints=1, sample_every=0, tracker="none",
               lora_rank=lora_rank if stage in ("prior", "decoder") else 0)
    return cfg


def _sr_stage(opts: T2IOptions, n_pairs: int, dec_size: int, base_dir) -> StagePlan:
    """The super-resolution stage ``dec_size`` -> ``opts.superres`` px: the base's upsampler when it has
    one of these sizes, otherwise a new one; trained on crops of half the output size."""
    S = opts.superres
    if S <= dec_size or S % dec_size or S % 4:
        raise GenvlError(f"--superres {S}: must be a multiple of the decoder's {dec_size} px above it "
                         f"(and of 4), e.g. {2 * dec_size}")
    crop = S // 2 if (S // 2) % (S // dec_size) == 0 else S
    base_sr = base_dir.load("sr").config if base_dir is not None and base_dir.has("sr") else None
    reuse = base_sr is not None and base_sr.image_size == S and base_sr.low_res_size == dec_size \
        and base_sr.attention_levels == 0
    model = {"train_crop": crop} if reuse else {"low_res_size": dec_size, "train_crop": crop}
    cfg = _stage_config("sr", n_pairs, S, new=not reuse, lora_rank=0, seed=opts.seed, extra_model=model)
    why = (f"the base's {dec_size} -> {S} px upsampler, finetuned on {crop} px crops" if reuse else
           f"a new {dec_size} -> {S} px upsampler, trained on {crop} px crops")
    return StagePlan("sr", None, cfg, SHARES["sr"], why)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def plan_stages(opts: T2IOptions, n_pairs: int, base_dir, separation: dict | None) -> list[StagePlan]:
    """The stages to run, each with its recipe and budget share (see the module docstring)."""
    stages = _plan(opts, n_pairs, base_dir, separation)
    unknown = set(opts.overrides) - {s.stage for s in stages}
    if unknown:
        raise GenvlError(f"overrides for stages this run does not have: {', '.join(sorted(unknown))}")
    from genvl.training.recipes import check_model_section
    from genvl.training.tasks import task_class

    for sp in stages:
        sp.config = _merge(sp.config, opts.overrides.get(sp.stage, {}))
        sp.config["model"] = check_model_section(sp.stage, task_class(sp.stage), sp.config.get("model", {}))
    return stages


def _plan(opts: T2IOptions, n_pairs: int, base_dir, separation: dict | None) -> list[StagePlan]:
    out = str(Path(opts.out))
    stages = _plan_unclip(opts, n_pairs, base_dir, separation)
    if opts.superres:
        dec_size = stages[-1].config["data"]["image_size"]
        sr = _sr_stage(opts, n_pairs, dec_size, base_dir)
        sr.init = out
        stages.append(sr)
    return stages


def _plan_unclip(opts: T2IOptions, n_pairs: int, base_dir, separation: dict | None) -> list[StagePlan]:
    out = str(Path(opts.out))
    if base_dir is None:
        size = opts.size or 32
        return [
            StagePlan("clip", None, _stage_config("clip", n_pairs, size, new=True, lora_rank=0, seed=opts.seed),
                      SHARES["clip"], "from scratch: a text tokenizer and a CLIP core trained on the data"),
            StagePlan("prior", out, _stage_config("prior", n_pairs, size, new=True, lora_rank=0, seed=opts.seed),
                      SHARES["prior"], "a new prior on the new CLIP"),
            StagePlan("decoder", out, _stage_config("decoder", n_pairs, size, new=True, lora_rank=0, seed=opts.seed),
                      SHARES["decoder"], "a new decoder on the new CLIP"),
        ]
    base = str(base_dir.path)
    clip_size = base_dir.load("clip").config.image_size
    dec_size = base_dir.load("decoder").config.image_size if base_dir.has("decoder") else None
    if opts.size and dec_size and opts.size != dec_size:
        raise GenvlError(f"--size {opts.size}: the decoder of {opts.init} works at {dec_size} px "
                         "(use --init scratch for another size)")
    size = dec_size or opts.size or clip_size
    measured = (f"{separation['accuracy']:.0f}% of training images nearest their own caption, "
                f"chance {separation['chance']:.0f}%")
    if opts.clip == "auto":
        keep = separation["accuracy"] >= SEPARATION_KEEP
        verdict = (f"its CLIP separates the captions ({measured}; >= {SEPARATION_KEEP:.0f}%): kept frozen" if keep else
                   f"its CLIP does not separate the captions ({measured}; < {SEPARATION_KEEP:.0f}%): finetuned")
    else:
        keep = opts.clip == "keep"
        verdict = f"its CLIP ({measured}) {'kept frozen' if keep else 'finetuned'} as asked (--clip {opts.clip})"
    stages: list[StagePlan] = []
    if keep:
        prior_init = dec_init = base
        lora = opts.lora_rank
        why = verdict
    else:
        stages.append(StagePlan(
            "clip", base, _stage_config("clip", n_pairs, clip_size, new=False, lora_rank=0, seed=opts.seed),
            SHARES["clip"], verdict))
        prior_init = dec_init = out
        lora = 0
        why = "finetuned on the finetuned CLIP's space"
    prior_new = not base_dir.has("prior")
    extra = {} if prior_new or keep else {"restat": True}
    stages.append(StagePlan("prior", prior_init, _stage_config(
        "prior", n_pairs, size, new=prior_new, lora_rank=0 if prior_new else lora, seed=opts.seed, extra_model=extra),
        SHARES["prior"], "a new prior" if prior_new else f"the base's prior, {why}"))
    dec_new = dec_size is None
    stages.append(StagePlan("decoder", dec_init, _stage_config(
        "decoder", n_pairs, size, new=dec_new, lora_rank=0 if dec_new else lora, seed=opts.seed),
        SHARES["decoder"], "a new decoder" if dec_new else f"the base's decoder, {why}"))
    return stages


# --------------------------------------------------------------------------------------------- running
def _drop_components(out: Path, keep: tuple[str, ...]) -> list[str]:
    """Remove the components other than ``keep`` from a model directory (what a finetuned CLIP invalidates)."""
    from genvl.checkpoint import read_meta, write_meta

    meta = read_meta(out)
    gone = [name for name in meta["components"] if name not in keep]
    for name in gone:
        meta["components"].pop(name)
        meta.get("training", {}).pop(name, None)
    if gone:
        write_meta(out, meta)
    for name in sorted(COMPONENT_DIRS - set(keep)):  # folders copied along without an entry of their own too
        shutil.rmtree(out / name, ignore_errors=True)
    return gone


class _Bar:
    """One progress bar over all stages, in seconds of the budget (its ETA is the time left)."""

    def __init__(self, total: float, start: float, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=int(total), initial=int(start), unit="s", disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}]")
        self.base = start

    def stage(self, name: str, base: float) -> None:
        self.base = base
        self.bar.set_description_str(f"t2i {name}")

    def update(self, seconds: float, info: str = "") -> None:
        self.bar.n = min(int(self.base + seconds), self.bar.total)
        if info:
            self.bar.set_postfix_str(info, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_t2i(opts: T2IOptions, *, command: str = "", progress: bool = True, overwrite: bool = False,
            stop_after: tuple[str, int] | None = None) -> Path:
    """Plan (or resume) and run ``genvl train t2i``; returns the model directory.

    Args:
        opts: what to train (see :class:`T2IOptions`).
        command: the command line, recorded in the card.
        progress: one progress bar over all stages.
        overwrite: start anew even if ``opts.out`` holds another run.
        stop_after: ``(stage, steps)``: end that stage after so many steps without releasing it, as a
            crash would (tests of resume).
    """
    from genvl.checkpoint import model_dir_hash, open_model_dir
    from genvl.data import open_image_text
    from genvl.training.config import TrainConfig
    from genvl.training.tasks import get_task
    from genvl.training.trainer import find_checkpoint, stage_dir, train

    t0 = time.perf_counter()
    out = Path(opts.out)
    run_dir = stage_dir(out, "t2i")
    plan_path = run_dir / PLAN_NAME
    if opts.budget_s < 10:
        raise GenvlError(f"--budget {opts.budget_s:.0f}s is too short: at least 10 s")

    plan: Plan | None = None
    if plan_path.is_file() and not overwrite:
        plan = Plan.load(plan_path)
        differ = opts.same_run(plan.options)
        if differ:
            raise GenvlError(f"{out} holds a t2i run with other settings ({', '.join(differ)}); "
                             "use another --out, or --overwrite to start anew")
        if plan.finished:
            raise GenvlError(f"{out} already holds the finished t2i run; use another --out, or --overwrite to start anew")
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise GenvlError(f"{out} is not empty; use another --out, or --overwrite to replace it")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in MODEL_DIR_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise GenvlError(f"{out} holds files that are not a genvl model's ({', '.join(foreign[:5])}); "
                             "--overwrite only replaces model directories: choose another --out")
        shutil.rmtree(out)

    dataset = open_image_text(opts.data, image_size=32, progress=progress)
    if opts.heldout:  # checked now rather than after the training
        held = open_image_text(opts.heldout, image_size=32, progress=False)
        if len(set(held.captions)) < 2:
            raise GenvlError(f"--heldout {opts.heldout}: needs at least two distinct captions for the metrics")
    n = len(dataset)
    distinct = len(set(dataset.captions))
    if plan is None:
        base_dir = None if opts.init == "scratch" else open_model_dir(opts.init)
        separation = None
        if base_dir is not None:
            base_dir.require("clip", purpose="--init of genvl train t2i")
            clip = base_dir.load("clip").eval()
            ds = open_image_text(opts.data, image_size=clip.config.image_size, validate=False, progress=False)
            separation = caption_separation(clip, base_dir.tokenizer(), ds)
        stages = plan_stages(opts, n, base_dir, separation)
        plan = Plan(options=asdict(opts), stages=stages, base=str(base_dir.path) if base_dir else None,
                    base_hash=model_dir_hash(base_dir.path) if base_dir else None, separation=separation,
                    data_summary={"pairs": n, "distinct_captions": distinct, "skipped": len(dataset.skipped)})
        run_dir.mkdir(parents=True, exist_ok=True)
        plan.save(plan_path)
    say = print
    say(f"genvl t2i: {n} pairs ({distinct} distinct captions) from {opts.data}; budget {_minutes(opts.budget_s)}")
    if plan.separation is not None:
        s = plan.separation
        say(f"genvl t2i: the base CLIP picks the own caption of {s['accuracy']:.1f}% of {s['images']} training images "
            f"among {s['captions']} distinct captions (chance {s['chance']:.1f}%)")
    for sp in plan.stages:
        say(f"genvl t2i: {sp.stage:<8} {'done' if sp.done else ''} {sp.why}")

    plan.elapsed += time.perf_counter() - t0
    bar = _Bar(opts.budget_s, plan.elapsed, progress)
    usable = opts.budget_s - final_reserve_s(opts.budget_s)
    try:
        for i, sp in enumerate(plan.stages):
            if sp.done:
                continue
            t_stage = time.perf_counter()
            cfg_dict = dict(sp.config)
            if not sp.started:
                shares_left = sum(s.share for s in plan.stages[i:])
                cfg_dict["max_seconds"] = max(1.0, (usable - plan.elapsed) * sp.share / shares_left)
                sp.config, sp.started = cfg_dict, True
                plan.save(plan_path)
            from genvl.config import from_dict

            cfg = from_dict(TrainConfig, cfg_dict)
            task = get_task(sp.stage, cfg)
            resume = "latest" if find_checkpoint(stage_dir(out, sp.stage), "latest") is not None else None
            bar.stage(sp.stage, plan.elapsed)

            def on_step(state, c, _bar=bar):
                _bar.update(state["seconds"], f"step {state['step']}/{c.max_steps}")

            stop = stop_after[1] if stop_after and stop_after[0] == sp.stage else None
            result = train(task, opts.data, out, resume=resume, init=sp.init, command=command, progress=False,
                           stop_after=stop, on_step=on_step)
            if result.stopped_early:
                return out
            if plan.base is not None:
                # The run's directory holds the text-to-image parts only: the base's others (its token
                # LM, interleaved model) are not this model's, and a finetuned CLIP would invalidate them.
                # Its upsampler stays only to be finetuned (one trained on another domain is not kept).
                # (Every stage started from the base copies them along anew.)
                sr_reused = any(s.stage == "sr" and "size" not in s.config.get("model", {}) for s in plan.stages)
                keep_sr = sr_reused or sp.stage == "sr"  # after its own stage, the upsampler is this model's
                _drop_components(out, UNCLIP_PARTS + (("sr",) if keep_sr else ()))
            sp.done, sp.seconds, sp.steps, sp.final_loss = True, result.seconds, result.step, result.final_loss
            plan.elapsed += time.perf_counter() - t_stage
            plan.save(plan_path)
            bar.stage("", plan.elapsed)
            bar.update(0.0)
    finally:
        bar.close()
    t_end = time.perf_counter()
    finish(out, plan, opts, command=command, progress=progress)
    plan.elapsed += time.perf_counter() - t_end
    plan.finished = True
    plan.save(plan_path)
    say(f"genvl t2i: done in {_minutes(plan.elapsed)} of the {_minutes(opts.budget_s)} budget; model directory: {out}")
    return out


# --------------------------------------------------------------------------------------------- finish
#: Sampling settings written into a new model's genvl.json ("sampling"). Decoder guidance measured on the
#: README's set (the judge's accuracy on images decoded from held-out photos' own CLIP embeddings, 160
#: images): 68% at 1 (none), 72% at 1.25, 62% at 1.5, 44% at 2, 25% at 3, 13% at 6: a decoder trained
#: for minutes draws washed-out images under stronger guidance. DPM-Solver++ with 15 decoder and 10 prior
#: steps judged as well as DDIM 50 / 25 on that set's scratch models (91.4% against 89.8% after 18
#: minutes, 92.8% against 92.2% after 55; 500 images each) in a third of the time.
RECOMMENDED = {"steps": 15, "prior_steps": 10, "guidance": 1.25, "prior_guidance": 2.0, "scheduler": "dpm++",
               "prior_candidates": 1}


def finish(out: Path, plan: Plan, opts: T2IOptions, command: str = "", progress: bool = True) -> None:
    """Sample grid, held-out metrics (``opts.heldout``) and the model card of a finished run."""
    from genvl.checkpoint import open_model_dir, read_meta, write_meta, write_model_card
    from genvl.pipelines import UnclipPipeline
    from genvl.sampling.io import make_grid

    md = open_model_dir(out)
    meta = read_meta(out)
    sampling = dict(RECOMMENDED)
    if plan.base is not None:
        base_sampling = read_meta(Path(plan.base)).get("sampling", {})
        sampling.update(base_sampling)
        if not md.load("decoder").config.coarse_size:
            sampling.pop("coarse_start", None)
        if "sr" not in md.components:  # the base's super-resolution stage is not part of this model
            sampling.pop("sr_steps", None)
    meta["sampling"] = sampling
    write_meta(out, meta)

    pipe = UnclipPipeline.from_pretrained(open_model_dir(out))
    comps = pipe.components
    from genvl.data import open_image_text

    ds = open_image_text(opts.data, image_size=comps.decoder.config.image_size, validate=False, progress=False)
    prompts = sorted(set(ds.captions))
    step = max(1, len(prompts) // 10)
    shown = prompts[::step][:10]
    args = {k: v for k, v in sampling.items()}
    res = pipe(shown, num_images=SAMPLES_PER_PROMPT, seed=opts.seed)
    make_grid(res.images, ncols=SAMPLES_PER_PROMPT).save(out / "samples.png")

    metrics = None
    if opts.heldout:
        from genvl.evaluation.generation import evaluate_heldout

        out_size = (comps.sr if comps.sr is not None else comps.decoder).config.image_size
        held = open_image_text(opts.heldout, image_size=out_size, progress=False)
        r = evaluate_heldout(comps, held, num_images=4, max_prompts=64, seed=opts.seed, progress=progress, **args)
        metrics = {k: r[k] for k in ("clip_score", "prompt_retrieval_accuracy", "chance_prompt_retrieval", "fd_clip")}
        meta = read_meta(out)
        meta.setdefault("metrics", {})["generation (held-out)"] = {
            "values": metrics, "data": opts.heldout, "n": r["num_images"], "prompts": len(r["prompts"]),
            "judge": "own CLIP", "settings": args}
        write_meta(out, meta)

    meta = read_meta(out)
    meta["description"] = describe(out, plan, opts, command, sampling, shown, metrics)
    meta["t2i"] = {"base": plan.base, "base_hash": plan.base_hash, "data": opts.data, **plan.data_summary,
                   "budget_s": opts.budget_s, "hardware": _hardware(), "command": command,
                   "stages": [{"stage": s.stage, "seconds": round(s.seconds, 1), "steps": s.steps, "why": s.why}
                              for s in plan.stages]}
    write_meta(out, meta)
    write_model_card(out, meta)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def describe(out: Path, plan: Plan, opts: T2IOptions, command: str, sampling: dict, shown: list[str],
             metrics: dict | None) -> str:
    """The model card's opening: what this model is, from what, how it was trained and how it measures."""
    d = plan.data_summary
    base = "from scratch" if plan.base is None else f"from `{plan.base}` (sha256 {plan.base_hash})"
    total = sum(s.seconds for s in plan.stages)
    lines = [
        f"Text-to-image model (DALL-E 2 style: CLIP core, diffusion prior, pixel decoder) trained by "
        f"`genvl train t2i` {base} on `{opts.data}`: {d.get('pairs')} image-text pairs, "
        f"{d.get('distinct_captions')} distinct captions ({d.get('skipped', 0)} files skipped). "
        f"Stages: " + "; ".join(f"{s.stage} {s.steps} steps in {s.seconds:.0f} s ({s.why})" for s in plan.stages)
        + f". Training time {_minutes(total)} of a {_minutes(opts.budget_s)} budget on {_hardware()}.",
        "",
        "Command:",
        "",
        "```",
        command or f"genvl train t2i --data {opts.data} --out {opts.out} --init {opts.init}",
        "```",
        "",
        f"![{len(shown)} training captions, {SAMPLES_PER_PROMPT} samples each, seed {opts.seed}](samples.png)",
        "",
        "Rows: " + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(shown)) + ".",
    ]
    if metrics:
        lines += ["", f"Held-out ({opts.heldout}): CLIP score {metrics['clip_score']:.1f}, prompt retrieval "
                  f"{metrics['prompt_retrieval_accuracy']:.1f}% (chance {metrics['chance_prompt_retrieval']:.1f}%), "
                  f"FD {metrics['fd_clip']:.3f}, in its own CLIP's space."]
    lines += ["", f"Sample with: `genvl sample \"{shown[0]}\" --model {out} --num-images 4 --seed 0`"]
    return "\n".join(lines)
