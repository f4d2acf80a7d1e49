"""Whole-or-nothing writes: a failed write leaves the old file and no temporary behind; a written
file has the mode a plain ``open`` gives (not ``mkstemp``'s private 0600); a folder swap keeps the
old folder until the new one is in place."""
from __future__ import annotations

import os
import stat

import pytest

from xmllm.files import atomic, replace_dir, write_atomic


def _plain_mode(tmp_path) -> int:
    plain = tmp_path / "plain"
    plain.write_text("x")
    return stat.S_IMODE(plain.stat().st_mode)


def test_written_files_read_like_plain_ones(tmp_path):
    write_atomic(tmp_path / "a.txt", "é\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "é\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    for name in ("a.txt", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == _plain_mode(tmp_path)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_atomic(target, "old")

    def half(fh):
        fh.write("new and incomplete")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic(target, half)
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_replace_dir_swaps_whole_folders(tmp_path):
    final, staged = tmp_path / "site", tmp_path / "staged"
    final.mkdir()
    (final / "old.html").write_text("old")
    staged.mkdir()
    (staged / "new.html").write_text("new")
    replace_dir(staged, final)
    assert sorted(os.listdir(final)) == ["new.html"] and not staged.exists()
    assert sorted(os.listdir(tmp_path)) == ["site"]  # the old folder, renamed aside, is gone
    again = tmp_path / "again"
    again.mkdir()
    replace_dir(again, final, old=tmp_path / ".old-site")
    assert os.listdir(final) == [] and sorted(os.listdir(tmp_path)) == ["site"]
