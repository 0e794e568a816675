"""The embedded default corpus: real text that exists on any machine with Python and no network.

Three parts (each document's `group`, the second part of its id), in a fixed order so the same machine
always yields the same corpus:
- prose: English books in the public domain shipped inside the package (data/prose/books.jsonl.xz, listed
  with origin and licence in data/prose/SOURCES.md), one book a document, at most PROSE_SHARE of the budget:
  without them a model trained on this corpus answers an English prompt with code;
- meta: the installed packages' metadata (README-style descriptions from METADATA, licence files), at most
  METADATA_SHARE of the budget, with many real near-duplicates (MIT/BSD/Apache licences differ by a name or a
  year) for dedup to find;
- stdlib: the running interpreter's standard-library `.py` sources, docstrings included: code plus prose;
  they fill the rest of the budget.
Within a part, a document that does not fit what is left of its share is skipped and the next one tried.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import lzma
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from antimatter.errors import UserError

PROSE_FILE = Path(__file__).parent / "prose" / "books.jsonl.xz"
PROSE_SHARE = 0.4
METADATA_SHARE = 0.15
GROUPS = ("prose", "meta", "stdlib")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3", "ensurepip"}


@dataclass(frozen=True)
class DefaultItem:
    """One document of the default corpus: where to load it from (cheap to pickle to a worker)."""

    id: str  # default/GROUP/...
    kind: str  # code | prose
    path: str = ""  # a file to read (for a book: the archive that holds it) ...
    dist: str = ""  # ... or a distribution whose METADATA description is the text
    nbytes: int = 0

    @property
    def group(self) -> str:
        """prose | meta | stdlib: the part of the corpus it belongs to (prepare names its source after it)."""
        return self.id.split("/")[1]


@functools.cache
def _books() -> dict[str, str]:
    """{id: text} of the shipped books, in their file's order (read once per process: ~4 MB)."""
    try:
        with lzma.open(PROSE_FILE, "rt", encoding="utf-8") as f:
            return {rec["id"]: rec["text"] for rec in map(json.loads, f)}
    except (OSError, EOFError, lzma.LZMAError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the embedded corpus's books at {PROSE_FILE} cannot be read ({type(e).__name__}): the "
                        f"installation is incomplete; reinstall antimatter (pip install --force-reinstall "
                        f"antimatter)") from None


@functools.cache
def _prose_items() -> tuple[DefaultItem, ...]:
    return tuple(DefaultItem(id=doc_id, kind="prose", path=str(PROSE_FILE), nbytes=len(text.encode("utf-8")))
                 for doc_id, text in _books().items())


@functools.cache
def _metadata_items() -> tuple[DefaultItem, ...]:
    items: list[DefaultItem] = []
    seen: set[str] = set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        name = (dist.metadata["Name"] or "").lower()
        if not name or name in seen:
            continue
        seen.add(name)
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""  # type: ignore[attr-defined]
        if body.strip():
            items.append(DefaultItem(id=f"default/meta/{name}/README", kind="prose", dist=name,
                                     nbytes=len(body.encode("utf-8", "replace"))))
        for f in sorted(dist.files or [], key=str):
            stem = Path(str(f)).name.upper()
            if stem.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")):
                p = Path(str(dist.locate_file(f)))
                if p.is_file():
                    items.append(DefaultItem(id=f"default/meta/{name}/{Path(str(f)).name}", kind="prose",
                                             path=str(p), nbytes=p.stat().st_size))
    return tuple(items)


@functools.cache
def _stdlib_items() -> tuple[DefaultItem, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS or part in ("test", "tests") for part in rel.parts[:-1]):
            continue
        items.append(DefaultItem(id=f"default/stdlib/{rel.as_posix()}", kind="code", path=str(p),
                                 nbytes=p.stat().st_size))
    return tuple(items)


def _fill(items: tuple[DefaultItem, ...], cap: int) -> list[DefaultItem]:
    """The items, in order, that fit in `cap` bytes (one too large is skipped, the next ones still tried)."""
    out, used = [], 0
    for item in items:
        if used + item.nbytes <= cap:
            out.append(item)
            used += item.nbytes
    return out


def default_items(budget_bytes: int) -> list[DefaultItem]:
    """The deterministic list of default-corpus documents that fits in `budget_bytes`: books, then
    metadata, each up to its share, then standard-library files up to the budget."""
    prose = _fill(_prose_items(), int(budget_bytes * PROSE_SHARE))
    meta = _fill(_metadata_items(), int(budget_bytes * METADATA_SHARE))
    used = sum(i.nbytes for i in prose) + sum(i.nbytes for i in meta)
    return [*prose, *meta, *_fill(_stdlib_items(), budget_bytes - used)]


def fingerprint(budget_bytes: int) -> str:
    """What the corpus of `budget_bytes` is made of, for prepare's manifest: the interpreter (its standard
    library and packages) and the shipped books, without reading the standard library."""
    books = hashlib.sha256(PROSE_FILE.read_bytes()).hexdigest()[:16]
    return f"python-{sys.version.split()[0]}:{sys.prefix}:{budget_bytes}:books-{books}"


def load_item(item: DefaultItem) -> bytes:
    """The raw bytes of one default document (decoded by the caller like any other input)."""
    if item.group == "prose":
        return _books()[item.id].encode("utf-8")
    if item.path:
        return Path(item.path).read_bytes()
    dist = importlib.metadata.distribution(item.dist)
    body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""  # type: ignore[attr-defined]
    return body.encode("utf-8", "replace")
