"""Shared fixtures: the golden reference set and tiny checkpoints written by the package itself."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("FISH_S2_GOLDEN", REPO.parent / "shared" / "golden" / "public"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "README.json").is_file():
        pytest.skip(f"golden set not found at {GOLDEN} (set FISH_S2_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from fish_s2.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    from fish_s2.checkpoint import S2Checkpoint

    return S2Checkpoint.load(tiny_checkpoint)
