"""Where the GPU time goes: kernel tables of the compiled decode step and the compiled training step, and
micro-benchmarks of the attention kernels that dominate them. A diagnosis tool for training and decode speed, not a
side-by-side benchmark (those are train_throughput.py and decode_speed.py).

    python benchmarks/profile_kernels.py --part attn decode-attn gemv decode train --json out.json
    python benchmarks/profile_kernels.py --part triton decode --batches 1 --decode-path compiled kernels
    python benchmarks/profile_kernels.py --part attn-tune --batches 32 1   # what the attention tuner times
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from antimatter.config import preset_model
from antimatter.model import generate as gen
from antimatter.model.accel import attention_backend
from antimatter.model.decode import DecodeOptions
from antimatter.model.generate import generate
from antimatter.model.gpt import GPT
from antimatter.model.quantize import int8_copy
from antimatter.provenance import provenance


def kernel_table(prof, steps: int, top: int = 25) -> list[dict]:
    """Device time per kernel name, per step, largest first."""
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "cuda_time_total", 0)
        if dev_us <= 0 or e.key.startswith(("ProfilerStep", "cudaGraphLaunch", "Memcpy")):
            continue
        if getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
            continue
        rows.append({"kernel": e.key[:110], "us_per_step": dev_us / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:top]


def print_table(title: str, rows: list[dict], wall_us: float | None = None) -> None:
    total = sum(r["us_per_step"] for r in rows)
    print(f"\n== {title}: top kernels, device us per step (top-{len(rows)} sum {total:,.0f} us"
          + (f", wall {wall_us:,.0f} us/step" if wall_us else "") + ")")
    for r in rows:
        print(f"{r['us_per_step']:>10,.1f} {r['calls_per_step']:>6.1f}x  {r['kernel']}")


def profile_decode(preset: str, batch: int, new_tokens: int, weights: str = "bf16", path: str = "compiled",
                   options: DecodeOptions | None = None) -> dict:
    """Kernel table of the compiled decode step; `weights` int8: the blocks' Linears in weight-only int8;
    `path` kernels: batch-1 steps through model/triton_decoder.py instead of torch.compile's step."""
    from torch.profiler import ProfilerActivity, profile

    cfg = preset_model(preset)
    torch.manual_seed(0)
    model = GPT(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    if weights == "int8":
        model = int8_copy(model)
    prompts = torch.randint(0, cfg.vocab_size, (batch, 16)).tolist()
    kernels = path == "kernels"
    for _ in range(2):
        generate(model, prompts, new_tokens, compile=True, kernels=kernels, options=options)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompts, new_tokens, compile=True, kernels=kernels, options=options)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / new_tokens * 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, prompts, new_tokens, compile=True, kernels=kernels, options=options)
        torch.cuda.synchronize()
    rows = kernel_table(prof, new_tokens, top=30)
    all_rows = kernel_table(prof, new_tokens, top=10_000)
    gpu_us = sum(r["us_per_step"] for r in all_rows)
    n_kernels = sum(r["calls_per_step"] for r in all_rows)
    print_table(f"decode {preset} {weights} batch {batch} ({path})", rows, wall)
    print(f"decode {weights} {path} batch {batch}: wall {wall:.0f} us/token, kernel time {gpu_us:.0f} us/token, "
          f"{n_kernels:.0f} kernels/token", flush=True)
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"weights": weights, "path": path, "batch": batch, "wall_us_per_token": wall, "kernel_us_per_token": gpu_us,
            "kernels_per_token": n_kernels, "top": rows}


def profile_train(preset: str, micro_batch: int, seq: int, attn: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cfg = preset_model(preset)
    with attention_backend(attn):
        model = GPT(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        cmodel = torch.compile(model)
        x = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), device="cuda")

        def step(model=model, cmodel=cmodel, opt=opt):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cmodel(x[:, :-1], x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(4):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        wall = statistics.median(times) * 1e6
        steps = 3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    rows = kernel_table(prof, steps, top=25)
    print_table(f"train {preset} mb {micro_batch} seq {seq} attn {attn}", rows, wall)
    print(f"train attn {attn}: {micro_batch * seq / (wall / 1e6):,.0f} tokens/s")
    del step, model, opt, cmodel
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"attn": attn, "micro_batch": micro_batch, "wall_us_per_step": wall,
            "tokens_per_s": micro_batch * seq / (wall / 1e6), "top": rows}


def bench_attention() -> list[dict]:
    """SDPA forward+backward at the seed-300m training shape, per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    out = []
    B, H, T, D = 16, 16, 2048, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    flops_fwd = 4 * B * H * T * T * D / 2  # causal
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel([be]):
                fwd = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                bwd = do_bench(lambda y=y: torch.autograd.grad(y, (q, k, v), g, retain_graph=True),
                               return_mode="median")
            r = {"attn": name, "fwd_ms": fwd, "bwd_ms": bwd, "fwd_tflops": flops_fwd / fwd / 1e9,
                 "bwd_tflops": 2.5 * flops_fwd / bwd / 1e9}
        except Exception as e:  # a backend that cannot take these inputs says why
            r = {"attn": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        out.append(r)
        print(json.dumps(r), flush=True)

    return out


def bench_decode_attention() -> list[dict]:
    """Single-query attention over a masked cache (the decode step's shape): SDPA per kernel, plain reductions
    and FlexAttention (its split-KV decoding kernel), each compiled and timed as a CUDA graph."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench_cudagraph

    out = []
    for B, S in [(1, 256), (1, 512), (1, 2048), (32, 256), (32, 512), (32, 2048)]:
        qd = torch.randn(B, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
        kc, vc = (torch.randn(B, 16, S, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device="cuda")
        mask[..., : S // 2] = True

        def sdpa(q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

        def reduce_attn(q, k, v, m):
            s = (q.float() * k.float()).sum(-1, keepdim=True).transpose(-1, -2) * 0.125  # (B,H,1,S)
            p = s.masked_fill(~m, float("-inf")).softmax(-1)
            return (p.transpose(-1, -2) * v.float()).sum(-2, keepdim=True).to(q.dtype)

        def flex(q, k, v, m):
            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(m[b, 0, 0, kv_idx], score, -float("inf"))
            return flex_attention(q, k, v, score_mod=score_mod)

        ref = F.scaled_dot_product_attention(qd.float(), kc.float(), vc.float(), attn_mask=mask)
        kv_bytes = 2 * kc.numel() * 2
        variants = [("sdpa+mask default", sdpa, None), ("sdpa+mask cudnn", sdpa, SDPBackend.CUDNN_ATTENTION),
                    ("sdpa+mask efficient", sdpa, SDPBackend.EFFICIENT_ATTENTION),
                    ("reductions", reduce_attn, None), ("flex", flex, None)]
        for name, fn, backend in variants:
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    torch._dynamo.reset()
                    cfn = torch.compile(fn, fullgraph=True)
                    err = (cfn(qd, kc, vc, mask).float() - ref).abs().max().item()
                    us = do_bench_cudagraph(lambda cfn=cfn, a=(qd, kc, vc, mask): cfn(*a)) * 1000
                r = {"decode_attn": name, "batch": B, "cache": S, "us": us, "GB_per_s": kv_bytes / us / 1e3,
                     "max_err": err}
            except Exception as e:  # a kernel that cannot take these inputs says why
                r = {"decode_attn": name, "batch": B, "cache": S, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            out.append(r)
            print(json.dumps(r), flush=True)
    return out


def bench_gemv() -> list[dict]:
    """The decode step's matmuls at batch 1 and 32 (weights (N, K) bf16): cuBLAS (F.linear) vs inductor's
    Triton templates (max-autotune) vs a plain multiply-and-sum reduction compiled by inductor."""
    from triton.testing import do_bench_cudagraph

    out = []
    for M in (1, 32):
        for K, N in [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024), (1024, 50304)]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float(), b.float())
            def reduction(x, w, b):
                return ((x[:, None, :].float() * w.float()).sum(-1) + b.float()).to(x.dtype)

            fns = {"cublas": lambda x, w, b: F.linear(x, w, b)}
            if M == 1:
                fns["reduction"] = torch.compile(reduction)
                fns["reduction+cdt"] = torch.compile(reduction, options={"coordinate_descent_tuning": True})
            else:  # Triton matmul templates tuned for this shape (slow to compile: M=32 only)
                fns["max-autotune"] = torch.compile(lambda x, w, b: F.linear(x, w, b),
                                                    mode="max-autotune-no-cudagraphs")
            for name, fn in fns.items():
                try:
                    err = ((fn(x, w, b).float() - ref).norm() / ref.norm()).item()
                    us = do_bench_cudagraph(lambda fn=fn, a=(x, w, b): fn(*a)) * 1000
                    r = {"gemv": name, "M": M, "K": K, "N": N, "us": us, "GB_per_s": w.numel() * 2 / us / 1e3,
                         "rel_err": err}
                except Exception as e:
                    r = {"gemv": name, "M": M, "K": K, "N": N, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                out.append(r)
                print(json.dumps(r), flush=True)
    return out


def bench_triton_decode(preset: str, batch: int = 1) -> dict:
    """The Triton decode kernels alone (model/decode_kernels.py), each timed as CUDA-graph replays of all 24
    layers' instances back to back (no host launch time; weights stream from memory as in a real step): each
    matrix shape's block-shape candidates (us and GB/s), attention by split count at several cache fills, and
    the whole step."""
    from antimatter.model.triton_decoder import TritonDecoder, graph_time_us  # here: Triton is optional

    cfg = preset_model(preset)
    torch.manual_seed(0)
    model = GPT(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    model.setup_caches(batch, cfg.block_size)
    dec = TritonDecoder(model, sample=lambda logits, seen: logits.argmax(-1))
    dec.refresh()
    out: dict = {"batch": batch, "matvec": []}
    report = dec.tune()
    out["in_step"] = {k: r for k, r in report.items() if r["kind"] == "step"}
    for sig, r in report.items():
        if r["kind"] != "matrix":  # attention is timed below; the in-step picks are printed after the matrices
            continue
        _, n, k, _, act, *_ = r["signature"]  # (M, N, K, norm, act, bias, residual)
        nbytes = n * k * 2 * (2 if act == 2 else 1)
        best_us = r["us"][str(r["best"])]
        row = {"signature": sig, "best": r["best"], "us": best_us, "gb_s": nbytes / best_us / 1e3,
               "candidates_us": r["us"]}
        out["matvec"].append(row)
        print(f"matvec {sig}: best {r['best']} {best_us:.2f} us = {row['gb_s']:,.0f} GB/s; "
              + ", ".join(f"{c} {t:.2f}" for c, t in r["us"].items()), flush=True)
    for sig, r in out["in_step"].items():
        print(f"{sig} (whole steps): best {r['best']}; " + ", ".join(f"{c} {t:.1f}" for c, t in r["us"].items()),
              flush=True)
    attns = [b.attn for b in model.transformer.h]
    out["attention"] = []
    for block_s in (64, 128, 256):  # cache slots a program reads per iteration
        dec.attn_block, dec.attn_warps = block_s, 4 if block_s <= 128 else 8
        for fill in (272, 1024, 2000):
            for splits in (1, 2, 4, 8, 16):  # every layer's attention (+ combine) back to back in one CUDA graph
                dec.splits = splits
                dec.pos.fill_(fill)
                us = graph_time_us(lambda: [dec.attend(a) for a in attns]) / len(attns)
                out["attention"].append({"block_s": block_s, "fill": fill, "splits": splits, "us_per_layer": us})
                print(f"attention block {block_s} fill {fill} splits {splits}: {us:.2f} us per layer", flush=True)
    dec.start(torch.ones(batch, dtype=torch.long, device="cuda"), 272, torch.zeros_like(dec.seen))
    dec.tune_attention(torch.cuda.get_device_name())  # for the step below, from the position it starts at
    dec.capture()
    runs = []
    for _ in range(5):  # 200 replays from cache fill 272 (the graph advances the position itself)
        dec.pos.fill_(272)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            dec.graph.replay()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) * 1000 / 200)
    us = statistics.median(runs)
    out["step_us"] = us
    print(f"whole step at batch {batch} (graph replays, cache fill 272-472, attention: {dec.splits} splits of "
          f"{dec.attn_block}-slot blocks, {dec.attn_warps} warps): "
          f"{us:.1f} us = {batch * 1e6 / us:,.0f} tokens/s", flush=True)
    return out


def bench_attention_tuning(preset: str, batch: int, prompt: int = 16, new_tokens: int = 256) -> dict:
    """What `TritonDecoder.tune_attention` measures, alone: each of ATTN_CONFIGS at the fill it tunes for
    in `generate`'s cache for this prompt and length (the matrices keep their untuned first block shape)."""
    from antimatter.model.triton_decoder import TritonDecoder  # here: Triton is optional

    cfg = preset_model(preset)
    torch.manual_seed(0)
    model = GPT(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    max_seq = gen.compiled_cache_slots(prompt + new_tokens, cfg.block_size)
    model.setup_caches(batch, max_seq)
    dec = TritonDecoder(model, sample=lambda logits, seen: logits.argmax(-1))
    dec.refresh()
    dec.pos.fill_(prompt)
    report = dec.tune_attention(torch.cuda.get_device_name())["attention"]
    print(f"attention tuning, batch {batch}, cache {max_seq}, fill {report['fill']}: best {report['best']}; "
          + ", ".join(f"{c} {t:.2f} us" for c, t in report["us"].items()), flush=True)
    return {"batch": batch, "max_seq": max_seq, **report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", default=["attn", "decode", "train"])
    ap.add_argument("--config", default="seed-300m")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--attn", nargs="+", default=["flash", "cudnn"])
    ap.add_argument("--decode-weights", nargs="+", default=["bf16"], choices=["bf16", "int8"],
                    help="decode profile of the bf16 model and/or its weight-only int8 copy (torchao)")
    ap.add_argument("--cd-tuning", action="store_true", help="decode profile with coordinate-descent tuning")
    ap.add_argument("--decode-path", nargs="+", default=["compiled"], choices=["compiled", "kernels"],
                    help="decode profile of torch.compile's step and/or the Triton kernels")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this tool needs a CUDA GPU")
    options = DecodeOptions(coordinate_descent=args.cd_tuning)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._inductor.config.fx_graph_cache = False
    res: dict = {"provenance": provenance("cuda"), "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def dump():  # also after every decode profile, so a run cut at its time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)

    if "attn" in args.part:
        res["attention"] = bench_attention()
    if "decode-attn" in args.part:
        res["decode_attention"] = bench_decode_attention()
    if "gemv" in args.part:
        res["gemv"] = bench_gemv()
    if "attn-tune" in args.part:
        res["attention_tuning"] = []
        for b in args.batches:
            res["attention_tuning"].append(bench_attention_tuning(args.config, b))
            dump()
    if "triton" in args.part:
        res["triton"] = []
        for b in args.batches:
            res["triton"].append(bench_triton_decode(args.config, b))
            dump()
    if "decode" in args.part:
        res["decode"] = []
        for path in args.decode_path:
            for w in args.decode_weights:
                for b in args.batches:
                    if path == "kernels" and w != "bf16":
                        continue
                    res["decode"].append(profile_decode(args.config, b, args.new_tokens, w, path, options))
                    dump()
    if "train" in args.part:
        res["train"] = [profile_train(args.config, args.micro_batch, args.seq, a) for a in args.attn]
    dump()


if __name__ == "__main__":
    main()
