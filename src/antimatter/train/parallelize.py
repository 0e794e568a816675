"""From the plain model to the one the training step runs, applied from outside the model (torchtitan's
`parallelize` step). model/gpt.py stays the plain Transformer that eval, generate and export load.

    parallelize(model, train_cfg, dist, dtype)  ->  Parallelized(model, wrapped, step)

In this order, each only where the train config asks for it:

    fp8                     the blocks' Linears become torchao Float8Linears (model/accel.py); first, so the
                            checkpoint wrappers, DDP and FSDP2 all see the float8 modules
    activation checkpointing  each Transformer block recomputes its activations in backward
    DDP or FSDP2            with several processes: replicated weights and all-reduced gradients, or each block
                            (then the root) its own `fully_shard` unit
    torch.compile           last, of the DDP / FSDP2 module: one compiled step, DDP's graph split at its buckets

The checkpoint wrappers add `_checkpoint_wrapped_module.` to parameter names but not to state-dict keys (the
wrapper's state-dict hooks drop it, and torch.distributed.checkpoint's state-dict helpers drop it from the
optimizer's keys too), so checkpoints, resume and export see the names of the plain model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from antimatter.compile_cache import describe, use_compile_cache
from antimatter.config import TrainConfig
from antimatter.device import DTYPES
from antimatter.errors import UserError
from antimatter.model.accel import enable_fp8_training
from antimatter.train.distributed import Dist


@dataclass
class Parallelized:
    """The three views of the model that training uses."""

    model: nn.Module  # the plain module (blocks wrapped for checkpointing): state dicts, evaluation, optimizers
    wrapped: nn.Module  # DDP, or the FSDP2-sharded model, or the model itself: train()/eval(), gradient sync
    step: nn.Module  # what each micro-batch calls: `wrapped`, compiled with train.compile


def parallelize(model: nn.Module, train_cfg: TrainConfig, dist: Dist, dtype: str,
                log: Callable[[str], None] = print) -> Parallelized:
    """Apply fp8, activation checkpointing, DDP / FSDP2 and torch.compile to `model` (already on its device,
    its weights loaded) as `train_cfg` asks. `dtype` is the resolved compute precision (device.resolve_dtype):
    bf16 on a GPU is FSDP2's compute dtype for the gathered parameters."""
    if train_cfg.fp8:
        log(f"fp8: {enable_fp8_training(model)} Linear layers use torchao float8 matmuls")
    if train_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    mp_dtype = DTYPES[dtype] if dtype == "bf16" and dist.device.type == "cuda" else None
    wrapped = apply_data_parallel(model, dist, train_cfg.parallel, mp_dtype)  # DDP broadcasts rank 0's weights
    step = wrapped
    if train_cfg.compile:
        log(describe(use_compile_cache()))
        step = apply_compile(wrapped, train_cfg)
    return Parallelized(model, wrapped, step)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each Transformer block so that its activations are recomputed in backward instead of kept:
    about a block's activations of memory for one more forward of it. Non-reentrant checkpointing; the loss
    and gradients are those of the unwrapped model."""
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)


def apply_data_parallel(model: nn.Module, dist: Dist, parallel: str, mp_dtype: torch.dtype | None) -> nn.Module:
    """DDP or FSDP2 around `model` (returned unchanged for one process)."""
    if not dist.enabled:
        return model
    if parallel == "fsdp":
        return apply_fsdp(model, mp_dtype)
    return apply_ddp(model, dist)


def apply_fsdp(model: nn.Module, mp_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2 in place: each Transformer block is its own shard unit, then the root. `mp_dtype` (bf16 on
    GPUs) sets the compute dtype of the gathered parameters while the sharded master weights and the gradient
    reduction stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else None
    kw = {"mp_policy": mp} if mp else {}
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def apply_ddp(model: nn.Module, dist: Dist) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def apply_compile(module: nn.Module, train_cfg: TrainConfig) -> nn.Module:
    """torch.compile with train.compile_backend; inductor's coordinate-descent tuning with
    train.compile_tuning."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    if train_cfg.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(f"train.compile_backend '{train_cfg.compile_backend}' is not a torch.compile backend: use "
                        f"inductor (eager or aot_eager to debug a compile problem), or train.compile=false")
    # set either way: a process that trains twice (tests, notebooks) does not keep the last run's tuning
    inductor_config.coordinate_descent_tuning = train_cfg.compile_tuning
    return torch.compile(module, backend=train_cfg.compile_backend)
