"""Generation speed, side by side in ONE process: AntiMatter (eager and compiled with CUDA graphs) vs
transformers' `generate` (default cache, and static cache which compiles its decode step), same shape and
weights (random bf16), greedy, prompt 16 tokens, 256 new tokens, batch 1 and batch 32, and the time to first
token of a 2,000-token prompt. MBU = bytes read per decode step (weights + KV cache) x steps/s over the
device-to-device copy bandwidth measured in the same run.

    python benchmarks/decode_speed.py --config seed-300m --json out.json
    python benchmarks/decode_speed.py --config configs/recipes/seed-300m-modern.yaml --skip-hf --compile-modes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from antimatter.config import load_config, preset_model
from antimatter.model.decode import DecodeOptions, DecodeTuning
from antimatter.model.generate import generate
from antimatter.model.gpt import GPT
from antimatter.model.quantize import int8_copy, is_int8
from antimatter.provenance import provenance


def measured_bandwidth_tbs(nbytes: int = 2 << 30) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (time.perf_counter() - t0) / 1e12  # bytes read + written


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def teacher_forced_check(model: GPT, prompts: list[list[int]], out: list[list[int]]) -> dict:
    """Score generated tokens against ONE plain forward (no cache, causal SDPA) over prompt + generated
    tokens. `agreement`: share equal to that forward's argmax; `max_gap`: the largest shortfall of a chosen
    token's logit below the top logit. On random bf16 weights the top logits nearly tie, so kernels that round
    differently pick different tokens (agreement < 1) but the gap stays at rounding size; a wrong cache path
    gives gaps of whole logit units. Prompts here have equal lengths."""
    model.clear_caches()  # the plain forward; the next compiled call sets the caches up again
    T = len(prompts[0])
    seq = torch.tensor([p + o for p, o in zip(prompts, out)], device=model.lm_head.weight.device)
    logits = model(seq[:, :-1])[:, T - 1:].float()
    chosen = logits.gather(-1, seq[:, T:, None]).squeeze(-1)
    top = logits.max(-1)
    spread = (top.values - logits.mean(-1)).median().item()
    return {"agreement": (top.indices == seq[:, T:]).float().mean().item(),
            "max_gap": (top.values - chosen).max().item(), "top_minus_mean_logit": spread}


def stored_bytes(model: GPT) -> int:
    """Bytes of the weights as stored: int8 values and their fp32 row scales for quantised layers."""
    total = 0
    for p in model.parameters():
        if is_int8(p):
            total += p.qdata.numel() + p.scale.numel() * p.scale.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def hf_model(cfg, ours: GPT, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """transformers' GPT-2 with OUR weights (so both generate the same greedy tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    hf_cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(hf_cfg)
    sd = {}
    for k, v in ours.state_dict().items():
        if k.startswith("lm_head") or k.endswith("causal_mask"):
            continue
        if k == "transformer.wte.weight":
            v = v[: cfg.vocab_size]
        if any(k.endswith(s) for s in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        sd[k] = v
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in m or "attn.bias" in m or "masked_bias" in m for m in missing), missing
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


DEFAULTS = DecodeOptions()
VARIANT_OPTIONS = {"kernels", "nopdl", "nosplitk", "attntune", "noattntune", "steptune", "nosteptune", "gemv", "cdt",
                   "int8", "nofold"}


def toggle(extras: list[str], name: str, default: bool) -> bool:
    """A switch of the Triton decoder for one variant: +NAME turns it on, +noNAME off, else its default."""
    return (default or name in extras) and f"no{name}" not in extras


def variant_options(extras: list[str]) -> DecodeOptions:
    """The decode options of one compiled variant, with a tuning of its own (each variant tunes its candidates)."""
    return DecodeOptions(coordinate_descent="cdt" in extras, pdl="nopdl" not in extras,
                         split_k="nosplitk" not in extras, fold_norm="nofold" not in extras,
                         tune_attention=toggle(extras, "attntune", DEFAULTS.tune_attention),
                         tune_in_step=toggle(extras, "steptune", DEFAULTS.tune_in_step),
                         tuning=DecodeTuning())


def parse_args() -> argparse.Namespace:
    """The command line; a variant with an option this benchmark does not know is refused before any GPU work."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-300m", help="a model preset (GPT-2 blocks) or a config YAML's model")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--ttft-prompt", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--compile-modes", nargs="*",
                    default=["reduce-overhead+kernels", "reduce-overhead+gemv", "reduce-overhead"],
                    help="variants of AntiMatter's compiled decode step, MODE[+kernels][+gemv][+cdt]: MODE a "
                         "torch.compile mode (reduce-overhead, max-autotune); +kernels: decode steps as "
                         "AntiMatter's Triton kernels in one CUDA graph (model/triton_decoder.py; without it, the "
                         "torch.compile path); +nopdl: those kernels without programmatic dependent launch; +nosplitk: "
                         "their batched matmuls without split-K block shapes; +attntune/+noattntune: their attention's "
                         "launch shape (slots per iteration, warps, splits) tuned too, or not (default: "
                         f"{'on' if DEFAULTS.tune_attention else 'off'}); +steptune/+nosteptune: each "
                         "matrix's block shape re-picked among its fastest alone by timing whole steps, or not "
                         f"(default: {'on' if DEFAULTS.tune_in_step else 'off'}); +gemv: single-row "
                         "matmuls as inductor reductions "
                         "(batch 1 only; without it, cuBLAS); +cdt: inductor coordinate-descent tuning of the "
                         "generated kernels (gpt-fast's setting); +int8: weight-only int8 blocks (torchao); +nofold: with "
                         "+gemv, LayerNorm as its own kernel instead of folded into the next reduction")
    ap.add_argument("--json")
    args = ap.parse_args()
    for variant in args.compile_modes:  # an unknown option would otherwise run as the plain variant, unnoticed
        unknown = sorted(set(variant.split("+")[1:]) - VARIANT_OPTIONS)
        if unknown:
            ap.error(f"--compile-modes {variant}: unknown option(s) {', '.join(unknown)}; known: "
                     f"{', '.join(sorted(VARIANT_OPTIONS))} (older results name options since removed: run those "
                     f"at the commit they name)")
    return args


class Results:
    """The rows measured so far, written to `path` (when given) after every row, so a run cut at its time limit
    keeps what it measured. `record` turns a timed generation into tokens/s and MBU."""

    def __init__(self, path: str | None, bandwidth_tbs: float, weight_bytes: int, kv_bytes_per_pos: int):
        self.path, self.bw, self.weight_bytes, self.kv_per_pos = path, bandwidth_tbs, weight_bytes, kv_bytes_per_pos
        self.rows: list[dict] = []

    def record(self, name: str, batch: int, seconds: float, new: int, prompt: int, wbytes: int | None = None) -> dict:
        # bytes each decode step must read: every weight once (embedding: one row, lm_head: all rows) + KV cache
        steps_per_s = new / seconds
        avg_ctx = prompt + new / 2
        step_bytes = (wbytes or self.weight_bytes) + batch * self.kv_per_pos * avg_ctx
        return self.add({"impl": name, "batch": batch, "new_tokens": new, "seconds": seconds,
                         "tokens_per_s": batch * new / seconds, "mbu": step_bytes * steps_per_s / (self.bw * 1e12)})

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.dump()
        return row

    def dump(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                json.dump({"provenance": provenance("cuda"), "bandwidth_tbs": self.bw,
                           "weight_bytes": self.weight_bytes, "results": self.rows}, f, indent=2)


def measure_variant(results: Results, models: dict[str, GPT], variant: str, batch: int, plist: list[list[int]],
                    out_eager: list[list[int]], args: argparse.Namespace) -> None:
    """One compiled variant MODE[+options] at one batch: warm-up (compile, capture the CUDA graphs), timed runs,
    the Triton decoder's tuning picks, and its tokens checked against one plain forward and the eager ones. A
    variant that fails is reported and the others still run."""
    mode, *extras = variant.split("+")
    if "gemv" in extras and batch > 1:
        return  # the single-row path only changes batch 1
    gemv, kernels = "gemv" in extras, "kernels" in extras
    opts = variant_options(extras)
    if "int8" in extras and "int8" not in models:  # made on first use
        models["int8"] = int8_copy(models["bf16"])
    m = models["int8" if "int8" in extras else "bf16"]
    torch._dynamo.reset()  # each variant compiles from scratch (and stays under dynamo's recompile limit)
    m.__dict__.pop("_antimatter_compiled_steps", None)
    m.__dict__.pop("_antimatter_triton_decoder", None)
    n = args.new_tokens

    def run() -> list[list[int]]:
        return generate(m, plist, n, compile=mode, gemv=gemv, kernels=kernels, options=opts)

    try:
        t0 = time.perf_counter()
        for _ in range(2):  # compile + capture the CUDA graphs
            out_comp = run()
        warmup = time.perf_counter() - t0
        name = "antimatter compiled" + ("" if variant == "reduce-overhead" else f" ({variant})")
        r = results.record(name, batch, timed(run, args.repeats), n, args.prompt_tokens, stored_bytes(m))
        r["warmup_s"] = warmup
        if kernels:  # the block shape each matrix shape was tuned to, and every candidate's time
            r["triton_tuning"] = {k: {"best": v["best"], "us": v["us"]}
                                  for k, v in m.__dict__["_antimatter_triton_decoder"][1].tune_report.items()}
        r["teacher_forced"] = teacher_forced_check(m, plist, out_comp)  # int8: against its own forward
        r["same_tokens_as_eager"] = out_eager == out_comp
        results.dump()
        print(f"batch {batch}: compiled ({variant}) warm-up {warmup:.0f} s; same greedy tokens as eager: "
              f"{r['same_tokens_as_eager']}; teacher-forced {r['teacher_forced']}", flush=True)
    except Exception as e:  # report a variant that fails, keep measuring the others
        print(f"batch {batch}: compiled ({variant}) failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def measure_hf(results: Results, hf, model: GPT, batch: int, prompts: torch.Tensor, out_eager: list[list[int]],
               args: argparse.Namespace) -> None:
    """transformers' generate at one batch, default and static cache, and its tokens against AntiMatter's."""
    ids = prompts.cuda()
    attn = torch.ones_like(ids)
    n = args.new_tokens

    def hf_gen(static: bool):
        kw = {"cache_implementation": "static"} if static else {}
        return hf.generate(ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, **kw)

    hf_out = hf_gen(False)
    results.record("transformers default cache", batch, timed(lambda: hf_gen(False), args.repeats), n,
                   args.prompt_tokens)
    try:
        t0 = time.perf_counter()
        for _ in range(2):  # generate compiles its decode step for a static cache: the compile time, apart
            hf_gen(True)
        warmup = time.perf_counter() - t0
        r = results.record("transformers static cache", batch, timed(lambda: hf_gen(True), args.repeats), n,
                           args.prompt_tokens)
        r["warmup_s"] = warmup
        results.dump()
        print(f"batch {batch}: transformers static cache warm-up {warmup:.0f} s", flush=True)
    except Exception as e:  # report, don't hide: the static path differs across versions
        print(f"transformers static cache failed: {type(e).__name__}: {e}", flush=True)
    hf_new = hf_out[:, args.prompt_tokens:].tolist()
    check = teacher_forced_check(model, prompts.tolist(), hf_new)
    print(f"batch {batch}: transformers and AntiMatter eager greedy tokens identical: {hf_new == out_eager}; "
          f"transformers' tokens teacher-forced through AntiMatter: {check}", flush=True)


def measure_ttft(results: Results, model: GPT, hf, cfg, args: argparse.Namespace) -> None:
    """Time to first token for a long prompt (prefill + first sampled token): eager (what compiled decoding
    runs too, by default), with the prefill compiled (DecodeOptions.compile_prefill), and transformers'."""
    long_prompt = torch.randint(0, cfg.vocab_size, (1, args.ttft_prompt), generator=torch.Generator().manual_seed(7))
    variants = {"antimatter eager": {}, "antimatter compiled prefill":
                {"compile": True, "options": DecodeOptions(compile_prefill=True)}}
    for name, kw in () if args.skip_ttft else variants.items():
        for _ in range(2):
            generate(model, long_prompt.tolist(), 1, **kw)
        s = timed(lambda kw=kw: generate(model, long_prompt.tolist(), 1, **kw), 5)
        results.add({"impl": name, "ttft_prompt": args.ttft_prompt, "ttft_ms": s * 1000,
                     "prefill_tokens_per_s": args.ttft_prompt / s})
    if hf is not None and not args.skip_ttft:
        ids = long_prompt.cuda()
        s = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                                      pad_token_id=0), 5)
        results.add({"impl": "transformers", "ttft_prompt": args.ttft_prompt, "ttft_ms": s * 1000,
                     "prefill_tokens_per_s": args.ttft_prompt / s})


def print_summary(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.config} bf16, greedy, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'impl':<30}{'batch':>6}{'tokens/s':>12}{'MBU':>8}{'warm-up s':>11}  (compile and capture, not in the rate)")
    for r in rows:
        if "batch" in r:
            warm = f"{r['warmup_s']:>11.1f}" if "warmup_s" in r else f"{'-':>11}"
            print(f"{r['impl']:<30}{r['batch']:>6}{r['tokens_per_s']:>12,.0f}{r['mbu']:>8.1%}{warm}")
    for B in args.batches:
        by_impl = {r["impl"]: r["tokens_per_s"] for r in rows if r.get("batch") == B}
        base = by_impl.get("transformers static cache") or by_impl.get("transformers default cache")
        best = max((v for k, v in by_impl.items() if k.startswith("antimatter compiled")), default=None)
        if base and best:
            print(f"batch {B}: AntiMatter compiled (best variant) / transformers static: {best / base:.2f}x")
    for r in rows:
        if "ttft_ms" in r:
            print(f"TTFT {r['impl']:<28} prompt {r['ttft_prompt']}: {r['ttft_ms']:.1f} ms")


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    cfg = load_config(args.config).model if args.config.endswith((".yaml", ".yml")) else preset_model(args.config)
    if not args.skip_hf and not (cfg.arch == "gpt2" and cfg.is_family_standard):
        sys.exit(f"{args.config}: transformers is compared through GPT-2 blocks only; pass --skip-hf")
    model = GPT(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    bw = measured_bandwidth_tbs()
    weight_bytes = stored_bytes(model)
    kv_per_pos = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * 2
    print(f"device {torch.cuda.get_device_name()}; copy bandwidth {bw:.2f} TB/s; weights {weight_bytes / 1e9:.3f} GB; "
          f"bound at batch 1 ~{bw * 1e12 / weight_bytes:,.0f} tokens/s", flush=True)
    results = Results(args.json, bw, weight_bytes, kv_per_pos)
    models = {"bf16": model}  # and "int8", made on first use by a +int8 variant
    hf = None if args.skip_hf else hf_model(cfg, model)
    for B in args.batches:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_tokens), generator=torch.Generator().manual_seed(B))
        plist, n = prompts.tolist(), args.new_tokens

        def eager(plist=plist, n=n) -> list[list[int]]:
            return generate(model, plist, n, compile=False, kernels=False)

        out_eager = eager()
        if not args.skip_eager:
            r = results.record("antimatter eager", B, timed(eager, args.repeats), n, args.prompt_tokens)
            r["teacher_forced"] = teacher_forced_check(model, plist, out_eager)
            print(f"batch {B} eager: teacher-forced {r['teacher_forced']}", flush=True)
        for variant in args.compile_modes:
            measure_variant(results, models, variant, B, plist, out_eager, args)
        if hf is not None:
            measure_hf(results, hf, model, B, prompts, out_eager, args)
    measure_ttft(results, model, hf, cfg, args)
    print_summary(results.rows, args)
    results.dump()


if __name__ == "__main__":
    main()
