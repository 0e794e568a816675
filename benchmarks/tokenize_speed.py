"""Tokenizer training and tokenize throughput on a prepared data folder, side by side with plain HF loops.

    python benchmarks/tokenize_speed.py --data runs/NAME/data --out /tmp/tokbench [--vocab 50257]
        [--skip-train] [--peers] [--json results.json]

Phases run in child processes so each reports its own peak RSS:
  train     antimatter.tokenizer.train_tokenizer (byte-level BPE, sample bounded by --train-bytes)
  tokenize  antimatter.tokens.run_tokenize end to end: read .jsonl.zst, encode, write shards + meta.json
  peers     (--peers) the same documents through HF `Tokenizer.encode_batch` and `encode_batch_fast` in
            batches of the same size, reading included, nothing written: the bare-library baseline
MB/s counts UTF-8 text bytes of the documents. The CPU is shared on small machines: say so with figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_train(args: argparse.Namespace) -> dict:
    from antimatter.config import load_config
    from antimatter.tokenizer import train_tokenizer

    cfg = load_config(None, [f"tokenizer.vocab_size={args.vocab}", f"tokenizer.train_bytes={args.train_bytes}"])
    t0, c0 = time.perf_counter(), time.process_time()
    info = train_tokenizer(cfg, Path(args.data), Path(args.out) / "tokenizer")
    wall = time.perf_counter() - t0
    return {"phase": "train", "wall_s": round(wall, 1), "cpu_s": round(time.process_time() - c0, 1),
            "peak_rss_mib": round(peak_rss_mib()),
            "vocab_size": info["vocab_size"], "docs_used": info["docs_used"], "docs_total": info["docs_total"],
            "bytes_used": info["bytes_used"], "bytes_total": info["bytes_total"],
            "mb_per_s": round(info["bytes_used"] / 1e6 / wall, 2)}


def phase_tokenize(args: argparse.Namespace) -> dict:
    from antimatter.config import load_config
    from antimatter.tokens import run_tokenize

    cfg = load_config(None, [f"tokenizer.vocab_size={args.vocab}"])
    t0 = time.perf_counter()
    meta = run_tokenize(cfg, Path(args.data), Path(args.out) / "tokenizer", Path(args.out) / "tokens")
    wall = time.perf_counter() - t0
    text_bytes = sum(s["bytes"] for s in meta["splits"].values())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {"phase": "tokenize", "wall_s": round(wall, 1), "cpu_s": meta["cpu_seconds"],
            "load_avg_1m_at_end": meta["load_avg_1m"], "peak_rss_mib": round(peak_rss_mib()),
            "text_bytes": text_bytes, "tokens": tokens, "tokens_train": meta["tokens"]["train"],
            "tokens_val": meta["tokens"]["val"], "bytes_per_token": round(text_bytes / tokens, 3),
            "mb_per_s": round(text_bytes / 1e6 / wall, 2), "dtype": meta["dtype"]}


def phase_peers(args: argparse.Namespace) -> dict:
    from tokenizers import Tokenizer

    from antimatter.config import TokenizeConfig
    from antimatter.data.records import iter_records, split_files

    hf = Tokenizer.from_file(str(Path(args.out) / "tokenizer" / "tokenizer.json"))
    batch_docs, batch_bytes = TokenizeConfig().batch_docs, TokenizeConfig().batch_bytes
    out = {"phase": "peers"}
    for method in ("encode_batch", "encode_batch_fast"):
        encode = getattr(hf, method)
        t0, c0 = time.perf_counter(), time.process_time()
        text_bytes = tokens = 0
        for split in ("train", "val"):
            texts: list[str] = []
            nbytes = 0
            for f in split_files(Path(args.data) / split):
                for rec, line_bytes in iter_records(f):
                    texts.append(rec["text"])
                    nbytes += line_bytes
                    if len(texts) >= batch_docs or nbytes >= batch_bytes:
                        tokens += sum(len(e.ids) + 1 for e in encode(texts, add_special_tokens=False))
                        text_bytes += sum(len(t.encode("utf-8")) for t in texts)
                        texts, nbytes = [], 0
            if texts:
                tokens += sum(len(e.ids) + 1 for e in encode(texts, add_special_tokens=False))
                text_bytes += sum(len(t.encode("utf-8")) for t in texts)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[method] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "mb_per_s": round(text_bytes / 1e6 / wall, 2),
                       "mb_per_cpu_s": round(text_bytes / 1e6 / cpu, 2), "tokens": tokens}
    out["peak_rss_mib"] = round(peak_rss_mib())
    return out


PHASES = {"train": phase_train, "tokenize": phase_tokenize, "peers": phase_peers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prepared data folder with train/ and val/ *.jsonl.zst")
    ap.add_argument("--out", required=True, help="scratch folder for the tokenizer and the shards")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--train-bytes", type=int, default=200_000_000)
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT/tokenizer from an earlier run")
    ap.add_argument("--peers", action="store_true", help="also time bare HF encode_batch(_fast) loops")
    ap.add_argument("--json", help="write the figures with provenance to this file")
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:  # child process: run one phase, print its figures as the last line
        print(json.dumps(PHASES[args.phase](args)))
        return

    phases = ([] if args.skip_train else ["train"]) + ["tokenize"] + (["peers"] if args.peers else [])
    results = {}
    for phase in phases:
        cmd = [sys.executable, __file__, "--phase", phase, "--data", args.data, "--out", args.out,
               "--vocab", str(args.vocab), "--train-bytes", str(args.train_bytes)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[phase]), flush=True)

    tk = results["tokenize"]
    print(f"\ntokenize end to end: {tk['mb_per_s']:.2f} MB/s ({tk['text_bytes'] / 1e6 / tk['cpu_s']:.2f} MB per "
          f"CPU-second), {tk['tokens']:,} tokens, "
          f"{tk['bytes_per_token']:.3f} bytes/token, peak {tk['peak_rss_mib']} MiB")
    if "peers" in results:
        for method in ("encode_batch", "encode_batch_fast"):
            peer = results["peers"][method]["mb_per_s"]
            print(f"  vs bare HF {method:18s} {peer:.2f} MB/s (no writing): ratio {tk['mb_per_s'] / peer:.2f}x")
    if args.json:
        from antimatter.provenance import provenance

        Path(args.json).write_text(json.dumps({**results, "provenance": provenance(device="cpu")}, indent=2))


if __name__ == "__main__":
    main()
