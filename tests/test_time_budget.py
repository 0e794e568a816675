"""train.max_minutes: the step count is fixed from the first timed steps so that the schedule ends when the
time budget does; the choice is logged, checkpointed and kept on resume.

Timing on a shared 2-core machine is noisy, so the tests separate what is exact from what is measured:
the decision (steps = fix step + (budget - used) / seconds a step), the schedule's end at its floor, the
number of evaluations, the log line and the clock's bookkeeping are asserted exactly on every run; only the
end-to-end claim (training time within 2 step-times + 15% of the budget) depends on the machine keeping
its pace between the 10 calibration steps and the rest, and it gets up to three fresh runs for that.

Measured here: the calibration steps (2-11) run slower than the later ones, so budgeted runs end early. A
process's first run stopped at 51-90% of its budget; after an in-process warm-up run (done below), runs of
~12 ms steps still stopped at 72-95% (calibrated 13-17 ms a step, then 11-14 ms: half missed the 15%), runs
of ~25 ms steps (the size used here) at 80-103% (one in eight missed)."""

from __future__ import annotations

import json
import math
import time

import pytest
from train_helpers import make_tokens, one_thread, tiny_config

from antimatter import checkpoint as ck
from antimatter.train.distributed import Dist
from antimatter.train.trainer import CALIBRATION_SKIP, CALIBRATION_STEPS, Trainer, train

assert one_thread  # the autouse fixture, imported so pytest uses it here

LR, FLOOR = 3e-3, 0.1
# micro-batch 32 x seq 64: ~25 ms a step here, so the 10 calibration steps span ~0.25 s rather than ~0.03 s
RUN = dict(micro_batch_size=32, seq_len=64, log_interval=50, ckpt_interval=0, warmup_steps=5, eval_steps=2,
           budget_evals=4, lr=LR, min_lr_ratio=FLOOR)


def _rows(run):
    return [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def _check_decision(run, s, minutes: float, budget_evals: int) -> None:
    """What must hold exactly for any measured pace."""
    b = s["budget"]
    assert b is not None and b["minutes"] == minutes and b["timed_steps"] == CALIBRATION_STEPS
    assert s["steps"] == b["max_steps"] and s["stopped"] == "max_steps"
    budget_s, per_step = minutes * 60, b["seconds_per_step"]
    fix_step = 1 + CALIBRATION_SKIP + CALIBRATION_STEPS  # the compile step, warm-up steps, the timed ones
    assert b["fixed_at_step"] == fix_step
    used = b["train_seconds_at_fix"]
    assert used > 0
    assert abs(b["max_steps"] - (fix_step + math.floor((budget_s - used) / per_step))) <= 1  # float rounding
    # the schedule ends at its floor on the last step, not before
    train_rows = [r for r in _rows(run) if "loss" in r]
    assert train_rows[-1]["step"] == b["max_steps"]
    assert train_rows[-1]["lr"] == pytest.approx(LR * FLOOR)
    assert all(r["lr"] > LR * FLOOR for r in train_rows[:-1])
    # val loss every ceil(max_steps / budget_evals) steps once the step count is fixed, and at the end: about
    # budget_evals times (fewer on a slow machine, where the first of them falls before the fix)
    assert b["max_steps"] >= budget_evals ** 2
    every = math.ceil(b["max_steps"] / budget_evals)
    due = {s for s in range(every, b["max_steps"] + 1, every) if s > fix_step} | {b["max_steps"]}
    steps = [r["step"] for r in _rows(run) if "val_loss" in r]
    assert due <= set(steps) <= due | {fix_step} and steps == sorted(set(steps)), (steps, due)
    if b["max_steps"] >= budget_evals * (fix_step + 1):
        assert budget_evals <= len(steps) <= budget_evals + 1, steps
    log = (run / "logs" / "train.log").read_text()
    assert log.count("time budget") == 1
    assert f"time budget {minutes:g} min:" in log and f"-> {b['max_steps']:,} steps" in log
    # the clock: the loop's wall time is compile + training + evaluation/checkpoint pauses, nothing lost
    parts = s["compile_seconds"] + s["train_seconds"] + s["eval_checkpoint_seconds"]
    assert abs(s["seconds"] - parts) <= 0.05 + 0.02 * s["seconds"], (s["seconds"], parts)
    assert s["eval_checkpoint_seconds"] > 0  # evaluations happened and were not counted as training
    # the last log line is written before the final evaluation pauses the clock: a busy machine adds ms
    assert train_rows[-1]["train_s"] == pytest.approx(s["train_seconds"], abs=0.05)


def test_budget_run_ends_when_the_budget_does(tmp_path):
    minutes = 0.06  # 3.6 s of training
    budget_s = minutes * 60
    warm = make_tokens(tmp_path / "warm")
    train(tiny_config(warm, max_steps=20, eval_interval=0, **RUN), warm)
    tries = []
    for attempt in range(3):
        run = make_tokens(tmp_path / f"run{attempt}")
        t0 = time.perf_counter()
        s = train(tiny_config(run, max_minutes=minutes, **RUN), run)
        wall = time.perf_counter() - t0
        _check_decision(run, s, minutes, RUN["budget_evals"])
        assert wall >= s["seconds"] >= s["train_seconds"]
        b = s["budget"]
        cal = b["seconds_per_step"]
        pace = (s["train_seconds"] - b["train_seconds_at_fix"]) / (b["max_steps"] - b["fixed_at_step"])
        tolerance = 2 * max(cal, pace) + 0.15 * budget_s
        tries.append(f"train {s['train_seconds']:.2f}s of {budget_s:.2f}s in {b['max_steps']} steps, "
                     f"calibrated {cal * 1e3:.1f} ms/step, then {pace * 1e3:.1f} ms/step")
        if abs(s["train_seconds"] - budget_s) <= tolerance:
            break
    else:
        pytest.fail("training time missed the budget in 3 runs (a pace that changed after calibration "
                    "shows as calibrated != then): " + "; ".join(tries))


def _resume_cfg(run, **kw):
    return tiny_config(run, log_interval=25, ckpt_interval=0, eval_interval=0, warmup_steps=5, budget_evals=2,
                       lr=LR, min_lr_ratio=FLOOR, global_batch_tokens=128, **kw)


def test_resume_keeps_the_budgeted_step_count(tmp_path):
    """Stopped (train.stop_step) after the budget was fixed, resumed in a slower process (micro-batch 2 with
    2 accumulation steps for the same global batch) with another max_minutes: the step count and the
    schedule stay the checkpoint's, no new calibration, and the log says so."""
    run = make_tokens(tmp_path / "run")
    s1 = train(_resume_cfg(run, max_minutes=0.03, stop_step=20), run)
    assert s1["stopped"] == "stop_step" and s1["steps"] == 20
    state = ck.load_train_state(run / "checkpoints" / "step_000020")
    budget = state["budget"]
    assert budget == s1["budget"] and budget["max_steps"] > 20 and state["train_seconds"] > 0
    s2 = train(_resume_cfg(run, max_minutes=0.06, micro_batch_size=2), run)
    assert s2["start_step"] == 20 and s2["accum_steps"] == 2
    assert s2["budget"] == budget and s2["steps"] == budget["max_steps"] and s2["stopped"] == "max_steps"
    assert s2["train_seconds"] > state["train_seconds"]  # the clock continues from the checkpoint
    log = (run / "logs" / "train.log").read_text()
    assert log.count("time budget") == 1  # decided once, in the first process
    assert (f"train.max_minutes is 0.06 but this run fixed its schedule for 0.03 minutes "
            f"({budget['max_steps']:,} steps): keeping that schedule") in log
    rows = [r for r in _rows(run) if "loss" in r]
    assert rows[-1]["step"] == budget["max_steps"] and rows[-1]["lr"] == pytest.approx(LR * FLOOR)


def test_resume_before_the_budget_was_fixed_calibrates_then(tmp_path):
    """Stopped during calibration: the checkpoint has no budget yet; the resumed process times its own first
    steps (not counting its first) and fixes the step count from the training time so far."""
    run = make_tokens(tmp_path / "run")
    s1 = train(_resume_cfg(run, max_minutes=0.03, stop_step=5), run)
    assert s1["steps"] == 5 and s1["budget"] is None
    assert ck.load_train_state(run / "checkpoints" / "step_000005")["budget"] is None
    s2 = train(_resume_cfg(run, max_minutes=0.03), run)
    b = s2["budget"]
    assert s2["start_step"] == 5 and b["timed_steps"] == CALIBRATION_STEPS
    fix_step = 5 + 1 + CALIBRATION_SKIP + CALIBRATION_STEPS
    assert b["fixed_at_step"] == fix_step
    # used = the first process's training time + this one's steps after its first
    prior = ck.load_train_state(run / "checkpoints" / "step_000005")["train_seconds"]
    used = b["train_seconds_at_fix"]
    assert used > prior
    assert abs(b["max_steps"] - (fix_step + math.floor((0.03 * 60 - used) / b["seconds_per_step"]))) <= 1
    assert s2["steps"] == b["max_steps"]


def test_a_run_cut_before_it_could_time_its_steps_ends_at_its_budget(tmp_path):
    """Every process stopped two steps after its first (fewer than calibration needs): once the training time
    of all of them reaches the budget, the run fixes its step count where it is and ends, instead of training
    on with no end to its schedule."""
    run = make_tokens(tmp_path / "run")
    minutes = 0.004  # 0.24 s of ~25 ms steps: several processes
    for k in range(1, 40):
        s = train(tiny_config(run, max_minutes=minutes, stop_step=3 * k, **{**RUN, "budget_evals": 2}), run)
        if s["stopped"] == "max_steps":
            break
    else:
        pytest.fail(f"still training after {s['steps']} steps and {s['train_seconds']:.2f}s of a "
                    f"{minutes * 60:.2f}s budget")
    assert k > 1 and s["budget"]["timed_steps"] < CALIBRATION_STEPS
    assert s["steps"] == s["budget"]["max_steps"] == s["budget"]["fixed_at_step"]
    assert minutes * 60 <= s["train_seconds"] <= minutes * 60 + 3 * s["budget"]["seconds_per_step"] + 0.2


def test_budget_evals_stay_near_budget_evals_on_short_runs(tmp_path):
    """train.budget_evals "measure val loss this many times, evenly over the budget": the loop evaluates every
    max_steps // budget_evals steps and at the last step. For runs shorter than budget_evals ** 2 steps the
    floor division makes that up to twice as many (39 steps, 20 evals asked: every step, 39 evaluations)."""
    run = make_tokens(tmp_path / "run", n_train=3000, n_val=500)
    trainer = Trainer(tiny_config(run, max_minutes=1, budget_evals=20), run, Dist())
    counts = {}
    for max_steps in (20, 39, 59, 150, 399, 400, 1019, 5000):
        trainer.max_steps = max_steps
        every = trainer._eval_every()
        counts[max_steps] = len(range(every, max_steps + 1, every)) + (max_steps % every != 0)
    assert all(19 <= n <= 21 for n in counts.values()), f"max_steps -> evaluations: {counts}"
