"""Corpus loading: the standard-library default, a user's file or directory, and clear errors."""

from __future__ import annotations

import pytest

from heavytail.workload.corpus import STDLIB_SKIP, corpus_files, load_corpus, stdlib_path


def test_stdlib_corpus_is_deterministic_prose_and_code():
    a = load_corpus(max_bytes=200_000)
    b = load_corpus(max_bytes=200_000)
    assert a == b
    assert 150_000 < len(a.encode()) <= 200_000
    assert " the " in a and "def " in a


def test_stdlib_files_are_sorted_and_skip_tests_and_third_party():
    root = stdlib_path()
    files = corpus_files(root, suffixes=(".py",), skip=STDLIB_SKIP)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert len(rel) > 100
    assert not any(set(r.split("/")[:-1]) & STDLIB_SKIP for r in rel)


def test_max_bytes_cuts_at_a_line_break():
    text = load_corpus(max_bytes=5_000)
    assert len(text.encode()) <= 5_000
    assert text.endswith("\n")


def test_user_file(tmp_path):
    f = tmp_path / "notes.rst"  # any suffix is read when a file is named
    f.write_text("one line\nsecond line\n")
    assert load_corpus(f) == "one line\nsecond line\n"
    assert load_corpus(f, max_bytes=12) == "one line\n"
    (tmp_path / "long.txt").write_text("x" * 100)
    assert load_corpus(tmp_path / "long.txt", max_bytes=10) == "x" * 10


def test_user_directory_reads_text_files_in_path_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "z.py").write_text("zed\n")
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub" / "m.md").write_text("mid\n")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    (tmp_path / "empty.txt").write_text("")
    assert load_corpus(tmp_path) == "alpha\n\nmid\n\nzed\n"


def test_invalid_utf8_is_replaced(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9\n".encode("latin-1"))
    assert load_corpus(f) == "caf\ufffd\n"


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(missing)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty_dir)
    (empty_dir / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="holds no text.*empty"):
        load_corpus(empty_dir)
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus(max_bytes=0)
