"""Bad input: each case is counted (or refused with a message naming the fix), never silently lost."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from antimatter.config import RunConfig, SourceConfig, validate
from antimatter.data.prepare import run_prepare
from antimatter.data.records import iter_records, split_files
from antimatter.data.sample import SENTENCES
from antimatter.data.sources import sources_from_paths
from antimatter.data.stats import check_invariant
from antimatter.errors import UserError

PROSE = " ".join(SENTENCES[:8])


def prepare(paths: list[str], out: Path, **data) -> dict:
    cfg = RunConfig()
    cfg.data.sources = sources_from_paths(paths)
    cfg.data.workers = 1
    cfg.data.val_fraction = 0.3
    for k, v in data.items():
        setattr(cfg.data, k, v)
    stats = run_prepare(cfg, out)
    check_invariant(stats)
    return stats


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


def good(i: int) -> bytes:
    return json.dumps({"id": f"d{i}", "text": " ".join(SENTENCES[i: i + 8])}).encode()


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(PROSE.encode() + b" caf\xe9 \xff\xfe end of the story.")
    bad_json = b'{"id": "x", "text": "' + " ".join(SENTENCES[10:18]).encode() + b' na\xefve."}'
    write_jsonl(tmp_path / "b.jsonl", [bad_json, good(20)])
    stats = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tmp_path / "out")
    assert stats["total"]["cleaned"]["invalid_utf8"] == 2
    assert stats["total"]["kept_docs"] == 3
    log = (tmp_path / "out" / "rejects.log").read_text()
    assert "a.txt: clean.invalid_utf8" in log and "b.jsonl:1: clean.invalid_utf8" in log


def test_malformed_json_line_skipped_logged_counted(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl.gz", [good(0), b'{"id": "broken", "text": "no closing', good(12)])
    stats = prepare([str(path)], tmp_path / "out")
    assert stats["total"]["removed"]["read.malformed_json"]["docs"] == 1
    assert stats["total"]["docs_in"] == 3 and stats["total"]["kept_docs"] == 2
    assert f"{path}:2: read.malformed_json" in (tmp_path / "out" / "rejects.log").read_text()


def test_malformed_json_under_strict_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [good(0), b"{not json"])
    with pytest.raises(UserError, match=r"c\.jsonl:2: malformed JSON.*without --strict"):
        prepare([str(path)], tmp_path / "out", strict=True)


def test_missing_text_field_counted_and_strict_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), b'{"id": "x", "body": "hello"}', b'{"text": 42}', good(9)])
    stats = prepare([str(path)], tmp_path / "out")
    assert stats["total"]["removed"]["read.missing_text_field"]["docs"] == 2
    log = (tmp_path / "out" / "rejects.log").read_text()
    assert "d.jsonl:2: read.missing_text_field: no 'text' field" in log
    assert "d.jsonl:3: read.missing_text_field: 'text' is int" in log
    with pytest.raises(UserError, match=r"d\.jsonl:2: no 'text' field: set the source's text_field"):
        prepare([str(path)], tmp_path / "strict", strict=True)


def test_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [json.dumps({"body": " ".join(SENTENCES[i:i + 8])}).encode()
                                             for i in (0, 10, 20)])
    cfg = RunConfig()
    cfg.data.workers = 1
    cfg.data.val_fraction = 0.3
    cfg.data.sources = [SourceConfig(path=str(path), text_field="body")]
    assert run_prepare(cfg, tmp_path / "out")["total"]["kept_docs"] == 3


def test_empty_files_and_binary_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "ok.txt").write_text(PROSE)
    (tmp_path / "ok2.md").write_text(" ".join(SENTENCES[20:30]))
    stats = prepare([str(tmp_path)], tmp_path.parent / "out_bin")
    t = stats["total"]
    assert t["removed"]["clean.empty"]["docs"] == 1
    assert t["removed"]["read.binary_file"]["docs"] == 1
    assert t["kept_docs"] == 2
    assert "blob.bin: read.binary_file" in (tmp_path.parent / "out_bin" / "rejects.log").read_text()


def test_one_huge_document(tmp_path):
    big = "\n\n".join(f"Chapter {i}. " + " ".join(SENTENCES[(i * 7 + k) % 40] for k in range(5))
                      for i in range(3000))  # ~1.45 MB, one document
    (tmp_path / "big.txt").write_text(big)
    (tmp_path / "small.txt").write_text(PROSE)
    stats = prepare([str(tmp_path / "big.txt"), str(tmp_path / "small.txt")], tmp_path / "out")
    assert stats["sources"]["big"]["docs_in"] == 1 and stats["sources"]["big"]["bytes_in"] > 1_400_000
    assert stats["sources"]["big"]["removed"]  # repeats its sentences: removed by a repetition rule
    assert next(iter(stats["sources"]["big"]["removed"])).startswith("filter.gopher_")
    cfg_small = prepare([str(tmp_path / "big.txt"), str(tmp_path / "small.txt")], tmp_path / "out2",
                        filters=RunConfig().data.filters.__class__(max_doc_bytes=1_000_000))
    assert cfg_small["sources"]["big"]["removed"]["filter.max_doc_bytes"]["docs"] == 1


def test_nonexistent_path(tmp_path):
    with pytest.raises(UserError, match="does not exist: .*nope"):
        sources_from_paths([str(tmp_path / "nope")])
    cfg = RunConfig()
    cfg.data.sources = [SourceConfig(path=str(tmp_path / "nope.jsonl"), name="x")]
    with pytest.raises(UserError, match=r"source 'x': path does not exist: .*fix data.sources"):
        run_prepare(cfg, tmp_path / "out")
    cfg.data.sources = [SourceConfig(path=str(tmp_path / "*.parquet"), name="g")]
    with pytest.raises(UserError, match="matches no file"):
        run_prepare(cfg, tmp_path / "out")


def test_empty_corpus(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(UserError, match="corpus is empty.*point them at text files"):
        prepare([str(tmp_path / "in")], tmp_path / "out")
    (tmp_path / "in" / "blank.txt").write_text("  \n\n ")
    (tmp_path / "in" / "tiny.txt").write_text("hi")
    with pytest.raises(UserError, match=r"no document survived.*\((clean|filter)\.\w+: 1 of 2 removed\).*loosen data.filters"):
        prepare([str(tmp_path / "in")], tmp_path / "out")


def test_a_val_fraction_that_leaves_train_empty_is_refused_before_writing(tmp_path):
    """Every kept document would go to val: the next stage would say "run prepare first" of a prepare that ran."""
    (tmp_path / "in").mkdir()
    for i, sentence in enumerate(SENTENCES[:12]):
        (tmp_path / "in" / f"{i}.txt").write_text(f"{sentence} {i}\n")
    with pytest.raises(UserError, match=r"^data.val_fraction=0.999 leaves no document for training \(all 12 kept "
                                        r"documents went to val\): lower it"):
        prepare([str(tmp_path / "in")], tmp_path / "out", val_fraction=0.999)
    assert not list((tmp_path / "out").rglob("*.jsonl.zst"))
    assert prepare([str(tmp_path / "in")], tmp_path / "out2", val_fraction=0.5)


def test_jsonl_without_the_text_field_names_the_field_not_the_filters(tmp_path):
    """Every line lacks the `text` field: the error says so and how to point text_field at the right one,
    instead of suggesting looser quality filters (and no rejects.log is written when nothing survives)."""
    path = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"content": SENTENCES[i]}).encode() for i in range(4)])
    with pytest.raises(UserError, match=r"\(read\.missing_text_field: 4 of 4 removed\): set the source's "
                                        r"text_field .*data\.sources\[\]\.text_field"):
        prepare([str(path)], tmp_path / "out")


def test_bad_config_values(tmp_path):
    """Checked by the config's validation (at load time), each naming the key, the value and the choices."""
    (tmp_path / "a.txt").write_text(PROSE)
    cfg = RunConfig()
    cfg.data.sources = [SourceConfig(path=str(tmp_path / "a.txt"), rules="poetry")]
    with pytest.raises(UserError, match=r"data.sources\[0\].rules must be auto, prose, code, reference or none, "
                                        r"got 'poetry'"):
        validate(cfg)
    cfg.data.sources = [SourceConfig(path=str(tmp_path / "a.txt"), format="csv")]
    with pytest.raises(UserError, match=r"data.sources\[0\].format must be auto, text, .* got 'csv'"):
        validate(cfg)
    cfg.data.sources = [SourceConfig(path=str(tmp_path / "a.txt"))]
    cfg.data.filters.disable = ["gopher_stopwords"]
    with pytest.raises(UserError, match="unknown rule.*gopher_stopwords"):
        validate(cfg)


@pytest.mark.parametrize("name,payload", [
    ("cut.jsonl.gz", lambda b: gzip.compress(b)[:-30]),  # truncated gzip
    ("fake.jsonl.gz", lambda b: b"not gzip at all" * 10),  # not gzip
    ("gz-named.jsonl.zst", lambda b: gzip.compress(b)),  # gzip under a zstd name
    ("garbage.jsonl.zst", lambda b: b"\x28\xb5\x2f\xfd" + b"\xff" * 64),  # a zstd magic, then garbage
])
def test_broken_compressed_input_is_one_error_naming_the_file(tmp_path, name, payload):
    """A cut, corrupt or mislabelled .gz/.zst input stops prepare with one error naming the file and the fix,
    not a decompressor's traceback or a message that leaves the user to guess which file."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text(PROSE)
    (corpus / name).write_bytes(payload("".join(json.dumps({"text": PROSE}) + "\n" for _ in range(50)).encode()))
    with pytest.raises(UserError) as e:
        prepare([str(corpus)], tmp_path / "out")
    msg = str(e.value)
    assert name in msg and "\n" not in msg and ("copy it again" in msg or "write or copy" in msg), msg


def records_of(out: Path) -> list[dict]:
    return [rec for split in ("train", "val") for f in split_files(out / split) for rec, _ in iter_records(f)]


def test_a_file_name_that_is_not_utf8_is_kept_and_named_with_escapes(tmp_path):
    """The bytes of a name that is not UTF-8 (held by Python as lone surrogates) crashed the record writer:
    the document is kept, named with \\xNN escapes in its id, its source name, rejects.log and the statistics."""
    folder = tmp_path / "weird"
    folder.mkdir()
    try:
        (folder / os.fsdecode(b"bad\xffname.txt")).write_text(PROSE)
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    (folder / os.fsdecode(b"bin\xfe.txt")).write_bytes(b"not \x00 text")
    alone = tmp_path / os.fsdecode(b"alone\xff.txt")
    alone.write_text(" ".join(SENTENCES[10:18]))
    stats = prepare([str(folder), str(alone)], tmp_path / "out")
    assert {r["id"] for r in records_of(tmp_path / "out")} == {"weird/bad\\xffname.txt", "alone\\xff/alone\\xff.txt"}
    assert set(stats["sources"]) == {"weird", "alone\\xff"}
    log = (tmp_path / "out" / "rejects.log").read_text(encoding="utf-8")
    assert f"{tmp_path}/weird/bin\\xfe.txt: read.binary_file" in log


def test_lone_surrogates_in_json_ids_and_texts_are_replaced_and_counted(tmp_path):
    """JSON "\\ud800" escapes give strings that have no UTF-8 bytes: written as U+FFFD (the text counted as
    invalid UTF-8 is), not a crash of the record writer."""
    text = json.dumps(" ".join(SENTENCES[:8]) + " \ud800 the end.")
    path = write_jsonl(tmp_path / "s.jsonl", [b'{"id": "a\\udc80b", "text": ' + text.encode() + b"}", good(12)])
    stats = prepare([str(path)], tmp_path / "out")
    assert stats["total"]["cleaned"]["invalid_utf8"] == 1
    recs = {r["id"]: r["text"] for r in records_of(tmp_path / "out")}
    assert set(recs) == {"a\ufffdb", "d12"} and recs["a\ufffdb"].endswith("\ufffd the end.")
