"""The embedded default corpus: real text that exists on any machine with Python and no network.

Two kinds of documents, in a fixed order so the same machine always yields the same corpus:
- the installed packages' metadata (README-style descriptions from METADATA, licence files): prose,
  with many real near-duplicates (MIT/BSD/Apache licences differ by a name or a year) for dedup to find;
- the running interpreter's standard-library `.py` sources, docstrings included: code plus prose.
Metadata comes first (it is small, at most 40% of the budget), then stdlib files fill the byte budget.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sysconfig
from dataclasses import dataclass
from pathlib import Path

METADATA_SHARE = 0.4
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3", "ensurepip"}


@dataclass(frozen=True)
class DefaultItem:
    """One document of the default corpus: where to load it from (cheap to pickle to a worker)."""

    id: str
    kind: str  # code | prose
    path: str = ""  # a file to read ...
    dist: str = ""  # ... or a distribution whose METADATA description is the text
    nbytes: int = 0


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


def default_items(budget_bytes: int) -> list[DefaultItem]:
    """The deterministic list of default-corpus documents that fits in `budget_bytes`."""
    out: list[DefaultItem] = []
    used = 0
    meta_cap = int(budget_bytes * METADATA_SHARE)
    for item in _metadata_items():
        if used + item.nbytes > meta_cap:
            continue
        out.append(item)
        used += item.nbytes
    for item in _stdlib_items():
        if used + item.nbytes > budget_bytes:
            continue
        out.append(item)
        used += item.nbytes
    return out


def load_item(item: DefaultItem) -> bytes:
    """The raw bytes of one default document (decoded by the caller like any other input)."""
    if item.path:
        return Path(item.path).read_bytes()
    dist = importlib.metadata.distribution(item.dist)
    body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""  # type: ignore[attr-defined]
    return body.encode("utf-8", "replace")
