"""Readers: every input format, folder/glob expansion and source naming, with real files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from antimatter.config import RunConfig, SourceConfig
from antimatter.data.prepare import run_prepare
from antimatter.data.sample import SENTENCES
from antimatter.data.sources import (
    RawDoc,
    detect_format,
    expand_sources,
    html_to_text,
    read_unit,
    source_name,
    sources_from_paths,
)
from antimatter.errors import UserError


def docs_of(src: SourceConfig) -> list[RawDoc]:
    out = []
    for unit in expand_sources([src], 100_000):
        out.extend(d for d in read_unit(unit, src, strict=False, max_doc_bytes=10**7) if isinstance(d, RawDoc))
    return out


def texts(n: int, start: int = 0) -> list[str]:
    return [" ".join(SENTENCES[(start + i) % 40: (start + i) % 40 + 6]) for i in range(n)]


def test_source_names_and_formats(tmp_path):
    (tmp_path / "gutenberg-00001.jsonl.zst").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    assert source_name(str(tmp_path / "gutenberg-00001.jsonl.zst")) == "gutenberg"
    assert source_name(str(tmp_path / "notes")) == "notes"
    assert source_name(str(tmp_path / "books" / "*.txt")) == "books"
    assert source_name("data/wiki-*.parquet") == "wiki"
    assert detect_format(tmp_path / "a.jsonl.gz") == "jsonl"
    assert detect_format(tmp_path / "a.parquet") == "parquet"
    assert detect_format(tmp_path / "a.html") == "html"
    assert detect_format(tmp_path / "a.md") == "text"
    srcs = sources_from_paths([str(tmp_path / "gutenberg-00001.jsonl.zst"), str(tmp_path / "notes"),
                               str(tmp_path / "*.zst")])
    assert [s.name for s in srcs] == ["gutenberg", "notes", tmp_path.name]
    assert srcs[0].format == "jsonl"


def test_text_folder_and_glob_in_sorted_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.md").write_text("first")
    (tmp_path / "d" / "sub" / "c.py").write_text("x = 1")
    (tmp_path / "d" / ".hidden").write_text("skip me")
    docs = docs_of(SourceConfig(path=str(tmp_path / "d"), name="d"))
    assert [d.data for d in docs] == [b"first", b"second", b"x = 1"]
    assert [d.kind for d in docs] == ["prose", "", "code"]  # markdown is prose (with code blocks and tables)
    glob_docs = docs_of(SourceConfig(path=str(tmp_path / "d" / "*.txt"), name="g"))
    assert [d.data for d in glob_docs] == [b"second"]


def test_parquet_with_text_field(tmp_path):
    rows = texts(30)
    table = pa.table({"id": [f"p{i}" for i in range(30)], "content": rows, "n": list(range(30))})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=7)
    docs = docs_of(SourceConfig(path=str(tmp_path / "part.parquet"), name="pq", text_field="content"))
    assert [d.data for d in docs] == rows and docs[3].id == "p3"
    with pytest.raises(UserError, match="no 'text' column.*set the source's text_field"):
        docs_of(SourceConfig(path=str(tmp_path / "part.parquet"), name="pq"))


def test_hf_save_to_disk_folder(tmp_path):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files + dataset_info/state json."""
    folder = tmp_path / "hfds"
    folder.mkdir()
    rows = texts(12, start=3)
    table = pa.table({"text": rows})
    for i, chunk in enumerate((table.slice(0, 5), table.slice(5))):
        with pa.OSFile(str(folder / f"data-0000{i}-of-00002.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, chunk.schema) as writer:
                writer.write_table(chunk)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": []}))
    srcs = sources_from_paths([str(folder)])
    assert srcs[0].format == "hf"
    assert [d.data for d in docs_of(srcs[0])] == rows
    cfg = RunConfig()
    cfg.data.sources, cfg.data.workers, cfg.data.val_fraction = srcs, 1, 0.3
    stats = run_prepare(cfg, tmp_path / "out")
    assert stats["sources"]["hfds"]["docs_in"] == 12


def test_html_to_text(tmp_path):
    html = ("<html><head><style>p {color: red}</style><script>var x = 1;</script></head><body>"
            f"<h1>Title</h1><p>{SENTENCES[0]}</p><p>{SENTENCES[1]}</p></body></html>")
    text = html_to_text(html)
    assert SENTENCES[0] in text and "var x" not in text and "color" not in text
    (tmp_path / "page.html").write_text(html)
    docs = docs_of(SourceConfig(path=str(tmp_path / "page.html"), name="web"))
    assert len(docs) == 1 and SENTENCES[1] in docs[0].data


def test_default_corpus_is_deterministic_and_bounded():
    a = expand_sources([SourceConfig()], 500_000)
    b = expand_sources([SourceConfig()], 500_000)
    assert a == b
    items = [it for u in a for it in u.items]
    assert sum(it.nbytes for it in items) <= 500_000
    assert {it.kind for it in items} == {"code", "prose"}
    assert any("LICENSE" in it.id or "LICENCE" in it.id for it in items)


def test_small_files_grouped_into_units(tmp_path):
    for i in range(7):
        (tmp_path / f"n{i}.txt").write_text(f"note {i} " * 50)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": "x " * 500}) + "\n")
    src = SourceConfig(path=str(tmp_path), name="notes")
    units = expand_sources([src], 0, unit_bytes=1300)
    assert [u.format for u in units] == ["jsonl", "text", "text", "text"]
    assert [len(u.paths) for u in units] == [1, 3, 3, 1]  # 3 x 400 bytes fit in 1300
    docs = [d for u in units for d in read_unit(u, src, strict=False, max_doc_bytes=10**7) if isinstance(d, RawDoc)]
    assert len(docs) == 8
    assert [len(u.paths) for u in expand_sources([src], 0)] == [1, 7]  # the default unit holds all the notes


def read_all(path, max_doc_bytes: int) -> list:
    src = SourceConfig(path=str(path))
    return [d for unit in expand_sources([src], 100_000)
            for d in read_unit(unit, src, strict=False, max_doc_bytes=max_doc_bytes)]


def test_a_huge_jsonl_record_is_dropped_without_being_held(tmp_path):
    """A record far over max_doc_bytes is skipped while reading (counted, with its line), never loaded whole:
    peak Python memory stays a small multiple of the limit, not of the record; the lines around it are kept."""
    import tracemalloc

    f = tmp_path / "big.jsonl"
    with f.open("w") as fh:
        fh.write(json.dumps({"text": texts(1)[0]}) + "\n")
        fh.write('{"text": "' + "x" * 40_000_000 + '"}\n')
        fh.write(json.dumps({"text": texts(1, 3)[0]}) + "\n")
    tracemalloc.start()
    out = read_all(f, max_doc_bytes=100_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8_000_000, peak
    kept = [d for d in out if isinstance(d, RawDoc)]
    dropped = [d for d in out if not isinstance(d, RawDoc)]
    assert [d.data for d in kept] == [texts(1)[0], texts(1, 3)[0]]
    assert len(dropped) == 1 and dropped[0].reason == "filter.max_doc_bytes" and dropped[0].where.endswith(":2")


def test_utf16_text_with_a_bom_is_read_as_text(tmp_path):
    """A UTF-16 file with its byte-order mark (as Windows tools write them) is text, not 'binary'."""
    for name, codec in (("le.txt", "utf-16-le"), ("be.txt", "utf-16-be")):
        bom = b"\xff\xfe" if codec.endswith("le") else b"\xfe\xff"
        (tmp_path / name).write_bytes(bom + (texts(1)[0] + " é ü\n").encode(codec))
    out = read_all(tmp_path, max_doc_bytes=10**6)
    kept = [d for d in out if isinstance(d, RawDoc)]
    assert len(kept) == 2 and {d.data for d in kept} == {texts(1)[0] + " é ü\n"}
    (tmp_path / "le.txt").write_bytes(b"\xff\xfe" + b"\x00\xd8")  # a lone surrogate: not UTF-16
    (tmp_path / "be.txt").unlink()
    (bad,) = read_all(tmp_path, max_doc_bytes=10**6)
    assert bad.reason == "read.bad_encoding" and "utf-16" in bad.message


def test_two_input_folders_with_the_same_name_stay_two_sources(tmp_path):
    """`prepare A/docs B/docs`: each path is its own source (own statistics and val share), not one merged."""
    from antimatter.data.sources import sources_from_paths

    for part in ("A", "B", "C"):
        (tmp_path / part / "docs").mkdir(parents=True)
        (tmp_path / part / "docs" / "x.txt").write_text("text")
    names = [s.name for s in sources_from_paths([str(tmp_path / p / "docs") for p in ("A", "B", "C")])]
    assert names == ["docs", "docs-2", "docs-3"]


def test_folders_antimatter_wrote_are_skipped_inside_a_source(tmp_path, capsys):
    """A prepared folder or a run folder under an input folder holds shards, configs and locks, not text: the
    walk skips them, by the marks the stages and save_config leave. A user's own config.yaml is read."""
    from antimatter.config import save_config
    from antimatter.manifest import claim

    folder = tmp_path / "d"
    (folder / "notes").mkdir(parents=True)
    (folder / "a.txt").write_text("mine")
    (folder / "notes" / "config.yaml").write_text("my: settings\n")
    claim(folder / "pc", "prepare")
    (folder / "pc" / "shard.txt").write_text("prepared")
    save_config(RunConfig(), folder / "runs" / "exp" / "config.yaml")
    (folder / "runs" / "exp" / "notes.txt").write_text("the run's")
    docs = docs_of(SourceConfig(path=str(folder), name="d"))
    assert [d.data for d in docs] == [b"mine", b"my: settings\n"]
    assert f"skipped 2 folders in {folder} that antimatter wrote" in capsys.readouterr().err
    # a recursive glob over the same folder leaves out the same files (and says so)
    docs = docs_of(SourceConfig(path=str(folder / "**" / "*.*"), name="g"))
    assert sorted(d.data for d in docs) == [b"mine", b"my: settings\n"]
    assert "skipped 3 matches of" in capsys.readouterr().err  # shard.txt, the run's config.yaml and notes.txt
    with pytest.raises(UserError, match=r"matches only files inside folders that antimatter wrote"):
        docs_of(SourceConfig(path=str(folder / "runs" / "**" / "*.txt"), name="r"))
    assert [d.data for d in docs_of(SourceConfig(path=str(folder / "runs" / "exp" / "*.txt"), name="e"))] == \
        [b"the run's"]  # a glob inside the run folder itself names what it wants
