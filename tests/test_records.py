"""Prepared records: what the one writer puts on disk is what the one reader gives back."""

from __future__ import annotations

import pytest
import zstandard

from antimatter.data.records import (
    RecordShardWriter,
    count_input_bytes,
    encode_record,
    iter_records,
    split_files,
    train_files,
)
from antimatter.errors import UserError

RECORDS = [{"id": f"s/{i}", "source": "s", "text": t}
           for i, t in enumerate(["plain text", "café, 日本語 🙂", "two\nlines", ""])]


def test_shards_roll_over_and_read_back_in_order(tmp_path):
    w = RecordShardWriter(tmp_path / "train", "train", shard_docs=3)
    for rec in RECORDS * 2:
        w.write(rec)
    w.close()
    assert w.shards == ["train_00000.jsonl.zst", "train_00001.jsonl.zst", "train_00002.jsonl.zst"]
    files = split_files(tmp_path / "train")
    assert [f.name for f in files] == w.shards and train_files(tmp_path) == files
    assert [rec for f in files for rec, _ in iter_records(f)] == RECORDS * 2
    lines = b"".join(encode_record(r) for r in RECORDS * 2)
    assert count_input_bytes(files) == len(lines)
    assert b"".join(zstandard.ZstdDecompressor().decompressobj().decompress(f.read_bytes()) for f in files) == lines


def test_a_line_is_compact_utf8_json():
    assert encode_record({"id": "a", "text": "é"}) == '{"id": "a", "text": "é"}\n'.encode()


def test_no_train_split_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"no training documents in .*train.*run `antimatter prepare` first"):
        train_files(tmp_path)
