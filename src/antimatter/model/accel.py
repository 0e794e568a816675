"""Optional accelerations chosen at run time: the attention kernel and fp8 matmuls.

Both are opt-in because they depend on the GPU: cuDNN attention and fp8 tensor cores exist on Hopper (and fp8
on Ada), and fp8 needs torchao. Each says clearly why it cannot be used instead of silently doing nothing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from antimatter.config import ATTENTION_BACKENDS
from antimatter.errors import UserError


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """Context that makes `scaled_dot_product_attention` prefer one kernel (it falls back to the others when
    the preferred one cannot take the inputs). Enter it around compilation and the training loop. 'auto'
    prefers cuDNN on Hopper and leaves SDPA's default order elsewhere."""
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"unknown attention backend '{name}': choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":  # cuDNN on Hopper: faster than flash's backward there, see docs/RESULTS.md#training-speed
        if not prefers_cudnn_attention():
            return contextlib.nullcontext()
        name = "cudnn"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = order[name]
    backends = [first] + [b for b in order.values() if b != first]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch < 2.6 has no priority order: restrict to the preferred kernel and math
        return sdpa_kernel([first, SDPBackend.MATH])


def prefers_cudnn_attention() -> bool:
    """True on Hopper GPUs (sm_90), where cuDNN's fused attention beats the flash kernel that SDPA picks by
    default; elsewhere SDPA's own choice stands."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and torch.backends.cudnn.is_available())


def _fp8_filter(module: nn.Module, fqn: str) -> bool:
    """Convert the big matmuls only: the output head stays in bf16 (tied to the embedding, and most
    sensitive to precision), and fp8 kernels need dimensions divisible by 16."""
    if not isinstance(module, nn.Linear) or fqn.endswith("lm_head"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def enable_fp8_training(model: nn.Module, recipe: str = "tensorwise") -> int:
    """Swap the block Linears for torchao Float8Linear (dynamic scaling). Returns how many were converted."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise UserError("fp8 training needs an NVIDIA GPU with fp8 tensor cores (Ada or Hopper, sm_89+): "
                        "set train.fp8=false")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("fp8 training needs torchao: pip install 'antimatter[quant]' (or pip install torchao), "
                        "or set train.fp8=false") from None
    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(model, config=config, module_filter_fn=_fp8_filter)
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())
