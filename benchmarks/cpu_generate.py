"""Interactive generation on the CPU: how fast a trained run answers on this machine (the
quickstart model should stay pleasant on 2 cores). Each figure is the median of several runs:

  * the first answer of a fresh process (`antimatter generate --prompt` answers exactly one): the time to
    its first token, and the rate of the tokens after it;
  * decode tokens/s at batch 1 and 8, greedy, plain and compiled (`eval.speed.measure_speed`, the figure
    `antimatter eval` reports, with more tokens and repeats than the eval's quick default);
  * the interactive path, for each `--threads` setting: `LLM.complete` with the default sampling of
    `antimatter generate` (temperature, top-k, top-p) and tokens streamed as text to a discarded stream,
    i.e. what `antimatter generate` does per prompt: the time to the first token and the rate after it.
    `--threads 0 2` compares the automatic choice (one thread for this model) with two.

    python benchmarks/cpu_generate.py --run runs/quickstart --threads 0 2 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
from pathlib import Path

import torch

from antimatter.config import GenerateConfig
from antimatter.eval.speed import measure_speed
from antimatter.llm import LLM
from antimatter.provenance import provenance

PROMPTS = ["The future of artificial intelligence", "In the field of machine learning", "def main():"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/quickstart", help="a trained run folder (make quickstart makes one)")
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--new-tokens", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[0], help="generate.threads settings to compare")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows (inductor's C++ build)")
    ap.add_argument("--json")
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        raise SystemExit(f"{run} has no checkpoints: train one first (make quickstart makes runs/quickstart)")
    llm = LLM.load(run, checkpoint=args.checkpoint, device="cpu")
    s = GenerateConfig(max_new_tokens=args.new_tokens, seed=0)
    first = llm.complete(PROMPTS[0], s, stream=io.StringIO())  # before anything else ran in this process
    out: dict = {"provenance": provenance(llm.device), "run": str(run), "torch_threads": torch.get_num_threads(),
                 "load_average": os.getloadavg(), "params": llm.model.num_params(),
                 "first_answer": {"first_token_ms": first.first_token_s * 1000, "tokens_per_s": first.tokens_per_s,
                                  "new_tokens": first.new_tokens, "threads": first.threads}}
    # generate's automatic thread choice, as `antimatter eval` measures it
    out["speed"] = measure_speed(llm.model, prompt_tokens=64, new_tokens=args.new_tokens, batch_sizes=(1, 8),
                                 repeats=args.repeats, compile=not args.no_compile)
    rows = []
    for threads in args.threads:
        st = GenerateConfig(max_new_tokens=args.new_tokens, seed=0, threads=threads)
        llm.complete(PROMPTS[0], st, stream=io.StringIO())  # warm-up
        for prompt in PROMPTS:
            runs = [llm.complete(prompt, st, stream=io.StringIO()) for _ in range(args.repeats)]
            rows.append({"threads_setting": threads, "threads": runs[0].threads, "prompt": prompt,
                         "new_tokens": statistics.median(r.new_tokens for r in runs),
                         "first_token_ms": statistics.median(r.first_token_s * 1000 for r in runs),
                         "tokens_per_s": statistics.median(r.tokens_per_s for r in runs)})
    out["interactive"] = rows
    out["load_average_after"] = os.getloadavg()
    print(f"{out['provenance']['device']}, torch's {out['torch_threads']} threads, {out['params']:,} parameters, "
          f"load average {out['load_average'][0]:.2f} -> {out['load_average_after'][0]:.2f}")
    f = out["first_answer"]
    print(f"first answer of the process: first token after {f['first_token_ms']:.0f} ms, then "
          f"{f['tokens_per_s']:,.0f} tokens/s ({f['threads']} thread(s))")
    for b, r in out["speed"]["batches"].items():
        comp = r.get("compiled_decode_tokens_per_s")
        print(f"batch {b}: decode {r['decode_tokens_per_s']:,.0f} tokens/s"
              + (f", compiled {comp:,.0f}" if comp else "") + f", time to first token {r['time_to_first_token_s'] * 1000:.1f} ms"
              f" (prompt {out['speed']['prompt_tokens']})")
    for r in rows:
        print(f"interactive, threads={r['threads_setting']} ({r['threads']}) '{r['prompt']}': first token after "
              f"{r['first_token_ms']:.0f} ms, then {r['tokens_per_s']:,.0f} tokens/s ({r['new_tokens']:.0f} tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
