"""Shared fixtures: paths to the ready scenarios and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent

# Property tests draw the same examples on every run (and save none): a run must not fail on
# a draw no run made before (60 runs of a mutation session drew two real counterexamples, a
# rounding tie and a 5.3% planner gap, both now fixed and kept as @example cases).  A soak
# (HPIPE_TEST_SCALE above 1, see tests/planner_cases.py) draws new ones.
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("soak", database=None)
settings.load_profile("soak" if float(os.environ.get("HPIPE_TEST_SCALE", "1")) > 1 else "fixed")
SCENARIOS = ROOT / "scenarios"


@pytest.fixture(autouse=True, scope="session")
def _plain_output():
    """Tests read what hpipe prints to a pipe: rich takes a pipe for a terminal where
    FORCE_COLOR or TTY_COMPATIBLE is set (some CI systems set the first), and then colours and
    wraps at 80 columns.  The tests that want a terminal make one (tests/pty_helpers.py)."""
    names = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "JUPYTER_COLUMNS", "JUPYTER_LINES")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    yield
    os.environ.update(saved)


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
