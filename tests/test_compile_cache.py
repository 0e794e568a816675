"""torch.compile's and Triton's caches go to one folder the user can see and clear (compile_cache.py), unless
the user set torch's or Triton's own variable; a second process finds what the first compiled there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from antimatter.compile_cache import INDUCTOR_ENV, TRITON_ENV, describe, use_compile_cache
from antimatter.config import load_config
from antimatter.model.gpt import GPT
from antimatter.train.distributed import Dist
from antimatter.train.parallelize import parallelize

COMPILE_ONE = """
import torch
from antimatter.compile_cache import describe, use_compile_cache
folder = use_compile_cache()
print(describe(folder))
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
f(torch.randn(8))
"""


@pytest.fixture
def fresh_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIMATTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(INDUCTOR_ENV, raising=False)
    monkeypatch.delenv(TRITON_ENV, raising=False)
    return tmp_path / "cache" / "compile"


def test_the_cache_folder_is_ours_unless_the_user_named_one(fresh_env, tmp_path, monkeypatch):
    assert use_compile_cache() == fresh_env
    assert os.environ[INDUCTOR_ENV] == str(fresh_env) and os.environ[TRITON_ENV] == str(fresh_env / "triton")
    monkeypatch.setenv(INDUCTOR_ENV, str(tmp_path / "theirs"))
    monkeypatch.delenv(TRITON_ENV)
    assert use_compile_cache() == tmp_path / "theirs"
    assert os.environ[TRITON_ENV] == str(tmp_path / "theirs" / "triton")


def test_a_second_process_finds_what_the_first_compiled(fresh_env, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-c", COMPILE_ONE], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert f"compile cache {fresh_env} (empty: this start compiles everything;" in first.stdout
    assert any(p.is_file() for p in fresh_env.rglob("*"))
    second = subprocess.run([sys.executable, "-c", COMPILE_ONE], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert " files, " in second.stdout and "delete the folder to clear it" in second.stdout


def test_a_compiled_training_step_logs_where_its_cache_is(fresh_env):
    cfg = load_config(None, ["model=tiny", "train.device=cpu", "train.compile=true"])
    logged: list[str] = []
    parallelize(GPT(cfg.model), cfg.train, Dist(), "fp32", log=logged.append)  # torch.compile compiles lazily
    assert logged == [describe(fresh_env)]
