"""Readers: turn each configured source into a stream of raw documents, with bounded memory.

A source (a file, folder, glob, Hugging Face `save_to_disk` folder, or `default`) expands into *units*, one
per input file (the default corpus is cut into slices, each of one part: default/prose, default/meta,
default/stdlib, which are also their source names); a unit is the piece of work one worker process
reads. Readers yield `RawDoc`s, or `BadInput` records for what could not be read (malformed JSON line,
missing text field, binary file): those are counted as removed documents and logged with file:line, never
silently dropped. Everything streams: JSON Lines line by line, Parquet and Arrow batch by batch.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from antimatter.config import SAVED_CONFIG_HEADER, SourceConfig
from antimatter.data import default_corpus
from antimatter.errors import UserError, shorten
from antimatter.files import STAGE_MARK, open_zstd, walk_entries

CODE_EXTS = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".js", ".mjs", ".ts", ".tsx",
             ".java", ".go", ".rs", ".sh", ".bash", ".zsh", ".pl", ".pm", ".rb", ".lua", ".cs", ".swift", ".kt",
             ".scala", ".sql", ".r", ".jl", ".php", ".m", ".f90", ".hs", ".ml", ".ex", ".erl", ".clj", ".el",
             ".vim", ".cmake", ".mk", ".s", ".asm", ".zig", ".nim", ".dart", ".vue", ".css", ".scss"}
MARKDOWN_EXTS = {".md", ".markdown", ".mdx"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".ndjson.gz", ".ndjson.zst", ".json",
                  ".json.gz", ".json.zst")
FORMATS = ("auto", "text", "jsonl", "parquet", "hf", "html", "default")
DEFAULT_SLICE_BYTES = 2_000_000
UNIT_BYTES = 4_000_000  # files smaller than this are grouped into units of about this size ...
UNIT_FILES = 2_000  # ... and at most this many files
_SHARD_SUFFIX = re.compile(r"[-_.](\d{3,}|train|val|valid|test|part-?\d+)$")


@dataclass(frozen=True)
class Unit:
    """One piece of work: one input file, or one slice of the embedded default corpus."""

    index: int
    source: int  # position in cfg.data.sources
    name: str  # the source's name (stats and output records use it)
    path: str  # the first file (for messages)
    format: str
    nbytes: int  # size on disk, for progress bars and scheduling
    items: tuple[default_corpus.DefaultItem, ...] = ()
    paths: tuple[str, ...] = ()  # all files of the unit: small files are grouped so a folder of 100k
    # notes is a few hundred units, not 100k tasks


@dataclass
class RawDoc:
    id: str
    data: bytes | str  # bytes are decoded (and invalid UTF-8 counted) by the cleaner
    kind: str = ""  # hint from the file extension: code | prose | reference | "" (decide from content)
    where: str = ""
    replaced: bool = False  # invalid UTF-8 was already replaced by the reader


@dataclass
class BadInput:
    """Something that could not become a document; counted under `reason` and logged at `where`."""

    reason: str
    where: str
    message: str
    nbytes: int = 0


@dataclass
class ReadProgress:
    """How far a reader got in its unit on disk (compressed bytes), for progress bars."""

    fh: io.IOBase | None = None
    done: int = 0  # bytes of the unit's files already finished

    def position(self) -> int:
        try:
            return self.done + (self.fh.tell() if self.fh is not None and not self.fh.closed else 0)
        except (OSError, ValueError):
            return self.done


# ------------------------------------------------------------------------------------- expanding sources


def kind_from_name(name: str) -> str:
    """`code` when the file name says so (".py", ".h", ...), `prose` for markdown (its code blocks and tables
    are judged apart from its prose), else "" (let the content decide)."""
    n = name.lower()
    for suffix in (".gz", ".zst"):
        n = n.removesuffix(suffix)
    ext = os.path.splitext(n)[1]
    return "code" if ext in CODE_EXTS else "prose" if ext in MARKDOWN_EXTS else ""


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "hf" if _is_hf_dir(path) else "folder"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "hf"
    if name.endswith((".html", ".htm", ".xhtml")):
        return "html"
    return "text"


def _is_hf_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def path_text(path: str | Path) -> str:
    """`path` as text that encodes as UTF-8, for records, logs and statistics: the bytes of a file name that is
    not valid UTF-8 (which Python holds as lone surrogates) become \\xNN escapes instead of a crash."""
    text = str(path)
    return text if text.isascii() else os.fsencode(text).decode("utf-8", "backslashreplace")


def source_name(path: str) -> str:
    """A readable source name from a path: `corpus/gutenberg-00001.jsonl.zst` -> `gutenberg`."""
    return path_text(_name_from_path(path))


def _name_from_path(path: str) -> str:
    p = Path(path.rstrip("/"))
    if any(c in path for c in "*?["):
        parts = [q for q in p.parts if not any(c in q for c in "*?[")]
        stem = re.sub(r"[*?\[\]]", "", p.name).split(".")[0].strip("-_.")
        return stem or (Path(*parts).name if parts else "glob")
    name = p.name
    for suffix in (".gz", ".zst"):
        name = name.removesuffix(suffix)
    if p.is_dir():
        return name or "folder"
    stem = name.split(".")[0] if not name.startswith(".") else name
    stem = _SHARD_SUFFIX.sub("", stem) or stem
    return stem or "source"


def sources_from_paths(paths: list[str]) -> list[SourceConfig]:
    """One SourceConfig per command-line path (file, folder or glob); format and name from the path (a name
    taken by an earlier path gets -2, -3...)."""
    out = []
    for p in paths:
        if p == "default":
            out.append(SourceConfig(path="default", name="default"))
            continue
        if not any(c in p for c in "*?[") and not Path(p).exists():
            raise UserError(f"input path does not exist: {p}: check the spelling, or quote a glob like 'dir/*.txt'")
        fmt = "auto"
        if Path(p).is_file() or Path(p).is_dir():
            det = detect_format(Path(p))
            fmt = det if det in FORMATS else "auto"
        base = name = source_name(p)
        taken = {s.name for s in out}
        n = 1
        while name in taken:  # A/docs and B/docs: two sources, each with its own statistics
            n += 1
            name = f"{base}-{n}"
        out.append(SourceConfig(path=p, name=name, format=fmt))
    return out


def written_by_antimatter(folder: Path) -> bool:
    """Whether `folder` is a run folder (its config.yaml starts with the header `save_config` writes) or a
    stage folder (prepared data, a tokenizer, tokens: marked by STAGE_MARK): what antimatter writes there is
    not text, and a run's own folder under a source (`.` with runs/ in it) would be read as documents."""
    if (folder / STAGE_MARK).is_file():
        return True
    config = folder / "config.yaml"
    if not config.is_file():  # also keeps a FIFO of that name from being opened
        return False
    header = SAVED_CONFIG_HEADER.encode()
    try:
        with open(config, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False


def _walk(folder: Path) -> list[Path]:
    """Regular files under `folder` (hidden ones left out; see files.walk_entries). FIFOs, sockets, devices and
    dangling links are skipped with a note: reading a FIFO would block forever. So are the run and stage
    folders below `folder` (`written_by_antimatter`)."""
    files, skipped, ours = [], [], []

    def prune(d: Path) -> bool:
        if written_by_antimatter(d):
            ours.append(d)
            return True
        return False

    for f in walk_entries(folder, hidden=False, prune=prune):
        (files if f.is_file() else skipped).append(f)
    if skipped:
        print(f"prepare: skipped {len(skipped)} entries in {folder} that are not regular files (FIFOs, sockets, "
              f"devices, dangling links), e.g. {skipped[0]}", file=sys.stderr)
    if ours:
        print(f"prepare: skipped {len(ours)} folders in {folder} that antimatter wrote (runs, prepared data: not "
              f"text), e.g. {ours[0]}", file=sys.stderr)
    return files


def _outside_ours(matches: list[Path], pattern: str) -> list[Path]:
    """A glob's matches less those inside a run or stage folder below the glob's fixed part (`data/**/*`
    over a folder that holds runs/), as a folder source leaves them out (_walk)."""
    fixed = Path(*[part for part in itertools.takewhile(lambda q: not any(c in q for c in "*?["),
                                                         Path(pattern).parts)])
    ours: dict[Path, bool] = {}

    def inside(p: Path) -> bool:
        for folder in ([p] if p.is_dir() else []) + list(p.parents):
            if folder == fixed or folder in fixed.parents:
                return False
            if folder not in ours:
                ours[folder] = written_by_antimatter(folder)
            if ours[folder]:
                return True
        return False

    kept, skipped = [], []
    for p in matches:
        (skipped if inside(p) else kept).append(p)
    if skipped:
        print(f"prepare: skipped {len(skipped)} matches of {pattern} inside folders that antimatter wrote (runs, "
              f"prepared data: not text), e.g. {skipped[0]}", file=sys.stderr)
    return kept


def _files_of(src: SourceConfig) -> list[tuple[Path, str]]:
    """The (file, format) pairs a source reads, in a deterministic order."""
    path = os.path.expanduser(src.path)
    if any(c in path for c in "*?["):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise UserError(f"source '{src.name or path}': the glob {path} matches no file: check the pattern")
        candidates = _outside_ours([Path(m) for m in matches], path)
        if not candidates:
            raise UserError(f"source '{src.name or path}': the glob {path} matches only files inside folders that "
                            f"antimatter wrote (runs, prepared data): point it at your text")
    else:
        p = Path(path)
        if not p.exists():
            raise UserError(f"source '{src.name or path}': path does not exist: {path}: "
                            f"fix data.sources[].path (or the path given to `antimatter prepare`)")
        candidates = [p]
    out: list[tuple[Path, str]] = []
    for p in candidates:
        if p.is_dir():
            if src.format == "hf" or (src.format == "auto" and _is_hf_dir(p)):
                arrows = sorted(p.rglob("*.arrow"))
                if not arrows:
                    raise UserError(f"source '{src.name}': {p} has no .arrow files: is it a save_to_disk folder?")
                out.extend((a, "hf") for a in arrows)
                continue
            for f in _walk(p):
                out.append((f, detect_format(f) if src.format == "auto" else src.format))
        elif p.is_file():
            out.append((p, detect_format(p) if src.format == "auto" else src.format))
    return out


def expand_sources(sources: list[SourceConfig], default_corpus_bytes: int, unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """All units of all sources, in config order then path order: the canonical order of the corpus. Files
    smaller than `unit_bytes` are grouped into units of about that size (at most UNIT_FILES files)."""
    if not sources:
        raise UserError("no data sources: set data.sources (or pass paths: antimatter prepare PATH... --out DIR)")
    units: list[Unit] = []
    for si, src in enumerate(sources):
        if src.path == "default" or src.format == "default":
            # one source name per part (default/prose, default/meta, default/stdlib): the statistics, the
            # val split and eval's per-source scores keep the parts apart
            name = src.name or "default"
            items = default_corpus.default_items(default_corpus_bytes)
            chunk: list[default_corpus.DefaultItem] = []
            size = 0
            for item, nxt in zip(items, [*items[1:], None]):
                chunk.append(item)
                size += item.nbytes
                if nxt is None or nxt.group != item.group or size >= DEFAULT_SLICE_BYTES:
                    units.append(Unit(len(units), si, f"{name}/{item.group}", "default", "default", size,
                                      tuple(chunk)))
                    chunk, size = [], 0
            continue
        name = src.name or source_name(src.path)
        group: list[tuple[Path, int]] = []
        group_fmt = ""
        for f, fmt in [*_files_of(src), (None, "")]:
            size = f.stat().st_size if f is not None else 0
            if group and (f is None or fmt != group_fmt or sum(n for _, n in group) + size > unit_bytes
                          or len(group) >= UNIT_FILES):
                units.append(Unit(len(units), si, name, str(group[0][0]), group_fmt, sum(n for _, n in group),
                                  paths=tuple(str(p) for p, _ in group)))
                group = []
            if f is not None:
                group.append((f, size))
                group_fmt = fmt
    return units


# ------------------------------------------------------------------------------------------------ readers


def _open_binary(path: Path, progress: ReadProgress) -> io.BufferedIOBase:
    """The decompressed byte stream of a (maybe .gz / .zst) file; progress tracks the compressed position."""
    raw = open(path, "rb")  # noqa: SIM115 (closed by the caller's `with`)
    progress.fh = raw
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if name.endswith(".zst"):
        return open_zstd(raw, path)
    return raw


# byte-order marks of the UTF-16/32 encodings (UTF-32 first: its little-endian mark starts like UTF-16's)
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
         (b"\xfe\xff", "utf-16"))


def _bom_codec(head: bytes) -> str | None:
    """The UTF-16/32 codec a byte-order mark announces (such text is full of NUL bytes, yet it is text)."""
    return next((codec for bom, codec in _BOMS if head.startswith(bom)), None)


def _looks_binary(head: bytes) -> bool:
    return b"\x00" in head and _bom_codec(head) is None


def _bounded_lines(f: io.BufferedIOBase, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, length) of each line; a line longer than `limit` bytes comes as (None, length), read past in
    chunks and never held whole: one huge record costs memory bounded by the limit, not by its size."""
    while True:
        line = f.readline(limit + 1) if limit else f.readline()
        if not line:
            return
        if not limit or len(line) <= limit or line.endswith(b"\n"):
            yield line, len(line)
            continue
        n = len(line)
        while True:
            rest = f.readline(1 << 20)
            n += len(rest)
            if not rest or rest.endswith(b"\n"):
                break
        yield None, n


def read_unit(unit: Unit, src: SourceConfig, *, strict: bool, max_doc_bytes: int,
              progress: ReadProgress | None = None) -> Iterator[RawDoc | BadInput]:
    """The documents of one unit, in file order."""
    progress = progress or ReadProgress()
    if unit.format == "default":
        for item in unit.items:
            yield RawDoc(item.id, default_corpus.load_item(item), item.kind, item.id)
            progress.done += item.nbytes
        return
    for p in unit.paths or (unit.path,):
        path = Path(p)
        try:
            yield from _read_path(path, unit, src, strict, max_doc_bytes, progress)
        except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
            raise UserError(f"{path} cannot be decompressed ({type(e).__name__}: {shorten(str(e), 80)}): it is cut, "
                            f"corrupt or not what its name says; write or copy it again, or remove it") from None
        progress.fh = None
        progress.done += path.stat().st_size


def _read_path(path: Path, unit: Unit, src: SourceConfig, strict: bool, max_doc_bytes: int,
               progress: ReadProgress) -> Iterator[RawDoc | BadInput]:
    """The documents of one file (or HF dataset folder) of a unit."""
    if unit.format == "jsonl":
        yield from _read_jsonl(path, unit.name, src.text_field, strict, progress, max_doc_bytes)
    elif unit.format == "parquet":
        yield from _read_parquet(path, unit.name, src.text_field, strict)
    elif unit.format == "hf":
        yield from _read_arrow(path, unit.name, src.text_field, strict)
    elif unit.format in ("text", "html"):
        yield from _read_text_file(path, unit, max_doc_bytes, progress)
    else:
        raise UserError(f"source '{unit.name}': unknown format '{unit.format}' for {path}")


def _read_text_file(path: Path, unit: Unit, max_doc_bytes: int,
                    progress: ReadProgress) -> Iterator[RawDoc | BadInput]:
    size = path.stat().st_size
    doc_id, where = f"{unit.name}/{path_text(path.name)}", path_text(path)
    if max_doc_bytes and size > max_doc_bytes and not path.name.endswith((".gz", ".zst")):
        # do not load a huge file only to drop it: the filter `max_doc_bytes` would remove it anyway
        yield BadInput("filter.max_doc_bytes", where, f"{size} bytes > data.filters.max_doc_bytes", size)
        return
    with _open_binary(path, progress) as f:
        data = f.read(max_doc_bytes + 1) if max_doc_bytes else f.read()
    if max_doc_bytes and len(data) > max_doc_bytes:
        yield BadInput("filter.max_doc_bytes", where, f"more than {max_doc_bytes} bytes", len(data))
        return
    if _looks_binary(data[:8192]):
        yield BadInput("read.binary_file", where, "binary file (NUL bytes): not text", len(data))
        return
    if codec := _bom_codec(data[:4]):
        try:
            data = data.decode(codec)
        except UnicodeDecodeError as e:
            yield BadInput("read.bad_encoding", where, f"{codec} byte-order mark but invalid {codec}: {e.reason}",
                           len(data))
            return
    if unit.format == "html":
        text = html_to_text(data.decode("utf-8", errors="replace"))
        yield RawDoc(doc_id, text, "prose", where)
        return
    yield RawDoc(doc_id, data, kind_from_name(path.name), where)


def _read_jsonl(path: Path, name: str, text_field: str, strict: bool, progress: ReadProgress,
                max_doc_bytes: int = 0) -> Iterator[RawDoc | BadInput]:
    # JSON escapes can make a record's line longer than its text: twice the text limit (+64 KiB of other
    # fields) is read; a longer record cannot hold a document under the limit worth its memory, and is skipped
    limit = 2 * max_doc_bytes + 65536 if max_doc_bytes else 0
    shown, file_name = path_text(path), path_text(path.name)
    with _open_binary(path, progress) as f:
        first = True
        for lineno, (line, n) in enumerate(_bounded_lines(f, limit), 1):
            where = f"{shown}:{lineno}"
            if line is None:
                yield BadInput("filter.max_doc_bytes", where,
                               f"a {n}-byte record, over twice data.filters.max_doc_bytes", n)
                continue
            if first:
                first = False
                if codec := _bom_codec(line[:4]):
                    yield BadInput("read.bad_encoding", shown, f"JSON Lines in {codec.upper()}: convert the file "
                                   f"to UTF-8 (iconv -f {codec.upper()} -t UTF-8)", path.stat().st_size)
                    return
                if _looks_binary(line[:8192]):
                    yield BadInput("read.binary_file", shown, "binary file (NUL bytes): not JSON Lines",
                                   path.stat().st_size)
                    return
            if not line.strip():
                continue
            replaced = False
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                try:
                    rec = json.loads(line.decode("utf-8", errors="replace"))
                    replaced = True
                except json.JSONDecodeError:
                    if strict:
                        raise UserError(f"{where}: malformed JSON ({e.msg if hasattr(e, 'msg') else e}): "
                                        f"fix the line, or run without --strict to skip it") from None
                    yield BadInput("read.malformed_json", where, f"malformed JSON: {e}", len(line))
                    continue
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                msg = (f"no '{text_field}' field" if not isinstance(rec, dict) or text_field not in rec
                       else f"'{text_field}' is {type(text).__name__}, not a string")
                if strict:
                    raise UserError(f"{where}: {msg}: set the source's text_field, or run without --strict")
                yield BadInput("read.missing_text_field", where, msg, len(line))
                continue
            rid = rec.get("id")
            doc_id = rid if isinstance(rid, str) and rid else f"{name}/{file_name}:{lineno}"
            yield RawDoc(doc_id, text, kind_from_name(doc_id), where, replaced)


def _batches_text(batches, path: Path, name: str, text_field: str, strict: bool) -> Iterator[RawDoc | BadInput]:
    row = 0
    shown, file_name = path_text(path), path_text(path.name)
    for batch in batches:
        if text_field not in batch.schema.names:
            msg = f"no '{text_field}' column (columns: {', '.join(batch.schema.names)})"
            raise UserError(f"source '{name}': {path}: {msg}: set the source's text_field")
        texts = batch.column(text_field).to_pylist()
        ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [None] * len(texts)
        for rid, text in zip(ids, texts):
            where = f"{shown}:row {row}"
            row += 1
            if not isinstance(text, str):
                if strict:
                    raise UserError(f"{where}: '{text_field}' is {type(text).__name__}, not a string: "
                                    f"fix the data or run without --strict")
                yield BadInput("read.missing_text_field", where, f"'{text_field}' is not a string", 0)
                continue
            doc_id = str(rid) if rid not in (None, "") else f"{name}/{file_name}:{row - 1}"
            yield RawDoc(doc_id, text, kind_from_name(doc_id), where)


def _read_parquet(path: Path, name: str, text_field: str, strict: bool) -> Iterator[RawDoc | BadInput]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise UserError(f"source '{name}': {path} is not a readable Parquet file ({e}): check the file") from None
    cols = [c for c in (text_field, "id") if c in pf.schema_arrow.names] or None
    yield from _batches_text(pf.iter_batches(batch_size=1024, columns=cols), path, name, text_field, strict)


def _read_arrow(path: Path, name: str, text_field: str, strict: bool) -> Iterator[RawDoc | BadInput]:
    """An Arrow file of a Hugging Face `save_to_disk` folder (IPC stream format; file format also accepted)."""
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                f = pa.ipc.open_file(source)
            except pa.ArrowInvalid:
                raise UserError(f"source '{name}': {path} is not an Arrow file: check the folder") from None
            reader = (f.get_batch(i) for i in range(f.num_record_batches))
        yield from _batches_text(reader, path, name, text_field, strict)


def html_to_text(html: str) -> str:
    """Main text of an HTML page: trafilatura when installed (boilerplate removal), else the visible text."""
    try:
        import trafilatura  # optional: `pip install 'antimatter[html]'`

        text = trafilatura.extract(html, include_comments=False, include_tables=True)
        if text:
            return text
    except ImportError:
        pass
    from html.parser import HTMLParser

    class _Text(HTMLParser):
        skip = 0
        out: list[str]

        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style", "noscript", "template"):
                self.skip += 1
            elif tag in ("p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section"):
                self.out.append("\n")

        def handle_endtag(self, tag):
            if tag in ("script", "style", "noscript", "template") and self.skip:
                self.skip -= 1

        def handle_data(self, data):
            if not self.skip:
                self.out.append(data)

    parser = _Text()
    parser.out = []
    parser.feed(html)
    parser.close()
    return "".join(parser.out)
