"""``benchmarks/make_table.py``: every results file gives rows of the goals table, in the shared schema."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import make_table  # noqa: E402


def test_goals_and_summaries_become_rows(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({
        "benchmark": "a", "device": "CPU (test)",
        "goals": [{"name": "speed", "measured": 5.02, "unit": "x", "goal": ">= 5", "status": "met", "note": "n1"}]}))
    (tmp_path / "b.json").write_text(json.dumps({"benchmark": "b", "device": "CPU (test)",
                                                 "summary": "webdataset: 1779 samples/s", "rows": []}))
    (tmp_path / "c.json").write_text("[1, 2]")
    rows, problems = make_table.collect(tmp_path)
    assert rows[0][:5] == ["a", "speed", "5.02 x", ">= 5", "met"] and rows[0][-1] == "n1"
    assert rows[1][1] == "(no goals recorded in this file)" and rows[1][-1] == "webdataset: 1779 samples/s"
    assert len(rows) == 2 and problems == ["`c.json`: not a JSON object"]


def test_committed_data_scale_goals_use_the_shared_schema():
    d = json.loads((Path(make_table.__file__).parent / "results" / "data_scale.json").read_text())
    for g in d["goals"]:
        assert set(g) == {"name", "measured", "unit", "goal", "status", "note"}
        assert g["status"] in ("met", "missed")
