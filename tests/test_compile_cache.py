"""torch.compile's and Triton's caches go to one folder the user can see and clear (compile_cache.py), unless
the user set torch's or Triton's own variable; a second process finds what the first compiled there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from antimatter.compile_cache import (
    INDUCTOR_ENV,
    TRITON_ENV,
    bytecode_note,
    describe,
    use_bytecode_cache,
    use_compile_cache,
)
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


IMPORT_FRESH = """
import sys
from antimatter.compile_cache import use_bytecode_cache
print(use_bytecode_cache("freshpkg"))
import freshpkg
"""


def test_a_package_without_bytecode_beside_it_gets_it_in_the_cache_folder(tmp_path):
    """An install with no .pyc beside its sources (read-only, or installed without) would be compiled again by
    every process: its bytecode goes to cache_root()/pycache, for this process and its children."""
    (tmp_path / "pkgs" / "freshpkg").mkdir(parents=True)
    (tmp_path / "pkgs" / "freshpkg" / "__init__.py").write_text("VALUE = 1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    env.update(ANTIMATTER_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "pkgs"), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", IMPORT_FRESH], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(tmp_path / "cache" / "pycache")
    assert list((tmp_path / "cache" / "pycache").rglob("freshpkg/__init__.*.pyc"))
    assert not (tmp_path / "pkgs" / "freshpkg" / "__pycache__").exists()


def test_a_normal_install_and_a_users_choice_keep_their_bytecode_where_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIMATTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    (tmp_path / "compiled").mkdir()
    (tmp_path / "compiled" / "__init__.py").write_text("")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tmp_path / "compiled")], check=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert use_bytecode_cache("compiled") is None and sys.pycache_prefix is None
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # PYTHONDONTWRITEBYTECODE: the user wants none
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "__init__.py").write_text("")
    assert use_bytecode_cache("bare") is None and sys.pycache_prefix is None
    # ... and is told what it costs and how to change it, unless the package has its bytecode anyway
    assert bytecode_note("compiled") is None
    note = bytecode_note("bare")
    assert note.startswith("Python writes no bytecode here (PYTHONDONTWRITEBYTECODE is set) and bare has none")
    assert note.endswith(f"unset PYTHONDONTWRITEBYTECODE and antimatter keeps them in {tmp_path / 'cache' / 'pycache'}")
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert bytecode_note("bare") is None  # bytecode can be written: use_bytecode_cache takes care of it
