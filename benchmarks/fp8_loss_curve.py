"""Does fp8 training follow the bf16 loss curve? Train the same model on the same tokens three times with the
project's own trainer (`antimatter train`): bf16, bf16 with another seed (the run-to-run noise), and fp8
(torchao float8 matmuls, `train.fp8=true`) with the first seed; plot the three curves and compare the fp8
gap with the seed gap: fp8 is worth having only within run-to-run noise over a short run on real text.

    python benchmarks/fp8_loss_curve.py --run runs/corpus --out /tmp/fp8 --steps 300 model.preset=seed-300m

`--run` is a run folder with token shards (`antimatter tokenize` made them); each variant trains in its own
run folder under `--out` that links to those tokens. Extra KEY=VALUE arguments override the config of all
three (model, batch, schedule). On a machine without fp8 tensor cores leave fp8 out: `--variants bf16,bf16-seed2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: overrides
    "bf16": ["train.fp8=false"],
    "bf16-seed2": ["train.fp8=false", "train.seed=2024"],
    "fp8": ["train.fp8=true"],
}


def read_curve(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[float]]:
    """(step, train loss), (step, val loss) and the logged tokens/s of a run's logs/metrics.jsonl."""
    train, val, tps = [], [], []
    for line in (run_dir / "logs" / "metrics.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
            if row.get("tokens_per_s"):
                tps.append(row["tokens_per_s"])
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    return train, val, tps


def mean_abs_gap(a: list[tuple[int, float]], b: list[tuple[int, float]], from_step: int) -> float | None:
    """Mean |a - b| over the logged steps both curves have, from `from_step` on."""
    bd = dict(b)
    gaps = [abs(v - bd[s]) for s, v in a if s >= from_step and s in bd]
    return sum(gaps) / len(gaps) if gaps else None


def train_variant(run: Path, out: Path, name: str, overrides: list[str]) -> tuple[Path, float]:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for part in ("tokens", "tokenizer"):  # the same data and tokenizer for every variant
        link = run_dir / part
        if not link.exists() and (run / part).exists():
            link.symlink_to((run / part).resolve(), target_is_directory=True)
    cmd = [sys.executable, "-c", "import sys; from antimatter.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", "--config", str(run / "config.yaml"), "--runs-dir", str(out), "--name", name,
           "--resume", "none", *overrides]
    print("$", " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=os.environ.copy())
    return run_dir, time.perf_counter() - t0


def plot(curves: dict[str, tuple[list, list, list]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (train, val, _) in curves.items():
        line, = ax.plot([s for s, _ in train], [v for _, v in train], label=f"{name} train", lw=1)
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o--", color=line.get_color(), label=f"{name} val", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="run folder with tokens/ (and tokenizer/)")
    ap.add_argument("--out", required=True, type=Path, help="folder for the variants' runs, plot and JSON")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if not (args.run / "tokens" / "train").is_dir():
        sys.exit(f"{args.run} has no tokens/train: run `antimatter tokenize` for it first")
    common = [f"train.max_steps={args.steps}", *args.overrides]
    curves, seconds = {}, {}
    for name in variants:
        run_dir, seconds[name] = train_variant(args.run, args.out, name, [*common, *VARIANTS[name]])
        curves[name] = read_curve(run_dir)
    from antimatter.provenance import provenance

    half = args.steps // 2
    summary = {"provenance": provenance(), "steps": args.steps, "overrides": common, "seconds": seconds,
               "final_train_loss": {n: c[0][-1][1] for n, c in curves.items() if c[0]},
               "final_val_loss": {n: c[1][-1][1] for n, c in curves.items() if c[1]},
               "compared_from_step": half,
               # median of the logged tokens/s after the first quarter (compile and warm-up excluded)
               "median_tokens_per_s": {n: statistics.median(c[2][len(c[2]) // 4:])
                                       for n, c in curves.items() if c[2]}}
    if "bf16" in curves:
        for other in (n for n in curves if n != "bf16"):
            summary[f"mean_abs_train_gap_{other}_vs_bf16"] = mean_abs_gap(curves[other][0], curves["bf16"][0], half)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_loss_curve.json").write_text(json.dumps(summary, indent=2), "utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=2))
    png = args.out / "fp8_loss_curve.png"
    try:
        plot(curves, png, f"{' / '.join(curves)} - {args.steps} steps, {' '.join(args.overrides)}")
        print(f"plot: {png}")
    except ImportError:  # the summary above stands; plot later from the runs' logs/metrics.jsonl
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(f"summary: {args.out / 'fp8_loss_curve.json'}")


if __name__ == "__main__":
    main()
