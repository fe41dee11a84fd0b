"""Shared fixtures: paths to the ready scenarios and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


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
