"""End to end: run_prepare on a small real corpus written to tmp_path (no mocks)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from test_cli import assert_user_error, cli

from antimatter.config import RunConfig, SourceConfig, load_config
from antimatter.data.prepare import output_lock, run_prepare
from antimatter.data.sample import SENTENCES, write_sample_corpus, write_tech_docs
from antimatter.data.sources import sources_from_paths
from antimatter.data.stats import check_invariant


def read_split(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.jsonl.zst")):
        with open(p, "rb") as f:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
                out.append(json.loads(line))
    return out


def make_cfg(paths: list[str], workers: int = 1, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.sources = sources_from_paths(paths)
    cfg.data.workers = workers
    cfg.data.val_fraction = 0.2
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_sample_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cfg = make_cfg([str(corpus / "books"), str(corpus / "web-00000.jsonl.zst"), str(corpus / "code")],
                   keep_rejects=True)
    return run_prepare(cfg, out), out


def test_outputs_and_records(prepared):
    stats, out = prepared
    train, val = read_split(out / "train"), read_split(out / "val")
    assert train and val
    for rec in train + val:
        assert set(rec) == {"id", "source", "text"} and rec["text"].strip()
    assert {r["source"] for r in train + val} <= {"books", "web", "code"}
    ids = [r["id"] for r in train + val]
    assert len(ids) == len(set(ids))
    on_disk = json.loads((out / "dataset_statistics.json").read_text())
    assert on_disk["total"]["kept_docs"] == len(train) + len(val) == stats["total"]["kept_docs"]
    assert stats["total"]["splits"]["val"]["docs"] == len(val)
    assert not (out / ".prepare-tmp").exists()
    assert not (out / "manifest.json").exists()
    for key in ("git_commit", "device", "date", "command"):
        assert key in stats["provenance"]


def test_every_document_accounted_for(prepared):
    stats, _ = prepared
    check_invariant(stats)
    t = stats["total"]
    # sample corpus: 12 book files + 1 empty file, 16 JSONL records, 4 code files
    assert t["docs_in"] == 13 + 16 + 4
    assert t["removed"]["dedup.exact"]["docs"] == 1  # the upper-cased copy
    assert t["removed"]["dedup.near"]["docs"] >= 4  # the one-word edit and three code copies
    assert t["removed"]["clean.empty"]["docs"] == 2  # empty.txt and the blank record
    assert any(r.startswith("filter.") for r in t["removed"])  # the bullet list page
    assert t["rule_sets"]["code"] == 4
    assert stats["sources"]["code"]["kept_docs"] == 1  # code judged by code rules: kept, once


def test_keep_rejects_writes_every_removed_doc_as_plain_json_lines(prepared):
    """One plain (uncompressed) JSON Lines file per removal reason, each record saying why, readable with
    nothing but open() (or less, grep, jq)."""
    stats, out = prepared
    files = sorted((out / "rejects").iterdir())
    assert [f.name for f in files] == sorted(f"{r}.jsonl" for r in stats["total"]["removed"])
    rejects = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            assert f.name == f"{rec['reason']}.jsonl" and rec["why"] and rec["id"] and "text" in rec
            rejects.append(rec)
    assert len(rejects) == stats["total"]["removed_docs"]
    near = [r for r in rejects if r["reason"] == "dedup.near"]
    assert any(r["id"] == "web/near-copy" and r["duplicate_of"] and r["duplicate_of"] in r["why"] for r in near)
    bullets = next(r for r in rejects if r["id"] == "web/list-page")
    assert bullets["why"].startswith(f"{bullets['reason'].removeprefix('filter.')}: ")
    assert "data.filters." in bullets["why"]


def test_deterministic_across_worker_counts(corpus, tmp_path):
    paths = [str(corpus / "books"), str(corpus / "web-00000.jsonl.zst"), str(corpus / "code")]
    a = run_prepare(make_cfg(paths, workers=1), tmp_path / "a")
    b = run_prepare(make_cfg(paths, workers=2), tmp_path / "b")
    assert b["timing"]["workers"] == 2
    for split in ("train", "val"):
        assert read_split(tmp_path / "a" / split) == read_split(tmp_path / "b" / split)
    assert a["total"]["removed"] == b["total"]["removed"]


def test_dedup_across_sources_before_split(tmp_path):
    text = "The quick brown fox jumps over the lazy dog near the river bank and then it runs away home."
    (tmp_path / "a.txt").write_text(" ".join([text] * 1) + " It was a good day for the fox.")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "copy.txt").write_text(" ".join([text] * 1) + " It was a good day for the fox.")
    (tmp_path / "c.txt").write_text("A completely different story about the sea, the ships and the harbour town.")
    cfg = make_cfg([str(tmp_path / "a.txt"), str(tmp_path / "b"), str(tmp_path / "c.txt")], val_fraction=0.5)
    stats = run_prepare(cfg, tmp_path / "out")
    assert stats["sources"]["b"]["removed"]["dedup.exact"]["docs"] == 1
    texts = [r["text"] for s in ("train", "val") for r in read_split(tmp_path / "out" / s)]
    assert sum(t.startswith("The quick brown fox") for t in texts) == 1


def test_default_corpus_has_code_prose_and_duplicates(tmp_path):
    cfg = RunConfig()
    cfg.data.workers = 1
    cfg.data.default_corpus_bytes = 400_000
    stats = run_prepare(cfg, tmp_path / "out")
    t = stats["total"]
    assert t["rule_sets"].get("code", 0) > 0 and t["rule_sets"].get("prose", 0) > 0
    assert 200_000 < t["bytes_in"] <= 400_000
    assert t["removed_by_stage"].get("dedup.exact", {}).get("docs", 0) + \
        t["removed_by_stage"].get("dedup.near", {}).get("docs", 0) > 0  # licence texts repeat
    run_prepare(cfg, tmp_path / "again")
    assert read_split(tmp_path / "out" / "train") == read_split(tmp_path / "again" / "train")


def test_source_byte_cap_and_explicit_rules(corpus, tmp_path):
    cfg = RunConfig()
    cfg.data.workers = 1
    cfg.data.sources = [SourceConfig(path=str(corpus / "books"), name="capped", max_bytes=2000, rules="none")]
    stats = run_prepare(cfg, tmp_path / "out")
    s = stats["sources"]["capped"]
    assert s["bytes_in"] >= 2000 and s["docs_in"] < 13
    assert set(s["rule_sets"]) == {"none"}


def test_summary_table_printed(corpus, tmp_path, capsys):
    run_prepare(make_cfg([str(corpus / "books")]), tmp_path / "out")
    printed = capsys.readouterr().out
    assert "documents by source" in printed and "books" in printed and "TOTAL" in printed


MENU = "\n".join([f"{a} {b}" for a in ("Home", "News", "Shop", "Blog", "Help")
                  for b in ("page", "archive", "contact", "search")] + SENTENCES[:2])


def test_technical_markdown_folder_is_kept_whole(tmp_path):
    stats = run_prepare(make_cfg([str(write_tech_docs(tmp_path / "api-docs"))]), tmp_path / "out")
    s = stats["sources"]["api-docs"]
    assert s["docs_in"] == 5 and s["kept_docs"] == 5 and s["rule_sets"] == {"prose": 5}


def test_summary_names_bytes_per_rule_the_files_and_the_setting_that_keeps_them(tmp_path, capsys):
    """Per source, the bytes each rule removed, its largest files, and the one setting that keeps them: a
    second run with that setting keeps the file."""
    docs = write_tech_docs(tmp_path / "docs")
    (docs / "menu.txt").write_text(MENU, encoding="utf-8")
    stats = run_prepare(make_cfg([str(docs)]), tmp_path / "out")
    printed = capsys.readouterr().out
    removed = stats["sources"]["docs"]["removed"]["filter.fineweb_short_lines"]
    assert removed["largest"] == [{"id": "docs/menu.txt", "bytes": len(MENU.encode())}]
    setting = removed["keep"]
    assert setting.startswith("data.filters.max_short_line_chars=")
    lines = printed.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("fineweb_short_lines "))
    assert lines[at - 1].startswith(f"docs: {len(MENU.encode())} B of ")  # the source, then its rules
    assert f"{len(MENU.encode())} B" in lines[at] and f"keep: {setting}" in lines[at]
    assert "docs/menu.txt" in lines[at + 1]
    on_disk = json.loads((tmp_path / "out" / "dataset_statistics.json").read_text())
    assert on_disk["sources"]["docs"]["removed"]["filter.fineweb_short_lines"]["keep"] == setting

    cfg = make_cfg([str(docs)])
    cfg.data.filters = load_config(None, [setting]).data.filters
    again = run_prepare(cfg, tmp_path / "again")
    assert again["sources"]["docs"]["kept_docs"] == 6


def test_prepare_gives_the_same_output_in_every_process(tmp_path):
    """Same input and config, same kept documents, splits and rejects, whatever Python's per-process hash
    salt (PYTHONHASHSEED) and however the worker pool schedules the files."""
    corpus = write_sample_corpus(tmp_path / "corpus", n_prose=60)

    def prepared(seed: int) -> dict[str, str]:
        out = tmp_path / f"out{seed}"
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "antimatter.cli", "prepare", str(corpus), "--out", str(out),
                        "data.workers=2"], env=env, check=True, capture_output=True, text=True, timeout=300)
        return {str(p.relative_to(out)): zstandard.ZstdDecompressor().stream_reader(p.open("rb")).read().decode()
                for p in sorted(out.rglob("*.jsonl.zst"))}

    first = prepared(1)
    assert first and any(k.startswith("train") for k in first)
    assert prepared(2) == first


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_prepare_into_the_same_out_folder_is_refused(tmp_path):
    """Two prepares writing one --out folder at once deleted each other's files (one crashed, the other said
    it succeeded while its shards were gone): while one holds the folder, a second is refused at once, with
    one line naming the holder, and the folder is left as it was. Its lock lies beside the folder."""
    corpus = write_sample_corpus(tmp_path / "corpus")
    out = tmp_path / "pc"
    assert cli("prepare", str(corpus / "books"), "--out", str(out), cwd=tmp_path).returncode == 0
    before = snapshot(out)
    with output_lock(out):  # as a prepare writing into it holds it
        r = cli("prepare", str(corpus / "books"), "--out", str(out), cwd=tmp_path)
        assert_user_error(r, "prepare", f"--out {out} is in use by pid {os.getpid()}",
                          "another `antimatter prepare` is writing it")
        run_prepare(make_cfg([str(corpus / "books")]), out)  # the holder itself may write it
    assert snapshot(out).keys() == before.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pc.lock", "corpus", "pc"]


def test_the_folders_of_runs_are_never_read_as_a_source(tmp_path):
    """A source `.` that holds runs/ reads none of the runs' files (config, lock, prepared shards): they are
    skipped with a note. A run folder that is the source folder itself is refused before anything is read."""
    text = write_sample_corpus(tmp_path / "text") / "books"
    for name in ("exp", "exp2"):
        r = cli("prepare", ".", "--name", name, cwd=text)
        assert r.returncode == 0, r.stderr
    books = {p.name for p in text.iterdir() if p.is_file()}
    ids = {rec["id"].removeprefix("folder/") for s in ("train", "val") for rec in read_split(text / "runs/exp2/data" / s)}
    assert ids and ids <= books, ids - books
    assert "skipped 2 folders in . that antimatter wrote" in r.stderr

    (tmp_path / "c.yaml").write_text(f"data:\n  sources:\n    - path: {text}\n")
    r = cli("prepare", "-c", "c.yaml", "--runs-dir", str(text.parent), "--name", "books", cwd=tmp_path)
    assert_user_error(r, "prepare", f"{text} lies in {text}, which this prepare writes",
                      "another --name or --runs-dir")
    assert not (text / "data").exists()
    assert not (text / "config.yaml").exists() and not (text / "train.lock").exists()  # refused before the run
