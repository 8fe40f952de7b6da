"""An offline English corpus: the docstrings of the running Python's standard library.

Provenance: CPython's `Lib/` sources, as installed with the interpreter (PSF License Agreement,
https://docs.python.org/3/license.html). Docstrings are plain English prose about programming,
available on every machine that can run this package, so the corpus needs no download.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

LICENSE = "Python Software Foundation License (CPython standard library sources)"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _clean(doc: str) -> str | None:
    lines = [ln.strip() for ln in doc.strip().splitlines()]
    text = " ".join(ln for ln in lines if ln)
    text = re.sub(r"\s+", " ", text)
    # Keep prose: enough words, mostly letters, no doctest transcripts.
    if len(text) < 40 or ">>>" in text:
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    return text if letters / len(text) > 0.85 else None


def docstrings(root: Path | None = None) -> Iterator[str]:
    """Cleaned docstrings in a deterministic order (sorted paths, source order)."""
    root = root or stdlib_dir()
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo")
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and (text := _clean(doc)):
                    yield text


def build(max_bytes: int | None = None) -> list[str]:
    """Unique docstrings up to `max_bytes` of text."""
    seen: set[str] = set()
    out: list[str] = []
    size = 0
    for text in docstrings():
        key = hashlib.sha1(text.encode()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        out.append(text)
        size += len(text) + 1
        if max_bytes is not None and size >= max_bytes:
            break
    return out


def split(texts: list[str], validation_every: int = 20) -> tuple[list[str], list[str]]:
    """Every `validation_every`-th document is held out for validation."""
    val = texts[::validation_every]
    train = [t for i, t in enumerate(texts) if i % validation_every]
    return train, val
