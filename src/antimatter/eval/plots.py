"""Training curves from `logs/metrics.jsonl` as PNG files (matplotlib Figure objects rendered by Agg: no
display needed, and the caller's pyplot backend is left alone).

Every line of metrics.jsonl is one JSON record with a `step`. Training records carry the train loss, the
learning rate, the gradient norm, tokens seen, tokens/s and MFU; evaluation records carry the val loss. The
keys are looked up under a few common spellings, so a record written by an older trainer still plots.
A figure whose data is missing is skipped and listed under `skipped`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, FuncFormatter, NullFormatter

KEYS = {
    "train_loss": ("train_loss", "loss", "train/loss"),
    "val_loss": ("val_loss", "val/loss", "eval_loss"),
    "lr": ("lr", "learning_rate", "train/lr"),
    "grad_norm": ("grad_norm", "gradnorm", "train/grad_norm"),
    "tokens": ("tokens", "tokens_seen", "train/tokens"),
    "tokens_per_s": ("tokens_per_s", "tok_per_s", "tokens_per_sec", "throughput"),
    "mfu": ("mfu", "train/mfu"),
}


def read_metrics(path: Path) -> list[dict]:
    """Records of metrics.jsonl (a truncated last line, as a crash can leave, is ignored)."""
    records = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def _get(rec: dict, name: str):
    if name == "train_loss" and (rec.get("split") == "val" or rec.get("kind") == "eval"):
        return None  # a val record that stores its loss under 'loss'
    for k in KEYS[name]:
        v = rec.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    if name == "val_loss" and (rec.get("split") == "val" or rec.get("kind") == "eval"):
        v = rec.get("loss")
        return float(v) if isinstance(v, int | float) else None
    return None


def series(records: list[dict], name: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) pairs of one metric; x is `step` or `tokens` (tokens carried from the latest train record)."""
    xs, ys, last_tokens = [], [], None
    for rec in records:
        t = _get(rec, "tokens")
        if t is not None:
            last_tokens = t
        y = _get(rec, name)
        if y is None:
            continue
        xv = float(rec["step"]) if x == "step" else (t if t is not None else last_tokens)
        if xv is None:
            continue
        xs.append(xv)
        ys.append(y)
    return xs, ys


def _figure(title: str, xlabel: str, ylabel: str):
    """A standalone Figure (no pyplot): renders with Agg and never touches the caller's backend."""
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path, made: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(path)
    made.append(str(path))


def _plot_loss(records: list[dict], out_dir: Path, tag: str, final, made: list[str], skipped: list[str]) -> None:
    """loss_vs_step.png and loss_vs_tokens.png: train and val loss, the final evaluation marked on the first."""
    for x, fname, xlabel in (("step", "loss_vs_step.png", "optimizer step"),
                             ("tokens", "loss_vs_tokens.png", "training tokens")):
        tr, va = series(records, "train_loss", x), series(records, "val_loss", x)
        if not tr[0] and not va[0]:
            skipped.append(f"{fname}: no loss values with '{x}'")
            continue
        fig, ax = _figure(f"Loss vs {xlabel}{tag}", xlabel, "cross-entropy (nats/token)")
        if tr[0]:
            ax.plot(*tr, label="train", lw=1.2, alpha=0.85)
        if va[0]:
            ax.plot(*va, "o-", label="val", lw=1.6, ms=4)
        if final and x == "step":
            ax.plot([final[0]], [final[1]], "*", ms=12, color="tab:red", label="val, final evaluation")
        ax.legend()
        _save(fig, out_dir / fname, made)


def _plot_perplexity(records: list[dict], out_dir: Path, tag: str, final, baseline: float | None,
                     made: list[str]) -> None:
    """perplexity.png on a log scale, with the unigram baseline when given."""
    tr, va = series(records, "train_loss"), series(records, "val_loss")
    if not tr[0] and not va[0]:
        return
    fig, ax = _figure(f"Perplexity{tag}", "optimizer step", "perplexity (log scale)")
    if tr[0]:
        ax.plot(tr[0], [math.exp(min(v, 50)) for v in tr[1]], label="train", lw=1.2, alpha=0.85)
    if va[0]:
        ax.plot(va[0], [math.exp(min(v, 50)) for v in va[1]], "o-", label="val", lw=1.6, ms=4)
    if final:
        ax.plot([final[0]], [math.exp(min(final[1], 50))], "*", ms=12, color="tab:red",
                label="val, final evaluation")
    if baseline:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label=f"unigram baseline ({baseline:.1f})")
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 200, not 2x10^2
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if hi / lo < 30 else NullFormatter())
    ax.legend()
    _save(fig, out_dir / "perplexity.png", made)


def _plot_optimizer(records: list[dict], out_dir: Path, tag: str, made: list[str], skipped: list[str]) -> None:
    """lr.png and grad_norm.png (the latter on a log scale when spikes dwarf the median)."""
    for name, fname, title, ylabel in (("lr", "lr.png", "Learning rate", "learning rate"),
                                       ("grad_norm", "grad_norm.png", "Gradient norm (before clipping)",
                                        "global L2 norm")):
        xs, ys = series(records, name)
        if not xs:
            skipped.append(f"{fname}: no '{name}' values")
            continue
        fig, ax = _figure(f"{title}{tag}", "optimizer step", ylabel)
        ax.plot(xs, ys, lw=1.2)
        if name == "grad_norm" and max(ys) > 20 * (sorted(ys)[len(ys) // 2] or 1):
            ax.set_yscale("log")
        _save(fig, out_dir / fname, made)


def _plot_throughput(records: list[dict], out_dir: Path, tag: str, made: list[str], skipped: list[str]) -> None:
    """throughput.png: tokens/s, with MFU below it when the trainer could log it."""
    tps, mfu = series(records, "tokens_per_s"), series(records, "mfu")
    if not tps[0]:
        skipped.append("throughput.png: no tokens/s values")
        return
    fig = Figure(figsize=(7, 5.2 if mfu[0] else 4.2), dpi=110)
    axes = fig.subplots(2 if mfu[0] else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(*tps, lw=1.2, color="tab:blue")
    axes[0].set_title(f"Training throughput{tag}")
    axes[0].set_ylabel("tokens/s")
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    if mfu[0]:
        scale = 100.0 if max(mfu[1]) <= 1.0 else 1.0  # stored as a fraction or as a percentage
        axes[1].plot(mfu[0], [v * scale for v in mfu[1]], lw=1.2, color="tab:orange")
        axes[1].set_ylabel("MFU (%)")
    else:
        axes[0].text(0.99, 0.02, "MFU not logged (device peak unknown)", transform=axes[0].transAxes,
                     ha="right", va="bottom", fontsize=8, color="gray")
        skipped.append("throughput.png: no MFU values (unknown device peak): tokens/s only")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    _save(fig, out_dir / "throughput.png", made)


def plot_training(metrics_path: Path, out_dir: Path, run_name: str = "", baseline: float | None = None,
                  final: tuple[float, float] | None = None) -> dict:
    """Write loss_vs_step.png, loss_vs_tokens.png, perplexity.png (with the unigram `baseline` when given),
    lr.png, grad_norm.png and throughput.png into out_dir; returns {"plots": [paths], "skipped": [reasons]}.
    `final` = (step, loss) of the evaluated checkpoint, marked on the step plots: training's periodic val
    loss uses only `train.eval_steps` batches, the evaluation all (or `eval.max_eval_tokens`) val tokens."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(metrics_path)
    made: list[str] = []
    skipped: list[str] = []
    if not records:
        return {"plots": made, "skipped": [f"no records in {metrics_path}"]}
    tag = f" ({run_name})" if run_name else ""
    _plot_loss(records, out_dir, tag, final, made, skipped)
    _plot_perplexity(records, out_dir, tag, final, baseline, made)
    _plot_optimizer(records, out_dir, tag, made, skipped)
    _plot_throughput(records, out_dir, tag, made, skipped)
    return {"plots": made, "skipped": skipped}
