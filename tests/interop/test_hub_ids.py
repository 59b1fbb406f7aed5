"""Hub ids (owner/name) resolve through the local Hugging Face cache, never the network."""

import shutil

import pytest

from genvl.checkpoint import open_model_dir, resolve_model_path
from genvl.errors import ModelDirError
from tests.conftest import build_tiny_model


def test_hub_id_resolves_to_its_cached_snapshot(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--someone--tiny-genvl" / "snapshots" / commit
    build_tiny_model(tmp_path / "built", parts=("clip",))
    shutil.copytree(tmp_path / "built", snap)
    (cache / "models--someone--tiny-genvl" / "refs").mkdir()
    (cache / "models--someone--tiny-genvl" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("someone/tiny-genvl") == snap
    assert open_model_dir("someone/tiny-genvl").has("clip")
    with pytest.raises(ModelDirError, match=r"someone/absent: no such folder.*hf download someone/absent"):
        resolve_model_path("someone/absent")
    # a local folder of that name wins over the cache
    (tmp_path / "someone" / "tiny-genvl").mkdir(parents=True)
    assert resolve_model_path("someone/tiny-genvl").resolve() == tmp_path / "someone" / "tiny-genvl"
