"""Shared test helpers: fixture paths under ../shared (skipped with a reason when absent), seeded tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny tensors: one thread avoids the oversubscription slowdown measured when two processes share two cores.
torch.set_num_threads(int(os.environ.get("BITSMITH_TEST_THREADS", "1")))

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BITSMITH_SHARED", PROJECT_ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Path of a fixture under ../shared; skips the calling test with a clear reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"fixture {path} not found: the real fixtures live in ../shared beside the project root")
    return path


def engine_python(name: str, env: str) -> str:
    """The Python of a real inference engine's own venv (``$env``, else ``../engines/<name>/bin/python`` beside the
    project); skips the calling test with the install hint when absent. Engines are never project dependencies."""
    path = Path(os.environ.get(env, PROJECT_ROOT.parent / "engines" / name / "bin" / "python"))
    if not path.is_file():
        pytest.skip(f"no {name} venv at {path}: see the README's Deployment section (or set {env})")
    return str(path)


@pytest.fixture
def aidreams() -> str:
    """The real pretrained fixture model aidreams260K (skips without ../shared)."""
    return str(shared_path("models", "aidreams260K"))


@pytest.fixture
def samples() -> str:
    """The in-domain pre-tokenized samples of aidreams260K, a split folder (valid/test)."""
    return str(shared_path("data", "aidreams260K-samples"))


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)
