"""GPU checks of the trainer (run with the device tool; the figures in docs/TRAINING.md come from here).

    python benchmarks/train_gpu_checks.py resume     # 1 GPU: fp16+scaler and bf16, 20 steps + resume to 30
                                                    #        vs 30 straight (quickstart model)
    python benchmarks/train_gpu_checks.py ckpt       # 1 GPU: seed-300m bf16 compiled, 40 steps; checkpoint
                                                    #        size, save / verify / load times
    python benchmarks/train_gpu_checks.py multi      # 2 GPUs: 1 process vs DDP vs FSDP2 (+compile +AC),
                                                    #        the same global batch

Random tokens: these check mechanics and time, not learning. Results go to $OUT/train_gpu_checks.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from antimatter import checkpoint as ck
from antimatter.config import config_from_dict, save_config
from antimatter.provenance import provenance
from antimatter.tokens import write_shard

BASE = Path("/tmp/am_train_checks")


def make_tokens(run: Path, vocab: int, n_train: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", max(n_train // 20, 10_000))):
        (run / "tokens" / split).mkdir(parents=True, exist_ok=True)
        write_shard(run / "tokens" / split / "00000.bin", rng.integers(0, vocab, n).astype(np.uint16), vocab, 0)
    (run / "tokens" / "meta.json").write_text(json.dumps({"vocab_size": vocab, "eot_id": 0}))


def train_cli(name: str, model: str, train: dict, *extra: str, nproc: int = 1, vocab: int = 4096,
              n_tokens: int = 2_000_000, fresh: bool = True) -> dict[int, float]:
    """`antimatter train` in a subprocess (torchrun when nproc > 1); returns step -> logged loss."""
    run = BASE / name
    if fresh:
        shutil.rmtree(run, ignore_errors=True)
        make_tokens(run, vocab, n_tokens)
    cfg = config_from_dict({"name": name, "runs_dir": str(BASE), "model": model, "train": train})
    path = run / "cfg.yaml"
    save_config(cfg, path)
    cmd = [sys.executable, "-m", "antimatter.cli", "train", "--config", str(path), *extra]
    if nproc > 1:
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(f"--- {name} {' '.join(extra)} rc={r.returncode} {time.time() - t0:.1f}s")
    print("\n".join(x for x in (r.stderr + r.stdout).splitlines() if "step/s" not in x)[-2500:])
    lines = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def small(dtype: str, steps: int, **kw) -> dict:
    return dict(dtype=dtype, micro_batch_size=16, max_steps=steps, warmup_steps=5, log_interval=5,
                eval_interval=10, eval_steps=4, ckpt_interval=10, tensorboard=False, **kw)


def check_resume(res: dict) -> None:
    for dtype in ("fp16", "bf16"):
        train_cli(f"resumed_{dtype}", "quickstart", small(dtype, 30, stop_step=20))  # same schedule, stop early
        resumed = train_cli(f"resumed_{dtype}", "quickstart", small(dtype, 30), "--resume", "auto", fresh=False)
        straight = train_cli(f"straight_{dtype}", "quickstart", small(dtype, 30))
        diff = max(abs(resumed[s] - straight[s]) for s in straight)
        res[f"resume_{dtype}"] = {"resumed": resumed, "straight": straight, "max_abs_diff": diff}
        print(dtype, "max |resumed - straight| =", diff)


def check_ckpt(res: dict) -> None:
    train = dict(dtype="bf16", micro_batch_size=16, max_steps=40, warmup_steps=5, log_interval=10,
                 eval_interval=40, eval_steps=2, ckpt_interval=40, tensorboard=False, compile=True)
    train_cli("seed300m", "seed-300m", train, vocab=50257, n_tokens=8_000_000)
    run = BASE / "seed300m"
    res["seed300m_metrics"] = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    d = ck.find_resume(run / "checkpoints")
    sizes = {f.name: f.stat().st_size for f in d.iterdir()}
    t = time.time()
    ck.verify_checkpoint(d)
    verify_s = time.time() - t
    t = time.time()
    ck.load_model(d, device="cuda")
    torch.cuda.synchronize()
    load_s = time.time() - t
    t = time.time()
    ck.load_train_state(d, verify=False)
    state_s = time.time() - t
    saves = [x for x in (run / "logs" / "train.log").read_text().splitlines() if "checkpoint " in x]
    res["seed300m_ckpt"] = {"sizes": sizes, "total_gb": sum(sizes.values()) / 1e9, "verify_s": verify_s,
                            "load_model_cuda_s_incl_verify": load_s, "load_state_s": state_s, "save_log": saves}
    print(json.dumps(res["seed300m_ckpt"], indent=1))


def check_multi(res: dict) -> None:
    gb = dict(global_batch_tokens=16 * 128 * 4)
    single = train_cli("single", "quickstart", small("bf16", 20, **gb))
    runs = {"ddp": small("bf16", 20, **gb),
            "fsdp": small("bf16", 20, parallel="fsdp", **gb),
            "fsdp_compile_ac": small("bf16", 20, parallel="fsdp", compile=True, activation_checkpointing=True, **gb)}
    for name, train in runs.items():
        losses = train_cli(name, "quickstart", train, nproc=2)
        diff = max(abs(losses[s] - single[s]) for s in single)
        res[f"multi_{name}"] = {"losses": losses, "single": single, "max_abs_diff": diff}
        print(name, "max |loss - single| =", diff)


def main() -> None:
    which = sys.argv[1:] or ["resume", "ckpt"]
    res: dict = {"provenance": provenance("cuda")}
    for name in which:
        {"resume": check_resume, "ckpt": check_ckpt, "multi": check_multi}[name](res)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_gpu_checks.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
