"""Outputs are written whole or not at all."""

import os

import pytest

from hpipe.io import atomic_path, write_text


def test_write_replaces_whole(tmp_path):
    p = tmp_path / "out" / "r.json"
    write_text(p, '{"a": 1}')
    write_text(p, '{"a": 2}')
    assert p.read_text() == '{"a": 2}'
    assert os.listdir(p.parent) == ["r.json"]


def test_failure_midway_keeps_the_old_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("interrupted")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.json"]


def test_dash_is_stdout(capsys):
    write_text("-", "x")
    assert capsys.readouterr().out == "x\n"
