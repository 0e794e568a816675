"""The optimizers and the learning-rate schedules.

* `adamw`: AdamW on every parameter, decoupled weight decay on matrices and embeddings only.
* `muon`: `torch.optim.Muon` (momentum, then Newton-Schulz orthogonalisation of each update) for the 2-D
  matrices inside the Transformer blocks, AdamW for the rest (embeddings, output head, norms, biases), as
  modded-nanogpt and nanochat do: Muon is defined for hidden matrices only.

Each parameter group keeps its own peak learning rate (`base_lr`); the schedule gives one factor in [0, 1]
per step, a pure function of the step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from antimatter.config import TrainConfig


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon takes the blocks' matrices: attention's QKV and output projections, the MLP's two matrices."""
    return p.dim() == 2 and name.startswith("transformer.h.")


def _unique_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:  # tied weights once
            seen.add(id(p))
            out.append((name, p))
    return out


def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] | None = None,
                 embed_lr: float = 0.0) -> list[dict]:
    """Weight decay on 2-D (and larger) tensors: matmul weights and embeddings; none on norms and biases.
    With `embed_lr`, the input embeddings of an untied model get their own group at that rate (a lookup
    table sees a sparse gradient, and the speedruns train it far faster than the output head)."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", True)
    decay, no_decay, embed = [], [], []
    for name, p in _unique_named(model):
        if exclude and id(p) in exclude:
            continue
        if embed_lr > 0 and not tied and name in ("transformer.wte.weight", "transformer.wpe.weight"):
            embed.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if embed:
        groups.append({"params": embed, "weight_decay": weight_decay, "lr": embed_lr})
    return groups


def build_optimizers(model: nn.Module, t: TrainConfig, device_type: str = "cpu") -> list[torch.optim.Optimizer]:
    """[AdamW] or [Muon, AdamW]. AdamW is fused on CPU and CUDA (one kernel for all parameters); the fused
    kernel takes a `found_inf` flag tensor and skips the update on the device, so a non-finite step is skipped
    without a host-device sync. Elsewhere (e.g. MPS) the default implementation."""
    fused = device_type in ("cpu", "cuda")
    optimizers: list[torch.optim.Optimizer] = []
    exclude: set[int] = set()
    if t.optimizer == "muon":
        matrices = [p for name, p in _unique_named(model) if is_muon_param(name, p)]
        exclude = {id(p) for p in matrices}
        optimizers.append(torch.optim.Muon(matrices, lr=t.muon_lr, momentum=t.muon_momentum,
                                           weight_decay=t.muon_weight_decay, nesterov=True))
    groups = [g for g in param_groups(model, t.weight_decay, exclude, t.embed_lr) if g["params"]]
    optimizers.append(torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused))
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return optimizers


def lr_factor(step: int, t: TrainConfig, max_steps: int | None = None) -> float:
    """The schedule's multiplier of each group's peak learning rate for optimizer step `step` (0-based).

    warmup: linear from 1/warmup to 1 over `warmup_steps`; then
      cosine   - half cosine down to min_lr_ratio at the last step,
      linear   - straight line down to min_lr_ratio,
      constant - 1,
      wsd      - warmup, stable at 1, then a linear decay over the last `decay_fraction` of the steps.
    `max_steps` defaults to t.max_steps (a time-budgeted run passes the step count it chose)."""
    floor = t.min_lr_ratio
    total = max(1, t.max_steps if max_steps is None else max_steps)
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "wsd":
        decay_steps = max(1, int(round(t.decay_fraction * total)))
        start = total - decay_steps
        if step < start:
            return 1.0
        frac = min(1.0, (step - start + 1) / decay_steps)
        return 1.0 - (1.0 - floor) * frac
    span = max(1, total - t.warmup_steps - 1)
    frac = min(1.0, max(0.0, (step - t.warmup_steps) / span))
    if t.schedule == "linear":
        return 1.0 - (1.0 - floor) * frac
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * frac))


def lr_at(step: int, t: TrainConfig, max_steps: int | None = None) -> float:
    """AdamW's learning rate (train.lr times the schedule) at `step`."""
    return t.lr * lr_factor(step, t, max_steps)


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
