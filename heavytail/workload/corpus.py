"""The demo corpus: real English-and-code text that every Python install already has, or a user's own files."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

__all__ = ["DEFAULT_MAX_BYTES", "STDLIB_SKIP", "TEXT_SUFFIXES", "corpus_files", "load_corpus", "stdlib_path"]

DEFAULT_MAX_BYTES = 4_000_000
"""About a million word-level tokens; reads and tokenizes in about a second."""

TEXT_SUFFIXES = (".txt", ".py", ".md")
"""File types read from a user's directory."""

STDLIB_SKIP = frozenset(
    {
        "site-packages",  # third-party code: differs between machines, so the corpus would too
        "dist-packages",
        "test",  # the stdlib's own test suite: byte strings, fuzz inputs and 17 MB of asserts
        "tests",
        "idlelib",  # GUI code, and its tests live inside it
        "encodings",  # codec tables: thousands of hex literals, no language
        "pydoc_data",  # one 750 kB dict of escaped help strings
        "turtledemo",
        "__pycache__",
    }
)
"""Directory names skipped anywhere under the standard library (also ``config-*`` build directories)."""


def stdlib_path() -> Path:
    """Where this interpreter's standard library sources live."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(
    root: str | os.PathLike[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES, skip: frozenset[str] = frozenset()
) -> list[Path]:
    """Files under ``root`` with one of ``suffixes``, sorted by relative POSIX path, skipping directories in ``skip``.

    Sorting by relative path (not ``os.walk`` order, which follows the file system) is what makes the corpus, and
    so the demo's data order, the same on every machine with the same Python version.
    """
    root = Path(root)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(suffixes):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return [path for _, path in found]


def load_corpus(path: str | os.PathLike[str] | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Return up to ``max_bytes`` of UTF-8 text: the standard library's ``.py`` sources, or the file/directory ``path``.

    The default corpus is this interpreter's standard library (``sysconfig.get_paths()["stdlib"]``) minus
    :data:`STDLIB_SKIP`: docstrings and comments are English prose, the rest is code, and both have Zipfian
    token frequencies (rank-frequency slope near -1, see :func:`heavytail.workload.tokenizer.zipf_slope`),
    which is what makes a language model's gradients heavy-tailed. Nothing is downloaded. The text differs
    between Python versions, so compare runs on one interpreter.

    ``path`` may be a text file (read whatever its suffix) or a directory, whose ``.txt``, ``.py`` and ``.md``
    files are read in sorted relative-path order. Files are joined with a newline; the file that crosses
    ``max_bytes`` is cut at its last line break under the cap. Undecodable bytes become U+FFFD.

    Raises ``FileNotFoundError`` for a missing ``path`` and ``ValueError`` when it holds no text.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if path is None:
        root = stdlib_path()
        files = corpus_files(root, suffixes=(".py",), skip=STDLIB_SKIP)
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"corpus path does not exist: {root}")
        if root.is_dir():
            files = corpus_files(root)
            if not files:
                raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files under corpus directory {root}")
        else:
            files = [root]

    parts: list[str] = []
    budget = max_bytes
    for file in files:
        with open(file, "rb") as f:
            data = f.read(budget + 1)  # never more than the cap needs: a user may point at a multi-GB file
        if not data.strip():
            continue
        if len(data) + 1 > budget:
            cut = data.rfind(b"\n", 0, budget)
            if cut >= 0:
                data = data[: cut + 1]
            elif not parts:
                data = data[:budget]  # one long line and nothing else yet: a mid-line cut beats an empty corpus
            else:
                break
            if data.strip():
                parts.append(data.decode("utf-8", errors="replace"))
            break
        parts.append(data.decode("utf-8", errors="replace"))
        budget -= len(data) + 1
    text = "\n".join(parts)
    if not text.strip():
        raise ValueError(f"corpus path holds no text: {root}")
    return text
