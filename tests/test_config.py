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


def test_repo_recipes_load():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert recipes, "configs/*.yaml missing"
    for p in recipes:
        load_config(TrainConfig, p).validate()


def test_unknown_yaml_key_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("batch_sise: 3\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(TrainConfig, tmp_path / "c.yaml")
