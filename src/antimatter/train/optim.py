"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

The schedule is a pure function of the step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from antimatter.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D (and larger) tensors: matmul weights and embeddings; none on norms and biases."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, t: TrainConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW, fused on CPU and CUDA (one kernel for all parameters). The fused kernel also takes a
    `found_inf` flag tensor and skips the whole update on the device, which lets the trainer skip a
    non-finite step without a host-device sync. Elsewhere (e.g. MPS) the default implementation."""
    if t.optimizer != "adamw":
        from antimatter.errors import UserError

        raise UserError(f"train.optimizer '{t.optimizer}' is not supported: use adamw")
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                             eps=1e-8, fused=device_type in ("cpu", "cuda"))


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    warmup: linear from lr/warmup to lr over `warmup_steps`; then
      cosine   - half cosine down to lr * min_lr_ratio at max_steps,
      linear   - straight line down to lr * min_lr_ratio,
      constant - lr,
      wsd      - warmup, stable at lr, then a linear decay over the last `decay_fraction` of the steps."""
    lr, floor = t.lr, t.lr * t.min_lr_ratio
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return lr
    total = max(1, t.max_steps)
    if t.schedule == "wsd":
        decay_steps = max(1, int(round(t.decay_fraction * total)))
        start = total - decay_steps
        if step < start:
            return lr
        frac = min(1.0, (step - start) / decay_steps)
        return lr - (lr - floor) * frac
    span = max(1, total - t.warmup_steps)
    frac = min(1.0, max(0.0, (step - t.warmup_steps) / span))
    if t.schedule == "linear":
        return lr - (lr - floor) * frac
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
