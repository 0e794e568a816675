"""The model's recipe switches one by one (norm, position, activation, zero-initialised projections, logit
soft-capping), export's refusal of what transformers cannot compute, the modern recipe learning on the CPU,
and the validation of the new settings."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from train_helpers import VOCAB, losses, make_tokens, one_thread, tiny_config

from antimatter import checkpoint as ck
from antimatter.config import ConfigError, load_config, preset_model
from antimatter.errors import UserError
from antimatter.export import export_model, hf_architecture
from antimatter.model.gpt import GPT, RMSNorm
from antimatter.model.sizing import param_counts
from antimatter.train.trainer import train

assert one_thread  # the autouse fixture, imported so pytest uses it here

ROOT = Path(__file__).resolve().parents[1]
LEARN = dict(max_steps=60, micro_batch_size=8, lr=1e-2, warmup_steps=4, eval_interval=0, ckpt_interval=0)


def _cfg(preset: str = "tiny", **model):
    return dataclasses.replace(preset_model(preset), **model)


def _gpt(preset: str = "tiny", **model) -> GPT:
    torch.manual_seed(0)
    return GPT(_cfg(preset, **model))


def _assert_counts(model: GPT) -> None:
    """sizing.param_counts from the config alone equals the module's parameters (no vocabulary padding here)."""
    assert model.cfg.padded_vocab_size == model.cfg.vocab_size
    c = param_counts(model.cfg)
    assert sum(p.numel() for p in model.parameters()) == c["total"] == model.num_params()
    embed = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert sum(p.numel() for n, p in model.named_parameters() if n not in embed) == c["non_embedding"]


def _batch(seed: int = 0, batch: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- norm


def test_rmsnorm_on_gpt2():
    model = _gpt(norm="rmsnorm")
    norms = [model.transformer.ln_f] + [m for b in model.transformer.h for m in (b.ln_1, b.ln_2)]
    assert all(isinstance(m, RMSNorm) for m in norms)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert not any(n.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")) for n, _ in model.named_parameters())
    assert model.transformer.h[0].attn.c_attn.bias is not None  # the Linear biases of gpt2 stay
    _assert_counts(model)
    x = torch.randn(3, 32)
    norm = model.transformer.ln_f
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps) * norm.weight
        assert torch.allclose(norm(x), expected, atol=1e-6)
    assert not model.cfg.is_family_standard
    # and the reverse: LayerNorm in a llama model
    llama = _gpt("llama-tiny", norm="layernorm")
    assert isinstance(llama.transformer.ln_f, nn.LayerNorm) and llama.transformer.ln_f.bias is None  # bias=false
    _assert_counts(llama)


# ------------------------------------------------------------------------------------------- position


def test_rope_on_gpt2_has_no_position_table():
    model = _gpt(position="rope")
    assert "wpe" not in model.transformer and not any("wpe" in n for n in model.state_dict())
    assert all(b.attn.use_rope for b in model.transformer.h)
    assert model.rope_cos.shape == (model.cfg.block_size, model.cfg.head_dim // 2)
    _assert_counts(model)
    assert param_counts(model.cfg)["wpe"] == 0
    learned = _gpt()
    assert param_counts(learned.cfg)["total"] - param_counts(model.cfg)["total"] == 64 * 32  # block_size x d
    # the rotation is what carries position: without it the logits change
    idx = _batch()
    model.eval()
    with torch.no_grad():
        rotated = model(idx)
        for b in model.transformer.h:
            b.attn.use_rope = False
        plain = model(idx)
    assert rotated.shape == (2, 16, VOCAB) and not torch.allclose(rotated, plain, atol=1e-4)
    # and the reverse: learned positions in a llama model
    llama = _gpt("llama-tiny", position="learned")
    assert "wpe" in llama.transformer and not hasattr(llama, "rope_cos")
    _assert_counts(llama)


def test_rope_rotates_each_query_and_key_pair_by_its_position():
    """The attention rotates queries and keys as one tensor (fewer kernels when decoding eagerly); the result is
    the textbook rotation, each (i, i + D/2) pair of every query and key head turned by position x theta_i,
    with grouped key/value heads and QK-norm in the way."""
    model = _gpt("llama-tiny", qk_norm=True).eval()
    attn, cfg = model.transformer.h[0].attn, model.cfg
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    assert Hkv < H
    seen = {}
    attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    idx = _batch()
    with torch.no_grad():
        model(idx)
        x, T = seen["x"], idx.shape[1]
        q, k, v = attn.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = (t.view(2, T, -1, D).transpose(1, 2) for t in (q, k, v))
        q, k = attn.q_norm(q), attn.k_norm(k)
        theta = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        turn = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            pairs = torch.complex(t[..., : D // 2].double(), t[..., D // 2:].double()) * turn
            return torch.cat([pairs.real, pairs.imag], dim=-1).float()

        y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True, enable_gqa=True)
        expected = attn.c_proj(y.transpose(1, 2).reshape(2, T, H * D))
    assert torch.allclose(seen["out"], expected, atol=1e-5)


def test_qk_norm_under_autocast_computes_in_fp32_without_a_warning(recwarn):
    """bf16 queries and an fp32 gain (QK-norm under autocast): one fp32 computation, cast back, and no
    "Mismatch dtype ... Cannot dispatch to fused implementation" warning in the user's eval log."""
    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16 and not [w for w in recwarn if "dtype" in str(w.message)]
    xf = x.float()
    expected = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(y.float(), expected, atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------- activation


@pytest.mark.parametrize("preset,activation", [("tiny", "relu2"), ("tiny", "swiglu"), ("llama-tiny", "relu2"),
                                               ("llama-tiny", "gelu")])
def test_activation_switch(preset, activation):
    """d_model 96: SwiGLU's hidden size (8/3 d rounded up to 64: 256) differs from 4 d (384) there."""
    model = _gpt(preset, activation=activation, d_model=96, n_head=2, n_kv_head=None)
    cfg = model.cfg
    d = cfg.d_model
    hidden = 256 if activation == "swiglu" else 4 * d
    assert cfg.ffn_dim == hidden
    mlp = model.transformer.h[0].mlp
    assert mlp.c_fc.weight.shape == ((2 * hidden if activation == "swiglu" else hidden), d)
    assert mlp.c_proj.weight.shape == (d, hidden)
    _assert_counts(model)
    # the MLP computes the activation it names
    x = torch.randn(2, 5, d)
    norm = model.transformer.h[0].ln_2
    with torch.no_grad():
        h = F.linear(norm(x), mlp.c_fc.weight, mlp.c_fc.bias)
        if activation == "swiglu":
            gate, up = h[..., :hidden], h[..., hidden:]
            h = gate * torch.sigmoid(gate) * up
        elif activation == "relu2":
            h = torch.clamp(h, min=0) ** 2
        else:
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        expected = F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        assert torch.allclose(mlp(norm(x)), expected, atol=1e-5)


# -------------------------------------------------------------------------------- zero-initialised projections


def test_zero_init_proj_starts_every_block_as_the_identity_and_still_learns(tmp_path):
    model = _gpt(zero_init_proj=True)
    proj = {n: p for n, p in model.named_parameters() if n.endswith("c_proj.weight")}
    assert len(proj) == 2 * model.cfg.n_layer and all(torch.count_nonzero(p) == 0 for p in proj.values())
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters()
               if n.endswith(("c_attn.weight", "c_fc.weight")))
    # each block adds nothing at first: the output is the embedding through ln_f and the head
    idx = _batch()
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))
        assert torch.allclose(model(idx), model.lm_head(model.transformer.ln_f(x)), atol=1e-5)
    # the gradient reaches the zero projections (their input is not zero) and the embeddings (the residual
    # path); the matrices before a zero projection get exactly none on the first step
    model(idx, idx).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n].abs().sum() > 0 for n in proj)
    assert grads["transformer.wte.weight"].abs().sum() > 0
    assert all(torch.count_nonzero(grads[n]) == 0 for n in grads if n.endswith(("c_attn.weight", "c_fc.weight")))
    # a few real steps: the loss falls and the projections and the matrices behind them move
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, **LEARN)
    cfg.model.zero_init_proj = True
    train(cfg, run)
    curve = losses(run)
    assert sum(curve[s] for s in (58, 59, 60)) / 3 < curve[1] - 1.0, curve
    trained, _, _ = ck.load_model(run)
    start = _gpt(zero_init_proj=True)
    for n, p in trained.named_parameters():
        if n.endswith("c_proj.weight"):
            assert torch.count_nonzero(p) > 0, n
        if n.endswith(("c_attn.weight", "c_fc.weight")):
            assert not torch.equal(p, dict(start.named_parameters())[n]), n


# ------------------------------------------------------------------------------------- logit soft-capping


def test_logit_softcap_bounds_the_logits_and_the_loss_uses_them():
    cap = 2.0
    capped = _gpt(logit_softcap=cap)
    raw = GPT(dataclasses.replace(capped.cfg, logit_softcap=0.0))
    with torch.no_grad():
        capped.lm_head.weight.mul_(200)  # tied: large logits, well past the cap
    raw.load_state_dict(capped.state_dict())
    idx, targets = _batch(1), _batch(2)
    with torch.no_grad():
        r, c = raw(idx), capped(idx)
        assert r.abs().max() > 3 * cap
        assert c.abs().max() <= cap
        assert torch.allclose(c, cap * torch.tanh(r / cap), atol=1e-5)
        loss = capped(idx, targets)
        assert torch.isfinite(loss)
        # the training loss is the cross-entropy of the capped logits, chunked or not
        expected = F.cross_entropy(c.reshape(-1, VOCAB), targets.reshape(-1))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        capped.loss_chunk_tokens = 7
        assert capped(idx, targets).item() == pytest.approx(expected.item(), rel=1e-5)
        # the bound holds the loss below what the uncapped logits give here
        assert loss < raw(idx, targets)
    # gradients stay finite
    capped.loss_chunk_tokens = 0
    capped(idx, targets).backward()
    assert all(torch.isfinite(p.grad).all() for p in capped.parameters())


# -------------------------------------------------------------------------------------- training, each switch


@pytest.mark.parametrize("switch", [dict(norm="rmsnorm"), dict(position="rope"), dict(activation="relu2"),
                                    dict(activation="swiglu"), dict(logit_softcap=15.0)],
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_each_switch_trains(tmp_path, switch):
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, **LEARN)
    cfg.model = dataclasses.replace(cfg.model, **switch)
    s = train(cfg, run)
    curve = losses(run)
    assert s["nonfinite_steps"] == 0 and all(math.isfinite(v) for v in curve.values())
    # measured: 6.25 -> 4.3-4.8 (the mean of the last three steps) for every switch, 4.77 for plain gpt2
    assert sum(curve[k] for k in (58, 59, 60)) / 3 < curve[1] - 1.0, curve
    assert s["params"] == param_counts(cfg.model)["total"]


# --------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("preset,switch,named", [
    ("tiny", dict(norm="rmsnorm"), "norm=rmsnorm"),
    ("tiny", dict(position="rope"), "position=rope"),
    ("tiny", dict(activation="relu2"), "activation=relu2"),
    ("tiny", dict(activation="swiglu"), "activation=swiglu"),
    ("tiny", dict(logit_softcap=15.0), "logit_softcap=15"),
    ("llama-tiny", dict(activation="relu2"), "activation=relu2"),
    ("llama-tiny", dict(norm="layernorm"), "norm=layernorm"),
    ("llama-tiny", dict(position="learned"), "position=learned"),
    ("llama-tiny", dict(activation="gelu", logit_softcap=30.0), "logit_softcap=30"),
])
def test_export_refuses_a_non_standard_model(tmp_path, preset, switch, named):
    model = _gpt(preset, **switch)
    out = tmp_path / "hf"
    with pytest.raises(UserError) as e:
        export_model(model, out)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot export a model whose blocks mix families")
    assert named in msg and f"arch={model.cfg.arch}" in msg
    assert "model.norm/position/activation=auto" in msg and "no logit soft-capping" in msg
    assert not out.exists()  # refused before anything was written


def test_export_accepts_the_standard_parts_spelled_out_and_zero_init(tmp_path):
    """norm/position/activation set to what the arch implies, and zero_init_proj (an initialisation, not a
    different function), export as before."""
    assert hf_architecture(_cfg(norm="layernorm", position="learned", activation="gelu")) == "GPT2LMHeadModel"
    assert hf_architecture(_cfg("llama-tiny", norm="rmsnorm", position="rope", activation="swiglu")) == \
        "Qwen3ForCausalLM"
    out = export_model(_gpt(zero_init_proj=True), tmp_path / "hf")
    assert json.loads((Path(out) / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


# ----------------------------------------------------------------------------------------- the modern recipe


def test_modern_recipe_learns_on_the_cpu(tmp_path):
    """configs/recipes/modern.yaml (llama blocks, QK-norm, ReLU^2, zero-init projections, untied head with
    soft-capped logits, Muon + AdamW with its own embedding rate, WSD) at a tiny size on the CPU: its
    optimiser settings unchanged, 40 steps take the val loss from ln(512) = 6.24 to about 4.4."""
    run = make_tokens(tmp_path / "run")
    overrides = ["model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.block_size=64",
                 f"model.vocab_size={VOCAB}", "train.seq_len=32", "train.micro_batch_size=8",
                 "train.global_batch_tokens=256", "train.max_minutes=0", "train.max_steps=40", "train.compile=false",
                 "train.device=cpu", "train.dtype=fp32", "train.eval_interval=10", "train.eval_steps=4",
                 "train.log_interval=1", "name=run", f"runs_dir={tmp_path}"]
    cfg = load_config(ROOT / "configs" / "recipes" / "modern.yaml", overrides)
    m, t = cfg.model, cfg.train
    assert (m.arch, m.activation_type, m.zero_init_proj, m.tie_embeddings, m.logit_softcap, m.qk_norm) == \
        ("llama", "relu2", True, False, 15.0, True)
    assert (t.optimizer, t.schedule, t.embed_lr) == ("muon", "wsd", 0.2)
    s = train(cfg, run)
    assert s["steps"] == 40 and s["nonfinite_steps"] == 0
    rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    first_loss = next(r["loss"] for r in rows if "loss" in r)
    assert first_loss == pytest.approx(math.log(VOCAB), abs=0.05)  # zero-init blocks, small head: uniform
    assert len(vals) == 4 and vals[-1] < vals[0] - 1.0 and vals[-1] < math.log(VOCAB) - 1.2, vals
    state = ck.load_train_state(Path(s["checkpoint"]))
    assert "momentum_buffer" in state["optimizer"]["state"]["transformer.h.0.mlp.c_fc.weight"]  # Muon ran


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("override,key", [
    ("train.optimizer=sgd", "train.optimizer"),
    ("model.activation=tanh", "model.activation"),
    ("model.norm=batchnorm", "model.norm"),
    ("model.position=alibi", "model.position"),
    ("model.logit_softcap=-1", "model.logit_softcap"),
    ("model.logit_softcap=inf", "model.logit_softcap"),
    ("train.lr=nan", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.max_minutes=inf", "train.max_minutes"),
    ("train.max_minutes=-1", "train.max_minutes"),
    ("train.muon_lr=-0.02", "train.muon_lr"),
    ("train.muon_momentum=nan", "train.muon_momentum"),
    ("train.embed_lr=-1", "train.embed_lr"),
])
def test_bad_settings_name_their_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_budget_evals_checked_with_a_budget():
    with pytest.raises(ConfigError, match="train.budget_evals"):
        load_config(None, ["train.max_minutes=1", "train.budget_evals=-1"])
    load_config(None, ["train.max_minutes=1", "train.optimizer=muon", "model.activation=relu2",
                       "model.logit_softcap=30", "model.norm=rmsnorm", "model.position=rope"])
