"""The ``model`` section of a recipe is checked, with a suggestion, before any data or weights load."""

from __future__ import annotations

import pytest

from genvl.cli import main
from genvl.config import apply_overrides
from genvl.errors import ConfigError
from genvl.training import TrainConfig
from genvl.training.recipes import model_keys
from genvl.training.tasks import STAGES, get_task, task_class


@pytest.mark.parametrize("stage,bad,suggested", [
    ("decoder", {"cond_dorp": 0.2}, "cond_drop"),
    ("sr", {"trian_crop": 32}, "train_crop"),
    ("prior", {"num_layer": 2}, "num_layers"),
    ("interleaved", {"max_pair": 2}, "max_pairs"),
    ("vqvae", {"gan_wieght": 1.0}, "gan_weight"),
    ("clip", {"vision": {"hiden_size": 32}}, "hidden_size"),
])
def test_misspelled_model_keys_name_the_closest(stage, bad, suggested):
    cfg = TrainConfig()
    cfg.model = bad
    with pytest.raises(ConfigError, match=f"did you mean '{suggested}'"):
        get_task(stage, cfg)


def test_types_are_checked_and_numbers_coerced():
    cfg = TrainConfig()
    cfg.model = {"cond_drop": "high"}
    with pytest.raises(ConfigError, match="model.cond_drop: expected a number"):
        get_task("decoder", cfg)
    task = get_task("decoder", apply_overrides(TrainConfig(), ["model.cond_drop=1", "model.block_out_channels=[8,16]"]))
    assert task.cfg.model["cond_drop"] == 1.0 and isinstance(task.cfg.model["cond_drop"], float)
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        apply_overrides(TrainConfig(), ["max_step=3"])


def test_every_stage_declares_its_keys():
    for stage in STAGES[1:]:
        keys = model_keys(task_class(stage))
        assert "size" in keys and len(keys) > 5, stage


def test_cli_fails_before_loading_anything(tmp_path, capsys):
    broken = tmp_path / "broken"  # a "model directory" whose weights would not load
    broken.mkdir()
    (broken / "genvl.json").write_text("{not json")
    code = main(["train", "decoder", "--data", str(tmp_path / "no-such-data"), "--init", str(broken),
                 "--out", str(tmp_path / "out"), "--set", "model.cond_dorp=0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "model.cond_dorp" in err and "cond_drop" in err
    assert not (tmp_path / "out").exists()


def test_stage_options_are_a_dataclass_taken_out_of_the_model_section():
    from genvl.training.recipes import take_options
    from genvl.training.tasks.decoder import DecoderOptions

    overrides = {"cond_drop": 0.3, "coarse_size": 4, "size": "small"}
    o = take_options(DecoderOptions, overrides)
    assert (o.cond_drop, o.size, o.coarse_only, o.coarse_fit_steps) == (0.3, "small", False, 2000)
    assert overrides == {"coarse_size": 4}  # the DecoderConfig field stays for the model
    with pytest.raises(ConfigError, match="model.coarse_only: expected true or false"):
        get_task("decoder", apply_overrides(TrainConfig(), ["model.coarse_only=3"]))
    with pytest.raises(ConfigError, match="model.train_crp: not a setting of the sr stage.*train_crop"):
        get_task("sr", apply_overrides(TrainConfig(), ["model.train_crp=8"]))
