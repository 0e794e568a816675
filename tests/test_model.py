"""The Transformer: the KV cache and left padding give the same logits as a full forward, the loss ignores
-1 targets and is the same chunked or not, the vocabulary padding never shows, and the parameter count is
taken at the real vocabulary. (Activation checkpointing is applied from outside: tests/test_parallelize.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from antimatter.config import preset_model
from antimatter.model.gpt import GPT
from antimatter.model.sizing import param_counts

# vocab 300 is not a multiple of 64: the embedding is padded to 320 rows inside the model
VARIANTS = {
    "gpt2": dict(preset="tiny", vocab_size=300),
    "gpt2-untied-nobias": dict(preset="tiny", vocab_size=300, tie_embeddings=False, bias=False),
    "llama-gqa-qknorm": dict(preset="llama-tiny", vocab_size=300),  # 4 heads over 2 kv heads, QK-norm, untied
    "llama-mha": dict(preset="llama-tiny", vocab_size=300, n_kv_head=None, qk_norm=False, tie_embeddings=True),
}


def make_model(variant: str, seed: int = 0, **extra) -> GPT:
    over = {**VARIANTS[variant], **extra}
    cfg = dataclasses.replace(preset_model(over.pop("preset")), init_std=0.1, **over)
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # perturb norm gains and biases too, so every tensor matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(model: GPT, B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_prefill_and_decode_equal_full_forward(variant):
    model = make_model(variant)
    idx = tokens(model, 2, 24)
    with torch.no_grad():
        full = model(idx)
        model.setup_caches(2, 32)
        parts = [model(idx[:, :10], input_pos=torch.arange(10))]  # prefill
        for t in range(10, 24):  # then one token at a time
            parts.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
        model.clear_caches()
    cached = torch.cat(parts, dim=1)
    assert cached.shape == full.shape == (2, 24, 300)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_batch_equals_single_rows(variant):
    model = make_model(variant)
    rows = [tokens(model, 1, n, seed=n)[0] for n in (16, 9, 1)]
    T = max(len(r) for r in rows)
    pad = torch.tensor([T - len(r) for r in rows])
    batch = torch.full((len(rows), T), 7)  # the pad id must not matter: use a real token
    for i, r in enumerate(rows):
        batch[i, T - len(r):] = r
    nxt = torch.tensor([[3], [5], [11]])
    with torch.no_grad():
        model.setup_caches(len(rows), T + 4)
        prefill = model(batch, input_pos=torch.arange(T), left_pad=pad)
        step = model(nxt, input_pos=torch.tensor([T]), left_pad=pad)
        model.clear_caches()
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, nxt[i]])[None])[0]
            assert torch.isfinite(prefill[i, pad[i]:]).all()
            torch.testing.assert_close(prefill[i, pad[i]:], alone[:-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[i, 0], alone[-1], atol=1e-5, rtol=1e-5)


def test_cache_needs_input_pos_and_fits_the_context():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="model's context is 64"):
        model.setup_caches(1, 65)
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="pass input_pos"):
        model(tokens(model, 1, 4))
    model.clear_caches()
    assert model(tokens(model, 1, 4)).shape == (1, 4, 300)  # back to the plain forward


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-qknorm"])
def test_loss_ignores_minus_one_targets(variant):
    model = make_model(variant)
    idx, targets = tokens(model, 2, 16), tokens(model, 2, 16, seed=2)
    targets[0, :5] = -1
    targets[1, 10:] = -1
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # every target ignored: zero, not NaN
        assert model(idx, torch.full_like(targets, -1)).item() == 0.0


def _loss_and_grads(model: GPT, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-qknorm", "llama-softcap"])
def test_chunked_loss_equals_unchunked(variant):
    """The fused head + cross-entropy (gradients computed chunk by chunk in forward) gives the plain loss's
    loss and every parameter's gradient, padding columns and ignored targets and soft-capping included."""
    model = (make_model("llama-gqa-qknorm", logit_softcap=2.0) if variant == "llama-softcap"
             else make_model(variant)).train()
    idx, targets = tokens(model, 3, 20), tokens(model, 3, 20, seed=3)
    targets[1, :4] = -1
    ref_loss, ref_grads = _loss_and_grads(model, idx, targets)
    model.loss_chunk_tokens = 7  # 60 tokens in chunks of 7, 7, ..., 4
    loss, grads = _loss_and_grads(model, idx, targets)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_loss_under_autocast_and_compile():
    """In bfloat16 autocast the fused loss stays within bfloat16 rounding of the plain one, compiled or not
    (torch.compile traces the chunk loop and the custom backward)."""
    model = make_model("llama-gqa-qknorm").train()
    idx, targets = tokens(model, 2, 24), tokens(model, 2, 24, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(model, idx, targets)
        model.loss_chunk_tokens = 16
        for run in (model, torch.compile(model)):
            loss, grads = _loss_and_grads(run, idx, targets)
            grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}
            torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=1e-2)
            assert grads.keys() == ref_grads.keys()
            for name in grads:  # bfloat16 keeps ~3 digits: within a few units of its last place at the scale
                scale = ref_grads[name].abs().max()
                assert (grads[name] - ref_grads[name]).abs().max() <= 0.03 * scale, name


@pytest.mark.parametrize("variant", ["gpt2", "gpt2-untied-nobias", "llama-gqa-qknorm"])
def test_padded_vocab_columns_never_get_probability(variant):
    model = make_model(variant)
    V, Vp = model.cfg.vocab_size, model.cfg.padded_vocab_size
    assert (V, Vp) == (300, 320)
    assert model.lm_head.weight.shape[0] == Vp
    idx, targets = tokens(model, 2, 12), tokens(model, 2, 12, seed=5)
    with torch.no_grad():
        before_logits, before_loss = model(idx), model(idx, targets)
        model.lm_head.weight[V:] = 100.0  # padding rows that would win every argmax if they were used
        logits, loss = model(idx), model(idx, targets)
    assert logits.shape == (2, 12, V)
    torch.testing.assert_close(logits, before_logits)
    torch.testing.assert_close(loss, before_loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))


@pytest.mark.parametrize("variant", ["gpt2", "gpt2-untied-nobias"])
def test_loss_masking_the_vocab_padding_equals_slicing_it(variant):
    """The loss sets the padding columns to -inf instead of slicing them off (aligned rows for the fused
    softmax kernels): the same loss and gradients, and none reaches the padding rows of the head."""
    results = {}
    for mode in ("slice", "mask"):
        model = make_model(variant)
        model.ce_padding = mode
        idx, targets = tokens(model, 2, 12), tokens(model, 2, 12, seed=5)
        loss = model(idx, targets)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                         model.lm_head.weight.grad.clone())
    torch.testing.assert_close(results["mask"][0], results["slice"][0])
    for name, grad in results["mask"][1].items():
        torch.testing.assert_close(grad, results["slice"][1][name], msg=name)
    assert results["mask"][2][300:].abs().max() == 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_num_params_counts_the_real_vocab(variant):
    model = make_model(variant)
    cfg = model.cfg
    pad_rows = cfg.padded_vocab_size - cfg.vocab_size
    heads = 1 if cfg.tie_embeddings else 2
    stored = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert model.num_params() == stored - heads * pad_rows * cfg.d_model
    embedding = heads * cfg.vocab_size * cfg.d_model + (cfg.block_size * cfg.d_model if cfg.arch == "gpt2" else 0)
    assert model.num_params(non_embedding=True) == model.num_params() - embedding
    counts = param_counts(cfg)
    assert (counts["total"], counts["non_embedding"]) == (model.num_params(), model.num_params(non_embedding=True))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_model_built_for_weights_equals_the_model_they_came_from(variant):
    """GPT.for_weights skips initialisation: once loaded it is the same model (buffers, tying, outputs)."""
    model = make_model(variant)
    loaded = GPT.for_weights(model.cfg)
    assert loaded.load_state_dict(model.state_dict()) is not None
    loaded.eval()
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(loaded.named_buffers())[name]), name
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == model.cfg.tie_embeddings
    x = tokens(model, 2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_sequence_longer_than_block_size_raises():
    model = make_model("gpt2")
    assert model(tokens(model, 1, 64)).shape == (1, 64, 300)  # exactly the context is fine
    with pytest.raises(ValueError, match="sequence of 65 tokens is longer than the model's context \\(64\\)"):
        model(tokens(model, 1, 65))


def test_parameter_names_follow_hf_gpt2():
    names = set(make_model("gpt2").state_dict())
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.1.ln_2.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight",
              "lm_head.weight"):
        assert n in names, n
    tied = make_model("gpt2")
    assert tied.lm_head.weight is tied.transformer.wte.weight
    llama = make_model("llama-gqa-qknorm")
    assert "transformer.wpe.weight" not in llama.state_dict()
    c = llama.cfg  # q, k, v stacked: n_head + 2 * n_kv_head heads; SwiGLU's gate and up stacked
    assert llama.transformer.h[0].attn.c_attn.weight.shape == ((c.n_head + 2 * c.kv_heads) * c.head_dim, c.d_model)
    assert llama.transformer.h[0].mlp.c_fc.weight.shape == (2 * c.ffn_dim, c.d_model)
