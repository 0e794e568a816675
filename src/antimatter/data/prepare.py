"""`antimatter prepare`: collect -> clean -> filter -> dedup -> split, writing the run's data folder.

Three passes, memory bounded by the per-document metadata (no text is held):
1. workers (one unit = one input file or default-corpus slice each) read, clean, judge and sign documents;
   survivors go to a temporary zstd file per unit, and each worker returns only per-document metadata
   (size, removal reason, exact key, MinHash signature);
2. the main process walks that metadata in the canonical order (source, file, position): source byte
   caps, exact and near dedup (across sources, before the split), the train/val split by document hash,
   and the statistics;
3. the main process streams the temporary files again and writes `train/` and `val/` shards.
The output depends only on the input and the config, never on the number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import queue as queue_mod
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zstandard
from tqdm import tqdm

from antimatter.config import DataConfig, RunConfig
from antimatter.data import SPLITS
from antimatter.data.clean import clean_text, decode
from antimatter.data.dedup import Deduper, Signer, exact_key
from antimatter.data.filters import QualityFilter, guess_kind
from antimatter.data.sources import BadInput, ReadProgress, Unit, expand_sources, read_unit
from antimatter.data.stats import SourceStats, check_invariant, summary_table
from antimatter.errors import UserError

TMP_DIR = ".prepare-tmp"
MAX_LOG_LINES_PER_UNIT = 1000


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


def _init_worker(data: DataConfig, tmp: str, progress_queue) -> None:
    _STATE.update(data=data, tmp=Path(tmp), queue=progress_queue, filter=QualityFilter(data.filters),
                  signer=Signer(data.dedup) if data.dedup.near else None)


def _report(disk: int, docs: int, text: int) -> None:
    q = _STATE["queue"]
    if callable(q):
        q(disk, docs, text)
    elif q is not None:
        q.put((disk, docs, text))


def unit_file(tmp: Path, index: int, kind: str) -> Path:
    return tmp / f"unit_{index:06d}.{kind}.jsonl.zst"


def process_unit(unit: Unit) -> UnitResult:
    """Read, clean, filter and sign one unit; survivors (and rejects if asked) go to temporary files."""
    data: DataConfig = _STATE["data"]
    qf: QualityFilter = _STATE["filter"]
    signer: Signer | None = _STATE["signer"]
    src = data.sources[unit.source]
    res = UnitResult(unit.index)
    secs = dict.fromkeys(("read", "clean", "filter", "dedup_sign", "write"), 0.0)
    # one compressor per stream: a zstd context must not serve two open streams
    keep_f = zstandard.ZstdCompressor(level=1).stream_writer(open(unit_file(_STATE["tmp"], unit.index, "keep"), "wb"))
    rej_f = (zstandard.ZstdCompressor(level=1).stream_writer(open(unit_file(_STATE["tmp"], unit.index, "reject"), "wb"))
             if data.keep_rejects else None)
    progress = ReadProgress()
    last_pos = pending_docs = pending_text = 0
    last_report = time.perf_counter()
    used_bytes = 0
    reader = read_unit(unit, src, strict=data.strict, max_doc_bytes=data.filters.max_doc_bytes, progress=progress)
    try:
        while True:
            t = time.perf_counter()
            item = next(reader, None)
            secs["read"] += time.perf_counter() - t
            if item is None:
                break
            if isinstance(item, BadInput):
                res.docs.append(DocMeta(item.where, item.nbytes, item.reason))
                if len(res.log) < MAX_LOG_LINES_PER_UNIT:
                    res.log.append(f"{item.where}: {item.reason}: {item.message}")
                else:
                    res.log_dropped += 1
                used_bytes += item.nbytes
                continue
            t = time.perf_counter()
            text, invalid = decode(item.data)
            invalid = invalid or item.replaced
            nbytes_in = len(item.data) if isinstance(item.data, bytes) else len(text.encode("utf-8", "replace"))
            used_bytes += nbytes_in
            kind = guess_kind(text, item.kind)
            rule_set = kind if src.rules == "auto" else src.rules
            text, changed = clean_text(text, src, kind)
            if invalid:
                changed = ["invalid_utf8", *changed]
                if len(res.log) < MAX_LOG_LINES_PER_UNIT:
                    res.log.append(f"{item.where}: clean.invalid_utf8: invalid UTF-8 bytes replaced by U+FFFD")
            t2 = time.perf_counter()
            secs["clean"] += t2 - t
            reason = "clean.empty" if not text.strip() else None
            if reason is None:
                rule = qf.check(text, rule_set)
                reason = f"filter.{rule}" if rule else None
            t3 = time.perf_counter()
            secs["filter"] += t3 - t2
            meta = DocMeta(item.id, nbytes_in, reason, rule_set, tuple(changed))
            if reason is None:
                meta.exact = exact_key(text)
                res.sigs.append(signer.signature(text) if signer is not None else None)
                t4 = time.perf_counter()
                secs["dedup_sign"] += t4 - t3
                meta.nbytes = len(text.encode("utf-8", "replace"))
                meta.nchars = len(text)
                keep_f.write(json.dumps({"id": item.id, "text": text}, ensure_ascii=False).encode() + b"\n")
                secs["write"] += time.perf_counter() - t4
            elif rej_f is not None:
                rej_f.write(json.dumps({"id": item.id, "source": unit.name, "reason": reason, "text": text},
                                       ensure_ascii=False).encode() + b"\n")
            res.docs.append(meta)
            pending_docs += 1
            pending_text += nbytes_in
            now = time.perf_counter()
            if now - last_report > 0.5:
                pos = progress.position()
                _report(pos - last_pos, pending_docs, pending_text)
                last_pos, pending_docs, pending_text, last_report = pos, 0, 0, now
            if src.max_bytes and used_bytes >= src.max_bytes:
                break  # the source's byte cap: the main process cuts at the exact document
    finally:
        keep_f.close()
        if rej_f is not None:
            rej_f.close()
        if hasattr(reader, "close"):
            reader.close()
    _report(max(0, unit.nbytes - last_pos), pending_docs, pending_text)
    res.seconds = secs
    return res


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
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        results: dict[int, Any] = {}
        with ctx.Pool(workers, initializer=_init_worker, initargs=(data, str(tmp), q)) as pool:
            # largest first keeps both cores busy to the end; results are collected in unit order anyway
            for u in sorted(units, key=lambda u: (-u.nbytes, u.index)):
                results[u.index] = pool.apply_async(process_unit, (u,))
            while True:
                try:
                    while True:
                        update(*q.get(timeout=0.2))
                except queue_mod.Empty:
                    pass
                done = [r for r in results.values() if r.ready()]
                for r in done:
                    if not r.successful():
                        r.get()  # re-raises the worker's error (e.g. a UserError under --strict)
                if len(done) == len(results):
                    break
            out = [results[u.index].get() for u in units]
            pool.close()
            pool.join()
        while True:
            try:
                update(*q.get_nowait())
            except queue_mod.Empty:
                break
        return out
    finally:
        bar.close()


# ------------------------------------------------------------------------------- pass 2 and 3: main process


def _split_of(exact: bytes, seed: int, val_fraction: float) -> tuple[str, float]:
    u = xxhash.xxh64_intdigest(exact, seed=seed) / 2**64
    return ("val" if u < val_fraction else "train"), u


class ShardWriter:
    """Rolling `SPLIT/SPLIT_00000.jsonl.zst` shards of at most `shard_docs` records."""

    def __init__(self, folder: Path, prefix: str, shard_docs: int):
        self.folder, self.prefix, self.shard_docs = folder, prefix, max(1, shard_docs)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.f = None
        self.n = 0
        self.shards: list[str] = []

    def write(self, rec: dict[str, Any]) -> None:
        if self.f is None or self.n >= self.shard_docs:
            self.close()
            path = self.folder / f"{self.prefix}_{len(self.shards):05d}.jsonl.zst"
            self.shards.append(path.name)
            self.f = zstandard.ZstdCompressor(level=3).stream_writer(open(path, "wb"))
            self.n = 0
        self.f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        self.n += 1

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _iter_jsonl_zst(path: Path):
    if not path.exists():
        return
    with open(path, "rb") as raw:
        import io

        for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)):
            yield json.loads(line)


def resolve_workers(workers: int, n_units: int) -> int:
    n = workers if workers > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                     else os.cpu_count() or 1)
    return max(1, min(n, n_units))


def _clear_outputs(out_dir: Path) -> None:
    for sub in (*SPLITS, "rejects"):
        d = out_dir / sub
        if d.is_dir():
            for f in d.glob("*.jsonl.zst"):
                f.unlink()
    for name in ("dataset_statistics.json", "rejects.log"):
        (out_dir / name).unlink(missing_ok=True)


def run_prepare(cfg: RunConfig, out_dir: Path) -> dict:
    """Prepare the corpus of `cfg.data` into `out_dir`; returns (and writes) the statistics."""
    from rich.console import Console

    from antimatter.provenance import provenance

    t_start = time.perf_counter()
    data = cfg.data
    out_dir = Path(out_dir)
    units = expand_sources(data.sources, data.default_corpus_bytes)
    workers = resolve_workers(data.workers, len(units))
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)
    tmp = out_dir / TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t = time.perf_counter()
        results = _run_workers(units, data, tmp, workers)
        t_workers = time.perf_counter() - t

        # pass 2: caps, dedup, split, statistics -- in canonical order
        t = time.perf_counter()
        deduper = Deduper(data.dedup)
        per_source: dict[str, SourceStats] = {}
        used: dict[int, int] = {}
        decisions: list[list[tuple[str, Any]]] = []  # per unit, per survivor: ("train"|"val"|reason, dup_of)
        log_lines: list[str] = []
        kept_splits: list[tuple[float, int, int]] = []  # (u, unit, survivor) to guarantee a non-empty val
        n_docs = sum(len(r.docs) for r in results)
        bar = tqdm(total=n_docs, desc="prepare: dedup+split", unit="doc", file=sys.stderr, dynamic_ncols=True)
        for unit, res in zip(units, results):
            src = data.sources[unit.source]
            st = per_source.setdefault(unit.name, SourceStats())
            log_lines.extend(res.log)
            if res.log_dropped:
                log_lines.append(f"{unit.path}: ... and {res.log_dropped} more problems not listed")
            dec: list[tuple[str, Any]] = []
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
                    st.remove(meta.reason, meta.nbytes_in)
                    continue
                reason, dup_of = deduper.check((unit.index, k), meta.exact, res.sigs[k])
                if reason is not None:
                    st.remove(reason, meta.nbytes_in)
                    dec.append((reason, dup_of))
                else:
                    split, u = _split_of(meta.exact, data.seed, data.val_fraction)
                    kept_splits.append((u, unit.index, k))
                    dec.append((split, None))
                k += 1
            bar.update(len(res.docs))
            decisions.append(dec)
            res.sigs = []  # free memory early
        bar.close()
        n_val = sum(1 for d in decisions for s, _ in d if s == "val")
        if n_val == 0 and len(kept_splits) >= 2:  # tiny corpus: the lowest hash goes to val
            _, ui, k = min(kept_splits)
            decisions[ui][k] = ("val", None)
        kept_total = len(kept_splits)
        t_dedup = time.perf_counter() - t
        if sum(s.docs_in for s in per_source.values()) == 0:
            raise UserError("the corpus is empty: no document found in data.sources "
                            f"({', '.join(s.path for s in data.sources)}): point them at text files")
        if kept_total == 0:
            raise UserError("no document survived cleaning, filtering and dedup: check the inputs, or loosen "
                            "data.filters (e.g. data.filters.enabled=false or data.filters.min_words=1)")

        # pass 3: write the splits (and rejects)
        t = time.perf_counter()
        writers = {s: ShardWriter(out_dir / s, s, data.shard_docs) for s in SPLITS}
        rejects = ShardWriter(out_dir / "rejects", "rejects", data.shard_docs) if data.keep_rejects else None
        id_of: dict[tuple[int, int], str] = {}
        need_ids = rejects is not None
        bar = tqdm(total=kept_total, desc="prepare: write", unit="doc", file=sys.stderr, dynamic_ncols=True)
        for unit, dec in zip(units, decisions):
            st = per_source[unit.name]
            if rejects is not None:
                for rec in _iter_jsonl_zst(unit_file(tmp, unit.index, "reject")):
                    rejects.write(rec)
            metas = [m for m in results[unit.index].docs if m.reason is None]
            for k, rec in enumerate(_iter_jsonl_zst(unit_file(tmp, unit.index, "keep"))):
                what, dup_of = dec[k]
                if need_ids:
                    id_of[(unit.index, k)] = rec["id"]
                if what in SPLITS:
                    st.keep(metas[k].nbytes, metas[k].nchars, what)
                    writers[what].write({"id": rec["id"], "source": unit.name, "text": rec["text"]})
                    bar.update(1)
                elif rejects is not None and what != "capped":
                    rejects.write({"id": rec["id"], "source": unit.name, "reason": what,
                                   "duplicate_of": id_of.get(dup_of, str(dup_of)), "text": rec["text"]})
            unit_file(tmp, unit.index, "keep").unlink(missing_ok=True)
        bar.close()
        for w in [*writers.values(), *([rejects] if rejects else [])]:
            w.close()
        t_write = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if log_lines:
        (out_dir / "rejects.log").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    total = SourceStats()
    for s in per_source.values():
        total.merge(s)
    wall = time.perf_counter() - t_start
    step_s: dict[str, float] = {}
    for r in results:
        for k2, v in r.seconds.items():
            step_s[k2] = step_s.get(k2, 0.0) + v
    mb_in = total.bytes_in / 1e6
    tot = total.to_dict()
    stats: dict[str, Any] = {
        # top-level scalars: the summary a stage manifest keeps
        "docs_in": tot["docs_in"], "bytes_in": tot["bytes_in"], "kept_docs": tot["kept_docs"],
        "kept_bytes": tot["kept_bytes"], "removed_docs": tot["removed_docs"],
        "train_docs": tot["splits"]["train"]["docs"], "val_docs": tot["splits"]["val"]["docs"],
        "provenance": provenance(),
        "total": tot,
        "sources": {name: s.to_dict() for name, s in sorted(per_source.items())},
        "outputs": {s: writers[s].shards for s in SPLITS},
        "rejects_log": "rejects.log" if log_lines else None,
        "rejects_dir": "rejects" if data.keep_rejects else None,
        "timing": {
            "wall_s": round(wall, 2), "workers": workers, "workers_pass_s": round(t_workers, 2),
            "dedup_split_s": round(t_dedup, 2), "write_s": round(t_write, 2),
            "mb_per_s": round(mb_in / wall, 3) if wall else 0.0,
            "worker_cpu_s": {k2: round(v, 2) for k2, v in step_s.items()},
            "mb_per_s_per_core": {k2: round(mb_in / v, 2) for k2, v in step_s.items() if v > 0},
        },
        "memory": {
            "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
            if workers > 1 else None,
        },
        "config": dataclasses.asdict(data),
    }
    check_invariant(stats)
    (out_dir / "dataset_statistics.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(summary_table(stats))
    tot = stats["total"]
    console.print(f"kept {tot['kept_docs']:,} of {tot['docs_in']:,} documents ({tot['kept_pct_bytes']:.1f}% of "
                  f"{tot['bytes_in'] / 1e6:.1f} MB): train {tot['splits']['train']['docs']:,}, val "
                  f"{tot['splits']['val']['docs']:,} -> {out_dir} in {wall:.1f}s ({workers} workers)")
    if log_lines:
        console.print(f"{len(log_lines)} input problems logged in {out_dir / 'rejects.log'}")
    return stats
