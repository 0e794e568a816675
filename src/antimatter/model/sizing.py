"""Sizes from the config alone: parameter counts, FLOPs per token, memory, and GPU peak rates for MFU.

Everything here is arithmetic on `ModelConfig`; `tests/test_sizing.py` checks it against real modules (ours and
transformers' GPT2LMHeadModel), so `antimatter info` never prints a number copied from elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from antimatter.config import ModelConfig


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """total, embedding (token + position tables, and an untied output head), non_embedding."""
    d, L, hd = cfg.d_model, cfg.n_layer, cfg.head_dim
    b = 1 if cfg.bias else 0
    norm = (2 if cfg.norm_type == "layernorm" and cfg.bias else 1) * d  # LayerNorm weight (+bias) or RMSNorm weight
    qkv_out = (cfg.n_head + 2 * cfg.kv_heads) * hd
    attn = d * qkv_out + b * qkv_out + d * d + b * d
    if cfg.qk_norm:
        attn += 2 * hd
    ffn = cfg.ffn_dim
    up = 2 * ffn if cfg.activation_type == "swiglu" else ffn
    mlp = d * up + b * up + ffn * d + b * d
    per_layer = attn + mlp + 2 * norm
    wte = cfg.vocab_size * d
    wpe = cfg.block_size * d if cfg.position_type == "learned" else 0
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    non_embedding = L * per_layer + norm
    embedding = wte + wpe + head
    return {"total": non_embedding + embedding, "embedding": embedding, "non_embedding": non_embedding,
            "per_layer": per_layer, "wte": wte, "wpe": wpe, "lm_head_untied": head}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L d T (PaLM appendix B convention, attention
    counted as if not causal). N excludes the position table, which is a lookup, not a matmul."""
    T = seq_len or cfg.block_size
    c = param_counts(cfg)
    return 6.0 * (c["total"] - c["wpe"]) + 12.0 * cfg.n_layer * cfg.d_model * T


def forward_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Inference FLOPs per token at a given context length (a third of the training figure)."""
    return flops_per_token(cfg, context) / 3.0


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gb: float
    tflops: dict[str, float]  # dense tensor-core peaks from the vendor datasheets, by dtype
    bandwidth_tbs: float


# Datasheet dense peaks (no sparsity). bf16 missing = the GPU has no bf16 tensor cores: use fp16 + GradScaler.
GPUS: dict[str, GpuSpec] = {
    "H200": GpuSpec("H200", 141, {"bf16": 989, "fp16": 989, "fp8": 1979, "fp32": 495}, 4.8),
    "H100": GpuSpec("H100 SXM", 80, {"bf16": 989, "fp16": 989, "fp8": 1979, "fp32": 495}, 3.35),
    "H100-PCIE": GpuSpec("H100 PCIe", 80, {"bf16": 756, "fp16": 756, "fp8": 1513, "fp32": 378}, 2.0),
    "A100-80GB": GpuSpec("A100 80GB", 80, {"bf16": 312, "fp16": 312, "fp32": 156}, 2.0),
    "A100-40GB": GpuSpec("A100 40GB", 40, {"bf16": 312, "fp16": 312, "fp32": 156}, 1.56),
    "L40S": GpuSpec("L40S", 48, {"bf16": 362, "fp16": 362, "fp8": 733, "fp32": 183}, 0.864),
    "A10G": GpuSpec("A10G", 24, {"bf16": 70, "fp16": 70, "fp32": 35}, 0.6),
    "L4": GpuSpec("L4", 24, {"bf16": 121, "fp16": 121, "fp8": 242, "fp32": 60}, 0.3),
    "RTX-4090": GpuSpec("RTX 4090", 24, {"bf16": 165, "fp16": 165, "fp32": 82.6}, 1.0),
    "RTX-3090": GpuSpec("RTX 3090", 24, {"bf16": 71, "fp16": 71, "fp32": 35.6}, 0.936),
    "T4": GpuSpec("T4", 16, {"fp16": 65, "fp32": 8.1}, 0.32),
    "V100": GpuSpec("V100", 32, {"fp16": 125, "fp32": 15.7}, 0.9),
    "P100": GpuSpec("P100", 16, {"fp16": 18.7, "fp32": 9.3}, 0.732),
}


def gpu_spec(device_name: str) -> GpuSpec | None:
    """Match a CUDA device name ('NVIDIA H100 80GB HBM3', 'Tesla T4', ...) or a short key ('a100-40gb')."""
    n = device_name.upper().replace(" ", "-").replace("_", "-")
    if n in GPUS:
        return GPUS[n]
    if "H200" in n:
        return GPUS["H200"]
    if "H100" in n:
        return GPUS["H100-PCIE"] if "PCIE" in n else GPUS["H100"]
    if "A100" in n:
        return GPUS["A100-40GB"] if "40GB" in n else GPUS["A100-80GB"]
    tokens = n.split("-")  # whole words only: an 'L40' is not an 'L4'
    joined = {a + b for a, b in zip(tokens, tokens[1:])}  # 'RTX 4090' -> 'RTX4090'
    for key in ("L40S", "A10G", "L4", "RTX-4090", "RTX-3090", "T4", "V100", "P100"):
        if key in tokens or key.replace("-", "") in joined:
            return GPUS[key]
    return None


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s for this device and compute dtype, or None when unknown (MFU is then reported as
    unknown rather than against a guessed figure)."""
    spec = gpu_spec(device_name)
    if spec is None:
        return None
    t = spec.tflops.get(dtype)
    return t * 1e12 if t else None


ACTIVATION_BYTES_PER_LAYER_TOKEN_DIM = 26  # calibrated, see memory_estimate


def memory_estimate(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: str = "bf16",
                    flash: bool = True, loss_chunk_tokens: int = 0, world_size: int = 1,
                    fsdp: bool = False) -> dict[str, float]:
    """Rough training memory in GiB: fp32 weights + grads + AdamW moments (16 bytes/param, sharded under FSDP)
    plus activations plus the logits of the loss. Korthikanti et al. (2022) count 34·s·b·h bytes per layer in
    16-bit for an eager model; `torch.compile` fuses the pointwise ops and saves less, so the constant here is
    calibrated on measured peaks (seed-300m, seq 2048, bf16, compiled, one H100: 35.1 GiB at micro-batch 16,
    65.4 GiB at 32; this estimate gives 34.0 and 62.7; gpt2-124m at seq 1024, micro-batch 64: measured 28.5,
    estimated 34.9). Without flash attention add the 5·a·s²·b term."""
    gib = 1024**3
    n = param_counts(cfg)["total"]
    states = 16.0 * n / (world_size if fsdp else 1)
    act_bytes = 2 if dtype in ("bf16", "fp16") else 4
    s, b, h, a = seq_len, micro_batch, cfg.d_model, cfg.n_head
    per_layer = s * b * h * ACTIVATION_BYTES_PER_LAYER_TOKEN_DIM * (act_bytes / 2)
    if not flash:
        per_layer += 5 * a * s * s * b * (act_bytes / 2)
    tokens = s * b
    logit_tokens = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    logits = logit_tokens * cfg.padded_vocab_size * (act_bytes + 4)  # 16-bit logits + their fp32 gradient
    acts = cfg.n_layer * per_layer + logits
    return {"weights_grads_optimizer_gib": states / gib, "activations_gib": acts / gib,
            "total_gib": (states + acts) / gib}
