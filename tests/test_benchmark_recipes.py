"""benchmarks/recipes.py over several commands: `--call-s` cuts a budgeted run with a checkpoint and the same
command resumes it on the schedule fixed at its start, so a budget longer than one command still yields one
row, one curve and one calibration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from train_helpers import make_tokens

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.max_minutes=0.05", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.vocab_size=512",
        "model.block_size=32", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_tokens=128",
        "train.device=cpu", "train.compile=false", "train.dtype=fp32", "train.eval_steps=1"]


def _recipes(data: Path, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipes.py"), "--data", str(data), "--out",
                          str(out), "--plan", "modern", *TINY, "--only", "modern", "--call-s", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_a_budget_cut_into_commands_resumes_and_reports_once(tmp_path):
    data = make_tokens(tmp_path / "data")
    meta = json.loads((data / "tokens" / "meta.json").read_text())
    meta["splits"] = {"val": {"bytes_per_token": 2.0}, "train": {"tokens": 40_000}}  # what tokenize writes
    (data / "tokens" / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    first = _recipes(data, out)
    assert "modern cut at step" in first and "the same command again resumes it" in first
    assert not (out / "results.jsonl").exists()
    for _ in range(8):
        if (out / "results.jsonl").exists():
            break
        _recipes(data, out)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["modern"]
    row = rows[0]
    assert row["steps"] == row["budget"]["max_steps"] and row["train_seconds"] > 1.5  # more than one command trained
    log = (out / "modern" / "logs" / "train.log").read_text()
    assert log.count("time budget 0.05 min") == 1 and "resumed from" in log
    assert row["curve"][-1]["step"] == row["steps"]
    # the finished run's curve through benchmarks/compare_curves.py: against itself it reaches its own final
    # loss at the same time, at most its whole time
    cmp = _compare([out / "modern", out / "modern"], tmp_path / "cmp")
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    table = json.loads((tmp_path / "cmp" / "curves.json").read_text())
    assert table["target_val_loss"] == row["final_val_loss"] and (tmp_path / "cmp" / "curves.png").stat().st_size
    fractions = [r["time_fraction_of_baseline"] for r in table["rows"]]
    assert fractions[0] == fractions[1] and 0 < fractions[0] <= 1.0
    bare = tmp_path / "bare"  # its metrics log without the run's tokens/: no bytes per token to read
    shutil.copytree(out / "modern" / "logs", bare / "logs")
    run = _compare([bare], tmp_path / "cmp2")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert f"no {bare / 'tokens' / 'meta.json'}: the first run's folder needs its tokens/" in run.stderr


def _compare(runs: list[Path], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_curves.py"), *map(str, runs),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)


def test_compare_curves_names_a_folder_without_a_metrics_log(tmp_path):
    run = _compare([tmp_path], tmp_path / "cmp")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert f"no {tmp_path / 'logs' / 'metrics.jsonl'}: pass run folders that `antimatter train` wrote" in run.stderr
