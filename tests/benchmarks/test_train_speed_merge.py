"""``benchmarks/train_speed.py --merge``: a partial rerun updates only what it measured."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import train_speed  # noqa: E402
from train_common import device_name  # noqa: E402

CPU = torch.device("cpu")


def _old(tmp_path: Path, device: str | None = None, size: str = "small") -> Path:
    path = tmp_path / "train_speed.json"
    path.write_text(json.dumps({
        "device": device or device_name(CPU), "size": size, "config": {"skip": ""},
        "rows": [
            {"stage": "lm", "variant": "fp32 eager", "step_s": 0.30, "mfu_pct": 1.0},
            {"stage": "lm", "variant": "bf16 compile", "step_s": 0.10, "mfu_pct": 3.0},
            {"stage": "lm", "variant": "genvl train loop (fp32 eager)", "ratio": 0.80},
            {"stage": "clip", "variant": "fp32 eager", "step_s": 0.20, "mfu_pct": 2.0},
        ],
        "goals": [
            {"name": "lm MFU", "measured": None, "note": "best variant: bf16 compile"},
            {"name": "lm train loop / bare step", "measured": 0.80},
            {"name": "clip train loop / bare step", "measured": 0.99},
        ],
        "stages": {"lm": {"batch": 8}, "clip": {"batch": 16}},
    }))
    return path


def test_merge_replaces_what_was_measured_and_keeps_the_rest(tmp_path):
    path = _old(tmp_path)
    rows = [{"stage": "lm", "variant": "fp32 eager", "step_s": 0.25, "mfu_pct": 1.2},
            {"stage": "lm", "variant": "genvl train loop (fp32 eager)", "ratio": 0.97}]
    goals = [{"name": "lm MFU", "measured": None, "note": "best variant: fp32 eager"},
             {"name": "lm train loop / bare step", "measured": 0.97}]
    rows, goals, stages, info = train_speed.merge_previous(str(path), CPU, "small", rows, goals,
                                                           {"lm": {"batch": 8, "flops_per_step": 5}})
    by = {(r["stage"], r["variant"]): r for r in rows}
    assert by[("lm", "fp32 eager")]["step_s"] == 0.25 and "from_earlier_run" not in by[("lm", "fp32 eager")]
    assert by[("lm", "genvl train loop (fp32 eager)")]["ratio"] == 0.97
    assert by[("lm", "bf16 compile")]["from_earlier_run"] is True  # not rerun: kept
    assert by[("clip", "fp32 eager")]["from_earlier_run"] is True
    assert [r["stage"] for r in rows] == sorted((r["stage"] for r in rows), key=["lm", "clip"].index)
    g = {x["name"]: x for x in goals}
    assert g["lm train loop / bare step"]["measured"] == 0.97
    # the old MFU goal names a variant (bf16 compile) this run skipped, so it stays
    assert g["lm MFU"]["note"] == "best variant: bf16 compile" and g["lm MFU"]["from_earlier_run"]
    assert g["clip train loop / bare step"]["measured"] == 0.99
    assert len(goals) == 3 and stages["lm"]["flops_per_step"] == 5 and stages["clip"]["batch"] == 16
    assert info["kept_rows"] == 2 and info["kept_goals"] == 2


def test_merge_without_a_file_writes_the_run_alone(tmp_path):
    rows, goals, stages, info = train_speed.merge_previous(str(tmp_path / "none.json"), CPU, "small",
                                                           [{"stage": "lm", "variant": "a"}], [], {})
    assert info is None and rows == [{"stage": "lm", "variant": "a"}]


@pytest.mark.parametrize("device,size", [("NVIDIA H100 80GB HBM3", "small"), (None, "base")])
def test_merge_refuses_another_device_or_size(tmp_path, device, size):
    path = _old(tmp_path, device=device, size=size)
    with pytest.raises(SystemExit, match="--merge"):
        train_speed.merge_previous(str(path), CPU, "small", [], [], {})


def test_merge_drops_rows_of_variants_no_longer_measured(tmp_path):
    path = _old(tmp_path)
    rows, _, _, _ = train_speed.merge_previous(str(path), CPU, "small", [], [], {}, known={"fp32 eager"})
    assert {(r["stage"], r["variant"]) for r in rows} == {
        ("lm", "fp32 eager"), ("lm", "genvl train loop (fp32 eager)"), ("clip", "fp32 eager")}
