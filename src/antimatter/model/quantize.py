"""Weight-only int8 for generation (torchao): each block matmul reads int8 weights and one scale per output row.

Batch-1 decoding reads every weight once per token, so its speed is bytes over bandwidth; int8 halves the
bytes of the block matmuls. The output head stays in the model's dtype: it is tied to the token embedding
(one tensor serves both) and the logits are the most precision-sensitive matmul. `antimatter eval` with
`eval.int8: true` reports what it costs as the change in validation perplexity.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from antimatter.device import DTYPES, resolve_dtype
from antimatter.errors import UserError

INT8_METHOD = ("torchao Int8WeightOnlyConfig (symmetric int8, one scale per output row) on every block Linear; "
               "token embedding and tied output head unquantised")


def require_torchao() -> None:
    """Fail early, with the fix, when torchao is missing."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise UserError("int8 weight-only quantisation needs torchao: pip install 'antimatter[quant]' "
                        "(or pip install torchao), or leave int8 off") from None


def _is_block_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and not fqn.endswith("lm_head")


def int8_weight_only(model: nn.Module) -> int:
    """Quantise the block Linears of `model` in place; returns how many were converted."""
    require_torchao()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=_is_block_linear)
    return sum(is_int8(m.weight) for m in model.modules() if isinstance(m, nn.Linear))


def int8_copy(model: nn.Module) -> nn.Module:
    """A quantised copy for inference; on a GPU from a bf16 (or fp16) copy of the weights, as it is served."""
    q = copy.deepcopy(model)
    device = next(q.parameters()).device
    dtype = resolve_dtype("auto", device)
    if dtype != "fp32":
        q = q.to(DTYPES[dtype])
    int8_weight_only(q)
    return q.eval()


def is_int8(weight: torch.Tensor) -> bool:
    """A torchao int8 weight: `qdata` (out, in) int8 and `scale` (out, 1)."""
    return hasattr(weight, "qdata") and getattr(weight.qdata, "dtype", None) == torch.int8
