"""Training throughput, side by side in ONE process: AntiMatter's model vs nanoGPT's `model.py` and
transformers' GPT2LMHeadModel.

Same shape, same batch in tokens, bf16 autocast, torch.compile, fused AdamW, gradient clipping, no
accumulation; median of synchronised step times after warm-up. MFU is reported against the GPU's datasheet
peak (antimatter.model.sizing) and against a bf16 matmul rate measured in the same run. AntiMatter also runs
with the modern recipe's blocks (`--recipe modern`) and with Muon + AdamW (`--optimizer muon`), to show what
each costs per step at the same shape.

nanoGPT is not a dependency: its `model.py` at a pinned commit sits in a git-ignored folder (NANOGPT_HINT).

    python benchmarks/train_throughput.py --config seed-300m --micro-batch 16 32
    python benchmarks/train_throughput.py --config seed-300m --impl nanogpt transformers antimatter \
        --recipe gpt2 modern --optimizer adamw muon --json out.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from antimatter.config import RECIPES, TrainConfig, preset_model
from antimatter.model.accel import attention_backend, enable_fp8_training, prefers_cudnn_attention
from antimatter.model.gpt import GPT
from antimatter.model.sizing import flops_per_token, peak_flops
from antimatter.provenance import provenance
from antimatter.train.optim import build_optimizers

NANOGPT_COMMIT = "93a43d9a5c22450bbf06e78da2cb6eeef084b717"  # karpathy/nanoGPT; model.py unchanged since
NANOGPT_MODEL = Path(__file__).parent / "peers" / "nanogpt" / "model.py"
NANOGPT_HINT = (f"git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT && git -C /tmp/nanoGPT checkout "
                f"{NANOGPT_COMMIT[:8]} && mkdir -p {NANOGPT_MODEL.parent} && cp /tmp/nanoGPT/model.py {NANOGPT_MODEL}")
SEQ = {"seed-1.3b": 2048, "seed-300m": 2048, "gpt2-124m": 1024, "tiny": 64, "quickstart": 128}


def measured_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


@dataclass(frozen=True)
class Variant:
    """One row of the table: which implementation, and for AntiMatter which of its settings."""

    impl: str  # antimatter | nanogpt | transformers
    recipe: str = "gpt2"  # AntiMatter's blocks: gpt2 (the peers' shape) or modern
    optimizer: str = "adamw"  # AntiMatter: adamw, or muon (Muon for the blocks' matrices + AdamW)
    loss_chunk: int = 0
    attn: str = "auto"
    fp8: bool = False
    compile_mode: str = "default"
    ce_pad: str = "mask"


SETTINGS = [f.name for f in fields(Variant)] + ["micro_batch", "grad_accum"]  # what makes two rows different


def load_nanogpt(path: Path):
    if not path.is_file():
        sys.exit(f"nanoGPT's model.py is not at {path}: {NANOGPT_HINT}")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(v: Variant, preset: str, seq: int, nanogpt_path: Path):
    """(model config, model on the GPU, optimizers). Peers get nanoGPT's fused AdamW (decay on matrices)."""
    cfg = preset_model(preset, recipe=v.recipe if v.impl == "antimatter" else "gpt2")
    if v.impl == "antimatter":
        model = GPT(cfg).cuda()
        model.loss_chunk_tokens = v.loss_chunk
        model.ce_padding = v.ce_pad
        if v.fp8:
            enable_fp8_training(model)
        train = TrainConfig(**{**RECIPES[v.recipe]["train"], "optimizer": v.optimizer})
        return cfg, model, build_optimizers(model, train, "cuda")
    if v.impl == "nanogpt":
        nano = load_nanogpt(nanogpt_path)
        # nanoGPT's own vocabulary padding (50,304), AntiMatter's pads to the same; biases as GPT-2's
        model = nano.GPT(nano.GPTConfig(block_size=seq, vocab_size=cfg.padded_vocab_size, n_layer=cfg.n_layer,
                                        n_head=cfg.n_head, n_embd=cfg.d_model, dropout=0.0, bias=cfg.bias))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, tie_word_embeddings=True)
        hf_cfg._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(hf_cfg)
    model = model.cuda()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=True)
    return cfg, model, [opt]


def loss_fn(impl: str, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if impl == "antimatter":
        return model(x, y)
    if impl == "nanogpt":
        return model(x, y)[1]
    return model(input_ids=x, labels=x, use_cache=False).loss


def bench(v: Variant, preset: str, micro_batch: int, steps: int, warmup: int, nanogpt_path: Path,
          accum: int = 1) -> dict:
    label = v.attn  # the kernel that train.attention=auto picks here (for every impl: same SDPA kernel), for the table
    if v.attn == "auto":
        label = "cudnn" if prefers_cudnn_attention() else "sdpa-default"
    mode, *extras = v.compile_mode.split("+")
    # +cdt: inductor's coordinate-descent tuning of the generated kernels (gpt-fast's setting)
    tuning = torch._inductor.config.patch(coordinate_descent_tuning="cdt" in extras)
    row = {**asdict(v), "attn": label, "preset": preset, "micro_batch": micro_batch, "grad_accum": accum,
           "seq": SEQ[preset]}
    if v.impl != "antimatter":
        row.update(recipe=None, optimizer="adamw", loss_chunk=None, fp8=False, ce_pad=None)
    with attention_backend(v.attn), tuning:
        return {**row, **_bench(v, preset, micro_batch, steps, warmup, None if mode == "default" else mode,
                                nanogpt_path, accum)}


def _bench(v: Variant, preset: str, micro_batch: int, steps: int, warmup: int, compile_mode: str | None,
           nanogpt_path: Path, accum: int) -> dict:
    seq = SEQ[preset]
    cfg, model, optimizers = build(v, preset, seq, nanogpt_path)
    cmodel = torch.compile(model, mode=compile_mode) if compile_mode != "none" else model
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = [torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), device="cuda", generator=g)
              for _ in range(4)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]  # as a data loader gives them
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    t_compile = time.perf_counter()
    try:
        for i in range(warmup + steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for k in range(accum):  # the optimizer steps once per `accum` micro-batches, as the trainer's does
                x, y = batches[(i * accum + k) % len(batches)]
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn(v.impl, cmodel, x, y) / accum
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            end.record()
            if i == warmup - 1:
                torch.cuda.synchronize()
                t_compile = time.perf_counter() - t_compile
            if i >= warmup:
                times.append((start, end))
                losses.append(loss.detach())
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        del model, cmodel, optimizers
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        return {"oom": True}
    med = statistics.median(s.elapsed_time(e) for s, e in times) / 1000
    tps = micro_batch * seq * accum / med
    result = {"params": sum(p.numel() for p in model.parameters()), "median_step_s": med, "tokens_per_s": tps,
              "achieved_tflops": tps * flops_per_token(cfg, seq) / 1e12,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": t_compile,
              "final_loss": float(losses[-1]), "oom": False}
    del model, cmodel, optimizers, batches, tokens
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def variants(args, impl: str) -> list[Variant]:
    if impl != "antimatter":
        return [Variant(impl, attn=a, compile_mode=args.compile_mode[0]) for a in args.attn]
    return [Variant(impl, r, o, c, a, bool(f), m, p) for r in args.recipe for o in args.optimizer
            for c in args.loss_chunk for a in args.attn for f in args.fp8 for m in args.compile_mode
            for p in args.ce_pad]


def micro_batches(spec: list[str], v: Variant) -> list[int]:
    """The micro-batches to time for `v`: entries "N" apply to every variant, "KEY=N" to one impl or one of
    AntiMatter's recipes (each impl at its best micro-batch: what fits differs), the most specific key wins."""
    keyed: dict[str, list[int]] = {}
    for item in spec:
        key, _, n = item.rpartition("=")
        if not n.isdigit():
            sys.exit(f"--micro-batch {item}: give N or KEY=N (KEY: an impl or a recipe), e.g. 32 or nanogpt=24")
        keyed.setdefault(key, []).append(int(n))
    for key in ((v.recipe,) if v.impl == "antimatter" else ()) + (v.impl, ""):
        if key in keyed:
            return keyed[key]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-300m", choices=sorted(SEQ))
    ap.add_argument("--micro-batch", nargs="+", default=["16"],
                    help="N for every variant, or KEY=N for one impl or recipe: nanogpt=24 antimatter=32 modern=16")
    ap.add_argument("--impl", nargs="+", default=["transformers", "antimatter"],
                    choices=["nanogpt", "transformers", "antimatter"],
                    help="peers run first, so no setting of ours can leak into their measurement")
    ap.add_argument("--nanogpt", type=Path, default=NANOGPT_MODEL, help="nanoGPT's model.py")
    ap.add_argument("--recipe", nargs="+", default=["gpt2"], choices=sorted(RECIPES),
                    help="AntiMatter's blocks: gpt2 (the peers' shape) and/or modern")
    ap.add_argument("--optimizer", nargs="+", default=["adamw"], choices=["adamw", "muon"],
                    help="AntiMatter's optimizers: adamw, muon (Muon for the blocks' matrices + AdamW)")
    ap.add_argument("--loss-chunk", type=int, nargs="+", default=[0],
                    help="AntiMatter cross-entropy chunk sizes in tokens to try (0 = one piece)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (the trainer's accumulation: what an optimizer's cost is "
                         "spread over)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile-mode", nargs="+", default=["default"],
                    help="torch.compile modes to try: default | max-autotune-no-cudagraphs | none, each optionally "
                         "+cdt (inductor's coordinate-descent tuning of its generated kernels)")
    ap.add_argument("--attn", nargs="+", default=["auto"], help="AntiMatter attention backends to try: auto (the trainer's default) flash cudnn")
    ap.add_argument("--fp8", nargs="+", type=int, default=[0], help="AntiMatter fp8 settings to try (0 1)")
    ap.add_argument("--ce-pad", nargs="+", default=["mask"], choices=["mask", "slice"],
                    help="how AntiMatter's loss leaves out the vocabulary padding: -inf mask (default) or slice")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    if 1 in args.fp8 and importlib.util.find_spec("torchao") is None:  # before minutes of the other rows
        sys.exit("--fp8 1 needs torchao in this Python: pip install torchao (or leave out --fp8 1)")
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    if "nanogpt" in args.impl:
        load_nanogpt(args.nanogpt)  # a missing file stops here, before any GPU time is spent
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # every variant compiles from scratch: a cached graph from another variant (e.g. another attention
    # kernel) must not be reused, and the warm-up time reported is the real one
    torch._inductor.config.fx_graph_cache = False
    device = torch.cuda.get_device_name()
    measured = measured_matmul_tflops()
    datasheet = (peak_flops(device, "bf16") or float("nan")) / 1e12
    print(f"device {device}; bf16 matmul measured {measured:.0f} TFLOP/s, datasheet {datasheet:.0f}", flush=True)
    order = sorted(args.impl, key=lambda i: i == "antimatter")  # peers first
    results = []
    for impl in order:
        for v in variants(args, impl):
            for mb in micro_batches(args.micro_batch, v):
                r = bench(v, args.config, mb, args.steps, args.warmup, args.nanogpt, args.grad_accum)
                if not r["oom"]:
                    r["mfu_measured_peak"] = r["achieved_tflops"] / measured
                    r["mfu_datasheet"] = r["achieved_tflops"] / datasheet
                results.append(r)
                print(json.dumps(r), flush=True)
                dump(args.json, measured, datasheet, results)  # after every row: a run cut short keeps them
    print(f"\n{args.config}, seq {SEQ[args.config]}, {args.grad_accum} micro-batch(es) a step, bf16 autocast, "
          f"compiled, median of {args.steps} steps, {device}")
    print_table(results)
    dump(args.json, measured, datasheet, results)


def describe(r: dict) -> str:
    if r["impl"] != "antimatter":
        return f"{r['impl']} (adamw) {r['attn']}"
    extras = [f"chunk {r['loss_chunk']}" if r["loss_chunk"] else "", "fp8" if r["fp8"] else "",
              f"ce-pad {r['ce_pad']}" if r["ce_pad"] != "mask" else "", r["attn"], r["compile_mode"]]
    return f"antimatter {r['recipe']} ({r['optimizer']}) " + " ".join(e for e in extras if e)


def print_table(results: list[dict]) -> None:
    """Each row, then each AntiMatter row as a ratio to each peer's best micro-batch."""
    print(f"{'variant':<58}{'mb':>4}{'tokens/s':>11}{'MFU(meas)':>11}{'MFU(sheet)':>11}{'peak GiB':>10}{'compile s':>10}")
    for r in results:
        if r["oom"]:
            print(f"{describe(r):<58}{r['micro_batch']:>4}{'out of memory':>15}")
            continue
        print(f"{describe(r):<58}{r['micro_batch']:>4}{r['tokens_per_s']:>11,.0f}{r['mfu_measured_peak']:>11.1%}"
              f"{r['mfu_datasheet']:>11.1%}{r['peak_mem_gib']:>10.1f}{r['warmup_s']:>10.1f}")
    ok = [r for r in results if not r["oom"]]
    ours = [r for r in ok if r["impl"] == "antimatter"]
    for peer in ("nanogpt", "transformers"):
        theirs = [r for r in ok if r["impl"] == peer]
        if not theirs or not ours:
            continue
        best = max(theirs, key=lambda r: r["tokens_per_s"])
        print(f"against {peer}'s best ({best['tokens_per_s']:,.0f} tokens/s at micro-batch {best['micro_batch']}):")
        for r in ours:
            print(f"  {describe(r)}, mb {r['micro_batch']}: {r['tokens_per_s'] / best['tokens_per_s']:.3f}x")
    def same_but_optimizer(r: dict) -> tuple:
        return tuple(v for k, v in r.items() if k in SETTINGS and k != "optimizer")

    adamw = {same_but_optimizer(r): r for r in ours if r["optimizer"] == "adamw"}
    for r in ours:
        base = adamw.get(same_but_optimizer(r))
        if r["optimizer"] == "muon" and base:
            print(f"Muon's step cost, {describe(r)}, mb {r['micro_batch']}: "
                  f"{r['median_step_s'] / base['median_step_s'] - 1:+.1%} against AdamW's")


def dump(path: str | None, measured: float, datasheet: float, results: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"provenance": provenance("cuda"), "nanogpt_commit": NANOGPT_COMMIT, "measured_bf16_tflops": measured,
                       "datasheet_bf16_tflops": datasheet, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
