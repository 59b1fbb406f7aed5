"""genvl.sampling.external: public diffusers checkpoints (unCLIP/Karlo, Kandinsky 2.2), offline.

Each fixture builds a tiny random pipeline from the real diffusers/transformers classes and
writes it with ``save_pretrained``, i.e. in exactly the on-disk format of the public checkpoints
(kakaobrain/karlo-v1-alpha, kandinsky-community/kandinsky-2-2-prior + -decoder). Built once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22CombinedPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    PriorTransformer,
    UNet2DConditionModel,
    UNet2DModel,
    UnCLIPPipeline,
    UnCLIPScheduler,
    VQModel,
)
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from genvl.errors import GenvlError, ModelDirError
from genvl.sampling.external import ExternalPipeline, detect_external

EMBED = 32      # CLIP embedding width = prior width = text hidden size
TEXT_LEN = 16   # tokenizer.model_max_length = text positions = PriorTransformer num_embeddings


# ---------------------------------------------------------------------------- tiny builders
def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: the 256 printable stand-ins for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer built offline: every byte char (and its "</w>" word-final form) + a few merges."""
    chars = _byte_alphabet()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LEN)


def tiny_text_encoder(tok: CLIPTokenizer) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=EMBED, projection_dim=EMBED, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=TEXT_LEN,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_prior() -> PriorTransformer:
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED, num_layers=1, num_embeddings=TEXT_LEN
    )
    # clip_std starts at zero, which would collapse every sampled embedding onto clip_mean
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    return prior.eval()


def build_unclip(out: Path) -> Path:
    """A tiny UnCLIPPipeline (Karlo layout): 8 px decoder, 16 px super-res."""
    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()
    time_embed_dim = 4 * 16  # 4 * decoder block_out_channels[0]
    decoder = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6,  # epsilon + learned variance
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    super_res = dict(
        sample_size=16, layers_per_block=1, in_channels=6, out_channels=3, block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
    )
    pipe = UnCLIPPipeline(
        prior=tiny_prior(),
        decoder=decoder.eval(),
        text_encoder=tiny_text_encoder(tok),
        tokenizer=tok,
        text_proj=UnCLIPTextProjModel(clip_embeddings_dim=EMBED, time_embed_dim=time_embed_dim, cross_attention_dim=24),
        super_res_first=UNet2DModel(**super_res).eval(),
        super_res_last=UNet2DModel(**super_res).eval(),
        prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        ),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    )
    pipe.save_pretrained(out)
    return out


def build_kandinsky_parts() -> tuple[KandinskyV22PriorPipeline, KandinskyV22Pipeline]:
    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=EMBED, projection_dim=EMBED, image_size=32, patch_size=8, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, num_channels=3,
    )
    prior = KandinskyV22PriorPipeline(
        prior=tiny_prior(),
        image_encoder=CLIPVisionModelWithProjection(vision).eval(),
        text_encoder=tiny_text_encoder(tok),
        tokenizer=tok,
        scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample=True, clip_sample_range=10.0
        ),
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
            do_normalize=True, do_resize=True, resample=3,
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        ),
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8,  # epsilon + learned sigma
        addition_embed_type="image", encoder_hid_dim=EMBED, encoder_hid_dim_type="image_proj",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    movq = VQModel(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], in_channels=3, out_channels=3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
        num_vq_embeddings=12, vq_embed_dim=4,
    )
    decoder = KandinskyV22Pipeline(
        unet=unet.eval(),
        scheduler=DDPMScheduler(
            beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
            steps_offset=1, prediction_type="epsilon", thresholding=False,
        ),
        movq=movq.eval(),
    )
    return prior, decoder


def _as_hub_index(pipe_dir: Path) -> None:
    """Write model_index.json entries as the published checkpoints hold them.

    Without torchvision, transformers builds CLIPImageProcessorPil and save_pretrained records that
    class (Kandinsky's index names CLIPImageProcessor); diffusers 0.42 records unCLIP's text_proj as
    ["diffusers", ...] (Karlo's index names ["unclip", ...]).
    """
    index_file = pipe_dir / "model_index.json"
    index = json.loads(index_file.read_text())
    for name, spec in index.items():
        if isinstance(spec, list) and spec[1] == "CLIPImageProcessorPil":
            index[name] = [spec[0], "CLIPImageProcessor"]
        if isinstance(spec, list) and spec[1] == "UnCLIPTextProjModel":
            index[name] = ["unclip", "UnCLIPTextProjModel"]
    index_file.write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Models this small gain nothing from intra-op threads, and on a busy 2-core machine the
    # threads' contention makes each tiny conv ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unclip_dir(tmp_path_factory) -> Path:
    out = build_unclip(tmp_path_factory.mktemp("karlo") / "karlo")
    _as_hub_index(out)
    return out


@pytest.fixture(scope="module")
def kandinsky_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"pair": DIR with prior/ and decoder/, "combined": a KandinskyV22CombinedPipeline DIR}."""
    root = tmp_path_factory.mktemp("kandinsky")
    prior, decoder = build_kandinsky_parts()
    prior.save_pretrained(root / "pair" / "prior")
    decoder.save_pretrained(root / "pair" / "decoder")
    _as_hub_index(root / "pair" / "prior")
    combined = KandinskyV22CombinedPipeline(
        unet=decoder.unet, scheduler=decoder.scheduler, movq=decoder.movq,
        prior_prior=prior.prior, prior_image_encoder=prior.image_encoder, prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer, prior_scheduler=prior.scheduler, prior_image_processor=prior.image_processor,
    )
    combined.save_pretrained(root / "combined")
    _as_hub_index(root / "combined")
    return {"pair": root / "pair", "combined": root / "combined"}


@pytest.fixture(scope="module")
def unclip_pipe(unclip_dir) -> ExternalPipeline:
    return ExternalPipeline.from_dir(unclip_dir)


@pytest.fixture(scope="module")
def kandinsky_pipe(kandinsky_dirs) -> ExternalPipeline:
    return ExternalPipeline.from_dir(kandinsky_dirs["pair"])


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


# ---------------------------------------------------------------------------- detection
def test_detect(unclip_dir, kandinsky_dirs, tmp_path):
    pair = kandinsky_dirs["pair"]
    assert detect_external(unclip_dir) == "unclip"
    assert detect_external(pair) == "kandinsky22"
    assert detect_external(pair / "prior") == "kandinsky22-prior"
    assert detect_external(pair / "decoder") == "kandinsky22-decoder"
    assert detect_external(kandinsky_dirs["combined"]) == "kandinsky22"
    assert detect_external(tmp_path) is None                      # empty directory
    assert detect_external(tmp_path / "nope") is None             # missing
    assert detect_external(unclip_dir / "model_index.json") is None  # a file
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert detect_external(tmp_path) is None


# ---------------------------------------------------------------------------- unCLIP (Karlo)
def test_unclip_generate(unclip_pipe):
    kw = dict(num_images=2, steps=2, prior_steps=2, sr_steps=2, guidance=3.0, prior_guidance=2.0)
    images = unclip_pipe.generate("a red cat", seed=0, **kw)
    assert len(images) == 2
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    again = unclip_pipe.generate("a red cat", seed=0, **kw)
    np.testing.assert_array_equal(_pixels(images), _pixels(again))
    other = unclip_pipe.generate("a red cat", seed=1, **kw)
    assert not np.array_equal(_pixels(images), _pixels(other))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # one batch, different noise


def test_unclip_as_saved_by_diffusers(unclip_dir, unclip_pipe, tmp_path):
    # the index exactly as this diffusers version's save_pretrained writes it loads too
    copy = tmp_path / "karlo"
    shutil.copytree(unclip_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["text_proj"] = ["diffusers", "UnCLIPTextProjModel"]
    (copy / "model_index.json").write_text(json.dumps(index))
    kw = dict(steps=2, prior_steps=2, sr_steps=2, seed=5)
    got = ExternalPipeline.from_dir(copy).generate("a red cat", **kw)
    np.testing.assert_array_equal(_pixels(got), _pixels(unclip_pipe.generate("a red cat", **kw)))


def test_unclip_describe_and_size(unclip_pipe):
    info = unclip_pipe.describe()
    assert info["kind"] == "unclip" and info["image_size"] == [16, 16] and info["size_fixed"]
    comps = info["pipelines"]["unclip"]["components"]
    assert comps["prior"]["class"] == "PriorTransformer" and comps["prior"]["parameters"] > 0
    assert comps["tokenizer"]["class"] == "CLIPTokenizer"
    assert info["parameters"] > 0 and info["embed_dim"] == EMBED
    json.dumps(info)  # plain values only
    with pytest.raises(GenvlError, match="16x16"):
        unclip_pipe.generate("a red cat", steps=2, prior_steps=2, sr_steps=2, size=32)
    with pytest.raises(GenvlError, match="sr_steps must be at least 2"):  # UnCLIPScheduler needs two
        unclip_pipe.generate("a red cat", steps=2, prior_steps=2, sr_steps=1)


# ---------------------------------------------------------------------------- Kandinsky 2.2
def test_kandinsky_pair_generate(kandinsky_pipe):
    kw = dict(num_images=2, steps=2, prior_steps=2, guidance=4.0, prior_guidance=4.0, size=(16, 24))
    images = kandinsky_pipe.generate("a red cat", seed=0, **kw)
    assert len(images) == 2
    assert all(im.size == (24, 16) and im.mode == "RGB" for im in images)  # PIL size is (W, H)
    again = kandinsky_pipe.generate("a red cat", seed=0, **kw)
    np.testing.assert_array_equal(_pixels(images), _pixels(again))
    other = kandinsky_pipe.generate("a red cat", seed=1, **kw)
    assert not np.array_equal(_pixels(images), _pixels(other))


def test_kandinsky_defaults_describe_and_size_check(kandinsky_pipe):
    info = kandinsky_pipe.describe()
    assert info["kind"] == "kandinsky22"
    assert set(info["pipelines"]) == {"prior", "decoder"}
    assert info["pipelines"]["decoder"]["components"]["movq"]["class"] == "VQModel"
    assert info["size_multiple"] == 4  # (2 ** (len(movq blocks) - 1)) ** 2; 64 for the real MoVQ
    assert info["image_size"] == [16, 16]  # unet sample_size 8 * movq factor 2
    images = kandinsky_pipe.generate("", steps=1, prior_steps=2, guidance=1.0, prior_guidance=1.0)  # no CFG
    assert images[0].size == (16, 16)
    with pytest.raises(GenvlError, match="multiples of 4"):
        kandinsky_pipe.generate("a red cat", steps=1, prior_steps=2, size=18)
    with pytest.raises(GenvlError, match="steps must be at least 1"):
        kandinsky_pipe.generate("a red cat", steps=0)
    with pytest.raises(GenvlError, match="prior_steps must be at least 2"):
        kandinsky_pipe.generate("a red cat", prior_steps=1)


def test_kandinsky_combined_and_lone_prior(kandinsky_dirs, kandinsky_pipe):
    kw = dict(steps=2, prior_steps=2, seed=3, size=16)
    reference = _pixels(kandinsky_pipe.generate("a red cat", **kw))
    combined = ExternalPipeline.from_dir(kandinsky_dirs["combined"])
    assert combined.kind == "kandinsky22"
    np.testing.assert_array_equal(_pixels(combined.generate("a red cat", **kw)), reference)  # same weights
    pair = kandinsky_dirs["pair"]
    split = ExternalPipeline.from_dir(pair / "prior", decoder=pair / "decoder")
    np.testing.assert_array_equal(_pixels(split.generate("a red cat", **kw)), reference)


# ---------------------------------------------------------------------------- bad directories
def test_bad_directories(tmp_path, kandinsky_dirs):
    with pytest.raises(ModelDirError, match="no such"):
        ExternalPipeline.from_dir(tmp_path / "missing")
    with pytest.raises(ModelDirError, match="model_index.json"):
        ExternalPipeline.from_dir(tmp_path)
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelDirError, match="StableDiffusionPipeline"):
        ExternalPipeline.from_dir(other)

    pair = kandinsky_dirs["pair"]
    with pytest.raises(ModelDirError, match="missing the decoder"):
        ExternalPipeline.from_dir(pair / "prior")
    with pytest.raises(ModelDirError, match="missing the prior"):
        ExternalPipeline.from_dir(pair / "decoder")

    half = tmp_path / "half"
    shutil.copytree(pair / "prior", half / "prior")
    with pytest.raises(ModelDirError, match="decoder") as err:
        ExternalPipeline.from_dir(half)
    assert str(half) in str(err.value) and "\n" not in str(err.value)


def test_missing_component_and_weights(tmp_path, kandinsky_dirs):
    pair = tmp_path / "pair"
    shutil.copytree(kandinsky_dirs["pair"], pair)
    shutil.rmtree(pair / "decoder" / "movq")
    with pytest.raises(ModelDirError, match="movq") as err:
        ExternalPipeline.from_dir(pair)
    assert str(pair / "decoder") in str(err.value) and "\n" not in str(err.value)

    shutil.copytree(kandinsky_dirs["pair"] / "decoder" / "movq", pair / "decoder" / "movq")
    for weights in (pair / "prior" / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelDirError, match="text_encoder.*weights"):
        ExternalPipeline.from_dir(pair)

    (pair / "prior" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelDirError, match="scheduler_config.json"):
        ExternalPipeline.from_dir(pair)


# ---------------------------------------------------------------------------- through the CLI
@pytest.mark.parametrize("which", ["karlo", "kandinsky"])
def test_genvl_sample_cli_on_external_dirs(which, unclip_dir, kandinsky_dirs, tmp_path, capsys):
    from PIL import Image

    from genvl.cli import main
    from genvl.sampling.io import read_png_metadata

    model = unclip_dir if which == "karlo" else kandinsky_dirs["pair"]
    args = ["sample", "a red cat", "--model", str(model), "--out", str(tmp_path), "--num-images", "2",
            "--steps", "2", "--prior-steps", "2", "--seed", "3", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    paths = [Path(line) for line in capsys.readouterr().out.split() if line.endswith(".png")]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    meta = read_png_metadata(paths[0])
    assert meta["prompt"] == "a red cat" and meta["seed"] == 3 and meta["model"] == str(model)
    assert meta["method"] == ("external:unclip" if which == "karlo" else "external:kandinsky22")
    first = np.asarray(Image.open(paths[0]))
    assert main(args) == 0  # same seed, same image (written beside, never over, the first)
    again = [Path(line) for line in capsys.readouterr().out.split() if line.endswith(".png")]
    assert again[0] != paths[0]
    np.testing.assert_array_equal(first, np.asarray(Image.open(again[0])))
    assert main(["sample", "a red cat", "--model", str(model), "--variations", str(paths[0]), "--no-progress"]) == 2
    assert "genvl model directory" in capsys.readouterr().err
