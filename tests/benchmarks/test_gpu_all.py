"""``benchmarks/gpu_all.py``: the one-GPU plan fits its budget with the headline goals first, and a
dry run on the CPU records every part (one failing and one running past its cap on purpose) and
goes on."""

from __future__ import annotations

import json
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_all  # noqa: E402

BY_NAME = {p.name: p for p in gpu_all.PARTS}


def test_default_plan_fits_eight_minutes_with_the_headline_goals_first(capsys):
    parts = gpu_all.select_parts(None)
    names = [p.name for p in parts]
    assert names[:4] == ["train_speed-decoder", "train_speed-prior", "train_speed-lm", "train_speed-clip"]
    order = ["sampling_speed", "ar_sampling", "zero_shot", "memory", "data_scale"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
    assert names.index("train_speed-clip") < names.index("sampling_speed")
    assert not {"selftest-fail", "selftest-timeout"} & set(names)
    # one GPU: scaling does not run, and the caps of what runs leave the driver its reserve
    assert gpu_all.planned_cap_total(parts, gpus=1) <= gpu_all.GPU_BUDGET_S - gpu_all.DRIVER_RESERVE_S
    assert gpu_all.planned_cap_total(parts, gpus=2) == gpu_all.planned_cap_total(parts, 1) + BY_NAME["scaling"].cap_s
    # every benchmark script is in the plan (custom_set as one that cannot run in eight minutes)
    scripts = {f.name for f in (ROOT / "benchmarks").glob("*.py") if "__main__" in f.read_text()}
    assert scripts - {"gpu_all.py", "make_table.py"} <= {p.script for p in parts}
    assert gpu_all.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "train_speed.py --device cuda --size base --stages decoder" in listed
    assert f"{gpu_all.planned_cap_total(parts, 1):.0f} s" in listed


def test_every_flag_of_the_plan_exists_in_its_script():
    for part in gpu_all.PARTS:
        if not part.script or part.unavailable:
            continue
        source = (ROOT / "benchmarks" / part.script).read_text()
        for arg in (*part.gpu_args, *part.dry_args, *part.prepare, part.output):
            if arg.startswith("--"):
                negated = arg.startswith("--no-") and f'"--{arg[5:]}"' in source and "BooleanOptionalAction" in source
                assert f'"{arg}"' in source or negated, f"{part.name}: {part.script} has no {arg}"


def test_train_speed_variants_of_the_plan_are_its_variant_names():
    import train_speed

    for stage in ("decoder", "prior", "lm", "clip"):
        part = BY_NAME[f"train_speed-{stage}"]
        for args, gpu in ((part.gpu_args, True), (part.dry_args, False)):
            wanted = args[args.index("--variants") + 1].split(";")
            names = {v.name for dt in (None, "fp32", "bf16") for v in train_speed.variants_for(stage, gpu, dt)}
            assert set(wanted) <= names, (stage, gpu, wanted)


def test_parts_selection_caps_and_skip_rules():
    assert [p.name for p in gpu_all.select_parts("train_speed,selftest-fail")] == [
        "train_speed-decoder", "train_speed-prior", "train_speed-lm", "train_speed-clip", "selftest-fail"]
    assert [p.name for p in gpu_all.select_parts("ar_sampling,sampling_speed")] == ["ar_sampling", "sampling_speed"]
    try:
        gpu_all.select_parts("no_such_part")
    except ValueError as e:
        assert "no_such_part" in str(e)
    else:
        raise AssertionError("an unknown part was accepted")
    capped = gpu_all.apply_caps(gpu_all.select_parts("ar_sampling"), ["ar_sampling=12"], dry=False)
    assert capped[0].cap_s == 12 and capped[0].dry_cap_s == BY_NAME["ar_sampling"].dry_cap_s

    scaling, ar, data = BY_NAME["scaling"], BY_NAME["ar_sampling"], BY_NAME["data_scale"]
    assert gpu_all.not_run(scaling, 1, False, False, [], 480)[0] == "skipped"
    assert gpu_all.not_run(scaling, 2, False, False, [], 480) is None
    assert gpu_all.not_run(scaling, 0, True, False, [], 480)[0] == "skipped"  # a dry run stands for one GPU
    assert gpu_all.not_run(scaling, 0, True, True, [], 480) is None  # unless named
    assert gpu_all.not_run(ar, 0, True, False, [], 480) is None
    assert gpu_all.not_run(ar, 1, False, False, [], 480) is None
    assert gpu_all.not_run(ar, 1, False, False, ["diffusers"], 480)[0] == "failed"
    assert gpu_all.not_run(ar, 1, False, False, ["webdataset"], 480) is None
    assert gpu_all.not_run(data, 1, False, False, ["webdataset"], 480)[0] == "failed"
    assert gpu_all.not_run(ar, 1, False, False, [], 0.4 * ar.cap_s)[0] == "skipped"  # budget spent
    assert gpu_all.not_run(BY_NAME["custom_set"], 1, False, False, [], 480)[0] == "skipped"


def test_check_report_names_the_missing_imports_and_how_to_carry_them():
    info = {"python": "3.12.3", "executable": "/usr/bin/python3", "torch": "2.11.0", "gpus": 1,
            "device": "NVIDIA H100 80GB HBM3", "missing": ["diffusers", "webdataset"]}
    text = gpu_all.check_report(info, gpu_all.select_parts(None))
    assert "missing imports: diffusers, webdataset" in text
    assert re.search(r"data_scale: needs diffusers, webdataset", text)
    assert re.search(r"ar_sampling: needs diffusers$", text, re.M)
    assert "scripts/gpu_wheels.sh" in text and gpu_all.DEVICE_INSTALL in text
    assert "--find-links .wheels" in gpu_all.DEVICE_INSTALL and "-e ." in gpu_all.DEVICE_INSTALL
    assert "every import" in gpu_all.check_report({**info, "missing": []}, [])


def test_goals_of_both_schemas_are_read():
    shared = {"goals": [{"name": "lm MFU", "measured": 41.0, "unit": "% MFU", "goal": ">= 40%", "status": "met",
                         "note": "n"}]}
    own = {"goals": [{"goal": "prior samples/s from embeddings / from images", "measured": 3.1, "target": ">= 5",
                      "met": False}, "not a goal"]}
    assert gpu_all.normalize_goals(shared) == shared["goals"]
    assert gpu_all.normalize_goals(own) == [{"name": "prior samples/s from embeddings / from images",
                                             "measured": 3.1, "unit": "", "goal": ">= 5", "status": "missed",
                                             "note": ""}]


def test_dry_run_records_a_failing_part_and_runs_the_later_ones(tmp_path):
    out, archive = tmp_path / "gpu", tmp_path / "gpu.tar.gz"
    order = ["selftest-fail", "ar_sampling", "selftest-timeout", "train_speed-prior"]
    (out).mkdir()
    (out / "ar_sampling.json").write_text("{}")  # stale: must not pass for this run's
    rc = gpu_all.main(["--dry-run", "--parts", ",".join(order), "--out", str(out), "--archive", str(archive),
                       "--work", str(tmp_path / "work")])
    assert rc == 1  # a part failed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["torch"] and summary["device"].startswith("CPU")
    assert [r["name"] for r in summary["parts"]] == order
    by = {r["name"]: r for r in summary["parts"]}
    fail, slow = by["selftest-fail"], by["selftest-timeout"]
    assert fail["status"] == "failed" and fail["returncode"] == 3 and "failing on purpose" in fail["error_tail"]
    assert slow["status"] == "timeout" and slow["wall_s"] < 20 and "sleeping" in slow["error_tail"]
    for name in ("ar_sampling", "train_speed-prior"):  # after the failure and the timeout: still run, and ok
        rec = by[name]
        assert rec["status"] == "ok", rec
        assert rec["json"] == f"{name}.json" and 0 < rec["wall_s"] < rec["cap_s"]
        result = json.loads((out / rec["json"]).read_text())
        assert result["device_type"] == "cpu" and result["goals"]
        assert [g["name"] for g in rec["goals"]] == [g["name"] for g in result["goals"]]
        assert (out / "logs" / f"{name}.log").read_text().startswith("$ ")
    assert json.loads((out / "ar_sampling.json").read_text())["benchmark"] == "ar_sampling"
    assert "prior MFU" in {g["name"] for g in by["train_speed-prior"]["goals"]}
    assert sorted(p.name for p in out.glob("*.json")) == ["ar_sampling.json", "summary.json",
                                                           "train_speed-prior.json"]

    table = (out / "table.md").read_text()
    for name, status in (("selftest-fail", "failed"), ("ar_sampling", "ok"), ("selftest-timeout", "timeout"),
                         ("train_speed-prior", "ok")):
        assert f"| {name} | {status} |" in table
    assert "| train_speed-prior | prior MFU |" in table
    assert "1 failed, 2 ok, 1 timeout" in table

    with tarfile.open(archive) as tar:
        members = set(tar.getnames())
    assert {"gpu/summary.json", "gpu/table.md", "gpu/ar_sampling.json", "gpu/logs/selftest-fail.log"} <= members
