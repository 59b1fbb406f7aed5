"""genvl.sampling.common: the shared steps, and the sampling modules' public surface."""

import ast
from pathlib import Path

import pytest
import torch

from genvl.errors import GenvlError
from genvl.sampling.common import (
    apply_guidance,
    check_diffusion,
    derive_seed,
    left_pad,
    positions,
    progress_steps,
    resolve_generator,
)

GENVL = Path(__file__).resolve().parents[2] / "genvl"


def test_no_module_imports_private_sampling_names():
    """Sampling's shared steps are public: nothing reaches into a sampling module's underscore names."""
    found = []
    for path in GENVL.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("genvl.sampling"):
                found += [f"{path.relative_to(GENVL)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_guidance_and_seeds():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert torch.equal(apply_guidance(u, c, 1.0), c) and torch.equal(apply_guidance(u, c, 0.0), u)
    assert torch.equal(apply_guidance(u, c, 2.0), torch.tensor([5.0, 3.0]))
    g, seed = resolve_generator(7, None)
    assert seed == 7 and derive_seed(g) == derive_seed(torch.Generator().manual_seed(7))
    mine = torch.Generator()
    assert resolve_generator(None, mine) == (mine, None)
    assert resolve_generator(None, None)[1] is not None  # a fresh seed, reported back
    with pytest.raises(GenvlError, match="seed or a generator"):
        resolve_generator(1, mine)


def test_checks_name_the_bad_setting():
    check_diffusion(3, 1.0, "ddim", prior_steps=2, prior_guidance=4.0, eta=0.5, coarse_start=0.5)
    with pytest.raises(GenvlError, match="prior_steps must be a positive integer"):
        check_diffusion(3, 1.0, "ddim", prior_steps=0)
    with pytest.raises(GenvlError, match="unknown scheduler 'euler'"):
        check_diffusion(3, 1.0, "ddim", prior_scheduler="euler")
    with pytest.raises(GenvlError, match="eta applies to the ddim scheduler only"):
        check_diffusion(3, 1.0, "ddpm", eta=0.5)
    with pytest.raises(GenvlError, match="coarse_start must be in"):
        check_diffusion(3, 1.0, "ddim", coarse_start=0.0)


def test_left_padding_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    seen = []
    assert list(progress_steps(range(3), "x", lambda *a: seen.append(a))) == [0, 1, 2]
    assert seen == [("x", 1, 3), ("x", 2, 3), ("x", 3, 3)]
