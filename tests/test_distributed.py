"""Several processes (gloo on the CPU) give the optimisation of one process with the same global batch.

Tolerance: 1e-5 on the loss at every one of 20 steps and on the final weights
(measured: 0 on this machine: with a power-of-two world size the gradient averages are exact in fp32)."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    cli_train,
    losses,
    make_tokens,
    one_thread,
    single_process_run,
    tiny_config,
    write_config,
)

from antimatter import checkpoint as ck
from antimatter.train.trainer import train

assert one_thread  # the autouse fixture, imported so pytest uses it here

STEPS, TOL = 20, 1e-5
# micro-batch 4 x seq 32 = 128 tokens per pass: accumulation 2 on one process, 1 on two
SETTINGS = dict(max_steps=STEPS, global_batch_tokens=256, ckpt_interval=10, eval_interval=10, keep_last=3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process_run(tmp_path_factory.mktemp("single") / "run", **SETTINGS)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run = make_tokens(tmp_path_factory.mktemp("ddp") / "run")
    r = cli_train(write_config(run, tiny_config(run, **SETTINGS)), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:]
    return run, r.stdout


def _final_weights(run):
    return load_file(str(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


def _assert_same_training(run, reference, first_step=1):
    la, lb = losses(reference), losses(run)
    steps = list(range(first_step, STEPS + 1))
    assert [s for s in sorted(lb) if s >= first_step] == steps
    diff = max(abs(la[s] - lb[s]) for s in steps)
    assert diff <= TOL, f"loss differs by {diff:.3g}"
    wa, wb = _final_weights(reference), _final_weights(run)
    assert wa.keys() == wb.keys()
    wdiff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert wdiff <= TOL, f"weights differ by {wdiff:.3g}"


def test_ddp_two_processes_match_one(ddp_run, reference):
    run, out = ddp_run
    assert "x2 (ddp)" in out and "2 processes" in out and "1 accumulation" in out
    _assert_same_training(run, reference)


def test_fsdp2_two_processes_match_one(tmp_path, reference):
    run = make_tokens(tmp_path / "run")
    r = cli_train(write_config(run, tiny_config(run, parallel="fsdp", **SETTINGS)), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "x2 (fsdp)" in r.stdout
    _assert_same_training(run, reference)
    model, _, _ = ck.load_model(run, "latest")  # the sharded run saved one full copy: loads on one CPU
    assert model.lm_head.weight is model.transformer.wte.weight


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_match_one(tmp_path, reference):
    """Two nodes: `torchrun --nnodes 2 --node-rank 0|1` with a c10d rendezvous on localhost."""
    run = make_tokens(tmp_path / "run")
    path = write_config(run, tiny_config(run, **SETTINGS))
    port = _free_port()
    nodes = [cli_train(path, nproc=1, nnodes=2, node_rank=i, port=port, popen=True) for i in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    _assert_same_training(run, reference)


def test_resume_on_fewer_processes_keeps_the_optimisation(tmp_path, ddp_run, reference):
    """A 2-process checkpoint resumed on 1 process keeps the global batch and the windows of each
    step (the loader's position is global); accumulation goes 1 -> 2 and the run continues the reference
    curve within the tolerance. The log says what changed."""
    ddp, _ = ddp_run
    run = make_tokens(tmp_path / "run")
    mid = ddp / "checkpoints" / "step_000010"
    summary = train(tiny_config(run, resume=str(mid), **SETTINGS), run)
    assert summary["start_step"] == 10 and summary["accum_steps"] == 2
    log = (run / "logs" / "train.log").read_text()
    assert "resuming a 2-process run on 1 processes" in log and "accumulation (1 -> 2)" in log
    _assert_same_training(run, reference, first_step=11)


def test_accumulation_all_reduces_once_per_step(tmp_path):
    """DDP under accumulation: gradients are all-reduced on the last micro-batch only (grad_sync wraps
    no_sync), counted with a communication hook in a one-process gloo group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from antimatter.model.gpt import GPT
    from antimatter.train.distributed import grad_sync

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = DDP(GPT(tiny_config(tmp_path).model), bucket_cap_mb=1000)  # one bucket
        calls = []

        def hook(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, hook)
        x = torch.randint(0, 512, (2, 16))
        for step in range(2):
            for i in range(4):
                with grad_sync(model, i == 3):
                    model(x, x).backward()
            assert len(calls) == step + 1
    finally:
        dist.destroy_process_group()


def test_sigterm_under_torchrun_all_ranks_stop_at_the_same_step(tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree on the step to stop at (a host-side flag
    all-reduce), write one checkpoint there and finish. (torchrun itself then exits non-zero: it re-raises
    the signal it got.)"""
    import signal
    import time

    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_steps=100_000, ckpt_interval=0, eval_interval=0, log_interval=1)
    proc = cli_train(write_config(run, cfg), nproc=2, popen=True)
    metrics = run / "logs" / "metrics.jsonl"
    deadline = time.time() + 90
    while (not metrics.exists() or metrics.read_text().count("\n") < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    log = (run / "logs" / "train.log").read_text()
    assert "stopped by SIGTERM" in log, out[-3000:]
    name = ck.read_pointer(run / "checkpoints", "latest")
    state = ck.load_train_state(run / "checkpoints" / name)
    assert state["step"] == max(losses(run)) and len(state["rng"]) == 2


def test_fsdp2_resumes_a_single_process_checkpoint(tmp_path, reference):
    """The other direction (one process to two), through FSDP2's restore path: rank 0 reads the full checkpoint and
    the weights and optimiser state are sharded/broadcast to both ranks; the curve continues."""
    run = make_tokens(tmp_path / "run")
    mid = reference / "checkpoints" / "step_000010"
    cfg = tiny_config(run, parallel="fsdp", resume=str(mid), **SETTINGS)
    r = cli_train(write_config(run, cfg), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "resuming a 1-process run on 2 processes" in (run / "logs" / "train.log").read_text()
    _assert_same_training(run, reference, first_step=11)


def test_a_budget_spent_before_calibration_ends_every_rank_at_one_step(tmp_path):
    """A time budget shorter than the calibration steps: once any rank's clock says it is spent, every rank
    fixes the same step count there and the run finishes (no rank waiting on a collective the other skipped)."""
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_minutes=0.001, global_batch_tokens=256, ckpt_interval=0, eval_interval=0,
                      budget_evals=0, log_interval=1)
    r = cli_train(write_config(run, cfg), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:]
    name = ck.read_pointer(run / "checkpoints", "latest")
    state = ck.load_train_state(run / "checkpoints" / name)
    budget = state["budget"]
    assert budget["timed_steps"] < 10 and state["step"] == budget["max_steps"] == budget["fixed_at_step"]
    assert state["train_seconds"] >= 0.06 and len(state["rng"]) == 2
