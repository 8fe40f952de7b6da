"""An offline code corpus: the running Python's standard-library source files, held out by file.

Provenance: CPython's `Lib/` sources as installed with the interpreter that trains (PSF License
Agreement, https://docs.python.org/3/license.html), present on every machine that can run this
package, so the corpus needs no download. Tests, IDLE, lib2to3, turtledemo and site-packages are
left out, and so are generated tables and data. Whole files are kept (comments, docstrings,
indentation): the model should see code as it is written, in contexts of a thousand tokens and
more. Every `held_out_every`-th file in sorted order is kept out of training for validation and for
the model card's held-out likelihood.
"""

from __future__ import annotations

import ast
import hashlib
import platform
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

LICENSE = "Python Software Foundation License (CPython standard library sources)"
# Tests and demos, plus generated tables and data (the `encodings` charmaps, pydoc's topic text):
# not code as people write it.
SKIPPED_PARTS = (
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "__pycache__",
    "encodings",
    "pydoc_data",
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Corpus:
    """The files of one split, in sorted order, as paths relative to `root`."""

    root: Path
    train: tuple[str, ...]
    held_out: tuple[str, ...]

    def texts(self, names: tuple[str, ...]) -> list[str]:
        return [(self.root / name).read_text(encoding="utf-8") for name in names]

    def describe(self) -> dict:
        """What the model card records: the source, its licence, and a digest of the exact files."""
        digest = hashlib.sha256()
        for name in self.train + self.held_out:
            digest.update(name.encode() + b"\0" + (self.root / name).read_bytes())
        return {
            "source": f"CPython {platform.python_version()} standard library source files ({self.root})",
            "license": LICENSE,
            "train_files": len(self.train),
            "held_out_files": list(self.held_out),
            "train_bytes": sum((self.root / n).stat().st_size for n in self.train),
            "held_out_bytes": sum((self.root / n).stat().st_size for n in self.held_out),
            "sha256": digest.hexdigest(),
        }


def source_files(root: Path) -> list[str]:
    """Readable UTF-8 .py files under `root`, sorted, without the skipped parts."""
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIPPED_PARTS for part in rel.parts):
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        names.append(rel.as_posix())
    return names


def functions(text: str) -> list[str]:
    """Every function definition of a module's source with its decorators, dedented (methods and
    nested functions too): the function stage's samples. A file that does not parse has none."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            out.append(textwrap.dedent("\n".join(lines[first : node.end_lineno])))
    return out


def function_heads(text: str) -> list[str]:
    """Each function's decorators and `def` line, where the signature is one line: prompts as a
    user writes them (ending at the colon, before the line break)."""
    heads = []
    for fn in functions(text):
        lines = fn.split("\n")
        line = next((i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "async def "))), None)
        if line is not None and lines[line].rstrip().endswith(":"):  # (a source whose strings defeat dedent)
            heads.append("\n".join(lines[: line + 1]))
    return heads


def build(root: Path | None = None, held_out_every: int = 20, max_files: int | None = None) -> Corpus:
    """The corpus split by file; `max_files` keeps the first files of the sorted list (quick runs)."""
    root = root or stdlib_dir()
    names = source_files(root)[:max_files]
    held_out = tuple(n for i, n in enumerate(names) if i % held_out_every == held_out_every // 2)
    train = tuple(n for n in names if n not in set(held_out))
    if not train or not held_out:
        raise ValueError(f"{root} has too few Python files for a training and a held-out split")
    return Corpus(root, train, held_out)
