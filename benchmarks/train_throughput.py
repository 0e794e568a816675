"""Training throughput, side by side in ONE process: AntiMatter's model vs transformers' GPT2LMHeadModel.

Same shape, same batch in tokens, bf16 autocast, torch.compile, fused AdamW, gradient clipping, no
accumulation; median of synchronised step times after warm-up. MFU is reported against the GPU's datasheet
peak (antimatter.model.sizing) and against a bf16 matmul rate measured in the same run.

    python benchmarks/train_throughput.py --config seed-300m --micro-batch 16 32
    python benchmarks/train_throughput.py --config gpt2-124m --micro-batch 64 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from antimatter.config import preset_model
from antimatter.model.accel import attention_backend, enable_fp8_training, prefers_cudnn_attention
from antimatter.model.gpt import GPT
from antimatter.model.sizing import flops_per_token, peak_flops
from antimatter.provenance import provenance

SEQ = {"seed-300m": 2048, "gpt2-124m": 1024, "tiny": 64, "quickstart": 128}


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


def build(impl: str, preset: str, seq: int, loss_chunk: int, fp8: bool = False, ce_pad: str = "mask"):
    cfg = preset_model(preset)
    if impl == "antimatter":
        model = GPT(cfg).cuda()
        model.loss_chunk_tokens = loss_chunk
        model.ce_padding = ce_pad
        if fp8:
            enable_fp8_training(model)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, tie_word_embeddings=True)
        hf_cfg._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(hf_cfg)
    return cfg, model.cuda()


def loss_fn(impl: str, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if impl == "antimatter":
        return model(x, y)
    return model(input_ids=x, labels=x, use_cache=False).loss


def bench(impl: str, preset: str, micro_batch: int, steps: int, warmup: int, loss_chunk: int,
          compile_mode: str, attn: str = "auto", fp8: bool = False, ce_pad: str = "mask") -> dict:
    seq = SEQ[preset]
    label = attn  # the kernel that the trainer's train.attention=auto picks here, for the table
    if attn == "auto" and impl == "antimatter":
        label = "cudnn" if prefers_cudnn_attention() else "sdpa-default"
    mode, *extras = compile_mode.split("+")
    # +cdt: inductor's coordinate-descent tuning of the generated kernels (gpt-fast's setting)
    tuning = torch._inductor.config.patch(coordinate_descent_tuning="cdt" in extras)
    with attention_backend(attn), tuning:
        r = _bench(impl, preset, micro_batch, steps, warmup, loss_chunk, None if mode == "default" else mode,
                   label, fp8, seq, ce_pad)
    r["ce_pad"] = ce_pad if impl == "antimatter" else None
    r["compile"] = compile_mode
    return r


def _bench(impl, preset, micro_batch, steps, warmup, loss_chunk, compile_mode, attn, fp8, seq,
           ce_pad: str = "mask") -> dict:
    cfg, model = build(impl, preset, seq, loss_chunk, fp8, ce_pad)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=True)
    cmodel = torch.compile(model, mode=compile_mode) if compile_mode != "none" else model
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), device="cuda", generator=g)
               for _ in range(4)]
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    t_compile = time.perf_counter()
    try:
        for i in range(warmup + steps):
            b = batches[i % len(batches)]
            x, y = b[:, :-1], b[:, 1:]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(impl, cmodel, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
        del model, cmodel, opt
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        return {"impl": impl, "preset": preset, "micro_batch": micro_batch, "seq": seq, "oom": True,
                "attn": attn, "fp8": fp8, "loss_chunk": loss_chunk}
    ms = [s.elapsed_time(e) for s, e in times]
    med = statistics.median(ms) / 1000
    tps = micro_batch * seq / med
    fpt = flops_per_token(cfg, seq)
    result = {"impl": impl, "preset": preset, "micro_batch": micro_batch, "seq": seq, "loss_chunk": loss_chunk,
              "attn": attn, "fp8": fp8,
              "compile": compile_mode, "median_step_s": med, "tokens_per_s": tps, "achieved_tflops": tps * fpt / 1e12,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": t_compile,
              "final_loss": float(losses[-1]), "oom": False}
    del model, cmodel, opt, batches
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-300m", choices=sorted(SEQ))
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[16])
    ap.add_argument("--impl", nargs="+", default=["transformers", "antimatter"],
                    help="the peer runs first, so no setting of ours can leak into its measurement")
    ap.add_argument("--loss-chunk", type=int, nargs="+", default=[0],
                    help="AntiMatter cross-entropy chunk sizes in tokens to try (0 = one piece)")
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
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # every variant compiles from scratch: a cached graph from another variant (e.g. another attention
    # kernel) must not be reused, and the warm-up time reported is the real one
    torch._inductor.config.fx_graph_cache = False
    modes = args.compile_mode
    device = torch.cuda.get_device_name()
    measured = measured_matmul_tflops()
    datasheet = (peak_flops(device, "bf16") or float("nan")) / 1e12
    print(f"device {device}; bf16 matmul measured {measured:.0f} TFLOP/s, datasheet {datasheet:.0f}", flush=True)
    results = []
    for mb in args.micro_batch:
        for impl in args.impl:
            variants = [(c, a, f, m, p) for c in args.loss_chunk for a in args.attn for f in args.fp8 for m in modes
                        for p in args.ce_pad]
            for chunk, attn, fp8, mode, pad in (variants if impl == "antimatter"
                                                else [(0, "auto", 0, modes[0], "mask")]):
                r = bench(impl, args.config, mb, args.steps, args.warmup, chunk, mode, attn, bool(fp8), pad)
                if not r["oom"]:
                    r["mfu_measured_peak"] = r["achieved_tflops"] / measured
                    r["mfu_datasheet"] = r["achieved_tflops"] / datasheet
                results.append(r)
                print(json.dumps(r), flush=True)
                dump(args.json, measured, datasheet, results)  # after every row: a run cut short keeps them
    print(f"\n{args.config}, seq {SEQ[args.config]}, bf16 autocast, compiled, fused AdamW, median of "
          f"{args.steps} steps, {device}")
    print(f"{'impl':<13}{'mb':>4}{'chunk':>7}{'attn':>7}{'fp8':>5}{'mode':>14}{'ce pad':>7}{'tokens/s':>11}"
          f"{'MFU(meas)':>11}{'MFU(sheet)':>11}{'peak GiB':>10}")
    for r in results:
        if r["oom"]:
            print(f"{r['impl']:<13}{r['micro_batch']:>4}{r['loss_chunk']:>7}{r['attn']:>7}{r['fp8']:>5}"
                  f"{'out of memory':>11}")
            continue
        print(f"{r['impl']:<13}{r['micro_batch']:>4}{r['loss_chunk']:>7}{r['attn']:>7}{r['fp8']:>5}"
              f"{r['compile'][:14]:>14}{str(r.get('ce_pad') or '-'):>7}{r['tokens_per_s']:>11,.0f}"
              f"{r['mfu_measured_peak']:>11.1%}{r['mfu_datasheet']:>11.1%}{r['peak_mem_gib']:>10.1f}")
    ok = [r for r in results if not r["oom"]]
    hf = [r for r in ok if r["impl"] == "transformers"]
    ours = [r for r in ok if r["impl"] == "antimatter"]
    if hf and ours:
        best_hf, best_ours = max(hf, key=lambda r: r["tokens_per_s"]), max(ours, key=lambda r: r["tokens_per_s"])
        print(f"ratio AntiMatter best / transformers best: {best_ours['tokens_per_s'] / best_hf['tokens_per_s']:.2f}x")
        for r in ours:
            same = [h for h in hf if h["micro_batch"] == r["micro_batch"]]
            if same:
                print(f"  mb {r['micro_batch']} chunk {r['loss_chunk']} attn {r['attn']} fp8 {r['fp8']} "
                      f"ce pad {r['ce_pad']}: "
                      f"{r['tokens_per_s'] / same[0]['tokens_per_s']:.2f}x transformers at the same micro-batch")
    dump(args.json, measured, datasheet, results)


def dump(path: str | None, measured: float, datasheet: float, results: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"provenance": provenance("cuda"), "measured_bf16_tflops": measured,
                       "datasheet_bf16_tflops": datasheet, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
