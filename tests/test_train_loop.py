"""The single-process training loop: it learns, writes what it promises, resumes exactly, stops cleanly."""

from __future__ import annotations

import json
import math
import signal
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import cli_train, losses, make_tokens, one_thread, tiny_config, write_config

from antimatter import checkpoint as ck
from antimatter.config import TrainConfig, validate
from antimatter.errors import UserError
from antimatter.train.optim import lr_at, param_groups
from antimatter.train.trainer import batch_geometry, train

assert one_thread  # the autouse fixture, imported so pytest uses it here


def test_trains_and_writes_everything(tmp_path):
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_steps=24, ckpt_interval=8, eval_interval=8, log_interval=4, tensorboard=True)
    s = train(cfg, run)
    assert s["steps"] == 24 and s["stopped"] == "max_steps" and s["nonfinite_steps"] == 0
    assert s["accum_steps"] == 1 and s["global_batch_tokens"] == 4 * 32 and s["tokens_seen"] == 24 * 128
    lines = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [4, 8, 12, 16, 20, 24]
    assert set(train_lines[0]) >= {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                                   "mem_gb", "elapsed"}
    assert train_lines[0]["mfu"] is None  # no peak FLOP/s for a CPU: MFU is unknown, not guessed
    val = [m["val_loss"] for m in lines if "val_loss" in m]
    assert len(val) == 3 and val[-1] < val[0] < math.log(512) + 0.1  # it learns
    assert s["best_val_loss"] == min(val) and s["last_val_loss"] == val[-1]
    root = run / "checkpoints"
    assert ck.read_pointer(root, "latest") == "step_000024"
    assert (run / "config.yaml").is_file() and (run / "logs" / "train.log").read_text().count("checkpoint") >= 3
    assert any((run / "logs" / "tensorboard").iterdir())
    model, cfg2, where = ck.load_model(run, "best")
    assert where.name == ck.read_pointer(root, "best") and cfg2.train.max_steps == 24


def test_schedules():
    """Steps are 0-based: the last one (max_steps - 1) runs at the floor, for every decaying schedule."""
    t = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=111, schedule="cosine")
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)
    assert lr_at(109, t) > 0.1
    t.schedule = "linear"
    assert lr_at(60, t) == pytest.approx(0.55) and lr_at(110, t) == pytest.approx(0.1)
    t.schedule = "constant"
    assert lr_at(100, t) == 1.0
    t.schedule, t.decay_fraction, t.max_steps = "wsd", 0.5, 110
    assert lr_at(50, t) == 1.0 and lr_at(54, t) == 1.0 and lr_at(109, t) == pytest.approx(0.1)
    assert lr_at(55, t) == pytest.approx(1.0 - 0.9 / 55) and lr_at(83, t) == pytest.approx(1.0 - 0.9 * 29 / 55)


def test_weight_decay_only_on_matrices(tmp_path):
    from antimatter.model.gpt import GPT

    model = GPT(tiny_config(tmp_path).model)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())  # the tied matrix once


def test_batch_geometry_and_bad_input(tmp_path):
    assert batch_geometry(0, 4, 32, 2) == (256, 1)
    assert batch_geometry(1024, 4, 32, 2) == (1024, 4)
    with pytest.raises(UserError, match=r"global_batch_tokens \(1,000\) is not a multiple of .* 4 x 32 x 1"):
        batch_geometry(1000, 4, 32, 1)
    run = make_tokens(tmp_path / "run", n_train=3000, n_val=500)
    cfg = tiny_config(run)
    cfg.model.vocab_size = 300
    with pytest.raises(UserError, match="vocabulary of 512 ids but model.vocab_size is 300"):
        train(cfg, run)
    with pytest.raises(UserError, match="no token shards"):
        train(tiny_config(tmp_path / "empty"), tmp_path / "empty")
    cfg = tiny_config(run, resume=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no checkpoints found"):
        train(cfg, run)


def test_fp16_with_grad_scaler(tmp_path):
    """The fp16 path (T4/V100 class GPUs) with the real GradScaler: autocast fp16 runs on the CPU too."""
    run = make_tokens(tmp_path / "run")
    s = train(tiny_config(run, dtype="fp16", max_steps=6, ckpt_interval=6, eval_interval=6), run)
    assert s["dtype"] == "fp16" and s["last_loss"] is not None and math.isfinite(s["last_val_loss"])
    scaler = ck.load_train_state(run / "checkpoints" / "step_000006")["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0
    # resume restores the scaler state
    s2 = train(tiny_config(run, dtype="fp16", max_steps=8, ckpt_interval=6, eval_interval=6), run)
    assert s2["start_step"] == 6 and s2["steps"] == 8


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    """An absurd learning rate blows the weights up after step 1; the following non-finite steps are
    skipped (weights untouched) and training stops after max_nonfinite in a row, naming the step and the
    last good checkpoint."""
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, lr=1e30, warmup_steps=0, max_steps=50, max_nonfinite=3, ckpt_interval=1,
                      eval_interval=0, eval_steps=0)  # no val loss: its NaN would stop the run at step 1 (below)
    with pytest.raises(UserError, match=r"3 optimizer steps in a row up to step \d+ had a non-finite .*"
                                        r"last good checkpoint: .*step_0000\d\d"):
        train(cfg, run)
    last = ck.find_resume(run / "checkpoints")
    a = load_file(str(last / "model.safetensors"))
    prev = ck.list_checkpoints(run / "checkpoints")[-2]
    b = load_file(str(prev / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # a skipped step leaves the weights as they were


def test_no_host_sync_per_step(tmp_path, monkeypatch):
    """A structure guard: reading a tensor on the host (.item(), .tolist(), bool(), float()) happens
    a fixed number of times per log/eval/checkpoint, never once per optimizer step."""
    run = make_tokens(tmp_path / "run")
    counts = {"n": 0}

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            counts["n"] += 1
            return orig(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    reads = []
    for steps in (4, 16):
        counts["n"] = 0
        cfg = tiny_config(run / str(steps), max_steps=steps, log_interval=100, eval_interval=0,
                          ckpt_interval=0, global_batch_tokens=256)  # accumulation 2
        make_tokens(run / str(steps))
        train(cfg, run / str(steps))
        reads.append(counts["n"])
    assert reads[0] == reads[1], f"host reads grow with steps: {reads}"


def test_attention_preference_gives_the_same_training(tmp_path):
    """train.attention only picks the SDPA kernel: on the CPU 'math' and 'auto' train the same losses."""
    losses = []
    for attn in ("auto", "math"):
        run = make_tokens(tmp_path / attn)
        train(tiny_config(run, attention=attn, max_steps=3, eval_interval=0, ckpt_interval=0), run)
        rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if "loss" in r])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_fp8_on_the_cpu_says_what_it_needs(tmp_path):
    run = make_tokens(tmp_path / "run")
    with pytest.raises(UserError, match=r"fp8 training needs an NVIDIA GPU with fp8 tensor cores .*train.fp8=false"):
        train(tiny_config(run, fp8=True, max_steps=1), run)


def test_compiled_model_saves_clean_names(tmp_path):
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, compile=True, compile_backend="eager", max_steps=2, ckpt_interval=2), run)
    keys = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors")).keys()
    assert "transformer.wte.weight" in keys and not any("_orig_mod" in k for k in keys)
    ck.load_model(run)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_sigkill_and_resume_is_exact(tmp_path):
    """N steps straight vs killed with SIGKILL after N/2 and resumed with --resume auto: the same
    loss at every step and bitwise identical final weights."""
    n = 12
    straight = make_tokens(tmp_path / "straight")
    cfg = tiny_config(straight, max_steps=n, ckpt_interval=n // 2, eval_interval=0, global_batch_tokens=256)
    cfg.model.dropout = 0.1  # so the RNG state must be restored too
    train(cfg, straight)  # in this process, also one thread: the same arithmetic as the subprocesses
    killed = make_tokens(tmp_path / "killed")
    cfg_k = tiny_config(killed, max_steps=n, ckpt_interval=n // 2, eval_interval=0, global_batch_tokens=256)
    cfg_k.model.dropout = 0.1
    path = write_config(killed, cfg_k)
    proc = cli_train(path, popen=True)
    deadline = time.time() + 90
    while ck.read_pointer(killed / "checkpoints", "latest") != "step_000006" and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -9
    r = cli_train(path, "--resume", "auto")
    assert r.returncode == 0, r.stdout[-2000:]
    assert "resumed from" in (killed / "logs" / "train.log").read_text()
    la, lb = losses(straight), losses(killed)
    assert sorted(la) == sorted(lb) == list(range(1, n + 1))
    assert la == lb
    wa, wb = _weights(straight / "checkpoints" / "step_000012"), _weights(killed / "checkpoints" / "step_000012")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_saves_and_exits_zero(tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint at that step is written, exit code 0."""
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_steps=100_000, ckpt_interval=0, eval_interval=0, log_interval=1)
    proc = cli_train(write_config(run, cfg), popen=True)
    metrics = run / "logs" / "metrics.jsonl"
    deadline = time.time() + 90
    while (not metrics.exists() or metrics.read_text().count("\n") < 3) and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert time.time() - t0 < 20
    name = ck.read_pointer(run / "checkpoints", "latest")
    step = int(name.split("_")[1])
    assert 3 <= step < 100_000 and "stopped by SIGTERM" in out
    assert ck.load_train_state(run / "checkpoints" / name)["step"] == step
    assert max(losses(run)) == step


def test_init_from_checkpoint(tmp_path):
    a = make_tokens(tmp_path / "a")
    train(tiny_config(a, max_steps=4), a)
    b = make_tokens(tmp_path / "b")
    s = train(tiny_config(b, max_steps=1, init_from=str(a), lr=1e-9, warmup_steps=0), b)
    assert s["start_step"] == 0 and "initialised weights from" in (b / "logs" / "train.log").read_text()
    wa = _weights(a / "checkpoints" / "step_000004")
    wb = _weights(b / "checkpoints" / "step_000001")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="unsupported architecture '\\?' in config.json"):
        train(tiny_config(b, init_from=str(tmp_path / "hf"), resume="none"), b)


def test_stop_step_then_resume_equals_straight(tmp_path):
    """train.stop_step trains in chunks (e.g. 9-hour notebook sessions) on the schedule of max_steps."""
    a, b = make_tokens(tmp_path / "a"), make_tokens(tmp_path / "b")
    train(tiny_config(a, max_steps=8, ckpt_interval=0, eval_interval=0), a)
    s = train(tiny_config(b, max_steps=8, ckpt_interval=0, eval_interval=0, stop_step=5), b)
    assert s["steps"] == 5 and s["stopped"] == "stop_step"
    s = train(tiny_config(b, max_steps=8, ckpt_interval=0, eval_interval=0), b)
    assert s["start_step"] == 5 and s["steps"] == 8
    assert losses(a) == losses(b)
    wa, wb = _weights(a / "checkpoints" / "step_000008"), _weights(b / "checkpoints" / "step_000008")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_a_finished_run_again_says_it_is_complete(tmp_path):
    """A run already at max_steps trains nothing and says so (not '0 tokens/s'), and keeps its checkpoint."""
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_steps=4, ckpt_interval=0, eval_interval=0), run)
    s = train(tiny_config(run, max_steps=4, ckpt_interval=0, eval_interval=0), run)
    assert s["start_step"] == 4 and s["steps"] == 4 and s["tokens_per_s"] is None
    last = (run / "logs" / "train.log").read_text().splitlines()[-1]
    assert "already complete at step 4" in last and "antimatter eval" in last and "0 tokens/s" not in last
    assert ck.read_pointer(run / "checkpoints", "latest") == "step_000004"


def test_compile_tuning_turns_on_inductors_kernel_tuning_for_that_run_only(tmp_path):
    import torch._inductor.config as inductor_config

    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, compile=True, compile_backend="eager", compile_tuning=True, max_steps=1,
                      ckpt_interval=0), run)
    assert inductor_config.coordinate_descent_tuning is True
    run2 = make_tokens(tmp_path / "run2")
    train(tiny_config(run2, compile=True, compile_backend="eager", max_steps=1, ckpt_interval=0), run2)
    assert inductor_config.coordinate_descent_tuning is False


def test_compile_tuning_without_compile_says_what_to_set(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"train.compile_tuning=true .* set train.compile=true as well"):
        validate(tiny_config(run, compile_tuning=True, max_steps=1))  # the config's check, at load time


def test_val_rows_carry_bits_per_byte(tmp_path):
    """With the val split's bytes per token in tokens/meta.json, each val row also states the loss in bits
    per byte (the tokenizer-independent figure), and nothing else changes."""
    run = make_tokens(tmp_path / "run")
    meta_path = run / "tokens" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["splits"] = {"val": {"bytes_per_token": 2.5}}
    meta_path.write_text(json.dumps(meta))
    train(tiny_config(run, max_steps=4, eval_interval=2, ckpt_interval=0), run)
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    for r in vals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / 2.5)


def test_a_nonfinite_model_is_never_a_checkpoint(tmp_path):
    """After one step at an absurd rate the val loss is NaN: that model is not written (no checkpoint, no
    `latest`), the run stops with a one-line error that says no good checkpoint exists, and a later run at a
    sane rate starts afresh instead of resuming from the broken weights."""
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, lr=1e30, warmup_steps=0, max_steps=50, ckpt_interval=1, eval_interval=0)
    with pytest.raises(UserError, match=r"training diverged at step 1: the val loss is nan, so no checkpoint "
                                        r"was written; last good checkpoint: none\. Lower train.lr"):
        train(cfg, run)
    assert ck.find_resume(run / "checkpoints") is None
    s = train(tiny_config(run, max_steps=2, ckpt_interval=2, eval_interval=0), run)
    assert s["start_step"] == 0 and s["last_val_loss"] is not None and math.isfinite(s["last_val_loss"])


def test_nonfinite_numbers_in_the_config_are_refused():
    from antimatter.config import ConfigError, load_config

    for item, key in (("train.lr=inf", "train.lr"), ("train.weight_decay=.nan", "train.weight_decay"),
                      ("model.init_std=-inf", "model.init_std"), ("data.val_fraction=nan", "data.val_fraction")):
        with pytest.raises(ConfigError, match=f"{key}: expected a finite number"):
            load_config(None, [item])


def test_resume_drops_a_cut_last_metrics_line(tmp_path):
    """A kill or a full disk during an append leaves half a line in logs/metrics.jsonl: resuming drops it
    (the step is logged again) instead of crashing on it."""
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_steps=4, ckpt_interval=4, eval_interval=0, log_interval=1), run)
    with open(run / "logs" / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "tokens": 64')
    s = train(tiny_config(run, max_steps=6, ckpt_interval=2, eval_interval=0, log_interval=1), run)
    assert s["start_step"] == 4 and s["steps"] == 6
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_second_train_on_the_same_run_is_refused_until_the_first_dies(tmp_path):
    """Two `antimatter train` on one run folder would interleave checkpoints and metrics: the second gets one
    line naming the first's pid; after a kill -9 of the first (no clean-up ran), the lock is free again."""
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_steps=100_000, ckpt_interval=50, eval_interval=0, log_interval=50)
    first = cli_train(write_config(run, cfg), popen=True)
    try:
        deadline = time.time() + 120
        lock = run / "train.lock"
        while not (lock.is_file() and "pid" in lock.read_text()) and time.time() < deadline:
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.2)
        with pytest.raises(UserError, match=rf"run .* is in use by pid {first.pid} on .*: wait for it"):
            train(tiny_config(run, max_steps=2), run)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    s = train(tiny_config(run, max_steps=2, ckpt_interval=2, eval_interval=0, resume="none"), run)
    assert s["steps"] == 2


def test_resuming_a_checkpoint_of_another_shape_is_one_line(tmp_path):
    """A wider model resumed from a narrower run's checkpoint: one line naming a tensor and both shapes, not
    load_state_dict's RuntimeError listing every tensor."""
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_steps=2, ckpt_interval=2, eval_interval=0), run)
    cfg = tiny_config(run, max_steps=4)
    cfg.model.d_model = 64
    with pytest.raises(UserError, match=r"checkpoint weights do not fit the model config \(\d+ tensors of another "
                                        r"shape, e.g. transformer\.\S+ \(\d+,( \d+)?\) vs \(\d+,( \d+)?\)\)"):
        train(cfg, run)


@pytest.mark.parametrize("change, before, after", [("tie_embeddings", False, True), ("logit_softcap", 0.0, 30.0),
                                                    ("rope_theta", 10000.0, 500.0)])
def test_resume_with_another_model_function_is_one_line(tmp_path, change, before, after):
    """Settings that keep every tensor's shape but change what the weights compute: tying an untied head was
    a KeyError traceback from the optimizer state, a soft-cap or RoPE base was trained on silently. Dropout
    may change; RoPE's base is no setting of a model with learned positions."""
    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_steps=4, ckpt_interval=4, eval_interval=0)
    setattr(cfg.model, change, before)
    train(cfg, run)
    cfg = tiny_config(run, max_steps=6, ckpt_interval=6, eval_interval=0)
    setattr(cfg.model, change, after)
    if change == "rope_theta":  # the tiny preset has learned positions
        assert train(cfg, run)["steps"] == 6
        return
    with pytest.raises(UserError, match=f"was trained with model.{change}={before}, not {after}: resume with"):
        train(cfg, run)
    setattr(cfg.model, change, before)
    cfg.model.dropout = 0.1
    assert train(cfg, run)["steps"] == 6


def test_resume_none_in_a_run_with_checkpoints_keeps_them(tmp_path):
    """train.resume=none wrote its step folders over the earlier ones (and moved `best`/`latest` to them) and
    cut the metrics log to nothing: the earlier training now moves aside, whole."""
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_steps=4, ckpt_interval=4, eval_interval=0), run)
    weights = (run / "checkpoints" / "step_000004" / "model.safetensors").read_bytes()
    metrics = (run / "logs" / "metrics.jsonl").read_text()
    s = train(tiny_config(run, max_steps=4, ckpt_interval=4, eval_interval=0, resume="none", lr=1e-3), run)
    assert s["steps"] == 4
    assert (run / "checkpoints.1" / "step_000004" / "model.safetensors").read_bytes() == weights
    assert (run / "logs.1" / "metrics.jsonl").read_text() == metrics
    assert (run / "checkpoints" / "step_000004" / "model.safetensors").read_bytes() != weights
    assert "earlier training is kept in checkpoints.1 and logs.1" in (run / "logs" / "train.log").read_text()


@pytest.mark.parametrize("bad, message", [
    ({"init_from": "no-such-run"}, "no checkpoints found at no-such-run"),
    ({"compile": True, "compile_backend": "nonexistent"}, "train.compile_backend 'nonexistent' is not a torch"),
])
def test_a_refused_fresh_start_moves_nothing_aside(tmp_path, bad, message):
    """train.resume=none moved the earlier checkpoints and logs aside before train.init_from was read and the
    step compiled: a start refused there left the run with no checkpoints at all, and each retry moved them
    again (checkpoints.2, ...). The move now waits until the start is accepted."""
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_steps=4, ckpt_interval=4, eval_interval=0), run)
    before = sorted(p.name for p in run.iterdir())
    log = (run / "logs" / "train.log").read_text()
    with pytest.raises(UserError, match=message):
        train(tiny_config(run, max_steps=4, eval_interval=0, resume="none", **bad), run)
    assert sorted(p.name for p in run.iterdir()) == before
    assert ck.list_checkpoints(run / "checkpoints")
    assert (run / "logs" / "train.log").read_text().startswith(log)  # the refused start's lines appended


def test_a_stop_step_behind_the_run_names_stop_step_not_max_steps(tmp_path, capsys):
    """A resume at step 4 with train.stop_step=2 trained nothing and advised raising train.max_steps, which
    was not what stopped it."""
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_steps=8, stop_step=4, ckpt_interval=4, eval_interval=0), run)
    capsys.readouterr()
    s = train(tiny_config(run, max_steps=8, stop_step=2, ckpt_interval=4, eval_interval=0), run)
    assert s["steps"] == 4
    err = capsys.readouterr().err
    assert "train.stop_step (2) is not after this run's step 4" in err and "raise train.max_steps" not in err


def test_max_steps_zero_on_a_fresh_run_is_an_error_not_a_finished_run(tmp_path):
    run = make_tokens(tmp_path / "run")
    with pytest.raises(UserError, match="train.max_steps is 0 and train.max_minutes is off: nothing would be "
                                        "trained"):
        train(tiny_config(run, max_steps=0), run)
    assert not ck.list_checkpoints(run / "checkpoints")


def test_a_fresh_run_starts_from_the_weights_its_seed_draws(tmp_path):
    """The model is built on the training device and initialised there: on the CPU that is exactly the model
    GPT(cfg) draws under the run's seed (a step at learning rate 0 leaves it as it started)."""
    from antimatter.model.gpt import GPT

    run = make_tokens(tmp_path / "run")
    cfg = tiny_config(run, max_steps=1, lr=0.0, warmup_steps=0, weight_decay=0.0, ckpt_interval=1,
                      eval_interval=1)
    train(cfg, run)
    torch.manual_seed(cfg.train.seed)
    drawn = GPT(cfg.model).state_dict()
    saved = load_file(run / "checkpoints" / "step_000001" / "model.safetensors")
    assert saved and all(torch.equal(saved[k], drawn[k]) for k in saved)
