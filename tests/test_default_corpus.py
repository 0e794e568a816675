"""The embedded default corpus: its English books (the shipped file is the one SOURCES.md describes, and is
English prose without the distributor's name), and how a budget is shared between books, metadata and code."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from antimatter.data import default_corpus
from antimatter.data.default_corpus import PROSE_FILE, default_items, load_item
from antimatter.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SOURCES_MD = PROSE_FILE.parent / "SOURCES.md"
COMMON = {"the", "and", "of", "to", "a", "in", "that", "he", "was", "it", "his", "i", "with", "as", "had", "her"}


def books() -> list[dict]:
    with lzma.open(PROSE_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_shipped_file_is_the_one_sources_md_describes():
    text = SOURCES_MD.read_text("utf-8")
    size, sha = re.search(r"`books\.jsonl\.xz` ([\d,]+) bytes, sha256 `([0-9a-f]{64})`", text).groups()
    data = PROSE_FILE.read_bytes()
    assert len(data) == int(size.replace(",", "")) and hashlib.sha256(data).hexdigest() == sha
    assert 800_000 < len(data) < 1_600_000  # compressed: the wheel stays small
    listed = re.findall(r"^\| `(default/prose/[a-z0-9-]+)` \|.*\| ([\d,]+) \|[^|]*\|$", text, re.M)
    assert [(b["id"], len(b["text"].encode())) for b in books()] == [(i, int(n.replace(",", ""))) for i, n in listed]
    assert "public domain" in text.lower()


def test_the_books_are_english_prose_without_the_distributors_name():
    all_books = books()
    assert len(all_books) >= 10 and 3_000_000 < sum(len(b["text"].encode()) for b in all_books) < 5_000_000
    for b in all_books:
        assert "gutenberg" not in b["text"].lower(), b["id"]
        words = re.findall(r"[a-z]+", b["text"].lower())
        common = sum(w in COMMON for w in words) / len(words)
        assert common > 0.2, f"{b['id']}: {common:.2f} of its words are common English words"


def test_default_items_mix_books_metadata_and_code_within_their_shares():
    budget = 3_000_000
    items = default_items(budget)
    assert items == default_items(budget)  # deterministic
    by_group = {g: [i for i in items if i.group == g] for g in default_corpus.GROUPS}
    assert all(by_group.values())
    size = {g: sum(i.nbytes for i in v) for g, v in by_group.items()}
    assert size["prose"] <= budget * default_corpus.PROSE_SHARE
    assert size["meta"] <= budget * default_corpus.METADATA_SHARE
    assert budget * 0.95 < sum(size.values()) <= budget
    assert [i.group for i in items] == sorted((i.group for i in items), key=default_corpus.GROUPS.index)
    book = by_group["prose"][0]
    assert book.kind == "prose" and load_item(book).decode() == books()[0]["text"]


def test_prepare_manifest_key_names_the_books():
    assert default_corpus.fingerprint(1000).endswith(
        "books-" + hashlib.sha256(PROSE_FILE.read_bytes()).hexdigest()[:16])


def test_a_damaged_books_file_is_one_line_saying_reinstall(tmp_path, monkeypatch):
    bad = tmp_path / "books.jsonl.xz"
    bad.write_bytes(PROSE_FILE.read_bytes()[:1000])  # cut short, as an interrupted copy would leave it
    monkeypatch.setattr(default_corpus, "PROSE_FILE", bad)
    default_corpus._books.cache_clear()
    try:
        with pytest.raises(UserError) as e:
            default_corpus._books()
    finally:
        default_corpus._books.cache_clear()
    assert str(e.value) == (f"the embedded corpus's books at {bad} cannot be read (EOFError): the installation is "
                            f"incomplete; reinstall antimatter (pip install --force-reinstall antimatter)")


def test_the_wheel_ships_the_books():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["antimatter"]
    package = ROOT / "src" / "antimatter"
    shipped = {p for g in globs for p in package.glob(g)}
    assert {PROSE_FILE, SOURCES_MD} <= shipped


def test_the_build_script_names_a_wrong_corpus_folder(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_default_prose.py"), "--corpus", str(tmp_path),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 1
    assert r.stderr.startswith(f"not in {tmp_path}: ['gutenberg/") and r.stderr.rstrip().endswith(
        "point --corpus at the raw corpus folder")
    assert not (tmp_path / "out").exists()
