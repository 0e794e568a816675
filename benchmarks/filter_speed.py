"""The quality rules' CPU cost per document, side by side with the rules of another commit, in one process.

    python benchmarks/filter_speed.py /work/shared/corpus/python-doc-00000.jsonl.zst ... docs/*.md \
        --against 1e14f6e [--max-mb 3] [--rounds 3] [--json results.json]

Each input is a .jsonl(.zst) file (the first --max-mb MB of its `text` fields) or a text/markdown file. Every
document is judged once per round by the current rules and by those of `--against` (its data/filters.py,
loaded from git beside this one; the config is this commit's), rounds alternating, so both see the same load
on a shared CPU. The kind of each document is guessed once, by the current rules. Prints MB/s per core
(process time) for each.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from antimatter.config import FilterConfig
from antimatter.data import filters
from antimatter.data.sources import kind_from_name
from antimatter.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def read_docs(paths: list[str], max_mb: float) -> list[tuple[str, str]]:
    """(text, kind) of the documents of every input."""
    docs = []
    for path in map(Path, paths):
        if ".jsonl" in path.name:
            raw = open(path, "rb")  # noqa: SIM115 - read to the end or the byte budget below
            lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw) if path.suffix == ".zst"
                                     else raw, encoding="utf-8")
            used = 0
            for line in lines:
                text = json.loads(line)["text"]
                docs.append((text, filters.guess_kind(text, kind_from_name(path.name))))
                used += len(text.encode())
                if used > max_mb * 1e6:
                    break
            raw.close()
        else:
            text = path.read_text(encoding="utf-8")
            docs.append((text, filters.guess_kind(text, kind_from_name(path.name))))
    return docs


def rules_of(commit: str):
    """data/filters.py as it was at `commit`, as a module of its own."""
    source = subprocess.run(["git", "show", f"{commit}:src/antimatter/data/filters.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "filters_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("filters_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--against", required=True, help="the commit whose rules are timed beside the current ones")
    ap.add_argument("--max-mb", type=float, default=3.0, help="text read from each JSON Lines input")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    docs = read_docs(args.inputs, args.max_mb)
    mb = sum(len(t.encode()) for t, _ in docs) / 1e6
    variants = {"current": filters.QualityFilter(FilterConfig()),
                args.against: rules_of(args.against).QualityFilter(FilterConfig())}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, qf in variants.items():
            t0 = time.process_time()
            for text, kind in docs:
                qf.check(text, kind)
            seconds[name].append(time.process_time() - t0)
    result = {"documents": len(docs), "mb": round(mb, 2),
              "mb_per_s_per_core": {name: round(mb / min(s), 2) for name, s in seconds.items()},
              "provenance": provenance()}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
