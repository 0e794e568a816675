"""The train/val split (data/split.py): each source gives val its share of bytes, long documents give their
tail, val interleaves the sources; on real text (the embedded books, standard-library files), no mocks."""

from __future__ import annotations

import io
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import zstandard

from antimatter.config import RunConfig, SourceConfig
from antimatter.data.clean import clean_text
from antimatter.data.default_corpus import _books
from antimatter.data.filters import guess_kind
from antimatter.data.prepare import run_prepare
from antimatter.data.sources import sources_from_paths
from antimatter.data.split import TAIL_MIN_BYTES, TAIL_SUFFIX, choose_val, cut_tail
from antimatter.data.stats import check_invariant


def read_split(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.jsonl.zst")):
        with open(p, "rb") as f:
            out += [json.loads(line) for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f),
                                                                   encoding="utf-8")]
    return out


def shares(train: list[dict], val: list[dict]) -> dict[str, float]:
    """Per source: the fraction of its kept bytes that is in val."""
    size: dict[str, list[int]] = {}
    for i, split in enumerate((train, val)):
        for r in split:
            size.setdefault(r["source"], [0, 0])[i] += len(r["text"].encode())
    return {s: v / (t + v) for s, (t, v) in size.items()}


def test_cut_tail_cuts_a_book_at_a_paragraph_near_its_share():
    text = next(iter(_books().values()))
    head, tail = cut_tail(text, 0.02)
    assert head + tail == text
    assert head.endswith("\n\n") and not tail.startswith("\n")
    assert 0.01 < len(tail.encode()) / len(text.encode()) < 0.03


@pytest.mark.parametrize("text", ["x" * 200_000, "é" * 100_001, "word " * 40_000])
def test_cut_tail_without_paragraphs_still_cuts_between_characters(text):
    head, tail = cut_tail(text, 0.1)
    assert head + tail == text and head and tail
    assert abs(len(tail.encode()) - 0.1 * len(text.encode())) <= 0.05 * len(text.encode())


def test_choose_val_meets_the_share_to_within_a_small_document():
    sizes = [(i * 7919 % 1000) * 37 + 200 for i in range(300)]  # 200 B .. 37 kB, mixed in corpus order
    docs = [((i * 0.618034) % 1, n) for i, n in enumerate(sizes)]
    chosen = choose_val(docs, 0.05)
    got = sum(docs[i][1] for i in chosen)
    assert abs(got - 0.05 * sum(sizes)) <= min(sizes)
    assert chosen == choose_val(docs, 0.05)
    assert choose_val([(0.7, 100), (0.2, 120)], 0.4) == [1]  # a source of two documents gives val one


def test_no_one_document_dominates_its_sources_val():
    """A 34 kB codec table drawn first used to be 30% of its source's val (and made val easier than train):
    whole documents larger than a tenth of the share stay in train."""
    docs = [(0.001, 34_000), *(((i + 1) / 500, 2_000 + 37 * i % 3_000) for i in range(400))]
    target = 0.02 * sum(n for _, n in docs)
    chosen = choose_val(docs, 0.02)
    assert 0 not in chosen and all(docs[i][1] <= target / 10 for i in chosen)
    assert abs(sum(docs[i][1] for i in chosen) - target) <= 5_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three sources of real text: books (each past TAIL_MIN_BYTES), short notes cut from another book
    (JSON Lines), and standard-library modules."""
    root = tmp_path_factory.mktemp("corpus")
    texts = list(_books().values())
    long = [t for t in texts if len(t.encode()) >= TAIL_MIN_BYTES]
    (root / "books").mkdir()
    for i, t in enumerate(long[:3]):
        (root / "books" / f"book{i}.txt").write_text(t, encoding="utf-8")
    paras = [p for p in long[3].split("\n\n") if len(p) > 200]
    notes = ["\n\n".join(paras[i:i + 1 + i % 4]) for i in range(0, len(paras) - 4, 5)]
    with open(root / "notes.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": f"notes/{i}", "text": t}) + "\n" for i, t in enumerate(notes))
    (root / "code").mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    mods = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 60_000)[:60]
    for p in mods:
        shutil.copy(p, root / "code" / p.name)
    return root


def prepare(corpus: Path, out: Path, workers: int) -> dict:
    cfg = RunConfig()
    cfg.data.sources = sources_from_paths([str(corpus / "books"), str(corpus / "notes.jsonl"), str(corpus / "code")])
    cfg.data.workers, cfg.data.val_fraction = workers, 0.1
    return run_prepare(cfg, out)


def test_every_source_gives_val_its_share_of_bytes(corpus, tmp_path):
    stats = prepare(corpus, tmp_path / "a", workers=1)
    check_invariant(stats)
    train, val = read_split(tmp_path / "a" / "train"), read_split(tmp_path / "a" / "val")
    got = shares(train, val)
    assert set(got) == {"books", "notes", "code"}
    for source, share in got.items():
        assert 0.085 < share < 0.115, (source, share)
    assert stats["sources"]["books"]["tail_docs"] == 3
    for i in range(3):  # a book: its head in train, its tail in val, nothing lost
        raw = (corpus / "books" / f"book{i}.txt").read_text("utf-8")
        book, _ = clean_text(raw, SourceConfig(), guess_kind(raw))  # as prepare cleans it
        head = next(r["text"] for r in train if r["id"] == f"books/book{i}.txt")
        tail = next(r["text"] for r in val if r["id"] == f"books/book{i}.txt{TAIL_SUFFIX}")
        assert head + tail == book
    # every prefix of val holds each source near its share: the first third already has all three
    third, seen, used = sum(len(r["text"]) for r in val) / 3, set(), 0
    for r in val:
        seen.add(r["source"])
        used += len(r["text"])
        if used > third:
            break
    assert seen == {"books", "notes", "code"}
    # the same split whatever the number of workers (and run to run)
    prepare(corpus, tmp_path / "b", workers=2)
    for split in ("train", "val"):
        assert read_split(tmp_path / "a" / split) == read_split(tmp_path / "b" / split)


def test_the_default_corpus_val_holds_books_metadata_and_code_at_their_share(tmp_path):
    cfg = RunConfig()
    cfg.data.workers, cfg.data.default_corpus_bytes, cfg.data.val_fraction = 1, 1_500_000, 0.05
    stats = run_prepare(cfg, tmp_path / "out")
    train, val = read_split(tmp_path / "out" / "train"), read_split(tmp_path / "out" / "val")
    got = shares(train, val)
    assert set(got) == {"default/prose", "default/meta", "default/stdlib"}
    for source, share in got.items():
        assert 0.04 < share < 0.06, (source, share)
    assert any(r["id"].startswith("default/prose/") and r["id"].endswith(TAIL_SUFFIX) for r in val)
    assert set(stats["sources"]) == set(got)
