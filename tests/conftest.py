"""Shared fixtures: paths to the ready scenarios and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


@pytest.fixture(autouse=True, scope="session")
def _private_profile_cache(tmp_path_factory):
    """Profiles the tests measure (and `costmodel: auto` looks for) go to a temporary cache,
    never to the user's ~/.cache; subprocesses inherit it through the environment."""
    old = os.environ.get("HPIPE_CACHE_DIR")
    os.environ["HPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("hpipe-cache"))
    yield
    if old is None:
        os.environ.pop("HPIPE_CACHE_DIR", None)
    else:
        os.environ["HPIPE_CACHE_DIR"] = old


def run_cli(*args: str, timeout: float = 120, env: dict | None = None, cwd: Path | None = None):
    """Run `python -m hpipe ARGS` and return the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "hpipe", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def paper_setup():
    from hpipe.scenario import load_scenario

    return load_scenario(SCENARIOS / "paper-llama7b.yaml").resolve()
