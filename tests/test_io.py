import os

import pytest

import nexttoken.io as io
from nexttoken.io import atomic_folder, atomic_open, write_atomically


class Crash(Exception):
    pass


def test_write_atomically_writes_bytes_text_or_what_a_function_writes(tmp_path):
    assert write_atomically(tmp_path / "a.bin", b"\x00\xff") == tmp_path / "a.bin"
    write_atomically(tmp_path / "b.txt", "naïve — 日本\n")
    write_atomically(tmp_path / "sub" / "c.bin", lambda f: f.write(b"abc" * 3))  # makes the folder
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "b.txt").read_bytes() == "naïve — 日本\n".encode()
    assert (tmp_path / "sub" / "c.bin").read_bytes() == b"abcabcabc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "sub"]


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "ckpt"
    target.write_bytes(b"old contents")

    def half_then_crash(f):
        f.write(b"new contents, half of them")
        f.flush()
        raise Crash

    with pytest.raises(Crash):
        write_atomically(target, half_then_crash)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_readers_see_the_old_file_until_the_block_completes(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("old")
    with atomic_open(target) as f:
        f.write(b"new")
        f.flush()
        assert target.read_text() == "old"
        (staged,) = [p for p in tmp_path.iterdir() if p != target]
        assert staged.name.startswith(".report.txt.") and staged.read_bytes() == b"new"  # beside it
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def test_the_file_is_fsynced_before_it_is_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_atomically(tmp_path / "x", b"data")
    assert events[:2] == ["fsync", "replace"]


def test_atomic_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with atomic_folder(target) as staging:
        assert staging.parent == tmp_path and staging != target
        (staging / "config.json").write_text("{}")
        (staging / "weights").mkdir()
        (staging / "weights" / "w.bin").write_bytes(b"\x01" * 10)
        assert not target.exists()  # nothing at the target while the folder is being written
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "config.json",
        "weights",
        os.path.join("weights", "w.bin"),
    ]
    assert (target / "weights" / "w.bin").read_bytes() == b"\x01" * 10
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_atomic_folder_failure_leaves_the_target_as_it_was(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Crash):
        with atomic_folder(empty) as staging:
            (staging / "half.bin").write_bytes(b"...")
            raise Crash
    assert empty.is_dir() and not any(empty.iterdir())
    with pytest.raises(Crash):
        with atomic_folder(tmp_path / "absent") as staging:
            raise Crash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no staging folder left


def test_atomic_folder_replaces_an_empty_folder_but_never_a_full_one(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty) as staging:
        (staging / "a.txt").write_text("a")
    assert (empty / "a.txt").read_text() == "a"
    with pytest.raises(OSError):
        with atomic_folder(empty) as staging:
            (staging / "b.txt").write_text("b")
    assert [p.name for p in empty.iterdir()] == ["a.txt"]  # the full folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
