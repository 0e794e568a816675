"""How long `load_model` (what eval, generate, export and the REPL start with) takes for a run's checkpoint:
verify the manifest, build the model, load the weights. Each repeat is a fresh process, so nothing is cached in
Python; the first may find the checkpoint's files outside the operating system's file cache.

    python benchmarks/load_checkpoint.py --run runs/seed-300m-modern --repeat 3 [--json load.json]

Run it at two commits (e.g. a `git worktree` of each, PYTHONPATH=its src) for a before/after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, time, torch
torch.set_num_threads({threads})
t = time.perf_counter()
from antimatter.checkpoint import load_model
t_import = time.perf_counter() - t
t = time.perf_counter()
model, cfg, ckpt = load_model(sys.argv[1], "latest", sys.argv[2])
if sys.argv[2].startswith("cuda"):
    torch.cuda.synchronize()
print(t_import, time.perf_counter() - t, sum(p.numel() for p in model.parameters()), ckpt)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="run folder (or checkpoint folder)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    code = CHILD.format(threads=args.threads or "torch.get_num_threads()")
    runs = []
    for i in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", code, str(args.run), args.device], capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise SystemExit(f"load_checkpoint: load_model failed: {out.stderr.strip().splitlines()[-1]}")
        t_import, t_load, params, ckpt = out.stdout.split()
        runs.append({"import_s": round(float(t_import), 3), "load_model_s": round(float(t_load), 3)})
        print(f"{i + 1}: load_model {float(t_load):.2f} s ({int(params):,} parameters, {ckpt}); "
              f"import {float(t_import):.2f} s")
    from antimatter.provenance import provenance

    result = {"run": str(args.run), "device": args.device, "runs": runs,
              "best_load_model_s": min(r["load_model_s"] for r in runs), "provenance": provenance()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(f"best of {args.repeat}: {result['best_load_model_s']:.2f} s")


if __name__ == "__main__":
    main()
