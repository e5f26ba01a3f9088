"""English text for harvesting, offline and deterministic: texts every CPython install ships.

Three kinds of prose, interleaved document by document so any prefix of the file mixes them:

- ``reference``: the Python Language Reference sections behind ``help('TOPIC')``
  (``pydoc_data.topics``);
- ``docstrings``: the docstrings of the standard library's modules, classes and functions;
- ``licenses``: CPython's ``LICENSE.txt`` (its history and licence texts), plus the licence
  texts in ``/usr/share/common-licenses`` where the system has them.

The output is a ``.txt`` of documents separated by blank lines (what ``sweep harvest
dataset=FILE.txt`` reads); a document is up to ``doc_chars`` characters of whole paragraphs.
The same Python gives the same file.
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from collections.abc import Iterable, Iterator
from itertools import zip_longest
from pathlib import Path

SYSTEM_LICENSES = Path("/usr/share/common-licenses")
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "tkinter"}


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def reference_texts() -> Iterator[str]:
    """Sections of the Python Language Reference, by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _docstrings(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:
                yield doc


def docstring_texts() -> Iterator[str]:
    """Long docstrings of the standard library, one text per module (sorted by path)."""
    root = _stdlib()
    for f in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(f.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = list(_docstrings(tree))
        if docs:
            yield "\n\n".join(docs)


def license_texts() -> Iterator[str]:
    """CPython's LICENSE.txt, then the system's licence texts (if any), sorted by name."""
    files = [_stdlib() / "LICENSE.txt"]
    if SYSTEM_LICENSES.is_dir():
        files += sorted(p for p in SYSTEM_LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    for f in files:
        if f.is_file():
            yield f.read_text(encoding="utf-8", errors="replace")


def documents(texts: Iterable[str], doc_chars: int) -> Iterator[str]:
    """Texts cut into documents of whole paragraphs (at most ``doc_chars`` unless one
    paragraph is longer), with no blank line inside a document."""
    for text in texts:
        doc: list[str] = []
        size = 0
        for para in inspect.cleandoc(text).split("\n\n"):
            para = "\n".join(line.rstrip() for line in para.splitlines() if line.strip())
            if not para:
                continue
            if doc and size + len(para) > doc_chars:
                yield "\n".join(doc)
                doc, size = [], 0
            doc.append(para)
            size += len(para) + 1
        if doc:
            yield "\n".join(doc)


SOURCES = {"reference": reference_texts, "docstrings": docstring_texts, "licenses": license_texts}


def interleaved(doc_chars: int = 3000) -> Iterator[str]:
    """Documents of every source, taken in turn (a source that runs out is skipped)."""
    streams = [documents(src(), doc_chars) for src in SOURCES.values()]
    for row in zip_longest(*streams):
        yield from (d for d in row if d is not None)


def build_corpus(path: str | Path, max_chars: int = 800_000, doc_chars: int = 3000) -> Path:
    """Write at most ``max_chars`` characters of :func:`interleaved` documents to ``path``
    (blank-line separated); returns the path. About 4 characters make one SmolLM2 token."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts, size = [], 0
    for doc in interleaved(doc_chars):
        if size + len(doc) > max_chars:
            break
        parts.append(doc)
        size += len(doc) + 2
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import sys

    out = build_corpus(sys.argv[1] if len(sys.argv) > 1 else "/tmp/frontier/text.txt")
    print(f"{out}: {out.stat().st_size} bytes")
