"""Nothing genvl runs writes inside its installed package: every writer of a model directory
refuses a path there, so the built-in demo cannot be changed by evaluating or training into it."""

import hashlib

import pytest

from genvl.checkpoint import BUILTIN, PACKAGE_ROOT, record_metrics, save_model_dir, write_meta
from genvl.errors import ModelDirError


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_writers_refuse_the_package_and_leave_it_unchanged():
    demo = BUILTIN["demo"]
    before = _digest(demo)
    with pytest.raises(ModelDirError, match="inside the installed genvl package"):
        record_metrics(demo, "retrieval", {"r@1": 1.0})
    with pytest.raises(ModelDirError, match="inside the installed genvl package"):
        write_meta(demo, {"components": {}})
    with pytest.raises(ModelDirError, match="inside the installed genvl package"):
        save_model_dir(PACKAGE_ROOT / "assets" / "mine", {})
    assert not (PACKAGE_ROOT / "assets" / "mine").exists()
    assert _digest(demo) == before


def test_evaluate_on_the_builtin_demo_leaves_the_package_byte_identical(shapes_dir, tmp_path, capsys):
    from genvl.cli import main

    before = _digest(PACKAGE_ROOT)
    js = tmp_path / "r.json"
    assert main(["evaluate", "retrieval", "--data", str(shapes_dir), "--limit", "4", "--json", str(js),
                 "--no-progress"]) == 0
    assert js.is_file()
    assert main(["evaluate", "retrieval", "--data", str(shapes_dir), "--limit", "4", "--record", "--no-progress"]) == 2
    assert "inside the installed genvl package" in capsys.readouterr().err
    assert _digest(PACKAGE_ROOT) == before
