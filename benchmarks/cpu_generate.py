"""Interactive generation on the CPU: how fast a trained run answers on this machine (the
quickstart model should stay pleasant on 2 cores). Three figures, each the median of several runs:

  * decode tokens/s at batch 1 and 8, greedy, plain and compiled (`eval.speed.measure_speed`, the figure
    `antimatter eval` reports, with more tokens and repeats than the eval's quick default);
  * the interactive path: `generate_cli.complete` with the default sampling of `antimatter generate`
    (temperature, top-k, top-p) and tokens streamed as text to a discarded stream, i.e. what
    `antimatter generate` does per prompt.

    python benchmarks/cpu_generate.py --run runs/quickstart --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path

import torch

from antimatter.config import SampleConfig
from antimatter.eval.speed import measure_speed
from antimatter.generate_cli import complete, load_for_generation
from antimatter.provenance import provenance

PROMPTS = ["The future of artificial intelligence", "In the field of machine learning", "def main():"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/quickstart", help="a trained run folder (make quickstart makes one)")
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows (inductor's C++ build)")
    ap.add_argument("--json")
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        raise SystemExit(f"{run} has no checkpoints: train one first (make quickstart makes runs/quickstart)")
    device = torch.device("cpu")
    model, tokenizer, _ = load_for_generation(run, args.checkpoint, device)
    out: dict = {"provenance": provenance(device), "run": str(run), "threads": torch.get_num_threads(),
                 "params": model.num_params()}
    out["speed"] = measure_speed(model, prompt_tokens=64, new_tokens=args.new_tokens, batch_sizes=(1, 8),
                                 repeats=args.repeats, compile=not args.no_compile)
    s = SampleConfig(max_new_tokens=args.new_tokens)
    complete(model, tokenizer, PROMPTS[0], s, stream=io.StringIO())  # warm-up
    rows = []
    for prompt in PROMPTS:
        runs = [complete(model, tokenizer, prompt, s, stream=io.StringIO()) for _ in range(args.repeats)]
        rows.append({"prompt": prompt, "new_tokens": statistics.median(r["new_tokens"] for r in runs),
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs)})
    out["interactive"] = rows
    sp = out["speed"]["batches"]
    print(f"{out['provenance']['device']}, {out['threads']} threads, {out['params']:,} parameters")
    for b, r in sp.items():
        comp = r.get("compiled_decode_tokens_per_s")
        print(f"batch {b}: decode {r['decode_tokens_per_s']:,.0f} tokens/s"
              + (f", compiled {comp:,.0f}" if comp else "") + f", time to first token {r['time_to_first_token_s'] * 1000:.1f} ms"
              f" (prompt {out['speed']['prompt_tokens']})")
    for r in rows:
        print(f"interactive (sampling, streamed as text) '{r['prompt']}': {r['tokens_per_s']:,.0f} tokens/s "
              f"({r['new_tokens']:.0f} tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
