"""Sizing arithmetic checked against real modules: ours (every preset, built on the meta device so even the
1.3B one costs no memory) and transformers' GPT2LMHeadModel / LlamaForCausalLM of the same shape; the FLOPs
formula; the GPU peak table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from antimatter.config import MODEL_PRESETS, preset_model
from antimatter.model.gpt import GPT
from antimatter.model.sizing import (
    GPUS,
    flops_per_token,
    forward_flops_per_token,
    gpu_spec,
    memory_estimate,
    param_counts,
    peak_flops,
)


def meta_model(cfg) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def check_counts(cfg) -> None:
    model = meta_model(cfg)
    c = param_counts(cfg)
    assert c["total"] == model.num_params()
    assert c["non_embedding"] == model.num_params(non_embedding=True)
    assert c["total"] == c["embedding"] + c["non_embedding"]
    norm = sum(p.numel() for p in model.transformer.ln_f.parameters())
    assert c["non_embedding"] == cfg.n_layer * c["per_layer"] + norm
    # and against the stored tensors: everything except the embedding padding rows
    stored = sum(p.numel() for p in model.parameters())
    heads = 1 if cfg.tie_embeddings else 2
    assert c["total"] == stored - heads * (cfg.padded_vocab_size - cfg.vocab_size) * cfg.d_model


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_param_counts_equal_our_model_for_every_preset(name):
    check_counts(preset_model(name))


@pytest.mark.parametrize("over", [
    dict(preset="tiny", bias=False, tie_embeddings=False, d_ff=80),
    dict(preset="tiny", vocab_size=300),
    dict(preset="llama-tiny", qk_norm=False, n_kv_head=None, tie_embeddings=True),
    dict(preset="llama-tiny", bias=True),
    dict(preset="llama-300m", qk_norm=True),
])
def test_param_counts_equal_our_model_for_variants(over):
    over = dict(over)
    check_counts(dataclasses.replace(preset_model(over.pop("preset")), **over))


def test_seed_300m_count():
    c = param_counts(preset_model("seed-300m"))
    assert (c["total"], c["non_embedding"], c["embedding"]) == (355_871_744, 302_311_424, 53_560_320)
    assert c["wte"] == 50257 * 1024 and c["wpe"] == 2048 * 1024 and c["lm_head_untied"] == 0


@pytest.mark.parametrize("name", ["gpt2-124m", "seed-300m"])
def test_param_counts_equal_transformers_gpt2(name):
    transformers = pytest.importorskip("transformers")
    m = preset_model(name)
    hf_cfg = transformers.GPT2Config(n_embd=m.d_model, n_layer=m.n_layer, n_head=m.n_head, n_positions=m.block_size,
                                     vocab_size=m.vocab_size, tie_word_embeddings=True)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    assert param_counts(m)["total"] == hf.num_parameters()
    # transformers leaves out its nn.Embedding tables (wte, wpe): our non-embedding count
    assert param_counts(m)["non_embedding"] == hf.num_parameters(exclude_embeddings=True)


def test_param_counts_equal_transformers_llama():
    transformers = pytest.importorskip("transformers")
    m = preset_model("llama-300m")
    hf_cfg = transformers.LlamaConfig(
        hidden_size=m.d_model, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads, vocab_size=m.vocab_size,
        max_position_embeddings=m.block_size, tie_word_embeddings=m.tie_embeddings, attention_bias=m.bias,
        mlp_bias=m.bias, rms_norm_eps=m.norm_eps)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    assert param_counts(m)["total"] == hf.num_parameters()


def test_flops_per_token_seed_300m():
    m = preset_model("seed-300m")
    c = param_counts(m)
    expected = 6 * (c["total"] - c["wpe"]) + 12 * m.n_layer * m.d_model * 2048  # 6N + 12·L·d·T
    assert flops_per_token(m, 2048) == expected == 2_726_627_328
    assert flops_per_token(m) == expected  # seq_len defaults to the context
    assert flops_per_token(m, 2048) == pytest.approx(2.73e9, rel=2e-3)
    assert forward_flops_per_token(m, 2048) == pytest.approx(expected / 3)
    assert flops_per_token(m, 1024) == expected - 12 * 24 * 1024 * 1024


@pytest.mark.parametrize("device, key, bf16, fp16", [
    ("NVIDIA H100 80GB HBM3", "H100", 989e12, 989e12),
    ("NVIDIA H100 PCIe", "H100-PCIE", 756e12, 756e12),
    ("NVIDIA H200", "H200", 989e12, 989e12),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB", 312e12, 312e12),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB", 312e12, 312e12),
    ("NVIDIA L4", "L4", 121e12, 121e12),
    ("NVIDIA GeForce RTX 4090", "RTX-4090", 165e12, 165e12),
    ("Tesla T4", "T4", None, 65e12),
    ("Tesla V100-SXM2-32GB", "V100", None, 125e12),
    ("Tesla P100-PCIE-16GB", "P100", None, 18.7e12),
])
def test_gpu_spec_and_peak_flops(device, key, bf16, fp16):
    assert gpu_spec(device) is GPUS[key]
    assert peak_flops(device, "bf16") == (pytest.approx(bf16) if bf16 else None)
    assert peak_flops(device, "fp16") == pytest.approx(fp16)


def test_unknown_gpu_and_dtype():
    for name in ("AMD Instinct MI300X", "NVIDIA GeForce GTX 1080 Ti", "Apple M2", "cpu", ""):
        assert gpu_spec(name) is None, name
        assert peak_flops(name, "bf16") is None
    assert peak_flops("Tesla T4", "fp8") is None
    assert gpu_spec("a100-40gb") is GPUS["A100-40GB"]  # the short keys of --gpu


def test_memory_estimate_grows_with_batch_and_shrinks_with_sharding():
    m = preset_model("seed-300m")
    one, two = memory_estimate(m, 1, 2048), memory_estimate(m, 2, 2048)
    states = 16 * param_counts(m)["total"] / 2**30
    assert one["weights_grads_optimizer_gib"] == pytest.approx(states)
    assert two["activations_gib"] > one["activations_gib"]
    assert memory_estimate(m, 1, 2048, fsdp=True, world_size=8)["weights_grads_optimizer_gib"] == \
        pytest.approx(states / 8)
    assert memory_estimate(m, 8, 2048, loss_chunk_tokens=1024)["total_gib"] < memory_estimate(m, 8, 2048)["total_gib"]
    assert memory_estimate(m, 1, 2048, flash=False)["total_gib"] > one["total_gib"]


def test_l40_is_not_an_l4():
    assert gpu_spec("NVIDIA L4") is GPUS["L4"]
    assert gpu_spec("NVIDIA L40S") is GPUS["L40S"]
    assert gpu_spec("NVIDIA L40") is not GPUS["L4"]


@pytest.mark.parametrize("micro_batch, measured_gib", [(16, 35.1), (32, 65.4)])
def test_memory_estimate_is_close_to_the_measured_h100_peaks(micro_batch, measured_gib):
    """Peaks measured by benchmarks/train_throughput.py on one H100 (docs/RESULTS.md, compiled, bf16)."""
    est = memory_estimate(preset_model("seed-300m"), micro_batch, 2048)["total_gib"]
    assert abs(est - measured_gib) / measured_gib < 0.15
