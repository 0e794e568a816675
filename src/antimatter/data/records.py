"""Prepared records: the JSON Lines shards `antimatter prepare` writes and every later stage reads.

Format: `data/SPLIT/SPLIT_NNNNN.jsonl.zst`, zstd-compressed, one JSON object per line, UTF-8 (no ASCII
escaping), at most `data.shard_docs` records a shard:

    {"id": "...", "source": "...", "text": "..."}

Rejected documents (`data.keep_rejects`) go to `data/rejects/REASON.jsonl`, one plain (uncompressed) file per
removal reason, so `less`, `grep` and `jq` read them: the same records with `reason`, `why` (what the rule
measured against which setting) and, for duplicates, `duplicate_of`. Prepare's temporary per-unit files use
the same line encoding too. This
module is the only place that writes or reads the format: prepare writes it, tokenizer training,
`antimatter tokenize` and eval's per-source scores read it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from antimatter.errors import UserError
from antimatter.files import open_zstd

SHARD_GLOB = "*.jsonl.zst"  # what prepare writes (and clears before writing again)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """The text with lone surrogate code points (JSON "\\ud800" escapes, surrogateescape'd terminal input)
    replaced by U+FFFD: they are not Unicode scalar values, so they have no UTF-8 bytes to tokenize."""
    return _LONE_SURROGATE.sub("\ufffd", text)


# ------------------------------------------------------------------------------------------ writing


def encode_record(rec: dict[str, Any]) -> bytes:
    """One record as its line: compact JSON, non-ASCII kept as UTF-8, newline-terminated. A lone surrogate (an
    input's JSON "\\ud800" escape in an id) has no UTF-8 bytes: it is written as U+FFFD, not a crash."""
    line = json.dumps(rec, ensure_ascii=False)
    try:
        return line.encode() + b"\n"
    except UnicodeEncodeError:
        return valid_unicode(line).encode() + b"\n"


class RecordWriter:
    """One .jsonl.zst file of records, written as a single zstd stream (`level=None`: a plain .jsonl file)."""

    def __init__(self, path: Path, level: int | None = 3):
        f = open(path, "wb")  # noqa: SIM115 - closed by close()
        # one compressor per stream: a zstd context must not serve two open streams
        self._f = f if level is None else zstandard.ZstdCompressor(level=level).stream_writer(f)

    def write(self, rec: dict[str, Any]) -> None:
        self._f.write(encode_record(rec))

    def close(self) -> None:
        self._f.close()


class RecordShardWriter:
    """Rolling `FOLDER/PREFIX_00000.jsonl.zst` shards of at most `shard_docs` records."""

    def __init__(self, folder: Path, prefix: str, shard_docs: int):
        self.folder, self.prefix, self.shard_docs = folder, prefix, max(1, shard_docs)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.f: RecordWriter | None = None
        self.n = 0
        self.shards: list[str] = []

    def write(self, rec: dict[str, Any]) -> None:
        if self.f is None or self.n >= self.shard_docs:
            self.close()
            path = self.folder / f"{self.prefix}_{len(self.shards):05d}.jsonl.zst"
            self.shards.append(path.name)
            self.f = RecordWriter(path, level=3)
            self.n = 0
        self.f.write(rec)
        self.n += 1

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


# ------------------------------------------------------------------------------------------ reading


class RejectWriter:
    """`FOLDER/REASON.jsonl`: the removed documents, one plain JSON Lines file per removal reason."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, RecordWriter] = {}

    def write(self, rec: dict[str, Any]) -> None:
        reason = rec["reason"]
        if reason not in self.files:
            self.files[reason] = RecordWriter(self.folder / f"{reason}.jsonl", level=None)
        self.files[reason].write(rec)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def split_files(split_dir: Path) -> list[Path]:
    """The JSON Lines shards of one prepared split, in a fixed order."""
    split_dir = Path(split_dir)
    return sorted(p for p in split_dir.glob("*.jsonl*") if p.suffix in (".zst", ".jsonl"))


def train_files(data_dir: Path) -> list[Path]:
    """The shards of the prepared train split of `data_dir`, refused when there are none."""
    train_dir = Path(data_dir) / "train"
    files = split_files(train_dir)
    if not files:
        raise UserError(f"no training documents in {train_dir} (*.jsonl.zst): run `antimatter prepare` first")
    return files


def iter_records(path: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """(record, line bytes) for each record of a prepared .jsonl(.zst) file, streamed.

    Records are {"id", "source", "text"}; a line without a string "text" is an error naming file and line.
    Lone surrogates in a text (possible through JSON escapes) are replaced by U+FFFD, with a warning.
    """
    path = Path(path)
    replaced = 0
    with open(path, "rb") as raw:
        lines = open_zstd(raw, path) if path.suffix == ".zst" else raw
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["text"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: not a prepared record with a 'text' field: "
                                f"re-run `antimatter prepare`") from None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: 'text' is not a string: re-run `antimatter prepare`")
            if not rec.get("id"):
                rec["id"] = f"{path.name}:{lineno}"
            if not text.isascii():  # isascii is O(1) in CPython; the encode check only runs on the rest
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    rec["text"] = valid_unicode(text)
                    replaced += 1
            yield rec, len(line)
    if replaced:
        print(f"warning: {path}: {replaced} document(s) held lone surrogate code points (not valid Unicode); "
              f"each was replaced by U+FFFD", file=sys.stderr)


def count_input_bytes(files: list[Path]) -> int:
    """Decompressed size of the files (cheap: no JSON parsing); used for sampling rates and progress."""
    total = 0
    for path in files:
        with open(path, "rb") as raw:
            if path.suffix != ".zst":
                total += path.stat().st_size
                continue
            reader = open_zstd(raw, path)
            while chunk := reader.read(1 << 22):
                total += len(chunk)
    return total
