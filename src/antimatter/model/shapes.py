"""What a model config implies, checked against what its weight files declare, before anything is allocated.

A config read from a downloaded folder or a copied checkpoint is untrusted: `n_embd: 1000000` or
`n_layer: 1000000` would have GPT(cfg) allocate terabytes before any comparison with the weights. Here the
config's sizes are checked for sense, the tensor shapes are read from safetensors headers (no tensor data),
and the model's own names and shapes come from building it on the meta device (no memory). Callers compare
the two and only then build the real model, whose size is then bounded by the weight files on disk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from antimatter.config import ACTIVATIONS, NORMS, POSITIONS, ModelConfig
from antimatter.errors import UserError, shorten
from antimatter.model.gpt import GPT, SkipInit

MAX_SIZE = 2**31 - 1  # any one dimension; keeps products of sizes within int64 on the meta device
MAX_ROPE_BYTES = 1 << 30  # the cos/sin tables are precomputed for every position and sized by no tensor
LAYER_RE = re.compile(r"^(?:transformer\.h|model\.layers)\.(\d+)\.")
SIZE_FIELDS = ("n_layer", "n_head", "d_model", "vocab_size", "block_size")
OPTIONAL_SIZE_FIELDS = ("n_kv_head", "d_ff")


def fmt_shape(shape: Iterable[int]) -> str:
    """(512, 32): a shape as an error line quotes it (shortened: a header may declare any rank)."""
    return shorten(str(tuple(shape)))


def quote(name: str) -> str:
    """A tensor name from a file, quoted and cut short for an error line."""
    return f"'{shorten(name, 80)}'"


def safetensors_shapes(path: Path, fix: str = "replace it",
                       error: type[UserError] = UserError) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header; no tensor data is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"cannot read weights {path} ({shorten(first, 200)}): the file is damaged or not "
                    f"safetensors; {fix}") from None


def _is_size(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_model_config(cfg: ModelConfig, source: str, fix: str, keys: dict[str, str] | None = None,
                       error: type[UserError] = UserError) -> None:
    """Every size a whole number in range, heads that divide the width, flags that are booleans, and RoPE
    tables of bounded size: what building the model needs to neither crash nor allocate without limit.
    `source` names the file, `keys` the file's name for each field (default model.FIELD), `fix` the way out."""
    keys = keys or {}

    def bad(field: str, why: str) -> UserError:
        value = shorten(repr(getattr(cfg, field)))
        return error(f"{source} has {keys.get(field, f'model.{field}')}={value}, {why}: {fix}")

    for f in SIZE_FIELDS + OPTIONAL_SIZE_FIELDS:
        v = getattr(cfg, f)
        if not _is_size(v) and not (v is None and f in OPTIONAL_SIZE_FIELDS):
            raise bad(f, f"not a whole number from 1 to {MAX_SIZE}")
    if not isinstance(cfg.pad_vocab_multiple, int) or isinstance(cfg.pad_vocab_multiple, bool) \
            or abs(cfg.pad_vocab_multiple) > MAX_SIZE:
        raise bad("pad_vocab_multiple", "not a whole number")
    for f in ("bias", "tie_embeddings", "qk_norm", "zero_init_proj"):
        if not isinstance(getattr(cfg, f), bool):
            raise bad(f, "not true or false")
    for f in ("norm_eps", "rope_theta", "init_std", "dropout", "logit_softcap"):
        if not _is_number(getattr(cfg, f)):
            raise bad(f, "not a finite number")
    for f, allowed in (("arch", ("gpt2", "llama")), ("norm", NORMS), ("position", POSITIONS),
                       ("activation", ACTIVATIONS)):
        if getattr(cfg, f) not in allowed:
            raise bad(f, f"not one of {', '.join(allowed)}")
    if cfg.d_model % cfg.n_head:
        raise bad("n_head", f"which does not divide {keys.get('d_model', 'model.d_model')}={cfg.d_model}")
    if cfg.n_head % cfg.kv_heads:
        raise bad("n_kv_head", f"which does not divide {keys.get('n_head', 'model.n_head')}={cfg.n_head}")
    if cfg.position_type == "rope":
        if cfg.head_dim % 2:
            raise bad("n_head", f"which makes an odd head size ({cfg.head_dim}) that RoPE cannot rotate")
        if cfg.block_size * cfg.head_dim * 4 > MAX_ROPE_BYTES:
            most = MAX_ROPE_BYTES // (cfg.head_dim * 4)
            raise bad("block_size", f"more positions than the RoPE tables allow at head size {cfg.head_dim} "
                                    f"(at most {most})")


def first_missing_layer(names: Iterable[str], n_layer: int) -> int | None:
    """The lowest layer index below `n_layer` that no tensor name mentions, or None. Costs time in the
    number of names, not in `n_layer`: a config may claim a million layers."""
    present = {int(m.group(1)) for n in names if (m := LAYER_RE.match(n))}
    for i in range(n_layer):  # stops at len(present) at the latest
        if i not in present:
            return i
    return None


def meta_model(cfg: ModelConfig, source: str, fix: str, error: type[UserError] = UserError) -> GPT:
    """GPT(cfg) on the meta device: every parameter's name and shape, no memory. Call it only once the
    layer count is known to match the weights (a meta model still costs Python objects per layer)."""
    try:
        with torch.device("meta"), SkipInit():
            return GPT(cfg)
    except (RuntimeError, ValueError, OverflowError) as e:  # e.g. a storage size beyond int64
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"{source} describes a model that cannot be built ({shorten(first, 120)}): {fix}") from None


def first_difference(expected: dict[str, tuple[int, ...]],
                     found: dict[str, tuple[int, ...]]) -> tuple[str, str, int] | None:
    """The first way the weights differ from what the config implies, as (kind, tensor name, count):
    'missing' (a tensor the config implies is absent), 'shape' (present with another shape) or 'extra'
    (tensors the config does not describe; the first name and how many). None: they agree."""
    for name, shape in expected.items():
        if name not in found:
            return "missing", name, 1
        if found[name] != shape:
            return "shape", name, 1
    extra = sorted(set(found) - set(expected))
    return ("extra", extra[0], len(extra)) if extra else None
