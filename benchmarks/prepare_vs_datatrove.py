"""Side by side: `antimatter prepare` vs datatrove on the same corpus, same cores, in one run.

datatrove runs in its own virtual environment (so the project's stays clean):
    python3 -m venv /work/dt-venv && /work/dt-venv/bin/pip install datatrove
    .venv/bin/python benchmarks/prepare_vs_datatrove.py --corpus '/work/shared/corpus/*.jsonl.zst' \
        --datatrove-python /work/dt-venv/bin/python --workers 2

datatrove pipeline (its defaults): JsonlReader -> GopherRepetitionFilter -> GopherQualityFilter -> writer,
then its 4-stage MinHash dedup (5-grams, 14 buckets x 8 hashes): signatures, buckets, clusters, filter.
Each side runs as a child process; wall time, and peak memory as the largest sum of RSS over the
child's process tree (sampled every 0.2 s with psutil), are measured from outside. Prints a JSON
result with provenance and the ratios; --json FILE also writes it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

DATATROVE_SCRIPT = r'''
import sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.filters import GopherRepetitionFilter, GopherQualityFilter
from datatrove.pipeline.dedup import MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.minhash import MinhashConfig


def main():

    corpus_dir, glob_pattern, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    n_files = int(sys.argv[5])
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    times = {}

    def run(name, pipeline, tasks):
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=f"{out}/logs/{name}").run()
        times[name] = round(time.perf_counter() - t, 2)

    run("filter", [JsonlReader(corpus_dir, glob_pattern=glob_pattern, compression="zstd"),
                   GopherRepetitionFilter(), GopherQualityFilter(),
                   JsonlWriter(f"{out}/filtered", compression=None)], n_files)
    run("signatures", [JsonlReader(f"{out}/filtered", compression=None),
                       MinhashDedupSignature(output_folder=f"{out}/sigs", config=cfg)], n_files)
    run("buckets", [MinhashDedupBuckets(input_folder=f"{out}/sigs", output_folder=f"{out}/buckets", config=cfg)],
        cfg.num_buckets)
    run("cluster", [MinhashDedupCluster(input_folder=f"{out}/buckets", output_folder=f"{out}/remove_ids", config=cfg)], 1)
    run("dedup_filter", [JsonlReader(f"{out}/filtered", compression=None),
                         MinhashDedupFilter(input_folder=f"{out}/remove_ids"),
                         JsonlWriter(f"{out}/deduped", compression=None)], n_files)
    import json
    print("DATATROVE_TIMES " + json.dumps(times))


if __name__ == "__main__":  # datatrove's workers spawn and re-import this file
    main()
'''


def measure(cmd: list[str], log: Path) -> dict:
    """Wall time and peak summed RSS of the command's process tree."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(peak / 2**30, 3)}


def count_jsonl(folder: Path) -> tuple[int, int]:
    docs = nbytes = 0
    for p in sorted(folder.rglob("*.jsonl")):
        with open(p, "rb") as f:
            for line in f:
                docs += 1
                nbytes += len(json.loads(line)["text"].encode())
    return docs, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="/work/shared/corpus/*.jsonl.zst", help="glob of .jsonl.zst shards")
    ap.add_argument("--datatrove-python", default="", help="python of a venv with datatrove (empty: skip it)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work-dir", default="", help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args()

    files = sorted(glob.glob(args.corpus))
    if not files:
        raise SystemExit(f"no file matches {args.corpus}")
    corpus_bytes_on_disk = sum(os.path.getsize(f) for f in files)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="prep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from antimatter.provenance import provenance

    result: dict = {"provenance": provenance(), "corpus": args.corpus, "files": len(files),
                    "compressed_bytes": corpus_bytes_on_disk, "workers": args.workers}
    try:
        ours_out = work / "antimatter"
        antimatter = str(Path(sys.executable).with_name("antimatter"))
        ours = measure([antimatter, "prepare", *files, "--out", str(ours_out), "--workers", str(args.workers)],
                       work / "antimatter.log")
        stats = json.loads((ours_out / "dataset_statistics.json").read_text())
        t = stats["total"]
        mb = t["bytes_in"] / 1e6
        ours.update(docs_in=t["docs_in"], mb_in=round(mb, 2), kept_docs=t["kept_docs"],
                    kept_pct_bytes=t["kept_pct_bytes"], mb_per_s=round(mb / ours["wall_s"], 2),
                    mb_per_s_per_core=round(mb / ours["wall_s"] / args.workers, 3),
                    removed_by_stage=t["removed_by_stage"], timing=stats["timing"])
        result["antimatter"] = ours
        print(f"antimatter prepare: {ours['wall_s']:.1f} s, {ours['mb_per_s']:.2f} MB/s, "
              f"peak {ours['peak_rss_gib']:.2f} GiB, kept {ours['kept_pct_bytes']:.1f}% of bytes", file=sys.stderr)
        if args.datatrove_python:
            script = work / "dt_pipeline.py"
            script.write_text(DATATROVE_SCRIPT)
            dt_out = work / "datatrove"
            corpus_dir = str(Path(files[0]).parent)
            pattern = Path(args.corpus).name
            dt = measure([args.datatrove_python, str(script), corpus_dir, pattern, str(dt_out), str(args.workers),
                          str(len(files))], work / "datatrove.log")
            log = (work / "datatrove.log").read_text()
            stage_times = [json.loads(line.split(" ", 1)[1]) for line in log.splitlines()
                           if line.startswith("DATATROVE_TIMES ")]
            docs, nbytes = count_jsonl(dt_out / "deduped")
            dt.update(stage_s=stage_times[0] if stage_times else {}, kept_docs=docs,
                      kept_pct_bytes=round(100 * nbytes / t["bytes_in"], 2), mb_per_s=round(mb / dt["wall_s"], 2),
                      mb_per_s_per_core=round(mb / dt["wall_s"] / args.workers, 3))
            result["datatrove"] = dt
            result["speedup_wall"] = round(dt["wall_s"] / ours["wall_s"], 2)
            result["memory_ratio"] = round(ours["peak_rss_gib"] / max(1e-9, dt["peak_rss_gib"]), 2)
            print(f"datatrove: {dt['wall_s']:.1f} s, peak {dt['peak_rss_gib']:.2f} GiB, kept "
                  f"{dt['kept_pct_bytes']:.1f}% of bytes -> antimatter is {result['speedup_wall']:.2f}x faster",
                  file=sys.stderr)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
