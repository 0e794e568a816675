"""The Transformer, readable top to bottom.

One config builds two families:
  * GPT-2 style (`arch: gpt2`): learned positions, pre-LayerNorm, GELU MLP, biases, tied embeddings.
  * Llama style (`arch: llama`): RoPE, pre-RMSNorm, SwiGLU MLP, no biases, grouped-query attention,
    optional QK-norm.
Each part can also be set on its own (`norm`, `position`, `activation`: ReLU squared too; zero-initialised
residual projections; logit soft-capping), which is how the training recipes measure what each one buys.

Parameter names follow Hugging Face GPT-2 (`transformer.wte`, `transformer.h.N.attn.c_attn`, ...), so
export to transformers is a name map (plus a transpose of its Conv1D weights) and a logits-parity test.

Two ways to run it:
  * training / scoring: `model(idx, targets)` returns the mean loss; `model(idx)` returns logits. Attention
    is `scaled_dot_product_attention(is_causal=True)`, which picks flash kernels where they exist.
  * generation: `model.setup_caches(batch, max_seq)` preallocates a static KV cache; then
    `model(idx, input_pos=pos, left_pad=pad)` writes keys/values at `pos` and attends over the cache. Static
    shapes let the single-token step be compiled with CUDA graphs (gpt-fast's recipe). Faster single-row
    matmuls for that step are swapped in from outside for the call (model/decode.py), so this file stays the
    plain model that training runs. Training's activation checkpointing, fp8, sharding and compilation are
    applied from outside as well (train/parallelize.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from antimatter.config import ModelConfig
from antimatter.model.loss import linear_cross_entropy

INIT_FUNCTIONS = {"normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_", "constant_"}


class SkipInit(TorchFunctionMode):
    """Parameter initialisers as no-ops: for modules whose values are set next (GPT.reset_parameters, loaded
    weights) and for meta tensors, which have no values to fill (torch's meta kernels for normal_ and
    friends are Python code whose first use imports over a second of modules)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in INIT_FUNCTIONS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # QK-norm under autocast: bf16 queries, an fp32 gain. torch's fused
            # kernel wants one dtype (else it warns and runs op by op); fp32 is what that slow path computes in
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim/2) for rotary position embeddings. Under
    `torch.device("meta")` (a model built for its shapes only, model/shapes.py) they are empty: meta tensors
    have no values, and computing them would import torch's Python meta kernels (over a second)."""
    if torch.get_default_device().type == "meta":
        return torch.empty(max_len, head_dim // 2), torch.empty(max_len, head_dim // 2)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head, in fp32: the Hugging Face Llama convention,
    x * cos + rotate_half(x) * sin. x: (B, H, T, D); cos/sin: (B or 1, 1, T, D), each half's angles twice."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values in one buffer, (2, B, H_kv, max_seq, D), written in place at `input_pos`.
    One buffer means one write per layer and step (a single kernel under torch.compile) instead of two."""

    def __init__(self, batch: int, n_kv_head: int, max_seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (2, batch, n_kv_head, max_seq, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.kv.index_copy_(3, input_pos, torch.stack([k, v]).to(self.kv.dtype))
        return self.kv[0], self.kv[1]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(cfg.d_model, qkv_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.use_rope = cfg.position_type == "rope"
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:  # queries and keys rotated as one tensor: 8 kernel launches instead of 18 when decoding eagerly
            q, k = apply_rope(torch.cat([q, k], dim=1), *rope).split([self.n_head, self.n_kv_head], dim=1)
        gqa = self.n_kv_head != self.n_head
        if self.kv_cache is None:  # training / scoring: the whole sequence at once
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # generation: attend over the first kv_len slots of the static cache, with an explicit mask
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # kv_len None: the whole cache
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU (gpt2), SwiGLU (llama: c_fc holds gate and up projections side by side) or ReLU squared."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation_type
        hidden = cfg.ffn_dim
        self.c_fc = nn.Linear(cfg.d_model, 2 * hidden if self.activation == "swiglu" else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, input_pos=None, mask=None, kv_len=None):
        x = x + self.attn(self.ln_1(x), rope, input_pos, mask, kv_len)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        V = cfg.padded_vocab_size
        # reset_parameters sets every parameter: the modules' default initialisation would be drawn only to be
        # overwritten (1.5 of the 3.4 s it took to build seed-300m's modern shape on 2 CPU cores)
        with SkipInit():
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(V, cfg.d_model),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=make_norm(cfg, cfg.d_model),
            ))
            if cfg.position_type == "learned":
                self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.d_model)
            self.lm_head = nn.Linear(cfg.d_model, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.loss_chunk_tokens = 0  # >0: fused head + cross-entropy in chunks of this many tokens (model/loss.py)
        self.ce_padding = "mask"  # how the loss leaves out the vocabulary's padding columns: "mask" or "slice"
        self.init_buffers()
        self.reset_parameters()

    @classmethod
    def for_weights(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> GPT:
        """A model with its parameters allocated on `device` but not initialised, for weights that are loaded
        next (a checkpoint, an import) or drawn there by reset_parameters (a fresh run on its device): the
        CPU's random draws are most of the time to build a large model. Load with `strict` (or check missing
        keys): a parameter left out would hold whatever the memory held."""
        # allocated where it runs, straight away: building on the CPU and moving (or on "meta" and to_empty,
        # whose Python reference of empty_like costs seconds a model) copies or walks every tensor again
        with torch.device(device), SkipInit():
            return cls(cfg)

    def init_buffers(self) -> None:
        """The buffers no checkpoint holds (RoPE tables, the empty causal mask), on the weights' device."""
        device = self.transformer.wte.weight.device
        if self.cfg.position_type == "rope":  # computed on the CPU, as for every model so far, then moved
            with torch.device("meta" if device.type == "meta" else "cpu"):
                cos, sin = rope_tables(self.cfg.head_dim, self.cfg.block_size, self.cfg.rope_theta)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.register_buffer("causal_mask", torch.empty(0, dtype=torch.bool, device=device), persistent=False)

    # ------------------------------------------------------------------ initialisation and bookkeeping
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norms and biases
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):  # residual projections: scaled as in GPT-2, or zero
                if self.cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters at the real vocabulary size (padding rows of the embedding are not counted)."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if name in ("transformer.wte.weight", "lm_head.weight"):
                n = self.cfg.vocab_size * self.cfg.d_model
                if non_embedding:
                    n = 0
            if name == "transformer.wpe.weight" and non_embedding:
                n = 0
            total += n
        return total

    # ------------------------------------------------------------------------------------ generation
    def setup_caches(self, batch: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a static KV cache for `batch` rows of up to `max_seq` positions."""
        if max_seq > self.cfg.block_size:
            raise ValueError(f"requested {max_seq} positions but the model's context is {self.cfg.block_size}")
        device = self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch, self.cfg.kv_heads, max_seq, self.cfg.head_dim, dtype, device)
        self.causal_mask = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool, device=device))

    def clear_caches(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.causal_mask = torch.empty(0, dtype=torch.bool, device=self.lm_head.weight.device)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                input_pos: torch.Tensor | None = None, left_pad: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) when `targets` is None, else the mean cross-entropy (targets == -1
        are ignored). With caches set up, `input_pos` (T,) gives the cache slots of these tokens,
        `left_pad` (B,) the number of padding slots at the start of each row (batched prompts), and
        `kv_len` how many leading cache slots attention reads (at least the last slot written + 1; None =
        all): decoding then reads only the filled part of the cache, not all of it."""
        B, T = idx.shape
        cached = self.causal_mask.numel() > 0
        if cached:
            if input_pos is None:
                raise ValueError("caches are set up: pass input_pos")
            pos = input_pos.unsqueeze(0).expand(B, T)
            mask = self.causal_mask[input_pos, :kv_len].unsqueeze(0).unsqueeze(0)  # (1, 1, T, kv_len or S)
            if left_pad is not None:
                pos = (pos - left_pad[:, None]).clamp(min=0)
                slots = torch.arange(mask.shape[-1], device=idx.device)
                mask = mask & (slots[None, :] >= left_pad[:, None])[:, None, None, :]
        else:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the model's context "
                                 f"({self.cfg.block_size})")
            pos = torch.arange(T, device=idx.device).unsqueeze(0)
            mask = None
        x = self.transformer.wte(idx)
        rope = None
        if self.cfg.position_type == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B or 1, T, D/2): the angles of each half
            rope = (torch.cat([cos, cos], dim=-1).unsqueeze(1), torch.cat([sin, sin], dim=-1).unsqueeze(1))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, input_pos, mask, kv_len)
        if targets is None:
            logits = self.lm_head(self.transformer.ln_f(x))
            return softcap(logits[..., : self.cfg.vocab_size], self.cfg.logit_softcap)
        return self.loss(self.transformer.ln_f(x), targets)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the final hidden states. With `loss_chunk_tokens` set, chunk by chunk with
        each chunk's gradients computed at once (model/loss.py), so the full (tokens x vocab) logits never
        sit in memory."""
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        V, cap, chunk = self.cfg.vocab_size, self.cfg.logit_softcap, self.loss_chunk_tokens
        if chunk > 0:
            total = linear_cross_entropy(x, self.lm_head.weight, targets, V, cap, chunk)
        else:
            total = _ce_sum(x, self.lm_head.weight, targets, V, cap, self.ce_padding)
        return total / (targets != -1).sum().clamp(min=1)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): bounds the logits smoothly (cap 0 = unchanged)."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def _ce_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
            cap: float = 0.0, padding: str = "mask") -> torch.Tensor:
    """Summed cross-entropy over the real vocabulary. The padding columns of the logits are set to -inf (zero
    probability, zero gradient) rather than sliced off: rows of the padded width (a multiple of 64) keep the
    fused softmax kernels on aligned, vectorised loads, where a slice to 50,257 columns does not
    (padding="slice" is the old way, for the benchmark's A/B)."""
    logits = F.linear(x, weight)
    if cap > 0:
        logits = softcap(logits.float(), cap)
    if logits.shape[-1] > vocab_size:
        if padding == "slice":
            logits = logits[:, :vocab_size]
        else:
            pad = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
            logits = logits.masked_fill(pad, float("-inf"))
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")
