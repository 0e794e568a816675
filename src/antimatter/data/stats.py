"""Statistics of a prepare run: per source and total, every document accounted for.

Invariant (tested): docs_in == kept_docs + sum(removed[reason].docs) for every source and the total.
`splits` count records: a long document kept as a train head and a val tail (`tail_docs`) is one kept
document and one record in each split.
Removal reasons carry their stage as a prefix: read.* (could not be read), clean.empty, filter.<rule>,
dedup.exact, dedup.near.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from antimatter.config import FilterConfig
from antimatter.data import SPLITS
from antimatter.data.filters import keep_setting

LENGTH_EDGES = [0, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10**12]
LARGEST = 3  # removed documents named per source and reason, the largest first
DEDUP_KEEP = {"dedup.exact": "data.dedup.exact=false", "dedup.near": "data.dedup.near=false"}


class SourceStats:
    def __init__(self) -> None:
        self.docs_in = 0
        self.bytes_in = 0
        self.removed: Counter[str] = Counter()
        self.removed_bytes: Counter[str] = Counter()
        self.kept_docs = 0
        self.kept_bytes = 0
        self.kept_chars = 0
        self.tail_docs = 0  # long documents kept as a train head and a val tail (data/split.py)
        self.lengths: list[int] = []
        self.splits = {s: Counter() for s in SPLITS}
        self.rule_sets: Counter[str] = Counter()
        self.clean: Counter[str] = Counter()
        # per reason, the largest removed documents: (bytes, id, what the rule measured)
        self.largest: dict[str, list[tuple[int, str, Any]]] = defaultdict(list)

    def add_in(self, nbytes: int) -> None:
        self.docs_in += 1
        self.bytes_in += nbytes

    def remove(self, reason: str, nbytes: int, doc_id: str = "", measure: Any = None) -> None:
        self.removed[reason] += 1
        self.removed_bytes[reason] += nbytes
        top = self.largest[reason]
        if len(top) < LARGEST or nbytes > top[-1][0]:
            top.append((nbytes, doc_id, measure))
            top.sort(key=lambda t: (-t[0], t[1]))
            del top[LARGEST:]

    def keep(self, nbytes: int, nchars: int, split: str) -> None:
        self.kept_docs += 1
        self.kept_bytes += nbytes
        self.kept_chars += nchars
        self.lengths.append(nchars)
        self.splits[split]["docs"] += 1
        self.splits[split]["bytes"] += nbytes
        self.splits[split]["chars"] += nchars

    def keep_cut(self, head: tuple[int, int], tail: tuple[int, int]) -> None:
        """One document kept as two records, (bytes, chars) of its head in train and of its tail in val."""
        self.kept_docs += 1
        self.tail_docs += 1
        self.kept_bytes += head[0] + tail[0]
        self.kept_chars += head[1] + tail[1]
        self.lengths.append(head[1] + tail[1])
        for split, (nbytes, nchars) in (("train", head), ("val", tail)):
            self.splits[split]["docs"] += 1
            self.splits[split]["bytes"] += nbytes
            self.splits[split]["chars"] += nchars

    def merge(self, other: SourceStats) -> None:
        self.docs_in += other.docs_in
        self.bytes_in += other.bytes_in
        self.removed.update(other.removed)
        self.removed_bytes.update(other.removed_bytes)
        self.kept_docs += other.kept_docs
        self.kept_bytes += other.kept_bytes
        self.kept_chars += other.kept_chars
        self.tail_docs += other.tail_docs
        self.lengths.extend(other.lengths)
        for s in SPLITS:
            self.splits[s].update(other.splits[s])
        self.rule_sets.update(other.rule_sets)
        self.clean.update(other.clean)
        for reason, top in other.largest.items():
            mine = self.largest[reason]
            mine.extend(top)
            mine.sort(key=lambda t: (-t[0], t[1]))
            del mine[LARGEST:]

    def to_dict(self, filters: FilterConfig | None = None) -> dict[str, Any]:
        """The statistics as plain data; with `filters` (the settings the documents were judged by), each
        removal reason also names its largest documents and the setting that would have kept them."""
        def pct(a: int, b: int) -> float:
            return round(100.0 * a / b, 3) if b else 0.0

        removed = {r: {"docs": self.removed[r], "bytes": self.removed_bytes[r],
                       "pct_docs": pct(self.removed[r], self.docs_in),
                       "pct_bytes": pct(self.removed_bytes[r], self.bytes_in),
                       **self._largest(r, filters)}
                   for r in sorted(self.removed)}
        by_stage: dict[str, dict[str, float]] = defaultdict(lambda: {"docs": 0, "bytes": 0})
        for r in self.removed:
            stage = r.split(".")[0] if not r.startswith("dedup.") else r
            by_stage[stage]["docs"] += self.removed[r]
            by_stage[stage]["bytes"] += self.removed_bytes[r]
        for v in by_stage.values():
            v["pct_docs"] = pct(int(v["docs"]), self.docs_in)
            v["pct_bytes"] = pct(int(v["bytes"]), self.bytes_in)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        dist: dict[str, Any] = {"unit": "characters"}
        if len(lengths):
            q = np.percentile(lengths, [10, 50, 90, 99])
            dist.update(min=int(lengths.min()), p10=int(q[0]), p50=int(q[1]), p90=int(q[2]), p99=int(q[3]),
                        max=int(lengths.max()), mean=round(float(lengths.mean()), 1))
        counts, _ = np.histogram(lengths, bins=LENGTH_EDGES) if len(lengths) else ([0] * 11, None)
        dist["histogram"] = {"edges": LENGTH_EDGES, "counts": [int(c) for c in counts]}
        return {
            "docs_in": self.docs_in, "bytes_in": self.bytes_in,
            "removed": removed, "removed_by_stage": dict(sorted(by_stage.items())),
            "removed_docs": sum(self.removed.values()), "removed_bytes": sum(self.removed_bytes.values()),
            "kept_docs": self.kept_docs, "kept_bytes": self.kept_bytes, "kept_chars": self.kept_chars,
            "kept_pct_docs": pct(self.kept_docs, self.docs_in), "kept_pct_bytes": pct(self.kept_bytes, self.bytes_in),
            "splits": {s: {k: int(self.splits[s][k]) for k in ("docs", "bytes", "chars")} for s in SPLITS},
            "tail_docs": self.tail_docs,
            "rule_sets": dict(sorted(self.rule_sets.items())), "cleaned": dict(sorted(self.clean.items())),
            "length": dist,
        }


    def _largest(self, reason: str, filters: FilterConfig | None) -> dict[str, Any]:
        """The largest documents a reason removed and the setting under which it would have kept them (None
        where no setting keeps them: an empty or unreadable document)."""
        top = self.largest.get(reason, [])
        out: dict[str, Any] = {"largest": [{"id": doc_id, "bytes": n} for n, doc_id, _ in top]}
        if reason.startswith("filter.") and filters is not None:
            out["keep"] = keep_setting(reason.removeprefix("filter."), [m for _, _, m in top], filters)
        else:
            out["keep"] = DEDUP_KEEP.get(reason)
        return out


def check_invariant(stats: dict[str, Any]) -> None:
    """docs in = kept + every removal, for each source and the total (raises AssertionError if broken)."""
    for name, s in [("total", stats["total"]), *stats["sources"].items()]:
        removed = sum(v["docs"] for v in s["removed"].values())
        assert s["docs_in"] == s["kept_docs"] + removed, f"{name}: {s['docs_in']} != {s['kept_docs']} + {removed}"


def summary_table(stats: dict[str, Any]):
    """A rich Table: per source, documents and bytes in, removal % by stage, kept."""
    from rich.table import Table

    t = Table(title="antimatter prepare: documents by source", title_justify="left")
    for col in ("source", "docs in", "MB in", "bad/empty %", "filter %", "exact %", "near %", "kept docs",
                "kept MB", "kept % bytes", "top filter rule"):
        t.add_column(col, justify="left" if col in ("source", "top filter rule") else "right")
    rows = [*sorted(stats["sources"].items()), ("TOTAL", stats["total"])]
    for name, s in rows:
        st = s["removed_by_stage"]
        filt = {r: v for r, v in s["removed"].items() if r.startswith("filter.")}
        top = max(filt.items(), key=lambda kv: kv[1]["docs"], default=None)
        t.add_row(
            name, f"{s['docs_in']:,}", f"{s['bytes_in'] / 1e6:.2f}",
            f"{st.get('read', {}).get('pct_docs', 0.0) + st.get('clean', {}).get('pct_docs', 0.0):.1f}",
            f"{st.get('filter', {}).get('pct_docs', 0.0):.1f}", f"{st.get('dedup.exact', {}).get('pct_docs', 0.0):.1f}",
            f"{st.get('dedup.near', {}).get('pct_docs', 0.0):.1f}", f"{s['kept_docs']:,}",
            f"{s['kept_bytes'] / 1e6:.2f}", f"{s['kept_pct_bytes']:.1f}",
            f"{top[0].removeprefix('filter.')} ({top[1]['docs']})" if top else "-",
            end_section=name == rows[-2][0])
    return t


def _size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB" if n >= 1e3 else f"{n:.0f} B"


def removal_report(stats: dict[str, Any], rules: int = 5) -> list[str]:
    """Lines saying, per source (most bytes removed first), the bytes each reason removed (most first), its
    largest documents and the one setting that would have kept them."""
    lines = ["removed, by source and reason (largest first), with the setting that would keep those documents:"]
    sources = sorted(stats["sources"].items(), key=lambda kv: (-kv[1]["removed_bytes"], kv[0]))
    for name, s in sources:
        if not s["removed_bytes"] and not s["removed_docs"]:
            continue
        lines.append(f"{name}: {_size(s['removed_bytes'])} of {_size(s['bytes_in'])} removed "
                     f"({100 * s['removed_bytes'] / max(1, s['bytes_in']):.1f}%)")
        reasons = sorted(s["removed"].items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))
        for reason, v in reasons[:rules]:
            keep = f"  keep: {v['keep']}" if v.get("keep") else ""
            docs = f"{v['docs']:>6,} doc" + ("s" if v["docs"] != 1 else " ")
            lines.append(f"  {reason.removeprefix('filter.'):<24} {_size(v['bytes']):>9} {docs}{keep}")
            if v.get("largest"):
                lines.append("      " + ", ".join(f"{d['id']} ({_size(d['bytes'])})" for d in v["largest"]))
        if len(reasons) > rules:
            rest = sum(v["bytes"] for _, v in reasons[rules:])
            lines.append(f"  ... {len(reasons) - rules} more reasons ({_size(rest)}): see dataset_statistics.json")
    return lines if len(lines) > 1 else []
