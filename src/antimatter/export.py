"""To and from the Hugging Face format: a name map, a few transposes, and a logits-parity test.

Export writes a folder that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load offline:
  * `arch: gpt2`  -> `GPT2LMHeadModel`. HF GPT-2 keeps its projections in Conv1D layers, whose weight is the
    transpose of our nn.Linear weight. HF GPT-2 always has biases: a `bias: false` model gets zero biases,
    which computes the same function.
  * `arch: llama` -> `LlamaForCausalLM`; with `qk_norm: true` -> `Qwen3ForCausalLM` (Llama has no QK-norm;
    Qwen3 is Llama plus an RMSNorm over each head of q and k before RoPE, exactly our block). Our fused
    `c_attn` ([q; k; v]) and `mlp.c_fc` ([gate; up]) are split into HF's separate projections.
Only the first `vocab_size` rows of the (internally padded) embedding are exported.

Nothing here needs transformers: the config is written by hand, so the folder also loads in older versions
(transformers >= 4.45; Qwen3 needs >= 4.51). Our own ModelConfig rides along under the "antimatter" key of
config.json, so a round trip export -> import restores fields HF has no place for (vocab padding, init).
A training run can also start from such a folder: `train.init_from=DIR` (`init_weights_from`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from antimatter.checkpoint import (
    check_checkpoint_tokenizer,
    load_model,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from antimatter.config import ModelConfig, RunConfig, save_config
from antimatter.device import DTYPES
from antimatter.errors import UserError, shorten
from antimatter.files import as_created_here, atomic_write_text, folder_lock
from antimatter.model.gpt import GPT
from antimatter.model.shapes import (
    MAX_SIZE,
    check_model_config,
    first_difference,
    first_missing_layer,
    fmt_shape,
    meta_model,
    quote,
    safetensors_shapes,
)
from antimatter.provenance import sha256_file
from antimatter.tokenizer import EOT, unreadable_tokenizer, write_hf_tokenizer_files

HF_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SUPPORTED = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "llama"}
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "README.md", *TOKENIZER_FILES)


# ------------------------------------------------------------------------------------------ config map


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes exactly what our model computes, or a UserError saying why
    none does."""
    if not cfg.is_family_standard:
        raise UserError(
            f"cannot export a model whose blocks mix families (arch={cfg.arch}, norm={cfg.norm_type}, position="
            f"{cfg.position_type}, activation={cfg.activation_type}, logit_softcap={cfg.logit_softcap:g}): "
            f"transformers' GPT-2, Llama and Qwen3 classes compute other functions; export a model trained with "
            f"the norm, position and activation its arch implies (model.norm/position/activation=auto) and no "
            f"logit soft-capping")
    if cfg.arch == "gpt2":
        if cfg.kv_heads != cfg.n_head:
            raise UserError(f"cannot export a gpt2-style model with grouped-query attention (n_kv_head="
                            f"{cfg.kv_heads}, n_head={cfg.n_head}): HF GPT-2 has no GQA; use arch=llama")
        if cfg.qk_norm:
            raise UserError("cannot export a gpt2-style model with qk_norm=true: HF GPT-2 has no QK-norm; "
                            "use arch=llama (exported as Qwen3ForCausalLM)")
        return "GPT2LMHeadModel"
    if cfg.arch == "llama":
        if cfg.qk_norm and cfg.bias:
            raise UserError("cannot export a llama-style model with qk_norm=true and bias=true: Qwen3 (the HF "
                            "class with QK-norm) has no MLP biases; train with bias=false")
        return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    raise UserError(f"cannot export model.arch='{cfg.arch}': supported are gpt2 and llama")


def hf_config(cfg: ModelConfig, dtype: torch.dtype, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    """config.json for the HF class of `cfg`. Written by hand with the keys of both transformers 4.x
    (`rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`)."""
    arch = hf_architecture(cfg)
    common = dict(architectures=[arch], vocab_size=cfg.vocab_size, bos_token_id=bos_id, eos_token_id=eos_id,
                  tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, use_cache=True,
                  torch_dtype=HF_DTYPE_NAMES[dtype], dtype=HF_DTYPE_NAMES[dtype])
    if arch == "GPT2LMHeadModel":
        out = dict(model_type="gpt2", n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                   n_positions=cfg.block_size, n_ctx=cfg.block_size,
                   n_inner=None if cfg.ffn_dim == 4 * cfg.d_model else cfg.ffn_dim,
                   activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                   resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    else:
        out = dict(model_type="qwen3" if arch == "Qwen3ForCausalLM" else "llama",
                   hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layer,
                   num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                   hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                   rope_theta=cfg.rope_theta, rope_scaling=None,
                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                   attention_bias=cfg.bias, attention_dropout=cfg.dropout, pretraining_tp=1)
        if arch == "LlamaForCausalLM":
            out["mlp_bias"] = cfg.bias
        else:
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    out.update(common)
    out["antimatter"] = dataclasses.asdict(cfg)
    return out


FIX_CONFIG = "fix it in config.json or re-export the model"
MAX_PAD_MULTIPLE = 4096  # embedding rows added past vocab_size that no tensor in the weights sizes
HF_KEYS = {  # config.json's name for each ModelConfig field, for error lines
    "GPT2LMHeadModel": dict(n_layer="n_layer", n_head="n_head", d_model="n_embd", d_ff="n_inner",
                            vocab_size="vocab_size", block_size="n_positions", norm_eps="layer_norm_epsilon",
                            tie_embeddings="tie_word_embeddings"),
    "llama": dict(n_layer="num_hidden_layers", n_head="num_attention_heads", n_kv_head="num_key_value_heads",
                  d_model="hidden_size", d_ff="intermediate_size", vocab_size="vocab_size",
                  block_size="max_position_embeddings", norm_eps="rms_norm_eps", rope_theta="rope_theta",
                  tie_embeddings="tie_word_embeddings", bias="attention_bias"),
}


def _bad_value(key: str, value: Any, expected: str) -> UserError:
    return UserError(f"config.json has {key}={shorten(repr(value))}, expected {expected}: {FIX_CONFIG}")


def _hf_size(hf: dict[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of `keys` that is set, as a whole number from 1 to MAX_SIZE (1e3 counts as 1000); a missing
    key is `default`, or a UserError when there is none. config.json is untrusted: no size is used unchecked."""
    key = next((k for k in keys if hf.get(k) is not None), None)
    if key is None:
        if default is not None:
            return default
        raise UserError(f"config.json has no {keys[0]}, which a {_hf_arch(hf)} config needs: {FIX_CONFIG}")
    value = hf[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise _bad_value(key, hf[key], f"a whole number from 1 to {MAX_SIZE}")
    return value


def _hf_number(hf: dict[str, Any], key: str, default: float) -> float:
    """A finite number (an epsilon, a RoPE base), or `default` when the key is missing or null."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad_value(key, value, "a finite number")
    return float(value)


def _hf_flag(hf: dict[str, Any], key: str, default: bool) -> bool:
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad_value(key, value, "true or false")
    return value


def _hf_arch(hf: dict[str, Any]) -> str:
    """The class name config.json declares (architectures[0], else from model_type); '' when neither."""
    archs, model_type = hf.get("architectures"), hf.get("model_type") or ""
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise _bad_value("architectures", archs, 'a list of class names such as ["GPT2LMHeadModel"]')
    if not isinstance(model_type, str):
        raise _bad_value("model_type", model_type, 'a name such as "gpt2"')
    return archs[0] if archs else MODEL_TYPES.get(model_type, "")


def _antimatter_extra(hf: dict[str, Any]) -> dict[str, Any]:
    """The fields of our own ModelConfig that ride along under config.json's "antimatter" key and that HF has
    no place for (preset name, vocab padding, init scale), each checked."""
    ours = hf.get("antimatter") if isinstance(hf.get("antimatter"), dict) else {}
    extra = {k: ours[k] for k in ("preset", "pad_vocab_multiple", "init_std") if k in ours}
    if not isinstance(extra.get("preset"), str | None):
        raise _bad_value("antimatter.preset", extra["preset"], "a preset name or null")
    pad = extra.get("pad_vocab_multiple", 1)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad > MAX_PAD_MULTIPLE:
        raise _bad_value("antimatter.pad_vocab_multiple", pad, f"a whole number up to {MAX_PAD_MULTIPLE}")
    if "init_std" in extra:
        extra["init_std"] = _hf_number(ours, "init_std", 0.02)
    return extra


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a HF config.json dict, or a UserError naming what we cannot represent or what is
    malformed (every size, flag and number is checked: the file may come from anywhere)."""
    arch = _hf_arch(hf)
    if arch not in SUPPORTED:
        name = arch or hf.get("model_type") or "?"
        raise UserError(f"unsupported architecture '{shorten(str(name))}' in config.json: "
                        f"AntiMatter imports {', '.join(SUPPORTED)}")
    extra = _antimatter_extra(hf)
    if arch == "GPT2LMHeadModel":
        cfg = _gpt2_config_from_hf(hf, extra)
        check_model_config(cfg, "config.json", FIX_CONFIG, HF_KEYS[arch])
    else:
        cfg = _llama_config_from_hf(hf, arch, extra)
        check_model_config(cfg, "config.json", FIX_CONFIG, HF_KEYS["llama"])
    return cfg


def _gpt2_config_from_hf(hf: dict[str, Any], extra: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"unsupported GPT-2 activation '{shorten(str(act))}': AntiMatter's GPT-2 block uses "
                        "the tanh GELU (gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise UserError("unsupported GPT-2 attention scaling (scale_attn_by_inverse_layer_idx / "
                        "scale_attn_weights=false): AntiMatter scales by 1/sqrt(head_dim)")
    d = _hf_size(hf, "n_embd")
    cfg = ModelConfig(arch="gpt2", n_layer=_hf_size(hf, "n_layer"), n_head=_hf_size(hf, "n_head"), d_model=d,
                      d_ff=_hf_size(hf, "n_inner", default=4 * d), vocab_size=_hf_size(hf, "vocab_size"),
                      block_size=_hf_size(hf, "n_positions", "n_ctx"), bias=True,
                      tie_embeddings=_hf_flag(hf, "tie_word_embeddings", True),
                      norm_eps=_hf_number(hf, "layer_norm_epsilon", 1e-5), dropout=0.0, **extra)
    if cfg.d_ff == 4 * d:
        cfg.d_ff = None
    return cfg


def _hf_rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE base from either transformers generation's keys; any RoPE scaling is refused."""
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if not isinstance(value, dict | None):
            raise _bad_value(key, value, 'an object such as {"rope_type": "default"} or null')
    scaling, params = scaling or {}, params or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"unsupported RoPE scaling '{shorten(str(rope_type))}': AntiMatter implements plain "
                        "RoPE only")
    return _hf_number(hf, "rope_theta", 0.0) or _hf_number(params, "rope_theta", 10000.0)


def _hf_qk_norm(hf: dict[str, Any], arch: str, attn_bias: bool) -> bool:
    """Whether the block has QK-norm (Qwen3) or not (Llama), after refusing what one bias switch and full
    attention cannot represent."""
    if arch == "LlamaForCausalLM":
        if _hf_flag(hf, "mlp_bias", False) != attn_bias:
            raise UserError("unsupported Llama config: attention_bias and mlp_bias differ; AntiMatter has one "
                            "bias switch for all projections")
        return False
    if attn_bias:
        raise UserError("unsupported Qwen3 config: attention_bias=true without MLP biases; AntiMatter has one "
                        "bias switch for all projections")
    if hf.get("use_sliding_window"):
        raise UserError("unsupported Qwen3 config: use_sliding_window=true; AntiMatter attends over the "
                        "full context")
    return True


def _llama_config_from_hf(hf: dict[str, Any], arch: str, extra: dict[str, Any]) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"unsupported activation '{shorten(str(act))}': AntiMatter's Llama block is SwiGLU (silu)")
    theta = _hf_rope_theta(hf)
    d, n_head = _hf_size(hf, "hidden_size"), _hf_size(hf, "num_attention_heads")
    if hf.get("head_dim") not in (None, d // n_head) or d % n_head:
        raise UserError(f"unsupported head_dim {shorten(repr(hf.get('head_dim')))}: AntiMatter needs head_dim = "
                        f"hidden_size / num_attention_heads = {d}/{n_head}")
    attn_bias = _hf_flag(hf, "attention_bias", False)
    qk_norm = _hf_qk_norm(hf, arch, attn_bias)
    kv = _hf_size(hf, "num_key_value_heads", default=n_head)
    ffn = _hf_size(hf, "intermediate_size")
    cfg = ModelConfig(arch="llama", n_layer=_hf_size(hf, "num_hidden_layers"), n_head=n_head,
                      n_kv_head=None if kv == n_head else kv, d_model=d, d_ff=ffn,
                      vocab_size=_hf_size(hf, "vocab_size"),
                      block_size=_hf_size(hf, "max_position_embeddings", default=2048), bias=attn_bias,
                      tie_embeddings=_hf_flag(hf, "tie_word_embeddings", False),
                      norm_eps=_hf_number(hf, "rms_norm_eps", 1e-6), rope_theta=theta, qk_norm=qk_norm,
                      dropout=0.0, **extra)
    ours = hf.get("antimatter") if isinstance(hf.get("antimatter"), dict) else {}
    if ours.get("n_kv_head") == n_head:
        cfg.n_kv_head = n_head
    if ours.get("d_ff") is None and ModelConfig(arch="llama", d_model=d).ffn_dim == ffn:
        cfg.d_ff = None
    return cfg


# ----------------------------------------------------------------------------------------- weight map


def to_hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our parameters under HF names (contiguous copies in `dtype`, embedding rows cut to vocab_size)."""
    cfg = model.cfg
    arch = hf_architecture(cfg)
    sd = {k: v.detach() if v.is_meta else v.detach().cpu() for k, v in model.state_dict().items()}
    V, H, hd = cfg.vocab_size, cfg.ffn_dim, cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    if arch == "GPT2LMHeadModel":
        def ln(dst: str, src: str) -> None:
            out[f"{dst}.weight"] = sd[f"{src}.weight"]
            out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros_like(sd[f"{src}.weight"]))

        def conv1d(dst: str, src: str) -> None:  # HF Conv1D: weight (in, out) = our Linear weight transposed
            w = sd[f"{src}.weight"]
            out[f"{dst}.weight"] = w.t()
            out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))

        out["transformer.wte.weight"] = sd["transformer.wte.weight"][:V]
        out["transformer.wpe.weight"] = sd["transformer.wpe.weight"]
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}"
            ln(f"{p}.ln_1", f"{p}.ln_1")
            conv1d(f"{p}.attn.c_attn", f"{p}.attn.c_attn")
            conv1d(f"{p}.attn.c_proj", f"{p}.attn.c_proj")
            ln(f"{p}.ln_2", f"{p}.ln_2")
            conv1d(f"{p}.mlp.c_fc", f"{p}.mlp.c_fc")
            conv1d(f"{p}.mlp.c_proj", f"{p}.mlp.c_proj")
        ln("transformer.ln_f", "transformer.ln_f")
    else:
        nq, nkv = cfg.n_head * hd, cfg.kv_heads * hd
        out["model.embed_tokens.weight"] = sd["transformer.wte.weight"][:V]
        for i in range(cfg.n_layer):
            src, dst = f"transformer.h.{i}", f"model.layers.{i}"
            out[f"{dst}.input_layernorm.weight"] = sd[f"{src}.ln_1.weight"]
            out[f"{dst}.post_attention_layernorm.weight"] = sd[f"{src}.ln_2.weight"]
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                q, k, v = sd[f"{src}.attn.c_attn.{kind}"].split([nq, nkv, nkv], dim=0)
                gate, up = sd[f"{src}.mlp.c_fc.{kind}"].split([H, H], dim=0)
                out[f"{dst}.self_attn.q_proj.{kind}"] = q
                out[f"{dst}.self_attn.k_proj.{kind}"] = k
                out[f"{dst}.self_attn.v_proj.{kind}"] = v
                out[f"{dst}.self_attn.o_proj.{kind}"] = sd[f"{src}.attn.c_proj.{kind}"]
                out[f"{dst}.mlp.gate_proj.{kind}"] = gate
                out[f"{dst}.mlp.up_proj.{kind}"] = up
                out[f"{dst}.mlp.down_proj.{kind}"] = sd[f"{src}.mlp.c_proj.{kind}"]
            if cfg.qk_norm:
                out[f"{dst}.self_attn.q_norm.weight"] = sd[f"{src}.attn.q_norm.weight"]
                out[f"{dst}.self_attn.k_norm.weight"] = sd[f"{src}.attn.k_norm.weight"]
        out["model.norm.weight"] = sd["transformer.ln_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return {k: v.to(dtype).contiguous().clone() for k, v in out.items()}


def _hf_name(name: str, ndim: int, arch: str) -> str | None:
    """Accept the name variants found in the wild: GPT-2 files without the `transformer.` prefix, and the
    causal-mask buffers old GPT-2 files carry (not weights: None)."""
    if arch == "GPT2LMHeadModel":
        if name.endswith((".attn.bias", ".attn.masked_bias")) and ndim != 1:
            return None  # old causal-mask buffers
        if not name.startswith(("transformer.", "lm_head.")):
            return "transformer." + name
    return name


def _normalise_hf_names(hf_sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    return {n: v for k, v in hf_sd.items() if (n := _hf_name(k, v.dim(), arch)) is not None}


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our names and layouts (fp32, real vocab rows only). Every HF tensor must be used and every
    one of ours found; otherwise a UserError lists the difference (nothing silently dropped)."""
    hf_sd = _normalise_hf_names(hf_sd, arch)
    V = cfg.vocab_size
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise UserError(f"weights are missing '{name}' (expected by a {arch} config): the folder's weights "
                            "do not match its config.json")
        used.add(name)
        return hf_sd[name].float()

    emb_name = "transformer.wte.weight" if arch == "GPT2LMHeadModel" else "model.embed_tokens.weight"
    if emb_name in hf_sd and hf_sd[emb_name].shape[0] != V:
        raise UserError(f"vocab mismatch: config.json says vocab_size={V} but the embedding has "
                        f"{hf_sd[emb_name].shape[0]} rows: fix vocab_size in config.json")
    if arch == "GPT2LMHeadModel":
        out["transformer.wte.weight"] = take("transformer.wte.weight")
        out["transformer.wpe.weight"] = take("transformer.wpe.weight")
        names = [f"transformer.h.{i}.{m}" for i in range(cfg.n_layer)
                 for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        for n in [*names, "transformer.ln_f"]:
            w = take(f"{n}.weight")
            out[f"{n}.weight"] = w.t() if w.dim() == 2 else w
            b = take(f"{n}.bias")
            if cfg.bias:
                out[f"{n}.bias"] = b
    else:
        out["transformer.wte.weight"] = take("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            src, dst = f"model.layers.{i}", f"transformer.h.{i}"
            out[f"{dst}.ln_1.weight"] = take(f"{src}.input_layernorm.weight")
            out[f"{dst}.ln_2.weight"] = take(f"{src}.post_attention_layernorm.weight")
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                out[f"{dst}.attn.c_attn.{kind}"] = torch.cat(
                    [take(f"{src}.self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0)
                out[f"{dst}.attn.c_proj.{kind}"] = take(f"{src}.self_attn.o_proj.{kind}")
                out[f"{dst}.mlp.c_fc.{kind}"] = torch.cat(
                    [take(f"{src}.mlp.gate_proj.{kind}"), take(f"{src}.mlp.up_proj.{kind}")], dim=0)
                out[f"{dst}.mlp.c_proj.{kind}"] = take(f"{src}.mlp.down_proj.{kind}")
            if cfg.qk_norm:
                out[f"{dst}.attn.q_norm.weight"] = take(f"{src}.self_attn.q_norm.weight")
                out[f"{dst}.attn.k_norm.weight"] = take(f"{src}.self_attn.k_norm.weight")
        out["transformer.ln_f.weight"] = take("model.norm.weight")
    if not cfg.tie_embeddings:
        head = take("lm_head.weight")
        if head.shape[0] != V:
            raise UserError(f"vocab mismatch: config.json says vocab_size={V} but lm_head has {head.shape[0]} "
                            "rows: fix vocab_size in config.json")
        out["lm_head.weight"] = head
    elif "lm_head.weight" in hf_sd:
        used.add("lm_head.weight")  # a tied head saved anyway: the same tensor as the embedding
    unused = sorted(set(hf_sd) - used)
    if unused:
        raise UserError(f"{len(unused)} tensors in the weights are not part of a {arch} model of this config "
                        f"(e.g. '{unused[0]}'): the folder's weights do not match its config.json")
    return out


# ---------------------------------------------------------------------------------------------- files


def _read_tokenizer(tokenizer_file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the tokenizers library raises plain Exceptions for unreadable files
        raise unreadable_tokenizer(tokenizer_file, e) from None


def _eot_id(tokenizer_file: Path | None) -> int | None:
    return None if tokenizer_file is None else _read_tokenizer(tokenizer_file).token_to_id(EOT)


def _tokenizer_size(tokenizer_file: Path) -> int:
    return _read_tokenizer(tokenizer_file).get_vocab_size(with_added_tokens=True)


def write_tokenizer_files(tokenizer_file: Path, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json plus tokenizer_config.json and special_tokens_map.json, so that
    `AutoTokenizer.from_pretrained(out_dir)` builds a fast tokenizer with `<|endoftext|>` as bos/eos/unk/pad,
    offline. AntiMatter tokenizers go through the tokenizer stage's writer; a foreign tokenizer without
    `<|endoftext|>` (e.g. from an imported model) is copied with no special tokens declared."""
    if _eot_id(tokenizer_file) is not None:
        write_hf_tokenizer_files(tokenizer_file, out_dir, model_max_length)
        return
    shutil.copyfile(tokenizer_file, out_dir / "tokenizer.json")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
               "clean_up_tokenization_spaces": False}
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
    atomic_write_text(out_dir / "special_tokens_map.json", "{}\n")


SKIP_KEYS = ("provenance", "versions", "config", "settings", "outputs", "data", "timing", "memory", "histogram")
EVAL_SECTIONS = ("checkpoint", "val", "continuation", "speed", "size")


def _flatten(d: Any, prefix: str = "", depth: int = 0, max_depth: int = 3) -> list[tuple[str, Any]]:
    """Scalar entries of a nested dict as (dotted key, value), for the model card's tables; hashes, long
    strings, method notes and bookkeeping sections are left out."""
    if not isinstance(d, dict) or depth > max_depth:
        return []
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if "sha256" in str(k) or str(k).endswith("method"):
            continue
        if isinstance(v, bool | int | float | str) and not (isinstance(v, str) and len(v) > 80):
            rows.append((key, v))
        elif isinstance(v, dict) and k not in SKIP_KEYS:
            rows.extend(_flatten(v, key + ".", depth + 1, max_depth))
    return rows


def data_rows(stats: dict[str, Any]) -> list[tuple[str, Any]]:
    """The headline of dataset_statistics.json: its top-level figures and each source's kept docs / bytes."""
    rows = _flatten(stats, max_depth=0)
    sources = stats.get("sources")
    if isinstance(sources, dict):
        for name, src in sources.items():
            if isinstance(src, dict):
                rows += [(f"sources.{name}.{k}", src[k]) for k in ("kept_docs", "kept_bytes") if k in src]
    return rows or _flatten(stats)


def eval_rows(ev: dict[str, Any]) -> list[tuple[str, Any]]:
    """The figures of final_evaluation.json (val perplexity / bits per byte, continuations, speed, size)."""
    if any(k in ev for k in EVAL_SECTIONS):
        ev = {k: ev[k] for k in EVAL_SECTIONS if k in ev}
    return _flatten(ev)


def _table(rows: list[tuple[str, Any]], limit: int = 60) -> str:
    lines = ["| key | value |", "|---|---|"]
    for k, v in rows[:limit]:
        v = f"{v:.6g}" if isinstance(v, float) else str(v)
        lines.append(f"| {k} | {v.replace('|', '/')} |")
    if len(rows) > limit:
        lines.append(f"| ... | {len(rows) - limit} more entries in the source file |")
    return "\n".join(lines)


def model_card(model: GPT, arch: str, dtype: torch.dtype, card: dict[str, Any] | None) -> str:
    """README.md: architecture and size always; data statistics and evaluation figures only when the run has
    them (`card["data_statistics"]`, `card["evaluation"]`: the run's own JSON files, never made-up)."""
    cfg, card = model.cfg, card or {}
    name = card.get("name", "antimatter-model")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- antimatter",
             "- causal-lm", "---", "", f"# {name}", "",
             "A causal language model trained from scratch with AntiMatter, exported to the Hugging Face format.",
             ""]
    if card.get("source"):
        lines += [f"Exported from `{card['source']}`.", ""]
    lines += ["## Architecture", "",
              _table([("transformers class", arch), ("AntiMatter arch", cfg.arch),
                      ("parameters", f"{model.num_params():,}"),
                      ("non-embedding parameters", f"{model.num_params(non_embedding=True):,}"),
                      ("layers", cfg.n_layer), ("d_model", cfg.d_model), ("heads", cfg.n_head),
                      ("kv heads", cfg.kv_heads), ("ffn dim", cfg.ffn_dim), ("vocab size", cfg.vocab_size),
                      ("context", cfg.block_size), ("tied embeddings", cfg.tie_embeddings),
                      ("biases", cfg.bias), ("QK-norm", cfg.qk_norm), ("weights dtype", HF_DTYPE_NAMES[dtype])]),
              "", "## Usage", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'PATH = "path/to/this/folder"', "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
              'ids = tok("Hello", return_tensors="pt").input_ids',
              "print(tok.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))", "```", ""]
    stats = card.get("data_statistics")
    lines += ["## Training data", ""]
    if stats:
        lines += ["From the run's `data/dataset_statistics.json`:", "", _table(data_rows(stats)), ""]
    else:
        lines += ["No dataset statistics were recorded for this export.", ""]
    ev = card.get("evaluation")
    lines += ["## Evaluation", ""]
    if ev:
        which = card.get("evaluation_checkpoint")
        note = f" (computed on checkpoint `{which}`)" if which else ""
        lines += [f"From the run's `results/evaluations/final_evaluation.json`{note}:", ""]
        exported = card.get("checkpoint")
        if which and exported and Path(str(which)).name != Path(str(exported)).name:
            lines += [f"**Note:** these figures are for checkpoint `{Path(str(which)).name}`; this export is "
                      f"checkpoint `{Path(str(exported)).name}`.", ""]
        lines += [_table(eval_rows(ev)), ""]
    else:
        lines += ["No evaluation results were recorded for this export.", ""]
    return "\n".join(lines)


def _holds_earlier_export(out_dir: Path) -> bool:
    """Whether `out_dir` holds an export of ours: model.safetensors beside a config.json with the "antimatter"
    section that only `export_model` writes. A file that merely has an export's name is the user's."""
    if not (out_dir / "model.safetensors").is_file():
        return False
    try:
        hf = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not UTF-8 or not JSON: not ours
        return False
    return isinstance(hf, dict) and isinstance(hf.get("antimatter"), dict)


def _check_export_folder(out_dir: Path) -> bool:
    """True when `out_dir` holds an earlier export, whose files this one replaces. Any other file refuses the
    export before anything is written: it is the user's (a README.md or config.json of theirs too), and
    transformers would read stale shards or tokenizer files beside ours."""
    names = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    earlier = _holds_earlier_export(out_dir)
    theirs = [name for name in names if not (earlier and name in EXPORT_FILES)]
    if theirs:
        listed = ", ".join(shorten(name) for name in theirs[:3]) + (f" and {len(theirs) - 3} more"
                                                                     if len(theirs) > 3 else "")
        raise UserError(f"export folder {out_dir} holds files that are not from an earlier AntiMatter export "
                        f"({listed}): choose a new or empty folder for --out, or remove those files")
    return earlier


def export_model(model: GPT, out_dir: str | Path, dtype: str = "fp32", tokenizer_file: Path | None = None,
                 card: dict[str, Any] | None = None) -> Path:
    """Write `model` as a Hugging Face folder: config.json, model.safetensors, generation_config.json,
    tokenizer files (when `tokenizer_file` is given) and a README.md model card. The folder must be new, empty
    or an earlier export (replaced, and said so); it is held for the export, so a second one is refused."""
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype '{dtype}': choose fp32, fp16 or bf16")
    torch_dtype = DTYPES[dtype]
    cfg = model.cfg
    arch = hf_architecture(cfg)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export folder {out_dir} is a file: choose a folder path for --out")
    if tokenizer_file is not None:
        tokenizer_file = Path(tokenizer_file)
        if not tokenizer_file.is_file():
            raise UserError(f"tokenizer file not found: {tokenizer_file}")
        n_tok = _tokenizer_size(tokenizer_file)
        if n_tok > cfg.vocab_size:
            raise UserError(f"vocab mismatch: the tokenizer has {n_tok} tokens but the model's vocab_size is "
                            f"{cfg.vocab_size}: export with the tokenizer the model was trained with")
    with folder_lock(out_dir, f"export folder {out_dir}",  # a second export at once would mix the two
                     fix="wait for that export to end, or give another --out folder"):
        if _check_export_folder(out_dir):  # replaced: said, not done silently
            print(f"note: {out_dir} held an earlier export; its files are replaced by this one", file=sys.stderr)
        _write_export(model, out_dir, torch_dtype, arch, tokenizer_file, card)
    return out_dir


def _write_export(model: GPT, out_dir: Path, torch_dtype: torch.dtype, arch: str, tokenizer_file: Path | None,
                  card: dict[str, Any] | None) -> None:
    """The export's files, each written whole (temp file, then rename) so a reader never sees half a file."""
    cfg = model.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = _eot_id(tokenizer_file)
    tensors = to_hf_state_dict(model, torch_dtype)
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    as_created_here(tmp)
    os.replace(tmp, out_dir / "model.safetensors")
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config(cfg, torch_dtype, eot, eot), indent=2) + "\n")
    gen = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "do_sample": False}
    atomic_write_text(out_dir / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    if tokenizer_file is not None:
        write_tokenizer_files(tokenizer_file, out_dir, cfg.block_size)
    else:  # a previous export's tokenizer does not describe this model
        for name in TOKENIZER_FILES:
            (out_dir / name).unlink(missing_ok=True)
    atomic_write_text(out_dir / "README.md", model_card(model, arch, torch_dtype, card))


# --------------------------------------------------------------------------------------------- import


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        raise UserError(f"Hugging Face folder not found: {hf_dir} (give a local folder with config.json and "
                        "model.safetensors)")
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a folder: give the Hugging Face model folder, not a file in it")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json: is it a Hugging Face model folder?")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}): fix or re-export it") from None
    except (UnicodeDecodeError, RecursionError):  # other bytes than UTF-8 text; nesting deeper than Python's stack
        raise UserError(f"{path} is not valid JSON: fix or re-export it") from None
    if not isinstance(hf, dict):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(hf), "number")
        raise UserError(f"{path} holds a JSON {kind}, not a JSON object of settings: fix or re-export it")
    return hf


def _index_shards(hf_dir: Path, index: Path) -> list[Path]:
    """The shard files model.safetensors.index.json names. Each must be a file inside `hf_dir`: a name that is
    absolute, climbs with `..` or resolves (through symlinks) outside the folder is refused, so a downloaded
    index cannot make import read any other file."""
    fix = "fix the index or download the model again"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{index} is not valid JSON: {fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index} has no weight_map object of tensor name -> shard file name: {fix}")
    root = hf_dir.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        path = Path(name)
        try:
            inside = (bool(name) and not path.is_absolute() and ".." not in path.parts
                      and (hf_dir / path).resolve().is_relative_to(root))
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            inside = False
        if not inside:
            raise UserError(f"{index.name} names weight file {shorten(repr(name))}, outside {hf_dir}: shards must be "
                            f"files inside the model folder; {fix}")
        files.append(hf_dir / path)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{hf_dir} is missing weight shard {missing[0].relative_to(hf_dir)} listed in {index.name}")
    return files


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """model.safetensors, the shards of a model.safetensors.index.json, or (legacy) pytorch_model.bin."""
    single, index, legacy = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json", \
        hf_dir / "pytorch_model.bin"
    if single.is_file():
        return [single]
    if index.is_file():
        return _index_shards(hf_dir, index)
    if legacy.is_file():
        return [legacy]
    raise UserError(f"{hf_dir} has no weights (model.safetensors, model.safetensors.index.json or "
                    "pytorch_model.bin)")


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe content, RuntimeError/EOFError for damage
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot read {path} with weights_only=True ({first}): convert it to safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{path} holds no state dict (tensor name -> tensor): convert the model to safetensors")
    return sd


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for truncated / foreign files
            raise UserError(f"cannot read weights {f}: {e}") from None
    return out


def check_hf_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, arch: str) -> None:
    """config.json's model against the tensor shapes the weight files declare, before anything is allocated:
    the tensors a model of this config exports to (export's own name map, run on a meta-device model) must
    all be there with exactly these shapes, and nothing else. A config.json claiming a larger model than its
    weights (n_embd: 1000000) is one error line, not a terabyte allocation."""
    fix = "the folder's weights do not match its config.json; fix config.json or use the weights it belongs to"
    found = {n: tuple(s) for k, s in shapes.items() if (n := _hf_name(k, len(s), arch)) is not None}
    V = cfg.vocab_size
    emb = "transformer.wte.weight" if arch == "GPT2LMHeadModel" else "model.embed_tokens.weight"
    heads = [(emb, "the embedding")] + ([] if cfg.tie_embeddings else [("lm_head.weight", "lm_head")])
    for name, what in heads:
        if len(found.get(name, ())) == 2 and found[name][0] != V:
            raise UserError(f"vocab mismatch: config.json says vocab_size={V} but {what} has {found[name][0]} "
                            "rows: fix vocab_size in config.json")
    missing_layer = first_missing_layer(found, cfg.n_layer)
    if missing_layer is not None:  # before the meta model, which still costs Python objects per layer
        key, prefix = (("n_layer", "transformer.h") if arch == "GPT2LMHeadModel"
                       else ("num_hidden_layers", "model.layers"))
        raise UserError(f"config.json says {key}={cfg.n_layer} but the weights have no layer {missing_layer} "
                        f"(no '{prefix}.{missing_layer}.*' tensors): {fix}")
    expected = {k: tuple(v.shape) for k, v in to_hf_state_dict(meta_model(cfg, "config.json", fix)).items()}
    if cfg.tie_embeddings and "lm_head.weight" in found:  # a tied head saved anyway: a copy of the embedding
        expected["lm_head.weight"] = expected[emb]
    diff = first_difference(expected, found)
    if diff is None:
        return
    kind, name, count = diff
    if kind == "missing":
        raise UserError(f"weights are missing '{name}' (expected by a {arch} config): the folder's weights "
                        "do not match its config.json")
    if kind == "shape":
        raise UserError(f"tensor '{name}' is {fmt_shape(found[name])} in the weights but config.json implies "
                        f"{fmt_shape(expected[name])}: {fix}")
    raise UserError(f"{count} tensors in the weights are not part of a {arch} model of this config "
                    f"(e.g. {quote(name)}): the folder's weights do not match its config.json")


def _check_tokenizer_fits(tokenizer_file: Path, vocab_size: int) -> None:
    if tokenizer_file.is_file():
        n_tok = _tokenizer_size(tokenizer_file)
        if n_tok > vocab_size:
            raise UserError(f"vocab mismatch: {tokenizer_file} has {n_tok} tokens but config.json says vocab_size="
                            f"{vocab_size}: the tokenizer does not belong to this model")


def _read_checked_weights(hf_dir: Path, cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """The folder's tensors under HF names, after checking the shapes the files declare against `cfg`."""
    files = hf_weight_files(hf_dir)
    hf_sd = _read_bin(files[0]) if files[0].suffix == ".bin" else None  # pickled: no header to read first
    shapes = ({k: tuple(v.shape) for k, v in hf_sd.items()} if hf_sd is not None
              else {k: s for f in files for k, s in safetensors_shapes(f).items()})
    check_hf_shapes(shapes, cfg, arch)
    return hf_sd if hf_sd is not None else _read_safetensors(files)


def read_hf_model(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(our ModelConfig, the weights under our names: fp32, real vocab rows only) of a local Hugging Face
    folder written by `export_model` or by transformers (GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM).
    The folder is untrusted: config.json is checked against the shapes in the weight files' headers before
    any tensor is read."""
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf)
    arch = _hf_arch(hf)
    _check_tokenizer_fits(hf_dir / "tokenizer.json", cfg.vocab_size)
    hf_sd = _read_checked_weights(hf_dir, cfg, arch)
    ours = hf.get("antimatter") if isinstance(hf.get("antimatter"), dict) else {}
    if arch == "GPT2LMHeadModel" and ours.get("bias") is False:
        # exported from a bias-free model: HF GPT-2 needed zero biases; drop them again if still zero
        names = _normalise_hf_names(hf_sd, arch)
        if all(not v.any() for k, v in names.items() if k.endswith(".bias")):
            cfg.bias = False
    return cfg, from_hf_state_dict(hf_sd, cfg, arch)


def fit_weights(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights under our names with real vocab rows -> the state dict of `GPT(cfg)`: the embedding (and head)
    padded with zero rows to the padded vocabulary, learned positions cut to the context, the tied head the
    embedding itself."""
    out = dict(sd)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        if name in out:
            w = out[name]
            out[name] = torch.cat([w, w.new_zeros(cfg.padded_vocab_size - w.shape[0], w.shape[1])])
    if "transformer.wpe.weight" in out:
        out["transformer.wpe.weight"] = out["transformer.wpe.weight"][: cfg.block_size]
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def load_hf_model(hf_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Our GPT (fp32, eval mode) from a local Hugging Face folder (see `read_hf_model`)."""
    cfg, sd = read_hf_model(hf_dir)
    model = GPT(cfg)
    model.load_state_dict(fit_weights(sd, cfg))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------- train.init_from

INIT_FIELDS = {  # what must agree between the source and the run's model: ModelConfig property -> model key
    "arch": "arch", "n_layer": "n_layer", "n_head": "n_head", "kv_heads": "n_kv_head", "d_model": "d_model",
    "ffn_dim": "d_ff", "bias": "bias", "qk_norm": "qk_norm", "tie_embeddings": "tie_embeddings",
    "norm_type": "norm", "position_type": "position", "activation_type": "activation",
}


def _yaml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_init_model(path: Path, src: ModelConfig, cfg: ModelConfig) -> None:
    """The folder's model against the run's `model` section, each difference one line naming the key."""
    if src.vocab_size != cfg.vocab_size:
        raise UserError(f"vocab mismatch: {path} has vocab_size={src.vocab_size} but model.vocab_size="
                        f"{cfg.vocab_size}: set model.vocab_size={src.vocab_size} and use that model's tokenizer")
    for prop, key in INIT_FIELDS.items():
        theirs, ours = _yaml_value(getattr(src, prop)), _yaml_value(getattr(cfg, prop))
        if theirs != ours:
            raise UserError(f"train.init_from: {path} has {key}={theirs} but this run's model has {key}={ours}: "
                            f"set model.{key}={theirs}")
    if src.position_type == "learned" and src.block_size < cfg.block_size:
        raise UserError(f"train.init_from: {path} has block_size={src.block_size}, shorter than this run's "
                        f"model.block_size={cfg.block_size} (learned positions cannot grow): set "
                        f"model.block_size={src.block_size} or less")


def _check_init_tokenizer(hf_dir: Path, tokenizer_file: Path | None, tokenizer_sha256: str | None) -> None:
    """The folder's tokenizer.json against the run's: the same file, or the same token -> id map (transformers
    rewrites tokenizer.json when it saves one). Passes where either side has nothing to compare."""
    theirs = hf_dir / "tokenizer.json"
    ours = Path(tokenizer_file) if tokenizer_file and Path(tokenizer_file).is_file() else None
    expected = tokenizer_sha256 or (sha256_file(ours) if ours else None)
    if not theirs.is_file() or expected is None or sha256_file(theirs) == expected:
        return
    if ours is not None and _read_tokenizer(ours).get_vocab() == _read_tokenizer(theirs).get_vocab():
        return
    raise UserError(f"train.init_from: {theirs} is another tokenizer than this run's "
                    f"({ours or 'sha256 ' + expected[:12]}), so its token ids would stand for other text: start "
                    f"from a model made with this run's tokenizer, or train the run with that model's tokenizer")


def init_weights_from(path: str | Path, cfg: ModelConfig, tokenizer_file: str | Path | None = None,
                      tokenizer_sha256: str | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """`train.init_from`: (the folder the weights came from, a state dict for `GPT(cfg)`) from a Hugging Face
    folder (one with config.json) or an AntiMatter run, checkpoints or step folder. The run's tokenizer
    (`tokenizer_file`, or its `tokenizer_sha256`) must be the source's; an HF model must also have the run's
    architecture and shapes (its context may be longer). Each mismatch is one UserError line."""
    path = Path(path)
    if not (path / "config.json").is_file():
        src = resolve_checkpoint(path, "latest")
        check_checkpoint_tokenizer(src, tokenizer_file, "train from", tokenizer_sha256)
        return src, load_weights(src, cfg.tie_embeddings)
    _check_init_tokenizer(path, Path(tokenizer_file) if tokenizer_file else None, tokenizer_sha256)
    src_cfg, sd = read_hf_model(path)
    _check_init_model(path, src_cfg, cfg)
    return path, fit_weights(sd, cfg)


# -------------------------------------------------------------------------------------- run wrappers


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def export_hf(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best", dtype: str = "fp32") -> Path:
    """`antimatter export`: a run's checkpoint (best, latest, a step folder name of the run, or a checkpoint
    folder) -> Hugging Face folder, with the run's tokenizer, data statistics and evaluation figures in the
    card."""
    run_dir = Path(run_dir)
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype '{dtype}': choose fp32, fp16 or bf16")
    if checkpoint in ("best", "latest") or not Path(checkpoint).is_dir():  # or a step folder name in the run
        if not run_dir.is_dir():
            raise UserError(f"run folder not found: {run_dir} (pass --run RUN or --name NAME)")
        model, run_cfg, ckpt_dir = load_model(run_dir, checkpoint)
    else:
        model, run_cfg, ckpt_dir = load_model(Path(checkpoint))
        if not run_dir.is_dir():  # a checkpoint folder lives at RUN/checkpoints/step_N
            run_dir = Path(ckpt_dir).parent.parent
    tok = run_dir / "tokenizer" / "tokenizer.json"
    check_checkpoint_tokenizer(Path(ckpt_dir), tok, "export")
    ev = _read_json(run_dir / "results" / "evaluations" / "final_evaluation.json")
    card = {"name": run_dir.name, "source": f"{run_dir}/checkpoints/{Path(ckpt_dir).name}",
            "checkpoint": Path(ckpt_dir).name,
            "data_statistics": _read_json(run_cfg.data_dir_of(run_dir) / "dataset_statistics.json"),
            "evaluation": ev}
    if ev:  # which checkpoint the figures belong to: eval writes {"checkpoint": {"path": ...}}
        which = ev.get("checkpoint")
        card["evaluation_checkpoint"] = which.get("path") if isinstance(which, dict) else which
    if not tok.is_file():
        print(f"warning: {run_dir} has no tokenizer ({tok}): the export holds the model only, and "
              f"AutoTokenizer.from_pretrained cannot load it", file=sys.stderr)
    out = export_model(model, out_dir, dtype, tok if tok.is_file() else None, card)
    size = (out / "model.safetensors").stat().st_size
    print(f"exported {run_dir.name} ({Path(ckpt_dir).name}, {model.num_params():,} params, {dtype}) -> {out} "
          f"[{hf_architecture(model.cfg)}, model.safetensors {size / 1e6:.1f} MB]")
    return out


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# what a Hub snapshot needs for import: the config, the weights (safetensors, else the legacy .bin), the tokenizer
_HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "*.safetensors", "*.safetensors.index.json"]
_HUB_LEGACY_WEIGHTS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def resolve_hf_source(source: str | Path) -> Path:
    """The local folder of `source`. A path that exists is that folder, always; otherwise a Hugging Face Hub
    id (`gpt2`, `org/name`) is found in the Hub cache or downloaded into it by huggingface_hub (which reads
    HF_HUB_CACHE and HF_HUB_OFFLINE), fetching only what import reads. Anything else is returned as it is,
    for the folder checks to name."""
    path = Path(source)
    if path.exists() or not _HUB_ID.fullmatch(str(source)):
        return path
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"{source} is not a local folder, and fetching it as a Hugging Face Hub id needs "
                        f"huggingface_hub: pip install 'antimatter[hf]'") from None
    try:
        snap = Path(snapshot_download(repo_id=str(source), allow_patterns=_HUB_FILES))
        if not any(snap.glob("*.safetensors")):
            snap = Path(snapshot_download(repo_id=str(source), allow_patterns=_HUB_FILES + _HUB_LEGACY_WEIGHTS))
        return snap
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE=1 keeps the Hub out of reach" if constants.HF_HUB_OFFLINE
               else "the Hub cannot be reached")
        raise UserError(f"{source} is neither a local folder nor a model in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}), and {why}: check the path, or fetch the model once with "
                        f"network access") from None
    except (HfHubHTTPError, HFValidationError) as e:
        raise UserError(f"{source} is neither a local folder nor a model the Hugging Face Hub gives "
                        f"({type(e).__name__}: {shorten(str(e).splitlines()[0], 80)}): check the path or the id "
                        f"(org/name); a private model needs `hf auth login`") from None


def import_hf(hf_source: str | Path, out_run_dir: str | Path) -> Path:
    """`antimatter import`: a local Hugging Face folder or a Hub id (`resolve_hf_source`) -> a run folder
    (checkpoint, tokenizer, config.yaml) that eval, generate, export and `train.init_from` / resume can use."""
    hf_dir, out = resolve_hf_source(hf_source), Path(out_run_dir)
    model = load_hf_model(hf_dir)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise UserError(f"{out} already has checkpoints: choose a new --out folder")
    tok = hf_dir / "tokenizer.json"
    mine = out / "tokenizer" / "tokenizer.json"
    if tok.is_file() and mine.is_file() and mine.read_bytes() != tok.read_bytes():
        raise UserError(f"{out} already has another tokenizer ({mine}), which its tokens were made with: choose "
                        f"a new --out folder; nothing was changed")
    cfg = RunConfig(name=out.name, runs_dir=str(out.parent))
    cfg.model = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    if tok.is_file():
        (out / "tokenizer").mkdir(exist_ok=True)
        shutil.copyfile(tok, out / "tokenizer" / "tokenizer.json")
        cfg.tokenizer.vocab_size = _tokenizer_size(tok)
    save_config(cfg, out / "config.yaml")
    state = {"step": 0, "tokens_seen": 0, "imported_from": str(hf_dir.resolve()),
             "tokenizer_sha256": sha256_file(tok) if tok.is_file() else None}  # pairs the run with its tokenizer
    ckpt = save_checkpoint(out / "checkpoints", 0, model.state_dict(), state, cfg, best=True)
    where = str(hf_source) if Path(hf_source) == hf_dir else f"{hf_source} ({hf_dir})"
    print(f"imported {where} ({model.num_params():,} params, {cfg.model.arch}) -> {out} "
          f"[{ckpt.relative_to(out)}{', tokenizer' if tok.is_file() else ''}]")
    return out
