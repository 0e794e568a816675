"""A run says how long it will take: the estimate after the first timed steps, the warning past an hour on a
CPU, and the refusal of a run that chose no model and would train GPT-2 124M on a CPU for hours."""

from __future__ import annotations

import pytest
import torch
from train_helpers import make_tokens, one_thread, tiny_config

from antimatter import cli, pipeline
from antimatter.config import load_config
from antimatter.errors import UserError
from antimatter.train import estimate
from antimatter.train.estimate import check_default_model, estimate_message, format_duration, model_chosen
from antimatter.train.trainer import train

assert one_thread  # the autouse fixture, imported so pytest uses it here


def test_durations_read_as_a_person_says_them():
    assert [format_duration(s) for s in (4.3, 42, 600, 725, 4320, 154_800)] == [
        "4.3 s", "42 s", "10 min", "12 min 5 s", "1 h 12 min", "43 h"]


def test_the_estimate_and_the_cpu_warning():
    line, = estimate_message(step=5, max_steps=1005, per_step=4.3, timed_steps=3, on_cpu=False)
    assert line.startswith("estimated 1 h 12 min for the 1,000 steps left (to step 1,005) at 4.3 s a step")
    assert len(estimate_message(5, 1005, 4.3, 3, on_cpu=True)) == 2  # past an hour on a CPU: a warning
    warning = estimate_message(5, 1005, 4.3, 3, on_cpu=True)[1]
    assert warning.startswith("warning: this run needs about 1 h 12 min on the CPU")
    assert "model=quickstart train.max_minutes=10" in warning and "antimatter quickstart" in warning
    assert len(estimate_message(5, 505, 4.3, 3, on_cpu=True)) == 1  # 36 min: no warning


def test_a_step_count_run_logs_its_estimate_once(tmp_path):
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_steps=12, eval_interval=0, ckpt_interval=0), run)
    log = (run / "logs" / "train.log").read_text()
    assert log.count("estimated ") == 1 and "for the 8 steps left (to step 12)" in log
    assert "warning: this run needs" not in log


def test_a_time_budget_logs_its_budget_instead(tmp_path):
    run = make_tokens(tmp_path / "run")
    train(tiny_config(run, max_minutes=0.02, eval_interval=0, ckpt_interval=0, budget_evals=0), run)
    log = (run / "logs" / "train.log").read_text()
    assert "time budget" in log and "estimated " not in log


@pytest.fixture
def slow_cpu(monkeypatch: pytest.MonkeyPatch):
    """A CPU of 50 GFLOP/s and no GPU: the estimate does not depend on the machine running the tests."""
    monkeypatch.setattr(estimate, "cpu_matmul_flops", lambda *a, **k: 50e9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_no_model_chosen_on_a_cpu_is_refused_with_the_estimate(slow_cpu):
    cfg = load_config(None, [])
    assert not model_chosen(cfg)
    with pytest.raises(UserError) as e:
        check_default_model(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "no model was chosen, so the default is the gpt2-124m size" in msg
    assert "for 1,000 steps: about " in msg and " h on this CPU" in msg
    assert "antimatter quickstart" in msg and "model=quickstart train.max_minutes=10" in msg
    assert "model=gpt2-124m" in msg


@pytest.mark.parametrize("overrides", [["model=gpt2-124m"], ["model.n_layer=6"], ["train.max_minutes=10"],
                                       ["model=quickstart"]])
def test_a_chosen_model_or_a_time_budget_is_trained_as_given(slow_cpu, overrides):
    logged = []
    check_default_model(load_config(None, overrides), log=logged.append)
    assert logged == []


def test_a_short_default_run_says_which_model_it_trains(slow_cpu):
    logged = []
    check_default_model(load_config(None, ["train.max_steps=2"]), log=logged.append)
    assert len(logged) == 1 and logged[0].startswith("note: no model was chosen, so the default is the gpt2-124m size")


def test_a_gpu_trains_the_default_as_before(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(estimate, "cpu_matmul_flops", lambda *a, **k: pytest.fail("no probe on a GPU"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_default_model(load_config(None, []))


def test_the_pipeline_refuses_before_the_data_stages(slow_cpu, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, *a, **k: ran.append(stage))
    assert cli.main(["pipeline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("antimatter pipeline: error: no model was chosen") and len(err.splitlines()) == 1
    assert ran == []
