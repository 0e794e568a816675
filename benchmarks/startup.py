"""How long a user waits at start-up, cold (empty compile cache) and warm (the same cache, second start).

    python benchmarks/startup.py --model seed-300m --json startup.json            # a GPU: the real use
    python benchmarks/startup.py --model tiny --device cpu --steps 2 --json s.json  # CPU: checks the mechanics
    python benchmarks/startup.py --run runs/myrun --json s.json                    # a run that has tokens

Each start is a fresh subprocess with its own $ANTIMATTER_CACHE (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR
removed from its environment, so AntiMatter's compile cache folder is the one used): the first start of a
kind finds the folder empty (cold), the second finds what the first left (warm). Measured:

  * train: `antimatter train` with train.compile=true (unless --no-compile-train), train.resume=none, a few
    steps: seconds from launching the process to the end of the first optimizer step (the trainer logs the
    wall clock of that moment), and the trainer's compile_seconds (loop start to first step end); the
    trainer's set-up line splits the seconds before the loop (model, optimizers, data, logging) from those
    before it (interpreter, imports, checks);
  * generate: `antimatter generate --prompt ... --max-new-tokens N` with and without --compile: seconds from
    launch to the first token, taken as the launch-to-exit wall time minus the time the command reports for
    the tokens after the first (so interpreter shutdown is counted in it: a slight overestimate).

Without --run the script makes a run with random tokens for --model (and a small byte-level tokenizer for
generate). Warm starts also find the operating system's file cache warm (Python, torch), cold ones may not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from antimatter.compile_cache import ENV, INDUCTOR_ENV, TRITON_ENV, cache_size, has_bytecode
from antimatter.config import config_from_dict, load_config, save_config
from antimatter.provenance import provenance
from antimatter.tokenizer import EOT, EOT_ID, new_byte_level_bpe
from antimatter.tokens import write_shard

FIRST_STEP = re.compile(r"first step done: compile/first step took ([\d.]+)s \(unix time ([\d.]+)\)")
SET_UP = re.compile(r"set-up ([\d.]+)s: (.*?)(?:; the first step compiles next)?$", re.M)
# the line `antimatter generate` prints after an answer: with a rate when more than one token came
STATS = re.compile(r"\[(\d+) tokens?(?:: first after (\d+) ms, then ([\d.]+) tokens/s| in (\d+) ms)")


def make_run(root: Path, model: str, device: str, n_tokens: int) -> Path:
    """A run folder with random token shards for `model` (ids 1..vocab-1: no end-of-text to stop a sample
    early) and a small byte-level tokenizer, so that generate can print what the model samples."""
    cfg = config_from_dict({"name": "startup", "runs_dir": str(root), "model": model, "train": {"device": device}})
    run, vocab = cfg.run_dir, cfg.model.vocab_size
    rng = np.random.default_rng(0)
    for split, n in (("train", n_tokens), ("val", max(n_tokens // 10, 4 * cfg.model.block_size))):
        (run / "tokens" / split).mkdir(parents=True, exist_ok=True)
        write_shard(run / "tokens" / split / "00000.bin", rng.integers(1, vocab, n).astype(np.uint16), vocab,
                    EOT_ID)
    (run / "tokens" / "meta.json").write_text(json.dumps({"vocab_size": vocab, "eot_id": EOT_ID}))
    from tokenizers import pre_tokenizers, trainers

    tok = new_byte_level_bpe()
    bpe = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer=bpe)
    (run / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    return run


def child_env(cache: Path) -> dict[str, str]:
    """The environment of one start: AntiMatter's cache in `cache`, no torch or Triton override of it."""
    env = {k: v for k, v in os.environ.items() if k not in (INDUCTOR_ENV, TRITON_ENV)}
    env.update({ENV: str(cache), "PYTHONUNBUFFERED": "1"})
    return env


def cache_state(cache: Path) -> dict[str, Any]:
    """Files and MiB in the compile folder, before a start reads it."""
    files, size = cache_size(cache / "compile")
    return {"cache_files": files, "cache_mib": round(size / 2**20, 1)}


def launch(cmd: list[str], cache: Path, timeout: float) -> tuple[float, float, str]:
    """Run one start; returns (wall clock at launch, seconds to exit, stdout + stderr). A failed start stops
    the benchmark: a figure from a run that did not work would mislead."""
    started = time.time()
    r = subprocess.run(cmd, env=child_env(cache), capture_output=True, text=True, timeout=timeout)
    wall = time.time() - started
    if r.returncode != 0:
        sys.exit(f"failed (rc {r.returncode}): {' '.join(cmd)}\n{(r.stdout + r.stderr)[-3000:]}")
    return started, wall, r.stdout + r.stderr


def time_train(run: Path, cfg_path: Path, cache: Path, timeout: float) -> dict[str, Any]:
    """One `antimatter train` start: launch to the end of the first step, and the trainer's compile time."""
    state = cache_state(cache)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # this script's run: the last start's end checkpoint
    cmd = [sys.executable, "-m", "antimatter.cli", "train", "--config", str(cfg_path)]
    started, wall, out = launch(cmd, cache, timeout)
    m = FIRST_STEP.search(out)
    if not m:
        sys.exit(f"no first-step line in the output of {' '.join(cmd)}:\n{out[-3000:]}")
    first_step_s, compile_s = float(m[2]) - started, float(m[1])
    row = {"launch_to_first_step_s": round(first_step_s, 2), "compile_seconds": compile_s}
    if su := SET_UP.search(out):  # the trainer's own split of the seconds between start-up and the loop
        set_up_s = float(su[1])
        row.update(before_set_up_s=round(first_step_s - compile_s - set_up_s, 2), set_up_s=set_up_s,
                   set_up_parts=su[2])
    return {**row, "exit_s": round(wall, 2), **state}


def time_generate(run: Path, compiled: bool, new_tokens: int, prompt: str, cache: Path,
                  timeout: float) -> dict[str, Any]:
    """One `antimatter generate` start: launch to the first token (exit time minus the reported time of the
    tokens after the first), and the first token's own time as the command reports it."""
    state = cache_state(cache)
    cmd = [sys.executable, "-m", "antimatter.cli", "generate", "--run", str(run), "--prompt", prompt,
           "--max-new-tokens", str(new_tokens), "--seed", "0", *(["--compile"] if compiled else [])]
    _, wall, out = launch(cmd, cache, timeout)
    m = STATS.search(out)
    if not m:
        sys.exit(f"no statistics line in the output of {' '.join(cmd)}:\n{out[-3000:]}")
    tokens = int(m[1])
    if m[3]:  # more than one token: the rate is of the tokens after the first
        first_ms, after_s = float(m[2]), (tokens - 1) / float(m[3])
    else:
        first_ms, after_s = float(m[4]), 0.0
    return {"launch_to_first_token_s": round(wall - after_s, 2), "first_token_reported_ms": first_ms,
            "new_tokens": tokens, "exit_s": round(wall, 2), **state}


def time_eval(run: Path, cache: Path, timeout: float, eval_tokens: int) -> dict[str, Any]:
    """One `antimatter eval` start with its decode-speed part compiled (eval.speed_compile=true, the only part
    of eval that compiles): launch to exit. Perplexity reads at most `eval_tokens` val tokens and the
    continuation scores 4 documents, so the figure is the start-up and the compile, not the scoring."""
    state = cache_state(cache)
    cmd = [sys.executable, "-m", "antimatter.cli", "eval", "--run", str(run), f"eval.max_eval_tokens={eval_tokens}",
           "eval.continuation_docs=4", "eval.plots=false", "eval.speed_compile=true"]
    _, wall, _ = launch(cmd, cache, timeout)
    return {"launch_to_exit_s": round(wall, 2), "exit_s": round(wall, 2), **state}


def profile_start(cli_args: list[str], cache: Path, out: Path, timeout: float) -> None:
    """One more (warm) start of `antimatter CLI_ARGS` under cProfile: its stats in OUT.prof and the 40
    functions with the most cumulative time in OUT.txt, to see where a warm start's seconds go. Not timed:
    the profiler slows Python down."""
    import pstats

    out.parent.mkdir(parents=True, exist_ok=True)
    launch([sys.executable, "-m", "cProfile", "-o", f"{out}.prof", "-m", "antimatter.cli", *cli_args], cache,
           timeout)
    with open(f"{out}.txt", "w") as f:
        pstats.Stats(f"{out}.prof", stream=f).sort_stats("cumulative").print_stats(40)
    print(f"profile of a warm `antimatter {cli_args[0]}`: {out}.txt")


def scratch_run(run: Path, scratch: Path) -> Path:
    """A run folder of this script's own that reads `run`'s tokens and tokenizer: the timed training starts
    write checkpoints and logs there, not into the user's run."""
    scratch.mkdir(parents=True)
    for name in ("tokens", "tokenizer"):
        (scratch / name).symlink_to(run / name, target_is_directory=True)
    if (run / "config.yaml").is_file():
        shutil.copyfile(run / "config.yaml", scratch / "config.yaml")
    return scratch


def train_config(run: Path, args: argparse.Namespace) -> Path:
    """The run's config with a short, compiled, fresh (resume none) training and checkpoints only at the end."""
    cfg = load_config(run / "config.yaml" if (run / "config.yaml").is_file() else None,
                      [f"model={args.model}"] if not (run / "config.yaml").is_file() else [])
    cfg.name, cfg.runs_dir = run.name, str(run.parent)
    t = cfg.train
    t.device, t.compile, t.resume, t.max_steps = args.device, args.compile_train, "none", args.steps
    t.warmup_steps, t.log_interval, t.eval_interval, t.eval_steps = 1, 1, 0, 1
    t.ckpt_interval, t.tensorboard, t.max_minutes = 0, False, 0
    t.micro_batch_size = args.micro_batch_size
    t.seq_len = args.seq_len or cfg.model.block_size
    t.global_batch_tokens = 0
    if args.dtype:
        t.dtype = args.dtype
    path = run / "startup_train.yaml"
    save_config(cfg, path)
    return path


def cold_and_warm(measure, cache: Path) -> list[dict[str, Any]]:
    """The same start twice on one cache folder: emptied before the first."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    return [{"start": start, **measure(cache)} for start in ("cold", "warm")]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'what':<20} {'start':<5} {'to first step/token':>20} {'compile_s':>10} {'exit_s':>8} "
          f"{'cache before':>16}")
    for r in rows:
        first = r.get("launch_to_first_step_s", r.get("launch_to_first_token_s", r.get("launch_to_exit_s")))
        compile_s = f"{r['compile_seconds']:.2f}" if "compile_seconds" in r else "-"
        print(f"{r['what']:<20} {r['start']:<5} {first:>19.2f}s {compile_s:>10} {r['exit_s']:>7.2f}s "
              f"{r['cache_files']:>6} files {r['cache_mib']:>4.0f}M")
    print("train: launch to the end of the first optimizer step (the trainer's wall clock); eval: launch to exit; "
          "generate: launch to exit minus the reported time of the tokens after the first (shutdown included)")
    for r in rows:
        if "set_up_s" in r:
            print(f"{r['what']}, {r['start']}: {r['before_set_up_s']:.1f}s interpreter, imports and checks, then "
                  f"set-up {r['set_up_s']:.1f}s ({r['set_up_parts']}), then {r['compile_seconds']:.1f}s to the "
                  f"end of the first step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a run folder with tokens (and a tokenizer and a checkpoint for "
                                            "generate, which the training here writes); default: make one")
    p.add_argument("--model", default="seed-300m", help="model preset of the run made here (default seed-300m)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there is one)")
    p.add_argument("--dtype", default=None, help="train.dtype (default: the config's)")
    p.add_argument("--steps", type=int, default=3, help="training steps a start runs (default 3)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=0, help="0 = the model's context")
    p.add_argument("--no-compile-train", dest="compile_train", action="store_false",
                   help="train without torch.compile (the start-up of eager training)")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=32768, help="val tokens the eval start scores")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one start may take")
    p.add_argument("--only", nargs="+", default=["train", "generate", "eval"], choices=["train", "generate", "eval"],
                   help="which starts to time (default all three)")
    p.add_argument("--json", type=Path, help="write the rows and provenance here")
    p.add_argument("--profile", type=Path, help="also profile one more warm train and generate --compile start "
                                                "(cProfile) into this folder")
    return p.parse_args(argv)


def bytecode_state() -> dict[str, Any]:
    """Whether the starts will find torch's bytecode (taken before this process imports torch, which may
    write it): without it each start compiles some 2,300 modules, seconds of every start."""
    return {"PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
            "torch_bytecode_beside_sources": has_bytecode("torch")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bytecode = bytecode_state()
    print(f"python bytecode before the first start: {bytecode}")
    sys.dont_write_bytecode = True  # this process leaves no bytecode of torch's for the starts it times to find
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = []

    def measure(what: str, start_once, cache: Path) -> None:
        """Cold and warm starts of one kind; the rows so far are printed and saved after each kind, so a
        benchmark cut by a time limit keeps what it measured."""
        rows.extend({"what": what, **r} for r in cold_and_warm(start_once, cache))
        print_table(rows)
        if args.json:
            result = {"rows": rows, "settings": {k: str(v) if isinstance(v, Path) else v
                                                 for k, v in vars(args).items()},
                      "bytecode": bytecode, "provenance": provenance(args.device)}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory(prefix="am_startup_") as tmp:
        root = Path(tmp)
        run = args.run.resolve() if args.run else make_run(root / "runs", args.model, args.device,
                                                           n_tokens=200_000)
        scratch = scratch_run(run, root / "runs" / "startup_train") if args.run else run
        cfg_path = train_config(scratch, args)
        if "train" in args.only:
            measure("train --compile" if args.compile_train else "train",
                    lambda c: time_train(scratch, cfg_path, c, args.timeout), root / "cache_train")
            if args.profile:
                profile_start(["train", "--config", str(cfg_path)], root / "cache_train",
                              args.profile / "train_warm", args.timeout)
        elif not args.run:  # generate and eval read a checkpoint: an uncompiled training, not timed, writes one
            launch([sys.executable, "-m", "antimatter.cli", "train", "--config", str(cfg_path), "train.compile=false"],
                   root / "cache_untimed", args.timeout)
        for compiled in (False, True) if "generate" in args.only else ():
            measure("generate" + (" --compile" if compiled else ""),
                    lambda c, compiled=compiled: time_generate(run, compiled, args.max_new_tokens, args.prompt, c,
                                                               args.timeout),
                    root / f"cache_generate{'_compile' if compiled else ''}")
        if args.profile and "generate" in args.only:
            profile_start(["generate", "--run", str(run), "--prompt", args.prompt, "--max-new-tokens",
                           str(args.max_new_tokens), "--compile"], root / "cache_generate_compile",
                          args.profile / "generate_compile_warm", args.timeout)
        if "eval" in args.only:
            measure("eval (speed_compile)", lambda c: time_eval(scratch, c, args.timeout, args.eval_tokens),
                    root / "cache_eval")


if __name__ == "__main__":
    main()
