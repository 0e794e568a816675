"""Finished runs side by side by their val curves: the time each took to reach the first run's final val loss
(the baseline), that time as a fraction of the baseline's, tokens, rate, and one PNG of val loss against
training seconds and against tokens. The runs' logs/metrics.jsonl hold the curves (`train.budget_evals`
points); their tokens/meta.json gives the bytes per token for the bits-per-byte axis.

    python benchmarks/compare_curves.py runs/seed-300m-gpt2 runs/seed-300m-modern --out out/seed-300m

Writes OUT/curves.json and OUT/curves.png. For the evaluation figures of the same runs (BLEU, ROUGE-L, decode
speed) use `antimatter eval --compare RUN...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import bits_per_byte, plot, time_to_loss, val_curve  # noqa: E402


def run_row(run_dir: Path) -> dict:
    """One run's val curve and steady rate, read from its metrics log."""
    metrics = run_dir / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"compare_curves: no {metrics}: pass run folders that `antimatter train` wrote")
    rows = [json.loads(line) for line in metrics.read_text("utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r.get("tokens_per_s") is not None]
    curve = val_curve(run_dir)
    if not curve:
        raise SystemExit(f"compare_curves: {metrics} has no val loss: train with train.budget_evals > 0")
    return {"name": run_dir.name, "curve": curve, "final_val_loss": curve[-1]["val_loss"],
            "lowest_val_loss": min(p["val_loss"] for p in curve),
            "steps": curve[-1]["step"], "tokens_seen": curve[-1]["tokens"], "train_seconds": curve[-1]["train_s"],
            # the first interval includes the compiling step: the median of the rest is the steady rate
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:]) if len(train) > 1 else None}


def compare(run_dirs: list[Path]) -> dict:
    """The rows and, for each, the seconds to the baseline's (first run's) final val loss and their ratio."""
    rows = [run_row(r) for r in run_dirs]
    meta = run_dirs[0] / "tokens" / "meta.json"
    if not meta.is_file():
        raise SystemExit(f"compare_curves: no {meta}: the first run's folder needs its tokens/ (bits per byte)")
    bpt = json.loads(meta.read_text("utf-8"))["splits"]["val"]["bytes_per_token"]
    base = rows[0]
    target = base["final_val_loss"]
    for r in rows:
        r["bits_per_byte"] = bits_per_byte(r["final_val_loss"], bpt)
        r["seconds_to_baseline_loss"] = hit = time_to_loss(r["curve"], target)
        r["time_fraction_of_baseline"] = hit / base["train_seconds"] if hit is not None else None
    return {"baseline": base["name"], "target_val_loss": target, "val_bytes_per_token": bpt, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the baseline")
    ap.add_argument("--out", required=True, type=Path, help="folder for curves.json and curves.png")
    ap.add_argument("--title", default="val loss for the same GPU minutes")
    args = ap.parse_args()
    table = compare(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.json").write_text(json.dumps(table, indent=1) + "\n", "utf-8")
    plot(table["rows"], table["val_bytes_per_token"], args.out / "curves.png", args.title)
    print(f"baseline {table['baseline']}: final val loss {table['target_val_loss']:.4f}")
    print(f"{'run':<24} {'final val':>9} {'bits/byte':>9} {'lowest':>7} {'tokens':>12} {'tokens/s':>9} "
          f"{'s to baseline':>13} {'fraction':>8}")
    for r in table["rows"]:
        hit, frac = r["seconds_to_baseline_loss"], r["time_fraction_of_baseline"]
        print(f"{r['name']:<24} {r['final_val_loss']:>9.4f} {r['bits_per_byte']:>9.4f} {r['lowest_val_loss']:>7.4f} "
              f"{r['tokens_seen']:>12,} {r['tokens_per_s'] or 0:>9,.0f} {'-' if hit is None else f'{hit:.0f}':>13} "
              f"{'-' if frac is None else f'{frac:.3f}':>8}")
    print(f"wrote {args.out / 'curves.json'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
