"""`antimatter prepare`: collect -> clean -> filter -> dedup -> split, writing the run's data folder.

Three passes, memory bounded by the per-document metadata (no text is held):
1. workers (one unit = one input file or default-corpus slice each) read, clean, judge and sign documents;
   survivors go to a temporary zstd file per unit, and each worker returns only per-document metadata
   (size, removal reason, exact key, MinHash signature);
2. the main process walks that metadata in the canonical order (source, file, position): source byte
   caps, exact and near dedup (across sources, before the split), then the train/val split, a share of
   each source's bytes (`data.split` says how);
3. the main process streams the temporary files again, writes `train/` and `val/` shards (the format of
   `data.records`; a long document's tail goes to val) and the statistics.
The output depends only on the input and the config, never on the number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import resource
import shutil
import signal
import sys
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from antimatter.config import DataConfig, RunConfig, SourceConfig
from antimatter.data import SPLITS
from antimatter.data.clean import clean_text, decode
from antimatter.data.dedup import Deduper, Signer, exact_key
from antimatter.data.filters import QualityFilter, describe, guess_kind
from antimatter.data.records import SHARD_GLOB, RecordShardWriter, RecordWriter, RejectWriter, iter_records
from antimatter.data.sources import (
    BadInput,
    RawDoc,
    ReadProgress,
    Unit,
    expand_sources,
    path_text,
    read_unit,
)
from antimatter.data.split import (
    TAIL_MIN_BYTES,
    TAIL_SUFFIX,
    InterleavedVal,
    choose_val,
    cut_tail,
    hash_fraction,
)
from antimatter.data.stats import SourceStats, check_invariant, removal_report, summary_table
from antimatter.errors import UserError
from antimatter.files import folder_lock
from antimatter.provenance import provenance

TMP_DIR = ".prepare-tmp"
MAX_LOG_LINES_PER_UNIT = 1000
KEPT = "kept"  # pass 2's decision for a document dedup keeps, until the split names its split
TAIL = "train+tail"  # the split's decision for a long document: its head to train, its tail to val
Decision = tuple[str, Any]  # ("train" | "val" | TAIL | "capped" | removal reason, key of the kept original or None)


@dataclass
class DocMeta:
    id: str
    nbytes_in: int
    reason: str | None  # None = survived the worker (dedup decides next)
    rule_set: str = ""
    cleaned: tuple[str, ...] = ()
    exact: bytes = b""
    nbytes: int = 0
    nchars: int = 0
    measure: Any = None  # what the rule that removed it measured (for the setting that would keep it)


@dataclass
class Plan:
    """Pass 2's outcome: the statistics of every source so far and, per unit, one decision per survivor of
    its worker (in the order of its temporary file)."""

    per_source: dict[str, SourceStats]
    decisions: list[list[Decision]]
    kept: int = 0  # documents that go to a split


@dataclass
class UnitResult:
    index: int
    docs: list[DocMeta] = field(default_factory=list)
    sigs: list[np.ndarray | None] = field(default_factory=list)  # one per survivor, in order
    log: list[str] = field(default_factory=list)
    log_dropped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ pass 1: workers

_STATE: dict[str, Any] = {}


def _init_worker(data: DataConfig, tmp: str, report: Callable[[int, int, int], None]) -> None:
    """`report(disk bytes, documents, text bytes)` takes the worker's progress."""
    _STATE.update(data=data, tmp=Path(tmp), report=report, filter=QualityFilter(data.filters),
                  signer=Signer(data.dedup) if data.dedup.near else None)


def _report(disk: int, docs: int, text: int) -> None:
    _STATE["report"](disk, docs, text)


class _Meter:
    """A worker's progress, sent to the main process at most every half second (a queue message per
    document would cost more than the work on short documents)."""

    def __init__(self, progress: ReadProgress):
        self.progress = progress
        self.pos = self.docs = self.text = 0
        self.last = time.perf_counter()

    def add(self, nbytes_in: int) -> None:
        self.docs += 1
        self.text += nbytes_in
        now = time.perf_counter()
        if now - self.last > 0.5:
            pos = self.progress.position()
            _report(pos - self.pos, self.docs, self.text)
            self.pos, self.docs, self.text, self.last = pos, 0, 0, now

    def finish(self, unit_bytes: int) -> None:
        _report(max(0, unit_bytes - self.pos), self.docs, self.text)


def unit_file(tmp: Path, index: int, kind: str) -> Path:
    return tmp / f"unit_{index:06d}.{kind}.jsonl.zst"


def process_unit(unit: Unit) -> UnitResult:
    """Read, clean, filter and sign one unit; survivors (and rejects if asked) go to temporary files."""
    data: DataConfig = _STATE["data"]
    src = data.sources[unit.source]
    res = UnitResult(unit.index, seconds=dict.fromkeys(("read", "clean", "filter", "dedup_sign", "write"), 0.0))
    keep = RecordWriter(unit_file(_STATE["tmp"], unit.index, "keep"), level=1)
    rejects = RecordWriter(unit_file(_STATE["tmp"], unit.index, "reject"), level=1) if data.keep_rejects else None
    progress = ReadProgress()
    meter = _Meter(progress)
    used_bytes = 0
    reader = read_unit(unit, src, strict=data.strict, max_doc_bytes=data.filters.max_doc_bytes, progress=progress)
    try:
        for item in _timed_reads(reader, res.seconds):
            if isinstance(item, BadInput):
                _log_bad_input(res, item)
                used_bytes += item.nbytes
                continue
            meta = _judge(item, src, unit.name, res, keep, rejects)
            res.docs.append(meta)
            used_bytes += meta.nbytes_in
            meter.add(meta.nbytes_in)
            if src.max_bytes and used_bytes >= src.max_bytes:
                break  # the source's byte cap: the main process cuts at the exact document
    finally:
        keep.close()
        if rejects is not None:
            rejects.close()
        reader.close()
    meter.finish(unit.nbytes)
    return res


def _timed_reads(reader: Iterator[RawDoc | BadInput], seconds: dict[str, float]) -> Iterator[RawDoc | BadInput]:
    """The reader's items, with the time spent reading them added to seconds["read"]."""
    while True:
        t = time.perf_counter()
        item = next(reader, None)
        seconds["read"] += time.perf_counter() - t
        if item is None:
            return
        yield item


def _log_bad_input(res: UnitResult, item: BadInput) -> None:
    measure = item.nbytes if item.reason == "filter.max_doc_bytes" else None
    res.docs.append(DocMeta(item.where, item.nbytes, item.reason, measure=measure))
    if len(res.log) < MAX_LOG_LINES_PER_UNIT:
        res.log.append(f"{item.where}: {item.reason}: {item.message}")
    else:
        res.log_dropped += 1


def _judge(item: RawDoc, src: SourceConfig, source_name: str, res: UnitResult, keep: RecordWriter,
           rejects: RecordWriter | None) -> DocMeta:
    """Clean and filter one document; a survivor is signed for dedup and written to `keep`, a removed
    document to `rejects` (when rejects are kept)."""
    secs = res.seconds
    t = time.perf_counter()
    text, nbytes_in, rule_set, changed = _clean(item, src, res.log)
    t2 = time.perf_counter()
    secs["clean"] += t2 - t
    reason, measure = _filter(text, rule_set)
    t3 = time.perf_counter()
    secs["filter"] += t3 - t2
    meta = DocMeta(item.id, nbytes_in, reason, rule_set, tuple(changed), measure=measure)
    if reason is None:
        signer: Signer | None = _STATE["signer"]
        meta.exact = exact_key(text)
        res.sigs.append(signer.signature(text) if signer is not None else None)
        t4 = time.perf_counter()
        secs["dedup_sign"] += t4 - t3
        meta.nbytes = len(text.encode("utf-8", "replace"))
        meta.nchars = len(text)
        keep.write({"id": item.id, "text": text})
        secs["write"] += time.perf_counter() - t4
    elif rejects is not None:
        why = ("empty after cleaning" if reason == "clean.empty"
               else describe(reason.removeprefix("filter."), measure, _STATE["data"].filters))
        rejects.write({"id": item.id, "source": source_name, "reason": reason, "why": why, "text": text})
    return meta


def _clean(item: RawDoc, src: SourceConfig, log: list[str]) -> tuple[str, int, str, list[str]]:
    """(cleaned text, input bytes, rule set, names of the cleaning steps that changed it) of a document."""
    text, invalid = decode(item.data)
    invalid = invalid or item.replaced
    nbytes_in = len(item.data) if isinstance(item.data, bytes) else len(text.encode("utf-8", "replace"))
    kind = guess_kind(text, item.kind)
    rule_set = kind if src.rules == "auto" else src.rules
    text, changed = clean_text(text, src, kind)
    if invalid:
        changed = ["invalid_utf8", *changed]
        if len(log) < MAX_LOG_LINES_PER_UNIT:
            log.append(f"{item.where}: clean.invalid_utf8: invalid UTF-8 bytes replaced by U+FFFD")
    return text, nbytes_in, rule_set, changed


def _filter(text: str, rule_set: str) -> tuple[str | None, Any]:
    """The removal reason of a cleaned document (None when it passes) and what its rule measured."""
    if not text.strip():
        return "clean.empty", None
    rule, measure = _STATE["filter"].judge(text, rule_set)
    return (f"filter.{rule}", measure) if rule else (None, None)


def _run_workers(units: list[Unit], data: DataConfig, tmp: Path, workers: int) -> list[UnitResult]:
    total = sum(u.nbytes for u in units)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare: read+clean+filter",
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    counts = {"docs": 0, "text": 0}
    t0 = time.perf_counter()

    def update(disk: int, docs: int, text: int) -> None:
        counts["docs"] += docs
        counts["text"] += text
        dt = max(1e-6, time.perf_counter() - t0)
        bar.set_postfix_str(f"{counts['docs'] / dt:,.0f} docs/s, {counts['text'] / dt / 1e6:.1f} MB/s text",
                            refresh=False)
        bar.update(disk)

    try:
        if workers <= 1:
            _init_worker(data, str(tmp), update)
            return [process_unit(u) for u in units]
        return _run_pool(units, data, tmp, workers, update)
    finally:
        bar.close()


def _run_pool(units: list[Unit], data: DataConfig, tmp: Path, workers: int, update) -> list[UnitResult]:
    """`process_unit` of every unit in `workers` spawned processes; the results in unit order.

    Each worker has a pipe to the main process, which hands it the next unit (largest first keeps every
    worker busy to the end) and receives its progress and results. A worker that dies ends the run with
    one line; it is never replaced (a replacement that dies the same way would loop forever). The workers
    are started with the calling script hidden from them (`_calling_script_hidden`)."""
    ctx = mp.get_context("spawn")
    todo = sorted(units, key=lambda u: (-u.nbytes, u.index))
    todo.reverse()  # pop() gives the largest next
    by_index = {u.index: u for u in units}
    results: dict[int, UnitResult] = {}
    procs: list[Any] = []
    conns: list[Connection] = []
    busy: dict[Connection, Unit | None] = {}  # open connection -> the unit its worker is on (None: stopping)
    try:
        with _calling_script_hidden():
            for _ in range(workers):
                here, there = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(data, str(tmp), there), name="antimatter-prepare",
                                daemon=True)
                p.start()
                there.close()  # the worker holds the only other end: its death reads as EOF here
                procs.append(p)
                conns.append(here)
        for c in conns:
            busy[c] = _hand_out(c, todo)
        while busy:
            for c in mp_connection.wait(list(busy)):
                assert isinstance(c, Connection)
                try:
                    msg = c.recv()
                except (EOFError, OSError):  # the worker's end closed: it exited or died
                    if busy[c] is not None:
                        raise _worker_died(procs[conns.index(c)], busy[c]) from None
                    del busy[c]  # told to stop, and stopped
                    continue
                if msg[0] == "progress":
                    update(*msg[1:])
                elif msg[0] == "done":
                    results[msg[1].index] = msg[1]
                    busy[c] = _hand_out(c, todo)
                else:  # "error": the worker's exception (e.g. a UserError under --strict), raised here
                    _, index, exc, tb = msg
                    exc.__cause__ = _RemoteTraceback(f"\nin the worker, on {by_index[index].path}:\n{tb}")
                    raise exc
    finally:
        for c in conns:
            c.close()
        for p in procs:
            p.join(timeout=5 if len(results) == len(units) else 0)
            if p.is_alive():
                p.terminate()
                p.join()
    return [results[u.index] for u in units]


class _RemoteTraceback(Exception):
    def __str__(self) -> str:
        return str(self.args[0])


def _hand_out(conn: Connection, todo: list[Unit]) -> Unit | None:
    """Send the worker at `conn` its next unit, or None (stop) when none is left; returns what was sent."""
    unit = todo.pop() if todo else None
    try:
        conn.send(unit)
    except OSError:
        pass  # the worker is dead: its connection reads as closed next, and its death is reported then
    return unit


def _worker_died(proc: Any, unit: Unit) -> UserError:
    proc.join(timeout=5)
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    return UserError(f"a prepare worker process stopped ({how}) while reading {unit.path}: if it ran out of "
                     f"memory, lower data.workers; data.workers=1 runs everything in this process and shows "
                     f"any error there")


def _worker(data: DataConfig, tmp: str, conn: Connection) -> None:
    """A worker process: units from `conn` until None, answering each with its progress and its result (or
    the exception that stopped it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops the workers
    _init_worker(data, tmp, lambda *m: conn.send(("progress", *m)))
    try:
        while (unit := conn.recv()) is not None:
            try:
                res = process_unit(unit)
            except Exception as e:  # noqa: BLE001 - every error goes to the main process, which raises it
                conn.send(("error", unit.index, _sendable(e), traceback.format_exc()))
                return
            conn.send(("done", res))
    except (EOFError, OSError):
        return  # the main process is gone (or stopped early): nothing to report to


def _sendable(e: Exception) -> Exception:
    """`e`, or a RuntimeError with its text where `e` would not survive the trip to the main process."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


@contextmanager
def _calling_script_hidden() -> Iterator[None]:
    """While starting worker processes: the spawn start method makes each new process run the calling
    script (`__main__`) again unless the script is guarded by `if __name__ == "__main__":`, so a plain
    script would start prepare again inside every worker (which dies at start), and a script piped on stdin
    has no file to run (the worker dies too). The workers need nothing from that script, so they are
    started with a blank `__main__` in its place."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


# ------------------------------------------------------------------------------------ pass 2: dedup, split


def _problem_lines(units: list[Unit], results: list[UnitResult]) -> list[str]:
    """The input problems the workers logged, in canonical order (the lines of rejects.log)."""
    lines: list[str] = []
    for unit, res in zip(units, results):
        lines.extend(res.log)
        if res.log_dropped:
            lines.append(f"{path_text(unit.path)}: ... and {res.log_dropped} more problems not listed")
    return lines


def _dedup(units: list[Unit], results: list[UnitResult], data: DataConfig) -> Plan:
    """Source byte caps, then exact and near dedup across all sources, in canonical order; each survivor's
    decision is KEPT, "capped" or the dedup reason with the key of the document it duplicates."""
    deduper = Deduper(data.dedup)
    per_source: dict[str, SourceStats] = {}
    used: dict[int, int] = {}  # bytes read so far per source, for its byte cap
    decisions: list[list[Decision]] = []
    bar = tqdm(total=sum(len(r.docs) for r in results), desc="prepare: dedup+split", unit="doc", file=sys.stderr,
               dynamic_ncols=True)
    for unit, res in zip(units, results):
        st = per_source.setdefault(unit.name, SourceStats())
        decisions.append(_dedup_unit(unit, res, data.sources[unit.source], st, deduper, used))
        bar.update(len(res.docs))
        res.sigs = []  # free memory early
    bar.close()
    return Plan(per_source, decisions)


def _dedup_unit(unit: Unit, res: UnitResult, src: SourceConfig, st: SourceStats, deduper: Deduper,
                used: dict[int, int]) -> list[Decision]:
    dec: list[Decision] = []
    k = 0  # survivor position in the unit's temporary file
    for meta in res.docs:
        if src.max_bytes and used.get(unit.source, 0) >= src.max_bytes:
            if meta.reason is None:
                dec.append(("capped", None))
                k += 1
            continue
        used[unit.source] = used.get(unit.source, 0) + meta.nbytes_in
        st.add_in(meta.nbytes_in)
        st.clean.update(meta.cleaned)
        if meta.rule_set:
            st.rule_sets[meta.rule_set] += 1
        if meta.reason is not None:
            st.remove(meta.reason, meta.nbytes_in, meta.id, meta.measure)
            continue
        reason, dup_of = deduper.check((unit.index, k), meta.exact, res.sigs[k])
        if reason is not None:
            st.remove(reason, meta.nbytes_in, meta.id)
            dec.append((reason, dup_of))
        else:
            dec.append((KEPT, None))
        k += 1
    return dec


def _split(units: list[Unit], results: list[UnitResult], plan: Plan, data: DataConfig) -> None:
    """Replace each KEPT decision by its split (`data.split`): TAIL for a long document; train or val for
    the others, so that each source's val holds its share of their bytes."""
    decisions = plan.decisions
    kept: list[tuple[float, int, int]] = []  # (hash fraction, unit, survivor) to guarantee a non-empty val
    short: dict[str, list[tuple[float, int]]] = {}  # source -> (hash fraction, bytes) of its short documents
    where: dict[str, list[tuple[int, int]]] = {}  # source -> (unit, survivor) of the same documents
    for unit, res, dec in zip(units, results, decisions):
        survivors = [m for m in res.docs if m.reason is None]
        for k, (what, _) in enumerate(dec):
            if what != KEPT:
                continue
            u = hash_fraction(survivors[k].exact, data.seed)
            kept.append((u, unit.index, k))
            if survivors[k].nbytes >= TAIL_MIN_BYTES:
                dec[k] = (TAIL, None)
                continue
            dec[k] = ("train", None)
            short.setdefault(unit.name, []).append((u, survivors[k].nbytes))
            where.setdefault(unit.name, []).append((unit.index, k))
    for name, docs in short.items():
        for i in choose_val(docs, data.val_fraction):
            ui, k = where[name][i]
            decisions[ui][k] = ("val", None)
    if not any(what in ("val", TAIL) for dec in decisions for what, _ in dec) and len(kept) >= 2:
        _, ui, k = min(kept)  # tiny corpus: the lowest hash goes to val
        decisions[ui][k] = ("val", None)
    plan.kept = len(kept)
    if kept and not any(what in ("train", TAIL) for dec in decisions for what, _ in dec):
        raise UserError(f"data.val_fraction={data.val_fraction:g} leaves no document for training (all "
                        f"{len(kept):,} kept documents went to val): lower it (the default is 0.02) or add text")


def _require_documents(plan: Plan, data: DataConfig) -> None:
    if sum(s.docs_in for s in plan.per_source.values()) == 0:
        raise UserError("the corpus is empty: no document found in data.sources "
                        f"({', '.join(s.path for s in data.sources)}): point them at text files")
    if plan.kept == 0:
        removed: Counter[str] = Counter()
        for s in plan.per_source.values():
            removed.update(s.removed)
        reason, n = removed.most_common(1)[0] if removed else ("", 0)
        if reason == "read.missing_text_field":
            fix = "set the source's text_field to the field that holds the text (data.sources[].text_field)"
        elif reason.startswith("read."):
            fix = "check the inputs"
        else:
            fix = ("check the inputs, or loosen data.filters (e.g. data.filters.enabled=false or "
                   "data.filters.min_words=1)")
        most = f" ({reason}: {n:,} of {sum(removed.values()):,} removed)" if reason else ""
        raise UserError(f"no document survived cleaning, filtering and dedup{most}: {fix}")


# ------------------------------------------------------------------------------------------ pass 3: write


def _write(units: list[Unit], results: list[UnitResult], plan: Plan, data: DataConfig, tmp: Path, out_dir: Path
           ) -> dict[str, list[str]]:
    """Write the splits (and the rejects) from the temporary files; returns the shard names per split."""
    writers = {s: RecordShardWriter(out_dir / s, s, data.shard_docs) for s in SPLITS}
    val = InterleavedVal(tmp)
    rejects = RejectWriter(out_dir / "rejects") if data.keep_rejects else None
    id_of: dict[tuple[int, int], str] = {}  # survivor key -> id, to name what a rejected duplicate copies
    bar = tqdm(total=plan.kept, desc="prepare: write", unit="doc", file=sys.stderr, dynamic_ncols=True)
    for unit, dec in zip(units, plan.decisions):
        st = plan.per_source[unit.name]
        if rejects is not None:
            for rec, _ in _temp_records(unit_file(tmp, unit.index, "reject")):
                rejects.write(rec)
        metas = [m for m in results[unit.index].docs if m.reason is None]
        for k, (rec, _) in enumerate(_temp_records(unit_file(tmp, unit.index, "keep"))):
            what, dup_of = dec[k]
            if rejects is not None:
                id_of[(unit.index, k)] = rec["id"]
            if what in (*SPLITS, TAIL):
                _write_kept(what, rec["id"], rec["text"], metas[k], unit.name, st, writers["train"], val,
                            data.val_fraction)
                bar.update(1)
            elif rejects is not None and what != "capped":
                original = id_of.get(dup_of, str(dup_of))
                kind = "an exact" if what == "dedup.exact" else "a near"
                rejects.write({"id": rec["id"], "source": unit.name, "reason": what,
                               "why": f"{kind} duplicate of {original}, which is kept", "duplicate_of": original,
                               "text": rec["text"]})
        unit_file(tmp, unit.index, "keep").unlink(missing_ok=True)
    bar.close()
    val.finish(writers["val"])
    for w in [*writers.values(), *([rejects] if rejects else [])]:
        w.close()
    return {s: writers[s].shards for s in SPLITS}


def _write_kept(what: str, doc_id: str, text: str, meta: DocMeta, source: str, st: SourceStats,
                train: RecordShardWriter, val: InterleavedVal, val_fraction: float) -> None:
    """One kept document to its split, or (TAIL) its head to train and its tail to val."""
    if what == TAIL:
        head, tail = cut_tail(text, val_fraction)
        st.keep_cut((len(head.encode("utf-8")), len(head)), (len(tail.encode("utf-8")), len(tail)))
        train.write({"id": doc_id, "source": source, "text": head})
        val.write(source, {"id": doc_id + TAIL_SUFFIX, "source": source, "text": tail})
        return
    st.keep(meta.nbytes, meta.nchars, what)
    rec = {"id": doc_id, "source": source, "text": text}
    if what == "train":
        train.write(rec)
    else:
        val.write(source, rec)


def _temp_records(path: Path) -> Iterator[tuple[dict[str, Any], int]]:
    return iter_records(path) if path.exists() else iter(())


# ------------------------------------------------------------------------------------------ summary


def _statistics(per_source: dict[str, SourceStats], results: list[UnitResult], outputs: dict[str, list[str]],
                log_lines: list[str], data: DataConfig, timing: dict[str, Any]) -> dict[str, Any]:
    """The content of dataset_statistics.json (checked: every document in is kept or removed once)."""
    total = SourceStats()
    for s in per_source.values():
        total.merge(s)
    step_s: dict[str, float] = {}
    for r in results:
        for k, v in r.seconds.items():
            step_s[k] = step_s.get(k, 0.0) + v
    wall, mb_in = timing["wall_s"], total.bytes_in / 1e6
    tot = total.to_dict(data.filters)
    stats: dict[str, Any] = {
        # top-level scalars: the summary a stage manifest keeps
        "docs_in": tot["docs_in"], "bytes_in": tot["bytes_in"], "kept_docs": tot["kept_docs"],
        "kept_bytes": tot["kept_bytes"], "removed_docs": tot["removed_docs"],
        "train_docs": tot["splits"]["train"]["docs"], "val_docs": tot["splits"]["val"]["docs"],
        "provenance": provenance(),
        "total": tot,
        "sources": {name: s.to_dict(data.filters) for name, s in sorted(per_source.items())},
        "outputs": outputs,
        "rejects_log": "rejects.log" if log_lines else None,
        "rejects_dir": "rejects" if data.keep_rejects else None,
        "timing": {
            "wall_s": round(wall, 2), "workers": timing["workers"],
            **{k: round(timing[k], 2) for k in ("workers_pass_s", "dedup_split_s", "write_s")},
            "mb_per_s": round(mb_in / wall, 3) if wall else 0.0,
            "worker_cpu_s": {k: round(v, 2) for k, v in step_s.items()},
            "mb_per_s_per_core": {k: round(mb_in / v, 2) for k, v in step_s.items() if v > 0},
        },
        "memory": {
            "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
            if timing["workers"] > 1 else None,
        },
        "config": dataclasses.asdict(data),
    }
    check_invariant(stats)
    return stats


def _print_summary(stats: dict[str, Any], out_dir: Path, problems: int) -> None:
    from rich.console import Console  # here: spawned workers import this module and never print

    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(summary_table(stats))
    for line in removal_report(stats):
        console.print(line, markup=False, highlight=False)
    tot, timing = stats["total"], stats["timing"]
    console.print(f"kept {tot['kept_docs']:,} of {tot['docs_in']:,} documents ({tot['kept_pct_bytes']:.1f}% of "
                  f"{tot['bytes_in'] / 1e6:.1f} MB): train {tot['splits']['train']['docs']:,}, val "
                  f"{tot['splits']['val']['docs']:,} -> {out_dir} in {timing['wall_s']:.1f}s "
                  f"({timing['workers']} workers)")
    if problems:
        console.print(f"{problems} input problems logged in {out_dir / 'rejects.log'}")


# ------------------------------------------------------------------------------------------ the stage


def resolve_workers(workers: int, n_units: int) -> int:
    n = workers if workers > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                     else os.cpu_count() or 1)
    return max(1, min(n, n_units))


def _clear_outputs(out_dir: Path) -> None:
    for sub in (*SPLITS, "rejects"):
        d = out_dir / sub
        if d.is_dir():
            for f in [*d.glob(SHARD_GLOB), *(d.glob("*.jsonl") if sub == "rejects" else [])]:
                f.unlink()
    for name in ("dataset_statistics.json", "rejects.log"):
        (out_dir / name).unlink(missing_ok=True)


def output_lock(out_dir: Path) -> AbstractContextManager[None]:
    """Hold the output folder `out_dir`: a second prepare writing into it at the same time would delete the
    first one's temporary files and shards (`files.folder_lock`: beside the folder, once per process)."""
    return folder_lock(out_dir, f"--out {out_dir}", fix="another `antimatter prepare` is writing it; wait for "
                                                        "that to end, or give another --out folder")


def run_prepare(cfg: RunConfig, out_dir: Path, shown_as: Path | None = None) -> dict:
    """Prepare the corpus of `cfg.data` into `out_dir`; returns (and writes) the statistics. Earlier output
    there is cleared only once some document survived. `shown_as`: the folder named in the summary, where
    `out_dir` is a scratch folder that takes its place afterwards (the caller's, under the run's lock);
    without it `out_dir` is written in place, held by `output_lock`."""
    out_dir = Path(out_dir)
    if shown_as is not None:
        return _prepare(cfg, out_dir, shown_as)
    with output_lock(out_dir):
        return _prepare(cfg, out_dir, out_dir)


def _prepare(cfg: RunConfig, out_dir: Path, shown_as: Path) -> dict:
    t_start = time.perf_counter()
    data = cfg.data
    units = expand_sources(data.sources, data.default_corpus_bytes)
    workers = resolve_workers(data.workers, len(units))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    timing: dict[str, Any] = {"workers": workers}
    try:
        t = time.perf_counter()
        results = _run_workers(units, data, tmp, workers)
        timing["workers_pass_s"] = time.perf_counter() - t
        t = time.perf_counter()
        log_lines = _problem_lines(units, results)
        plan = _dedup(units, results, data)
        _split(units, results, plan, data)
        timing["dedup_split_s"] = time.perf_counter() - t
        _require_documents(plan, data)
        _clear_outputs(out_dir)
        t = time.perf_counter()
        outputs = _write(units, results, plan, data, tmp, out_dir)
        timing["write_s"] = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log_lines:
        (out_dir / "rejects.log").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    timing["wall_s"] = time.perf_counter() - t_start
    stats = _statistics(plan.per_source, results, outputs, log_lines, data, timing)
    (out_dir / "dataset_statistics.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    _print_summary(stats, shown_as, len(log_lines))
    return stats
