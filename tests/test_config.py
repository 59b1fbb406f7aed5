import pytest

from genvl.config import apply_overrides, load_config, save_config
from genvl.errors import ConfigError
from genvl.training.config import TrainConfig


def test_yaml_roundtrip(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["lr=3e-4", "data.image_size=64", "model.size=small", "ema_decay=0.99",
                                          "mixed_precision=no", "on_nonfinite=skip"])
    assert cfg.mixed_precision == "no" and cfg.on_nonfinite == "skip"
    assert cfg.lr == pytest.approx(3e-4) and cfg.data.image_size == 64 and cfg.model["size"] == "small"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(TrainConfig, tmp_path / "c.yaml") == cfg


def test_overrides_add_keys_only_inside_dict_fields():
    cfg = apply_overrides(TrainConfig(), ["model.loss=siglip", "model.vision={patch_size: 4}"])
    assert cfg.model == {"size": "tiny", "loss": "siglip", "vision": {"patch_size": 4}}
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        apply_overrides(TrainConfig(), ["lrr=1"])
    with pytest.raises(ConfigError, match="data.nope"):
        apply_overrides(TrainConfig(), ["data.nope=1"])


@pytest.mark.parametrize("item,msg", [("lr", "key=value"), ("batch_size=abc", "integer"), ("ema_decay=[1]", "number")])
def test_bad_values_name_the_problem(item, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_overrides(TrainConfig(), [item])


def test_builtin_recipes_load_and_their_model_keys_check():
    from genvl.training.config import RECIPES_DIR, recipe_names
    from genvl.training.tasks import check_recipe

    names = recipe_names()
    assert "tiny" in names and "demo-decoder" in names and "demo-sr" in names
    for name in names:
        cfg = load_config(TrainConfig, RECIPES_DIR / f"{name}.yaml")
        cfg.validate()
        parts = name.split("-")
        stages = ("clip", "prior", "decoder", "sr", "vqvae", "lm", "interleaved")
        stage = next((part for part in parts if part in stages), "clip")  # demo-decoder-prior: a decoder recipe
        check_recipe(stage, cfg)  # every key of its model section is one its stage knows


def test_recipes_by_name_after_a_plain_install(tmp_path):
    from genvl.training.config import RECIPES_DIR, resolve_recipe

    assert resolve_recipe("tiny") == RECIPES_DIR / "tiny.yaml"
    assert resolve_recipe("configs/demo-decoder.yaml") == RECIPES_DIR / "demo-decoder.yaml"  # an older clone's path
    mine = tmp_path / "tiny.yaml"
    mine.write_text("max_steps: 3\n")
    assert resolve_recipe(mine) == mine  # a file of that name wins
    with pytest.raises(ConfigError, match="no built-in recipe 'demo-decodr' \\(did you mean 'demo-decoder'\\?\\)"):
        resolve_recipe("demo-decodr")
    assert not str(RECIPES_DIR).startswith(str(tmp_path))


def test_unknown_yaml_key_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("batch_sise: 3\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(TrainConfig, tmp_path / "c.yaml")
