"""AntiMatter vs transformers on the same exported weights: logits parity, greedy parity, round trip, and the
size of the exported model.safetensors per dtype.

    .venv/bin/python benchmarks/hf_export_parity.py --presets tiny llama-tiny seed-300m llama-300m \
        --size-preset seed-300m --json results/hf_interop.json

Random weights (the figures are about the conversion, not about a trained model). Prints one line per model
and writes a JSON with the provenance block.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from antimatter.config import preset_model
from antimatter.export import export_model, hf_architecture, load_hf_model
from antimatter.model.gpt import GPT
from antimatter.provenance import provenance


def parity(name: str, overrides: dict, seq_len: int, new_tokens: int, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = dataclasses.replace(preset_model(name), **overrides)
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains and biases, so a misplaced tensor shows in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        export_model(model, d)
        t_export = time.perf_counter() - t0
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        x = torch.randint(0, cfg.vocab_size, (2, min(seq_len, cfg.block_size)), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a, b = model(x), hf(x).logits
            diff = (a - b).abs().max().item()
            scale = a.abs().max().item()
            idx = x[:1, :8]
            for _ in range(new_tokens):
                idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
            theirs = hf.generate(x[:1, :8], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        back = load_hf_model(d)
        V = cfg.vocab_size
        same = all(torch.equal(v[:V] if k in ("transformer.wte.weight", "lm_head.weight") else v,
                               back.state_dict()[k][:V] if k in ("transformer.wte.weight", "lm_head.weight")
                               else back.state_dict()[k]) for k, v in model.state_dict().items())
    row = {"preset": name, "overrides": overrides, "hf_class": hf_architecture(cfg), "params": model.num_params(),
           "input_shape": list(x.shape), "max_abs_logits_diff_fp32": diff, "max_abs_logit": scale,
           "greedy_tokens": new_tokens, "greedy_equal": bool(torch.equal(idx, theirs)),
           "round_trip_bitwise_equal": same, "export_seconds": round(t_export, 2)}
    print(f"{name:12s} {json.dumps(overrides):62s} {row['hf_class']:17s} params {row['params']:>12,}  "
          f"max|dlogits| {diff:.3g} (max|logit| {scale:.3g})  greedy {new_tokens} equal={row['greedy_equal']}  "
          f"round trip bitwise={same}")
    return row


def export_size(name: str, dtype: str) -> dict:
    model = GPT(preset_model(name)).eval()
    with tempfile.TemporaryDirectory() as d:
        export_model(model, d, dtype=dtype)
        size = (Path(d) / "model.safetensors").stat().st_size
    print(f"{name} {dtype} export: model.safetensors {size:,} bytes ({size / 2**20:.1f} MiB), "
          f"{model.num_params():,} params")
    return {"preset": name, "dtype": dtype, "model_safetensors_bytes": size, "params": model.num_params()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["tiny", "llama-tiny"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--size-preset", default="seed-300m")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for name in args.presets:
        base = preset_model(name)
        variants = [{}]
        if base.arch == "llama":  # the other QK-norm setting (Llama <-> Qwen3 class), and MHA + tied
            variants = [{}, {"qk_norm": not base.qk_norm},
                        {"qk_norm": False, "n_kv_head": None, "tie_embeddings": True}]
        for over in variants:
            rows.append(parity(name, over, args.seq_len, args.new_tokens))
    sizes = [export_size(args.size_preset, dt) for dt in ("fp16", "fp32")] if args.size_preset else []
    result = {"parity": rows, "export_size": sizes, "provenance": provenance()}
    import transformers

    result["provenance"]["versions"]["transformers"] = transformers.__version__
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
