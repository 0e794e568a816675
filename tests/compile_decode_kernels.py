"""Compile every Triton decode kernel for a Hopper GPU (sm_90) on a machine without one: Triton's front end,
its GPU passes and NVIDIA's ptxas, no launch. The CPU tests run the kernels in Triton's interpreter, which
accepts code the compiler refuses (e.g. a loop-carried variable whose dtype changes in the loop); this finds
that before GPU time is spent. Run in its own process (tests/test_triton_compile.py does): under
TRITON_INTERPRET=1 the kernels are not compilable objects.

    python tests/compile_decode_kernels.py        # one JSON line per kernel variant; exit 1 if any failed
"""

from __future__ import annotations

import inspect
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from antimatter.model import decode_kernels as dk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"eps", "scale"}  # scalar arguments that are floats; the other scalars are ints
POINTERS = {"wg_ptr": "*fp32", "wb_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32", "part_m_ptr": "*fp32",
            "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "token_ptr": "*i64", "pos_ptr": "*i64", "pad_ptr": "*i64", "seen_ptr": "*u8", "logits_ptr": "*fp32"}


def signature(kernel, constexprs: dict) -> dict:
    """Argument types as the decoder passes them (bf16 weights and activations)."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = POINTERS.get(p.name, "*bf16")
        else:
            sig[p.name] = "fp32" if p.name in FLOATS else "i32"
    missing = [p.name for p in kernel.params
               if p.is_constexpr and p.name not in constexprs and p.default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"{kernel.fn.__name__}: no value for constexpr {missing}")
    return sig


def aligned(kernel) -> dict:
    """Triton's launch-time specialisation, as for seed-300m on a GPU: every pointer 16-byte aligned, every
    integer a multiple of 16 (without these hints the compiled loads would not be vectorised)."""
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if not p.is_constexpr
            and (p.name.endswith("_ptr") or p.name not in FLOATS)}


def variants() -> list[tuple]:
    """(kernel, constexprs, num_warps): each product of the GPT-2 and Llama layers (QKV, output projection,
    MLP up, MLP down, head) at batch 1 and batched (whole-K and split-K in turn); attention with and without RoPE and
    QK-norm, split and not; the combine, embedding and greedy kernels."""
    out = []
    products = [  # (NORM, HAS_BIAS, ACT, HAS_RES)
        (dk.NORM_LAYER, True, dk.ACT_NONE, False), (dk.NORM_NONE, True, dk.ACT_NONE, True),
        (dk.NORM_LAYER, True, dk.ACT_GELU, False), (dk.NORM_LAYER, False, dk.ACT_NONE, False),
        (dk.NORM_RMS, False, dk.ACT_NONE, False), (dk.NORM_RMS, False, dk.ACT_SWIGLU, False),
        (dk.NORM_NONE, False, dk.ACT_NONE, True)]
    for i, (norm, bias, act, res) in enumerate(products):
        flags = dict(NORM=norm, HAS_BIAS=bias, ACT=act, HAS_RES=res, PDL=True)
        out.append((dk.matvec_kernel, {**flags, "BLOCK_N": 4, "BLOCK_K": 512}, 4))
        out.append((dk.matmul_kernel, {**flags, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 256, "STAGES": 3,
                                        "SPLIT_K": 1 if i % 2 else 4}, 4))
    for rope, qk_norm, splits in ((False, False, 1), (False, False, 8), (True, True, 8)):
        out.append((dk.attend_kernel, dict(Q_DIM=1024, KV_DIM=1024 if not rope else 256, GROUP=1 if not rope else 4,
                                            D=64, ROPE=rope, QK_NORM=qk_norm, SPLITS=splits, BLOCK_S=64, PDL=True), 4))
    out.append((dk.combine_kernel, dict(Q_DIM=1024, D=64, SPLITS=8, PDL=True), 1))
    out.append((dk.embed_kernel, dict(D=1024, BLOCK=1024, POS_EMB=True, PDL=True), 4))
    out.append((dk.greedy_kernel, dict(BLOCK=4096, PDL=True), 8))
    return out


def main() -> int:
    failed = 0
    for kernel, constexprs, warps in variants():
        name = kernel.fn.__name__
        try:
            src = ASTSource(fn=kernel, signature=signature(kernel, constexprs), constexprs=constexprs,
                            attrs=aligned(kernel))
            compiled = triton.compile(src, target=TARGET, options={"num_warps": warps})
            row = {"kernel": name, "constexprs": constexprs, "ok": True, "shared_bytes": compiled.metadata.shared}
        except Exception as e:  # noqa: BLE001 - report every variant, then fail
            failed += 1
            row = {"kernel": name, "constexprs": constexprs, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        print(json.dumps(row, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
