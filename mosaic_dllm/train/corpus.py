"""An offline corpus: the Python sources of the running interpreter's standard library.

Provenance: CPython's `Lib/` sources, as installed with the interpreter (PSF License Agreement,
https://docs.python.org/3/license.html). About 11 MB of code, comments and docstrings, present on
every machine that can run this package, so the corpus needs no download. Code is what a
3-layer model can learn to write recognisably within an hour of CPU time (English prose of the
same size only gets it to word salad).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

LICENSE = "Python Software Foundation License (CPython standard library sources)"
SOURCE = "Python sources of the CPython standard library (Lib/, without tests and demos)"
SKIPPED_PARTS = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def modules(root: Path | None = None, max_file_bytes: int = 200_000) -> Iterator[str]:
    """Module sources in a deterministic order (sorted paths); very large generated files are skipped."""
    root = root or stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        if any(part in SKIPPED_PARTS for part in path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 0 < len(text) <= max_file_bytes:
            yield text.replace("\t", "    ")


def build(max_bytes: int | None = None) -> list[str]:
    """Unique module sources up to `max_bytes` of text."""
    seen: set[str] = set()
    out: list[str] = []
    size = 0
    for text in modules():
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
