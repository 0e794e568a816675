"""Which recipe gives the lowest validation loss for the same GPU minutes? Trains named variants of the
recipes in `configs/recipes/` (gpt2: the seed's recipe; modern: what the speedruns learned) for the same
wall-clock budget on the same tokens, with the project's own trainer (`train.max_minutes`: compile and
evaluation not counted), and writes one JSON row per run, a table and the val-loss curves.

    python benchmarks/recipes.py --data runs/corpus --out out/recipes --plan sweep modern ablate seeds

`--data` is a run folder with tokens/ (`antimatter tokenize` made them; configs/recipes/corpus.yaml builds
the shared corpus's). Plans:
  sweep   the gpt2 baseline at three learning rates (the best one is the baseline of everything after)
  modern  the modern recipe at the full budget, a half and a third of it (the time-to-loss ratio)
  ablate  each change of the modern recipe alone on top of the tuned baseline
  seeds   the baseline and the modern recipe again with another seed (run-to-run noise)
  muonlr  the modern recipe at two other Muon learning rates
  leaveout  the modern recipe, and without each of its optional parts (soft-cap, QK-norm, untied head,
          zero-init, ReLU² -> SwiGLU; and SwiGLU without soft-cap, the variant transformers can load): does
          each still pay inside the recipe?
  sizes   the modern recipe at three model sizes (8 layers d512, 12 layers d768, 24 layers d1024) for the same
          budget (train.max_minutes=5 or 15 as an override): which size wins for that many minutes
Runs already in OUT/results.jsonl are skipped, so a plan cut short (a time limit) continues where it stopped.
`--only NAME...` runs only the named runs of the plans. `--call-s S` cuts a run after S training seconds with a
checkpoint (`train.max_time_s`) and stops; the same command again resumes it on its fixed schedule: a
budget longer than one command may run, in consecutive commands on one machine.
Extra KEY=VALUE arguments override every run's config (e.g. train.max_minutes=3 model.n_layer=12).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
BASELINE_LRS = ("6e-4", "1.2e-3", "2.4e-3")

# one change of the modern recipe at a time, on top of the tuned gpt2 baseline
ABLATIONS = {
    "+muon": ["train.optimizer=muon"],
    "+wsd": ["train.schedule=wsd", "train.decay_fraction=0.4", "train.min_lr_ratio=0.0"],
    "+rope": ["model.position=rope"],
    "+rmsnorm": ["model.norm=rmsnorm"],
    "+qk_norm": ["model.qk_norm=true"],
    "+relu2": ["model.activation=relu2"],
    "+swiglu": ["model.activation=swiglu"],
    "+zero_init": ["model.zero_init_proj=true"],
    "+untied": ["model.tie_embeddings=false"],
    "+softcap": ["model.logit_softcap=15"],
}


# the modern recipe without one of its optional parts
LEAVE_OUT = {  # in the order a plan cut short should have measured them
    # SwiGLU and no soft-cap: the modern recipe that transformers can load (exported as Qwen3ForCausalLM)
    "-softcap-relu2+swiglu": ["model.logit_softcap=0", "model.activation=swiglu"],
    "-softcap": ["model.logit_softcap=0"],
    "-relu2+swiglu": ["model.activation=swiglu"],
    "-qk_norm": ["model.qk_norm=false"],
    "-untied": ["model.tie_embeddings=true"],
    "-zero_init": ["model.zero_init_proj=false"],
}

# model sizes for a budget: (layers, d_model, heads, micro-batch at context 1,024 on an 80 GB card)
SIZES = {"8L-d512": (8, 512, 8, 32), "12L-d768": (12, 768, 12, 32), "24L-d1024": (24, 1024, 16, 16)}


def plan_runs(plan: str, minutes: float, best_lr: str | None) -> list[tuple[str, str, list[str]]]:
    """(name, recipe, overrides) of a plan's runs."""
    base = [f"train.lr={best_lr}"] if best_lr else []
    if plan == "sweep":
        return [(f"gpt2-lr{lr}", "gpt2", [f"train.lr={lr}"]) for lr in BASELINE_LRS]
    if plan == "modern":
        return [("modern", "modern", []),
                ("modern-half", "modern", [f"train.max_minutes={minutes / 2:g}"]),
                ("modern-third", "modern", [f"train.max_minutes={minutes / 3:g}"])]
    if plan == "ablate":
        return [(f"gpt2{name}", "gpt2", base + ov) for name, ov in ABLATIONS.items()]
    if plan == "seeds":
        return [("gpt2-seed2", "gpt2", base + ["train.seed=2024"]), ("modern-seed2", "modern", ["train.seed=2024"])]
    if plan == "muonlr":
        return [(f"modern-muon{lr}", "modern", [f"train.muon_lr={lr}"]) for lr in ("0.01", "0.04")]
    if plan == "leaveout":  # with the full recipe at the same budget, on the same device, to compare with
        return [("modern", "modern", []), *((f"modern{name}", "modern", ov) for name, ov in LEAVE_OUT.items())]
    if plan == "sizes":
        return [(f"size-{size}-{minutes:g}min", "modern",
                 [f"model.n_layer={n}", f"model.d_model={d}", f"model.n_head={h}", f"train.micro_batch_size={mb}"])
                for size, (n, d, h, mb) in SIZES.items()]
    raise SystemExit(f"unknown plan '{plan}': choose from sweep, modern, ablate, seeds, muonlr, leaveout, sizes")


def read_results(out: Path) -> dict[str, dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return {}
    return {r["name"]: r for r in map(json.loads, filter(str.strip, path.read_text("utf-8").splitlines()))}


def best_baseline(results: dict[str, dict]) -> tuple[str | None, dict | None]:
    sweep = [r for r in results.values() if r["name"].startswith("gpt2-lr") and r.get("final_val_loss")]
    if not sweep:
        return None, None
    best = min(sweep, key=lambda r: r["final_val_loss"])
    return best["name"].removeprefix("gpt2-lr"), best


def val_curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text("utf-8").splitlines()]
    return [{"step": r["step"], "tokens": r["tokens"], "train_s": r.get("train_s"), "val_loss": r["val_loss"]}
            for r in rows if r.get("val_loss") is not None]


def time_to_loss(curve: list[dict], target: float) -> float | None:
    """Training seconds at which the val curve first reaches `target` (linear between measurements)."""
    prev = None
    for p in curve:
        if p["val_loss"] <= target:
            if prev is None:
                return p["train_s"]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev["train_s"] + f * (p["train_s"] - prev["train_s"])
        prev = p
    return None


def train_one(name: str, recipe: str, overrides: list[str], data: Path, out: Path,
              call_s: float = 0.0) -> dict | None:
    """Train one run to its budget and return its row; None when `call_s` cut it (a checkpoint to resume)."""
    import torch

    from antimatter.checkpoint import find_resume
    from antimatter.config import load_config
    from antimatter.train.trainer import train

    run_dir = out / name
    resume = call_s > 0 and run_dir.is_dir() and find_resume(run_dir / "checkpoints") is not None
    if not resume:
        if run_dir.exists():  # a run cut short without a checkpoint: start it again
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "tokens").symlink_to((data / "tokens").resolve(), target_is_directory=True)
    cut = [f"train.max_time_s={call_s:g}", "train.ckpt_interval=0"] if call_s > 0 else []
    cfg = load_config(RECIPES / f"{recipe}.yaml", [*overrides, *cut, f"train.resume={'auto' if resume else 'none'}"])
    cfg.name, cfg.runs_dir = name, str(out)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    summary = train(cfg, run_dir)
    wall = time.perf_counter() - t0
    if summary.get("stopped") == "time":
        print(f"{name} cut at step {summary['steps']} after {summary['train_seconds']:.0f} training seconds: "
              f"the same command again resumes it", flush=True)
        return None
    curve = val_curve(run_dir)
    return {"name": name, "recipe": recipe, "overrides": overrides, "minutes": cfg.train.max_minutes,
            "final_val_loss": curve[-1]["val_loss"] if curve else None, "curve": curve,
            "params": summary.get("params"), "wall_s": round(wall, 1),
            **{k: summary.get(k) for k in ("steps", "tokens_seen", "tokens_per_s", "mfu", "train_seconds",
                                          "compile_seconds", "eval_checkpoint_seconds", "budget",
                                          "global_batch_tokens")}}


def bits_per_byte(loss: float | None, bytes_per_token: float) -> float | None:
    return loss / math.log(2) / bytes_per_token if loss is not None else None


def report(results: dict[str, dict], data: Path, out: Path) -> dict:
    """Table rows (with bits per byte, epochs and the time-to-loss against the tuned baseline) and the plot."""
    meta = json.loads((data / "tokens" / "meta.json").read_text("utf-8"))
    bpt = meta["splits"]["val"]["bytes_per_token"]
    train_tokens = meta["splits"]["train"]["tokens"]
    best_lr, base = best_baseline(results)
    target = base["final_val_loss"] if base else None
    modern = results.get("modern", {}).get("final_val_loss")  # what the leave-one-outs compare against
    rows = []
    for r in results.values():
        hit = time_to_loss(r["curve"], target) if target is not None else None
        rows.append({"name": r["name"], "params": r.get("params"), "final_val_loss": r["final_val_loss"],
                     "bits_per_byte": bits_per_byte(r["final_val_loss"], bpt),
                     "vs_baseline": (r["final_val_loss"] - target) if target is not None and r["final_val_loss"]
                     else None,
                     "vs_modern": (r["final_val_loss"] - modern) if modern and r["final_val_loss"] else None,
                     "steps": r["steps"], "tokens_seen": r["tokens_seen"],
                     "epochs": r["tokens_seen"] / train_tokens if r.get("tokens_seen") else None,
                     "tokens_per_s": r["tokens_per_s"], "train_seconds": r["train_seconds"],
                     "compile_seconds": r["compile_seconds"],
                     "seconds_to_baseline_loss": hit,
                     "time_ratio_to_baseline": hit / base["train_seconds"] if hit and base else None})
    table = {"baseline": base["name"] if base else None, "baseline_lr": best_lr, "target_val_loss": target,
             "val_bytes_per_token": bpt, "rows": rows}
    try:
        recipes = [r for n, r in results.items() if is_recipe_curve(n) and r["curve"]]
        if recipes:
            plot(recipes, bpt, out / "recipes_curves.png",
                 "gpt2 (seed recipe) vs modern recipe: val loss for the same GPU minutes")
        sizes = [r for n, r in results.items() if n.startswith("size-")]
        if sizes:
            plot(sizes, bpt, out / "sizes_curves.png", "modern recipe: model size for the same GPU minutes")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return table


def is_recipe_curve(name: str) -> bool:
    """The recipes and the baseline's sweep; ablations, leave-one-outs, seeds and sizes are tables."""
    leave_outs = {f"modern{k}" for k in LEAVE_OUT}
    return name.startswith("gpt2-lr") or (name.startswith("modern") and "seed2" not in name
                                          and name not in leave_outs)


def plot(runs: list[dict], bpt: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in runs:
        if not r["curve"]:
            continue
        c = r["curve"]
        for ax, key in zip(axes, ("train_s", "tokens")):
            ax.plot([p[key] for p in c], [p["val_loss"] for p in c], "o-", ms=3, lw=1.2, label=r["name"])
    for ax, xlabel in zip(axes, ("training seconds (compile and evaluation excluded)", "tokens seen")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        sec = ax.secondary_yaxis("right", functions=(lambda v: v / math.log(2) / bpt,
                                                      lambda b: b * math.log(2) * bpt))
        sec.set_ylabel("val bits per byte")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="run folder with tokens/")
    ap.add_argument("--out", required=True, type=Path, help="folder for the runs, results.jsonl, table and plot")
    ap.add_argument("--plan", nargs="+", default=["sweep", "modern"])
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="start no run that would end after this many seconds from now (0 = no limit)")
    ap.add_argument("--overhead-s", type=float, default=45.0, help="compile + evaluation time a run adds")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these runs of the plans")
    ap.add_argument("--call-s", type=float, default=0.0,
                    help="cut each run after this many seconds with a checkpoint; run again to resume it")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    # `--plan a b KEY=VALUE`: argparse hands the overrides to --plan
    args.overrides += [p for p in args.plan if "=" in p]
    args.plan = [p for p in args.plan if "=" not in p]
    if not (args.data / "tokens" / "meta.json").is_file():
        sys.exit(f"{args.data} has no tokens/meta.json: build it with `antimatter tokenize` first")
    from antimatter.config import load_config
    from antimatter.provenance import provenance

    minutes = load_config(RECIPES / "gpt2.yaml", args.overrides).train.max_minutes
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for plan in args.plan:
        results = read_results(args.out)
        for name, recipe, ov in plan_runs(plan, minutes, best_baseline(results)[0]):
            if name in results or (args.only and name not in args.only):
                continue
            run_minutes = load_config(RECIPES / f"{recipe}.yaml", [*args.overrides, *ov]).train.max_minutes
            left = args.deadline_s - (time.perf_counter() - start)
            if args.deadline_s and not args.call_s and run_minutes * 60 + args.overhead_s > left:
                print(f"skip {name}: {run_minutes:g} min + {args.overhead_s:.0f}s would pass the deadline "
                      f"({left:.0f}s left)", flush=True)
                continue
            print(f"=== {name}: {recipe} {' '.join([*args.overrides, *ov])}", flush=True)
            row = train_one(name, recipe, [*args.overrides, *ov], args.data, args.out, args.call_s)
            if row is None:
                return
            row["provenance"] = provenance()
            with open(args.out / "results.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            results[name] = row
    table = report(read_results(args.out), args.data, args.out)
    table["provenance"] = provenance()
    (args.out / "recipes_table.json").write_text(json.dumps(table, indent=2), "utf-8")
    print(f"\nbaseline {table['baseline']} (lr {table['baseline_lr']}), target val loss {table['target_val_loss']}")
    print(f"{'run':<22}{'val loss':>9}{'bpb':>7}{'Δ base':>8}{'tok/s':>10}{'steps':>7}{'epochs':>7}"
          f"{'train s':>8}{'comp s':>7}{'s to base':>10}{'ratio':>7}")
    for r in table["rows"]:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        print(f"{r['name']:<22}{f(r['final_val_loss'], '.4f'):>9}{f(r['bits_per_byte'], '.3f'):>7}"
              f"{f(r['vs_baseline'], '+.3f'):>8}{f(r['tokens_per_s'], ',.0f'):>10}{f(r['steps'], 'd'):>7}"
              f"{f(r['epochs'], '.2f'):>7}{f(r['train_seconds'], '.1f'):>8}{f(r['compile_seconds'], '.1f'):>7}"
              f"{f(r['seconds_to_baseline_loss'], '.1f'):>10}{f(r['time_ratio_to_baseline'], '.2f'):>7}")


if __name__ == "__main__":
    main()
