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


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "r.json", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_a_symlink_is_followed_and_kept(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"  # the link stays, the file it names is replaced
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


def test_a_pipe_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that opening for writing does not block
    try:
        write_text(fifo, "through")
        assert os.read(r, 100) == b"through"
    finally:
        os.close(r)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # no temporary file left beside it


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    from hpipe.errors import InputError

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(InputError) as e:
        write_text(tmp_path / "r.json", "x")
    assert "r.json" in str(e.value) and "No space left" in str(e.value)
    assert os.listdir(tmp_path) == []
