"""train/parallelize.py: activation checkpointing, fp8, DDP / FSDP2 and torch.compile applied from outside the
model, in that order, without changing the loss, the gradients or the names that checkpoints are saved under.
The fp8 test runs only on a GPU with fp8 tensor cores and torchao."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from train_helpers import losses, make_tokens, one_thread, tiny_config

from antimatter import checkpoint as ck
from antimatter.config import TrainConfig, preset_model
from antimatter.model.gpt import GPT
from antimatter.train.distributed import Dist
from antimatter.train.optim import build_optimizers
from antimatter.train.parallelize import apply_activation_checkpointing, apply_fsdp, parallelize
from antimatter.train.trainer import train

assert one_thread  # the autouse fixture, imported so pytest uses it here


def _model(preset: str, seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(preset_model(preset), vocab_size=300, init_std=0.1, **over))
    with torch.no_grad():  # perturb norm gains and biases too, so every tensor matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


def _loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                           for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_activation_checkpointing_same_loss_and_grads(preset):
    model = _model(preset, dropout=0.1)  # dropout: the recomputed forward must draw the same masks
    g = torch.Generator().manual_seed(4)
    idx, targets = (torch.randint(0, 300, (2, 16), generator=g) for _ in range(2))
    torch.manual_seed(1)
    ref_loss, ref_grads = _loss_and_grads(model, idx, targets)
    apply_activation_checkpointing(model)
    assert all(isinstance(block, CheckpointWrapper) for block in model.transformer.h)
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(model, idx, targets)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_checkpoint_wrappers_keep_the_saved_names():
    """State-dict keys, the optimizers' parameter groups and the loading of plain weights are those of the
    plain model: a checkpoint of a run with activation checkpointing is a checkpoint like any other."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    plain, wrapped = _model("tiny"), _model("tiny")
    apply_activation_checkpointing(wrapped)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    assert list(get_model_state_dict(wrapped, options=opts)) == list(plain.state_dict())
    train_cfg = TrainConfig(optimizer="muon")
    groups = [[[p.shape for p in g["params"]] for g in o.param_groups] for o in build_optimizers(plain, train_cfg)]
    optimizers = build_optimizers(wrapped, train_cfg)
    assert [[[p.shape for p in g["params"]] for g in o.param_groups] for o in optimizers] == groups
    wrapped(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    for opt in optimizers:
        opt.step()
    saved = get_optimizer_state_dict(wrapped, optimizers, options=opts)["state"]
    assert sorted(saved) == sorted(k for k in plain.state_dict() if k != "lm_head.weight")
    wrapped.load_state_dict(plain.state_dict())
    assert wrapped.num_params() == plain.num_params()


def test_the_order_checkpointing_then_compile():
    """The step is the compiled model; the model stays the uncompiled module, its blocks wrapped for
    checkpointing, with clean state-dict names."""
    model = _model("tiny")
    keys = list(model.state_dict())
    cfg = TrainConfig(activation_checkpointing=True, compile=True, compile_backend="eager")
    parts = parallelize(model, cfg, Dist(), "fp32", log=lambda msg: None)
    assert parts.model is model and parts.wrapped is model and parts.step is not model
    assert isinstance(parts.step, torch._dynamo.eval_frame.OptimizedModule) and parts.step._orig_mod is model
    assert all(isinstance(block, CheckpointWrapper) for block in model.transformer.h)
    assert list(model.state_dict()) == keys


def _fp8_missing() -> str:
    """Why real fp8 training cannot run here ('' when it can)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return "fp8 training needs a CUDA GPU with fp8 tensor cores (sm_89+)"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "fp8 training needs torchao"
    return ""


def test_the_order_fp8_checkpointing_then_compile():
    """Real fp8 with checkpointing and compile: the blocks' Linears are torchao Float8Linears inside the
    checkpoint wrappers (the output head stays a plain Linear), the compiled step trains, and the state-dict
    names are the plain model's. What it checks is the model the order makes, not the order of the calls
    (on one process, swapping the Linears inside the wrappers would give the same modules)."""
    if why := _fp8_missing():
        pytest.skip(why)
    from torchao.float8.float8_linear import Float8Linear

    model = _model("tiny").cuda()
    keys = list(model.state_dict())
    logged = []
    cfg = TrainConfig(fp8=True, activation_checkpointing=True, compile=True, compile_backend="eager")
    parts = parallelize(model, cfg, Dist(device=torch.device("cuda")), "fp32", log=logged.append)
    assert logged == ["fp8: 8 Linear layers use torchao float8 matmuls"]  # 4 a block, 2 blocks
    assert all(isinstance(block, CheckpointWrapper) for block in model.transformer.h)
    linears = [m for block in model.transformer.h for m in block._checkpoint_wrapped_module.modules()
               if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8 and all(isinstance(m, Float8Linear) for m in linears)
    assert type(model.lm_head) is torch.nn.Linear
    assert isinstance(parts.step, torch._dynamo.eval_frame.OptimizedModule) and parts.step._orig_mod is model
    assert list(model.state_dict()) == keys
    g = torch.Generator().manual_seed(4)
    idx, targets = (torch.randint(0, 300, (2, 16), generator=g).cuda() for _ in range(2))
    loss = parts.step(idx, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in linears)


def _weights(run, step):
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def test_a_run_with_activation_checkpointing_trains_saves_and_resumes_the_same(tmp_path):
    """train.activation_checkpointing=true, stopped at step 5 and resumed: the losses and final weights of the
    straight run without it, bit for bit, under the same checkpoint names (dropout on: the RNG streams too)."""
    settings = dict(max_steps=8, ckpt_interval=0, eval_interval=4, global_batch_tokens=256)
    plain, wrapped = make_tokens(tmp_path / "plain"), make_tokens(tmp_path / "ac")
    cfg = tiny_config(plain, **settings)
    cfg.model.dropout = 0.1
    train(cfg, plain)
    cfg = tiny_config(wrapped, activation_checkpointing=True, stop_step=5, **settings)
    cfg.model.dropout = 0.1
    assert train(cfg, wrapped)["steps"] == 5
    assert ck.load_train_state(wrapped / "checkpoints" / "step_000005")["optimizer"]["state"].keys() == \
        ck.load_train_state(plain / "checkpoints" / "step_000008")["optimizer"]["state"].keys()
    cfg.train.stop_step = 0
    assert train(cfg, wrapped)["start_step"] == 5
    assert losses(plain) == losses(wrapped)
    a, b = _weights(plain, 8), _weights(wrapped, 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, _, _ = ck.load_model(wrapped, "latest")
    assert not any("_checkpoint_wrapped_module" in k for k in model.state_dict())


def test_fsdp2_with_activation_checkpointing_saves_the_plain_names(tmp_path):
    """Checkpoint wrappers under FSDP2 (a one-process gloo group: the names do not depend on the world size;
    tests/test_distributed.py trains two processes): after a step, the full model and optimizer state dicts
    that checkpoints are made of carry the plain model's names."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = _model("tiny")
        plain = list(model.state_dict())
        apply_activation_checkpointing(model)
        apply_fsdp(model, None)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        optimizers = build_optimizers(model, TrainConfig(optimizer="muon"))
        x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        assert list(get_model_state_dict(model, options=opts)) == plain
        saved = get_optimizer_state_dict(model, optimizers, options=opts)["state"]
        assert sorted(saved) == sorted(k for k in plain if k != "lm_head.weight")
    finally:
        dist.destroy_process_group()
