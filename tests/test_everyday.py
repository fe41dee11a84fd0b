"""Everyday use of the command line: output paths, tables on an 80-column terminal,
small messages, --set overrides, sweeps, cost and the single-device planner."""

from __future__ import annotations

import json

import pytest

from conftest import SCENARIOS

PAPER = str(SCENARIOS / "paper-llama7b.yaml")


# ---- output paths ------------------------------------------------------------
@pytest.mark.parametrize("opt", ["--json", "--trace", "--plot"])
def test_a_folder_as_output_is_exit_2_without_traceback(cli, tmp_path, opt):
    r = cli("simulate", PAPER, opt, str(tmp_path), "-q")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "is a folder" in r.stderr and opt in r.stderr


def test_plan_output_folder_and_missing_folder(cli, tmp_path):
    r = cli("plan", PAPER, "-o", str(tmp_path), "-q")
    assert r.returncode == 2 and "is a folder" in r.stderr and "Traceback" not in r.stderr
    missing = tmp_path / "missing" / "dir"
    r = cli("simulate", PAPER, "--plot", str(missing / "x.png"), "-q")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "missing").exists()  # never created for a typo


def test_plot_format_follows_the_extension(cli, tmp_path):
    for ext, magic in (("svg", b"<?xml"), ("pdf", b"%PDF"), ("png", b"\x89PNG")):
        out = tmp_path / f"g.{ext}"
        r = cli("simulate", PAPER, "--plot", str(out), "-q")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes().startswith(magic), ext
    r = cli("simulate", PAPER, "--plot", str(tmp_path / "g.gif"), "-q")
    assert r.returncode == 2 and ".png" in r.stderr and not (tmp_path / "g.gif").exists()


def test_two_outputs_on_stdout_are_refused(cli):
    r = cli("simulate", PAPER, "--json", "-", "--trace", "-")
    assert r.returncode == 2 and "stdout" in r.stderr and r.stdout == ""


def test_refused_output_leaves_the_other_outputs_unwritten(cli, tmp_path):
    # checked before any work: the good --json is not written when --plot is bad
    r = cli("simulate", PAPER, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "x.bmp"), "-q")
    assert r.returncode == 2 and not (tmp_path / "r.json").exists()
