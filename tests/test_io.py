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


def test_outputs_written_together_are_all_replaced_or_none(tmp_path, capsys):
    """A full disk or a Ctrl-C while a command's third output is made had left the first
    replaced beside a stale rest (simulate wrote its trace, then failed on the JSON)."""
    from hpipe.io import written_together

    a, b = tmp_path / "a.json", tmp_path / "b.png"
    a.write_text("old a")
    with pytest.raises(KeyboardInterrupt):
        with written_together():
            write_text(a, "new a")
            write_text("-", "to stdout")
            assert a.read_text() == "old a" and capsys.readouterr().out == ""  # nothing yet
            raise KeyboardInterrupt
    assert a.read_text() == "old a" and not b.exists() and capsys.readouterr().out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left
    with written_together():
        write_text(a, "new a")
        with atomic_path(b) as tmp:
            tmp.write_bytes(b"png")
        write_text("-", "to stdout")
        assert a.read_text() == "old a" and not b.exists()
    assert a.read_text() == "new a" and b.read_bytes() == b"png" and capsys.readouterr().out == "to stdout\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]
    with pytest.raises(KeyboardInterrupt):  # a block inside another joins it
        with written_together():
            with written_together():
                write_text(a, "newer a")
            raise KeyboardInterrupt
    assert a.read_text() == "new a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]


def test_simulate_failing_on_its_chart_replaces_none_of_its_outputs(tmp_path, monkeypatch, capsys):
    """simulate --json --trace --plot writes the trace, the chart, then the JSON: a full disk
    at the chart (or a Ctrl-C while it is drawn, seconds on a big scenario) left the new
    trace beside the old JSON.  Now neither is touched, and the chart's file is named."""
    import errno
    import sys

    from hpipe.cli import main

    fsync = os.fsync

    def disk_full_at_the_chart(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_at_the_chart)
    (tmp_path / "r.json").write_text("old result")
    scenario = os.path.join(os.path.dirname(__file__), "..", "scenarios", "paper-llama7b.yaml")
    monkeypatch.setattr(sys, "argv", ["hpipe", "simulate", scenario, "--json", str(tmp_path / "r.json"),
                                      "--trace", str(tmp_path / "t.json"), "--plot", str(tmp_path / "g.png"), "-q"])
    with pytest.raises(SystemExit) as e:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and "g.png" in err and "No space left on device" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert (tmp_path / "r.json").read_text() == "old result"
