"""An offline English corpus: the summary sentences of the running Python's standard-library docstrings.

Provenance: CPython's `Lib/` sources, as installed with the interpreter (PSF License Agreement,
https://docs.python.org/3/license.html), present on every machine that can run this package, so
the corpus needs no download. A docstring's first sentence is short, formulaic English ("Return
the number of items in the queue."): a style a 3-layer model can learn to write within an hour of
CPU time, where whole docstrings or source files only get it to word salad.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

LICENSE = "Python Software Foundation License (CPython standard library sources)"
SOURCE = "first sentences of the CPython standard library's docstrings"
SKIPPED_PARTS = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def summary(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, if it is plain prose."""
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = re.sub(r"\s+", " ", paragraph).strip()
    sentence = re.match(r"(.+?[.!?])(\s|$)", text)
    text = sentence.group(1) if sentence else text
    if not 15 <= len(text) <= 200 or ">>>" in text or not text[0].isupper():
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    return text if letters / len(text) > 0.85 else None


def docstrings(root: Path | None = None) -> Iterator[str]:
    """Docstrings of modules, classes and functions in a deterministic order (sorted paths, source order)."""
    root = root or stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        if any(part in SKIPPED_PARTS for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if doc := ast.get_docstring(node):
                    yield doc


def build(max_bytes: int | None = None) -> list[str]:
    """Unique summary sentences up to `max_bytes` of text."""
    seen: set[str] = set()
    out: list[str] = []
    size = 0
    for doc in docstrings():
        text = summary(doc)
        if text is None:
            continue
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
