"""The start-up benchmark on the CPU with the tiny model: cold and warm rows for training and generation, and
the warm compiled start finds what the cold one compiled (the compile cache works for generate). Training
runs eager here: compiling its step on 2 shared cores takes about 45 s a start; generate --compile keeps the
compiled path under test. Also the trainer's record of when its first step ended and of its set-up phases,
which the benchmark reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from train_helpers import make_tokens, one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)

from antimatter.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_records_when_its_first_step_ended(tmp_path):
    """Wall clock (a launcher subtracts its launch time from it): in the summary and in the log line."""
    run = make_tokens(tmp_path / "run", n_train=4_000, n_val=1_000)
    before = time.time()
    summary = train(tiny_config(run, max_steps=2, eval_interval=0, ckpt_interval=0), run)
    assert before < summary["first_step_at"] < time.time()
    log = (run / "logs" / "train.log").read_text()
    assert f"(unix time {summary['first_step_at']:.3f})" in log and "first step done" in log
    # the seconds before the loop, phase by phase, in the order they ran
    set_up = next(line for line in log.splitlines() if " set-up " in line)
    phases = [p.split()[0] for p in set_up.split(": ", 1)[1].split(", ")]
    assert phases == ["model", "parallelism", "train", "val", "logging"], set_up


def test_startup_benchmark_cold_and_warm_on_cpu(tmp_path):
    out = tmp_path / "startup.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--model", "tiny", "--device", "cpu",
                        "--steps", "2", "--seq-len", "32", "--no-compile-train", "--only", "train", "generate",
                        "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    rows = {(row["what"], row["start"]): row for row in result["rows"]}
    assert set(rows) == {(what, start) for what in ("train", "generate", "generate --compile")
                         for start in ("cold", "warm")}
    for (what, _), row in rows.items():
        first = row["launch_to_first_step_s" if what == "train" else "launch_to_first_token_s"]
        assert 0 < first <= row["exit_s"], row
    for s in ("cold", "warm"):  # launch -> first step = before set-up + set-up + compile/first step
        row = rows[("train", s)]
        assert 0 <= row["compile_seconds"] < row["launch_to_first_step_s"]
        assert row["before_set_up_s"] > 0 and row["set_up_s"] >= 0 and "model on cpu" in row["set_up_parts"]
        assert abs(row["before_set_up_s"] + row["set_up_s"] + row["compile_seconds"]
                   - row["launch_to_first_step_s"]) < 0.02
    assert rows[("generate --compile", "cold")]["cache_files"] == 0
    assert rows[("generate --compile", "warm")]["cache_files"] > 0  # the cold start's compiled code, reused
    assert result["provenance"]["git_commit"] and result["provenance"]["device"].startswith("CPU")
    assert "cold" in r.stdout and "warm" in r.stdout
