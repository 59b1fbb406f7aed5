"""Generative zero-shot classification: accuracy against model evaluations per image, and the
throughput of batched scoring.

On a labelled folder (``DIR/CLASS_NAME/*.png``) and a model directory, for every method the
directory supports:

- ``diffusion naive K``       the decoder's denoising error with K shared (t, eps) pairs per class
- ``diffusion top-k S``       successive elimination with schedule S (samples:keep stages, Li et al. 2023)
- ``diffusion confidence z``  racing on paired confidence bounds (``genvl classify --schedule confidence:z``)
- each of them per timestep range (``--t-ranges``) and weighting (``--weightings``)
- ``prior ...``               the same estimators on the prior's x0 error in CLIP space
- ``ar``, ``clip``            one evaluation per (image, class) / per image
- ``cascade``                 the prior shortlists k classes with K_p pairs, the pixel confidence race
                              decides among them (``genvl classify --method cascade``); its K_p, k, z are
                              chosen on a selection half of the images (crc32 of CLASS/FILE even) and
                              measured on the test half against the pixel naive reference of the same
                              half (``cascade_split`` in the JSON), evaluations counted as pixel + prior
                              (each one) and cost-weighted (pixel units, prior x the measured cost ratio)

The diffusion and prior points are exact replays: one error table per timestep range holds the
error of every (image, class, pair) up to ``--pairs`` (cached in ``--cache``, resumable), and every
schedule is replayed on it through the classifier's own ``adaptive_scores``, so all points are
scored on the same images and the same pairs (paired comparisons) and their evaluation counts are
exact per image; ``replay_check`` runs the CLI's confidence mode for real on a few images and
compares. Seconds per image are evaluations x seconds per evaluation, timed back to back for the
pixel decoder and the prior (their ratio is the prior / pixel cost). Then the throughput of
batched scoring against a plain batched decoder forward. Writes a PNG (accuracy vs evaluations per
image, log x) and JSON with the device name and a ``goals`` list (:func:`zero_shot_goals`): at least
``ADAPTIVE_SAVING`` x fewer evaluations than the naive reference at accuracy within
``ADAPTIVE_GAP`` point; batched scoring >= 0.8x the plain forward's throughput.
``--add-goals JSON`` writes that list into an existing results file (from its recorded points).

    python benchmarks/zero_shot.py --make-emoji /tmp/emoji10 --emoji-data data/emoji --per-class 60
    python benchmarks/zero_shot.py --model demo --data /tmp/emoji10 --cache /tmp/zs-cache \\
        --methods clip,diffusion,prior --out benchmarks/results/zero_shot_emoji10
    python benchmarks/zero_shot.py --make-shapes /tmp/shapes_lab             # a 4-class labelled folder
    python benchmarks/zero_shot.py --make-digits /tmp/digits                 # sklearn's digits (if installed)
    python benchmarks/zero_shot.py --add-goals benchmarks/results/zero_shot_emoji10.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genvl.checkpoint import open_model_dir  # noqa: E402
from genvl.classify import expand_classes, load_classifier, supported_methods, zero_shot_metrics  # noqa: E402
from genvl.classify.montecarlo import parse_schedule  # noqa: E402
from genvl.data.labelled import open_labelled  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """The results JSON's ``device``: the GPU's name, or the CPU with its cores and threads."""
    if device.type == "cuda":
        return device_name(device)
    return f"CPU ({device_name(device)}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


ADAPTIVE_GAP = 1.0  # accuracy points a cheaper setting may lose against the naive reference
ADAPTIVE_SAVING = 4.0  # the goal: at least this many times fewer evaluations than the naive reference
SCORING_THROUGHPUT = 0.8  # batched scoring rows/s over plain forward rows/s


def _goal(name: str, measured, unit: str, target: str, status: str, note: str) -> dict:
    return {"name": name, "measured": measured, "unit": unit, "goal": target, "status": status, "note": note}


def _is_default_naive(q: dict) -> bool:
    """A point of the naive estimator as the classifier runs it by default: uniform (diffusion) / x0
    (prior) weighting over the whole timestep range, fixed K pairs for every class."""
    tr = q.get("t_range")
    full = tr is None or (tr[0] == 0 and tr[1] >= 1000)
    return ("naive" in q["label"] and q.get("kind", "naive") == "naive" and full
            and q.get("weighting", "uniform") in ("uniform", "x0"))


def naive_reference(points: list[dict], method: str) -> dict | None:
    """The naive reference of ``method``: among the default naive points, the smallest budget whose
    accuracy is within ``ADAPTIVE_GAP`` points of the best naive accuracy (where the naive accuracy
    has plateaued; more samples per class buy nothing measurable)."""
    naive = [q for q in points if q["method"] == method and _is_default_naive(q)]
    if not naive:
        return None
    best = max(q["accuracy"] for q in naive)
    plateau = [q for q in naive if q["accuracy"] >= best - ADAPTIVE_GAP / 100 - 1e-9]
    return min(plateau, key=lambda q: q["evals_per_image"])


def add_paired(points: list[dict], labels: torch.Tensor) -> None:
    """Give every diffusion / prior point its paired comparison with its method's naive reference, and
    every cascade point its comparison with the pixel (diffusion) naive reference."""
    for m in ("diffusion", "prior"):
        ref = naive_reference(points, m)
        if ref is None or "predictions" not in ref:
            continue
        for q in points:
            if q["method"] == m and "predictions" in q:
                q["vs_reference"] = {"reference": ref["label"], **paired(q["predictions"], ref["predictions"], labels),
                                     "evals_ratio": ref["evals_per_image"] / q["evals_per_image"]}
            if m == "diffusion" and q["method"] == "cascade" and "predictions" in q:
                q["vs_reference"] = _vs(q, ref, labels)


def prior_pixel_ratios(points: list[dict]) -> dict:
    """Evaluations and seconds per image of the prior classifier over the pixel one: at the two
    naive references, and at each method's cheapest point within one accuracy point of its reference."""
    out: dict = {}
    pairs = []
    for m in ("diffusion", "prior"):
        ref = naive_reference(points, m)
        if ref is None:
            return {"note": "no naive diffusion and prior points"}
        ok = [q for q in points if q["method"] == m and q["accuracy"] >= ref["accuracy"] - ADAPTIVE_GAP / 100 - 1e-9]
        pairs.append((ref, min(ok, key=lambda q: q["evals_per_image"])))
    (dref, dbest), (pref, pbest) = pairs
    for name, d, q in (("reference", dref, pref), ("cheapest_within_1_point", dbest, pbest)):
        out[name] = {"pixel": d["label"], "prior": q["label"], "pixel_accuracy": d["accuracy"],
                     "prior_accuracy": q["accuracy"],
                     "evals_per_image_ratio": q["evals_per_image"] / d["evals_per_image"],
                     "seconds_per_image_ratio": q["seconds_per_image"] / d["seconds_per_image"]}
    r = out["cheapest_within_1_point"]
    out["note"] = (f"{r['prior']} ({100 * r['prior_accuracy']:.1f}%) costs {r['evals_per_image_ratio']:.2f}x the "
                   f"evaluations and {r['seconds_per_image_ratio']:.3f}x the seconds per image of {r['pixel']} "
                   f"({100 * r['pixel_accuracy']:.1f}%)")
    return out


def zero_shot_goals(out: dict) -> list[dict]:
    """The goals of this benchmark, from its recorded ``points`` and ``throughput``.

    Adaptive scoring (per method): the naive reference is :func:`naive_reference` (the smallest naive
    budget, default weighting and timesteps, within ``ADAPTIVE_GAP`` points of the best naive
    accuracy). Every other point of the method (top-k or confidence elimination, other timestep
    ranges or weightings) whose accuracy is at most ``ADAPTIVE_GAP`` points below the reference's is
    a candidate; the cheapest candidate's saving ``reference evals / candidate evals`` is measured. Met
    when it is >= ``ADAPTIVE_SAVING``. Throughput: batched scoring rows/s over plain forward rows/s.
    """
    goals = []
    n = out.get("n") or 0
    points = out.get("points") or []
    for m in ("diffusion", "prior"):
        name = f"zero-shot {m}: evaluations saved at equal accuracy vs the naive reference"
        target = f">= {ADAPTIVE_SAVING:g}x fewer evaluations at >= -{ADAPTIVE_GAP:g} point"
        ref = naive_reference(points, m)
        others = [q for q in points if q["method"] == m and not _is_default_naive(q)]
        if ref is None or not others:
            goals.append(_goal(name, None, "x", target, "not measured here", f"no naive and adaptive {m} points"))
            continue
        ok = [q for q in others if q["accuracy"] >= ref["accuracy"] - ADAPTIVE_GAP / 100 - 1e-9]
        naive = [q for q in points if q["method"] == m and _is_default_naive(q)]
        top = max(naive, key=lambda q: (q["evals_per_image"], q["accuracy"]))
        if not ok:
            goals.append(_goal(name, None, "x", target, "missed",
                               f"no setting within {ADAPTIVE_GAP:g} point of {ref['label']} "
                               f"({100 * ref['accuracy']:.1f}%)"))
            continue
        best = min(ok, key=lambda q: (q["evals_per_image"], -q["accuracy"]))
        saving = ref["evals_per_image"] / best["evals_per_image"]
        note = (f"{best['label']}: {100 * best['accuracy']:.1f}% at {best['evals_per_image']:.1f} evals/image vs the "
                f"naive reference {ref['label']}: {100 * ref['accuracy']:.1f}% at {ref['evals_per_image']:g} "
                f"(the smallest naive budget within {ADAPTIVE_GAP:g} point of the best naive accuracy); "
                f"vs the largest naive budget {top['label']} ({100 * top['accuracy']:.1f}%): "
                f"{top['evals_per_image'] / best['evals_per_image']:.1f}x")
        pv = best.get("vs_reference")
        if pv:
            note += (f"; paired on the same images: agree {100 * pv['agree']:.1f}%, only it right "
                     f"{pv['only_this_right']}, only the reference right {pv['only_reference_right']}")
        if n:
            note += f"; {n} test images, so one image is {100 / n:.2g} accuracy point(s)"
        goals.append(_goal(name, round(saving, 3), "x", target, "met" if saving >= ADAPTIVE_SAVING else "missed",
                           note))
    goals += cascade_goals(out)
    tp = out.get("throughput")
    name = "zero-shot batched scoring throughput vs plain decoder forward"
    target = f">= {SCORING_THROUGHPUT:g}x"
    if not tp:
        goals.append(_goal(name, None, "x", target, "not measured here", "no diffusion method in this run"))
    else:
        ratio = tp["scoring_rows_per_s"] / tp["plain_forward_rows_per_s"]
        goals.append(_goal(name, ratio, "x", target, "met" if ratio >= SCORING_THROUGHPUT else "missed",
                           f"{tp['scoring_rows_per_s']:.1f} vs {tp['plain_forward_rows_per_s']:.1f} rows/s at "
                           f"{tp['rows']} rows per forward"))
    return goals


#: The two ways a cascade's evaluations are counted against the pixel naive reference (whose
#: evaluations are all pixel-decoder rows): key of the cascade point, words, selection criterion.
CASCADE_COUNTS = (
    ("evals_per_image", "denoiser evaluations (pixel + prior, each counted as one)", "evaluations"),
    ("cost_weighted_evals_per_image", "cost-weighted pixel-equivalent evaluations (pixel + prior_cost x prior)",
     "cost"),
)


def cascade_goals(out: dict) -> list[dict]:
    """The >= ``ADAPTIVE_SAVING`` x goal for the cascade, counted both ways (:data:`CASCADE_COUNTS`).

    Per counting, the setting chosen on the selection half by that counting
    (:func:`cascade_study`) is compared with the pixel naive reference (:func:`naive_reference`)
    measured on the same images: on the test half (the honest figure; the settings never saw it) and
    on every image (half of which chose the settings). Met when its accuracy is at most
    ``ADAPTIVE_GAP`` point below the reference's and the reference needs >= ``ADAPTIVE_SAVING`` x its
    evaluations.
    """
    goals = []
    study = out.get("cascade_split") or {}
    target = f">= {ADAPTIVE_SAVING:g}x fewer evaluations at >= -{ADAPTIVE_GAP:g} point"
    scopes = (("test half", study.get("test_points"), study.get("test")),
              ("all images", out.get("points"), out.get("n")))
    for scope, points, n in scopes:
        for key, words, crit in CASCADE_COUNTS:
            name = f"zero-shot cascade, {scope}: {words} saved at equal accuracy vs the pixel naive reference"
            points = points or []
            ref = naive_reference(points, "diffusion")
            cas = [q for q in points if q["method"] == "cascade" and crit in q.get("selected_by", [])]
            if ref is None or not cas:
                goals.append(_goal(name, None, "x", target, "not measured here",
                                   study.get("note") or "no pixel naive and cascade points with a split"))
                continue
            q = cas[0]
            saving = ref["evals_per_image"] / q[key]
            equal = q["accuracy"] >= ref["accuracy"] - ADAPTIVE_GAP / 100 - 1e-9
            note = (f"{q['label']} (chosen on the selection half by {crit}): {100 * q['accuracy']:.1f}% at "
                    f"{q['pixel_evals_per_image']:.2f} pixel + {q['prior_evals_per_image']:g} prior evaluations per "
                    f"image = {q[key]:.2f} ({'prior cost %.3f x a pixel evaluation' % q['prior_cost'] if crit == 'cost' else 'each counted as one'}) "
                    f"vs {ref['label']}: {100 * ref['accuracy']:.1f}% at {ref['evals_per_image']:g}; {n} images")
            pv = q.get("vs_reference")
            if pv:
                note += (f"; paired: agree {100 * pv['agree']:.1f}%, only it right {pv['only_this_right']}, only the "
                         f"reference right {pv['only_reference_right']}")
            if not equal:
                note += f"; accuracy more than {ADAPTIVE_GAP:g} point below the reference"
            goals.append(_goal(name, round(saving, 3), "x", target,
                               "met" if equal and saving >= ADAPTIVE_SAVING else "missed", note))
    return goals


def add_goals(path: Path) -> None:
    """Write :func:`zero_shot_goals` (and the shared schema's keys) into an existing results JSON."""
    out = json.loads(path.read_text())
    out["goals"] = zero_shot_goals(out)
    if out.get("device") in ("cpu", None) or "device_type" not in out:
        out["device_type"] = "cuda" if str(out.get("device", "")).startswith("cuda") else "cpu"
        name = out.get("device_name") or out.get("device") or "unknown"
        out["device"] = f"CPU ({name})" if out["device_type"] == "cpu" else name
    out.setdefault("config", {"model": out.get("model"), "data": out.get("data"), "n": out.get("n"),
                              "note": "the run's arguments were not recorded; model, data and n from its JSON"})
    out.setdefault("rows", out.get("points") or [])
    out["goals_source"] = "computed from the recorded points by `zero_shot.py --add-goals` (no re-run)"
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    for g in out["goals"]:
        print(f"[{g['status']}] {g['name']}: {g['measured']} {g['unit']} (goal {g['goal']}) -- {g['note']}")
    print(f"wrote {path}")


def make_shapes(out: Path, per_class: int = 20, size: int = 32) -> None:
    """A labelled folder of four visually distinct classes (coloured shapes, jittered)."""
    from PIL import Image, ImageDraw

    import numpy as np

    classes = {"red_circle": ((220, 30, 30), "circle"), "blue_square": ((30, 60, 220), "square"),
               "green_triangle": ((30, 180, 60), "triangle"), "yellow_circle": ((235, 210, 30), "circle")}
    rng = np.random.default_rng(0)
    for name, (color, shape) in classes.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), "white")
            d = ImageDraw.Draw(img)
            dx, dy = rng.integers(-3, 4, 2)
            m = size // 5
            box = (m + dx, m + dy, size - m + dx, size - m + dy)
            if shape == "circle":
                d.ellipse(box, fill=color)
            elif shape == "square":
                d.rectangle(box, fill=color)
            else:
                d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=color)
            img.save(out / name / f"{i:03d}.png")


def make_digits(out: Path, size: int = 32) -> None:
    """scikit-learn's 8x8 digits as a labelled folder ``zero/ ... nine/`` (needs scikit-learn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("--make-digits needs scikit-learn (pip install scikit-learn); it is not a genvl dependency")
    from PIL import Image

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        folder = out / f"digit_{names[y]}"
        folder.mkdir(parents=True, exist_ok=True)
        g = (255 - img / 16 * 255).clip(0, 255).astype("uint8")  # dark digit on white
        Image.fromarray(g).convert("RGB").resize((size, size), Image.Resampling.NEAREST).save(folder / f"{i:04d}.png")


#: The ten classes of ``--make-emoji``: the head noun of an emoji's name (the last word before
#: " with "), so "smiling cat with heart-eyes" is a cat and "heart with arrow" a heart.
EMOJI_CLASSES = ("cat", "heart", "clock", "moon", "square", "arrow", "hand", "tree", "car", "book")


def emoji_head(name: str) -> str:
    head = name.split(" with ")[0].strip().split(" ")[-1]
    return "clock" if head.endswith("o’clock") or head.endswith("o'clock") else head


def make_emoji(out: Path, emoji_data: Path, per_class: int = 10, size: int = 32) -> None:
    """A 10-class labelled folder from an emoji set folder (built by ``scripts/emoji_set.py``): the first
    ``per_class`` images (in the folder's order) whose name's head noun is one of :data:`EMOJI_CLASSES`;
    skin-tone variations are left out."""
    from PIL import Image

    counts = dict.fromkeys(EMOJI_CLASSES, 0)
    meta = emoji_data / "metadata.jsonl"
    if not meta.is_file():
        raise SystemExit(f"{meta} not found: build it with `python scripts/emoji_set.py {emoji_data}`")
    for line in meta.read_text().splitlines():
        row = json.loads(line)
        texts = row["text"] if isinstance(row["text"], list) else [row["text"]]
        if "skin tone" in texts[0]:
            continue
        name = texts[0].split(",")[0]  # "grinning cat, smiling cat face ..., google noto style"
        head = emoji_head(name)
        if head in counts and counts[head] < per_class:
            (out / head).mkdir(parents=True, exist_ok=True)
            img = Image.open(emoji_data / row["file_name"]).convert("RGBA")
            bg = Image.new("RGBA", img.size, "white")
            bg.alpha_composite(img)
            bg.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(out / head / f"{counts[head]:03d}.png")
            counts[head] += 1
    print("images per class: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def load_conditions(clf, prompts: list[str], cache: Path | None):
    """The decoder's class conditions (prior samples per prompt), computed once and cached."""
    from genvl.classify import ClassConditions

    path = cache / f"conditions-seed{clf.seed}.pt" if cache else None
    if path and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["prompts"] == list(prompts):
            return ClassConditions(saved["image_embeds"], saved.get("text_states"), saved.get("text_mask"))
    cond = clf.conditioner(list(prompts))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"prompts": list(prompts), "image_embeds": cond.image_embeds, "text_states": cond.text_states,
                    "text_mask": cond.text_mask}, path)
    return cond


def error_table(clf, data, prompts: list[str], num_pairs: int, cache: Path | None, chunk: int = 8) -> dict:
    """Every (image, class, pair) error of ``clf`` (diffusion or prior) over its first ``num_pairs``
    shared pairs: {"table": (N, C, K) float64, "t": (K,), "seconds_per_row": float}.

    Rows already in ``cache`` (keyed by method, timestep range, seed, K; images by path) are reused,
    and progress is saved after every ``chunk`` images, so an interrupted run resumes.
    """
    method = clf.method
    lo, hi = getattr(clf, "t_range", (0, clf.scheduler.config.num_train_timesteps))
    path = cache / f"{method}-t{lo}-{hi}-seed{clf.seed}-K{num_pairs}.pt" if cache else None
    done: dict[str, torch.Tensor] = {}
    seconds, rows = 0.0, 0
    if path and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["classes"] == list(prompts) and torch.equal(saved["t"], clf.noise_pairs(num_pairs)[0]):
            done = dict(zip(saved["paths"], saved["table"].unbind(0)))
            seconds, rows = saved["seconds"], saved["rows"]
    cond = load_conditions(clf, prompts, cache) if method == "diffusion" else None
    images = data.pixels(clf.image_size)
    keys = [str(p) for p in data.paths]
    todo = [i for i, k in enumerate(keys) if k not in done]
    for s in range(0, len(todo), chunk):
        idx = todo[s:s + chunk]
        t0 = time.perf_counter()
        x = images[idx]
        table = clf.error_table(x, cond if cond is not None else prompts, num_pairs)
        seconds += time.perf_counter() - t0
        rows += table.numel()
        done.update(zip([keys[i] for i in idx], table.unbind(0)))
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"classes": list(prompts), "paths": list(done), "table": torch.stack(list(done.values())),
                        "seconds": seconds, "rows": rows, "t": clf.noise_pairs(num_pairs)[0]}, path)
        print(f"  {method} t [{lo}, {hi}) table: {sum(k in done for k in keys)}/{len(keys)} images", flush=True)
    t, _ = clf.noise_pairs(num_pairs)
    return {"table": torch.stack([done[k] for k in keys]), "t": t,
            "seconds_per_row": seconds / rows if rows else float("nan")}


def replay(table: torch.Tensor, weights: torch.Tensor, schedule, elimination, labels: torch.Tensor) -> dict:
    """Accuracy, predictions and exact evaluations per image of one schedule, replayed on a table."""
    from genvl.classify.montecarlo import adaptive_scores, table_row_error

    N, C, _ = table.shape
    scores, evals = adaptive_scores(N, C, schedule, weights, table_row_error(table), 1 << 16, elimination)
    pred = scores.argmax(1)
    return {"accuracy": float((pred == labels).float().mean()), "evals_per_image": float(evals.double().mean()),
            "evals_max": int(evals.max()), "predictions": pred.tolist()}


def paired(a: list[int], b: list[int], labels: torch.Tensor) -> dict:
    """Paired comparison of two prediction lists on the same images: agreement and the discordant
    counts (a right and b wrong, and the reverse) that a McNemar test uses."""
    y = labels.tolist()
    ra = [p == t for p, t in zip(a, y)]
    rb = [p == t for p, t in zip(b, y)]
    return {"agree": sum(p == q for p, q in zip(a, b)) / len(y),
            "only_this_right": sum(x and not z for x, z in zip(ra, rb)),
            "only_reference_right": sum(z and not x for x, z in zip(ra, rb))}


def run_point(clf, data, prompts, batch: int) -> dict:
    images = data.pixels(clf.image_size)
    t0 = time.perf_counter()
    scores = torch.cat([clf.scores(images[i:i + batch], prompts) for i in range(0, len(data), batch)])
    sec = time.perf_counter() - t0
    m = zero_shot_metrics(scores, data.labels, data.classes, 1.0)
    return {"accuracy": m["accuracy"], "evals_per_image": clf.evals_per_image(len(prompts)), "seconds_per_image": sec / len(data)}


@torch.no_grad()
def throughput(clf, rows: int, repeats: int) -> dict:
    """Rows/s of batched scoring vs a plain batched decoder forward of the same number of rows."""
    dec = clf.decoder
    S, D = dec.config.image_size, dec.config.embed_dim
    dev = clf.device
    x = torch.rand(max(1, rows // 2), 3, S, S, device=dev) * 2 - 1
    from genvl.classify import ClassConditions

    E = torch.nn.functional.normalize(torch.randn(2, D), dim=-1)
    plain_in = (torch.randn(rows, 3, S, S, device=dev), torch.randint(0, 1000, (rows,), device=dev),
                torch.nn.functional.normalize(torch.randn(rows, D, device=dev), dim=-1))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    old = clf.samples, clf.schedule, clf.batch_size
    clf.samples, clf.schedule, clf.batch_size = 1, None, rows  # x: rows / 2 images x 2 classes x 1 pair = rows
    t_score = timed(lambda: clf.scores_with_conditions(x, ClassConditions(E)))
    clf.samples, clf.schedule, clf.batch_size = old
    t_plain = timed(lambda: dec(*plain_in))
    n = 2 * x.shape[0]
    return {"rows": n, "scoring_rows_per_s": n / t_score, "plain_forward_rows_per_s": rows / t_plain,
            "overhead": (n / rows) * t_plain / t_score}


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``"0-1000;50-900"`` -> [(0, 1000), (50, 900)]."""
    out = []
    for part in text.split(";"):
        lo, hi = (int(v) for v in part.split("-"))
        out.append((lo, hi))
    return out


def diffusion_points(md, data, prompts, args, device, cache: Path | None, method: str,
                     seconds_per_eval: float) -> tuple[list[dict], dict, dict]:
    """Every naive / top-k / confidence point of ``method`` (diffusion or prior), replayed on error tables.

    One table per timestep range (diffusion) holds every (image, class, pair) error up to ``--pairs``;
    each point's schedule is replayed on it with the classifier's own :func:`adaptive_scores`, so its
    accuracy and per-image evaluation counts are those the classifier computes (checked end to end
    by :func:`replay_check`) and every point is scored on the same images and the same pairs.
    Seconds per image: evaluations x ``seconds_per_eval`` (timed back to back with the other method
    by :func:`prior_pixel_cost`, steadier than the table's own timing on a shared machine).

    Returns:
        (points, seconds per table row per timestep range, {timestep range or None: (N, C, K) table}).
    """
    from genvl.classify.diffusion import timestep_weights
    from genvl.classify.montecarlo import CONFIDENCE_STAGES, Confidence

    K = args.pairs
    ranges = parse_ranges(args.t_ranges) if method == "diffusion" else [None]
    weightings = args.weightings.split(",") if method == "diffusion" else ["x0"]
    budgets = [int(b) for b in args.budgets.split(",") if int(b) <= K]
    schedules = [sch for sch in args.schedules.split(";") if sch and sum(n for n, _ in parse_schedule(sch)) <= K]
    zs = [float(z) for z in args.confidence.split(",") if z]
    stages = [int(n) for n in args.confidence_stages.split(",")] if args.confidence_stages else list(CONFIDENCE_STAGES)
    C = len(prompts)
    points, costs, tables = [], {}, {}
    for tr in ranges:
        opts = {"t_range": tr} if tr else {}
        clf = load_classifier(md, method, device=str(device), samples=K, batch_size=args.rows_per_forward, **opts)
        tab = error_table(clf, data, prompts, K, cache)
        costs[str(tr)] = tab["seconds_per_row"]
        tables[tuple(clf.t_range) if method == "diffusion" else None] = tab["table"]
        where = f" t {tr[0]}-{tr[1]}" if tr else ""
        for wt in weightings:
            if method == "diffusion":
                weights = timestep_weights(clf.scheduler.alphas_cumprod, tab["t"], wt)
            else:
                a = clf.scheduler.alphas_cumprod.double()[tab["t"]]
                weights = torch.ones_like(a)
            tag = where + (f" {wt}" if method == "diffusion" and wt != "uniform" else "")
            configs = [(f"{method} naive {k}{tag}", "naive", [(k, C)], "top-k", {"samples": k}) for k in budgets]
            configs += [(f"{method} top-k {sch}{tag}", "top-k", parse_schedule(sch), "top-k", {"schedule": sch})
                        for sch in schedules]
            configs += [(f"{method} confidence z={z:g}{tag}", "confidence", [(n, C) for n in stages], Confidence(z=z),
                         {"schedule": f"confidence:{z:g}:{','.join(map(str, stages))}"}) for z in zs]
            for label, kind, schedule, rule, spec in configs:
                r = replay(tab["table"], weights, schedule, rule, data.labels)
                r["seconds_per_image"] = r["evals_per_image"] * seconds_per_eval
                points.append({"label": label, "method": method, "kind": kind, "t_range": list(tr) if tr else None,
                               "weighting": wt, **spec, **r})
    return points, costs, tables


def split_halves(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection and test halves of a labelled folder: image ``CLASS_FOLDER/FILE_NAME`` is in the
    selection half when crc32 of that string is even, else in the test half. Fixed (no seed), and an
    image's half depends on its own name only, not on the order or on the other images.

    Returns:
        (selection indices, test indices), long tensors into ``data``.
    """
    import zlib

    odd = torch.tensor([zlib.crc32(f"{Path(p).parent.name}/{Path(p).name}".encode()) % 2 for p in data.paths])
    return (odd == 0).nonzero().flatten(), (odd == 1).nonzero().flatten()


def cascade_point(prior_table: torch.Tensor, pixel_table: torch.Tensor, labels: torch.Tensor, prior_samples: int,
                  shortlist: int, z: float, args, cost: dict) -> dict:
    """One cascade setting replayed on the tables: the prior's naive estimator with ``prior_samples``
    pairs scores every class, the ``shortlist`` best go to the pixel confidence race (the CLI's
    ``confidence:z`` schedule, uniform weights, the default timestep range), through the library's own
    :func:`~genvl.classify.cascade.cascade_scores`. Pixel and prior evaluations are counted per image."""
    from genvl.classify.cascade import cascade_scores
    from genvl.classify.montecarlo import adaptive_scores, parse_adaptive, table_row_error

    N, C, _ = pixel_table.shape
    mode = f"confidence:{z:g}" + (f":{args.confidence_stages}" if args.confidence_stages else "")
    schedule, rule = parse_adaptive(mode)
    Kx = sum(n for n, _ in schedule)
    ps, pev = adaptive_scores(N, C, [(prior_samples, C)], torch.ones(prior_samples, dtype=torch.float64),
                              table_row_error(prior_table), 1 << 16)
    scores, xev, top = cascade_scores(ps, shortlist, schedule, torch.ones(Kx, dtype=torch.float64),
                                      table_row_error(pixel_table), 1 << 16, rule)
    pred = scores.argmax(1)
    pixel, prior = float(xev.double().mean()), float(pev.double().mean())
    ratio = cost["prior_over_pixel"]
    return {"label": f"cascade prior {prior_samples} top-{shortlist} pixel confidence z={z:g}", "method": "cascade",
            "kind": "cascade", "prior_samples": prior_samples, "shortlist": shortlist, "z": z, "schedule": mode,
            "t_range": None, "weighting": "uniform",
            "accuracy": float((pred == labels).float().mean()),
            "shortlist_recall": float((top == labels[:, None]).any(1).float().mean()),
            "pixel_evals_per_image": pixel, "prior_evals_per_image": prior,
            "evals_per_image": pixel + prior, "cost_weighted_evals_per_image": pixel + ratio * prior,
            "prior_cost": ratio, "pixel_evals_max": int(xev.max()),
            "seconds_per_image": pixel * cost["pixel_seconds_per_eval"] + prior * cost["prior_seconds_per_eval"],
            "predictions": pred.tolist()}


def naive_points(table: torch.Tensor, labels: torch.Tensor, method: str, budgets: list[int], cost: dict,
                 tag: str = "") -> list[dict]:
    """The default naive points of ``method`` (uniform / x0 weights, whole timestep range) on a table;
    cost-weighted evaluations in pixel-evaluation units (a prior evaluation is ``prior_over_pixel``)."""
    N, C, K = table.shape
    unit = 1.0 if method == "diffusion" else cost["prior_over_pixel"]
    seconds = cost["pixel_seconds_per_eval" if method == "diffusion" else "prior_seconds_per_eval"]
    out = []
    for b in budgets:
        r = replay(table, torch.ones(K, dtype=torch.float64), [(b, C)], "top-k", labels)
        out.append({"label": f"{method} naive {b}{tag}", "method": method, "kind": "naive", "t_range": None,
                    "weighting": "uniform" if method == "diffusion" else "x0", "samples": b, **r,
                    "cost_weighted_evals_per_image": r["evals_per_image"] * unit,
                    "seconds_per_image": r["evals_per_image"] * seconds})
    return out


def _vs(q: dict, ref: dict, labels: torch.Tensor) -> dict:
    """A point's paired comparison with the pixel naive reference, both evaluation ratios included."""
    out = {"reference": ref["label"], **paired(q["predictions"], ref["predictions"], labels),
           "evals_ratio": ref["evals_per_image"] / q["evals_per_image"]}
    if "cost_weighted_evals_per_image" in q:
        out["cost_weighted_ratio"] = ref["evals_per_image"] / q["cost_weighted_evals_per_image"]
    return out


def cascade_study(pixel_table: torch.Tensor, prior_table: torch.Tensor, data, args, cost: dict, tag: str = "") -> dict:
    """Choose the cascade's settings on the selection half, measure them on the test half.

    Selection: every (prior pairs K_p, shortlist k, confidence z) of the ``--cascade-*`` grids is
    replayed on the selection half; the pixel naive reference of that half is
    :func:`naive_reference` over its naive budgets; among the settings at least as accurate as that
    reference (no tolerance, to leave the test's 1 point for the selection's optimism), the one with
    the fewest denoiser evaluations per image (pixel + prior, each one) is "chosen by evaluations", the
    one with the fewest cost-weighted evaluations is "chosen by cost". Test: the chosen settings, the
    pixel naive budgets and the prior naive budgets, on the test half only.
    """
    sel, test = split_halves(data)
    K = prior_table.shape[2]
    budgets = [int(b) for b in args.budgets.split(",") if int(b) <= K]
    grid = [(kp, k, z) for kp in (int(v) for v in args.cascade_prior_samples.split(",")) if kp <= K
            for k in (int(v) for v in args.cascade_shortlist.split(","))
            for z in (float(v) for v in args.cascade_confidence.split(","))]
    y = data.labels
    out = {"rule": "image CLASS_FOLDER/FILE_NAME: crc32 even -> selection half, odd -> test half",
           "selection": len(sel), "test": len(test),
           "selection_rule": "among the grid settings whose selection-half accuracy is >= the selection half's pixel "
                             "naive reference (no tolerance), the fewest evaluations per image: by denoiser "
                             "evaluations (pixel + prior) and by cost-weighted pixel-equivalent evaluations",
           "grid": {"prior_samples": args.cascade_prior_samples, "shortlist": args.cascade_shortlist,
                    "z": args.cascade_confidence}}
    if len(sel) == 0 or len(test) == 0:
        out["note"] = "one half is empty: no cascade selection"
        return out
    sel_naive = naive_points(pixel_table[sel], y[sel], "diffusion", budgets, cost, tag)
    ref = naive_reference(sel_naive, "diffusion")
    sel_points = [cascade_point(prior_table[sel], pixel_table[sel], y[sel], kp, k, z, args, cost) for kp, k, z in grid]
    ok = [q for q in sel_points if q["accuracy"] >= ref["accuracy"] - 1e-9]
    for q in sel_naive + sel_points:
        q.pop("predictions", None)
    out["selection_reference"] = {k: ref[k] for k in ("label", "accuracy", "evals_per_image")}
    out["selection_points"] = sel_naive + sel_points
    if not ok:
        out["note"] = "no grid setting reaches the selection half's naive reference accuracy: nothing chosen"
        return out
    by_count = min(ok, key=lambda q: (q["evals_per_image"], q["cost_weighted_evals_per_image"]))
    by_cost = min(ok, key=lambda q: (q["cost_weighted_evals_per_image"], q["evals_per_image"]))
    chosen = {}
    for crit, q in (("evaluations", by_count), ("cost", by_cost)):
        key = (q["prior_samples"], q["shortlist"], q["z"])
        chosen.setdefault(key, []).append(crit)
    out["chosen"] = [{"prior_samples": kp, "shortlist": k, "z": z, "selected_by": crits}
                     for (kp, k, z), crits in chosen.items()]
    test_points = naive_points(pixel_table[test], y[test], "diffusion", budgets, cost, tag)
    test_points += naive_points(prior_table[test], y[test], "prior", budgets, cost)
    for c in out["chosen"]:
        q = cascade_point(prior_table[test], pixel_table[test], y[test], c["prior_samples"], c["shortlist"], c["z"],
                          args, cost)
        test_points.append({**q, "selected_by": c["selected_by"]})
    tref = naive_reference(test_points, "diffusion")
    for q in test_points:
        q["vs_reference"] = _vs(q, tref, y[test])
    for q in test_points:
        q.pop("predictions", None)
    out["test_reference"] = {k: tref[k] for k in ("label", "accuracy", "evals_per_image")}
    out["test_points"] = test_points
    return out


def full_set_cascade(pixel_table, prior_table, data, args, cost, study: dict) -> list[dict]:
    """The chosen cascade settings on every image (half of which chose them)."""
    pts = []
    for c in study.get("chosen") or []:
        q = cascade_point(prior_table, pixel_table, data.labels, c["prior_samples"], c["shortlist"], c["z"], args, cost)
        pts.append({**q, "selected_by": c["selected_by"]})
    return pts


def print_study(study: dict) -> None:
    """The split, the choice on the selection half and the test half's table."""
    print(f"cascade split: {study['rule']}; selection {study['selection']} images, test {study['test']} images")
    if "chosen" not in study:
        print("  " + study.get("note", "nothing chosen"))
        return
    ref = study["selection_reference"]
    print(f"  selection half: pixel naive reference {ref['label']} {100 * ref['accuracy']:.1f}% at "
          f"{ref['evals_per_image']:g} evals/image; chosen: " + "; ".join(
              f"K_p={c['prior_samples']} k={c['shortlist']} z={c['z']:g} (by {' and '.join(c['selected_by'])})"
              for c in study["chosen"]))
    print(f"  test half ({study['test']} images): {'setting':<44} {'acc':>6} {'pixel':>7} {'prior':>6} {'total':>7} "
          f"{'cost-w':>7} {'x(count)':>8} {'x(cost)':>8}")
    for q in study["test_points"]:
        v = q["vs_reference"]
        print(f"  {'':<{len(str(study['test'])) + 19}}{q['label']:<44} {100 * q['accuracy']:6.1f} "
              f"{q.get('pixel_evals_per_image', q['evals_per_image'] if q['method'] == 'diffusion' else 0):7.2f} "
              f"{q.get('prior_evals_per_image', q['evals_per_image'] if q['method'] == 'prior' else 0):6.1f} "
              f"{q['evals_per_image']:7.2f} {q['cost_weighted_evals_per_image']:7.2f} {v['evals_ratio']:8.2f} "
              f"{v.get('cost_weighted_ratio', float('nan')):8.2f}")


def cascade_check(md, data, prompts, args, device, cache: Path | None, n: int, chosen: dict,
                  pixel_table: torch.Tensor, prior_table: torch.Tensor) -> dict:
    """Run ``genvl classify --method cascade`` with the chosen settings for real on the first ``n``
    images and compare with their replay on the tables: scores, shortlists and per-image pixel and
    prior evaluations must agree."""
    from genvl.classify import parse_adaptive
    from genvl.classify.cascade import cascade_scores
    from genvl.classify.montecarlo import adaptive_scores, table_row_error

    mode = f"confidence:{chosen['z']:g}" + (f":{args.confidence_stages}" if args.confidence_stages else "")
    schedule, rule = parse_adaptive(mode)
    clf = load_classifier(md, "cascade", device=str(device), schedule=schedule, elimination=rule,
                          shortlist=chosen["shortlist"], shortlist_samples=chosen["prior_samples"],
                          batch_size=args.rows_per_forward)
    clf.pixel.use_conditions(prompts, load_conditions(clf.pixel, prompts, cache))
    images = data.pixels(clf.image_size)[:n]
    real = clf.scores(images, prompts)
    C, kp, Kx = len(prompts), chosen["prior_samples"], sum(m for m, _ in schedule)
    ps, pev = adaptive_scores(n, C, [(kp, C)], torch.ones(kp, dtype=torch.float64),
                              table_row_error(prior_table[:n]), 4096)
    replayed, xev, top = cascade_scores(ps, chosen["shortlist"], schedule, torch.ones(Kx, dtype=torch.float64),
                                        table_row_error(pixel_table[:n]), 4096, rule)
    return {"images": n, "schedule": mode, "prior_samples": kp, "shortlist": chosen["shortlist"],
            "same_predictions": bool(torch.equal(real.argmax(1), replayed.argmax(1))),
            "same_shortlists": bool(torch.equal(clf.last_shortlist, top)),
            "same_evals": bool(torch.equal(clf.last_pixel_evals, xev) and torch.equal(clf.last_prior_evals, pev)),
            "max_abs_score_diff": float((real - replayed).abs().max()), **clf.evals_breakdown(C)}


def replay_check(md, data, prompts, args, device, cache: Path | None, n: int) -> dict:
    """Run the CLI's default confidence mode for real on the first ``n`` images and compare with the
    replay of the same setting on its table: the scores and per-image evaluations must agree."""
    from genvl.classify import parse_adaptive
    from genvl.classify.montecarlo import adaptive_scores, table_row_error

    schedule, rule = parse_adaptive("confidence")
    clf = load_classifier(md, "diffusion", device=str(device), schedule=schedule, elimination=rule,
                          batch_size=args.rows_per_forward)  # as `genvl classify --schedule confidence`
    t_range = clf.t_range
    cond = load_conditions(clf, prompts, cache)
    images = data.pixels(clf.image_size)[:n]
    real = clf.scores_with_conditions(images, cond)
    K = sum(k for k, _ in schedule)
    table = clf.error_table(images, cond, K)
    _, weights, _ = clf.row_error(images, cond, K)
    replayed, evals = adaptive_scores(n, len(prompts), schedule, weights, table_row_error(table), 4096, rule)
    return {"images": n, "t_range": list(t_range), "schedule": "confidence",
            "same_predictions": bool(torch.equal(real.argmax(1), replayed.argmax(1))),
            "same_evals": bool(torch.equal(clf.last_evals, evals)),
            "max_abs_score_diff": float((real - replayed).abs().max()),
            "evals_per_image": float(clf.last_evals.double().mean())}


@torch.no_grad()
def prior_pixel_cost(md, device, rows: int, repeats: int) -> dict:
    """Seconds per evaluation (one forward row) of the prior and of the pixel decoder, timed back to
    back on random inputs in batches of ``rows``, and their ratio."""
    dec = md.load("decoder", device=str(device))
    prior = md.load("prior", device=str(device))
    S, D = dec.config.image_size, dec.config.embed_dim
    x = torch.randn(rows, 3, S, S, device=device)
    t = torch.randint(0, 1000, (rows,), device=device)
    z = torch.nn.functional.normalize(torch.randn(rows, D, device=device), dim=-1)
    pd = prior.config.embed_dim
    L = prior.config.text_len
    tw = getattr(prior.config, "text_width", None) or getattr(prior.config, "text_embed_dim", None) or pd
    px = (torch.randn(rows, pd, device=device), t, torch.randn(rows, pd, device=device),
          torch.randn(rows, L, tw, device=device), torch.ones(rows, L, dtype=torch.long, device=device))

    def timed(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best / rows

    pixel = timed(lambda: dec(x, t, z))
    prior_s = timed(lambda: prior(*px))
    return {"rows": rows, "pixel_seconds_per_eval": pixel, "prior_seconds_per_eval": prior_s,
            "prior_over_pixel": prior_s / pixel}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (or demo)")
    p.add_argument("--data", help="labelled folder DIR/CLASS_NAME/*.png")
    p.add_argument("--make-shapes", metavar="OUT", help="write a 4-class shapes labelled folder and exit")
    p.add_argument("--make-digits", metavar="OUT", help="write scikit-learn's digits as a labelled folder and exit")
    p.add_argument("--make-emoji", metavar="OUT", help="write 10 emoji classes as a labelled folder and exit")
    p.add_argument("--emoji-data", default="data/emoji",
                   help="the emoji set folder (built by scripts/emoji_set.py) for --make-emoji")
    p.add_argument("--per-class", type=int, default=10, help="images per class for --make-emoji")
    p.add_argument("--limit", type=int, help="first N images (classes balanced)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the model's methods (default: all)")
    p.add_argument("--template", default=None, help="prompt template with {}")
    p.add_argument("--pairs", type=int, default=16, help="shared (t, noise) pairs per class in the error tables")
    p.add_argument("--budgets", default="1,2,4,6,8,12,16", help="naive diffusion / prior samples per class")
    p.add_argument("--schedules", default="2:3,8:1;4:2,12:1;2:5,4:2,8:1",
                   help="top-k adaptive schedules (samples:keep), ';'-separated")
    p.add_argument("--confidence", default="1,1.5,2,2.5,3", help="confidence-elimination z values, ','-separated")
    p.add_argument("--confidence-stages", default=None, help="pairs per racing round (default: the CLI's)")
    p.add_argument("--cascade-prior-samples", default="1,2,4",
                   help="cascade grid: the prior's pairs per class (K_p), ','-separated")
    p.add_argument("--cascade-shortlist", default="2,3,4,5", help="cascade grid: classes kept by the prior (k)")
    p.add_argument("--cascade-confidence", default="1,1.5,2,2.5,3",
                   help="cascade grid: the pixel race's confidence z values")
    p.add_argument("--t-ranges", default="0-1000;50-900",
                   help="diffusion timestep ranges lo-hi, ';'-separated (one error table each); 50-900 is the "
                   "confidence mode's range for 1000 steps")
    p.add_argument("--weightings", default="uniform,min-snr", help="diffusion timestep weightings to replay")
    p.add_argument("--cache", default=None, help="folder for the class conditions and error tables (resumable)")
    p.add_argument("--check", type=int, default=8, help="images of the end-to-end replay check (0: none)")
    p.add_argument("--batch", type=int, default=16, help="images per scoring call (clip / ar)")
    p.add_argument("--rows-per-forward", type=int, default=80, help="rows per decoder / prior forward")
    p.add_argument("--rows", type=int, default=64, help="rows per forward in the throughput test")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default 1 on CPU)")
    p.add_argument("--add-goals", metavar="JSON", help="write the goals list into an existing results JSON and exit")
    p.add_argument("--out", default="benchmarks/results/zero_shot", help="output prefix: OUT.json and OUT.png")
    args = p.parse_args()
    if args.add_goals:
        add_goals(Path(args.add_goals))
        return
    if args.make_shapes:
        make_shapes(Path(args.make_shapes))
        print(f"wrote {args.make_shapes}")
        return
    if args.make_digits:
        make_digits(Path(args.make_digits))
        print(f"wrote {args.make_digits}")
        return
    if args.make_emoji:
        make_emoji(Path(args.make_emoji), Path(args.emoji_data), args.per_class)
        print(f"wrote {args.make_emoji}")
        return
    if not (args.model and args.data):
        p.error("--model and --data are required (or --make-shapes / --make-digits / --make-emoji)")
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    md = open_model_dir(args.model)
    data = open_labelled(args.data, limit=args.limit)
    prompts = expand_classes(data.classes, args.template)
    methods = supported_methods(md)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            p.error(f"{md.path} supports {methods}, not {unknown}")
        methods = [m for m in methods if m in wanted]
    cache = Path(args.cache) if args.cache else None
    points, costs, tables = [], {}, {}
    cost = None
    if "diffusion" in methods:
        cost = prior_pixel_cost(md, device, args.rows_per_forward, args.repeats)
        print(f"seconds per evaluation: pixel decoder {cost['pixel_seconds_per_eval']:.5f}, prior "
              f"{cost['prior_seconds_per_eval']:.6f} ({cost['prior_over_pixel']:.3f}x)")
    print(f"device: {device_name(device)}; {len(data)} images, {len(data.classes)} classes; methods: {methods}")
    for m in methods:
        if m in ("diffusion", "prior"):
            if cost is None:  # prior without a decoder: time the prior alone
                cost = {"prior_seconds_per_eval": float("nan"), "pixel_seconds_per_eval": float("nan")}
            pts, costs[m], tables[m] = diffusion_points(md, data, prompts, args, device, cache, m,
                                                        cost["pixel_seconds_per_eval" if m == "diffusion" else
                                                             "prior_seconds_per_eval"])
        else:
            clf = load_classifier(md, m, device=str(device))
            pts = [{"label": m, "method": m, "kind": m, **run_point(clf, data, prompts, args.batch)}]
        for r in pts:
            points.append(r)
            print(f"{r['label']:<44} acc {r['accuracy']:.3f}  evals/img {r['evals_per_image']:8.2f}  "
                  f"s/img {r['seconds_per_image']:.4f}", flush=True)
    study = full_range = None
    if "diffusion" in methods and "prior" in methods:
        full_range = max((r for r in tables["diffusion"] if r[0] == 0), key=lambda r: r[1], default=None)
    if full_range is not None:
        pixel_table, prior_table = tables["diffusion"][full_range], tables["prior"][None]
        study = cascade_study(pixel_table, prior_table, data, args, cost, f" t {full_range[0]}-{full_range[1]}")
        points += full_set_cascade(pixel_table, prior_table, data, args, cost, study)
        print_study(study)
    add_paired(points, data.labels)
    for r in points:
        if r["method"] == "cascade":
            print(f"{r['label']:<44} acc {r['accuracy']:.3f}  evals/img {r['evals_per_image']:8.2f} "
                  f"(pixel {r['pixel_evals_per_image']:.2f} + prior {r['prior_evals_per_image']:.0f}; cost-weighted "
                  f"{r['cost_weighted_evals_per_image']:.2f})  all {len(data)} images", flush=True)
    tp = check = ccheck = None
    if "diffusion" in methods:
        if args.check:
            check = replay_check(md, data, prompts, args, device, cache, min(args.check, len(data)))
            print(f"replay check on {check['images']} images: same predictions {check['same_predictions']}, same "
                  f"evaluations {check['same_evals']}, max |score diff| {check['max_abs_score_diff']:.3g}")
            if study and study.get("chosen"):
                ccheck = cascade_check(md, data, prompts, args, device, cache, min(args.check, len(data)),
                                       study["chosen"][0], pixel_table, prior_table)
                print(f"cascade check on {ccheck['images']} images: same predictions {ccheck['same_predictions']}, "
                      f"same shortlists {ccheck['same_shortlists']}, same evaluations {ccheck['same_evals']}, max "
                      f"|score diff| {ccheck['max_abs_score_diff']:.3g}")
        tp = throughput(load_classifier(md, "diffusion", device=str(device)), args.rows, args.repeats)
        print(f"throughput: batched scoring {tp['scoring_rows_per_s']:.1f} rows/s, plain forward "
              f"{tp['plain_forward_rows_per_s']:.1f} rows/s (scoring / plain = {tp['overhead']:.2f})")
    if "diffusion" in methods and "prior" in methods:
        cost.update(prior_pixel_ratios(points))
        print(f"prior / pixel: {cost['prior_over_pixel']:.3f} x the seconds per evaluation; " + cost["note"])
    for r in points:
        r.pop("predictions", None)
    out = {"benchmark": "zero_shot", "device": device_label(device), "device_type": device.type,
           "device_name": device_name(device), "torch": torch.__version__, "config": vars(args),
           "model": str(md.path), "data": str(args.data), "n": len(data), "classes": data.classes,
           "table_seconds_per_row": costs, "points": points, "replay_check": check, "prior_vs_pixel": cost,
           "throughput": tp, "cascade_split": study, "cascade_check": ccheck}
    out["goals"] = zero_shot_goals(out)
    out["rows"] = points
    for g in out["goals"]:
        print(f"goal [{g['status']}] {g['name']}: {g['measured']} {g['unit']} (goal {g['goal']}) -- {g['note']}")
    Path(args.out + ".json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    try:
        plot(points, methods, data, args, device)
        print(f"wrote {args.out}.json and {args.out}.png")
    except ImportError:
        print(f"wrote {args.out}.json (matplotlib not installed: no plot)")


def plot(points: list[dict], methods: list[str], data, args, device) -> None:
    """Accuracy against evaluations per image (log x): one line per method, kind and timestep range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for q in points:
        if q.get("weighting") not in (None, "uniform", "x0"):
            continue
        tr = f" t {q['t_range'][0]}-{q['t_range'][1]}" if q.get("t_range") else ""
        groups.setdefault(f"{q['method']} {q['kind']}{tr}" if q["kind"] != q["method"] else q["method"], []).append(q)
    for name, pts in groups.items():
        pts = sorted(pts, key=lambda q: q["evals_per_image"])
        style = {"naive": "o-", "top-k": "s--", "confidence": "^-", "cascade": "*"}.get(pts[0]["kind"], "D")
        label = name + (" (pixel + prior evaluations)" if pts[0]["kind"] == "cascade" else "")
        ax.plot([q["evals_per_image"] for q in pts], [q["accuracy"] for q in pts], style, label=label,
                ms=9 if pts[0]["kind"] == "cascade" else 4)
        if pts[0]["kind"] == "cascade":
            ax.plot([q["cost_weighted_evals_per_image"] for q in pts], [q["accuracy"] for q in pts], "*",
                    mfc="none", ms=9, label=name + " (cost-weighted, pixel units)")
    ax.axhline(1 / len(data.classes), color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations per image")
    ax.set_ylabel("accuracy")
    ax.set_title(f"zero-shot on {Path(args.data).name}, {len(data)} images ({device_name(device)})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
    main()
