"""`genvl classify --method ...` and `genvl evaluate zero-shot` end to end on a tiny random model
directory (clip, prior, decoder, vqvae, lm): output, JSON, model card, one-line errors."""

import json

import pytest
import torch
from PIL import Image

from conftest import draw_shape
from genvl.checkpoint import save_model_dir
from genvl.cli import main
from genvl.models.clip import CLIP, clip_config
from genvl.models.decoder import Decoder, decoder_config
from genvl.models.lm import TokenLM, lm_config
from genvl.models.prior import DiffusionPrior, prior_config
from genvl.tokenizers.text import train_text_tokenizer
from genvl.tokenizers.vqvae import VQVAE, vqvae_config

FAST = ["--samples", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("zs")
    tok = train_text_tokenizer(["a red circle", "a blue square", "a green cross"] * 5, vocab_size=300,
                               model_max_length=8)
    clip = CLIP(clip_config("tiny", text={"vocab_size": len(tok), "max_position_embeddings": 8, "pad_token_id": 0,
                                          "bos_token_id": 2, "eos_token_id": 3}))
    prior = DiffusionPrior(prior_config("tiny", text_len=8))
    decoder = Decoder(decoder_config("tiny", image_size=8, block_out_channels=[16, 32], attention_head_dim=16,
                                     cross_attention_dim=16, norm_num_groups=4))
    vq = VQVAE(vqvae_config("tiny"))
    lm = TokenLM(lm_config("tiny", text_vocab_size=len(tok), codebook_size=64, image_tokens=16, text_len=8))
    full = save_model_dir(root / "full", {"clip": clip, "prior": prior, "decoder": decoder, "vqvae": vq, "lm": lm},
                          tokenizer=tok).path
    clip_only = save_model_dir(root / "clip_only", {"clip": clip}, tokenizer=tok).path
    data = root / "labelled"
    for color, shape in (("red", "circle"), ("blue", "square")):
        (data / f"{color}_{shape}").mkdir(parents=True)
        for i in range(3):
            draw_shape(color, shape, 32, jitter=2, seed=i).save(data / f"{color}_{shape}" / f"{i}.png")
    (data / "red_circle" / "broken.png").write_bytes(b"not a png")
    (data / "notes.txt").write_text("ignored")
    return {"full": full, "clip_only": clip_only, "data": data}


def _img(tmp_path, name="x.png", color="red", shape="circle"):
    p = tmp_path / name
    draw_shape(color, shape, 32).save(p)
    return str(p)


@pytest.mark.parametrize("method", ["clip", "diffusion", "prior", "ar"])
def test_classify_every_method(dirs, tmp_path, capsys, method):
    a, b = _img(tmp_path, "a.png"), _img(tmp_path, "b.png", "blue", "square")
    out = tmp_path / "r.json"
    assert main(["classify", a, b, "--model", str(dirs["full"]), "--method", method, "--classes",
                 "red circle, blue square", "--template", "a {}", "--json", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert f"{a}: " in text and f"{b}: " in text and "model evaluations per image" in text
    rep = json.loads(out.read_text())
    assert rep["method"] == method and len(rep["results"]) == 2
    probs = rep["results"][0]["probs"]
    assert set(probs) == {"red circle", "blue square"} and sum(probs.values()) == pytest.approx(1, abs=1e-5)
    assert rep["evals_per_image"] == {"clip": 1, "ar": 2, "diffusion": 4, "prior": 4}[method]


def test_classify_adaptive_schedule_and_classes_file(dirs, tmp_path, capsys):
    cf = tmp_path / "classes.txt"
    cf.write_text("red circle\nblue square\n\ngreen cross\n")
    assert main(["classify", _img(tmp_path), "--model", str(dirs["full"]), "--method", "diffusion", "--classes-file",
                 str(cf), "--schedule", "1:2,2:1", "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["evals_per_image"] == 1 * 3 + 2 * 2
    assert "green cross" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--classes", "cat"], "at least two classes"),
    (["--classes", "cat,dog,cat"], "duplicate class"),
    (["--classes", "cat,,dog"], "empty class name"),
    (["--classes", "cat,dog", "--template", "a photo"], "{}"),
    (["--classes", "cat,dog", "--method", "diffusion", "--schedule", "4"], "samples:keep"),
    (["--classes", "cat,dog", "--temperature", "0"], "temperature"),
    ([], "--classes"),
])
def test_classify_bad_input_one_line(dirs, tmp_path, capsys, argv, needle):
    assert main(["classify", _img(tmp_path), "--model", str(dirs["full"]), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_classify_unreadable_image_and_unsupported_method(dirs, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert main(["classify", str(bad), "--model", str(dirs["full"]), "--classes", "a,b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read image" in err and "\n" not in err
    assert main(["classify", _img(tmp_path), "--model", str(dirs["clip_only"]), "--classes", "a,b", "--method",
                 "ar"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--method ar needs the lm and vqvae" in err and "supports: clip" in err and "\n" not in err


def test_evaluate_zero_shot_all_methods(dirs, tmp_path, capsys):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(dirs["full"], model)
    out = tmp_path / "zs.json"
    assert main(["evaluate", "zero-shot", "--model", str(model), "--data", str(dirs["data"]), "--methods", "all",
                 "--template", "a {}", "--json", str(out), "--record", "--no-progress", *FAST]) == 0
    text = capsys.readouterr().out
    assert "1 unreadable skipped" in text and "confusion" in text
    rep = json.loads(out.read_text())
    assert rep["n"] == 6 and rep["skipped"] == 1 and rep["classes"] == ["blue square", "red circle"]
    assert rep["prompts"] == ["a blue square", "a red circle"]
    assert list(rep["methods"]) == ["clip", "diffusion", "prior", "ar"]
    for r in rep["methods"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["temperature_fitted"] > 0
        assert sum(map(sum, r["confusion"])) == 6 and set(r["per_class_accuracy"]) == set(rep["classes"])
        assert r["evals_per_image"] >= 1 and r["seconds"] >= 0
    meta = json.loads((model / "genvl.json").read_text())
    assert {"zero-shot clip", "zero-shot diffusion", "zero-shot prior", "zero-shot ar"} <= set(meta["metrics"])
    assert "zero-shot ar" in (model / "README.md").read_text()
    # --record stores each method's fitted temperature; classify applies it, and its probabilities on
    # the labelled images are graded, not all 0 or 1
    fitted = {m: r["temperature_fitted"] for m, r in rep["methods"].items()}
    assert meta["classify"]["temperature"] == fitted
    cj = tmp_path / "c.json"
    images = sorted(str(p) for p in dirs["data"].rglob("*.png"))[:4]
    assert main(["classify", *images, "--model", str(model), "--classes", "blue square,red circle",
                 "--template", "a {}", "--method", "clip", "--json", str(cj), *FAST]) == 0
    res = json.loads(cj.read_text())
    assert res["temperature"] == pytest.approx(fitted["clip"])
    probs = [p for row in res["results"] for p in row["probs"].values()]
    assert any(0.01 < p < 0.99 for p in probs), probs
    # --limit keeps classes balanced; one method (into the same file: results are replaced only with --overwrite)
    assert main(["evaluate", "zero-shot", "--model", str(model), "--data", str(dirs["data"]), "--method", "prior",
                 "--limit", "2", "--json", str(out), "--overwrite", *FAST]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 2 and list(rep["methods"]) == ["prior"]
    assert sorted(map(sum, rep["methods"]["prior"]["confusion"])) == [1, 1]


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "ar"], "--method ar needs"),
    ([], "labelled image folder not found"),
    (["--methods", "all", "--data", "{one_class}"], "at least two class subfolders"),
])
def test_evaluate_zero_shot_errors(dirs, tmp_path, capsys, argv, needle):
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    argv = [a.replace("{one_class}", str(tmp_path / "one")) for a in argv]
    data = [] if "--data" in argv else ["--data", str(tmp_path / "missing")]
    model = dirs["clip_only"]
    assert main(["evaluate", "zero-shot", "--model", str(model), *data, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
