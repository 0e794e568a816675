"""The train/val split: each source gives val the same share of its bytes, so val looks like train.

nanoGPT holds out the last 10% of its one Shakespeare text; that assumes one kind of text. A corpus of
several sources (books, package metadata, source code) is not one kind: drawing a share of *documents*
lets val be whatever a few draws give (a third of it codec tables, say) and gives val nothing of a source
made of a few long books. So prepare splits bytes, source by source (a record's `source` field: the
source's name; the embedded corpus's parts are default/prose, default/meta and default/stdlib):

- a document of TAIL_MIN_BYTES or more (a book, a long module) is cut in two, as nanoGPT cuts its text:
  its last `val_fraction` of bytes, from the nearest paragraph boundary (else line, else word), goes to
  val as `ID#tail`, the rest to train as `ID`; every long document is then read in both splits;
- a shorter document goes whole: in the order of a seeded hash of its text, each goes to val if it fits in
  what is left of `val_fraction` of its source's short-document bytes and (when the source has enough
  small documents) is at most a tenth of that share,
  else to train (a size-blind draw among documents small enough that no one of them dominates its source's
  val: the share is met to within a small document);
- val is written interleaved across sources in proportion to their val bytes, so every prefix of it (eval
  scores the first `eval.max_eval_tokens`) holds each source at its share.

Deterministic (hash order, ties by corpus order) and independent of the number of workers. Dedup runs
before the split, so no copy of a val document is in train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import xxhash

from antimatter.data.records import RecordShardWriter, RecordWriter, iter_records

TAIL_MIN_BYTES = 100_000
MIN_VAL_DOCS = 10  # a short document goes to val whole only if it is at most 1/10 of its source's val share
TAIL_SUFFIX = "#tail"


def hash_fraction(key: bytes, seed: int) -> float:
    """A document's place in the split order: its exact key hashed with the seed, in [0, 1)."""
    return xxhash.xxh64_intdigest(key, seed=seed) / 2**64


def choose_val(docs: list[tuple[float, int]], fraction: float) -> list[int]:
    """Indices of `docs` ((hash fraction, bytes) of one source's short documents, in corpus order) that go to
    val: in hash order, each that fits in what is left of `fraction` of their bytes and is at most
    1/MIN_VAL_DOCS of that share (so no one document, e.g. a codec table, is a large part of its source's
    val; unless the source has too few such documents), then the first one that brings the val bytes closer
    to the share (so a source of a few documents gives val one of them)."""
    target = fraction * sum(n for _, n in docs)
    cap = target / MIN_VAL_DOCS
    if sum(n for _, n in docs if n <= cap) < 3 * target:  # too few such documents to draw from: no cap
        cap = float("inf")
    order = sorted((i for i in range(len(docs)) if docs[i][1] <= cap), key=lambda i: (docs[i][0], i))
    got, out = 0, set()
    for i in order:
        if got + docs[i][1] <= target:
            out.add(i)
            got += docs[i][1]
    for i in order:  # then the first that brings val closer (a source of a few documents gives val one)
        if i not in out and got + docs[i][1] / 2 < target:
            out.add(i)
            break
    return sorted(out)


def cut_tail(text: str, fraction: float) -> tuple[str, str]:
    """(head, tail) of a long document: the tail holds about `fraction` of its bytes and starts after the
    paragraph break (else line break, else space) nearest that point, within half the tail's length."""
    data = text.encode("utf-8")
    want = min(len(data) - 1, len(data) - round(fraction * len(data)))
    slack = max(1, (len(data) - want) // 2)
    lo, hi = max(1, want - slack), min(len(data) - 1, want + slack)
    for sep in (b"\n\n", b"\n", b" "):
        found = [p + len(sep) for p in (data.rfind(sep, lo, want), data.find(sep, want, hi)) if p >= 0]
        if found:
            pos = min(found, key=lambda p: (abs(p - want), p))
            break
    else:
        pos = want
        while pos < len(data) - 1 and data[pos] & 0xC0 == 0x80:  # not inside a UTF-8 character
            pos += 1
    return data[:pos].decode("utf-8"), data[pos:].decode("utf-8")


class InterleavedVal:
    """Val records, collected per source in temporary files, then written to the val shards interleaved:
    next always comes the source that is furthest behind its share of the val bytes."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.paths: dict[str, Path] = {}
        self.files: dict[str, RecordWriter] = {}
        self.bytes: dict[str, int] = {}

    def write(self, source: str, rec: dict[str, Any]) -> None:
        if source not in self.files:
            self.paths[source] = self.tmp / f"val_{len(self.files):05d}.jsonl.zst"
            self.files[source] = RecordWriter(self.paths[source], level=1)
            self.bytes[source] = 0
        self.files[source].write(rec)
        self.bytes[source] += len(rec["text"].encode("utf-8"))

    def finish(self, out: RecordShardWriter) -> None:
        for f in self.files.values():
            f.close()
        readers = {s: iter_records(p) for s, p in self.paths.items()}
        heads = {s: next(readers[s], None) for s in self.files}
        done = dict.fromkeys(self.files, 0)
        while live := [s for s in self.files if heads[s] is not None]:
            s = min(live, key=lambda s: done[s] / max(1, self.bytes[s]))  # ties: the first source
            rec = heads[s][0]  # type: ignore[index]
            out.write(rec)
            done[s] += len(rec["text"].encode("utf-8"))
            heads[s] = next(readers[s], None)
        for p in self.paths.values():
            p.unlink(missing_ok=True)
